//! The replica's shared context: config, store, auth, modes, metrics, and the sockets this
//! replica holds (players and hosts), each reachable through an `mpsc` sender owned by its
//! connection task.

use crate::auth::Auth;
use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::model::PoolKey;
use crate::modes::Modes;
use crate::store::Store;
use berth_protocol::host::ServerToHost;
use berth_protocol::play::ServerMessage;
use berth_protocol::{HostId, PlayerId, SessionId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::mpsc;

/// What a connection task is asked to send.
#[derive(Debug, Clone)]
pub enum Outbound<M> {
    Msg(M),
    /// Send a close frame with this code and reason, then end the connection.
    Close(u16, String),
}

/// A connection on this replica: its id (to tell a replaced connection from its successor) and
/// its task's inbox.
#[derive(Debug, Clone)]
pub struct Conn<M> {
    pub id: String,
    pub tx: mpsc::Sender<Outbound<M>>,
}

impl<M: Send + 'static> Conn<M> {
    /// Queues `msg`; a connection whose inbox is full is too slow and is closed.
    pub fn send(&self, msg: M) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(Outbound::Msg(msg)) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(Outbound::Close(1008, "slow_consumer".into())).await;
            });
        }
    }

    pub fn close(&self, code: u16, reason: &str) {
        let tx = self.tx.clone();
        let reason = reason.to_owned();
        tokio::spawn(async move {
            let _ = tx.send(Outbound::Close(code, reason)).await;
        });
    }
}

pub type PlayerConn = Conn<ServerMessage>;
pub type HostConn = Conn<ServerToHost>;

pub struct Shared {
    pub config: ServerConfig,
    pub replica: String,
    pub store: Arc<dyn Store>,
    pub auth: Auth,
    pub modes: Modes,
    pub metrics: Metrics,
    pub players: Mutex<HashMap<PlayerId, PlayerConn>>,
    pub hosts: Mutex<HashMap<HostId, HostConn>>,
    /// When this replica sent `activate` for a session (activation latency).
    pub activations: Mutex<HashMap<SessionId, Instant>>,
    /// Pools this replica's matcher should look at now.
    pub matcher: mpsc::UnboundedSender<PoolKey>,
    /// What the admin dashboard's live feed shows, and its watchers.
    pub dashboard: crate::dashboard::Hub,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("replica", &self.replica)
            .finish()
    }
}

pub type Ctx = Arc<Shared>;

/// Locks a std mutex held only for short, non-async critical sections.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn player(&self, id: &PlayerId) -> Option<PlayerConn> {
        lock(&self.players).get(id).cloned()
    }

    pub fn host_conn(&self, id: &HostId) -> Option<HostConn> {
        lock(&self.hosts).get(id).cloned()
    }
}
