//! A docked substrate's health: clones of it that keep failing (with no activation working in
//! between) trigger a check of its content ([`Substrate::verify`], run off the async runtime), and a substrate found damaged —
//! or one a clone cannot even restore — is discarded and primed again, its reason logged,
//! announced ([`PoolEvent::SubstrateDiscarded`]) and counted in `status`
//! (`images[].reprimes`).
//!
//! Activations never wait for a check: while one runs, clones keep being made from the
//! substrate, and a healthy one is never blocked.

use super::{Phase, Pool, PoolEvent};
use crate::driver::DriverError;
use crate::substrate::{Fingerprint, Header, Substrate, SubstrateError};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Clones of one substrate that fail (restore, warm-up or activation) with no activation
/// working in between, before its content is checked: one failure is as likely the game's as
/// the substrate's.
pub(super) const VERIFY_AFTER_FAILURES: u32 = 3;

/// What the pool keeps about an image's substrate between primes.
#[derive(Debug, Default)]
pub(super) struct Health {
    /// Clones of the docked substrate that failed since one last worked.
    failures: u32,
    /// A check of the docked substrate's content is running.
    verifying: bool,
    /// Substrates of this image discarded and primed again, by reason code.
    pub reprimes: BTreeMap<String, u64>,
}

/// Opens the substrate in `dir`, checking its content too, off the async runtime.
pub(super) async fn open_substrate(
    dir: PathBuf,
    expected: Fingerprint,
) -> Result<Substrate, SubstrateError> {
    let path = dir.clone();
    tokio::task::spawn_blocking(move || Substrate::open(&dir, &expected))
        .await
        .unwrap_or_else(|e| {
            Err(SubstrateError::Io {
                path,
                source: std::io::Error::other(e),
            })
        })
}

impl Pool {
    /// A clone of `image`'s substrate was activated: the substrate works. (A warm clone that
    /// only restored and warmed up is no proof: a partly damaged substrate may get that far
    /// and still fail every session, so it does not reset the count.)
    pub(super) fn clone_worked(&self, image: &str) {
        if let Some(slot) = self.state().images.get_mut(image) {
            slot.health.failures = 0;
        }
    }

    /// A clone of `image`'s substrate failed with `e`. A restore that makes the substrate
    /// suspect discards it at once; other failures count, and [`VERIFY_AFTER_FAILURES`] in a
    /// row start a check of the substrate's content in the background.
    pub(super) fn clone_failed(&self, image: &str, e: &DriverError) {
        let substrate = {
            let mut st = self.state();
            let Some(slot) = st.images.get_mut(image) else {
                return;
            };
            let Phase::Docked(substrate) = &slot.substrate else {
                return;
            };
            if e.substrate_suspect() {
                let header = substrate.header.clone();
                drop(st);
                return self.discard_substrate(image, &header, e.code(), &e.to_string());
            }
            slot.health.failures += 1;
            if slot.health.failures < VERIFY_AFTER_FAILURES || slot.health.verifying {
                return;
            }
            slot.health.verifying = true;
            substrate.clone()
        };
        tracing::warn!(image, failures = VERIFY_AFTER_FAILURES, error = %e,
            "clones keep failing; checking the substrate's content");
        self.spawn(self.clone().verify(image.to_owned(), substrate));
    }

    /// Checks `substrate`'s content off the runtime; a damaged one is discarded.
    async fn verify(self, image: String, substrate: Box<Substrate>) {
        let header = substrate.header.clone();
        let verdict = tokio::task::spawn_blocking(move || substrate.verify()).await;
        {
            let mut st = self.state();
            if let Some(slot) = st.images.get_mut(&image) {
                slot.health.verifying = false;
                slot.health.failures = 0;
            }
        }
        match verdict {
            Ok(Ok(())) => {
                tracing::info!(%image, "substrate intact: its clones fail for another reason")
            }
            Ok(Err(e)) if !*self.inner.shutdown.borrow() => {
                self.discard_substrate(&image, &header, e.code(), &e.to_string())
            }
            Ok(Err(_)) => {}
            Err(e) => tracing::error!(%image, error = %e, "checking the substrate panicked"),
        }
    }

    /// Sends `image`'s docked substrate (the one `header` describes: not one primed since)
    /// back to be primed, because of `code`: its folder and its warm clones (restored from
    /// the same RAM) go, the reason is counted.
    pub(super) fn discard_substrate(&self, image: &str, header: &Header, code: &str, reason: &str) {
        let warm = {
            let mut st = self.state();
            let Some(slot) = st.images.get_mut(image) else {
                return;
            };
            if !matches!(&slot.substrate, Phase::Docked(s) if &s.header == header) {
                return;
            }
            tracing::warn!(image, code, reason, "substrate discarded; re-priming");
            slot.substrate = Phase::Missing;
            slot.health.failures = 0;
            *slot.health.reprimes.entry(code.to_owned()).or_default() += 1;
            let _ = std::fs::remove_dir_all(self.substrate_dir(image));
            std::mem::take(&mut slot.warm)
        };
        if !warm.is_empty() {
            self.spawn(async move {
                for vm in warm {
                    vm.destroy().await;
                }
            });
        }
        self.emit(PoolEvent::SubstrateDiscarded {
            image: image.to_owned(),
            code: code.to_owned(),
            reason: reason.to_owned(),
        });
        self.inner.wake.notify_one();
    }
}
