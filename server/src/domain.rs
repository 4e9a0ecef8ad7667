//! The domain core of a replica: what the session lifecycle, the matchmaker and the sweeper
//! need and nothing else — the config (timeouts, placement policy), the store, the game modes,
//! the metrics and this replica's name. No sockets, no dashboard, no auth: those sit around it
//! in [`crate::state::Shared`], so the core's logic runs (and is unit-tested) without them.

use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::modes::Modes;
use crate::store::Store;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub struct Core {
    pub config: ServerConfig,
    /// This replica's name (leases are held in it).
    pub replica: String,
    pub store: Arc<dyn Store>,
    pub modes: Modes,
    pub metrics: Metrics,
    /// When this replica last saw the store come back from an outage.
    pub outage: Outage,
}

/// What this replica saw of the store's outages: the sweeper pauses deadlines and host
/// liveness while the store is unreachable, and re-bases them on the moment it came back, so
/// that time the store was down is not counted against hosts or sessions.
#[derive(Debug, Default)]
pub struct Outage {
    down: AtomicBool,
    back_ms: AtomicU64,
}

impl Outage {
    /// The store failed a request.
    pub fn failed(&self) {
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!("state store unreachable: deadlines and host liveness paused");
        }
    }

    /// The store answered at `now_ms`.
    pub fn answered(&self, now_ms: u64) {
        if self.down.swap(false, Ordering::Relaxed) {
            self.back_ms.store(now_ms, Ordering::Relaxed);
            tracing::info!("state store back: deadlines re-based");
        }
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// When the store last came back (0: never down).
    pub fn back_ms(&self) -> u64 {
        self.back_ms.load(Ordering::Relaxed)
    }
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
            outage: Outage::default(),
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
