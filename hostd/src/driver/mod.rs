//! The VM driver trait: one per hypervisor, chosen at start-up.
//!
//! A driver knows how to turn an image into a docked substrate ([`VmDriver::prime`]), how to
//! restore clones of it ([`VmDriver::restore`], left paused: the warm tier), how to cold-boot an
//! image (the baseline the benchmark compares against) and how to re-attach to a VM an earlier
//! hostd left running ([`VmDriver::adopt`]); and how to move a running VM to a peer host
//! ([`Vm::send_to`] on the source, [`VmDriver::receive`] and [`Vm::finish_receive`] on the
//! target: QEMU live migration over TCP). Each VM is a [`Vm`], owned by exactly one task of
//! the pool, which drives [`Vm::activate`], waits on [`Vm::event`] and ends with
//! [`Vm::destroy`] — the one place its process, sockets and overlay are removed.

pub(crate) mod files;
pub mod qemu;
pub mod xen;

use crate::config::ImageConfig;
use crate::image::Image;
use crate::substrate::{Fingerprint, Machine, Substrate, SubstrateError};
use async_trait::async_trait;
use berth_protocol::guest::Identity;
use berth_protocol::{PlayerId, SessionId, VmId};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the pool hands a driver about the image a VM runs.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub image: Image,
    pub config: ImageConfig,
}

impl VmSpec {
    /// What a substrate of this spec made by `driver` here must carry: the driver's kind and
    /// accelerator, the hypervisor's version, the driver's device-model revision and this
    /// machine, with its RAM in a shared copy-on-write file or not (`cow`).
    pub fn fingerprint(
        &self,
        driver: &dyn VmDriver,
        hypervisor_version: String,
        device_model: &str,
        cow: bool,
    ) -> Fingerprint {
        Fingerprint {
            driver: driver.kind().into(),
            image_digest: self.image.manifest.digest.clone(),
            hypervisor_version,
            device_model: device_model.into(),
            machine: Machine {
                memory_mib: self.config.memory_mib,
                vcpus: self.config.vcpus,
                balloon_mib: self.config.balloon_mib,
                cow,
                accel: driver.accel(),
            },
        }
    }
}

/// Figures from priming a substrate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrimeStats {
    pub boot_ms: u64,
    pub dock_ms: u64,
    pub state_bytes: u64,
}

/// The agent's `ready`, with host-side timing.
#[derive(Debug, Clone, Serialize)]
pub struct Ready {
    pub session_id: SessionId,
    /// Guest wall clock right after the identity was applied.
    pub guest_clock_ms: u64,
    /// Host wall clock when `ready` arrived.
    pub host_clock_ms: u64,
    /// Resume + identity + ready, as hostd saw it.
    pub activate_us: u64,
}

/// Something that happened to a running VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VmEvent {
    /// The game reported game over.
    Ended {
        reason: String,
        results: serde_json::Value,
    },
    /// The VM process is gone.
    Exited { status: String },
    /// No heartbeat from the agent for this long.
    Silent { for_ms: u64 },
}

/// What hostd writes next to each VM so that a restarted hostd can find it (and still gate
/// its players: the session's players and ticket key are kept too). The VM folder is mode
/// 0700, so the key is as private as the QMP socket next to it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    pub vm_id: VmId,
    pub image: String,
    pub driver: String,
    pub pid: u32,
    pub game_port: u16,
    pub session_id: Option<SessionId>,
    pub created_ms: u64,
    /// The session's players (empty before activation, and in records of older hostds).
    #[serde(default)]
    pub players: Vec<PlayerId>,
    /// The session's ticket key, hex (empty before activation, and in records of older
    /// hostds: the gateway then refuses the session's players).
    #[serde(default)]
    pub ticket_key: String,
}

impl std::fmt::Debug for VmRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmRecord")
            .field("vm_id", &self.vm_id)
            .field("image", &self.image)
            .field("driver", &self.driver)
            .field("pid", &self.pid)
            .field("game_port", &self.game_port)
            .field("session_id", &self.session_id)
            .field("created_ms", &self.created_ms)
            .field("players", &self.players)
            .field("ticket_key", &"<redacted>")
            .finish()
    }
}

impl VmRecord {
    /// The record of a VM just made by `driver`: no image, session or players yet.
    pub(crate) fn new(vm_id: VmId, driver: &str, pid: u32, game_port: u16) -> Self {
        VmRecord {
            vm_id,
            image: String::new(),
            driver: driver.into(),
            pid,
            game_port,
            session_id: None,
            created_ms: crate::util::now_ms(),
            players: Vec::new(),
            ticket_key: String::new(),
        }
    }

    /// The session this VM now serves: its players and ticket key (hex) for the gateway.
    pub(crate) fn serve(&mut self, session: SessionId, players: Vec<PlayerId>, ticket_key: String) {
        self.session_id = Some(session);
        self.players = players;
        self.ticket_key = ticket_key;
    }

    /// Saves the record in `dir` with its image set to `image`.
    pub(crate) fn save_as(&mut self, image: &str, dir: &Path) -> Result<(), DriverError> {
        self.image = image.to_string();
        self.save(dir).map_err(files::io_err("writing vm.json"))
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join("vm.json")
    }
    pub fn load(dir: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(Self::path(dir)).ok()?).ok()
    }
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join("vm.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).expect("record serialises"),
        )?;
        std::fs::rename(tmp, Self::path(dir))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("starting {what}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP {during}: {message}")]
    Qmp {
        during: &'static str,
        message: String,
    },
    #[error("the guest did not say initialised within {0:?}")]
    BootTimeout(Duration),
    #[error("the guest did not answer ready within {0:?}")]
    ReadyTimeout(Duration),
    #[error("restoring the substrate failed: {0}")]
    Restore(String),
    #[error("the agent refused: {code}: {message}")]
    AgentRefused { code: String, message: String },
    #[error("the agent speaks protocol version {found}, hostd speaks {expected}")]
    AgentVersion { found: u32, expected: u32 },
    #[error("the VM exited: {0}")]
    Exited(String),
    #[error("the game server exited ({status}){}", last_lines(stderr))]
    GameExited { status: String, stderr: Vec<String> },
    #[error(transparent)]
    Substrate(#[from] SubstrateError),
    #[error("not supported by this driver: {0}")]
    Unsupported(&'static str),
    #[error("live migration failed: {0}")]
    Migration(String),
    #[error(
        "images.{image}.balloon_mib = {target_mib} starves the guest: it gives memory back only \
         down to {kept_mib} MiB (what its kernel, agent and game hold once initialised), and \
         clones would run out of memory; set balloon_mib above {kept_mib}, with room for a \
         session, or remove it"
    )]
    BalloonStarves {
        image: String,
        target_mib: u32,
        kept_mib: u64,
    },
}

impl DriverError {
    /// A short stable discriminant: error code and metric label.
    pub fn code(&self) -> &'static str {
        match self {
            DriverError::Spawn { .. } => "spawn_failed",
            DriverError::Io { .. } => "io",
            DriverError::Qmp { .. } => "qmp",
            DriverError::BootTimeout(_) => "boot_timeout",
            DriverError::ReadyTimeout(_) => "ready_timeout",
            DriverError::Restore(_) => "restore_failed",
            DriverError::AgentRefused { .. } => "agent_refused",
            DriverError::AgentVersion { .. } => "agent_version",
            DriverError::Exited(_) => "vm_exited",
            DriverError::GameExited { .. } => "game_crashed",
            DriverError::Substrate(e) => e.code(),
            DriverError::Unsupported(_) => "unsupported",
            DriverError::Migration(_) => "migration_failed",
            DriverError::BalloonStarves { .. } => "balloon_starves",
        }
    }

    /// True when the substrate itself is suspect and must be primed again.
    pub fn substrate_suspect(&self) -> bool {
        matches!(self, DriverError::Restore(_) | DriverError::Substrate(_))
    }
}

/// How long a guest may give no memory back before its balloon counts as stuck.
const BALLOON_STALL: Duration = Duration::from_secs(3);

/// Waits until a template ballooned down to `target_mib` is there, reading its memory (MiB)
/// with `memory` every `poll`. This is where the floor of `balloon_mib` is measured: a guest
/// stops giving memory back when what is left is what its kernel, agent and game need, so a
/// balloon that stops above its target (no progress for [`BALLOON_STALL`], or not there by
/// `limit`) would dock a guest with no memory to spare, and its clones would die out of memory
/// once they start a session. That is refused ([`DriverError::BalloonStarves`]) instead.
pub(crate) async fn balloon_reached<F, Fut>(
    image: &str,
    target_mib: u32,
    poll: Duration,
    limit: Duration,
    mut memory: F,
) -> Result<(), DriverError>
where
    F: FnMut() -> Fut + Send,
    Fut: std::future::Future<Output = Result<u64, DriverError>> + Send,
{
    let deadline = tokio::time::Instant::now() + limit;
    let (mut least, mut moved) = (u64::MAX, tokio::time::Instant::now());
    loop {
        let now = memory().await?;
        if now <= u64::from(target_mib) + 1 {
            return Ok(());
        }
        if now < least {
            (least, moved) = (now, tokio::time::Instant::now());
        }
        if moved.elapsed() >= BALLOON_STALL || tokio::time::Instant::now() >= deadline {
            return Err(DriverError::BalloonStarves {
                image: image.to_owned(),
                target_mib,
                kept_mib: least,
            });
        }
        tokio::time::sleep(poll).await;
    }
}

/// A game's last stderr lines for an error message: `: line; line; …` (at most three).
fn last_lines(stderr: &[String]) -> String {
    let tail: Vec<&str> = stderr
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(String::as_str)
        .collect();
    if tail.is_empty() {
        String::new()
    } else {
        format!(": {}", tail.join("; "))
    }
}

/// What one live migration took, as the source's hypervisor measured it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Migrated {
    /// From the start to the VM running on the peer.
    pub total_ms: u64,
    /// How long the VM was paused.
    pub downtime_ms: u64,
    /// Bytes of RAM (and device state) sent.
    pub sent_bytes: u64,
}

/// One hypervisor backend.
#[async_trait]
pub trait VmDriver: Send + Sync + 'static {
    /// `qemu` or `xen`.
    fn kind(&self) -> &'static str;
    /// The accelerator in use (`tcg`, `kvm`, `xen`, ...), reported by hostd and benchmarks.
    fn accel(&self) -> String;
    /// The header fields a substrate of `spec` made by this driver here must carry.
    fn fingerprint(&self, spec: &VmSpec) -> Fingerprint;
    /// Cold-boots the image, waits for `initialised` and docks it into `dir`; no process remains.
    async fn prime(
        &self,
        spec: &VmSpec,
        dir: &Path,
        boot_timeout: Duration,
    ) -> Result<PrimeStats, DriverError>;
    /// Adds to a substrate shipped from a peer into `dir` (its header, state and RAM files)
    /// the files this host derives from its own copy of the image rather than receive (QEMU:
    /// the blank disk overlay, whose backing path is this host's, and the kernel header). The
    /// image is the same: the header's image digest was checked before.
    fn localise(&self, spec: &VmSpec, dir: &Path) -> Result<(), DriverError> {
        let _ = (spec, dir);
        Ok(())
    }
    /// Restores a clone of `substrate` into `vm_dir`, left paused and waiting for identity.
    async fn restore(
        &self,
        spec: &VmSpec,
        substrate: &Substrate,
        vm_id: VmId,
        vm_dir: &Path,
    ) -> Result<Box<dyn Vm>, DriverError>;
    /// Cold-boots a VM from the image (the template baseline), waiting for `initialised`.
    async fn cold_boot(
        &self,
        spec: &VmSpec,
        vm_id: VmId,
        vm_dir: &Path,
        boot_timeout: Duration,
    ) -> Result<Box<dyn Vm>, DriverError>;
    /// Re-attaches to a VM described by `record` in `vm_dir`, left by an earlier hostd.
    async fn adopt(&self, record: &VmRecord, vm_dir: &Path) -> Result<Box<dyn Vm>, DriverError>;
    /// Starts a clone of `substrate` in `vm_dir` that waits on `listen` (TCP) for a live VM a
    /// peer host migrates here with [`Vm::send_to`]; returned as soon as it listens.
    /// [`Vm::finish_receive`] then waits for the VM to be in and runs it.
    async fn receive(
        &self,
        _spec: &VmSpec,
        _substrate: &Substrate,
        _vm_id: VmId,
        _vm_dir: &Path,
        _listen: SocketAddr,
    ) -> Result<Box<dyn Vm>, DriverError> {
        Err(DriverError::Unsupported("live migration"))
    }
    /// VMs of this driver still alive on the host, described for a person (the selftest's
    /// "nothing left" check). By default: processes whose command line names `state_dir`.
    async fn leftovers(&self, state_dir: &Path) -> Vec<String> {
        crate::util::processes_naming(state_dir)
            .into_iter()
            .map(|pid| format!("process {pid}: {}", crate::util::pid_cmdline(pid).join(" ")))
            .collect()
    }
}

/// A VM with one owner.
#[async_trait]
pub trait Vm: Send {
    fn id(&self) -> &VmId;
    /// Where the game server's port is reachable from this host.
    fn game_addr(&self) -> SocketAddr;
    /// The hypervisor process (QEMU) or domain id (Xen).
    fn pid(&self) -> u32;
    fn dir(&self) -> &Path;
    /// Resumes the VM if paused, injects `identity` and waits for the agent's `ready`.
    async fn activate(
        &mut self,
        identity: Identity,
        timeout: Duration,
    ) -> Result<Ready, DriverError>;
    /// For a paused clone of the warm tier: runs the guest's activation paths once without
    /// activating it, then pauses it again (see `HostToGuest::Prewarm`). Drivers without the
    /// need keep the default, which does nothing.
    async fn prewarm(&mut self, _timeout: Duration) -> Result<(), DriverError> {
        Ok(())
    }
    /// Live-migrates this running VM to a peer's [`VmDriver::receive`] listening at `to`,
    /// pausing it for about `downtime` at most, within `timeout` in all. `Ok`: the VM is
    /// stopped here for good (its owner destroys it; the peer runs it). `Err`: it runs on here
    /// as before.
    async fn send_to(
        &mut self,
        _to: SocketAddr,
        _downtime: Duration,
        _timeout: Duration,
    ) -> Result<Migrated, DriverError> {
        Err(DriverError::Unsupported("live migration"))
    }
    /// For a VM from [`VmDriver::receive`]: waits (within `timeout`) until the migrated VM is
    /// in, runs it, sets its clock, and serves `session` (its players and ticket key, for the
    /// gateway and a later adoption). `Err`: the owner destroys it.
    async fn finish_receive(
        &mut self,
        _session: (SessionId, Vec<PlayerId>, String),
        _timeout: Duration,
    ) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("live migration"))
    }
    /// Waits for the next thing that ends or breaks this VM. Heartbeats are consumed inside;
    /// after activation, `silence` without one yields [`VmEvent::Silent`].
    async fn event(&mut self, silence: Duration) -> VmEvent;
    /// Stops the VM and removes everything it had: process, sockets, overlay, folder.
    async fn destroy(self: Box<Self>);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_balloon_that_stops_above_its_target_is_refused_naming_the_key() {
        let poll = Duration::from_millis(100);
        let limit = Duration::from_secs(20);
        // A guest that gives its memory back in steps reaches the target.
        let mut steps = [128u64, 110, 96].into_iter();
        let reached = balloon_reached("arena", 96, poll, limit, || {
            let next = steps.next().unwrap_or(96);
            async move { Ok(next) }
        });
        reached.await.expect("reached");
        // One that stops at 83 MiB (the arena's guest, measured) is refused.
        let started = tokio::time::Instant::now();
        let mut steps = [128u64, 83].into_iter();
        let e = balloon_reached("arena", 64, poll, limit, || {
            let next = steps.next().unwrap_or(83);
            async move { Ok(next) }
        })
        .await
        .expect_err("stuck at 83");
        assert_eq!(e.code(), "balloon_starves");
        let message = e.to_string();
        assert!(
            message.contains("images.arena.balloon_mib = 64"),
            "{message}"
        );
        assert!(message.contains("only down to 83 MiB"), "{message}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "no progress for 3 s ends it"
        );
    }

    #[test]
    fn records_of_older_hostds_still_load_and_keys_stay_out_of_logs() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A record as an earlier hostd wrote it: no players, no ticket key.
        std::fs::write(
            VmRecord::path(dir.path()),
            r#"{"vm_id":"vm-1","image":"arena","driver":"qemu","pid":7,"game_port":4000,
                "session_id":"s1","created_ms":1}"#,
        )
        .expect("write");
        let old = VmRecord::load(dir.path()).expect("an old record loads");
        assert!(old.players.is_empty() && old.ticket_key.is_empty());
        let new = VmRecord {
            players: vec![PlayerId::new("alice").expect("valid")],
            ticket_key: "00ff".repeat(8),
            ..old
        };
        new.save(dir.path()).expect("save");
        assert_eq!(VmRecord::load(dir.path()), Some(new.clone()));
        assert!(!format!("{new:?}").contains("00ff"), "the key is redacted");
    }
}
