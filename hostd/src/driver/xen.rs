//! The Xen driver, as in the paper: `xl save`/`xl restore` substrates and identity through
//! XenStore.
//!
//! **Tested on a real Xen, nested in QEMU TCG** (`cargo xtask test` runs the tier; see
//! `docs/operations.md`, "Xen"): Xen 4.17 and dom0 from stock Debian packages, hostd built
//! with the `xen` feature running in dom0 against the real `xl`, `xenstored` and netback, and
//! `berth-hostd selftest` driving this driver through the pool: prime, three activations (each
//! with its own identity, each game answering from dom0 as its own session), destroy, nothing
//! left in `xl list` or in the state folder. The guest is a **PV** domain (a PVH one needs
//! the nested SVM that QEMU's TCG emulates, and was far slower and unstable there).
//!
//! What this driver does not do, and a bare-metal Xen host would still need:
//! - **networking beyond dom0**: each domain has one vif, brought up by the `vif-berth`
//!   hotplug script (no bridge, no addresses); dom0 reaches the game by the guest's IPv6
//!   link-local address scoped to that vif ([`game_addr_on`]), so hostd's gateway in dom0 can
//!   proxy players to it. Players coming straight to a VM need a bridge or routing and a
//!   per-clone address, set at activation.
//! - **disks**: the domain config has no `disk = [...]`: the guest carries its game data in its
//!   initramfs. A data disk needs blkback and a copy-on-write backend per clone.
//! - **copy-on-write memory**: every `xl restore` copies the whole saved RAM into the new
//!   domain; there is no equivalent of the QEMU driver's shared RAM file.
//!
//! Commands run through `tokio::process::Command` with argument vectors, never a shell; the
//! helpers here build them. `xenstore-chmod` (from `xenstore-utils`) must be on `PATH` in dom0:
//! `xenstore-rs` has no call to set permissions.
//!
//! ```text
//! prime     xl create -e <dir>/domain.cfg          cold boot of the image (PV)
//!           wait /local/domain/<domid>/data/berth/initialised
//!           xl mem-set <name> <balloon>m           miniaturisation (if configured)
//!           xl save <name> <dir>/state             the domain is gone after this
//!           <dir>/substrate.json                   header, as for QEMU
//! restore   xl restore -p -e <vm>/domain.cfg <dir>/state   new name, NEW domid, paused
//!           write data/berth (empty) + xenstore-chmod -r … n<domid>   the guest owns it again
//! activate  write data/berth/identity              one JSON line, wall clock set to now
//!           xl unpause <name>
//!           wait data/berth/ready                  Ready (matching session) or Error
//! running   data/berth/event                       heartbeats, then a sticky `ended`
//!           xl list <name>                         gone, crashed or shut down → Exited
//! destroy   xl destroy <name>; rm -r <vm dir>
//! ```
//!
//! Keys are watched (XenStore watch) and re-read on a short poll as well, so a lost watch
//! event costs latency, not correctness. A failing `xl list` (the tool, not the domain) is
//! logged and asked again; only `xl` saying the domain does not exist ends a VM. [`Vm::prewarm`](crate::driver::Vm::prewarm) keeps
//! the trait's no-op: warming up translated code is a TCG concern of the QEMU driver. `-e` keeps `xl` from leaving a monitor process per
//! domain; a crashed domain therefore stays in `xl list` as crashed until hostd destroys it.

use berth_protocol::guest::GAME_PORT;
use berth_protocol::guest::{HostToGuest, Identity};
use berth_protocol::xenstore;
use berth_protocol::VmId;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::Path;

/// Bumped whenever the domain config below changes: old substrates are then re-primed.
pub const DEVICE_MODEL: &str = "xen-pv-1";

/// XenStore paths of one domain's agent keys (the layout is [`berth_protocol::xenstore`]'s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentKeys {
    pub domid: u32,
    pub base: String,
}

impl AgentKeys {
    pub fn for_domid(domid: u32) -> Self {
        Self {
            domid,
            base: xenstore::domain_path(domid, xenstore::DIR),
        }
    }
    /// hostd → agent: the identity JSON line.
    pub fn identity(&self) -> String {
        xenstore::domain_path(self.domid, xenstore::IDENTITY_KEY)
    }
    /// agent → hostd: the `initialised` message.
    pub fn initialised(&self) -> String {
        xenstore::domain_path(self.domid, xenstore::INITIALISED_KEY)
    }
    /// agent → hostd: the `ready` message (or the agent's `error` refusing the identity).
    pub fn ready(&self) -> String {
        xenstore::domain_path(self.domid, xenstore::READY_KEY)
    }
    /// agent → hostd: heartbeats and `ended`.
    pub fn event(&self) -> String {
        xenstore::domain_path(self.domid, xenstore::EVENT_KEY)
    }
}

/// The MAC address of every game VM's one vif. All clones of a substrate share it (they are the
/// same guest), and that is fine: each clone sits alone on its own vif in dom0.
pub const GUEST_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x42, 0x00, 0x01];

/// The libxl hotplug script of the vif (`/etc/xen/scripts/vif-berth`, shipped in
/// `assets/xen/vif-berth`): brings the backend interface up, nothing else.
pub const VIF_SCRIPT: &str = "vif-berth";

/// The guest's IPv6 link-local address (EUI-64 from its MAC): how dom0 reaches a game VM, on
/// the scope of that VM's vif. It needs no addressing at activation: the guest keeps the address
/// it had when it was docked, and each restored clone gets a vif of its own.
pub fn guest_link_local(mac: [u8; 6]) -> Ipv6Addr {
    let [a, b, c, d, e, f] = mac;
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        u16::from_be_bytes([a ^ 0x02, b]),
        u16::from_be_bytes([c, 0xff]),
        u16::from_be_bytes([0xfe, d]),
        u16::from_be_bytes([e, f]),
    )
}

/// The backend interface of a domain's first vif in dom0 (Linux netback's naming).
pub fn vif_name(domid: u32) -> String {
    format!("vif{domid}.0")
}

/// Where a domain's game port is reachable from dom0: the guest's link-local address, scoped
/// to the vif with interface index `ifindex`.
pub fn game_addr_on(ifindex: u32) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        guest_link_local(GUEST_MAC),
        GAME_PORT,
        0,
        ifindex,
    ))
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The domain name hostd gives a VM: `berth-<vm id>`.
pub fn domain_name(vm_id: &VmId) -> String {
    format!("berth-{vm_id}")
}

fn argv<const N: usize>(args: [&str; N]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `xl create` of a domain config. `-e`: no `xl` monitor process stays behind per domain.
pub fn xl_create(config: &Path) -> Vec<String> {
    argv(["xl", "create", "-e", &config.display().to_string()])
}

/// `xl mem-set` for miniaturisation (and back to full size after activation).
pub fn xl_mem_set(domain: &str, mib: u32) -> Vec<String> {
    argv(["xl", "mem-set", domain, &format!("{mib}m")])
}

/// `xl save` into the substrate's state file (the domain is destroyed by it).
pub fn xl_save(domain: &str, state: &Path) -> Vec<String> {
    argv(["xl", "save", domain, &state.display().to_string()])
}

/// `xl restore`, paused. `xl restore` takes no `key=value` overrides: the clone's new name
/// comes from `config`, a domain config equal to the substrate's but for its `name`.
pub fn xl_restore(config: &Path, state: &Path) -> Vec<String> {
    argv([
        "xl",
        "restore",
        "-p",
        "-e",
        &config.display().to_string(),
        &state.display().to_string(),
    ])
}

pub fn xl_unpause(domain: &str) -> Vec<String> {
    argv(["xl", "unpause", domain])
}

pub fn xl_destroy(domain: &str) -> Vec<String> {
    argv(["xl", "destroy", domain])
}

pub fn xl_domid(domain: &str) -> Vec<String> {
    argv(["xl", "domid", domain])
}

/// `xl list` of one domain: its domid, memory and state flags.
pub fn xl_list(domain: &str) -> Vec<String> {
    argv(["xl", "list", domain])
}

/// `xl info`, for the hypervisor version in the substrate fingerprint.
pub fn xl_info() -> Vec<String> {
    argv(["xl", "info"])
}

/// Gives the agent subtree to the guest: owner `domid`, no access for other domains (dom0 is
/// privileged and keeps full access). `xenstore-rs` cannot set permissions itself.
pub fn xenstore_chmod(path: &str, domid: u32) -> Vec<String> {
    argv(["xenstore-chmod", "-r", path, &format!("n{domid}")])
}

/// The `xl` domain config for priming an image (and, with another name, for restoring it).
///
/// PV, one vif (routed by [`VIF_SCRIPT`], reached by link-local) and no disk: see the module
/// docs.
pub fn domain_config(
    name: &str,
    kernel: &Path,
    initrd: &Path,
    memory_mib: u32,
    vcpus: u32,
    cmdline: &str,
) -> String {
    format!(
        "name = \"{name}\"\ntype = \"pv\"\nkernel = \"{}\"\nramdisk = \"{}\"\nmemory = {memory_mib}\nmaxmem = {memory_mib}\nvcpus = {vcpus}\nextra = \"{}\"\nvif = [ \"mac={},script={VIF_SCRIPT}\" ]\non_crash = \"destroy\"\n",
        kernel.display(),
        initrd.display(),
        cmdline.replace('"', ""),
        mac_string(GUEST_MAC),
    )
}

/// The guest kernel command line under Xen: the image's, the configured extra, the Xen console
/// and the agent transport. Like `BERTH_INIT_MS`, `BERTH_TRANSPORT=xen` has no dot, so the
/// kernel hands it to `/init` (and so to the agent) as an environment variable.
pub fn guest_cmdline(image_cmdline: &str, extra: Option<&str>) -> String {
    let mut cmdline = image_cmdline.trim().to_string();
    if let Some(extra) = extra {
        cmdline.push(' ');
        cmdline.push_str(extra.trim());
    }
    cmdline.push_str(" console=hvc0 BERTH_TRANSPORT=xen");
    cmdline.trim_start().to_string()
}

/// Reads `xl domid` output: one decimal number.
pub fn parse_domid(stdout: &str) -> Option<u32> {
    stdout.trim().parse().ok()
}

/// Reads the `xen_version` line of `xl info` ("xen_version            : 4.17.3").
pub fn parse_xen_version(xl_info: &str) -> Option<String> {
    xl_info.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "xen_version" && !value.trim().is_empty()).then(|| value.trim().to_string())
    })
}

/// The state column of `xl list` (`r-----`, `--p---`, …).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DomainState {
    pub running: bool,
    pub blocked: bool,
    pub paused: bool,
    pub shutdown: bool,
    pub crashed: bool,
    pub dying: bool,
}

impl DomainState {
    /// Parses the six-character flag field; `None` for anything else.
    pub fn parse(flags: &str) -> Option<Self> {
        if flags.len() != 6 || !flags.chars().all(|c| "rbpscd-".contains(c)) {
            return None;
        }
        Some(Self {
            running: flags.contains('r'),
            blocked: flags.contains('b'),
            paused: flags.contains('p'),
            shutdown: flags.contains('s'),
            crashed: flags.contains('c'),
            dying: flags.contains('d'),
        })
    }

    /// Why a domain in this state counts as gone, if it does.
    pub fn ended(&self) -> Option<&'static str> {
        if self.crashed {
            Some("domain crashed")
        } else if self.shutdown {
            Some("domain shut down")
        } else if self.dying {
            Some("domain is dying")
        } else {
            None
        }
    }
}

/// One row of `xl list`.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainInfo {
    pub name: String,
    pub domid: u32,
    pub mem_mib: u64,
    pub vcpus: u32,
    pub state: DomainState,
    pub cpu_time_s: f64,
}

/// Parses `xl list` output. Columns are read from the right, so a name with spaces survives;
/// the header and any malformed line are skipped.
pub fn parse_xl_list(stdout: &str) -> Vec<DomainInfo> {
    stdout
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let n = fields.len();
            if n < 6 || fields[0] == "Name" {
                return None;
            }
            Some(DomainInfo {
                name: fields[..n - 5].join(" "),
                domid: fields[n - 5].parse().ok()?,
                mem_mib: fields[n - 4].parse().ok()?,
                vcpus: fields[n - 3].parse().ok()?,
                state: DomainState::parse(fields[n - 2])?,
                cpu_time_s: fields[n - 1].parse().ok()?,
            })
        })
        .collect()
}

pub use berth_protocol::xenstore::{max_value_len, ValueTooLarge, PAYLOAD_MAX};

/// Encodes `identity` as the value of the identity key at `path`: the protocol's JSON line
/// without its newline (the agent decodes it with `decode_line`, which takes either).
pub fn identity_value(identity: &Identity, path: &str) -> Result<String, ValueTooLarge> {
    xenstore::checked_value(&HostToGuest::Identity(identity.clone()), path)
}

#[cfg(feature = "xen")]
pub use live::{XenDriver, XenVm};

/// The driver proper: only where the `xen` feature is on. See the module docs: untested.
#[cfg(feature = "xen")]
mod live {
    use super::*;
    use crate::driver::files::{io_err, mkdir_private, seal_substrate};
    use crate::driver::{DriverError, PrimeStats, Ready, Vm, VmDriver, VmEvent, VmRecord, VmSpec};
    use crate::substrate::{Fingerprint, Substrate};
    use crate::util::now_ms;
    use async_trait::async_trait;
    use berth_protocol::guest::{decode_line, GuestToHost, LineError, AGENT_PROTOCOL_VERSION};
    use futures::{Stream, StreamExt};
    use std::path::PathBuf;
    use std::pin::Pin;
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    use xenstore_rs::tokio::XsTokio;
    use xenstore_rs::{AsyncWatch, AsyncXs};

    /// Limit for quick `xl` calls (list, domid, unpause, destroy, mem-set, info, chmod).
    const XL_QUICK: Duration = Duration::from_secs(30);
    /// Limit for `xl create`, `save` and `restore` (seconds each in nested TCG).
    const XL_SLOW: Duration = Duration::from_secs(180);
    /// Re-read a watched key at least this often (a watch event can be missed).
    const KEY_POLL: Duration = Duration::from_millis(100);
    /// Re-read the `event` key at least this often.
    const EVENT_POLL: Duration = Duration::from_millis(500);
    /// Check that the domain still exists this often.
    const DOMAIN_CHECK: Duration = Duration::from_secs(1);
    /// How long miniaturisation may take before docking anyway.
    const BALLOON_WAIT: Duration = Duration::from_secs(10);

    type WatchStream = Pin<Box<dyn Stream<Item = Box<str>> + Send>>;

    fn program(argv: &[String]) -> &'static str {
        match argv.first().map(String::as_str) {
            Some("xenstore-chmod") => "xenstore-chmod",
            _ => "xl",
        }
    }

    /// One toolstack command at a time. In the nested-Xen tier, `xl` processes running side
    /// by side (a liveness `xl list` during an `xl restore`) crashed one another's memory; on
    /// any host, libxl serialises domain creation anyway.
    static TOOLSTACK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Runs one argument vector (no shell) within `limit`, after any command already running;
    /// its stdout on success.
    async fn run(argv: &[String], limit: Duration) -> Result<String, DriverError> {
        let _turn = TOOLSTACK.lock().await;
        run_now(argv, limit).await
    }

    /// [`run`] for callers that hold the toolstack's turn.
    async fn run_now(argv: &[String], limit: Duration) -> Result<String, DriverError> {
        let Some((prog, args)) = argv.split_first() else {
            return Err(DriverError::Io {
                what: "running an empty command".into(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        };
        let shown = argv.join(" ");
        let child = tokio::process::Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(limit, child)
            .await
            .map_err(|_| DriverError::Io {
                what: format!("`{shown}` did not finish within {limit:?}"),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            })?
            .map_err(|source| DriverError::Spawn {
                what: program(argv),
                source,
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            // A tool killed by a signal crashed; `Interrupted` marks it (see `tool_crashed`).
            let kind = if std::os::unix::process::ExitStatusExt::signal(&out.status).is_some() {
                std::io::ErrorKind::Interrupted
            } else {
                std::io::ErrorKind::Other
            };
            return Err(DriverError::Io {
                what: format!("`{shown}` failed ({}): {}", out.status, stderr.trim()),
                source: std::io::Error::new(kind, out.status.to_string()),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The domid of a domain by name.
    async fn domid_of(name: &str) -> Result<u32, DriverError> {
        let out = run(&xl_domid(name), XL_QUICK).await?;
        parse_domid(&out).ok_or_else(|| DriverError::Io {
            what: format!("unexpected `xl domid {name}` output: {out:?}"),
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        })
    }

    /// The `xl list` row of a domain: [`DriverError::Exited`] when `xl` says there is no such
    /// domain, another error when `xl` itself failed (then nobody knows; callers ask again).
    async fn domain_info(name: &str) -> Result<DomainInfo, DriverError> {
        let _turn = TOOLSTACK.lock().await;
        domain_info_now(name).await
    }

    async fn domain_info_now(name: &str) -> Result<DomainInfo, DriverError> {
        let out = run_now(&xl_list(name), XL_QUICK)
            .await
            .map_err(|e| match e {
                DriverError::Io { ref what, .. } if what.contains("invalid domain identifier") => {
                    DriverError::Exited(format!("domain {name} is gone"))
                }
                other => other,
            })?;
        parse_xl_list(&out)
            .into_iter()
            .find(|d| d.name == name)
            .ok_or_else(|| DriverError::Exited(format!("domain {name} is not in `xl list`")))
    }

    /// `Ok` while the domain exists and has not crashed or shut down.
    async fn domain_alive(name: &str) -> Result<DomainInfo, DriverError> {
        alive(domain_info(name).await?, name)
    }

    fn alive(info: DomainInfo, name: &str) -> Result<DomainInfo, DriverError> {
        match info.state.ended() {
            Some(why) => Err(DriverError::Exited(format!("{why} ({name})"))),
            None => Ok(info),
        }
    }

    /// The periodic liveness check: [`domain_alive`] when the toolstack is idle; while another
    /// command runs it is skipped (`Ok`): the next check comes a second later.
    async fn domain_check(name: &str) -> Result<(), DriverError> {
        let Ok(_turn) = TOOLSTACK.try_lock() else {
            return Ok(());
        };
        alive(domain_info_now(name).await?, name).map(drop)
    }

    /// Where dom0 reaches the game port of domain `domid`: on its vif, which the hotplug
    /// script has brought up by the time `xl create`/`xl restore` returns.
    fn vif_game_addr(domid: u32) -> Result<SocketAddr, DriverError> {
        let vif = vif_name(domid);
        let path = format!("/sys/class/net/{vif}/ifindex");
        let text = std::fs::read_to_string(&path).map_err(io_err(format!(
            "reading {path}: domain {domid} has no vif in dom0 (is {VIF_SCRIPT} in /etc/xen/scripts?)"
        )))?;
        let ifindex = text.trim().parse().map_err(|_| DriverError::Io {
            what: format!("{path} holds {text:?}, not an interface index"),
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        })?;
        Ok(game_addr_on(ifindex))
    }

    /// Best effort: a domain that may or may not exist is destroyed.
    /// A failing `xl` (not a missing domain) is asked again, a few times.
    const XL_ATTEMPTS: u32 = 3;

    /// True when the tool itself crashed (killed by a signal), which says nothing about the
    /// domain or the substrate.
    fn tool_crashed(e: &DriverError) -> bool {
        matches!(e, DriverError::Io { source, .. } if source.kind() == std::io::ErrorKind::Interrupted)
    }

    /// True when `xl` failed because the domain does not exist.
    fn no_such_domain(e: &DriverError) -> bool {
        matches!(e, DriverError::Io { what, .. } if what.contains("invalid domain identifier"))
    }

    /// Best effort: a domain that may or may not exist is destroyed (a crashed `xl` is run
    /// again, so one fault does not leave a domain behind).
    async fn destroy_domain(name: &str) {
        for attempt in 1..=XL_ATTEMPTS {
            match run(&xl_destroy(name), XL_QUICK).await {
                Ok(_) => return,
                Err(e) if no_such_domain(&e) => return,
                Err(e) => {
                    tracing::warn!(domain = name, attempt, error = %e, "xl destroy failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    fn bad_value(path: &str, e: &LineError) {
        tracing::warn!(path, code = e.code(), error = %e, "bad agent value in XenStore");
    }

    /// hostd's XenStore connection (dom0's `xenstored` socket, else `/dev/xen/xenbus`).
    #[derive(Clone)]
    struct Store(XsTokio);

    impl Store {
        async fn open() -> Result<Self, DriverError> {
            XsTokio::new()
                .await
                .map(Self)
                .map_err(io_err("opening XenStore (is this a Xen dom0?)"))
        }

        /// The value at `path`, `None` if there is no such node.
        async fn read(&self, path: &str) -> Result<Option<String>, DriverError> {
            match self.0.read(path).await {
                Ok(v) => Ok(Some(v.into())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(DriverError::Io {
                    what: format!("reading XenStore {path}"),
                    source,
                }),
            }
        }

        async fn write(&self, path: &str, value: &str) -> Result<(), DriverError> {
            self.0
                .write(path, value)
                .await
                .map_err(io_err(format!("writing XenStore {path}")))
        }

        /// A watch on `path`, or `None` (then callers only poll).
        async fn watch(&self, path: &str) -> Option<WatchStream> {
            match self.0.watch(path).await {
                Ok(stream) => Some(Box::pin(stream)),
                Err(e) => {
                    tracing::debug!(path, error = %e, "XenStore watch failed; polling only");
                    None
                }
            }
        }
    }

    /// Waits for the next watch event on `watch`, at most `max`.
    async fn wait_change(watch: &mut Option<WatchStream>, max: Duration) {
        match watch {
            Some(stream) => {
                if let Ok(None) = tokio::time::timeout(max, stream.next()).await {
                    // The XenStore task is gone; keep polling.
                    *watch = None;
                }
            }
            None => tokio::time::sleep(max).await,
        }
    }

    /// Waits until the value at `path` is one `take` accepts (it sees each distinct value
    /// once), checking every [`DOMAIN_CHECK`] that domain `name` is still there. No time
    /// limit: callers wrap it in one.
    async fn wait_key<T>(
        store: &Store,
        name: &str,
        path: &str,
        mut take: impl FnMut(&str) -> Option<Result<T, DriverError>>,
    ) -> Result<T, DriverError> {
        let mut watch = store.watch(path).await;
        let mut checked = Instant::now();
        let mut seen: Option<String> = None;
        loop {
            if let Some(value) = store.read(path).await? {
                if seen.as_deref() != Some(value.as_str()) {
                    if let Some(result) = take(&value) {
                        return result;
                    }
                    seen = Some(value);
                }
            }
            if checked.elapsed() >= DOMAIN_CHECK {
                match domain_check(name).await {
                    Err(e @ DriverError::Exited(_)) => return Err(e),
                    Err(e) => tracing::warn!(domain = name, error = %e, "checking the domain"),
                    Ok(_) => {}
                }
                checked = Instant::now();
            }
            wait_change(&mut watch, KEY_POLL).await;
        }
    }

    /// Waits for the agent's `initialised` in domain `name`.
    async fn wait_initialised(
        store: &Store,
        name: &str,
        domid: u32,
        timeout: Duration,
    ) -> Result<(), DriverError> {
        let path = AgentKeys::for_domid(domid).initialised();
        let wait = wait_key(store, name, &path, |value| {
            match decode_line::<GuestToHost>(value.as_bytes()) {
                Ok(GuestToHost::Initialised { version, .. })
                    if version == AGENT_PROTOCOL_VERSION =>
                {
                    Some(Ok(()))
                }
                Ok(GuestToHost::Initialised { version, .. }) => {
                    Some(Err(DriverError::AgentVersion {
                        found: version,
                        expected: AGENT_PROTOCOL_VERSION,
                    }))
                }
                Ok(other) => {
                    tracing::debug!(domain = name, ?other, "agent message while booting");
                    None
                }
                Err(e) => {
                    bad_value(&path, &e);
                    None
                }
            }
        });
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| DriverError::BootTimeout(timeout))?
    }

    /// The Xen driver: `xl` for domains, XenStore for the agent.
    #[derive(Clone)]
    pub struct XenDriver {
        version: String,
        store: Store,
    }

    impl std::fmt::Debug for XenDriver {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("XenDriver")
                .field("version", &self.version)
                .finish()
        }
    }

    impl XenDriver {
        /// Reads the Xen version (`xl info`) and connects to XenStore. Only works in dom0.
        pub async fn new() -> Result<Self, DriverError> {
            let info = run(&xl_info(), XL_QUICK).await?;
            let version = parse_xen_version(&info).ok_or_else(|| DriverError::Io {
                what: "`xl info` has no xen_version line".into(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidData),
            })?;
            Ok(Self {
                version,
                store: Store::open().await?,
            })
        }

        pub fn version(&self) -> &str {
            &self.version
        }

        fn config_for(spec: &VmSpec, name: &str) -> String {
            domain_config(
                name,
                &spec.image.kernel(),
                &spec.image.initrd(),
                spec.config.memory_mib,
                spec.config.vcpus,
                &guest_cmdline(&spec.image.manifest.cmdline, spec.config.cmdline.as_deref()),
            )
        }

        fn write_config(spec: &VmSpec, name: &str, dir: &Path) -> Result<PathBuf, DriverError> {
            let path = dir.join("domain.cfg");
            std::fs::write(&path, Self::config_for(spec, name))
                .map_err(io_err(format!("writing {}", path.display())))?;
            Ok(path)
        }

        /// Gives a restored domain its agent subtree back (libxl rebuilt the domain's
        /// XenStore directory; the keys the guest wrote before the save are gone).
        async fn publish_subtree(&self, domid: u32) -> Result<(), DriverError> {
            let keys = AgentKeys::for_domid(domid);
            self.store.write(&keys.base, "").await?;
            run(&xenstore_chmod(&keys.base, domid), XL_QUICK).await?;
            Ok(())
        }

        /// Balloons `name` down to `target` MiB and waits (bounded) until `xl list` shows it;
        /// a guest that cannot give that much back is refused ([`crate::driver::balloon_reached`]).
        async fn balloon_down(image: &str, name: &str, target: u32) -> Result<(), DriverError> {
            run(&xl_mem_set(name, target), XL_QUICK).await?;
            let poll = Duration::from_millis(200);
            crate::driver::balloon_reached(image, target, poll, BALLOON_WAIT, || async {
                Ok(domain_alive(name).await?.mem_mib)
            })
            .await
        }

        fn new_vm(&self, id: VmId, dir: &Path, name: String, domid: u32) -> XenVm {
            XenVm {
                record: VmRecord::new(id.clone(), "xen", domid, GAME_PORT),
                id,
                dir: dir.to_path_buf(),
                name,
                domid,
                store: self.store.clone(),
                paused: false,
                activated: false,
                balloon_mib: None,
                game_addr: game_addr_on(0),
                event_watch: None,
                last_event: None,
                last_heard: Instant::now(),
            }
        }

        /// The VM of domain `name` once it is up (`up`: its domid and game address), set up by
        /// `prepare` and its record saved. When it did not come up, or its record cannot be
        /// written, the domain is destroyed and `vm_dir` removed.
        async fn vm_once_up(
            &self,
            up: Result<(u32, SocketAddr), DriverError>,
            vm_id: VmId,
            vm_dir: &Path,
            name: String,
            image: &str,
            prepare: impl FnOnce(&mut XenVm),
        ) -> Result<Box<dyn Vm>, DriverError> {
            let (domid, game_addr) = match up {
                Ok(found) => found,
                Err(e) => {
                    destroy_domain(&name).await;
                    let _ = std::fs::remove_dir_all(vm_dir);
                    return Err(e);
                }
            };
            let mut vm = self.new_vm(vm_id, vm_dir, name, domid);
            vm.game_addr = game_addr;
            prepare(&mut vm);
            if let Err(e) = vm.save_record(image) {
                Box::new(vm).destroy_in_place().await;
                return Err(e);
            }
            Ok(Box::new(vm))
        }

        /// `xl create` + `initialised`, shared by prime and cold boot. The domain is destroyed
        /// again if it does not come up.
        async fn boot(
            &self,
            spec: &VmSpec,
            name: &str,
            dir: &Path,
            boot_timeout: Duration,
        ) -> Result<u32, DriverError> {
            let config = Self::write_config(spec, name, dir)?;
            run(&xl_create(&config), XL_SLOW).await?;
            let booted = async {
                let domid = domid_of(name).await?;
                wait_initialised(&self.store, name, domid, boot_timeout).await?;
                Ok(domid)
            }
            .await;
            if booted.is_err() {
                destroy_domain(name).await;
            }
            booted
        }
    }

    #[async_trait]
    impl VmDriver for XenDriver {
        fn kind(&self) -> &'static str {
            "xen"
        }

        fn accel(&self) -> String {
            "xen".into()
        }

        fn fingerprint(&self, spec: &VmSpec) -> Fingerprint {
            // RAM is inside the `xl save` file: no shared copy-on-write RAM file.
            spec.fingerprint(self, format!("Xen {}", self.version), DEVICE_MODEL, false)
        }

        async fn prime(
            &self,
            spec: &VmSpec,
            dir: &Path,
            boot_timeout: Duration,
        ) -> Result<PrimeStats, DriverError> {
            let t0 = Instant::now();
            let _ = std::fs::remove_dir_all(dir);
            mkdir_private(dir)?;
            let template = VmId::new(format!("template-{}", spec.config.name)).map_err(|e| {
                DriverError::Io {
                    what: format!(
                        "image name {:?} makes no domain name: {e}",
                        spec.config.name
                    ),
                    source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
                }
            })?;
            let name = domain_name(&template);
            // A template left by a crashed hostd would make `xl create` refuse the name.
            destroy_domain(&name).await;
            self.boot(spec, &name, dir, boot_timeout).await?;
            let boot_ms = t0.elapsed().as_millis() as u64;
            let t1 = Instant::now();
            let docked = async {
                if let Some(target) = spec.config.balloon_mib {
                    Self::balloon_down(&spec.config.name, &name, target).await?;
                }
                run(&xl_save(&name, &Substrate::state_path(dir)), XL_SLOW).await?;
                Ok::<_, DriverError>(())
            }
            .await;
            if let Err(e) = docked {
                destroy_domain(&name).await;
                return Err(e);
            }
            seal_substrate(dir, self.fingerprint(spec), boot_ms, t0, t1)
        }

        async fn restore(
            &self,
            spec: &VmSpec,
            substrate: &Substrate,
            vm_id: VmId,
            vm_dir: &Path,
        ) -> Result<Box<dyn Vm>, DriverError> {
            mkdir_private(vm_dir)?;
            let name = domain_name(&vm_id);
            let restored = async {
                let config = Self::write_config(spec, &name, vm_dir)?;
                // A crashed `xl restore` is no verdict on the substrate: clean up, try again.
                let mut attempt = 1;
                loop {
                    match run(&xl_restore(&config, &substrate.state()), XL_SLOW).await {
                        Ok(_) => break,
                        Err(e) if tool_crashed(&e) && attempt < XL_ATTEMPTS => {
                            tracing::warn!(domain = %name, attempt, error = %e, "xl restore crashed; again");
                            destroy_domain(&name).await;
                            attempt += 1;
                        }
                        Err(e) => return Err(DriverError::Restore(e.to_string())),
                    }
                }
                // The domid changes on every restore: look it up, never reuse the template's.
                let domid = domid_of(&name).await?;
                self.publish_subtree(domid).await?;
                Ok::<_, DriverError>((domid, vif_game_addr(domid)?))
            }
            .await;
            let balloon_mib = spec.config.balloon_mib.map(|_| spec.config.memory_mib);
            self.vm_once_up(restored, vm_id, vm_dir, name, &spec.config.name, |vm| {
                vm.paused = true;
                vm.balloon_mib = balloon_mib;
            })
            .await
        }

        async fn cold_boot(
            &self,
            spec: &VmSpec,
            vm_id: VmId,
            vm_dir: &Path,
            boot_timeout: Duration,
        ) -> Result<Box<dyn Vm>, DriverError> {
            mkdir_private(vm_dir)?;
            let name = domain_name(&vm_id);
            let booted = match self.boot(spec, &name, vm_dir, boot_timeout).await {
                Ok(domid) => vif_game_addr(domid).map(|addr| (domid, addr)),
                Err(e) => Err(e),
            };
            self.vm_once_up(booted, vm_id, vm_dir, name, &spec.config.name, |_| {})
                .await
        }

        /// Every domain but dom0 in `xl list` (a dom0 that runs hostd runs nothing else).
        async fn leftovers(&self, _state_dir: &Path) -> Vec<String> {
            let mut failed = String::new();
            for _ in 0..XL_ATTEMPTS {
                match run(&argv(["xl", "list"]), XL_QUICK).await {
                    Ok(out) => {
                        return parse_xl_list(&out)
                            .into_iter()
                            .filter(|d| d.domid != 0)
                            .map(|d| format!("domain {} (domid {})", d.name, d.domid))
                            .collect()
                    }
                    Err(e) => failed = e.to_string(),
                }
            }
            vec![format!("`xl list` failed: {failed}")]
        }

        async fn adopt(
            &self,
            record: &VmRecord,
            vm_dir: &Path,
        ) -> Result<Box<dyn Vm>, DriverError> {
            if record.driver != "xen" {
                return Err(DriverError::Exited(format!(
                    "VM {} was made by the {} driver",
                    record.vm_id, record.driver
                )));
            }
            let name = domain_name(&record.vm_id);
            let info = domain_alive(&name).await?;
            let mut vm = self.new_vm(record.vm_id.clone(), vm_dir, name, info.domid);
            vm.paused = info.state.paused;
            vm.activated = record.session_id.is_some();
            vm.record = VmRecord {
                pid: info.domid,
                ..record.clone()
            };
            vm.game_addr = vif_game_addr(info.domid)?;
            Ok(Box::new(vm))
        }
    }

    /// One Xen domain, owned by one pool task.
    pub struct XenVm {
        id: VmId,
        dir: PathBuf,
        /// The domain name (`berth-<vm id>`): stable, unlike the domid.
        name: String,
        domid: u32,
        store: Store,
        paused: bool,
        activated: bool,
        /// Full memory to balloon back up to after activation, if the substrate was shrunk.
        balloon_mib: Option<u32>,
        /// The guest's link-local game port on this domain's vif.
        game_addr: SocketAddr,
        event_watch: Option<WatchStream>,
        last_event: Option<String>,
        last_heard: Instant,
        /// Image, session, players and ticket key, kept in `vm.json` for adoption and the
        /// gateway.
        record: VmRecord,
    }

    impl XenVm {
        fn keys(&self) -> AgentKeys {
            AgentKeys::for_domid(self.domid)
        }

        fn save_record(&mut self, image: &str) -> Result<(), DriverError> {
            self.record.save_as(image, &self.dir)
        }

        async fn destroy_in_place(self: Box<Self>) {
            destroy_domain(&self.name).await;
            let _ = std::fs::remove_dir_all(&self.dir);
        }

        /// Handles one new value of the `event` key; `Some` when it ends the VM.
        fn on_event_value(&mut self, value: &str) -> Option<VmEvent> {
            match decode_line::<GuestToHost>(value.as_bytes()) {
                Ok(GuestToHost::Heartbeat { .. }) => self.last_heard = Instant::now(),
                Ok(GuestToHost::Ended {
                    reason, results, ..
                }) => return Some(VmEvent::Ended { reason, results }),
                Ok(GuestToHost::GameExited { status, stderr }) => {
                    return Some(VmEvent::Exited {
                        status: DriverError::GameExited { status, stderr }.to_string(),
                    })
                }
                Ok(other) => tracing::debug!(vm_id = %self.id, ?other, "agent message"),
                Err(e) => bad_value(&self.keys().event(), &e),
            }
            None
        }
    }

    #[async_trait]
    impl Vm for XenVm {
        fn id(&self) -> &VmId {
            &self.id
        }

        /// The guest's IPv6 link-local address on this domain's vif (dom0 only).
        fn game_addr(&self) -> SocketAddr {
            self.game_addr
        }

        /// The domid (it changes on every restore).
        fn pid(&self) -> u32 {
            self.domid
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
            let keys = self.keys();
            identity.wall_clock_ms = now_ms();
            let session_id = identity.session_id.clone();
            let gate = (identity.players.clone(), identity.ticket_key.clone());
            let value =
                identity_value(&identity, &keys.identity()).map_err(|e| DriverError::Io {
                    what: e.to_string(),
                    source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
                })?;
            self.store.write(&keys.identity(), &value).await?;
            if self.paused {
                run(&xl_unpause(&self.name), XL_QUICK).await?;
                self.paused = false;
            }
            let id = self.id.clone();
            let path = keys.ready();
            let wait = wait_key(&self.store, &self.name, &path, |value| {
                match decode_line::<GuestToHost>(value.as_bytes()) {
                    Ok(GuestToHost::Ready {
                        session_id: s,
                        clock_ms,
                        ..
                    }) if s == session_id => Some(Ok(clock_ms)),
                    Ok(GuestToHost::Error { code, message }) => {
                        Some(Err(DriverError::AgentRefused { code, message }))
                    }
                    Ok(other) => {
                        tracing::debug!(vm_id = %id, ?other, "agent message while activating");
                        None
                    }
                    Err(e) => {
                        bad_value(&path, &e);
                        None
                    }
                }
            });
            let clock_ms = tokio::time::timeout(timeout, wait)
                .await
                .map_err(|_| DriverError::ReadyTimeout(timeout))??;
            self.activated = true;
            self.last_heard = Instant::now();
            let (players, ticket_key) = gate;
            self.record.serve(session_id.clone(), players, ticket_key);
            self.record
                .save(&self.dir)
                .map_err(io_err("writing vm.json"))?;
            if let Some(full) = self.balloon_mib {
                if let Err(e) = run(&xl_mem_set(&self.name, full), XL_QUICK).await {
                    tracing::warn!(vm_id = %self.id, error = %e, "could not balloon back up");
                }
            }
            Ok(Ready {
                session_id,
                guest_clock_ms: clock_ms,
                host_clock_ms: now_ms(),
                activate_us: t0.elapsed().as_micros() as u64,
            })
        }

        async fn event(&mut self, silence: Duration) -> VmEvent {
            let path = self.keys().event();
            if self.event_watch.is_none() {
                self.event_watch = self.store.watch(&path).await;
            }
            let mut checked: Option<Instant> = None;
            loop {
                if checked.is_none_or(|t| t.elapsed() >= DOMAIN_CHECK) {
                    match domain_check(&self.name).await {
                        Err(DriverError::Exited(status)) => return VmEvent::Exited { status },
                        // `xl` itself failed: the domain may well be fine; ask again later.
                        Err(e) => {
                            tracing::warn!(vm_id = %self.id, error = %e, "checking the domain")
                        }
                        Ok(_) => {}
                    }
                    checked = Some(Instant::now());
                }
                match self.store.read(&path).await {
                    Ok(Some(value)) if self.last_event.as_deref() != Some(value.as_str()) => {
                        let ended = self.on_event_value(&value);
                        self.last_event = Some(value);
                        if let Some(event) = ended {
                            return event;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(vm_id = %self.id, error = %e, "reading the event key"),
                }
                let mut wait = EVENT_POLL.min(DOMAIN_CHECK);
                if self.activated {
                    let quiet = self.last_heard.elapsed();
                    if quiet >= silence {
                        return VmEvent::Silent {
                            for_ms: quiet.as_millis() as u64,
                        };
                    }
                    wait = wait.min(silence - quiet);
                }
                wait_change(&mut self.event_watch, wait).await;
            }
        }

        async fn destroy(self: Box<Self>) {
            self.destroy_in_place().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::guest::decode_line;
    use berth_protocol::{PlayerId, SessionId};

    #[test]
    fn keys_follow_the_domid() {
        let k = AgentKeys::for_domid(7);
        assert_eq!(k.base, "/local/domain/7/data/berth");
        assert_eq!(k.identity(), "/local/domain/7/data/berth/identity");
        assert_eq!(k.initialised(), "/local/domain/7/data/berth/initialised");
        assert_eq!(k.ready(), "/local/domain/7/data/berth/ready");
        assert_eq!(k.event(), "/local/domain/7/data/berth/event");
        assert_ne!(AgentKeys::for_domid(8).identity(), k.identity());
    }

    #[test]
    fn commands_are_built_as_argument_lists() {
        let vm = VmId::new("vm-1").expect("valid");
        let name = domain_name(&vm);
        assert_eq!(name, "berth-vm-1");
        assert_eq!(
            xl_create(Path::new("/run/s/domain.cfg")),
            ["xl", "create", "-e", "/run/s/domain.cfg"]
        );
        assert_eq!(
            xl_mem_set(&name, 96),
            ["xl", "mem-set", "berth-vm-1", "96m"]
        );
        assert_eq!(
            xl_save(&name, Path::new("/run/s/state")),
            ["xl", "save", "berth-vm-1", "/run/s/state"]
        );
        assert_eq!(xl_unpause(&name), ["xl", "unpause", "berth-vm-1"]);
        assert_eq!(xl_destroy(&name), ["xl", "destroy", "berth-vm-1"]);
        assert_eq!(xl_domid(&name), ["xl", "domid", "berth-vm-1"]);
        assert_eq!(xl_list(&name), ["xl", "list", "berth-vm-1"]);
        assert_eq!(xl_info(), ["xl", "info"]);
        assert_eq!(
            xenstore_chmod("/local/domain/9/data/berth", 9),
            ["xenstore-chmod", "-r", "/local/domain/9/data/berth", "n9"]
        );
    }

    #[test]
    fn restore_takes_the_new_name_from_a_config_file() {
        // `xl restore [options] [<ConfigFile>] <CheckpointFile>`: two positionals at most.
        let r = xl_restore(Path::new("/run/v/domain.cfg"), Path::new("/run/s/state"));
        assert_eq!(
            r,
            [
                "xl",
                "restore",
                "-p",
                "-e",
                "/run/v/domain.cfg",
                "/run/s/state"
            ]
        );
        let a = domain_config("berth-a", Path::new("/k"), Path::new("/i"), 128, 1, "x");
        let b = domain_config("berth-b", Path::new("/k"), Path::new("/i"), 128, 1, "x");
        assert_eq!(a.replace("berth-a", "berth-b"), b, "only the name differs");
    }

    #[test]
    fn paths_with_spaces_stay_one_argument() {
        let r = xl_save("d", Path::new("/run/with space/state"));
        assert_eq!(r.len(), 4);
        assert_eq!(r[3], "/run/with space/state");
    }

    #[test]
    fn domain_config_cannot_be_broken_by_quotes() {
        let c = domain_config("d", Path::new("/k"), Path::new("/i"), 128, 1, "a=\"b\" c");
        assert!(c.contains("extra = \"a=b c\""));
        assert!(c.contains("memory = 128"));
        assert!(c.contains("maxmem = 128"));
        assert!(c.contains("type = \"pv\""));
        assert!(c.contains("name = \"d\""));
    }

    #[test]
    fn guest_cmdline_adds_console_and_transport() {
        assert_eq!(
            guest_cmdline("quiet console=ttyS0", Some("BERTH_INIT_MS=5 ")),
            "quiet console=ttyS0 BERTH_INIT_MS=5 console=hvc0 BERTH_TRANSPORT=xen"
        );
        assert_eq!(guest_cmdline("", None), "console=hvc0 BERTH_TRANSPORT=xen");
    }

    #[test]
    fn domid_output_is_parsed() {
        assert_eq!(parse_domid("12\n"), Some(12));
        assert_eq!(parse_domid("  0 "), Some(0));
        assert_eq!(parse_domid(""), None);
        assert_eq!(parse_domid("Can't get domid of domain name 'x'"), None);
        assert_eq!(parse_domid("-1"), None);
    }

    #[test]
    fn xen_version_is_read_from_xl_info() {
        let info = "host                   : dom0\nrelease                : 6.1.0-27-amd64\n\
                    xen_major              : 4\nxen_minor              : 17\n\
                    xen_version            : 4.17.5-pre\nxen_caps               : xen-3.0-x86_64 hvm-3.0-x86_64\n";
        assert_eq!(parse_xen_version(info).as_deref(), Some("4.17.5-pre"));
        assert_eq!(parse_xen_version("xen_major : 4\n"), None);
        assert_eq!(parse_xen_version("xen_version :   \n"), None);
    }

    #[test]
    fn xl_list_rows_are_parsed() {
        let out = "Name                                        ID   Mem VCPUs\tState\tTime(s)\n\
                   Domain-0                                     0   768     2     r-----      12.3\n\
                   berth-vm-1                                   3   128     1     --p---       0.0\n\
                   berth template x                             4    94     1     -b----       1.5\n\
                   broken line\n\
                   berth-vm-2                                   5   128     1     ---c--       2.0\n";
        let rows = parse_xl_list(out);
        assert_eq!(rows.len(), 4, "{rows:?}");
        assert_eq!(rows[0].name, "Domain-0");
        assert!(rows[0].state.running);
        assert_eq!(rows[1].name, "berth-vm-1");
        assert_eq!(rows[1].domid, 3);
        assert_eq!(rows[1].mem_mib, 128);
        assert_eq!(rows[1].vcpus, 1);
        assert!(rows[1].state.paused && !rows[1].state.running);
        assert_eq!(rows[1].state.ended(), None);
        assert_eq!(rows[2].name, "berth template x");
        assert_eq!(rows[2].mem_mib, 94);
        assert!(rows[2].state.blocked);
        assert_eq!(rows[3].state.ended(), Some("domain crashed"));
        assert!((rows[2].cpu_time_s - 1.5).abs() < 1e-9);
    }

    #[test]
    fn domain_states_are_strict() {
        assert_eq!(DomainState::parse("------"), Some(DomainState::default()));
        assert_eq!(
            DomainState::parse("---s--").and_then(|s| s.ended()),
            Some("domain shut down")
        );
        assert_eq!(
            DomainState::parse("-----d").and_then(|s| s.ended()),
            Some("domain is dying")
        );
        assert_eq!(DomainState::parse("r----"), None);
        assert_eq!(DomainState::parse("rx----"), None);
    }

    #[test]
    fn game_vms_are_reached_by_link_local_on_their_vif() {
        assert_eq!(
            guest_link_local([0x00, 0x16, 0x3e, 0x00, 0x00, 0x01]),
            "fe80::216:3eff:fe00:1".parse::<Ipv6Addr>().expect("valid")
        );
        assert_eq!(vif_name(12), "vif12.0");
        let addr = game_addr_on(9);
        assert_eq!(addr.to_string(), "[fe80::216:3eff:fe42:1%9]:7000");
        assert_eq!(addr.to_string().parse::<SocketAddr>().ok(), Some(addr));
        let c = domain_config("d", Path::new("/k"), Path::new("/i"), 128, 1, "x");
        assert!(
            c.contains("vif = [ \"mac=00:16:3e:42:00:01,script=vif-berth\" ]"),
            "{c}"
        );
    }

    fn identity(players: usize) -> Identity {
        Identity {
            teams: vec![],
            session_id: SessionId::new("s1").expect("valid"),
            vm_id: VmId::new("vm1").expect("valid"),
            hostname: "berth-vm1".into(),
            players: (0..players)
                .map(|i| PlayerId::new(format!("player-{i}")).expect("valid"))
                .collect(),
            ticket_key: "00ff".repeat(16),
            params: serde_json::json!({"score_limit": 10, "note": "a \"quoted\"\nline"}),
            wall_clock_ms: 1_700_000_000_000,
            rng_seed: 42,
            deadline_ms: 0,
        }
    }

    #[test]
    fn identity_is_one_line_that_the_agent_decodes() {
        let path = AgentKeys::for_domid(3).identity();
        let value = identity_value(&identity(4), &path).expect("fits");
        assert!(!value.contains('\n'), "no raw newline in the value");
        let back: HostToGuest = decode_line(value.as_bytes()).expect("decodes");
        assert_eq!(back, HostToGuest::Identity(identity(4)));
    }

    #[test]
    fn identity_that_does_not_fit_is_refused() {
        let path = AgentKeys::for_domid(3).identity();
        let e = identity_value(&identity(400), &path).expect_err("too large");
        assert_eq!(e.max, PAYLOAD_MAX - path.len() - 1);
        assert!(e.bytes > e.max);
        assert!(e.to_string().contains("at most"), "{e}");
    }
}
