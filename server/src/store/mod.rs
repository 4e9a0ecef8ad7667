//! Where the server keeps its state: one [`Store`] trait, two real backends.
//!
//! - [`memory`]: the embedded default — one process, no setup, nothing survives a restart.
//! - [`redis`]: many server replicas on one Redis; atomic steps are Lua scripts, events travel
//!   over Redis pub/sub.
//!
//! Every method is one atomic step: the matchmaker's claim of a set of tickets, a session's
//! compare-and-set, a lease. Both backends pass the same behavioural suite
//! (`server/tests/store.rs`).

pub mod memory;
pub mod redis;

use crate::model::{Binding, Event, HostRecord, HostState, PoolKey, Session, SessionState, Ticket};
use async_trait::async_trait;
use berth_protocol::{HostId, PlayerId, SessionId};
use tokio::sync::broadcast;

/// Events buffered per subscriber before a slow one starts missing them.
pub const EVENT_BUFFER: usize = 16_384;

/// How long an ended session (with its results) stays readable.
pub const ENDED_RETENTION_MS: u64 = 3_600_000;
/// How long a player's ended session is remembered for its reconnect (see
/// [`Store::last_session`]).
pub const LAST_SESSION_KEPT_MS: u64 = 600_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The player already holds a live ticket or a session.
    #[error("player is already bound: {0:?}")]
    PlayerBusy(Binding),
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("stored record is not valid: {0}")]
    Corrupt(#[from] serde_json::Error),
}

impl StoreError {
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::PlayerBusy(Binding::Queued { .. }) => "already_queued",
            StoreError::PlayerBusy(Binding::Session { .. }) => "in_session",
            StoreError::Redis(_) => "store_unavailable",
            StoreError::Corrupt(_) => "store_corrupt",
        }
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `memory` or `redis`.
    fn kind(&self) -> &'static str;

    /// Is the backend reachable (readiness)?
    async fn ping(&self) -> Result<(), StoreError>;

    // ---- tickets and bindings ----

    /// Adds `ticket` to its pool, binds its player to it and announces
    /// [`Event::QueueChanged`] for the pool to every replica, in one step. Fails with
    /// [`StoreError::PlayerBusy`] (and changes nothing) if the player is already bound.
    async fn enqueue(&self, ticket: &Ticket) -> Result<(), StoreError>;

    /// Removes the player's ticket if the player is queued, unbinding the player.
    async fn dequeue(&self, player: &PlayerId) -> Result<Option<Ticket>, StoreError>;

    /// Marks the player's ticket (if queued) as away since `since_ms`, or back (`None`).
    async fn set_away(&self, player: &PlayerId, since_ms: Option<u64>) -> Result<(), StoreError>;

    /// The pool's tickets, oldest first (by `enqueued_ms`, then id).
    async fn tickets(&self, pool: &PoolKey) -> Result<Vec<Ticket>, StoreError>;

    /// Pools that hold at least one ticket.
    async fn pools(&self) -> Result<Vec<PoolKey>, StoreError>;

    /// Atomically: if every ticket in `tickets` is still queued, removes them, stores `session`
    /// (as version 1) and binds each ticket's player to it; returns `true`. Otherwise changes
    /// nothing and returns `false`. A ticket is matched once, never twice, never lost.
    async fn claim(&self, tickets: &[String], session: &Session) -> Result<bool, StoreError>;

    async fn binding(&self, player: &PlayerId) -> Result<Option<Binding>, StoreError>;

    /// The player's last session, if it ended within [`LAST_SESSION_KEPT_MS`] (and within the
    /// ended retention) and the player has not queued since: so that a player who was away
    /// when it ended is told how on reconnect.
    async fn last_session(&self, player: &PlayerId) -> Result<Option<SessionId>, StoreError>;

    // ---- sessions ----

    async fn session(&self, id: &SessionId) -> Result<Option<Session>, StoreError>;

    /// Sessions in `state` (all if `None`); ended ones only within [`ENDED_RETENTION_MS`].
    async fn sessions(&self, state: Option<SessionState>) -> Result<Vec<Session>, StoreError>;

    /// Compare-and-set: stores `session` with `version + 1` if the stored version is still
    /// `session.version`; returns the stored record, or `None` if someone changed it first (or
    /// it is gone). Moving to `Ended` also unbinds its players (those still bound to it).
    async fn update_session(&self, session: &Session) -> Result<Option<Session>, StoreError>;

    // ---- hosts ----

    /// Writes a host's record (the replica holding its websocket is its writer). Keeps the
    /// host's draining flag as it was (see [`Store::set_draining`]).
    async fn put_host(&self, host: &HostRecord) -> Result<(), StoreError>;

    async fn host(&self, id: &HostId) -> Result<Option<HostRecord>, StoreError>;

    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError>;

    /// Sets `state` if the record's `last_seen_ms` is still `seen_ms` (so a host that came back
    /// meanwhile is not marked lost); returns whether it did.
    async fn mark_host(
        &self,
        id: &HostId,
        seen_ms: u64,
        state: HostState,
    ) -> Result<bool, StoreError>;

    /// Drains (no new sessions) or undrains a host; `false` if the host is unknown.
    async fn set_draining(&self, id: &HostId, draining: bool) -> Result<bool, StoreError>;

    async fn remove_host(&self, id: &HostId) -> Result<(), StoreError>;

    // ---- coordination ----

    /// Takes or renews the lease `name` for `owner` for `ttl_ms`; `false` if another owner
    /// holds it.
    async fn lease(&self, name: &str, owner: &str, ttl_ms: u64) -> Result<bool, StoreError>;

    /// Sends `event` to every replica, this one included.
    async fn publish(&self, event: &Event) -> Result<(), StoreError>;

    /// Events from every replica, in publish order per publisher. Delivery is best-effort
    /// (a lagging receiver or a Redis reconnect loses some): events say *look now*, the state
    /// itself is always re-read from the store, and the sweeper re-drives what was missed.
    fn subscribe(&self) -> broadcast::Receiver<Event>;
}
