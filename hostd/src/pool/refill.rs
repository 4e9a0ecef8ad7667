//! The refill task: primes missing substrates (again, [`PRIME_RETRY`] after a failure) and
//! keeps each image's warm clones at target, one VM at a time. What to do next is chosen by
//! [`next_work`], a pure function of the pool's books.

use super::{new_vm_id, Phase, Pool, PoolEvent};
use crate::driver::{DriverError, Vm, VmSpec};
use crate::substrate::Substrate;
use berth_protocol::{SubstrateState, VmId};
use std::time::Duration;
use tokio::time::Instant;

/// How long a failed substrate waits before it is primed again.
pub(super) const PRIME_RETRY: Duration = Duration::from_secs(30);
/// How often the refill task looks again when nothing woke it.
const IDLE_LOOK: Duration = Duration::from_secs(2);
/// The pause after a warm restore that failed without condemning the substrate.
const WARM_RETRY: Duration = Duration::from_secs(1);

/// One image as the refill task sees it.
#[derive(Debug, Clone)]
pub(super) struct ImageBooks {
    pub name: String,
    pub substrate: SubstrateState,
    /// When the substrate failed (with [`SubstrateState::Failed`]).
    pub failed_at: Option<Instant>,
    pub warm: u32,
    pub warm_target: u32,
}

/// One unit of refill work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Work {
    /// Cold-boot the image and dock its substrate.
    Prime(String),
    /// Restore (and pre-warm) one more warm clone of the image.
    Warm(String),
}

/// The next unit of refill work, images taken by name: prime a missing substrate, or a failed
/// one [`PRIME_RETRY`] after it failed; else add a warm clone to a docked image below its
/// target while the host has room (`busy` VMs active or activating, plus every image's warm
/// clones, stay below `max_vms`). `None` when there is nothing to do.
pub(super) fn next_work(
    images: &[ImageBooks],
    busy: u32,
    max_vms: u32,
    now: Instant,
) -> Option<Work> {
    let warm_total: u32 = images.iter().map(|i| i.warm).sum();
    let mut by_name: Vec<&ImageBooks> = images.iter().collect();
    by_name.sort_by(|a, b| a.name.cmp(&b.name));
    by_name.into_iter().find_map(|i| match i.substrate {
        SubstrateState::Missing => Some(Work::Prime(i.name.clone())),
        SubstrateState::Failed
            if i.failed_at
                .is_none_or(|at| now.saturating_duration_since(at) > PRIME_RETRY) =>
        {
            Some(Work::Prime(i.name.clone()))
        }
        SubstrateState::Docked if i.warm < i.warm_target && busy + warm_total < max_vms => {
            Some(Work::Warm(i.name.clone()))
        }
        _ => None,
    })
}

/// A unit of work taken out of the books (a prime marks its image `priming` first).
enum Job {
    Prime(String),
    Warm(String, Box<Substrate>),
}

impl Pool {
    /// Primes missing substrates and keeps each image's warm clones at target, one VM at a
    /// time, until the pool shuts down.
    pub(super) async fn refill_task(self) {
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            if *shutdown.borrow() {
                return;
            }
            if self.refill_once().await {
                continue;
            }
            tokio::select! {
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(IDLE_LOOK) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Does one unit of refill work; false when there was none.
    async fn refill_once(&self) -> bool {
        match self.take_work() {
            None => false,
            Some(Job::Prime(name)) => {
                self.prime(&name).await;
                true
            }
            Some(Job::Warm(name, substrate)) => self.add_warm(&name, &substrate).await,
        }
    }

    /// Chooses the next unit of work ([`next_work`]) and books it, under one lock.
    fn take_work(&self) -> Option<Job> {
        let mut st = self.state();
        let busy = st.active.len() as u32 + st.activating;
        let books: Vec<ImageBooks> = st
            .images
            .iter()
            .filter_map(|(name, slot)| {
                let spec = self.inner.specs.get(name)?;
                Some(ImageBooks {
                    name: name.clone(),
                    substrate: slot.substrate.state(),
                    failed_at: match &slot.substrate {
                        Phase::Failed { at, .. } => Some(*at),
                        _ => None,
                    },
                    warm: slot.warm.len() as u32,
                    warm_target: spec.config.warm,
                })
            })
            .collect();
        let work = next_work(&books, busy, self.inner.config.max_vms, Instant::now())?;
        match work {
            Work::Prime(name) => {
                let slot = st.images.get_mut(&name)?;
                slot.substrate = Phase::Priming;
                Some(Job::Prime(name))
            }
            Work::Warm(name) => match &st.images.get(&name)?.substrate {
                Phase::Docked(s) => Some(Job::Warm(name, s.clone())),
                _ => None,
            },
        }
    }

    /// Docks `name`'s substrate — shipped from a peer when one has it (`fetch`), else primed —
    /// and books the outcome: docked, or failed (and its folder removed) until
    /// [`PRIME_RETRY`] has passed.
    async fn prime(&self, name: &str) {
        let Some(spec) = self.inner.specs.get(name) else {
            return;
        };
        let dir = self.substrate_dir(name);
        if let Some((substrate, shipped)) = self.ship_in(name, spec, &dir).await {
            if let Some(slot) = self.state().images.get_mut(name) {
                slot.substrate = Phase::Docked(Box::new(substrate));
            }
            self.emit(shipped);
            return;
        }
        if *self.inner.shutdown.borrow() {
            // Stopped while asking or fetching: nothing is booted on the way out.
            return;
        }
        tracing::info!(image = %name, "priming substrate");
        let result = self
            .inner
            .driver
            .prime(spec, &dir, self.inner.config.boot_timeout())
            .await;
        let opened = match result {
            Ok(stats) => {
                super::health::open_substrate(dir.clone(), self.inner.driver.fingerprint(spec))
                    .await
                    .map(|s| (s, stats))
                    .map_err(DriverError::from)
            }
            Err(e) => Err(e),
        };
        let mut st = self.state();
        let Some(slot) = st.images.get_mut(name) else {
            return;
        };
        match opened {
            Ok((s, stats)) => {
                tracing::info!(image = %name, boot_ms = stats.boot_ms, dock_ms = stats.dock_ms, "substrate docked");
                slot.substrate = Phase::Docked(Box::new(s));
                drop(st);
                self.emit(PoolEvent::Docked {
                    image: name.to_owned(),
                    prime: stats,
                });
            }
            Err(e) => {
                tracing::error!(image = %name, error = %e, "priming failed");
                let _ = std::fs::remove_dir_all(&dir);
                slot.substrate = Phase::Failed {
                    message: e.to_string(),
                    at: Instant::now(),
                };
                drop(st);
                self.emit(PoolEvent::PrimeFailed {
                    image: name.to_owned(),
                    code: e.code().into(),
                    message: e.to_string(),
                });
            }
        }
    }

    /// Adds one warm clone of `name`; false when the pool shut down meanwhile.
    async fn add_warm(&self, name: &str, substrate: &Substrate) -> bool {
        let Some(spec) = self.inner.specs.get(name) else {
            return true;
        };
        match self.restore_warm(spec, substrate, new_vm_id()).await {
            Ok(vm) => {
                let mut st = self.state();
                if *self.inner.shutdown.borrow() {
                    drop(st);
                    vm.destroy().await;
                    return false;
                }
                if let Some(slot) = st.images.get_mut(name) {
                    slot.warm.push(vm);
                }
            }
            Err(e) => {
                tracing::warn!(image = %name, error = %e, "warm restore failed");
                self.clone_failed(name, &e);
                if !e.substrate_suspect() {
                    tokio::time::sleep(WARM_RETRY).await;
                }
            }
        }
        true
    }

    /// A warm clone: restored, its activation paths run once, paused again.
    async fn restore_warm(
        &self,
        spec: &VmSpec,
        substrate: &Substrate,
        vm_id: VmId,
    ) -> Result<Box<dyn Vm>, DriverError> {
        let dir = self.vm_dir(&vm_id);
        let mut vm = self
            .inner
            .driver
            .restore(spec, substrate, vm_id, &dir)
            .await?;
        if let Err(e) = vm.prewarm(self.inner.config.ready_timeout()).await {
            vm.destroy().await;
            return Err(e);
        }
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn books(name: &str, substrate: SubstrateState, warm: u32, warm_target: u32) -> ImageBooks {
        ImageBooks {
            name: name.into(),
            substrate,
            failed_at: None,
            warm,
            warm_target,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn missing_substrates_are_primed_first_by_name() {
        let now = Instant::now();
        let images = [
            books("b", SubstrateState::Missing, 0, 0),
            books("a", SubstrateState::Docked, 0, 2),
            books("c", SubstrateState::Missing, 0, 0),
        ];
        // `a` comes first by name and wants a warm clone: one unit at a time, in name order.
        assert_eq!(next_work(&images, 0, 8, now), Some(Work::Warm("a".into())));
        let images = [
            books("b", SubstrateState::Missing, 0, 0),
            books("a", SubstrateState::Docked, 2, 2),
            books("c", SubstrateState::Missing, 0, 0),
        ];
        assert_eq!(next_work(&images, 0, 8, now), Some(Work::Prime("b".into())));
        let priming = [books("a", SubstrateState::Priming, 0, 2)];
        assert_eq!(next_work(&priming, 0, 8, now), None, "one prime at a time");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_substrate_waits_before_it_is_primed_again() {
        let failed = |at| ImageBooks {
            failed_at: Some(at),
            ..books("a", SubstrateState::Failed, 0, 1)
        };
        let at = Instant::now();
        let image = [failed(at)];
        assert_eq!(next_work(&image, 0, 8, at + Duration::from_secs(29)), None);
        assert_eq!(next_work(&image, 0, 8, at + PRIME_RETRY), None);
        assert_eq!(
            next_work(&image, 0, 8, at + PRIME_RETRY + Duration::from_millis(1)),
            Some(Work::Prime("a".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn warm_clones_fill_to_target_within_the_host_capacity() {
        let now = Instant::now();
        let image = [books("a", SubstrateState::Docked, 1, 3)];
        assert_eq!(next_work(&image, 0, 8, now), Some(Work::Warm("a".into())));
        // 6 active + 1 warm of 8: room for one more; 7 + 1: full.
        assert_eq!(next_work(&image, 6, 8, now), Some(Work::Warm("a".into())));
        assert_eq!(next_work(&image, 7, 8, now), None);
        // Every image's warm clones count against the host.
        let two = [
            books("a", SubstrateState::Docked, 0, 1),
            books("b", SubstrateState::Docked, 4, 4),
        ];
        assert_eq!(next_work(&two, 3, 8, now), Some(Work::Warm("a".into())));
        assert_eq!(next_work(&two, 4, 8, now), None);
        let full = [books("a", SubstrateState::Docked, 3, 3)];
        assert_eq!(next_work(&full, 0, 8, now), None, "at target");
    }
}
