//! The admin dashboard: the page at `/admin` (`assets/dashboard/`, compiled into the binary like
//! `/play`) and its live feed, `GET /v1/admin/events` — server-sent events for an admin-role
//! bearer token (`docs/protocol.md`, "Admin event feed").
//!
//! One [`Hub`] per replica owns what the feed shows. Its task ([`run`]) keeps a mirror of the
//! sessions, fed by the store's session events (so changes made on any replica arrive, with
//! either store) and re-read from the store, coalesced every [`FLUSH_EVERY`]. From the sessions'
//! timelines it keeps bounded rings of recent activation-latency and time-to-match samples:
//! both are stored with every session, so the rings are rebuilt from the store when a replica
//! starts and every replica shows the same figures. While someone watches, it re-reads hosts
//! and queues every [`TICK_EVERY`] and sends them when they changed. Every message is
//! serialized once and fanned out through a broadcast channel; a new watcher starts with a
//! full snapshot, and one that falls behind gets a fresh snapshot instead of the missed
//! changes.

use crate::admin::{pool_views, verify_admin, ApiError, HostView, PoolView};
use crate::model::{Event, HostRecord, Session, SessionState};
use crate::sessions::live_sessions;
use crate::state::{lock, Ctx};
use crate::store::StoreError;
use crate::util::now_ms;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use berth_protocol::{HostId, PlayerId, SessionId};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch, Notify};

const INDEX_HTML: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const STYLE_CSS: &str = include_str!("../../assets/dashboard/style.css");
const UPLOT_JS: &str = include_str!("../../assets/dashboard/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../assets/dashboard/vendor/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("../../assets/dashboard/vendor/uPlot.LICENSE");

/// The page talks only to this origin (the feed and the admin API), loads nothing else and may
/// not be framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

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
const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// A comment line this often keeps proxies and the page's watchdog from thinking the feed died.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Feeds open at once on one replica.
pub const MAX_WATCHERS: usize = 64;
/// Messages buffered per watcher before it gets a fresh snapshot instead.
const FRAMES: usize = 256;
/// Session reads in flight at once when a batch of changes is re-read.
const READS: usize = 32;

// ---------------------------------------------------------------------------------- messages

/// A session as the list shows it (the rest — teams, timeline, results — is one
/// `GET /v1/admin/sessions/{id}` away).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRow {
    pub id: SessionId,
    pub state: SessionState,
    pub mode: String,
    pub region: String,
    pub image: String,
    pub host: Option<HostId>,
    pub players: Vec<PlayerId>,
    pub created_ms: u64,
    /// When it entered its current state.
    pub since_ms: u64,
    pub end_reason: Option<String>,
}

impl From<&Session> for SessionRow {
    fn from(s: &Session) -> Self {
        SessionRow {
            id: s.id.clone(),
            state: s.state,
            mode: s.pool.mode.clone(),
            region: s.pool.region.clone(),
            image: s.image.clone(),
            host: s.host.clone(),
            players: s.players.clone(),
            created_ms: s.created_ms,
            since_ms: s.since_ms(),
            end_reason: s.end_reason.clone(),
        }
    }
}

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
    fn event(&self) -> &'static str {
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

    fn frame(&self) -> Frame {
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
    sessions: HashMap<SessionId, SessionRow>,
    /// Sessions whose samples are in the rings already.
    sampled: HashSet<SessionId>,
    activation: VecDeque<ActivationSample>,
    time_to_match: VecDeque<MatchSample>,
    series: VecDeque<SeriesPoint>,
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
    fn messages(mut self) -> Vec<FeedMessage> {
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

fn push_bounded<T>(ring: &mut VecDeque<T>, v: T) {
    ring.push_back(v);
    while ring.len() > MAX_SAMPLES {
        ring.pop_front();
    }
}

// ---------------------------------------------------------------------------------- the hub

/// The replica's dashboard hub: the mirror, and the broadcast every open feed listens to.
pub struct Hub {
    mirror: Mutex<Mirror>,
    frames: broadcast::Sender<Frame>,
    /// `true` once the mirror holds the store's sessions.
    ready: watch::Sender<bool>,
    /// Set on shutdown: no new feeds.
    closed: watch::Sender<bool>,
    /// An admin changed a host here: re-read hosts now rather than at the next tick.
    hosts_nudge: Notify,
    /// A feed is opening: a mirror left stale while nobody watched must be read again.
    wanted: Notify,
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

    fn send(&self, m: &FeedMessage) {
        if self.watchers() > 0 {
            let _ = self.frames.send(m.frame());
        }
    }
}

/// The hub's task: mirrors sessions from store events, samples the series, and while anyone
/// watches, re-reads hosts and queues. Stopped with the server.
pub async fn run(ctx: Ctx) {
    let hub = &ctx.dashboard;
    // Subscribed before the first read: nothing that changes meanwhile is missed.
    let mut events = ctx.store.subscribe();
    let mut backoff = Duration::from_millis(250);
    while let Err(e) = reset(&ctx).await {
        tracing::warn!(error = %e, "dashboard: reading sessions");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    hub.ready.send_replace(true);
    let mut dirty: HashSet<SessionId> = HashSet::new();
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    let mut tick = tokio::time::interval(TICK_EVERY);
    let mut series = tokio::time::interval(SERIES_EVERY);
    let mut resync_at = tokio::time::interval(RESYNC_EVERY);
    for t in [&mut flush, &mut tick, &mut series, &mut resync_at] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let (mut lagged, mut stale) = (false, false);
    let (mut last_hosts, mut last_queues) = (None, None);
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Ok(Event::Session { session, .. }) => {
                    dirty.insert(session);
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "dashboard: event receiver lagged");
                    lagged = true;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = flush.tick() => {
                if hub.watchers() == 0 && !dirty.is_empty() {
                    // Nobody watches: no store reads on the sessions' hot path. The mirror is
                    // stale until the next feed opens and it is read again whole.
                    dirty.clear();
                    stale = true;
                    hub.ready.send_replace(false);
                } else if !dirty.is_empty() {
                    let ids: Vec<SessionId> = dirty.drain().collect();
                    if let Err(e) = refresh(&ctx, ids.clone()).await {
                        tracing::warn!(error = %e, "dashboard: reading sessions");
                        dirty.extend(ids);
                    }
                }
            }
            () = hub.wanted.notified() => {
                if stale {
                    match reset(&ctx).await {
                        Ok(()) => {
                            stale = false;
                            lagged = false;
                            hub.ready.send_replace(true);
                        }
                        Err(e) => tracing::warn!(error = %e, "dashboard: reading sessions"),
                    }
                }
            }
            _ = resync_at.tick() => {
                if !stale && (lagged || hub.watchers() > 0) {
                    match resync(&ctx).await {
                        Ok(()) => lagged = false,
                        Err(e) => tracing::warn!(error = %e, "dashboard: resync"),
                    }
                }
            }
            _ = series.tick() => {
                // A stale mirror counts nothing true: the series has a gap instead.
                if !stale {
                    let point = lock(&hub.mirror).count(now_ms());
                    hub.send(&FeedMessage::Series { point });
                }
            }
            _ = tick.tick() => {
                if hub.watchers() > 0 {
                    infra(&ctx, &mut last_hosts, &mut last_queues).await;
                }
            }
            () = hub.hosts_nudge.notified() => {
                if hub.watchers() > 0 {
                    infra(&ctx, &mut last_hosts, &mut last_queues).await;
                }
            }
        }
    }
}

fn retention_ms(ctx: &Ctx) -> u64 {
    ctx.config.store.ended_retention_s.saturating_mul(1000)
}

/// Every session the store has (live, and ended within retention).
async fn all_sessions(ctx: &Ctx) -> Result<Vec<Session>, StoreError> {
    let mut all = live_sessions(ctx).await?;
    all.extend(ctx.store.sessions(Some(SessionState::Ended)).await?);
    Ok(all)
}

async fn reset(ctx: &Ctx) -> Result<(), StoreError> {
    let all = all_sessions(ctx).await?;
    lock(&ctx.dashboard.mirror).reset(&all, now_ms(), retention_ms(ctx));
    Ok(())
}

/// Re-reads `ids` and sends what changed.
async fn refresh(ctx: &Ctx, ids: Vec<SessionId>) -> Result<(), StoreError> {
    let read: Vec<(SessionId, Result<Option<Session>, StoreError>)> =
        futures_util::stream::iter(ids)
            .map(|id| async move {
                let s = ctx.store.session(&id).await;
                (id, s)
            })
            .buffer_unordered(READS)
            .collect()
            .await;
    let mut found = Vec::with_capacity(read.len());
    for (id, s) in read {
        found.push((id, s?));
    }
    absorb(ctx, &found);
    Ok(())
}

fn absorb(ctx: &Ctx, found: &[(SessionId, Option<Session>)]) {
    let now = now_ms();
    let mut changes = Changes::default();
    {
        let mut m = lock(&ctx.dashboard.mirror);
        for (id, s) in found {
            m.apply(id, s.as_ref(), now, &mut changes);
        }
        m.prune(now, retention_ms(ctx), &mut changes);
    }
    for msg in changes.messages() {
        ctx.dashboard.send(&msg);
    }
}

/// Checks the mirror's live sessions against the store's (events may have been missed).
async fn resync(ctx: &Ctx) -> Result<(), StoreError> {
    let live = live_sessions(ctx).await?;
    let known: HashSet<SessionId> = live.iter().map(|s| s.id.clone()).collect();
    let gone: Vec<SessionId> = lock(&ctx.dashboard.mirror)
        .live()
        .into_iter()
        .filter(|id| !known.contains(id))
        .collect();
    let mut found: Vec<(SessionId, Option<Session>)> =
        live.into_iter().map(|s| (s.id.clone(), Some(s))).collect();
    // Listed as live but not live any more: ended (or forgotten) meanwhile.
    for id in gone {
        let s = ctx.store.session(&id).await?;
        found.push((id, s));
    }
    absorb(ctx, &found);
    Ok(())
}

async fn host_rows(ctx: &Ctx) -> Result<(Vec<HostRow>, Vec<PoolRow>), StoreError> {
    let hosts = ctx.store.hosts().await?;
    let per_min = lock(&ctx.dashboard.mirror).activations_per_min(now_ms());
    let pools = pool_views(&hosts)
        .into_iter()
        .map(|view| PoolRow {
            activations_per_min: per_min.get(&view.image).copied().unwrap_or(0),
            view,
        })
        .collect();
    Ok((hosts.into_iter().map(HostRow::from).collect(), pools))
}

async fn queue_rows(ctx: &Ctx) -> Result<Vec<QueueRow>, StoreError> {
    let mut out = Vec::new();
    for pool in ctx.store.pools().await? {
        let tickets = ctx.store.tickets(&pool).await?;
        out.push(QueueRow {
            depth: tickets.len() as u64,
            oldest_enqueued_ms: tickets.iter().map(|t| t.enqueued_ms).min(),
            away: tickets.iter().filter(|t| t.away_since_ms.is_some()).count() as u64,
            mode: pool.mode,
            region: pool.region,
        });
    }
    Ok(out)
}

/// Re-reads hosts and queues; sends each if it changed since last sent.
async fn infra(ctx: &Ctx, last_hosts: &mut Option<String>, last_queues: &mut Option<String>) {
    let hub = &ctx.dashboard;
    let now = now_ms();
    match host_rows(ctx).await {
        Ok((hosts, pools)) => {
            let key = serde_json::to_string(&(&hosts, &pools)).ok();
            if key != *last_hosts {
                *last_hosts = key;
                hub.send(&FeedMessage::Hosts {
                    now_ms: now,
                    hosts,
                    pools,
                });
            }
        }
        Err(e) => tracing::warn!(error = %e, "dashboard: reading hosts"),
    }
    match queue_rows(ctx).await {
        Ok(queues) => {
            let key = serde_json::to_string(&queues).ok();
            if key != *last_queues {
                *last_queues = key;
                hub.send(&FeedMessage::Queues {
                    now_ms: now,
                    queues,
                });
            }
        }
        Err(e) => tracing::warn!(error = %e, "dashboard: reading queues"),
    }
}

async fn snapshot(ctx: &Ctx) -> Result<Frame, StoreError> {
    let (hosts, pools) = host_rows(ctx).await?;
    let queues = queue_rows(ctx).await?;
    let m = lock(&ctx.dashboard.mirror);
    let mut sessions: Vec<SessionRow> = m.sessions.values().cloned().collect();
    sessions.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
    Ok(FeedMessage::Snapshot {
        replica: ctx.replica.clone(),
        store: ctx.store.kind().to_owned(),
        now_ms: now_ms(),
        window_ms: WINDOW_MS,
        ended_kept: ENDED_KEPT,
        sessions,
        hosts,
        pools,
        queues,
        activation: m.activation.iter().cloned().collect(),
        time_to_match: m.time_to_match.iter().cloned().collect(),
        series: m.series.iter().copied().collect(),
    }
    .frame())
}

// ---------------------------------------------------------------------------------- routes

/// The page (`/admin`, `/admin/…`) and the feed (`/v1/admin/events`).
pub fn router() -> Router<Ctx> {
    let asset = |content_type: &'static str, body: &'static str| {
        get(move || async move { asset(content_type, body) })
    };
    Router::new()
        .route("/admin", get(index))
        .route("/admin/", get(index))
        .route(
            "/admin/app.js",
            asset("text/javascript; charset=utf-8", APP_JS),
        )
        .route(
            "/admin/style.css",
            asset("text/css; charset=utf-8", STYLE_CSS),
        )
        .route(
            "/admin/vendor/uPlot.iife.min.js",
            asset("text/javascript; charset=utf-8", UPLOT_JS),
        )
        .route(
            "/admin/vendor/uPlot.min.css",
            asset("text/css; charset=utf-8", UPLOT_CSS),
        )
        .route(
            "/admin/vendor/uPlot.LICENSE",
            asset("text/plain; charset=utf-8", UPLOT_LICENSE),
        )
        .route(EVENTS_PATH, get(events))
}

async fn index() -> Response {
    let mut r = asset("text/html; charset=utf-8", INDEX_HTML);
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    r
}

/// Revalidated on every load (`no-cache`), so a redeployed server never runs a stale page.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// One watcher's feed: what it still has to hear.
struct Watch {
    ctx: Ctx,
    rx: broadcast::Receiver<Frame>,
    /// When its token expires.
    expires: tokio::time::Instant,
    first: Option<Frame>,
    done: bool,
}

fn sse(frame: &Frame) -> SseEvent {
    SseEvent::default().event(frame.event).data(&*frame.data)
}

/// `GET /v1/admin/events`: the feed, for an admin-role bearer token.
async fn events(State(ctx): State<Ctx>, headers: HeaderMap) -> Result<Response, ApiError> {
    let claims = verify_admin(&ctx, &headers)?;
    let hub = &ctx.dashboard;
    if *hub.closed.borrow() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "this replica is stopping; reconnect".into(),
        ));
    }
    if hub.watchers() >= MAX_WATCHERS {
        ctx.metrics.refuse("too_many_watchers");
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_watchers",
            format!("at most {MAX_WATCHERS} feeds per replica; retry later"),
        ));
    }
    // Wait (briefly) for the mirror to hold the store's sessions: a replica just started, or
    // nobody watched for a while and the mirror is read again.
    hub.wanted.notify_one();
    let mut ready = hub.ready.subscribe();
    let ready = tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| *r))
        .await
        .is_ok_and(|r| r.is_ok());
    if !ready {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the dashboard is still reading the store; retry".into(),
        ));
    }
    // Subscribed before the snapshot is read: changes meanwhile come after it (and are whole
    // rows, so applying one twice is harmless).
    let rx = hub.frames.subscribe();
    let first = snapshot(&ctx).await?;
    let left = Duration::from_secs(claims.exp.saturating_sub(now_ms() / 1000));
    tracing::info!(admin = claims.sub, "dashboard feed opened");
    let watch = Watch {
        ctx: ctx.clone(),
        rx,
        expires: tokio::time::Instant::now() + left,
        first: Some(first),
        done: false,
    };
    let stream = futures_util::stream::unfold(watch, |mut w| async move {
        if w.done {
            return None;
        }
        if let Some(f) = w.first.take() {
            return Some((Ok::<_, Infallible>(sse(&f)), w));
        }
        tokio::select! {
            r = w.rx.recv() => match r {
                Ok(f) => {
                    w.done = f.event == "bye";
                    Some((Ok(sse(&f)), w))
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Too slow for the changes: start it over.
                    w.rx = w.rx.resubscribe();
                    match snapshot(&w.ctx).await {
                        Ok(f) => Some((Ok(sse(&f)), w)),
                        Err(e) => {
                            tracing::warn!(error = %e, "dashboard: snapshot");
                            None
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => None,
            },
            () = tokio::time::sleep_until(w.expires) => {
                w.done = true;
                let bye = FeedMessage::Bye { reason: "expired_token".into() }.frame();
                Some((Ok(sse(&bye)), w))
            }
        }
    });
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // Reverse proxies must pass each message on as it comes.
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PoolKey, Transition};

    fn session(id: &str, created: u64, states: &[(SessionState, u64, &str)]) -> Session {
        let state = states.last().map_or(SessionState::Placing, |s| s.0);
        Session {
            id: SessionId::new(id).expect("id"),
            version: 1,
            pool: PoolKey {
                mode: "duel".into(),
                region: "eu".into(),
            },
            image: "arena".into(),
            state,
            players: vec![PlayerId::new("ana").expect("id")],
            teams: vec![],
            ticket_key: String::new(),
            params: serde_json::Value::Null,
            host: Some(HostId::new("h1").expect("id")),
            tried_hosts: vec![],
            vm: None,
            endpoint: None,
            created_ms: created,
            deadline_ms: 0,
            ends_by_ms: 0,
            history: states
                .iter()
                .map(|(state, at_ms, note)| Transition {
                    state: *state,
                    at_ms: *at_ms,
                    note: (*note).into(),
                })
                .collect(),
            end_reason: None,
            results: serde_json::Value::Null,
            match_ms: 400,
        }
    }

    use SessionState::*;

    #[test]
    fn samples_come_from_the_timeline() {
        let s = session(
            "s1",
            1_000,
            &[
                (Placing, 1_000, ""),
                (Activating, 1_010, "h1"),
                (Active, 1_250, "warm"),
                (Ending, 5_000, "admin"),
            ],
        );
        let (a, m) = samples_of(&s).expect("became active");
        assert_eq!(
            a,
            ActivationSample(1_250, 240, "arena".into(), "warm".into())
        );
        // The oldest ticket queued 400 ms before the match was formed.
        assert_eq!(m, MatchSample(1_250, 650, "duel".into()));
        // A retry on another host: latency from the last placement.
        let s = session(
            "s2",
            0,
            &[
                (Placing, 0, ""),
                (Activating, 10, "h1"),
                (Placing, 500, "activation_timeout"),
                (Activating, 600, "h2"),
                (Active, 700, "cold"),
            ],
        );
        assert_eq!(samples_of(&s).expect("active").0 .1, 100);
        assert!(samples_of(&session("s3", 0, &[(Placing, 0, ""), (Ended, 9, "")])).is_none());
    }

    #[test]
    fn the_mirror_sends_changes_once_and_samples_once() {
        let mut m = Mirror::default();
        let now = 10_000;
        let placing = session("s1", 9_000, &[(Placing, 9_000, "")]);
        let mut out = Changes::default();
        m.apply(&placing.id, Some(&placing), now, &mut out);
        assert_eq!(out.upsert.len(), 1);
        assert!(out.activation.is_empty());
        // The same again: nothing to send.
        let mut out = Changes::default();
        m.apply(&placing.id, Some(&placing), now, &mut out);
        assert!(out.upsert.is_empty());
        let active = session(
            "s1",
            9_000,
            &[
                (Placing, 9_000, ""),
                (Activating, 9_001, "h1"),
                (Active, 9_100, "warm"),
            ],
        );
        let mut out = Changes::default();
        m.apply(&active.id, Some(&active), now, &mut out);
        assert_eq!((out.upsert.len(), out.activation.len()), (1, 1));
        assert_eq!(out.upsert[0].since_ms, 9_100);
        let mut ended = active.clone();
        ended.transition(Ended, 9_500, 9_500, "admin");
        let mut out = Changes::default();
        m.apply(&ended.id, Some(&ended), now, &mut out);
        assert_eq!(
            (out.upsert.len(), out.activation.len()),
            (1, 0),
            "sampled once"
        );
        assert_eq!(m.activations_per_min(now).get("arena"), Some(&1));
        let mut out = Changes::default();
        m.apply(&ended.id, None, now, &mut out);
        assert_eq!(out.remove, vec![ended.id.clone()]);
        assert!(m.is_empty());
    }

    #[test]
    fn pruning_keeps_the_newest_ended_and_the_window() {
        let mut m = Mirror::default();
        let now = WINDOW_MS * 2;
        let mut all = Vec::new();
        for i in 0..(ENDED_KEPT as u64 + 10) {
            let t = now - 100_000 + i;
            all.push(session(
                &format!("e{i}"),
                t,
                &[(Placing, t, ""), (Ended, t, "placement_failed")],
            ));
        }
        let old = now - WINDOW_MS - 1;
        all.push(session(
            "live-old",
            old,
            &[
                (Placing, old, ""),
                (Activating, old, "h1"),
                (Active, old, "warm"),
            ],
        ));
        m.reset(&all, now, 3_600_000);
        assert_eq!(m.len(), ENDED_KEPT + 1);
        assert!(m
            .sessions
            .contains_key(&SessionId::new("live-old").expect("id")));
        assert!(
            !m.sessions.contains_key(&SessionId::new("e0").expect("id")),
            "oldest ended dropped"
        );
        assert!(m.activation.is_empty(), "outside the window");
        // Retention: ended longer ago than the store keeps them are dropped too.
        let mut out = Changes::default();
        m.prune(now + 200_000, 50_000, &mut out);
        assert_eq!(out.remove.len(), ENDED_KEPT);
        let p = m.count(now);
        assert_eq!(p, SeriesPoint(now, 0, 0, 1, 0));
    }

    #[test]
    fn rings_are_bounded() {
        let mut m = Mirror::default();
        let now = 1_000_000;
        for i in 0..(MAX_SAMPLES as u64 + 5) {
            let s = session(
                &format!("s{i}"),
                now - 1000,
                &[
                    (Placing, now - 1000, ""),
                    (Activating, now - 900, "h1"),
                    (Active, now - 800, "warm"),
                ],
            );
            m.apply(&s.id, Some(&s), now, &mut Changes::default());
        }
        assert_eq!(m.activation.len(), MAX_SAMPLES);
        assert_eq!(m.time_to_match.len(), MAX_SAMPLES);
        for _ in 0..(SERIES_POINTS + 3) {
            m.count(now);
        }
        assert_eq!(m.series.len(), SERIES_POINTS);
    }

    #[test]
    fn messages_carry_their_type() {
        let f = FeedMessage::Bye {
            reason: "shutting_down".into(),
        }
        .frame();
        assert_eq!(f.event, "bye");
        assert_eq!(&*f.data, r#"{"type":"bye","reason":"shutting_down"}"#);
        let v: serde_json::Value = serde_json::from_str(
            &FeedMessage::Series {
                point: SeriesPoint(5, 1, 2, 3, 4),
            }
            .frame()
            .data,
        )
        .expect("json");
        assert_eq!(
            v,
            serde_json::json!({"type": "series", "point": [5, 1, 2, 3, 4]})
        );
    }
}
