//! The substrate pool of one host: per image a docked substrate and `warm` paused clones; the
//! active VMs; activation by session id; destroy; health; background refill; adoption of the
//! VMs an earlier hostd left running; and, for the gateway, each active session's [`Gate`]
//! (game address, players and ticket key, kept in the VM's record so adopted VMs keep theirs).
//!
//! Ownership: the pool's `State` sits behind a std `Mutex` that is never held across an
//! `.await`. Every active VM is owned by exactly one task (`vm`) that waits on its events
//! and is the only place it is destroyed; the pool talks to it over an `mpsc` channel.
//! Priming and warm refills run in one background task (`refill`), so at most one VM boots at
//! a time.
//!
//! This module holds the pool's types, its books and its queries; the work lives beside it:
//! `activate` (idempotent activation), `refill` (priming and the warm tier, its choice a pure
//! function), `fetch` (docking a substrate shipped from a peer instead of priming it, see [`crate::ship`]),
//! `health` (checking a substrate whose clones fail, discarding a damaged one),
//! `vm` (the task owning each active VM) and `adopt` (VMs left by an earlier hostd).

mod activate;
mod adopt;
mod fetch;
mod health;
mod migrate;
mod refill;
#[cfg(test)]
pub(crate) mod tests;
mod vm;

use crate::config::HostdConfig;
use crate::driver::{DriverError, Migrated, PrimeStats, Vm, VmDriver, VmSpec};
use crate::image::Image;
use crate::outbox::Outbox;
use crate::substrate::Substrate;
use crate::util::{disk_usage, random_u64};
use berth_protocol::host::HostMessage;
use berth_protocol::{ErrorCode, PlayerId, SessionId, SubstrateState, VmId};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify, OnceCell};
use tokio::time::Instant;

/// What a caller asks for.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivateRequest {
    pub session_id: SessionId,
    pub image: String,
    #[serde(default)]
    pub players: Vec<PlayerId>,
    #[serde(default)]
    pub teams: Vec<Vec<PlayerId>>,
    #[serde(default)]
    pub params: serde_json::Value,
    /// The session's ticket key, hex (at most [`MAX_TICKET_KEY`] bytes); generated when empty.
    #[serde(default)]
    pub ticket_key: String,
    /// When the session must be over (ms since the epoch), for the game; 0: no deadline.
    #[serde(default)]
    pub deadline_ms: u64,
}

impl std::fmt::Debug for ActivateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivateRequest")
            .field("session_id", &self.session_id)
            .field("image", &self.image)
            .field("players", &self.players)
            .field("teams", &self.teams)
            .field("params", &self.params)
            .field("ticket_key", &"<redacted>")
            .field("deadline_ms", &self.deadline_ms)
            .finish()
    }
}

/// The longest ticket key an activation may carry (bytes).
pub const MAX_TICKET_KEY: usize = 128;

impl ActivateRequest {
    /// The raw ticket key; `None` when `ticket_key` is not usable hex.
    fn key(&self) -> Option<Vec<u8>> {
        hex::decode(&self.ticket_key)
            .ok()
            .filter(|k| !k.is_empty() && k.len() <= MAX_TICKET_KEY)
    }
}

/// What the gateway needs to let a player into an active session (see [`Pool::gate`]). It
/// carries the session's key, so it is never serialised and its `Debug` hides the key.
#[derive(Clone)]
pub struct Gate {
    pub vm_id: VmId,
    /// Where the game server listens (from this host).
    pub game_addr: SocketAddr,
    /// The session's ticket key, raw bytes (the activation's `ticket_key`, hex-decoded).
    pub key: Vec<u8>,
    pub players: Vec<PlayerId>,
    /// The game's framing and limits (its image's `manifest.json`).
    pub game: crate::manifest::GameRuntime,
    /// Turns `true` when the VM starts to go (game over, destroy, failure, shutdown, moved to
    /// another host); the sender is dropped once it is gone.
    pub ending: watch::Receiver<bool>,
    /// Set before `ending` turns when the VM went because it moved to another host.
    pub moved: Arc<std::sync::atomic::AtomicBool>,
}

impl Gate {
    /// Resolves once the session's VM is ending or gone.
    pub async fn ended(&mut self) {
        let _ = self.ending.wait_for(|ending| *ending).await;
    }

    /// True when the session's VM went because it moved to another host.
    pub fn moved(&self) -> bool {
        self.moved.load(std::sync::atomic::Ordering::Acquire)
    }

    /// True once the session's VM is ending or gone.
    pub fn is_ending(&self) -> bool {
        *self.ending.borrow() || self.ending.has_changed().is_err()
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("vm_id", &self.vm_id)
            .field("game_addr", &self.game_addr)
            .field("key", &"<redacted>")
            .field("players", &self.players)
            .finish()
    }
}

/// How a VM was activated: `warm`, `substrate` or `adopted` here.
pub use berth_protocol::ActivationPath;
pub use migrate::Incoming;

/// An active VM as the pool reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub vm_id: VmId,
    pub image: String,
    pub session_id: SessionId,
    pub game_addr: SocketAddr,
    pub pid: u32,
    pub path: ActivationPath,
    pub activated_ms: u64,
    /// Pool-side activation time: warm pick or restore, plus resume, identity and `ready`.
    pub activate_us: u64,
    /// Guest wall clock minus host wall clock at `ready` (ms; small when the clock was set).
    pub clock_skew_ms: i64,
}

impl VmInfo {
    /// What `vm`, serving `req`'s session by `path` since `t0`, is now.
    fn of(
        vm: &dyn Vm,
        req: &ActivateRequest,
        path: ActivationPath,
        t0: std::time::Instant,
        skew_ms: i64,
    ) -> Self {
        VmInfo {
            vm_id: vm.id().clone(),
            image: req.image.clone(),
            session_id: req.session_id.clone(),
            game_addr: vm.game_addr(),
            pid: vm.pid(),
            path,
            activated_ms: crate::util::now_ms(),
            activate_us: t0.elapsed().as_micros() as u64,
            clock_skew_ms: skew_ms,
        }
    }
}

/// Why an activation or command failed. Cloneable: concurrent callers for one session share it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PoolError {
    #[error("no image named {image:?} on this host")]
    UnknownImage { image: String },
    #[error("this host runs its maximum of {max} VMs")]
    AtCapacity { max: u32 },
    #[error("image {image} has no docked substrate yet ({state})")]
    NotDocked { image: String, state: String },
    #[error("no VM or session {id:?} on this host")]
    Unknown { id: String },
    #[error("bad activation request: {message}")]
    BadRequest { message: String },
    #[error("activation failed: {code}: {message}")]
    Driver { code: String, message: String },
    #[error("hostd is shutting down")]
    ShuttingDown,
    #[error("this host is draining: it takes no new sessions")]
    Draining,
}

impl PoolError {
    /// The stable code callers see (`activate_failed.code`, the control API's error body).
    pub fn code(&self) -> ErrorCode {
        match self {
            PoolError::UnknownImage { .. } => ErrorCode::UnknownImage,
            PoolError::AtCapacity { .. } => ErrorCode::AtCapacity,
            PoolError::NotDocked { .. } => ErrorCode::NotDocked,
            PoolError::Unknown { .. } => ErrorCode::UnknownVm,
            PoolError::BadRequest { .. } => ErrorCode::BadRequest,
            PoolError::Driver { .. } => ErrorCode::ActivationFailed,
            PoolError::ShuttingDown => ErrorCode::ShuttingDown,
            PoolError::Draining => ErrorCode::Draining,
        }
    }
}

impl From<DriverError> for PoolError {
    fn from(e: DriverError) -> Self {
        PoolError::Driver {
            code: e.code().into(),
            message: e.to_string(),
        }
    }
}

/// What happened in the pool; the server issue forwards these upstream.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PoolEvent {
    Docked {
        image: String,
        prime: PrimeStats,
    },
    PrimeFailed {
        image: String,
        code: String,
        message: String,
    },
    /// A substrate was shipped from the peer at `from` and docked: nothing was booted.
    Shipped {
        image: String,
        from: String,
        /// From asking the server to docked, checks included.
        fetch_ms: u64,
        /// Bytes received (zero runs travel as a few bytes).
        bytes: u64,
    },
    /// A shipped substrate was refused (`code`: see [`crate::ship::ShipError::code`]) or could
    /// not be fetched: the image is primed instead.
    ShipRefused {
        image: String,
        code: String,
        message: String,
    },
    /// A docked substrate was found damaged or could not be restored: it is primed again.
    SubstrateDiscarded {
        image: String,
        code: String,
        reason: String,
    },
    Activated {
        vm: VmInfo,
    },
    Ended {
        vm_id: VmId,
        session_id: SessionId,
        reason: String,
        results: serde_json::Value,
    },
    Failed {
        vm_id: VmId,
        session_id: SessionId,
        code: String,
        reason: String,
    },
    Destroyed {
        vm_id: VmId,
        session_id: SessionId,
    },
    /// The session's VM moved to a peer host running ([`Pool::send`]); its slot here is free.
    MigratedOut {
        vm_id: VmId,
        session_id: SessionId,
        migrated: Migrated,
    },
    /// A session's VM moved here running from a peer host ([`Incoming::finish`]).
    MigratedIn {
        vm: VmInfo,
    },
    /// The pool takes no new sessions ([`Pool::drain`]).
    Draining,
}

impl PoolEvent {
    /// The report the server must hear of this event (`ended`, `failed`); it is kept in the
    /// outbox until the server acknowledges it.
    pub fn report(&self) -> Option<HostMessage> {
        match self.clone() {
            PoolEvent::Ended {
                vm_id,
                session_id,
                reason,
                results,
            } => Some(HostMessage::Ended {
                session: session_id,
                vm: vm_id,
                reason,
                results,
            }),
            PoolEvent::Failed {
                vm_id,
                session_id,
                code,
                reason,
            } => Some(HostMessage::Failed {
                session: session_id,
                vm: vm_id,
                code,
                reason,
            }),
            _ => None,
        }
    }
}

/// A VM failure kept for `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub vm_id: VmId,
    pub session_id: SessionId,
    pub code: String,
    pub reason: String,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageStatus {
    pub name: String,
    pub substrate: SubstrateState,
    pub substrate_error: Option<String>,
    pub warm: u32,
    pub warm_target: u32,
    pub active: u32,
    pub prime_ms: Option<u64>,
    /// Bytes the substrate really occupies in the state folder (RAM file is sparse).
    pub substrate_bytes: u64,
    /// Docked substrates of this image discarded and primed again since hostd started, by
    /// reason: `substrate_damaged` (its RAM file's content changed: found at start-up or when
    /// clones kept failing), `restore_failed` (a clone could not restore it),
    /// `substrate_corrupt` / `substrate_mismatch` (found at start-up).
    #[serde(default)]
    pub reprimes: std::collections::BTreeMap<String, u64>,
    /// The docked substrate's fingerprint key ([`crate::substrate::Fingerprint::key`]).
    #[serde(default)]
    pub fingerprint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub host_id: String,
    /// The region and zone this host declares (`region`, `zone` in its config).
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
    pub driver: String,
    pub accel: String,
    pub max_vms: u32,
    pub images: Vec<ImageStatus>,
    pub vms: Vec<VmInfo>,
    pub failures: Vec<Failure>,
    pub activations: u64,
    /// Taking no new sessions (see [`Pool::drain`]).
    #[serde(default)]
    pub draining: bool,
    /// Where this host serves its substrates to peers (`[peer]`); None: it serves none.
    #[serde(default)]
    pub peer: Option<String>,
}

/// Where an image's substrate is, with what each state needs.
enum Phase {
    Missing,
    Priming,
    Docked(Box<Substrate>),
    Failed { message: String, at: Instant },
}

impl Phase {
    fn state(&self) -> SubstrateState {
        match self {
            Phase::Missing => SubstrateState::Missing,
            Phase::Priming => SubstrateState::Priming,
            Phase::Docked(_) => SubstrateState::Docked,
            Phase::Failed { .. } => SubstrateState::Failed,
        }
    }
}

struct ImageSlot {
    substrate: Phase,
    warm: Vec<Box<dyn Vm>>,
    health: health::Health,
}

enum VmCommand {
    Destroy(oneshot::Sender<()>),
    /// Live-migrate to a peer's receiving VM at this address.
    Migrate {
        to: SocketAddr,
        reply: oneshot::Sender<Result<Migrated, DriverError>>,
    },
}

struct Active {
    info: VmInfo,
    cmd: mpsc::Sender<VmCommand>,
    keys: SessionKeys,
    ending: watch::Receiver<bool>,
    moved: Arc<std::sync::atomic::AtomicBool>,
}

/// An active session's players and raw ticket key (empty for a VM adopted from a record
/// that had none: nobody can join it through the gateway).
struct SessionKeys {
    key: Vec<u8>,
    players: Vec<PlayerId>,
}

type SessionCell = Arc<OnceCell<Result<VmInfo, PoolError>>>;

struct State {
    images: HashMap<String, ImageSlot>,
    active: HashMap<VmId, Active>,
    sessions: HashMap<SessionId, SessionCell>,
    failures: VecDeque<Failure>,
    activations: u64,
    activating: u32,
}

struct Inner {
    config: HostdConfig,
    driver: Arc<dyn VmDriver>,
    specs: HashMap<String, VmSpec>,
    state: Mutex<State>,
    events: broadcast::Sender<PoolEvent>,
    wake: Notify,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Reports of gone VMs until the server acknowledges them (the link removes them).
    outbox: Outbox,
    /// No new sessions (see [`Pool::drain`]).
    draining: std::sync::atomic::AtomicBool,
    /// What this host asks peers for and the grants it holds (see [`crate::ship`]).
    ship: crate::ship::Ship,
}

/// The pool; cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("host_id", &self.inner.config.host_id)
            .finish()
    }
}

fn new_vm_id() -> VmId {
    VmId::new(format!("vm-{:016x}", random_u64())).expect("generated id is valid")
}

impl Pool {
    /// Loads the images, checks docked substrates, adopts or cleans leftover VMs and starts the
    /// refill task.
    pub async fn start(config: HostdConfig, driver: Arc<dyn VmDriver>) -> anyhow::Result<Self> {
        config.validate()?;
        let mut specs = HashMap::new();
        for ic in &config.images {
            let image = Image::load(&ic.dir)?;
            specs.insert(
                ic.name.clone(),
                VmSpec {
                    image,
                    config: ic.clone(),
                },
            );
        }
        let substrates = config.state_dir.join("substrates");
        let vms = config.state_dir.join("vms");
        std::fs::create_dir_all(&substrates)?;
        std::fs::create_dir_all(&vms)?;
        let mut images = HashMap::new();
        for (name, spec) in &specs {
            let dir = substrates.join(name);
            let mut health = health::Health::default();
            let substrate = match health::open_substrate(dir.clone(), driver.fingerprint(spec))
                .await
            {
                Ok(s) => {
                    tracing::info!(image = %name, "reusing docked substrate (its content checked)");
                    Phase::Docked(Box::new(s))
                }
                Err(e) => {
                    if !matches!(e, crate::substrate::SubstrateError::Missing(_)) {
                        tracing::warn!(image = %name, code = e.code(), error = %e, "substrate unusable; re-priming");
                        health.reprimes.insert(e.code().to_owned(), 1);
                    }
                    let _ = std::fs::remove_dir_all(&dir);
                    Phase::Missing
                }
            };
            let warm = Vec::new();
            images.insert(
                name.clone(),
                ImageSlot {
                    substrate,
                    warm,
                    health,
                },
            );
        }
        // Substrates of images no longer configured.
        for entry in std::fs::read_dir(&substrates)?.filter_map(Result::ok) {
            if !specs.contains_key(entry.file_name().to_string_lossy().as_ref()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let (events, _) = broadcast::channel(1024);
        let (shutdown, _) = watch::channel(false);
        let outbox = Outbox::new(&config.state_dir);
        let pool = Pool {
            inner: Arc::new(Inner {
                outbox,
                draining: Default::default(),
                ship: Default::default(),
                config,
                driver,
                specs,
                state: Mutex::new(State {
                    images,
                    active: HashMap::new(),
                    sessions: HashMap::new(),
                    failures: VecDeque::new(),
                    activations: 0,
                    activating: 0,
                }),
                events,
                wake: Notify::new(),
                shutdown,
                tasks: Mutex::new(Vec::new()),
            }),
        };
        pool.adopt_leftovers().await;
        pool.spawn(pool.clone().refill_task());
        Ok(pool)
    }

    /// Runs `task` in the background; [`Pool::shutdown`] waits for it.
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(task));
    }

    /// The shipping books (see [`crate::ship`]).
    pub fn ship(&self) -> &crate::ship::Ship {
        &self.inner.ship
    }

    /// `image`'s docked substrate, if it has one.
    pub fn docked(&self, image: &str) -> Option<Substrate> {
        match &self.state().images.get(image)?.substrate {
            Phase::Docked(s) => Some((**s).clone()),
            _ => None,
        }
    }

    /// The reports of gone VMs the server has not acknowledged yet.
    pub fn outbox(&self) -> &Outbox {
        &self.inner.outbox
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config(&self) -> &HostdConfig {
        &self.inner.config
    }

    pub fn driver(&self) -> &Arc<dyn VmDriver> {
        &self.inner.driver
    }

    pub fn subscribe(&self) -> broadcast::Receiver<PoolEvent> {
        self.inner.events.subscribe()
    }

    fn emit(&self, e: PoolEvent) {
        let _ = self.inner.events.send(e);
    }

    /// The spec of `image`, or `unknown_image`.
    fn spec(&self, image: &str) -> Result<&VmSpec, PoolError> {
        self.inner
            .specs
            .get(image)
            .ok_or_else(|| PoolError::UnknownImage {
                image: image.to_owned(),
            })
    }

    /// The docked substrate of `image` to clone, or why there is none (`not_docked`,
    /// `unknown_image`).
    fn substrate_of(&self, image: &str) -> Result<Box<Substrate>, PoolError> {
        match &self.state().images.get(image).map(|s| &s.substrate) {
            Some(Phase::Docked(s)) => Ok(s.clone()),
            Some(other) => Err(PoolError::NotDocked {
                image: image.to_owned(),
                state: other.state().as_str().into(),
            }),
            None => Err(PoolError::UnknownImage {
                image: image.to_owned(),
            }),
        }
    }

    fn vm_dir(&self, vm_id: &VmId) -> PathBuf {
        self.inner.config.state_dir.join("vms").join(vm_id.as_str())
    }

    fn substrate_dir(&self, image: &str) -> PathBuf {
        self.inner.config.state_dir.join("substrates").join(image)
    }

    /// What the gateway needs to admit players to `session`: its active VM's game address,
    /// ticket key and players. `None` when no active VM serves it, when it is ending, or when
    /// it has no key (adopted from a record without one).
    pub fn gate(&self, session: &SessionId) -> Option<Gate> {
        let st = self.state();
        let a = st.active.values().find(|a| &a.info.session_id == session)?;
        let gate = Gate {
            vm_id: a.info.vm_id.clone(),
            game_addr: a.info.game_addr,
            key: a.keys.key.clone(),
            players: a.keys.players.clone(),
            game: self
                .inner
                .specs
                .get(&a.info.image)
                .map(|s| s.image.manifest.game.clone())
                .unwrap_or_default(),
            ending: a.ending.clone(),
            moved: a.moved.clone(),
        };
        (!gate.key.is_empty() && !gate.is_ending()).then_some(gate)
    }

    /// Destroys the VM with this id or session id and waits until it is gone.
    pub async fn destroy(&self, id: &str) -> Result<(), PoolError> {
        let cmd = {
            let st = self.state();
            st.active
                .values()
                .find(|a| a.info.vm_id.as_str() == id || a.info.session_id.as_str() == id)
                .map(|a| a.cmd.clone())
        };
        let cmd = cmd.ok_or_else(|| PoolError::Unknown { id: id.to_string() })?;
        let (tx, rx) = oneshot::channel();
        if cmd.send(VmCommand::Destroy(tx)).await.is_ok() {
            let _ = rx.await;
        }
        Ok(())
    }

    /// The last `max` bytes of an active VM's console — the guest's and its game server's
    /// output (`id`: a VM id or a session id). Empty when the driver keeps no console file.
    pub fn output(&self, id: &str, max: u64) -> Result<String, PoolError> {
        let vm_id = {
            let st = self.state();
            st.active
                .values()
                .find(|a| a.info.vm_id.as_str() == id || a.info.session_id.as_str() == id)
                .map(|a| a.info.vm_id.clone())
        };
        let vm_id = vm_id.ok_or_else(|| PoolError::Unknown { id: id.to_string() })?;
        Ok(tail(&self.vm_dir(&vm_id).join("console.log"), max))
    }

    pub fn status(&self) -> Status {
        let st = self.state();
        let mut images: Vec<ImageStatus> = self
            .inner
            .specs
            .iter()
            .map(|(name, spec)| {
                let slot = st.images.get(name);
                let docked = match slot.map(|s| &s.substrate) {
                    Some(Phase::Docked(s)) => Some(s.header.fingerprint.key()),
                    _ => None,
                };
                let (substrate, err, prime_ms) = match slot.map(|s| &s.substrate) {
                    Some(Phase::Docked(s)) => {
                        (SubstrateState::Docked, None, Some(s.header.prime_ms))
                    }
                    Some(Phase::Failed { message, .. }) => {
                        (SubstrateState::Failed, Some(message.clone()), None)
                    }
                    Some(other) => (other.state(), None, None),
                    None => (SubstrateState::Missing, None, None),
                };
                ImageStatus {
                    name: name.clone(),
                    substrate,
                    substrate_error: err,
                    warm: slot.map_or(0, |s| s.warm.len() as u32),
                    warm_target: spec.config.warm,
                    active: st.active.values().filter(|a| &a.info.image == name).count() as u32,
                    prime_ms,
                    substrate_bytes: disk_usage(&self.substrate_dir(name)),
                    reprimes: slot.map(|s| s.health.reprimes.clone()).unwrap_or_default(),
                    fingerprint: docked,
                }
            })
            .collect();
        images.sort_by(|a, b| a.name.cmp(&b.name));
        let mut vms: Vec<VmInfo> = st.active.values().map(|a| a.info.clone()).collect();
        vms.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        Status {
            host_id: self.inner.config.host_id.clone(),
            region: self.inner.config.region.clone(),
            zone: self.inner.config.zone.clone(),
            driver: self.inner.driver.kind().into(),
            accel: self.inner.driver.accel(),
            max_vms: self.inner.config.max_vms,
            images,
            vms,
            failures: st.failures.iter().cloned().collect(),
            activations: st.activations,
            draining: self.is_draining(),
            peer: self.inner.ship.url(),
        }
    }

    /// Takes no new sessions from now on (an activation of a session that has a VM still
    /// answers with it); announced as [`PoolEvent::Draining`]. Live VMs run on to their end.
    pub fn drain(&self) {
        use std::sync::atomic::Ordering;
        if !self.inner.draining.swap(true, Ordering::SeqCst) {
            tracing::info!("draining: no new sessions");
            let _ = self.inner.events.send(PoolEvent::Draining);
        }
    }

    pub fn is_draining(&self) -> bool {
        self.inner
            .draining
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until `image` is docked with at least `warm` clones ready, or fails with what the
    /// pool reported.
    pub async fn wait_ready(
        &self,
        image: &str,
        warm: u32,
        timeout: Duration,
    ) -> Result<(), PoolError> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let st = self.state();
                let slot = st
                    .images
                    .get(image)
                    .ok_or_else(|| PoolError::UnknownImage {
                        image: image.into(),
                    })?;
                match &slot.substrate {
                    Phase::Docked(_) if slot.warm.len() as u32 >= warm => return Ok(()),
                    Phase::Failed { message, .. } => {
                        return Err(PoolError::NotDocked {
                            image: image.into(),
                            state: format!("failed: {message}"),
                        })
                    }
                    _ => {}
                }
            }
            if Instant::now() > deadline {
                let state = self
                    .status()
                    .images
                    .into_iter()
                    .find(|i| i.name == image)
                    .map(|i| i.substrate);
                return Err(PoolError::NotDocked {
                    image: image.into(),
                    state: format!("still {}", state.map(|s| s.as_str()).unwrap_or_default()),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Destroys every VM and warm clone; removes substrates unless `keep_substrates`.
    pub async fn shutdown(&self) {
        // `send_replace`: the refill task may not have subscribed yet, and `send` would then
        // leave the flag unset (the task would never stop).
        self.inner.shutdown.send_replace(true);
        self.inner.wake.notify_waiters();
        let tasks: Vec<_> =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
        let ids: Vec<String> = self.state().active.keys().map(|k| k.to_string()).collect();
        for id in ids {
            let _ = self.destroy(&id).await;
        }
        let warm: Vec<Box<dyn Vm>> = self
            .state()
            .images
            .values_mut()
            .flat_map(|s| s.warm.drain(..))
            .collect();
        for vm in warm {
            vm.destroy().await;
        }
        let dir = &self.inner.config.state_dir;
        let _ = std::fs::remove_dir_all(dir.join("vms"));
        self.inner.outbox.tidy();
        if !self.inner.config.keep_substrates {
            let _ = std::fs::remove_dir_all(dir.join("substrates"));
            let _ = std::fs::remove_file(dir.join("accel-probe.json"));
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The last `max` bytes of the file at `path` (lossy UTF-8); empty when it cannot be read.
fn tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut bytes = Vec::new();
    let _ = f.take(max).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}
