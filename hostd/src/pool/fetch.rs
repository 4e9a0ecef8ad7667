//! Docking a substrate shipped from a peer instead of priming it (see [`crate::ship`]): asked
//! for only when the host has `[peer]` configured and only for an image with no docked
//! substrate (the refill task booked it `priming`), so a fetch never replaces a good one. Any
//! failure — no peer, a refusal, a stream cut short, a header or digest that does not match —
//! is logged, announced ([`PoolEvent::ShipRefused`], counted in the metrics) and the image is
//! primed as before; the temp folder is gone by then.

use super::{Pool, PoolEvent};
use crate::driver::VmSpec;
use crate::ship::{self, Incoming, Offer, ShipError};
use crate::substrate::Substrate;
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;

impl Pool {
    /// Fetches and docks `name`'s substrate from a peer into `dir`; `None`: prime it. The
    /// [`PoolEvent::Shipped`] to announce comes with it, for after it is booked.
    pub(super) async fn ship_in(
        &self,
        name: &str,
        spec: &VmSpec,
        dir: &Path,
    ) -> Option<(Substrate, PoolEvent)> {
        let peer = self.inner.config.peer.as_ref()?;
        let expected = self.inner.driver.fingerprint(spec);
        let t0 = Instant::now();
        let wait = Duration::from_millis(peer.ask_ms);
        let mut shutdown = self.inner.shutdown.subscribe();
        let offer = tokio::select! {
            offer = self.inner.ship.ask(name, expected.key(), wait) => offer,
            _ = shutdown.wait_for(|stop| *stop) => return None,
        };
        let (from, grant) = match offer {
            Offer::Fetch { from, grant } => (from, grant),
            Offer::Prime { reason } => {
                tracing::info!(image = %name, reason, "no peer ships this substrate: priming");
                return None;
            }
        };
        tracing::info!(image = %name, from, "fetching the substrate from a peer");
        let timeout = Duration::from_secs(peer.fetch_timeout_s);
        let work = async {
            let incoming = Incoming::new(&self.inner.config.state_dir.join("substrates"), name)?;
            let bytes =
                ship::fetch(&from, &grant, name, &expected, incoming.path(), timeout).await?;
            self.inner
                .driver
                .localise(spec, incoming.path())
                .map_err(ShipError::Localise)?;
            let checked =
                super::health::open_substrate(incoming.path().to_owned(), expected).await?;
            incoming.commit(dir)?;
            let substrate = Substrate {
                dir: dir.to_owned(),
                header: checked.header,
            };
            Ok::<_, ShipError>((substrate, bytes))
        };
        let result = tokio::select! {
            r = work => r,
            _ = shutdown.wait_for(|stop| *stop) => Err(ShipError::ShuttingDown),
        };
        match result {
            Ok((substrate, bytes)) => {
                let fetch_ms = t0.elapsed().as_millis() as u64;
                tracing::info!(image = %name, from, fetch_ms, bytes, "shipped substrate docked");
                let event = PoolEvent::Shipped {
                    image: name.to_owned(),
                    from,
                    fetch_ms,
                    bytes,
                };
                Some((substrate, event))
            }
            Err(e) => {
                let message = match std::error::Error::source(&e) {
                    Some(cause) => format!("{e}: {cause}"),
                    None => e.to_string(),
                };
                tracing::warn!(image = %name, from, code = e.code(), error = %message, "shipped substrate refused: priming");
                self.emit(PoolEvent::ShipRefused {
                    image: name.to_owned(),
                    code: e.code().to_owned(),
                    message,
                });
                None
            }
        }
    }
}
