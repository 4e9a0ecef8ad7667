//! The replica's shared context: the domain [`Core`] (config, store, modes, metrics), auth,
//! and the sockets this replica holds (players and hosts), each reachable through an `mpsc`
//! sender owned by its connection task. `Shared` derefs to its `Core`.

use crate::auth::Auth;
use crate::domain::Core;
use crate::model::PoolKey;
use berth_protocol::host::ServerToHost;
use berth_protocol::play::ServerMessage;
use berth_protocol::{HostId, PlayerId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
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
    pub core: Arc<Core>,
    pub auth: Auth,
    pub players: Mutex<HashMap<PlayerId, PlayerConn>>,
    pub hosts: Mutex<HashMap<HostId, HostConn>>,
    /// Pools this replica's matcher should look at now.
    pub matcher: mpsc::UnboundedSender<PoolKey>,
    /// What the admin dashboard's live feed shows, and its watchers.
    pub dashboard: crate::feed::Hub,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("replica", &self.replica)
            .finish()
    }
}

pub type Ctx = Arc<Shared>;

impl std::ops::Deref for Shared {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

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
