//! What the admin dashboard's live feed shows, and its watchers: one [`Hub`] per replica holds
//! a mirror of the sessions with bounded rings of recent samples and series, and fans every
//! message out to the watchers (serialized once). The task that keeps it current and the HTTP
//! side are in [`crate::dashboard`].

use crate::model::{HostRecord, Session, SessionState};
use crate::views::{HostView, PoolView, SessionRow};
use berth_protocol::SessionId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch, Notify};

/// The feed's path.
pub const EVENTS_PATH: &str = "/v1/admin/events";
/// Ended sessions the feed keeps listing, the most recently ended first; live ones are all
/// listed.
pub const ENDED_KEPT: usize = 1_000;
/// The charts' recent window.
pub const WINDOW_MS: u64 = 15 * 60 * 1000;
/// Samples kept per chart within the window (the oldest go first).
pub const MAX_SAMPLES: usize = 5_000;
/// Sessions-over-time: one point this often, [`SERIES_POINTS`] of them (30 minutes).
pub const SERIES_EVERY: Duration = Duration::from_secs(5);
pub const SERIES_POINTS: usize = 360;
/// Session changes are gathered this long and sent as one message.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Hosts and queues are re-read this often while someone watches.
pub const TICK_EVERY: Duration = Duration::from_secs(1);
/// The mirror is checked against the store this often while someone watches (events are
/// best-effort).
pub(crate) const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// A comment line this often keeps proxies and the page's watchdog from thinking the feed died.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Feeds open at once on one replica.
pub const MAX_WATCHERS: usize = 64;
/// Messages buffered per watcher before it gets a fresh snapshot instead.
const FRAMES: usize = 256;
/// Session reads in flight at once when a batch of changes is re-read.
pub(crate) const READS: usize = 32;

// ---------------------------------------------------------------------------------- messages

/// `[at_ms, ms, image, path]`: a session became active at `at_ms`, `ms` after it was placed on
/// its host, by `path` (`warm`, `docked`, `cold`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivationSample(pub u64, pub u64, pub String, pub String);

/// `[at_ms, ms, mode]`: players were told matched (VM active) at `at_ms`, `ms` after the oldest
/// of them queued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatchSample(pub u64, pub u64, pub String);

/// `[at_ms, placing, activating, active, ending]`: live sessions by state at `at_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SeriesPoint(pub u64, pub u32, pub u32, pub u32, pub u32);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostRow {
    #[serde(flatten)]
    pub view: HostView,
    /// Guest memory of its warm and running VMs (from each image's VM size).
    pub vm_memory_mib: u64,
}

impl From<HostRecord> for HostRow {
    fn from(h: HostRecord) -> Self {
        let vm_memory_mib = h
            .images
            .iter()
            .map(|i| u64::from(i.warm + i.running) * u64::from(i.memory_mib))
            .sum();
        HostRow {
            view: HostView::from(h),
            vm_memory_mib,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolRow {
    #[serde(flatten)]
    pub view: PoolView,
    /// Sessions of this image that became active in the last minute, on any host.
    pub activations_per_min: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueRow {
    pub mode: String,
    pub region: String,
    pub depth: u64,
    /// When the oldest waiting ticket was queued (the page counts the wait from it).
    pub oldest_enqueued_ms: Option<u64>,
    /// Tickets whose player has no connection right now (kept for the reconnect grace).
    pub away: u64,
}

/// One message of the feed; the SSE event name is its `type`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FeedMessage {
    /// Everything, first on every feed (and again to a watcher that fell behind).
    Snapshot {
        replica: String,
        store: String,
        now_ms: u64,
        window_ms: u64,
        ended_kept: usize,
        sessions: Vec<SessionRow>,
        hosts: Vec<HostRow>,
        pools: Vec<PoolRow>,
        queues: Vec<QueueRow>,
        activation: Vec<ActivationSample>,
        time_to_match: Vec<MatchSample>,
        series: Vec<SeriesPoint>,
    },
    /// Sessions that changed (whole rows) and sessions no longer listed.
    Sessions {
        upsert: Vec<SessionRow>,
        remove: Vec<SessionId>,
    },
    /// New chart samples.
    Samples {
        activation: Vec<ActivationSample>,
        time_to_match: Vec<MatchSample>,
    },
    /// Hosts and pools, whole, when anything in them changed.
    Hosts {
        now_ms: u64,
        hosts: Vec<HostRow>,
        pools: Vec<PoolRow>,
    },
    /// Queues, whole, when anything in them changed.
    Queues { now_ms: u64, queues: Vec<QueueRow> },
    /// A new sessions-over-time point.
    Series { point: SeriesPoint },
    /// The feed ends: `shutting_down` (reconnect: another replica or this one restarted) or
    /// `expired_token` (sign in again).
    Bye { reason: String },
}

impl FeedMessage {
    pub(crate) fn event(&self) -> &'static str {
        match self {
            FeedMessage::Snapshot { .. } => "snapshot",
            FeedMessage::Sessions { .. } => "sessions",
            FeedMessage::Samples { .. } => "samples",
            FeedMessage::Hosts { .. } => "hosts",
            FeedMessage::Queues { .. } => "queues",
            FeedMessage::Series { .. } => "series",
            FeedMessage::Bye { .. } => "bye",
        }
    }

    pub(crate) fn frame(&self) -> Frame {
        Frame {
            event: self.event(),
            // Our own types, plain data: serializing cannot fail.
            data: serde_json::to_string(self).unwrap_or_default().into(),
        }
    }
}

/// A message serialized once for every watcher.
#[derive(Debug, Clone)]
pub struct Frame {
    pub event: &'static str,
    pub data: Arc<str>,
}

// ---------------------------------------------------------------------------------- mirror

/// The hub's memory: listed sessions, chart rings, the sessions-over-time series. Pure data,
/// changed only under the hub's lock.
#[derive(Debug, Default)]
pub struct Mirror {
    pub(crate) sessions: HashMap<SessionId, SessionRow>,
    /// Sessions whose samples are in the rings already.
    pub(crate) sampled: HashSet<SessionId>,
    pub(crate) activation: VecDeque<ActivationSample>,
    pub(crate) time_to_match: VecDeque<MatchSample>,
    pub(crate) series: VecDeque<SeriesPoint>,
}

/// What one session's timeline says about its activation latency and time to match, if it
/// became active.
pub fn samples_of(s: &Session) -> Option<(ActivationSample, MatchSample)> {
    let at = s
        .history
        .iter()
        .position(|t| t.state == SessionState::Active)?;
    let active = &s.history[at];
    let placed = s.history[..at]
        .iter()
        .rev()
        .find(|t| t.state == SessionState::Activating)?;
    let oldest = s.created_ms.saturating_sub(s.match_ms);
    Some((
        ActivationSample(
            active.at_ms,
            active.at_ms.saturating_sub(placed.at_ms),
            s.image.clone(),
            active.note.clone(),
        ),
        MatchSample(
            active.at_ms,
            active.at_ms.saturating_sub(oldest),
            s.pool.mode.clone(),
        ),
    ))
}

/// Changes to send after the mirror took in some sessions.
#[derive(Debug, Default)]
pub struct Changes {
    pub upsert: Vec<SessionRow>,
    pub remove: Vec<SessionId>,
    pub activation: Vec<ActivationSample>,
    pub time_to_match: Vec<MatchSample>,
}

impl Changes {
    pub(crate) fn messages(mut self) -> Vec<FeedMessage> {
        // A row taken in and pruned in the same batch is not sent at all.
        if !self.remove.is_empty() {
            let gone: HashSet<&SessionId> = self.remove.iter().collect();
            self.upsert.retain(|r| !gone.contains(&r.id));
        }
        let mut out = Vec::new();
        if !self.upsert.is_empty() || !self.remove.is_empty() {
            out.push(FeedMessage::Sessions {
                upsert: self.upsert,
                remove: self.remove,
            });
        }
        if !self.activation.is_empty() || !self.time_to_match.is_empty() {
            out.push(FeedMessage::Samples {
                activation: self.activation,
                time_to_match: self.time_to_match,
            });
        }
        out
    }
}

impl Mirror {
    /// Takes in `id` as the store has it now (`None`: gone).
    pub fn apply(
        &mut self,
        id: &SessionId,
        session: Option<&Session>,
        now: u64,
        out: &mut Changes,
    ) {
        let Some(s) = session else {
            if self.sessions.remove(id).is_some() {
                out.remove.push(id.clone());
            }
            self.sampled.remove(id);
            return;
        };
        if !self.sampled.contains(id) {
            if let Some((a, m)) = samples_of(s) {
                self.sampled.insert(id.clone());
                if now.saturating_sub(a.0) <= WINDOW_MS {
                    push_bounded(&mut self.activation, a.clone());
                    push_bounded(&mut self.time_to_match, m.clone());
                    out.activation.push(a);
                    out.time_to_match.push(m);
                }
            }
        }
        let row = SessionRow::from(s);
        if self.sessions.get(id) != Some(&row) {
            self.sessions.insert(id.clone(), row.clone());
            out.upsert.push(row);
        }
    }

    /// Drops what is past keeping: samples out of the window, ended sessions beyond
    /// [`ENDED_KEPT`] or older than `retention_ms` (the store forgets them then too).
    pub fn prune(&mut self, now: u64, retention_ms: u64, out: &mut Changes) {
        let cutoff = now.saturating_sub(WINDOW_MS);
        while self.activation.front().is_some_and(|a| a.0 < cutoff) {
            self.activation.pop_front();
        }
        while self.time_to_match.front().is_some_and(|m| m.0 < cutoff) {
            self.time_to_match.pop_front();
        }
        let mut ended: Vec<(u64, SessionId)> = self
            .sessions
            .values()
            .filter(|r| r.state == SessionState::Ended)
            .map(|r| (r.since_ms, r.id.clone()))
            .collect();
        ended.sort_unstable_by(|a, b| b.cmp(a));
        let forget = now.saturating_sub(retention_ms);
        for (i, (since, id)) in ended.into_iter().enumerate() {
            if i >= ENDED_KEPT || since < forget {
                self.sessions.remove(&id);
                self.sampled.remove(&id);
                out.remove.push(id);
            }
        }
    }

    /// Starts over from `sessions` (all the store has); returns nothing to send (watchers get
    /// snapshots).
    pub fn reset(&mut self, sessions: &[Session], now: u64, retention_ms: u64) {
        let series = std::mem::take(&mut self.series);
        *self = Mirror {
            series,
            ..Mirror::default()
        };
        let mut ignored = Changes::default();
        let mut by_activation: Vec<&Session> = sessions.iter().collect();
        // Samples go in in time order.
        by_activation.sort_by_key(|s| samples_of(s).map_or(0, |(a, _)| a.0));
        for s in by_activation {
            self.apply(&s.id, Some(s), now, &mut ignored);
        }
        self.prune(now, retention_ms, &mut ignored);
    }

    /// Live sessions by state now, as a series point (kept).
    pub fn count(&mut self, now: u64) -> SeriesPoint {
        let mut p = SeriesPoint(now, 0, 0, 0, 0);
        for r in self.sessions.values() {
            match r.state {
                SessionState::Placing => p.1 += 1,
                SessionState::Activating => p.2 += 1,
                SessionState::Active => p.3 += 1,
                SessionState::Ending => p.4 += 1,
                SessionState::Ended => {}
            }
        }
        self.series.push_back(p);
        while self.series.len() > SERIES_POINTS {
            self.series.pop_front();
        }
        p
    }

    /// Ids of the live sessions listed.
    pub fn live(&self) -> Vec<SessionId> {
        self.sessions
            .values()
            .filter(|r| r.state.is_live())
            .map(|r| r.id.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Activations per image over the minute before `now`.
    pub fn activations_per_min(&self, now: u64) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        let since = now.saturating_sub(60_000);
        for a in self.activation.iter().rev().take_while(|a| a.0 >= since) {
            *out.entry(a.2.clone()).or_insert(0) += 1;
        }
        out
    }
}

pub(crate) fn push_bounded<T>(ring: &mut VecDeque<T>, v: T) {
    ring.push_back(v);
    while ring.len() > MAX_SAMPLES {
        ring.pop_front();
    }
}

// ---------------------------------------------------------------------------------- the hub

/// The replica's dashboard hub: the mirror, and the broadcast every open feed listens to.
pub struct Hub {
    pub(crate) mirror: Mutex<Mirror>,
    pub(crate) frames: broadcast::Sender<Frame>,
    /// `true` once the mirror holds the store's sessions.
    pub(crate) ready: watch::Sender<bool>,
    /// Set on shutdown: no new feeds.
    pub(crate) closed: watch::Sender<bool>,
    /// An admin changed a host here: re-read hosts now rather than at the next tick.
    pub(crate) hosts_nudge: Notify,
    /// A feed is opening: a mirror left stale while nobody watched must be read again.
    pub(crate) wanted: Notify,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("watchers", &self.frames.receiver_count())
            .finish()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            mirror: Mutex::new(Mirror::default()),
            frames: broadcast::channel(FRAMES).0,
            ready: watch::channel(false).0,
            closed: watch::channel(false).0,
            hosts_nudge: Notify::new(),
            wanted: Notify::new(),
        }
    }
}

impl Hub {
    /// Feeds open now.
    pub fn watchers(&self) -> usize {
        self.frames.receiver_count()
    }

    /// Hosts changed through this replica (drain, undrain).
    pub fn hosts_changed(&self) {
        self.hosts_nudge.notify_one();
    }

    /// Ends every feed with `bye` (`reason`) and refuses new ones: the server is stopping.
    pub fn close(&self, reason: &str) {
        self.closed.send_replace(true);
        self.send(&FeedMessage::Bye {
            reason: reason.to_owned(),
        });
    }

    pub(crate) fn send(&self, m: &FeedMessage) {
        if self.watchers() > 0 {
            let _ = self.frames.send(m.frame());
        }
    }
}
