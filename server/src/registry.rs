//! The sockets this replica holds: each player's and each host's one live connection, reached
//! through an `mpsc` sender owned by its connection task. A newer connection of the same player
//! or host replaces the older one, which is closed.

use crate::util::lock;
use berth_protocol::host::ServerToHost;
use berth_protocol::play::ServerMessage;
use berth_protocol::{HostId, PlayerId};
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::mpsc;

/// What a connection task is asked to send.
#[derive(Debug, Clone)]
pub enum Outbound<M> {
    Msg(M),
    /// Send a close frame with this code and reason, then end the connection.
    Close(u16, String),
    /// Events may have been missed: compare what the peer was told with the store.
    Recheck,
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

    /// Asks the connection to compare what it told its peer with the store (a full inbox
    /// checks anyway, on its own timer).
    pub fn recheck(&self) {
        let _ = self.tx.try_send(Outbound::Recheck);
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

/// Who is connected to this replica.
#[derive(Debug, Default)]
pub struct Registry {
    pub players: Mutex<HashMap<PlayerId, PlayerConn>>,
    pub hosts: Mutex<HashMap<HostId, HostConn>>,
}

impl Registry {
    pub fn player(&self, id: &PlayerId) -> Option<PlayerConn> {
        lock(&self.players).get(id).cloned()
    }

    pub fn host_conn(&self, id: &HostId) -> Option<HostConn> {
        lock(&self.hosts).get(id).cloned()
    }
}
