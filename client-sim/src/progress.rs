//! Live counts of a running swarm, for a progress bar or a test to poll. Cheap to clone; the
//! bots update it with relaxed atomics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
struct Counters {
    arrived: AtomicU64,
    queued: AtomicU64,
    playing: AtomicU64,
    finished: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    done: AtomicU64,
}

/// Shared live counters; pass a clone to [`crate::run`] and read [`Progress::snapshot`].
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<Counters>);

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgressSnapshot {
    /// Players that have arrived so far.
    pub arrived: u64,
    /// Players in the queue now (`queue` sent, no `matched` yet).
    pub queued: u64,
    /// Players matched and not done with that match yet.
    pub playing: u64,
    /// Matches finished with results.
    pub finished: u64,
    /// Matches failed.
    pub failed: u64,
    /// Queues cancelled at the end of the run.
    pub cancelled: u64,
    /// Players done with all their matches.
    pub done: u64,
}

impl Progress {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn snapshot(&self) -> ProgressSnapshot {
        let c = &self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProgressSnapshot {
            arrived: get(&c.arrived),
            queued: get(&c.queued),
            playing: get(&c.playing),
            finished: get(&c.finished),
            failed: get(&c.failed),
            cancelled: get(&c.cancelled),
            done: get(&c.done),
        }
    }

    pub(crate) fn arrived(&self) {
        self.0.arrived.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn done(&self) {
        self.0.done.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stage(&self, from: Stage, to: Stage) {
        if let Some(a) = self.gauge(from) {
            a.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(a) = self.gauge(to) {
            a.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn outcome(&self, finished: bool, failed: bool, cancelled: bool) {
        let c = &self.0;
        if finished {
            c.finished.fetch_add(1, Ordering::Relaxed);
        }
        if failed {
            c.failed.fetch_add(1, Ordering::Relaxed);
        }
        if cancelled {
            c.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn gauge(&self, s: Stage) -> Option<&AtomicU64> {
        match s {
            Stage::Idle => None,
            Stage::Queued => Some(&self.0.queued),
            Stage::Playing => Some(&self.0.playing),
        }
    }
}

/// Where a bot is, for the `queued` and `playing` gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Idle,
    Queued,
    Playing,
}
