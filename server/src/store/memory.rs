//! The embedded store: everything in one process behind a std `Mutex` (never held across an
//! `.await`), events on a tokio broadcast channel.

use super::{Store, StoreError, ENDED_RETENTION_MS, LAST_SESSION_KEPT_MS};
use crate::model::{Binding, Event, HostRecord, HostState, PoolKey, Session, SessionState, Ticket};
use crate::util::now_ms;
use async_trait::async_trait;
use berth_protocol::{HostId, PlayerId, SessionId};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::broadcast;

/// Ended sessions this store keeps at most (the oldest go first): one process's memory is the
/// limit here, where Redis expires them by time alone.
pub const MAX_ENDED: usize = 50_000;

#[derive(Default)]
struct Inner {
    /// Per pool, tickets ordered by (enqueued_ms, id).
    queues: BTreeMap<PoolKey, BTreeMap<(u64, String), Ticket>>,
    /// Ticket id → its key in `queues`.
    index: HashMap<String, (u64, String)>,
    bindings: HashMap<PlayerId, Binding>,
    /// Player → their last ended session and when that is forgotten (ms).
    last: HashMap<PlayerId, (SessionId, u64)>,
    sessions: HashMap<SessionId, Session>,
    /// Sessions not yet ended (what the sweeper and placement look at).
    live: std::collections::BTreeSet<SessionId>,
    /// Ended sessions in the order they ended, for retention.
    ended: std::collections::VecDeque<(u64, SessionId)>,
    hosts: BTreeMap<HostId, HostRecord>,
    draining: HashMap<HostId, bool>,
    leases: HashMap<String, (String, u64)>,
}

#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    retention_ms: u64,
    events: broadcast::Sender<Event>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryStore")
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore {
            inner: Arc::default(),
            retention_ms: ENDED_RETENTION_MS,
            events: broadcast::channel(super::EVENT_BUFFER).0,
        }
    }

    /// Keeps ended sessions (and their results) this long instead of [`ENDED_RETENTION_MS`]
    /// (and never more than [`MAX_ENDED`] of them).
    pub fn with_ended_retention(mut self, ms: u64) -> Self {
        self.retention_ms = ms.max(1);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock would be a bug in this file; the data stays usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn ticket_key(t: &Ticket) -> (u64, String) {
    (t.enqueued_ms, t.id.clone())
}

impl Inner {
    fn find_ticket(&self, id: &str, pool: &PoolKey) -> Option<(u64, String)> {
        let key = self.index.get(id)?;
        self.queues
            .get(pool)?
            .contains_key(key)
            .then(|| key.clone())
    }

    fn remove_ticket(&mut self, id: &str, pool: &PoolKey) -> Option<Ticket> {
        let key = self.find_ticket(id, pool)?;
        self.index.remove(id);
        let q = self.queues.get_mut(pool)?;
        let t = q.remove(&key);
        if q.is_empty() {
            self.queues.remove(pool);
        }
        t
    }

    /// Forgets ended sessions older than the retention, or beyond [`MAX_ENDED`] of them.
    fn prune_ended(&mut self, now: u64, retention_ms: u64) {
        while let Some((at, id)) = self.ended.front() {
            if *at + retention_ms > now && self.ended.len() <= MAX_ENDED {
                break;
            }
            self.sessions.remove(id);
            self.ended.pop_front();
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn enqueue(&self, ticket: &Ticket) -> Result<(), StoreError> {
        let mut g = self.lock();
        if let Some(b) = g.bindings.get(&ticket.player) {
            return Err(StoreError::PlayerBusy(b.clone()));
        }
        g.last.remove(&ticket.player);
        g.bindings.insert(
            ticket.player.clone(),
            Binding::Queued {
                ticket: ticket.id.clone(),
                pool: ticket.pool.clone(),
            },
        );
        g.index.insert(ticket.id.clone(), ticket_key(ticket));
        g.queues
            .entry(ticket.pool.clone())
            .or_default()
            .insert(ticket_key(ticket), ticket.clone());
        drop(g);
        let _ = self.events.send(Event::QueueChanged {
            pool: ticket.pool.clone(),
        });
        Ok(())
    }

    async fn dequeue(&self, player: &PlayerId) -> Result<Option<Ticket>, StoreError> {
        let mut g = self.lock();
        let Some(Binding::Queued { ticket, pool }) = g.bindings.get(player).cloned() else {
            return Ok(None);
        };
        g.bindings.remove(player);
        Ok(g.remove_ticket(&ticket, &pool))
    }

    async fn set_away(&self, player: &PlayerId, since_ms: Option<u64>) -> Result<(), StoreError> {
        let mut g = self.lock();
        let Some(Binding::Queued { ticket, pool }) = g.bindings.get(player).cloned() else {
            return Ok(());
        };
        if let Some(key) = g.find_ticket(&ticket, &pool) {
            if let Some(t) = g.queues.get_mut(&pool).and_then(|q| q.get_mut(&key)) {
                t.away_since_ms = since_ms;
            }
        }
        Ok(())
    }

    async fn tickets(&self, pool: &PoolKey) -> Result<Vec<Ticket>, StoreError> {
        let g = self.lock();
        Ok(g.queues
            .get(pool)
            .map(|q| q.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn pools(&self) -> Result<Vec<PoolKey>, StoreError> {
        Ok(self.lock().queues.keys().cloned().collect())
    }

    async fn claim(&self, tickets: &[String], session: &Session) -> Result<bool, StoreError> {
        let mut g = self.lock();
        let mut found = Vec::with_capacity(tickets.len());
        for id in tickets {
            match g.find_ticket(id, &session.pool) {
                Some(_) => found.push(id),
                None => return Ok(false),
            }
        }
        let mut stored = session.clone();
        stored.version = 1;
        for id in found {
            if let Some(t) = g.remove_ticket(id, &session.pool) {
                g.bindings.insert(
                    t.player,
                    Binding::Session {
                        session: session.id.clone(),
                    },
                );
            }
        }
        g.live.insert(stored.id.clone());
        g.sessions.insert(stored.id.clone(), stored);
        Ok(true)
    }

    async fn binding(&self, player: &PlayerId) -> Result<Option<Binding>, StoreError> {
        Ok(self.lock().bindings.get(player).cloned())
    }

    async fn last_session(&self, player: &PlayerId) -> Result<Option<SessionId>, StoreError> {
        let mut g = self.lock();
        match g.last.get(player) {
            Some((id, forget_ms)) if *forget_ms > now_ms() => Ok(Some(id.clone())),
            Some(_) => {
                g.last.remove(player);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        Ok(self.lock().sessions.get(id).cloned())
    }

    async fn sessions(&self, state: Option<SessionState>) -> Result<Vec<Session>, StoreError> {
        let mut g = self.lock();
        g.prune_ended(now_ms(), self.retention_ms);
        let mut out: Vec<Session> = match state {
            None => g.sessions.values().cloned().collect(),
            Some(SessionState::Ended) => g
                .ended
                .iter()
                .filter_map(|(_, id)| g.sessions.get(id).cloned())
                .collect(),
            Some(st) => g
                .live
                .iter()
                .filter_map(|id| g.sessions.get(id))
                .filter(|s| s.state == st)
                .cloned()
                .collect(),
        };
        out.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(out)
    }

    async fn update_session(&self, session: &Session) -> Result<Option<Session>, StoreError> {
        let mut g = self.lock();
        let Some(current) = g.sessions.get(&session.id) else {
            return Ok(None);
        };
        if current.version != session.version {
            return Ok(None);
        }
        let mut stored = session.clone();
        stored.version += 1;
        if stored.state == SessionState::Ended {
            let forget_ms = stored.since_ms() + LAST_SESSION_KEPT_MS.min(self.retention_ms);
            for p in &stored.players {
                if g.bindings.get(p)
                    == Some(&Binding::Session {
                        session: stored.id.clone(),
                    })
                {
                    g.bindings.remove(p);
                    g.last.insert(p.clone(), (stored.id.clone(), forget_ms));
                }
            }
        }
        if stored.state == SessionState::Ended && g.live.remove(&stored.id) {
            g.ended.push_back((stored.since_ms(), stored.id.clone()));
            g.prune_ended(stored.since_ms(), self.retention_ms);
        }
        g.sessions.insert(stored.id.clone(), stored.clone());
        Ok(Some(stored))
    }

    async fn put_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        let mut g = self.lock();
        let draining = g.draining.get(&host.id).copied().unwrap_or(false);
        let mut h = host.clone();
        h.draining = draining;
        g.hosts.insert(h.id.clone(), h);
        Ok(())
    }

    async fn host(&self, id: &HostId) -> Result<Option<HostRecord>, StoreError> {
        Ok(self.lock().hosts.get(id).cloned())
    }

    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        Ok(self.lock().hosts.values().cloned().collect())
    }

    async fn mark_host(
        &self,
        id: &HostId,
        seen_ms: u64,
        state: HostState,
    ) -> Result<bool, StoreError> {
        let mut g = self.lock();
        match g.hosts.get_mut(id) {
            Some(h) if h.last_seen_ms == seen_ms => {
                h.state = state;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn set_draining(&self, id: &HostId, draining: bool) -> Result<bool, StoreError> {
        let mut g = self.lock();
        let Some(h) = g.hosts.get_mut(id) else {
            return Ok(false);
        };
        h.draining = draining;
        g.draining.insert(id.clone(), draining);
        Ok(true)
    }

    async fn remove_host(&self, id: &HostId) -> Result<(), StoreError> {
        let mut g = self.lock();
        g.hosts.remove(id);
        g.draining.remove(id);
        Ok(())
    }

    async fn lease(&self, name: &str, owner: &str, ttl_ms: u64) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut g = self.lock();
        match g.leases.get(name) {
            Some((o, until)) if o != owner && *until > now => Ok(false),
            _ => {
                g.leases
                    .insert(name.to_owned(), (owner.to_owned(), now + ttl_ms));
                Ok(true)
            }
        }
    }

    async fn publish(&self, event: &Event) -> Result<(), StoreError> {
        // No receiver is not an error: no replica task is listening yet.
        let _ = self.events.send(event.clone());
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}
