//! The pool's unit tests, on [`TestDriver`]: a `VmDriver` test double whose VMs are plain
//! values, scripted per test (a prime or a restore that fails, a VM that never answers
//! `ready`, game over), so that the pool's timeouts, retries and refill run on paused time.

use super::*;
use crate::driver::files::seal_substrate;
use crate::driver::{DriverError, Ready, VmEvent, VmRecord};
use crate::substrate::Fingerprint;
use async_trait::async_trait;
use berth_protocol::guest::Identity;
use std::path::Path;

/// What the test scripts, and what the [`TestDriver`] saw.
#[derive(Default)]
pub(crate) struct Script {
    /// How long a prime's cold boot takes.
    pub boot: Duration,
    /// The next this many primes fail (boot timeout).
    pub prime_failures: u32,
    /// The next this many restores fail as a suspect substrate.
    pub restore_failures: u32,
    /// VMs never answer `ready` (their activation times out).
    pub never_ready: bool,
    /// The next this many activations fail (the VM exits), as clones of a damaged substrate do.
    pub activate_failures: u32,
    /// Where VMs' game servers listen (a test's own TCP listener); none: a closed port.
    pub game_addr: Option<SocketAddr>,
    pub primes: u32,
    pub restores: u32,
    pub destroyed: Vec<VmId>,
    /// VMs an earlier hostd left running: [`VmDriver::adopt`] takes these over.
    pub running: Vec<VmId>,
    /// Every VM not yet destroyed, with the sender of its events.
    pub live: HashMap<VmId, mpsc::UnboundedSender<VmEvent>>,
}

/// A `VmDriver` test double: primes write a real (tiny) sealed substrate, restores hand out
/// [`TestVm`]s, and everything is booked in a shared [`Script`].
#[derive(Clone, Default)]
pub(crate) struct TestDriver {
    pub script: Arc<Mutex<Script>>,
}

impl TestDriver {
    pub fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script.lock().expect("script lock")
    }

    /// A new live VM.
    fn vm(&self, id: VmId, dir: &Path) -> Box<dyn Vm> {
        let (tx, events) = mpsc::unbounded_channel();
        let mut script = self.script();
        script.live.insert(id.clone(), tx);
        Box::new(TestVm {
            id,
            dir: dir.to_path_buf(),
            events,
            never_ready: script.never_ready,
            game_addr: script
                .game_addr
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9))),
            script: self.script.clone(),
        })
    }

    /// Tells the VM `vm_id` that `event` happened to it.
    fn send(&self, vm_id: &VmId, event: VmEvent) {
        let script = self.script();
        let events = script.live.get(vm_id).expect("a live VM");
        events.send(event).expect("the VM listens");
    }
}

#[async_trait]
impl VmDriver for TestDriver {
    fn kind(&self) -> &'static str {
        "test"
    }

    fn accel(&self) -> String {
        "none".into()
    }

    fn fingerprint(&self, spec: &VmSpec) -> Fingerprint {
        spec.fingerprint(self, "test 1".into(), "test-1", spec.config.cow)
    }

    async fn prime(
        &self,
        spec: &VmSpec,
        dir: &Path,
        boot_timeout: Duration,
    ) -> Result<PrimeStats, DriverError> {
        let started = std::time::Instant::now();
        let (fail, boot) = {
            let mut script = self.script();
            script.primes += 1;
            let fail = script.prime_failures > 0;
            script.prime_failures = script.prime_failures.saturating_sub(1);
            (fail, script.boot)
        };
        tokio::time::sleep(boot).await;
        if fail {
            return Err(DriverError::BootTimeout(boot_timeout));
        }
        std::fs::create_dir_all(dir).expect("substrate folder");
        std::fs::write(Substrate::state_path(dir), b"device state").expect("state file");
        std::fs::write(Substrate::ram_path(dir), [7u8; 4096]).expect("RAM file");
        seal_substrate(dir, self.fingerprint(spec), 1, started, started)
    }

    async fn restore(
        &self,
        _spec: &VmSpec,
        _substrate: &Substrate,
        vm_id: VmId,
        vm_dir: &Path,
    ) -> Result<Box<dyn Vm>, DriverError> {
        let mut script = self.script();
        script.restores += 1;
        if script.restore_failures > 0 {
            script.restore_failures -= 1;
            return Err(DriverError::Restore("the test says so".into()));
        }
        drop(script);
        Ok(self.vm(vm_id, vm_dir))
    }

    async fn cold_boot(
        &self,
        _spec: &VmSpec,
        _vm_id: VmId,
        _vm_dir: &Path,
        _boot_timeout: Duration,
    ) -> Result<Box<dyn Vm>, DriverError> {
        Err(DriverError::Unsupported("cold boot"))
    }

    async fn adopt(&self, record: &VmRecord, vm_dir: &Path) -> Result<Box<dyn Vm>, DriverError> {
        if !self.script().running.contains(&record.vm_id) {
            return Err(DriverError::Exited(format!(
                "{} is not running",
                record.vm_id
            )));
        }
        Ok(self.vm(record.vm_id.clone(), vm_dir))
    }
}

/// A VM of the [`TestDriver`].
struct TestVm {
    id: VmId,
    dir: PathBuf,
    events: mpsc::UnboundedReceiver<VmEvent>,
    never_ready: bool,
    game_addr: SocketAddr,
    script: Arc<Mutex<Script>>,
}

#[async_trait]
impl Vm for TestVm {
    fn id(&self) -> &VmId {
        &self.id
    }

    fn game_addr(&self) -> SocketAddr {
        self.game_addr
    }

    fn pid(&self) -> u32 {
        0
    }

    fn dir(&self) -> &Path {
        &self.dir
    }

    async fn activate(
        &mut self,
        identity: Identity,
        timeout: Duration,
    ) -> Result<Ready, DriverError> {
        if self.never_ready {
            tokio::time::sleep(timeout).await;
            return Err(DriverError::ReadyTimeout(timeout));
        }
        {
            let mut script = self.script.lock().expect("script lock");
            if script.activate_failures > 0 {
                script.activate_failures -= 1;
                return Err(DriverError::Exited("signal: 6 (SIGABRT)".into()));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(Ready {
            session_id: identity.session_id,
            guest_clock_ms: 0,
            host_clock_ms: 0,
            activate_us: 20_000,
        })
    }

    async fn event(&mut self, _silence: Duration) -> VmEvent {
        match self.events.recv().await {
            Some(event) => event,
            None => std::future::pending().await,
        }
    }

    async fn destroy(self: Box<Self>) {
        let mut script = self.script.lock().expect("script lock");
        script.live.remove(&self.id);
        script.destroyed.push(self.id.clone());
    }
}

/// A config with one image, `arena`, keeping `warm` clones, in a fresh folder (kept while
/// the returned guard lives), with a 5 s ready timeout.
pub(crate) fn test_config(warm: u32, max_vms: u32) -> (HostdConfig, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("image");
    std::fs::create_dir_all(&image).expect("image folder");
    for file in ["vmlinuz", "initrd"] {
        std::fs::write(image.join(file), b"").expect("image file");
    }
    let manifest = serde_json::json!({
        "format": 1, "digest": "sha256:test", "input_digest": "", "kernel": "vmlinuz",
        "initrd": "initrd", "disk": "", "kernel_package": "", "cmdline": ""
    });
    std::fs::write(image.join("manifest.json"), manifest.to_string()).expect("manifest");
    let config = HostdConfig::parse(&format!(
        "state_dir = {state:?}\nmax_vms = {max_vms}\nready_timeout_s = 5\n\
         [[images]]\nname = \"arena\"\ndir = {image:?}\nwarm = {warm}\n",
        state = dir.path().join("state"),
    ))
    .expect("config");
    (config, dir)
}

/// A pool on the [`TestDriver`] following `script`, on [`test_config`].
pub(crate) async fn pool_with(
    warm: u32,
    max_vms: u32,
    script: Script,
) -> (Pool, TestDriver, tempfile::TempDir) {
    let (config, dir) = test_config(warm, max_vms);
    let driver = TestDriver {
        script: Arc::new(Mutex::new(script)),
    };
    let pool = Pool::start(config, Arc::new(driver.clone()))
        .await
        .expect("pool starts");
    (pool, driver, dir)
}

fn request(session: &str) -> ActivateRequest {
    ActivateRequest {
        session_id: SessionId::new(session).expect("valid"),
        image: "arena".into(),
        players: vec![PlayerId::new("alice").expect("valid")],
        teams: vec![],
        params: serde_json::Value::Null,
        ticket_key: String::new(),
        deadline_ms: 0,
    }
}

const LONG: Duration = Duration::from_secs(120);

/// Waits until `pool`'s image is docked again, and checks that it was primed twice in all, the
/// second time because of `reason` (counted in `status`).
async fn reprimed_for(pool: &Pool, driver: &TestDriver, reason: &str) {
    pool.wait_ready("arena", 0, LONG)
        .await
        .expect("primed again");
    assert_eq!(driver.script().primes, 2);
    let reprimes = &pool.status().images[0].reprimes;
    assert_eq!(reprimes.get(reason), Some(&1), "{reprimes:?}");
}

#[tokio::test(start_paused = true)]
async fn a_failed_prime_is_reported_and_primed_again_after_a_while() {
    let script = Script {
        boot: Duration::from_secs(5),
        prime_failures: 1,
        ..Script::default()
    };
    let (pool, driver, _dir) = pool_with(0, 4, script).await;
    let mut events = pool.subscribe();
    let err = pool.wait_ready("arena", 0, LONG).await.expect_err("failed");
    assert!(matches!(err, PoolError::NotDocked { ref state, .. } if state.starts_with("failed")));
    assert!(matches!(
        events.recv().await,
        Ok(PoolEvent::PrimeFailed { ref code, .. }) if code == "boot_timeout"
    ));
    assert_eq!(pool.status().images[0].substrate, SubstrateState::Failed);
    let refused = pool
        .activate(request("s1"))
        .await
        .expect_err("nothing docked");
    assert_eq!(refused.code(), "not_docked");
    // Not again at once: the failed state holds for a while.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(driver.script().primes, 1);
    assert_eq!(pool.status().images[0].substrate, SubstrateState::Failed);
    tokio::time::sleep(Duration::from_secs(20)).await;
    pool.wait_ready("arena", 0, LONG)
        .await
        .expect("docked on the second prime");
    assert_eq!(driver.script().primes, 2);
    assert!(matches!(events.recv().await, Ok(PoolEvent::Docked { .. })));
    pool.activate(request("s1")).await.expect("activated");
    pool.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn one_session_activated_twice_at_once_gets_one_vm() {
    let (pool, driver, _dir) = pool_with(0, 4, Script::default()).await;
    pool.wait_ready("arena", 0, LONG).await.expect("docked");
    let (a, b) = tokio::join!(pool.activate(request("s1")), pool.activate(request("s1")));
    let (a, b) = (a.expect("first"), b.expect("second"));
    assert_eq!(a.vm_id, b.vm_id);
    assert_eq!(a.path, ActivationPath::Substrate);
    let again = pool.activate(request("s1")).await.expect("again");
    assert_eq!(again.vm_id, a.vm_id);
    assert_eq!(driver.script().restores, 1);
    assert_eq!(pool.status().vms.len(), 1);
    assert_eq!(pool.status().activations, 1);
    let other = pool.activate(request("s2")).await.expect("another session");
    assert_ne!(other.vm_id, a.vm_id);
    pool.shutdown().await;
    assert!(
        driver.script().live.is_empty(),
        "shutdown destroys every VM"
    );
}

#[tokio::test(start_paused = true)]
async fn a_restore_that_fails_sends_the_substrate_back_to_be_primed() {
    let script = Script {
        restore_failures: 1,
        ..Script::default()
    };
    let (pool, driver, _dir) = pool_with(0, 4, script).await;
    pool.wait_ready("arena", 0, LONG).await.expect("docked");
    let err = pool
        .activate(request("s1"))
        .await
        .expect_err("restore fails");
    assert!(matches!(err, PoolError::Driver { ref code, .. } if code == "restore_failed"));
    assert_ne!(pool.status().images[0].substrate, SubstrateState::Docked);
    reprimed_for(&pool, &driver, "restore_failed").await;
    // The failed session may be asked for again, and now gets a VM.
    let vm = pool.activate(request("s1")).await.expect("activated");
    assert_eq!(vm.path, ActivationPath::Substrate);
    pool.shutdown().await;
}

/// The pool's next `SubstrateDiscarded` within a minute: (code, reason).
async fn discarded(events: &mut broadcast::Receiver<PoolEvent>) -> (String, String) {
    let next = async {
        loop {
            if let Ok(PoolEvent::SubstrateDiscarded { code, reason, .. }) = events.recv().await {
                return (code, reason);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), next)
        .await
        .expect("the substrate is discarded")
}

#[tokio::test(start_paused = true)]
async fn clones_that_keep_failing_get_a_damaged_substrate_reprimed() {
    let (pool, driver, _dir) = pool_with(0, 4, Script::default()).await;
    pool.wait_ready("arena", 0, LONG).await.expect("docked");
    let mut events = pool.subscribe();
    // The RAM file is zeroed under the running pool; its clones now die at activation.
    let ram = pool.substrate_dir("arena").join("ram");
    std::fs::write(&ram, [0u8; 4096]).expect("zero the RAM file");
    driver.script().activate_failures = health::VERIFY_AFTER_FAILURES;
    for (i, session) in ["s1", "s2", "s3"].into_iter().enumerate() {
        let status = pool.status();
        assert_eq!(
            status.images[0].substrate,
            SubstrateState::Docked,
            "clone {i}"
        );
        let err = pool.activate(request(session)).await.expect_err("dies");
        assert!(matches!(err, PoolError::Driver { ref code, .. } if code == "vm_exited"));
    }
    let (code, reason) = discarded(&mut events).await;
    assert_eq!(code, "substrate_damaged");
    assert!(reason.contains("RAM file"), "{reason}");
    reprimed_for(&pool, &driver, "substrate_damaged").await;
    let vm = pool
        .activate(request("s4"))
        .await
        .expect("a clone of the new substrate");
    assert_eq!(vm.path, ActivationPath::Substrate);
    pool.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn clones_failing_on_an_intact_substrate_keep_it() {
    let script = Script {
        activate_failures: 2 * health::VERIFY_AFTER_FAILURES,
        ..Script::default()
    };
    let (pool, driver, _dir) = pool_with(0, 4, script).await;
    pool.wait_ready("arena", 0, LONG).await.expect("docked");
    for i in 0..2 * health::VERIFY_AFTER_FAILURES {
        let err = pool.activate(request(&format!("s{i}"))).await;
        assert!(err.is_err(), "activation {i} fails");
        // Let a check that started run to its verdict.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pool.activate(request("ok"))
        .await
        .expect("the game works again");
    let status = pool.status();
    assert_eq!(status.images[0].substrate, SubstrateState::Docked);
    assert!(status.images[0].reprimes.is_empty());
    assert_eq!(driver.script().primes, 1, "checked twice, never re-primed");
    pool.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_substrate_damaged_while_hostd_was_down_is_reprimed_at_start() {
    let (mut config, _dir) = test_config(0, 4);
    config.keep_substrates = true;
    let driver = TestDriver::default();
    let pool = Pool::start(config.clone(), Arc::new(driver.clone()))
        .await
        .expect("pool starts");
    pool.wait_ready("arena", 0, LONG).await.expect("docked");
    // hostd stops (the substrate stays, as after a crash); meanwhile its RAM file changes.
    pool.shutdown().await;
    std::fs::write(config.state_dir.join("substrates/arena/ram"), [7u8; 2048]).expect("damage");
    let pool = Pool::start(config, Arc::new(driver.clone()))
        .await
        .expect("pool starts again");
    assert_ne!(pool.status().images[0].substrate, SubstrateState::Docked);
    reprimed_for(&pool, &driver, "substrate_damaged").await;
    pool.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_vm_that_never_answers_ready_is_destroyed_at_the_ready_timeout() {
    let script = Script {
        never_ready: true,
        ..Script::default()
    };
    let (pool, driver, _dir) = pool_with(0, 4, script).await;
    pool.wait_ready("arena", 0, LONG).await.expect("docked");
    let started = Instant::now();
    let err = pool.activate(request("s1")).await.expect_err("no ready");
    assert!(matches!(err, PoolError::Driver { ref code, .. } if code == "ready_timeout"));
    assert_eq!(started.elapsed(), Duration::from_secs(5), "ready_timeout_s");
    assert_eq!(driver.script().destroyed.len(), 1);
    assert!(driver.script().live.is_empty());
    assert!(pool.status().vms.is_empty());
    assert!(pool.gate(&SessionId::new("s1").expect("valid")).is_none());
    pool.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_warm_tier_is_refilled_to_its_target_within_the_host_capacity() {
    let (pool, driver, _dir) = pool_with(2, 3, Script::default()).await;
    pool.wait_ready("arena", 2, LONG)
        .await
        .expect("two warm clones");
    assert_eq!(driver.script().restores, 2);
    let vm = pool.activate(request("s1")).await.expect("activated");
    assert_eq!(vm.path, ActivationPath::Warm);
    pool.wait_ready("arena", 2, LONG).await.expect("refilled");
    assert_eq!(driver.script().restores, 3);
    let image = &pool.status().images[0];
    assert_eq!((image.warm, image.warm_target, image.active), (2, 2, 1));
    // One more active VM fills the host (2 active + 1 warm of 3): no refill past max_vms.
    let second = pool.activate(request("s2")).await.expect("activated");
    assert_eq!(second.path, ActivationPath::Warm);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(driver.script().restores, 3);
    assert_eq!(pool.status().images[0].warm, 1);
    // A VM gone makes room again.
    pool.destroy("s1").await.expect("destroyed");
    pool.wait_ready("arena", 2, LONG)
        .await
        .expect("refilled again");
    assert_eq!(driver.script().restores, 4);
    pool.shutdown().await;
    assert!(
        driver.script().live.is_empty(),
        "warm clones are destroyed too"
    );
}

#[tokio::test(start_paused = true)]
async fn game_over_and_a_dead_vm_are_announced_and_the_vm_destroyed() {
    let (pool, driver, _dir) = pool_with(0, 4, Script::default()).await;
    pool.wait_ready("arena", 0, LONG).await.expect("docked");
    let mut events = pool.subscribe();
    let over = pool.activate(request("s1")).await.expect("activated");
    let gate = pool.gate(&over.session_id).expect("a gate while active");
    assert_eq!(gate.players, vec![PlayerId::new("alice").expect("valid")]);
    driver.send(
        &over.vm_id,
        VmEvent::Ended {
            reason: "score".into(),
            results: serde_json::json!({"winner": "alice"}),
        },
    );
    let mut seen = Vec::new();
    while let Ok(event) = events.recv().await {
        let done = matches!(event, PoolEvent::Destroyed { .. });
        seen.push(event);
        if done {
            break;
        }
    }
    assert!(matches!(seen[0], PoolEvent::Activated { .. }));
    assert!(matches!(&seen[1], PoolEvent::Ended { reason, .. } if reason == "score"));
    assert!(matches!(&seen[2], PoolEvent::Destroyed { vm_id, .. } if vm_id == &over.vm_id));
    assert!(gate.is_ending());
    assert!(pool.status().vms.is_empty());
    let dead = pool.activate(request("s2")).await.expect("activated");
    driver.send(
        &dead.vm_id,
        VmEvent::Exited {
            status: "signal 9".into(),
        },
    );
    while let Ok(event) = events.recv().await {
        if let PoolEvent::Failed { code, .. } = &event {
            assert_eq!(code, "vm_exited");
            break;
        }
    }
    let status = pool.status();
    assert_eq!(status.failures.len(), 1);
    assert_eq!(status.failures[0].vm_id, dead.vm_id);
    assert_eq!(driver.script().destroyed, vec![over.vm_id, dead.vm_id]);
    let unknown = pool.destroy("s9").await.expect_err("no such session");
    assert_eq!(unknown.code(), "unknown_vm");
    pool.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn vms_left_running_are_adopted_and_the_rest_cleaned_up() {
    let (config, _dir) = test_config(0, 4);
    let vms = config.state_dir.join("vms");
    let alice = PlayerId::new("alice").expect("valid");
    let id = |vm: &str| VmId::new(vm).expect("valid");
    let record = |vm: &str, session: Option<&str>, key: &str| VmRecord {
        vm_id: id(vm),
        image: "arena".into(),
        driver: "test".into(),
        pid: 0,
        game_port: 9,
        session_id: session.map(|s| SessionId::new(s).expect("valid")),
        created_ms: 7,
        players: vec![alice.clone()],
        ticket_key: key.into(),
    };
    for r in [
        record("vm-live", Some("s1"), "00ff"),
        record("vm-idle", None, ""),
        record("vm-dead", Some("s2"), "00ff"),
        record("vm-nokey", Some("s3"), ""),
    ] {
        let dir = vms.join(r.vm_id.as_str());
        std::fs::create_dir_all(&dir).expect("vm folder");
        r.save(&dir).expect("record");
    }
    std::fs::create_dir_all(vms.join("vm-norecord")).expect("vm folder");
    let driver = TestDriver::default();
    driver.script().running = vec![id("vm-live"), id("vm-idle"), id("vm-nokey")];
    let pool = Pool::start(config, Arc::new(driver.clone()))
        .await
        .expect("pool starts");
    let status = pool.status();
    let adopted: Vec<&str> = status.vms.iter().map(|v| v.vm_id.as_str()).collect();
    assert_eq!(adopted, ["vm-live", "vm-nokey"]);
    assert!(status
        .vms
        .iter()
        .all(|v| v.path == ActivationPath::Adopted && v.activated_ms == 7));
    let gate = pool
        .gate(&SessionId::new("s1").expect("valid"))
        .expect("a gate");
    assert_eq!((gate.key, gate.players), (vec![0, 255], vec![alice]));
    assert!(
        pool.gate(&SessionId::new("s3").expect("valid")).is_none(),
        "no key on record: nobody may join"
    );
    let again = pool.activate(request("s1")).await.expect("the adopted VM");
    assert_eq!(again.vm_id, id("vm-live"));
    assert_eq!(driver.script().restores, 0);
    assert_eq!(driver.script().destroyed, vec![id("vm-idle")]);
    for gone in ["vm-dead", "vm-norecord"] {
        assert!(!vms.join(gone).exists(), "{gone} removed");
    }
    pool.shutdown().await;
}

#[test]
fn ticket_keys_are_hex_and_stay_out_of_logs() {
    let req = |key: &str| ActivateRequest {
        session_id: SessionId::new("s1").expect("valid"),
        image: "arena".into(),
        players: vec![],
        teams: vec![],
        params: serde_json::Value::Null,
        ticket_key: key.into(),
        deadline_ms: 0,
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
        game: Default::default(),
        ending,
        moved: Default::default(),
    };
    assert!(!format!("{gate:?}").contains("192"));
    assert!(!gate.is_ending());
    drop(tx);
    assert!(gate.is_ending(), "a gone VM counts as ending");
}
