//! A docked substrate on disk, and its versioned header.
//!
//! ```text
//! <state_dir>/substrates/<image>/
//!   substrate.json   header: magic, format, driver, image digest, hypervisor version,
//!                    device model, machine config, checksum and size of the state file
//!   state            device state (QEMU migration stream, or an `xl save` file)
//!   ram              guest RAM (QEMU: memory-backend-file; clones map it copy-on-write)
//!   overlay.qcow2    a blank overlay on the image's disk, copied for each clone
//! ```
//!
//! [`Substrate::open`] accepts a folder only when every field of [`Fingerprint`] matches what
//! this host would produce now and the state file still has its checksum; anything else is a
//! [`SubstrateError`] that makes the pool re-prime — never a crash.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub const MAGIC: &str = "berth-substrate";
pub const FORMAT: u32 = 1;

/// The machine a substrate was primed for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    pub memory_mib: u32,
    pub vcpus: u32,
    pub balloon_mib: Option<u32>,
    /// RAM in a shared file mapped copy-on-write (true) or inside the state file (false).
    pub cow: bool,
    pub accel: String,
}

/// Everything that must be the same for a substrate to be restorable here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    pub driver: String,
    pub image_digest: String,
    pub hypervisor_version: String,
    /// The driver's device-model revision (bumped whenever its VM arguments change).
    pub device_model: String,
    pub machine: Machine,
}

/// `substrate.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub magic: String,
    pub format: u32,
    pub fingerprint: Fingerprint,
    pub created_ms: u64,
    /// Cold boot + initialise + dock, in milliseconds.
    pub prime_ms: u64,
    pub state_sha256: String,
    pub state_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SubstrateError {
    #[error("no substrate at {0}")]
    Missing(PathBuf),
    #[error("substrate {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("substrate {path} was made for another {field}")]
    Mismatch { path: PathBuf, field: &'static str },
    #[error("substrate i/o at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SubstrateError {
    pub fn code(&self) -> &'static str {
        match self {
            SubstrateError::Missing(_) => "substrate_missing",
            SubstrateError::Corrupt { .. } => "substrate_corrupt",
            SubstrateError::Mismatch { .. } => "substrate_mismatch",
            SubstrateError::Io { .. } => "substrate_io",
        }
    }
}

/// A docked substrate that passed its checks.
#[derive(Debug, Clone)]
pub struct Substrate {
    pub dir: PathBuf,
    pub header: Header,
}

impl Substrate {
    pub fn header_path(dir: &Path) -> PathBuf {
        dir.join("substrate.json")
    }
    pub fn state_path(dir: &Path) -> PathBuf {
        dir.join("state")
    }
    pub fn ram_path(dir: &Path) -> PathBuf {
        dir.join("ram")
    }
    pub fn overlay_path(dir: &Path) -> PathBuf {
        dir.join("overlay.qcow2")
    }

    pub fn state(&self) -> PathBuf {
        Self::state_path(&self.dir)
    }
    pub fn ram(&self) -> PathBuf {
        Self::ram_path(&self.dir)
    }
    pub fn overlay(&self) -> PathBuf {
        Self::overlay_path(&self.dir)
    }

    /// Opens and checks the substrate in `dir` against what this host expects.
    pub fn open(dir: &Path, expected: &Fingerprint) -> Result<Self, SubstrateError> {
        let corrupt = |reason: String| SubstrateError::Corrupt {
            path: dir.to_path_buf(),
            reason,
        };
        let header_path = Self::header_path(dir);
        let bytes = match std::fs::read(&header_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SubstrateError::Missing(dir.to_path_buf()))
            }
            Err(source) => {
                return Err(SubstrateError::Io {
                    path: header_path,
                    source,
                })
            }
        };
        let header: Header =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("header: {e}")))?;
        if header.magic != MAGIC {
            return Err(corrupt("bad magic".into()));
        }
        if header.format != FORMAT {
            return Err(SubstrateError::Mismatch {
                path: dir.to_path_buf(),
                field: "format version",
            });
        }
        let f = &header.fingerprint;
        let mismatch = |field| {
            Err(SubstrateError::Mismatch {
                path: dir.to_path_buf(),
                field,
            })
        };
        if f.driver != expected.driver {
            return mismatch("driver");
        }
        if f.image_digest != expected.image_digest {
            return mismatch("image digest");
        }
        if f.hypervisor_version != expected.hypervisor_version {
            return mismatch("hypervisor version");
        }
        if f.device_model != expected.device_model {
            return mismatch("device model");
        }
        if f.machine != expected.machine {
            return mismatch("machine config");
        }
        let state = Self::state_path(dir);
        let (sha, len) = sha256_file(&state).map_err(|e| corrupt(format!("state file: {e}")))?;
        if len != header.state_bytes || sha != header.state_sha256 {
            return Err(corrupt("state file checksum differs".into()));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            header,
        })
    }
}

/// sha256 (hex) and length of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let bytes = std::fs::read(path)?;
    Ok((hex::encode(Sha256::digest(&bytes)), bytes.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> Fingerprint {
        Fingerprint {
            driver: "qemu".into(),
            image_digest: "abc".into(),
            hypervisor_version: "QEMU 7.2".into(),
            device_model: "microvm-1".into(),
            machine: Machine {
                memory_mib: 128,
                vcpus: 1,
                balloon_mib: None,
                cow: true,
                accel: "tcg".into(),
            },
        }
    }

    fn write(dir: &Path, fingerprint: Fingerprint, state: &[u8]) {
        std::fs::write(Substrate::state_path(dir), state).expect("write state");
        let (sha, len) = sha256_file(&Substrate::state_path(dir)).expect("hash");
        let header = Header {
            magic: MAGIC.into(),
            format: FORMAT,
            fingerprint,
            created_ms: 1,
            prime_ms: 1,
            state_sha256: sha,
            state_bytes: len,
        };
        std::fs::write(
            Substrate::header_path(dir),
            serde_json::to_vec(&header).expect("json"),
        )
        .expect("write header");
    }

    #[test]
    fn good_substrate_opens() {
        let d = tempfile::tempdir().expect("tmp");
        write(d.path(), fp(), b"state");
        assert!(Substrate::open(d.path(), &fp()).is_ok());
    }

    #[test]
    fn missing_corrupt_and_mismatched_are_told_apart() {
        let d = tempfile::tempdir().expect("tmp");
        let e = Substrate::open(d.path(), &fp()).expect_err("missing");
        assert_eq!(e.code(), "substrate_missing");

        write(d.path(), fp(), b"state");
        std::fs::write(Substrate::state_path(d.path()), b"stale").expect("corrupt it");
        assert_eq!(
            Substrate::open(d.path(), &fp()).expect_err("x").code(),
            "substrate_corrupt"
        );

        std::fs::write(Substrate::header_path(d.path()), b"{garbage").expect("garbage");
        assert_eq!(
            Substrate::open(d.path(), &fp()).expect_err("x").code(),
            "substrate_corrupt"
        );

        let mut other = fp();
        other.hypervisor_version = "QEMU 10.0".into();
        write(d.path(), other, b"state");
        let e = Substrate::open(d.path(), &fp()).expect_err("mismatch");
        assert!(e.to_string().contains("hypervisor version"), "{e}");

        let mut other = fp();
        other.machine.memory_mib = 256;
        write(d.path(), other, b"state");
        assert!(Substrate::open(d.path(), &fp())
            .expect_err("x")
            .to_string()
            .contains("machine"));
    }
}
