//! A docked substrate on disk, and its versioned header.
//!
//! ```text
//! <state_dir>/substrates/<image>/
//!   substrate.json   header: magic, format, driver, image digest, hypervisor version,
//!                    device model, machine config, checksum and size of the state file,
//!                    digest of the RAM file's content (format 2)
//!   state            device state (QEMU migration stream, or an `xl save` file)
//!   ram              guest RAM (QEMU: memory-backend-file; clones map it copy-on-write)
//!   overlay.qcow2    a blank overlay on the image's disk, copied for each clone
//! ```
//!
//! [`Substrate::open`] accepts a folder only when every field of [`Fingerprint`] matches what
//! this host would produce now, the state file still has its checksum and the RAM file still
//! has the content it was docked with ([`Substrate::verify`]); anything else is a
//! [`SubstrateError`] that makes the pool re-prime — never a crash.
//!
//! Why the RAM file has a digest of its own: it is shared by every clone, and nothing in the
//! migration stream covers it (`x-ignore-shared`), so a RAM file changed under a docked
//! substrate restores without complaint and every clone then dies when it runs. QEMU 7.2
//! punches holes in file-backed RAM it discards, even on a `share=off` mapping (a postcopy
//! migration of a clone zeroed its substrate). The digest is xxh3-128 ([`ram_digest`]): it
//! guards against accidents, not attackers (whoever can write the 0700 state folder can
//! rewrite the header too), so a fast non-cryptographic hash does; 128 MiB take tens of
//! milliseconds. The pool checks it at start-up (a restarted hostd re-using a substrate), when
//! a substrate is docked, and whenever clones of it start failing.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub const MAGIC: &str = "berth-substrate";
/// 2: the header carries `ram_digest`.
pub const FORMAT: u32 = 2;

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

impl Fingerprint {
    /// The fingerprint's identity, `sha256:<hex>` of its JSON: what hosts compare to tell
    /// whether they can restore each other's substrates (see [`crate::ship`]).
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("a fingerprint serialises");
        format!("sha256:{}", hex::encode(Sha256::digest(json)))
    }
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
    /// The RAM file's content digest when docked ([`ram_digest`]); `None` when the substrate
    /// has no RAM file of its own (its RAM is in the state file: `cow = false`, or Xen).
    pub ram_digest: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubstrateError {
    #[error("no substrate at {0}")]
    Missing(PathBuf),
    #[error("substrate {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("substrate {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
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
            SubstrateError::Damaged { .. } => "substrate_damaged",
            SubstrateError::Mismatch { .. } => "substrate_mismatch",
            SubstrateError::Io { .. } => "substrate_io",
        }
    }
}

impl Header {
    /// Parses `substrate.json` of the substrate at `dir` and checks it was made for
    /// `expected` (magic, format, every field of the fingerprint); the files are not read.
    pub fn parse(
        dir: &Path,
        bytes: &[u8],
        expected: &Fingerprint,
    ) -> Result<Header, SubstrateError> {
        let corrupt = |reason: String| SubstrateError::Corrupt {
            path: dir.to_path_buf(),
            reason,
        };
        let header: Header =
            serde_json::from_slice(bytes).map_err(|e| corrupt(format!("header: {e}")))?;
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
        Ok(header)
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
        let header = Header::parse(dir, &bytes, expected)?;
        let state = Self::state_path(dir);
        let (sha, len) = sha256_file(&state).map_err(|e| corrupt(format!("state file: {e}")))?;
        if len != header.state_bytes || sha != header.state_sha256 {
            return Err(corrupt("state file checksum differs".into()));
        }
        let substrate = Self {
            dir: dir.to_path_buf(),
            header,
        };
        substrate.verify()?;
        Ok(substrate)
    }

    /// Checks that the RAM file still has the content it was docked with. It reads the whole
    /// file (tens of milliseconds for 128 MiB): call it off the async runtime
    /// (`spawn_blocking`).
    pub fn verify(&self) -> Result<(), SubstrateError> {
        let Some(expected) = &self.header.ram_digest else {
            return Ok(());
        };
        let damaged = |reason: String| SubstrateError::Damaged {
            path: self.dir.clone(),
            reason,
        };
        match ram_digest(&self.ram()) {
            Ok(found) if &found == expected => Ok(()),
            Ok(_) => Err(damaged(
                "its RAM file's content differs from the digest taken when it was docked".into(),
            )),
            Err(e) => Err(damaged(format!("its RAM file cannot be read: {e}"))),
        }
    }
}

/// sha256 (hex) and length of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let bytes = std::fs::read(path)?;
    Ok((hex::encode(Sha256::digest(&bytes)), bytes.len() as u64))
}

/// The digest of a file's content, `xxh3-128:<hex>`, read 1 MiB at a time (a sparse RAM
/// file's holes read as zeros, so a hole punched into it changes the digest).
pub fn ram_digest(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(format!("xxh3-128:{:032x}", hasher.digest128()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn fp() -> Fingerprint {
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

    pub(crate) fn write(dir: &Path, fingerprint: Fingerprint, state: &[u8]) {
        std::fs::write(Substrate::state_path(dir), state).expect("write state");
        std::fs::write(Substrate::ram_path(dir), ram()).expect("write ram");
        let (sha, len) = sha256_file(&Substrate::state_path(dir)).expect("hash");
        let header = Header {
            magic: MAGIC.into(),
            format: FORMAT,
            fingerprint,
            created_ms: 1,
            prime_ms: 1,
            state_sha256: sha,
            state_bytes: len,
            ram_digest: Some(ram_digest(&Substrate::ram_path(dir)).expect("hash")),
        };
        std::fs::write(
            Substrate::header_path(dir),
            serde_json::to_vec(&header).expect("json"),
        )
        .expect("write header");
    }

    /// 3 MiB of guest RAM that is not all zeros, so that a hole punched into it shows.
    fn ram() -> Vec<u8> {
        (0..3 << 20).map(|i: u32| (i % 251) as u8).collect()
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

        // Format 1 (no RAM digest) is another format: re-primed, not trusted.
        write(d.path(), fp(), b"state");
        let mut header: serde_json::Value =
            serde_json::from_slice(&std::fs::read(Substrate::header_path(d.path())).expect("read"))
                .expect("json");
        header["format"] = 1.into();
        header.as_object_mut().expect("object").remove("ram_digest");
        std::fs::write(Substrate::header_path(d.path()), header.to_string()).expect("write");
        let e = Substrate::open(d.path(), &fp()).expect_err("old format");
        assert!(e.to_string().contains("format version"), "{e}");

        let mut other = fp();
        other.machine.memory_mib = 256;
        write(d.path(), other, b"state");
        assert!(Substrate::open(d.path(), &fp())
            .expect_err("x")
            .to_string()
            .contains("machine"));
    }

    #[test]
    fn a_ram_file_changed_after_docking_is_damaged() {
        let d = tempfile::tempdir().expect("tmp");
        write(d.path(), fp(), b"state");
        let s = Substrate::open(d.path(), &fp()).expect("opens");
        s.verify().expect("intact");
        // A hole in the middle, as QEMU's discard punches one: same size, zeros inside.
        let mut ram = ram();
        ram[1 << 20..2 << 20].fill(0);
        std::fs::write(s.ram(), &ram).expect("zero a MiB");
        let e = s.verify().expect_err("damaged");
        assert_eq!(e.code(), "substrate_damaged");
        assert!(e.to_string().contains("differs from the digest"), "{e}");
        let e = Substrate::open(d.path(), &fp()).expect_err("not reused either");
        assert_eq!(e.code(), "substrate_damaged");
        std::fs::remove_file(s.ram()).expect("remove");
        assert!(s
            .verify()
            .expect_err("gone")
            .to_string()
            .contains("cannot be read"));
        // A substrate without a RAM file of its own (RAM in the state file) has nothing to check.
        let no_ram = Substrate {
            header: Header {
                ram_digest: None,
                ..s.header.clone()
            },
            ..s
        };
        no_ram.verify().expect("nothing to check");
    }
}
