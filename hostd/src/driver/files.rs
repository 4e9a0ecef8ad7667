//! The file work every driver does the same way: private folders, I/O errors with what was
//! being done, and sealing a freshly docked substrate with its versioned header.

use super::{DriverError, PrimeStats};
use crate::substrate::{self, Fingerprint, Header, Substrate};
use crate::util::now_ms;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::Instant;

/// Maps an I/O error to [`DriverError::Io`] saying what was being done.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
    let what = what.into();
    move |source| DriverError::Io { what, source }
}

/// Creates `dir` (and its parents) readable only by hostd: it holds QMP sockets and keys.
pub(crate) fn mkdir_private(dir: &Path) -> Result<(), DriverError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(format!("creating {}", dir.display())))
}

/// Seals the substrate docked in `dir`: hashes its state file (and its RAM file, when it has
/// one: see [`substrate::ram_digest`]) and writes `substrate.json`, so that
/// [`Substrate::open`] accepts it. `primed` is when priming began, `docking` when the
/// guest was initialised and docking began.
pub(crate) fn seal_substrate(
    dir: &Path,
    fingerprint: Fingerprint,
    boot_ms: u64,
    primed: Instant,
    docking: Instant,
) -> Result<PrimeStats, DriverError> {
    let (sha, state_bytes) = substrate::sha256_file(&Substrate::state_path(dir))
        .map_err(io_err("hashing the state file"))?;
    let ram = Substrate::ram_path(dir);
    let ram_digest = match ram.exists() {
        true => Some(substrate::ram_digest(&ram).map_err(io_err("hashing the RAM file"))?),
        false => None,
    };
    let dock_ms = docking.elapsed().as_millis() as u64;
    let header = Header {
        magic: substrate::MAGIC.into(),
        format: substrate::FORMAT,
        fingerprint,
        created_ms: now_ms(),
        prime_ms: primed.elapsed().as_millis() as u64,
        state_sha256: sha,
        state_bytes,
        ram_digest,
    };
    let header_json = serde_json::to_vec_pretty(&header).map_err(|e| DriverError::Io {
        what: "encoding substrate.json".into(),
        source: e.into(),
    })?;
    std::fs::write(Substrate::header_path(dir), header_json)
        .map_err(io_err("writing substrate.json"))?;
    Ok(PrimeStats {
        boot_ms,
        dock_ms,
        state_bytes,
    })
}
