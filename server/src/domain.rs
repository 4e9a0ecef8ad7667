//! The domain core of a replica: what the session lifecycle, the matchmaker and the sweeper
//! need and nothing else — the config (timeouts, placement policy), the store, the game modes,
//! the metrics and this replica's name. No sockets, no dashboard, no auth: those sit around it
//! in [`crate::state::Shared`], so the core's logic runs (and is unit-tested) without them.

use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::modes::Modes;
use crate::store::Store;
use std::sync::Arc;

pub struct Core {
    pub config: ServerConfig,
    /// This replica's name (leases are held in it).
    pub replica: String,
    pub store: Arc<dyn Store>,
    pub modes: Modes,
    pub metrics: Metrics,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("replica", &self.replica)
            .field("store", &self.store.kind())
            .finish()
    }
}

impl Core {
    pub fn new(config: ServerConfig, store: Arc<dyn Store>, modes: Modes) -> Core {
        Core {
            replica: config.replica.clone(),
            config,
            store,
            modes,
            metrics: Metrics::new(),
        }
    }
}

/// A test core: the memory store, the shipped modes, default timeouts.
#[cfg(test)]
pub(crate) fn test_core() -> Arc<Core> {
    let modes_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/modes");
    let modes = Modes::load(&modes_dir).expect("the shipped modes load");
    let config = ServerConfig {
        replica: "test-replica".into(),
        ..ServerConfig::default()
    };
    let store = Arc::new(crate::store::memory::MemoryStore::new());
    Arc::new(Core::new(config, store, modes))
}
