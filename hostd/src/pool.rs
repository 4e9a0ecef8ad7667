//! The substrate pool of one host: per image a docked substrate and `warm` paused clones; the
//! active VMs; activation by session id; destroy; health; background refill; adoption of the
//! VMs an earlier hostd left running; and, for the gateway, each active session's [`Gate`]
//! (game address, players and ticket key, kept in the VM's record so adopted VMs keep theirs).
//!
//! Ownership: the pool's [`State`] sits behind a std `Mutex` that is never held across an
//! `.await`. Every active VM is owned by exactly one task ([`vm_task`]) that waits on its events
//! and is the only place it is destroyed; the pool talks to it over an `mpsc` channel.
//! Priming and warm refills run in one background task, so at most one VM boots at a time.

use crate::config::HostdConfig;
use crate::driver::{DriverError, PrimeStats, Vm, VmDriver, VmEvent, VmRecord, VmSpec};
use crate::image::Image;
use crate::substrate::Substrate;
use crate::util::{disk_usage, now_ms, random_u64};
use berth_protocol::guest::Identity;
use berth_protocol::{PlayerId, SessionId, VmId};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify, OnceCell};

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
    /// Turns `true` when the VM starts to go (game over, destroy, failure, shutdown); the
    /// sender is dropped once it is gone.
    pub ending: watch::Receiver<bool>,
}

impl Gate {
    /// Resolves once the session's VM is ending or gone.
    pub async fn ended(&mut self) {
        let _ = self.ending.wait_for(|ending| *ending).await;
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

/// How a VM was activated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationPath {
    /// A warm clone: resume + identity only.
    Warm,
    /// Restored from the docked substrate on demand.
    Substrate,
    /// Found running after a hostd restart.
    Adopted,
}

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
}

impl PoolError {
    pub fn code(&self) -> &'static str {
        match self {
            PoolError::UnknownImage { .. } => "unknown_image",
            PoolError::AtCapacity { .. } => "at_capacity",
            PoolError::NotDocked { .. } => "not_docked",
            PoolError::Unknown { .. } => "unknown_vm",
            PoolError::BadRequest { .. } => "bad_request",
            PoolError::Driver { .. } => "activation_failed",
            PoolError::ShuttingDown => "shutting_down",
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
    /// `missing`, `priming`, `docked` or `failed`.
    pub substrate: String,
    pub substrate_error: Option<String>,
    pub warm: u32,
    pub warm_target: u32,
    pub active: u32,
    pub prime_ms: Option<u64>,
    /// Bytes the substrate really occupies in the state folder (RAM file is sparse).
    pub substrate_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub host_id: String,
    pub driver: String,
    pub accel: String,
    pub max_vms: u32,
    pub images: Vec<ImageStatus>,
    pub vms: Vec<VmInfo>,
    pub failures: Vec<Failure>,
    pub activations: u64,
}

enum SubstrateState {
    Missing,
    Priming,
    Docked(Box<Substrate>),
    Failed { message: String, at: Instant },
}

impl SubstrateState {
    fn name(&self) -> &'static str {
        match self {
            SubstrateState::Missing => "missing",
            SubstrateState::Priming => "priming",
            SubstrateState::Docked(_) => "docked",
            SubstrateState::Failed { .. } => "failed",
        }
    }
}

struct ImageSlot {
    substrate: SubstrateState,
    warm: Vec<Box<dyn Vm>>,
}

enum VmCommand {
    Destroy(oneshot::Sender<()>),
}

struct Active {
    info: VmInfo,
    cmd: mpsc::Sender<VmCommand>,
    keys: SessionKeys,
    ending: watch::Receiver<bool>,
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
            let substrate = match Substrate::open(&dir, &driver.fingerprint(spec)) {
                Ok(s) => {
                    tracing::info!(image = %name, "reusing docked substrate");
                    SubstrateState::Docked(Box::new(s))
                }
                Err(e) => {
                    if !matches!(e, crate::substrate::SubstrateError::Missing(_)) {
                        tracing::warn!(image = %name, code = e.code(), error = %e, "substrate unusable; re-priming");
                    }
                    let _ = std::fs::remove_dir_all(&dir);
                    SubstrateState::Missing
                }
            };
            images.insert(
                name.clone(),
                ImageSlot {
                    substrate,
                    warm: Vec::new(),
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
        let pool = Pool {
            inner: Arc::new(Inner {
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
        let refill = tokio::spawn(refill_task(pool.clone()));
        pool.inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(refill);
        Ok(pool)
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

    fn vm_dir(&self, vm_id: &VmId) -> PathBuf {
        self.inner.config.state_dir.join("vms").join(vm_id.as_str())
    }

    fn substrate_dir(&self, image: &str) -> PathBuf {
        self.inner.config.state_dir.join("substrates").join(image)
    }

    async fn adopt_leftovers(&self) {
        let vms = self.inner.config.state_dir.join("vms");
        let Ok(entries) = std::fs::read_dir(&vms) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let dir = entry.path();
            let Some(record) = VmRecord::load(&dir) else {
                tracing::warn!(dir = %dir.display(), "removing a VM folder without a record");
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            };
            match self.inner.driver.adopt(&record, &dir).await {
                Ok(vm) => match (
                    &record.session_id,
                    self.inner.specs.contains_key(&record.image),
                ) {
                    (Some(session_id), true) => {
                        tracing::info!(vm_id = %record.vm_id, %session_id, "adopted a running VM");
                        let info = VmInfo {
                            vm_id: record.vm_id.clone(),
                            image: record.image.clone(),
                            session_id: session_id.clone(),
                            game_addr: vm.game_addr(),
                            pid: vm.pid(),
                            path: ActivationPath::Adopted,
                            activated_ms: record.created_ms,
                            activate_us: 0,
                            clock_skew_ms: 0,
                        };
                        let cell: SessionCell =
                            Arc::new(OnceCell::new_with(Some(Ok(info.clone()))));
                        self.state().sessions.insert(session_id.clone(), cell);
                        let key = hex::decode(&record.ticket_key).unwrap_or_default();
                        if key.is_empty() {
                            tracing::warn!(vm_id = %record.vm_id, %session_id,
                                "adopted VM has no ticket key on record; the gateway refuses its players");
                        }
                        let keys = SessionKeys {
                            key,
                            players: record.players.clone(),
                        };
                        self.register(vm, info, keys);
                    }
                    _ => {
                        tracing::info!(vm_id = %record.vm_id, "destroying a leftover VM with no session");
                        vm.destroy().await;
                    }
                },
                Err(e) => {
                    tracing::warn!(vm_id = %record.vm_id, error = %e, "leftover VM is gone; cleaning up");
                    crate::util::kill_processes_naming(&dir);
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
    }

    /// Activates a VM for `req.session_id`. The same session id twice returns the same VM
    /// (concurrent callers share one activation).
    pub async fn activate(&self, mut req: ActivateRequest) -> Result<VmInfo, PoolError> {
        if *self.inner.shutdown.borrow() {
            return Err(PoolError::ShuttingDown);
        }
        if req.ticket_key.is_empty() {
            req.ticket_key = (0..4).map(|_| format!("{:016x}", random_u64())).collect();
        } else if req.key().is_none() {
            return Err(PoolError::BadRequest {
                message: format!("ticket_key must be 1 to {MAX_TICKET_KEY} bytes of hex"),
            });
        }
        let cell = self
            .state()
            .sessions
            .entry(req.session_id.clone())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let result = cell
            .get_or_init(|| self.do_activate(req.clone()))
            .await
            .clone();
        if result.is_err() {
            let mut st = self.state();
            if st
                .sessions
                .get(&req.session_id)
                .is_some_and(|c| Arc::ptr_eq(c, &cell))
            {
                st.sessions.remove(&req.session_id);
            }
        }
        result
    }

    async fn do_activate(&self, req: ActivateRequest) -> Result<VmInfo, PoolError> {
        let t0 = Instant::now();
        let spec = self
            .inner
            .specs
            .get(&req.image)
            .ok_or_else(|| PoolError::UnknownImage {
                image: req.image.clone(),
            })?;
        {
            let mut st = self.state();
            let running = st.active.len() as u32 + st.activating;
            if running >= self.inner.config.max_vms {
                return Err(PoolError::AtCapacity {
                    max: self.inner.config.max_vms,
                });
            }
            st.activating += 1;
        }
        let result = self.activate_inner(spec, &req, t0).await;
        self.state().activating -= 1;
        self.inner.wake.notify_one();
        result
    }

    async fn activate_inner(
        &self,
        spec: &VmSpec,
        req: &ActivateRequest,
        t0: Instant,
    ) -> Result<VmInfo, PoolError> {
        let identity = |vm_id: &VmId| Identity {
            session_id: req.session_id.clone(),
            vm_id: vm_id.clone(),
            hostname: format!("berth-{}", vm_id.as_str().trim_start_matches("vm-")),
            players: req.players.clone(),
            teams: req.teams.clone(),
            ticket_key: req.ticket_key.clone(),
            params: req.params.clone(),
            wall_clock_ms: 0,
            rng_seed: random_u64(),
        };
        let ready_timeout = self.inner.config.ready_timeout();
        // Warm first: a paused clone needs only resume + identity.
        let warm = self
            .state()
            .images
            .get_mut(&req.image)
            .and_then(|s| s.warm.pop());
        if let Some(mut vm) = warm {
            let vm_id = vm.id().clone();
            match vm.activate(identity(&vm_id), ready_timeout).await {
                Ok(ready) => return Ok(self.activated(vm, req, ActivationPath::Warm, t0, &ready)),
                Err(e) => {
                    tracing::warn!(%vm_id, error = %e, "warm clone failed to activate; restoring instead");
                    vm.destroy().await;
                }
            }
        }
        let substrate = match &self.state().images.get(&req.image).map(|s| &s.substrate) {
            Some(SubstrateState::Docked(s)) => s.clone(),
            Some(other) => {
                return Err(PoolError::NotDocked {
                    image: req.image.clone(),
                    state: other.name().into(),
                })
            }
            None => {
                return Err(PoolError::UnknownImage {
                    image: req.image.clone(),
                })
            }
        };
        let vm_id = new_vm_id();
        let mut vm = match self
            .inner
            .driver
            .restore(spec, &substrate, vm_id.clone(), &self.vm_dir(&vm_id))
            .await
        {
            Ok(vm) => vm,
            Err(e) => {
                if e.substrate_suspect() {
                    self.discard_substrate(&req.image, &e);
                }
                return Err(e.into());
            }
        };
        match vm.activate(identity(&vm_id), ready_timeout).await {
            Ok(ready) => Ok(self.activated(vm, req, ActivationPath::Substrate, t0, &ready)),
            Err(e) => {
                vm.destroy().await;
                Err(e.into())
            }
        }
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

    fn discard_substrate(&self, image: &str, e: &DriverError) {
        tracing::warn!(image, error = %e, "substrate failed to restore; re-priming");
        let mut st = self.state();
        if let Some(slot) = st.images.get_mut(image) {
            if matches!(slot.substrate, SubstrateState::Docked(_)) {
                slot.substrate = SubstrateState::Missing;
                let _ = std::fs::remove_dir_all(self.substrate_dir(image));
            }
        }
        drop(st);
        self.inner.wake.notify_one();
    }

    fn activated(
        &self,
        vm: Box<dyn Vm>,
        req: &ActivateRequest,
        path: ActivationPath,
        t0: Instant,
        ready: &crate::driver::Ready,
    ) -> VmInfo {
        let info = VmInfo {
            vm_id: vm.id().clone(),
            image: req.image.clone(),
            session_id: req.session_id.clone(),
            game_addr: vm.game_addr(),
            pid: vm.pid(),
            path,
            activated_ms: now_ms(),
            activate_us: t0.elapsed().as_micros() as u64,
            clock_skew_ms: ready.guest_clock_ms as i64 - ready.host_clock_ms as i64,
        };
        tracing::info!(vm_id = %info.vm_id, session_id = %info.session_id, ?path, activate_us = info.activate_us, "activated");
        self.state().activations += 1;
        let keys = SessionKeys {
            // Checked in `activate`.
            key: req.key().unwrap_or_default(),
            players: req.players.clone(),
        };
        self.register(vm, info.clone(), keys);
        self.emit(PoolEvent::Activated { vm: info.clone() });
        info
    }

    fn register(&self, vm: Box<dyn Vm>, info: VmInfo, keys: SessionKeys) {
        let (tx, rx) = mpsc::channel(4);
        let (ending_tx, ending) = watch::channel(false);
        self.state().active.insert(
            info.vm_id.clone(),
            Active {
                info: info.clone(),
                cmd: tx,
                keys,
                ending,
            },
        );
        tokio::spawn(vm_task(self.clone(), vm, info, rx, ending_tx));
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
            ending: a.ending.clone(),
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

    pub fn status(&self) -> Status {
        let st = self.state();
        let mut images: Vec<ImageStatus> = self
            .inner
            .specs
            .iter()
            .map(|(name, spec)| {
                let slot = st.images.get(name);
                let (substrate, err, prime_ms) = match slot.map(|s| &s.substrate) {
                    Some(SubstrateState::Docked(s)) => ("docked", None, Some(s.header.prime_ms)),
                    Some(SubstrateState::Failed { message, .. }) => {
                        ("failed", Some(message.clone()), None)
                    }
                    Some(other) => (other.name(), None, None),
                    None => ("missing", None, None),
                };
                ImageStatus {
                    name: name.clone(),
                    substrate: substrate.into(),
                    substrate_error: err,
                    warm: slot.map_or(0, |s| s.warm.len() as u32),
                    warm_target: spec.config.warm,
                    active: st.active.values().filter(|a| &a.info.image == name).count() as u32,
                    prime_ms,
                    substrate_bytes: disk_usage(&self.substrate_dir(name)),
                }
            })
            .collect();
        images.sort_by(|a, b| a.name.cmp(&b.name));
        let mut vms: Vec<VmInfo> = st.active.values().map(|a| a.info.clone()).collect();
        vms.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        Status {
            host_id: self.inner.config.host_id.clone(),
            driver: self.inner.driver.kind().into(),
            accel: self.inner.driver.accel(),
            max_vms: self.inner.config.max_vms,
            images,
            vms,
            failures: st.failures.iter().cloned().collect(),
            activations: st.activations,
        }
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
                    SubstrateState::Docked(_) if slot.warm.len() as u32 >= warm => return Ok(()),
                    SubstrateState::Failed { message, .. } => {
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
                    state: format!("still {}", state.unwrap_or_default()),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Destroys every VM and warm clone; removes substrates unless `keep_substrates`.
    pub async fn shutdown(&self) {
        let _ = self.inner.shutdown.send(true);
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
        if !self.inner.config.keep_substrates {
            let _ = std::fs::remove_dir_all(dir.join("substrates"));
            let _ = std::fs::remove_file(dir.join("accel-probe.json"));
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// How long a VM whose game ended keeps running before it is destroyed.
const END_GRACE: Duration = Duration::from_millis(500);

/// The one owner of an active VM.
async fn vm_task(
    pool: Pool,
    mut vm: Box<dyn Vm>,
    info: VmInfo,
    mut cmd: mpsc::Receiver<VmCommand>,
    ending: watch::Sender<bool>,
) {
    let silence = pool.inner.config.agent_silence();
    let mut reply = None;
    let event = tokio::select! {
        c = cmd.recv() => {
            if let Some(VmCommand::Destroy(tx)) = c { reply = Some(tx); }
            None
        }
        e = vm.event(silence) => Some(e),
    };
    // Before anything goes: the gateway closes the session's players with `game_over`, not
    // as if the game had just dropped them.
    ending.send_replace(true);
    if matches!(event, Some(VmEvent::Ended { .. })) {
        // Let the last answers to players leave the VM before it goes.
        tokio::time::sleep(END_GRACE).await;
    }
    // Destroy and forget the VM first, so that whoever sees the event sees a consistent pool.
    vm.destroy().await;
    let announce = match event {
        Some(VmEvent::Ended { reason, results }) => {
            tracing::info!(vm_id = %info.vm_id, %reason, "game ended");
            Some(PoolEvent::Ended {
                vm_id: info.vm_id.clone(),
                session_id: info.session_id.clone(),
                reason,
                results,
            })
        }
        Some(failure) => {
            let (code, reason) = match failure {
                VmEvent::Exited { status } => {
                    ("vm_exited", format!("the VM process exited: {status}"))
                }
                VmEvent::Silent { for_ms } => (
                    "agent_silent",
                    format!("no heartbeat from the agent for {for_ms} ms"),
                ),
                VmEvent::Ended { .. } => unreachable!("matched above"),
            };
            tracing::warn!(vm_id = %info.vm_id, code, %reason, "VM failed");
            let mut st = pool.state();
            st.failures.push_back(Failure {
                vm_id: info.vm_id.clone(),
                session_id: info.session_id.clone(),
                code: code.into(),
                reason: reason.clone(),
                at_ms: now_ms(),
            });
            while st.failures.len() > 100 {
                st.failures.pop_front();
            }
            Some(PoolEvent::Failed {
                vm_id: info.vm_id.clone(),
                session_id: info.session_id.clone(),
                code: code.into(),
                reason,
            })
        }
        None => None,
    };
    {
        let mut st = pool.state();
        st.active.remove(&info.vm_id);
        st.sessions.remove(&info.session_id);
    }
    if let Some(e) = announce {
        pool.emit(e);
    }
    pool.emit(PoolEvent::Destroyed {
        vm_id: info.vm_id.clone(),
        session_id: info.session_id.clone(),
    });
    pool.inner.wake.notify_one();
    if let Some(tx) = reply {
        let _ = tx.send(());
    }
}

/// Primes missing substrates and keeps each image's warm clones at target, one VM at a time.
async fn refill_task(pool: Pool) {
    let mut shutdown = pool.inner.shutdown.subscribe();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let worked = refill_once(&pool).await;
        if worked {
            continue;
        }
        tokio::select! {
            _ = pool.inner.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Does one unit of refill work; false when there was none.
async fn refill_once(pool: &Pool) -> bool {
    let mut names: Vec<&String> = pool.inner.specs.keys().collect();
    names.sort();
    for name in names {
        let spec = &pool.inner.specs[name];
        enum Job {
            Prime,
            Warm(Box<Substrate>),
        }
        let job = {
            let mut st = pool.state();
            let busy = st.active.len() as u32 + st.activating;
            let warm_total: u32 = st.images.values().map(|s| s.warm.len() as u32).sum();
            let Some(slot) = st.images.get_mut(name) else {
                continue;
            };
            match &slot.substrate {
                SubstrateState::Missing => {
                    slot.substrate = SubstrateState::Priming;
                    Some(Job::Prime)
                }
                SubstrateState::Failed { at, .. } if at.elapsed() > Duration::from_secs(30) => {
                    slot.substrate = SubstrateState::Priming;
                    Some(Job::Prime)
                }
                SubstrateState::Docked(s)
                    if (slot.warm.len() as u32) < spec.config.warm
                        && busy + warm_total < pool.inner.config.max_vms =>
                {
                    Some(Job::Warm(s.clone()))
                }
                _ => None,
            }
        };
        match job {
            None => continue,
            Some(Job::Prime) => {
                let dir = pool.substrate_dir(name);
                tracing::info!(image = %name, "priming substrate");
                let result = pool
                    .inner
                    .driver
                    .prime(spec, &dir, pool.inner.config.boot_timeout())
                    .await;
                let opened = result.and_then(|stats| {
                    Substrate::open(&dir, &pool.inner.driver.fingerprint(spec))
                        .map(|s| (s, stats))
                        .map_err(DriverError::from)
                });
                let mut st = pool.state();
                let Some(slot) = st.images.get_mut(name) else {
                    return true;
                };
                match opened {
                    Ok((s, stats)) => {
                        tracing::info!(image = %name, boot_ms = stats.boot_ms, dock_ms = stats.dock_ms, "substrate docked");
                        slot.substrate = SubstrateState::Docked(Box::new(s));
                        drop(st);
                        pool.emit(PoolEvent::Docked {
                            image: name.clone(),
                            prime: stats,
                        });
                    }
                    Err(e) => {
                        tracing::error!(image = %name, error = %e, "priming failed");
                        let _ = std::fs::remove_dir_all(&dir);
                        slot.substrate = SubstrateState::Failed {
                            message: e.to_string(),
                            at: Instant::now(),
                        };
                        drop(st);
                        pool.emit(PoolEvent::PrimeFailed {
                            image: name.clone(),
                            code: e.code().into(),
                            message: e.to_string(),
                        });
                    }
                }
                return true;
            }
            Some(Job::Warm(substrate)) => {
                let vm_id = new_vm_id();
                match pool.restore_warm(spec, &substrate, vm_id).await {
                    Ok(vm) => {
                        let mut st = pool.state();
                        if *pool.inner.shutdown.borrow() {
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
                        if e.substrate_suspect() {
                            pool.discard_substrate(name, &e);
                        } else {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_keys_are_hex_and_stay_out_of_logs() {
        let req = |key: &str| ActivateRequest {
            session_id: SessionId::new("s1").expect("valid"),
            image: "arena".into(),
            players: vec![],
            teams: vec![],
            params: serde_json::Value::Null,
            ticket_key: key.into(),
        };
        assert_eq!(req("00ff").key(), Some(vec![0, 255]));
        for bad in ["", "0", "zz", "00 ff", &"00".repeat(MAX_TICKET_KEY + 1)] {
            assert_eq!(req(bad).key(), None, "{bad:?}");
        }
        assert!(!format!("{:?}", req("c0ffee")).contains("c0ffee"));
        let (tx, ending) = watch::channel(false);
        let gate = Gate {
            vm_id: VmId::new("vm-1").expect("valid"),
            game_addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            key: vec![0xc0, 0xff, 0xee],
            players: vec![],
            ending,
        };
        assert!(!format!("{gate:?}").contains("192"));
        assert!(!gate.is_ending());
        drop(tx);
        assert!(gate.is_ending(), "a gone VM counts as ending");
    }
}
