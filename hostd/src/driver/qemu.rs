//! The QEMU driver: microvm guests, QMP over unix sockets, substrates in tmpfs.
//!
//! Device model (identical for template and clones, or migration refuses):
//! microvm without option ROMs, RAM in a `memory-backend-file` (`share=on` for the template so
//! its RAM lands in the substrate's `ram` file; `share=off` for clones so they map that file
//! copy-on-write), a virtio-serial port `berth.agent` (hostd connects to QEMU's socket), a
//! virtio-net with user-mode networking and one loopback `hostfwd` to the game port, a
//! virtio-blk on a qcow2 overlay of the image's disk, a virtio-balloon, the serial console to a
//! log file. Priming sets `x-ignore-shared` and migrates the stopped template to
//! `exec:cat > state`, so only device state (tens of KiB) is written; clones start with
//! `-incoming defer -S`, set the same capability and `migrate-incoming` from the state file.
//!
//! Miniaturisation (`balloon_mib`): the template is ballooned down before it docks, and
//! refused if its guest stops giving memory back above the target (the measured floor: see
//! [`super::balloon_reached`]); each clone is ballooned back to its full memory while still
//! paused after its restore, so no clone ever runs on the substrate's shrunken memory.

use super::files::{io_err, mkdir_private, seal_substrate};
use super::{DriverError, Migrated, PrimeStats, Ready, Vm, VmDriver, VmEvent, VmRecord, VmSpec};
use crate::substrate::{Fingerprint, Substrate};
use crate::util::{now_ms, pid_alive, pid_cmdline};
use async_trait::async_trait;
use berth_protocol::guest::{
    decode_line, encode_line, GuestToHost, HostToGuest, Identity, Line, LineBuffer,
    AGENT_PORT_NAME, AGENT_PROTOCOL_VERSION, GAME_PORT,
};
use berth_protocol::{PlayerId, SessionId, VmId};
use qapi::qmp;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// How long a pre-warmed VM keeps running before it is paused or docked: the kernel work the
/// prewarm deferred (timers, workqueues after the clock change) is done then, once, instead
/// of during a real activation (warm activation 54 -> 28 ms, CoW clone 252 -> 172 ms).
const PREWARM_SETTLE: Duration = Duration::from_millis(300);

/// How long a warm-up waits, after the agent's, for the game's first words on the port it
/// touched (the arena's hello comes at once; a game that waits for its client never speaks).
const TOUCH_GRACE: Duration = Duration::from_millis(300);

/// Bumped whenever the VM arguments below change: old substrates are then re-primed.
pub const DEVICE_MODEL: &str = "microvm-2";

type QmpService =
    qapi::futures::QapiService<qapi::futures::QmpStreamTokio<tokio::io::WriteHalf<UnixStream>>>;

/// The accelerator QEMU runs guests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// Where guest RAM lives.
#[derive(Debug, Clone, Copy)]
enum Ram<'a> {
    /// The template: writes go to the file (the substrate's RAM).
    Shared(&'a Path),
    /// A clone: the substrate's RAM mapped copy-on-write.
    Private(&'a Path),
    /// A cold-booted VM with anonymous RAM.
    Anonymous,
}

#[derive(Debug, Clone)]
pub struct QemuDriver {
    qemu: PathBuf,
    version: String,
    accel: Accel,
    tsc_khz: Option<u64>,
}

/// Reads `qemu --version`, e.g. "QEMU emulator version 7.2.22 (Debian ...)" → "7.2.22".
pub async fn qemu_version(qemu: &Path) -> Result<String, DriverError> {
    let out = tokio::process::Command::new(qemu)
        .arg("--version")
        .output()
        .await
        .map_err(|source| DriverError::Spawn {
            what: "qemu --version",
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| DriverError::Io {
            what: format!("unexpected `{} --version` output: {text:?}", qemu.display()),
            source: std::io::Error::other("no version"),
        })
}

/// The host's TSC frequency in kHz, for `tsc_early_khz` (TCG only).
pub fn host_tsc_khz() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = text
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

fn qmp_err(during: &'static str) -> impl FnOnce(qapi::ExecuteError) -> DriverError {
    move |e| DriverError::Qmp {
        during,
        message: e.to_string(),
    }
}

/// A free loopback TCP port for a VM's `hostfwd`.
fn free_port() -> Result<u16, DriverError> {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io_err("finding a free port"))
}

impl QemuDriver {
    pub async fn new(qemu: PathBuf, accel: Accel) -> Result<Self, DriverError> {
        let version = qemu_version(&qemu).await?;
        Ok(Self {
            qemu,
            version,
            accel,
            tsc_khz: if accel == Accel::Tcg {
                host_tsc_khz()
            } else {
                None
            },
        })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    fn args(&self, spec: &VmSpec, dir: &Path, ram: Ram<'_>, game_port: u16) -> Vec<OsString> {
        let cfg = &spec.config;
        let mut cmdline = spec.image.manifest.cmdline.clone();
        if let Some(khz) = self.tsc_khz {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
        if let Some(extra) = &cfg.cmdline {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        let mem = match ram {
            Ram::Shared(p) => format!(
                "memory-backend-file,id=mem,size={}M,mem-path={},share=on",
                cfg.memory_mib,
                p.display()
            ),
            Ram::Private(p) => format!(
                "memory-backend-file,id=mem,size={}M,mem-path={},share=off",
                cfg.memory_mib,
                p.display()
            ),
            Ram::Anonymous => format!("memory-backend-ram,id=mem,size={}M", cfg.memory_mib),
        };
        let d = |f: &str| dir.join(f).display().to_string();
        let accel = match self.accel {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        };
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("berth,process=berth-vm,debug-threads=off"),
            "-M".into(),
            "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,memory-backend=mem".into(),
            "-accel".into(),
            accel.into(),
        ];
        args.extend([
            "-cpu".into(),
            match self.accel {
                Accel::Kvm => "host".into(),
                // arat + tsc-deadline: the guest can stop its tick when idle.
                Accel::Tcg => "qemu64,+arat,+tsc-deadline".into(),
            },
        ]);
        args.extend([
            "-m".into(),
            format!("{}M", cfg.memory_mib),
            "-smp".into(),
            cfg.vcpus.to_string(),
            "-object".into(),
            mem,
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-append".into(),
            cmdline,
            "-chardev".into(),
            format!("file,id=con,path={}", d("console.log")),
            "-serial".into(),
            "chardev:con".into(),
            "-device".into(),
            "virtio-serial-device".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                d("agent.sock")
            ),
            "-device".into(),
            format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
            "-netdev".into(),
            format!("user,id=n0,hostfwd=tcp:127.0.0.1:{game_port}-:{GAME_PORT}"),
            "-device".into(),
            "virtio-net-device,netdev=n0".into(),
            "-drive".into(),
            format!("if=none,id=d0,file={},format=qcow2", d("overlay.qcow2")),
            "-device".into(),
            "virtio-blk-device,drive=d0".into(),
            "-device".into(),
            "virtio-balloon-device".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", d("qmp.sock")),
        ]);
        match ram {
            // A clone never boots: its kernel is already in the substrate's RAM. QEMU keeps
            // whatever `-kernel`/`-initrd` name in memory for the VM's life (~19 MiB per VM
            // with this image), so clones get only the kernel's boot header.
            Ram::Private(ram) => args.extend([
                "-kernel".into(),
                ram.with_file_name("kernel-header").display().to_string(),
            ]),
            Ram::Shared(_) | Ram::Anonymous => args.extend([
                "-kernel".into(),
                spec.image.kernel().display().to_string(),
                "-initrd".into(),
                spec.image.initrd().display().to_string(),
            ]),
        }
        args.into_iter().map(OsString::from).collect()
    }

    async fn spawn(
        &self,
        spec: &VmSpec,
        vm_id: VmId,
        dir: &Path,
        ram: Ram<'_>,
        incoming: bool,
    ) -> Result<QemuVm, DriverError> {
        let game_port = free_port()?;
        let mut args = self.args(spec, dir, ram, game_port);
        if incoming {
            args.extend(["-incoming", "defer", "-S"].map(OsString::from));
        }
        let log =
            std::fs::File::create(dir.join("qemu.log")).map_err(io_err("creating qemu.log"))?;
        let child = tokio::process::Command::new(&self.qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Own process group: a Ctrl-C meant for hostd does not kill the VMs (they are
            // destroyed by their owner, or adopted by the next hostd after a crash).
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| DriverError::Spawn {
                what: "qemu",
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        let mut vm = QemuVm::new(vm_id, dir.to_path_buf(), pid, game_port, Some(child));
        let deadline = Instant::now() + Duration::from_secs(10);
        if let Err(e) = vm.connect(deadline).await {
            // QEMU dying at start-up (bad flags, an accelerator that fails) also shows up as a
            // broken QMP handshake: give it a moment and report what it said.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let exited = vm
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            let log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
            Box::new(vm).destroy_in_place().await;
            return Err(match e {
                DriverError::Exited(_) => DriverError::Exited(log.trim().to_string()),
                _ if exited => DriverError::Exited(log.trim().to_string()),
                other => other,
            });
        }
        Ok(vm)
    }

    /// A clone of `substrate` in `vm_dir`, paused and waiting for its incoming migration (from
    /// the substrate's state file, or from a peer).
    async fn spawn_clone(
        &self,
        spec: &VmSpec,
        substrate: &Substrate,
        vm_id: VmId,
        vm_dir: &Path,
    ) -> Result<QemuVm, DriverError> {
        if !substrate.dir.join("kernel-header").exists() {
            return Err(DriverError::Restore(
                "the substrate has no kernel header".into(),
            ));
        }
        mkdir_private(vm_dir)?;
        std::fs::copy(substrate.overlay(), vm_dir.join("overlay.qcow2"))
            .map_err(io_err("copying the overlay"))?;
        let ram = substrate.ram();
        let ram = if spec.config.cow {
            Ram::Private(&ram)
        } else {
            Ram::Anonymous
        };
        self.spawn(spec, vm_id, vm_dir, ram, true).await
    }

    fn write_blank_overlay(spec: &VmSpec, path: &Path) -> Result<(), DriverError> {
        if spec.image.manifest.disk.is_empty() {
            return Err(DriverError::Unsupported(
                "an image without a data disk (a Xen image) under the qemu driver",
            ));
        }
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(spec.image.disk())
            .arg(path)
            .status()
            .map_err(|source| DriverError::Spawn {
                what: "qemu-img",
                source,
            })?;
        if !status.success() {
            return Err(DriverError::Io {
                what: format!("qemu-img create {}", path.display()),
                source: std::io::Error::other(status.to_string()),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl VmDriver for QemuDriver {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn accel(&self) -> String {
        self.accel.as_str().into()
    }

    fn fingerprint(&self, spec: &VmSpec) -> Fingerprint {
        spec.fingerprint(
            self,
            format!("QEMU {}", self.version),
            DEVICE_MODEL,
            spec.config.cow,
        )
    }

    fn localise(&self, spec: &VmSpec, dir: &Path) -> Result<(), DriverError> {
        Self::write_blank_overlay(spec, &Substrate::overlay_path(dir))?;
        write_kernel_header(&spec.image.kernel(), &dir.join("kernel-header"))
    }

    async fn prime(
        &self,
        spec: &VmSpec,
        dir: &Path,
        boot_timeout: Duration,
    ) -> Result<PrimeStats, DriverError> {
        let t0 = Instant::now();
        let _ = std::fs::remove_dir_all(dir);
        let template_dir = dir.join("template");
        mkdir_private(&template_dir)?;
        Self::write_blank_overlay(spec, &Substrate::overlay_path(dir))?;
        write_kernel_header(&spec.image.kernel(), &dir.join("kernel-header"))?;
        std::fs::copy(
            Substrate::overlay_path(dir),
            template_dir.join("overlay.qcow2"),
        )
        .map_err(io_err("copying the overlay"))?;
        let ram = Substrate::ram_path(dir);
        let template_id =
            VmId::new(format!("template-{}", spec.config.name)).map_err(|e| DriverError::Io {
                what: e.to_string(),
                source: std::io::Error::other("bad id"),
            })?;
        let ram = if spec.config.cow {
            Ram::Shared(&ram)
        } else {
            Ram::Anonymous
        };
        let mut vm = self
            .spawn(spec, template_id, &template_dir, ram, false)
            .await?;
        let result = async {
            vm.wait_initialised(boot_timeout).await?;
            let boot_ms = t0.elapsed().as_millis() as u64;
            let t1 = Instant::now();
            // First-use work (allocations, page cache, a clock near the host's) happens once
            // here and is docked with the substrate instead of repeated by every clone.
            vm.exercise(Duration::from_secs(30)).await?;
            tokio::time::sleep(PREWARM_SETTLE).await;
            if let Some(target) = spec.config.balloon_mib {
                vm.balloon_down(&spec.config.name, target).await?;
            }
            let qmp = vm.qmp()?;
            qmp.execute(qmp::stop {}).await.map_err(qmp_err("stop"))?;
            prepare_migration(qmp, spec.config.cow).await?;
            let uri = format!("exec:cat > '{}'", Substrate::state_path(dir).display());
            qmp.execute(qmp::migrate {
                uri: Some(uri),
                channels: None,
                detach: None,
                resume: None,
            })
            .await
            .map_err(qmp_err("migrate"))?;
            wait_migration(qmp, Duration::from_secs(30)).await?;
            let _ = qmp.execute(qmp::quit {}).await;
            Ok::<_, DriverError>((boot_ms, t1))
        }
        .await;
        Box::new(vm).destroy_in_place().await;
        let _ = std::fs::remove_dir_all(&template_dir);
        let (boot_ms, t1) = result?;
        seal_substrate(dir, self.fingerprint(spec), boot_ms, t0, t1)
    }

    async fn restore(
        &self,
        spec: &VmSpec,
        substrate: &Substrate,
        vm_id: VmId,
        vm_dir: &Path,
    ) -> Result<Box<dyn Vm>, DriverError> {
        let t0 = Instant::now();
        let mut vm = self.spawn_clone(spec, substrate, vm_id, vm_dir).await?;
        let spawned_us = t0.elapsed().as_micros() as u64;
        let result = async {
            let qmp = vm.qmp()?;
            prepare_migration(qmp, spec.config.cow).await?;
            let uri = format!("exec:cat '{}'", substrate.state().display());
            qmp.execute(qmp::migrate_incoming {
                uri: Some(uri),
                channels: None,
                exit_on_error: None,
            })
            .await
            .map_err(|e| DriverError::Restore(e.to_string()))?;
            wait_migration(qmp, Duration::from_secs(30)).await
        }
        .await;
        if let Err(e) = result {
            Box::new(vm).destroy_in_place().await;
            return Err(match e {
                DriverError::Qmp { message, .. } => DriverError::Restore(message),
                other => other,
            });
        }
        tracing::debug!(vm_id = %vm.id, spawned_us, restored_us = t0.elapsed().as_micros() as u64, "restored");
        vm.paused = true;
        if spec.config.balloon_mib.is_some() {
            // The balloon only shrinks the parked substrate: a clone gets its full memory back
            // before it first runs (the guest deflates as it resumes), never after `ready`,
            // when a session may already need it.
            let full = i64::from(spec.config.memory_mib) << 20;
            if let Err(e) = vm.qmp()?.execute(qmp::balloon { value: full }).await {
                Box::new(vm).destroy_in_place().await;
                return Err(qmp_err("balloon")(e));
            }
        }
        vm.save_record(&spec.config.name)?;
        Ok(Box::new(vm))
    }

    async fn cold_boot(
        &self,
        spec: &VmSpec,
        vm_id: VmId,
        vm_dir: &Path,
        boot_timeout: Duration,
    ) -> Result<Box<dyn Vm>, DriverError> {
        mkdir_private(vm_dir)?;
        Self::write_blank_overlay(spec, &vm_dir.join("overlay.qcow2"))?;
        let mut vm = self
            .spawn(spec, vm_id, vm_dir, Ram::Anonymous, false)
            .await?;
        if let Err(e) = vm.wait_initialised(boot_timeout).await {
            Box::new(vm).destroy_in_place().await;
            return Err(e);
        }
        vm.save_record(&spec.config.name)?;
        Ok(Box::new(vm))
    }

    async fn adopt(&self, record: &VmRecord, vm_dir: &Path) -> Result<Box<dyn Vm>, DriverError> {
        let dir_arg = vm_dir.join("qmp.sock").display().to_string();
        if !pid_alive(record.pid) || !pid_cmdline(record.pid).iter().any(|a| a.contains(&dir_arg)) {
            return Err(DriverError::Exited(format!(
                "pid {} is not this VM's QEMU",
                record.pid
            )));
        }
        let mut vm = QemuVm::new(
            record.vm_id.clone(),
            vm_dir.to_path_buf(),
            record.pid,
            record.game_port,
            None,
        );
        vm.record = record.clone();
        vm.activated = record.session_id.is_some();
        vm.connect(Instant::now() + Duration::from_secs(5)).await?;
        let status = vm
            .qmp()?
            .execute(qmp::query_status {})
            .await
            .map_err(qmp_err("query-status"))?;
        vm.paused = !status.running;
        Ok(Box::new(vm))
    }

    async fn receive(
        &self,
        spec: &VmSpec,
        substrate: &Substrate,
        vm_id: VmId,
        vm_dir: &Path,
        listen: SocketAddr,
    ) -> Result<Box<dyn Vm>, DriverError> {
        let mut vm = self.spawn_clone(spec, substrate, vm_id, vm_dir).await?;
        let result = async {
            let qmp = vm.qmp()?;
            // The same capabilities as the source, which set them when it was restored.
            prepare_migration(qmp, spec.config.cow).await?;
            qmp.execute(qmp::migrate_incoming {
                uri: Some(format!("tcp:{listen}")),
                channels: None,
                exit_on_error: None,
            })
            .await
            .map_err(|e| DriverError::Migration(format!("listening on {listen}: {e}")))
        }
        .await;
        if let Err(e) = result {
            Box::new(vm).destroy_in_place().await;
            return Err(e);
        }
        vm.paused = true;
        vm.save_record(&spec.config.name)?;
        Ok(Box::new(vm))
    }
}

/// Both sides of a migration: `x-ignore-shared` for copy-on-write substrates (RAM stays in
/// the shared file), and no bandwidth cap (the default cap makes a full save ~15x slower).
async fn prepare_migration(qmp: &QmpService, cow: bool) -> Result<(), DriverError> {
    if cow {
        qmp.execute(qmp::migrate_set_capabilities {
            capabilities: vec![qmp::MigrationCapabilityStatus {
                capability: qmp::MigrationCapability::x_ignore_shared,
                state: true,
            }],
        })
        .await
        .map_err(qmp_err("migrate-set-capabilities"))?;
    }
    let params = qmp::MigrateSetParameters {
        max_bandwidth: Some(64 << 30),
        ..Default::default()
    };
    qmp.execute(qmp::migrate_set_parameters(params))
        .await
        .map_err(qmp_err("migrate-set-parameters"))?;
    Ok(())
}

/// The figures of a completed outgoing migration.
fn migrated(info: &qmp::MigrationInfo) -> Migrated {
    let ms = |v: Option<i64>| v.unwrap_or(0).max(0) as u64;
    Migrated {
        total_ms: ms(info.total_time),
        downtime_ms: ms(info.downtime),
        sent_bytes: info.ram.as_ref().map_or(0, |r| r.transferred.max(0) as u64),
    }
}

/// The first 64 KiB of a bzImage: its boot header and setup code, enough for QEMU to accept
/// it as `-kernel` for a VM that is restored rather than booted.
fn write_kernel_header(kernel: &Path, out: &Path) -> Result<(), DriverError> {
    use std::io::Read;
    let mut head = Vec::with_capacity(64 << 10);
    std::fs::File::open(kernel)
        .and_then(|f| f.take(64 << 10).read_to_end(&mut head))
        .map_err(io_err(format!("reading {}", kernel.display())))?;
    std::fs::write(out, head).map_err(io_err("writing the kernel header"))
}

/// Polls `query-migrate` until the migration (either direction) completes or fails; what it
/// says then.
async fn wait_migration(
    qmp: &QmpService,
    limit: Duration,
) -> Result<qmp::MigrationInfo, DriverError> {
    let deadline = Instant::now() + limit;
    loop {
        let info = qmp
            .execute(qmp::query_migrate {})
            .await
            .map_err(qmp_err("query-migrate"))?;
        match info.status {
            Some(qmp::MigrationStatus::completed) => return Ok(info),
            Some(qmp::MigrationStatus::failed) | Some(qmp::MigrationStatus::cancelled) => {
                return Err(DriverError::Restore(
                    info.error_desc.unwrap_or_else(|| "migration failed".into()),
                ))
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(DriverError::Restore(format!(
                "migration did not finish in {limit:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// What the agent reader task passes on.
#[derive(Debug)]
enum AgentItem {
    Msg(GuestToHost),
    Bad { code: &'static str, message: String },
    Closed,
}

/// One QEMU process and hostd's two connections into it.
pub struct QemuVm {
    id: VmId,
    dir: PathBuf,
    pid: u32,
    game_port: u16,
    child: Option<tokio::process::Child>,
    qmp: Option<QmpService>,
    qmp_task: Option<tokio::task::JoinHandle<()>>,
    agent_tx: Option<tokio::net::unix::OwnedWriteHalf>,
    agent_rx: Option<mpsc::Receiver<AgentItem>>,
    agent_task: Option<tokio::task::JoinHandle<()>>,
    paused: bool,
    activated: bool,
    last_heard: Instant,
    /// Image, session, players and ticket key, kept in `vm.json` for adoption and the gateway.
    record: VmRecord,
    exit_status: Option<String>,
}

impl QemuVm {
    fn new(
        id: VmId,
        dir: PathBuf,
        pid: u32,
        game_port: u16,
        child: Option<tokio::process::Child>,
    ) -> Self {
        Self {
            record: VmRecord::new(id.clone(), "qemu", pid, game_port),
            id,
            dir,
            pid,
            game_port,
            child,
            qmp: None,
            qmp_task: None,
            agent_tx: None,
            agent_rx: None,
            agent_task: None,
            paused: false,
            activated: false,
            last_heard: Instant::now(),
            exit_status: None,
        }
    }

    fn qmp(&self) -> Result<&QmpService, DriverError> {
        self.qmp.as_ref().ok_or(DriverError::Qmp {
            during: "connect",
            message: "not connected".into(),
        })
    }

    /// Connects QMP and the agent socket, retrying until QEMU has created them.
    async fn connect(&mut self, deadline: Instant) -> Result<(), DriverError> {
        let qmp_path = self.dir.join("qmp.sock");
        let agent_path = self.dir.join("agent.sock");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(DriverError::Exited(status.to_string()));
                }
            } else if !pid_alive(self.pid) {
                return Err(DriverError::Exited("process gone".into()));
            }
            if qmp_path.exists() && agent_path.exists() {
                if let Ok(stream) = qapi::futures::QmpStreamTokio::open_uds(&qmp_path).await {
                    let stream = stream
                        .negotiate()
                        .await
                        .map_err(io_err("QMP capabilities negotiation"))?;
                    let (service, task) = stream.spawn_tokio();
                    self.qmp = Some(service);
                    self.qmp_task = Some(task);
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(DriverError::Qmp {
                    during: "connect",
                    message: "QMP socket never answered".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let agent = UnixStream::connect(&agent_path)
            .await
            .map_err(io_err("connecting the agent socket"))?;
        let (mut rd, wr) = agent.into_split();
        let (tx, rx) = mpsc::channel(64);
        self.agent_tx = Some(wr);
        self.agent_rx = Some(rx);
        self.agent_task = Some(tokio::spawn(async move {
            let mut lines = LineBuffer::default();
            let mut buf = vec![0u8; 8192];
            loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(AgentItem::Closed).await;
                        return;
                    }
                    Ok(n) => n,
                };
                let mut out = Vec::new();
                lines.push(&buf[..n], &mut out);
                for line in out {
                    let item = match line {
                        Line::TooLong => AgentItem::Bad {
                            code: "line_too_long",
                            message: "the agent sent an oversize line".into(),
                        },
                        Line::Complete(l) => match decode_line::<GuestToHost>(&l) {
                            Ok(m) => AgentItem::Msg(m),
                            Err(e) => AgentItem::Bad {
                                code: e.code(),
                                message: e.to_string(),
                            },
                        },
                    };
                    if tx.send(item).await.is_err() {
                        return;
                    }
                }
            }
        }));
        Ok(())
    }

    fn save_record(&mut self, image: &str) -> Result<(), DriverError> {
        self.record.save_as(image, &self.dir)
    }

    /// Next item from the agent, or the VM's exit.
    async fn next_agent(&mut self) -> Result<AgentItem, DriverError> {
        let Some(rx) = self.agent_rx.as_mut() else {
            return Err(DriverError::Exited("agent not connected".into()));
        };
        let exit = async {
            match self.child.as_mut() {
                Some(child) => child
                    .wait()
                    .await
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string()),
                None => loop {
                    if !pid_alive(self.pid) {
                        return "process gone".to_string();
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                },
            }
        };
        tokio::select! {
            item = rx.recv() => Ok(item.unwrap_or(AgentItem::Closed)),
            status = exit => {
                self.exit_status = Some(status.clone());
                Err(DriverError::Exited(status))
            }
        }
    }

    /// Waits for the agent message `pick` accepts; an `error` from the agent is a refusal,
    /// bad lines are logged, and `late` is the error when `timeout` passes first.
    async fn wait_for<T>(
        &mut self,
        timeout: Duration,
        late: DriverError,
        mut pick: impl FnMut(GuestToHost) -> Option<Result<T, DriverError>> + Send,
    ) -> Result<T, DriverError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Ok(item) = tokio::time::timeout_at(deadline, self.next_agent()).await else {
                return Err(late);
            };
            match item? {
                AgentItem::Msg(GuestToHost::Error { code, message }) => {
                    return Err(DriverError::AgentRefused { code, message })
                }
                AgentItem::Msg(GuestToHost::GameExited { status, stderr }) => {
                    return Err(DriverError::GameExited { status, stderr })
                }
                AgentItem::Msg(msg) => {
                    if let Some(result) = pick(msg) {
                        return result;
                    }
                }
                AgentItem::Bad { code, message } => {
                    tracing::warn!(vm_id = %self.id, code, %message, "bad line from guest");
                }
                // QEMU's socket closes only with QEMU; let the exit path report it.
                AgentItem::Closed => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    async fn wait_initialised(&mut self, timeout: Duration) -> Result<(), DriverError> {
        self.wait_for(
            timeout,
            DriverError::BootTimeout(timeout),
            |msg| match msg {
                GuestToHost::Initialised { version, .. } if version != AGENT_PROTOCOL_VERSION => {
                    Some(Err(DriverError::AgentVersion {
                        found: version,
                        expected: AGENT_PROTOCOL_VERSION,
                    }))
                }
                GuestToHost::Initialised { .. } => Some(Ok(())),
                _ => None,
            },
        )
        .await
    }

    /// Balloons the template down to `target_mib` and waits until it is there; a guest that
    /// cannot give that much back is refused ([`super::balloon_reached`]).
    async fn balloon_down(&mut self, image: &str, target_mib: u32) -> Result<(), DriverError> {
        let qmp = self.qmp()?;
        qmp.execute(qmp::balloon {
            value: i64::from(target_mib) << 20,
        })
        .await
        .map_err(qmp_err("balloon"))?;
        let limit = Duration::from_secs(20);
        super::balloon_reached(
            image,
            target_mib,
            Duration::from_millis(20),
            limit,
            || async {
                let info = qmp
                    .execute(qmp::query_balloon {})
                    .await
                    .map_err(qmp_err("query-balloon"))?;
                Ok((info.actual >> 20) as u64)
            },
        )
        .await
    }

    async fn kill(&mut self) {
        self.qmp = None;
        if let Some(t) = self.qmp_task.take() {
            t.abort();
        }
        if let Some(t) = self.agent_task.take() {
            t.abort();
        }
        self.agent_tx = None;
        if self.pid != 0 && self.exit_status.is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        match self.child.as_mut() {
            Some(child) => {
                let _ = child.wait().await;
            }
            None => {
                for _ in 0..500 {
                    if !pid_alive(self.pid) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Writes one line to the agent.
    async fn send(&mut self, msg: &HostToGuest) -> Result<(), DriverError> {
        let tx = self
            .agent_tx
            .as_mut()
            .ok_or(DriverError::Exited("agent not connected".into()))?;
        tx.write_all(&encode_line(msg))
            .await
            .map_err(io_err("writing to the agent"))
    }

    /// Runs the guest's activation paths once without activating it: `prewarm` to the agent
    /// and one TCP connection to the game port (answered `not_activated`).
    async fn exercise(&mut self, timeout: Duration) -> Result<(), DriverError> {
        self.send(&HostToGuest::Prewarm {
            wall_clock_ms: now_ms(),
        })
        .await?;
        // One connection to the game port runs the guest's accept path; a game that speaks
        // first (the arena's hello) runs its own too. Not every game speaks first: the touch
        // ends when the agent's warm-up does.
        let addr = self.game_addr();
        let mut touch = tokio::spawn(tokio::time::timeout(timeout, async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            let mut line = String::new();
            tokio::io::AsyncBufReadExt::read_line(&mut tokio::io::BufReader::new(stream), &mut line)
                .await
        }));
        let warmed = self
            .wait_for(timeout, DriverError::ReadyTimeout(timeout), |msg| {
                matches!(msg, GuestToHost::Prewarmed).then_some(Ok(()))
            })
            .await;
        if tokio::time::timeout(TOUCH_GRACE, &mut touch).await.is_err() {
            // A game that waits for the client to speak first: the connect was the touch.
            tracing::debug!(vm_id = %self.id, "the game port said nothing on connect");
            touch.abort();
        }
        warmed
    }

    async fn destroy_in_place(mut self: Box<Self>) {
        self.kill().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn id(&self) -> &VmId {
        &self.id
    }

    fn game_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.game_port))
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    fn dir(&self) -> &Path {
        &self.dir
    }

    async fn activate(
        &mut self,
        mut identity: Identity,
        timeout: Duration,
    ) -> Result<Ready, DriverError> {
        let t0 = Instant::now();
        if self.paused {
            self.qmp()?
                .execute(qmp::cont {})
                .await
                .map_err(qmp_err("cont"))?;
            self.paused = false;
        }
        let resumed_us = t0.elapsed().as_micros() as u64;
        identity.wall_clock_ms = now_ms();
        let session_id = identity.session_id.clone();
        let gate = (identity.players.clone(), identity.ticket_key.clone());
        self.send(&HostToGuest::Identity(identity)).await?;
        let wrote_us = t0.elapsed().as_micros() as u64;
        let (guest_clock_ms, apply_us) = self
            .wait_for(
                timeout,
                DriverError::ReadyTimeout(timeout),
                |msg| match msg {
                    GuestToHost::Ready {
                        session_id: s,
                        clock_ms,
                        apply_us,
                        ..
                    } if s == session_id => Some(Ok((clock_ms, apply_us))),
                    _ => None,
                },
            )
            .await?;
        tracing::debug!(vm_id = %self.id, resumed_us, wrote_us, apply_us,
            ready_us = t0.elapsed().as_micros() as u64, "agent ready");
        self.activated = true;
        self.last_heard = Instant::now();
        let (players, ticket_key) = gate;
        self.record.serve(session_id.clone(), players, ticket_key);
        self.record
            .save(&self.dir)
            .map_err(io_err("writing vm.json"))?;
        Ok(Ready {
            session_id,
            guest_clock_ms,
            host_clock_ms: now_ms(),
            activate_us: t0.elapsed().as_micros() as u64,
        })
    }

    async fn prewarm(&mut self, timeout: Duration) -> Result<(), DriverError> {
        if !self.paused || self.activated {
            return Ok(());
        }
        let qmp = self.qmp()?;
        qmp.execute(qmp::cont {}).await.map_err(qmp_err("cont"))?;
        self.exercise(timeout).await?;
        // Let the guest finish the work the prewarm deferred (timers, workqueues after the
        // clock change) now, rather than during the real activation.
        tokio::time::sleep(PREWARM_SETTLE).await;
        self.qmp()?
            .execute(qmp::stop {})
            .await
            .map_err(qmp_err("stop"))?;
        Ok(())
    }

    async fn send_to(
        &mut self,
        to: SocketAddr,
        downtime: Duration,
        timeout: Duration,
    ) -> Result<Migrated, DriverError> {
        let qmp = self.qmp()?;
        let params = qmp::MigrateSetParameters {
            downtime_limit: Some(downtime.as_millis() as u64),
            max_bandwidth: Some(64 << 30),
            ..Default::default()
        };
        qmp.execute(qmp::migrate_set_parameters(params))
            .await
            .map_err(qmp_err("migrate-set-parameters"))?;
        let sent = async {
            qmp.execute(qmp::migrate {
                uri: Some(format!("tcp:{to}")),
                channels: None,
                detach: None,
                resume: None,
            })
            .await
            .map_err(|e| DriverError::Migration(e.to_string()))?;
            wait_migration(qmp, timeout).await
        }
        .await;
        match sent {
            Ok(info) => {
                self.paused = true;
                Ok(migrated(&info))
            }
            Err(e) => {
                // A failed migration leaves the source running, unless it failed in its last
                // stop-and-copy: then QEMU keeps it paused. Either way it plays on here.
                let _ = qmp.execute(qmp::migrate_cancel {}).await;
                let status = qmp.execute(qmp::query_status {}).await;
                if status.is_ok_and(|s| !s.running) {
                    qmp.execute(qmp::cont {}).await.map_err(qmp_err("cont"))?;
                }
                Err(match e {
                    DriverError::Restore(m) => DriverError::Migration(m),
                    other => other,
                })
            }
        }
    }

    async fn finish_receive(
        &mut self,
        (session, players, ticket_key): (SessionId, Vec<PlayerId>, String),
        timeout: Duration,
    ) -> Result<(), DriverError> {
        let qmp = self.qmp()?;
        wait_migration(qmp, timeout).await.map_err(|e| match e {
            DriverError::Restore(m) => DriverError::Migration(m),
            other => other,
        })?;
        qmp.execute(qmp::cont {}).await.map_err(qmp_err("cont"))?;
        self.paused = false;
        self.activated = true;
        self.last_heard = Instant::now();
        // The guest's clock stood still while it was paused: set it to this host's.
        self.send(&HostToGuest::Clock {
            wall_clock_ms: now_ms(),
        })
        .await?;
        self.record.serve(session, players, ticket_key);
        self.record
            .save(&self.dir)
            .map_err(io_err("writing vm.json"))
    }

    async fn event(&mut self, silence: Duration) -> VmEvent {
        loop {
            let wait = silence.saturating_sub(self.last_heard.elapsed());
            let next = if self.activated {
                match tokio::time::timeout(wait, self.next_agent()).await {
                    Ok(r) => r,
                    Err(_) => {
                        return VmEvent::Silent {
                            for_ms: self.last_heard.elapsed().as_millis() as u64,
                        }
                    }
                }
            } else {
                self.next_agent().await
            };
            match next {
                Err(DriverError::Exited(status)) => return VmEvent::Exited { status },
                Err(e) => {
                    return VmEvent::Exited {
                        status: e.to_string(),
                    }
                }
                Ok(AgentItem::Msg(GuestToHost::Heartbeat { .. })) => {
                    self.last_heard = Instant::now()
                }
                Ok(AgentItem::Msg(GuestToHost::Ended {
                    reason, results, ..
                })) => return VmEvent::Ended { reason, results },
                Ok(AgentItem::Msg(GuestToHost::GameExited { status, stderr })) => {
                    return VmEvent::Exited {
                        status: DriverError::GameExited { status, stderr }.to_string(),
                    }
                }
                Ok(AgentItem::Closed) => {
                    // The socket closes when QEMU goes away; wait for the exit to be seen.
                    self.agent_rx = None;
                    let status = match self.child.as_mut() {
                        Some(c) => c
                            .wait()
                            .await
                            .map(|s| s.to_string())
                            .unwrap_or_else(|e| e.to_string()),
                        None => "agent socket closed".into(),
                    };
                    self.exit_status = Some(status.clone());
                    return VmEvent::Exited { status };
                }
                Ok(AgentItem::Bad { code, message }) => {
                    tracing::warn!(vm_id = %self.id, code, %message, "bad line from guest");
                }
                Ok(AgentItem::Msg(other)) => {
                    tracing::debug!(vm_id = %self.id, ?other, "agent message");
                }
            }
        }
    }

    async fn destroy(self: Box<Self>) {
        self.destroy_in_place().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_is_read_from_cpuinfo() {
        // Every x86 Linux host has a "cpu MHz" line.
        assert!(host_tsc_khz().is_some_and(|k| k > 100_000));
    }
}
