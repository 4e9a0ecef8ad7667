//! The replica's shared context: the domain [`Core`] (config, store, modes, metrics), auth, the
//! [`Registry`] of the sockets this replica holds, the matcher's trigger and the dashboard's
//! hub. `Shared` derefs to its `Core`.

use crate::auth::Auth;
use crate::domain::Core;
use crate::model::PoolKey;
use std::sync::Arc;
use tokio::sync::mpsc;

pub use crate::registry::{Conn, HostConn, Outbound, PlayerConn, Registry};
pub use crate::util::lock;

pub struct Shared {
    pub core: Arc<Core>,
    pub auth: Auth,
    /// The player and host connections this replica holds.
    pub registry: Registry,
    /// Pools this replica's matcher should look at now.
    pub matcher: mpsc::UnboundedSender<PoolKey>,
    /// What the admin dashboard's live feed shows, and its watchers.
    pub dashboard: crate::feed::Hub,
    /// The replica is stopping: `/readyz` fails and new sockets are refused.
    pub stopping: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }
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
