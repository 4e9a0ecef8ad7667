//! The nested-Xen tier: `cargo xtask xen-image` builds a Xen host that boots inside QEMU (TCG),
//! a runner boots it and reads one JSON result off its serial console, and on that the tier of
//! `cargo xtask test` and `cargo xtask bench activation --driver xen` are built.
//!
//! ```text
//! qemu-system-x86_64 (TCG, 2 vCPUs, 2 GiB)       serial → target/xen/<mode>.log
//! └─ Xen 4.17          target/xen/xen          multiboot `-kernel`, console=com1
//!    └─ dom0           target/xen/vmlinuz-dom0 + dom0.cpio.gz (`-initrd` modules)
//!       /init          assets/xen/dom0-init: xenstored, xenconsoled, then
//!       berth-hostd selftest --config /berth/hostd.toml (driver xen), JSON between
//!                      BERTH-RESULT-BEGIN / BERTH-RESULT-END, then BERTH-EXIT <rc>
//!       └─ game VMs    PV domUs from /berth/image (cloud kernel; initrd holds /data)
//! ```
//!
//! Everything comes from Debian packages (downloaded to `target/debs`, unpacked, never
//! installed) and this workspace. dom0 must run the generic kernel: the cloud kernel that game
//! VMs use is built without `CONFIG_XEN_DOM0`. What this machine lacks (the packages cannot be
//! downloaded, no QEMU) is an [`Unavailable`] error, which the test tier reports as a skip.

use crate::image::{self, Manifest};
use crate::sys;
use anyhow::{bail, Context, Result};
use berth_hostd::build::cpio::Cpio;
use berth_hostd::build::{
    debs, files_under, initrd, sha_files, GuestBins, GuestInitrd, KERNEL_META,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Xen's hypervisor, toolstack and their libraries (bookworm). `libxenmisc4.17` holds
/// libxenctrl, libxenguest and libxenlight.
const XEN_PACKAGES: &[&str] = &[
    "xen-hypervisor-4.17-amd64",
    "xen-utils-4.17",
    "xen-utils-common",
    "xenstore-utils",
    "libxenmisc4.17",
    "libyajl2",
    "libxencall1",
    "libxenevtchn1",
    "libxenforeignmemory1",
    "libxengnttab1",
    "libxenstore4",
    "libxentoollog1",
    "libxendevicemodel1",
    "libxenhypfs1",
    "libxentoolcore1",
];
/// dom0's kernel: the generic one (the cloud kernel has no dom0 support).
const DOM0_KERNEL_META: &str = "linux-image-amd64";
/// The hypervisor in its package: a gzipped ELF32 multiboot image QEMU's `-kernel` loads.
const HYPERVISOR_GZ: &str = "boot/xen-4.17-amd64.gz";
/// The toolstack's real binaries (`/usr/sbin/xl` and friends are bash wrappers; dom0's init
/// puts this folder first in `PATH`).
const XEN_BIN: &str = "usr/lib/xen-4.17/bin";
/// Where the Xen packages put their libraries.
const XEN_LIBS: &str = "usr/lib/x86_64-linux-gnu";
/// What dom0 gets of the Xen packages, and what it never needs of them.
const XEN_TREE: &[&str] = &["usr", "etc/xen", "var/lib/xen"];
const XEN_TREE_SKIP: &[&str] = &["usr/share", "usr/lib/xen-4.17/lib/python"];
/// Loaded with `dlopen` by glibc (thread cancellation unwinds through it), so `ldd` does not
/// list it; without it every `xl` aborts.
const DLOPENED: &[&str] = &["libgcc_s.so.1"];
const HOST_LIB_DIRS: &[&str] = &["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"];
/// The Xen guest image's kernel command line (its console is Xen's `hvc0`, the default).
const GUEST_CMDLINE: &str = "quiet loglevel=3 panic=-1 rdinit=/init BERTH_INIT_MS=1000";
/// Bumped when this recipe changes what it builds from the same inputs.
const RECIPE: u32 = 1;

const QEMU: &str = "qemu-system-x86_64";
/// The nested machine's CPU: without `-smap` dom0 crashes at once, without `-rdtscp` PVH guests
/// hang (DESIGN.md, field notes). Without AVX (QEMU 7.2's TCG emulation of it is new, and
/// glibc picks its AVX2 string functions when it is there) and PCID, dom0's and the guests'
/// processes crashed less often with heap corruption; what made those crashes stop was one
/// `xl` at a time in hostd's xen driver (see `docs/operations.md`, "Xen").
const MACHINE_CPU: &str =
    "max,-smap,-rdtscp,-avx,-avx2,-fma,-f16c,-vaes,-vpclmulqdq,-pcid,-invpcid";
/// Memory and vCPUs of the nested machine, and dom0's share of the memory.
const MACHINE_MIB: u32 = 2048;
const MACHINE_CPUS: u32 = 2;
const DOM0_MEM: &str = "dom0_mem=768M,max:768M";

pub fn xen_dir() -> PathBuf {
    image::root().join("target/xen")
}

/// The Xen tier cannot run on this machine: its Debian packages cannot be downloaded, or there
/// is no QEMU. A reason to skip, unlike a failure of the tier itself.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

fn unavailable(e: anyhow::Error) -> anyhow::Error {
    Unavailable(format!("{e:#}")).into()
}

/// Why the tier could not run, if `e` says it could not (rather than that it failed).
pub fn unavailable_reason(e: &anyhow::Error) -> Option<&str> {
    e.chain()
        .find_map(|c| c.downcast_ref::<Unavailable>())
        .map(|u| u.0.as_str())
}

/// What `cargo xtask xen-image` built.
#[derive(Debug, Clone)]
pub struct Artefacts {
    pub xen: PathBuf,
    pub dom0_kernel: PathBuf,
    pub dom0_initrd: PathBuf,
    /// The Xen guest image's digest (its manifest is `/berth/image/manifest.json` in dom0).
    pub image_digest: String,
}

/// `target/xen/inputs.json`: what the artefacts were built from.
#[derive(Debug, Serialize, Deserialize)]
struct Inputs {
    input_digest: String,
    image_digest: String,
    dom0_kernel_package: String,
    guest_kernel_package: String,
    debs: Vec<String>,
}

fn artefacts(dir: &Path, image_digest: String) -> Artefacts {
    Artefacts {
        xen: dir.join("xen"),
        dom0_kernel: dir.join("vmlinuz-dom0"),
        dom0_initrd: dir.join("dom0.cpio.gz"),
        image_digest,
    }
}

/// Writes `path` through a temporary file, so a broken build never leaves a plausible artefact.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The Debian packages the artefacts are made of, downloaded to `target/debs`.
struct Debs {
    dom0_kernel_pkg: String,
    guest_kernel_pkg: String,
    files: BTreeMap<String, PathBuf>,
}

impl Debs {
    fn download() -> Result<Debs> {
        let debs_dir = image::root().join("target/debs");
        let dom0_kernel_pkg =
            sys::resolve_meta(DOM0_KERNEL_META, "linux-image-").map_err(unavailable)?;
        let guest_kernel_pkg =
            sys::resolve_meta(KERNEL_META, "linux-image-").map_err(unavailable)?;
        let mut files = BTreeMap::new();
        for p in XEN_PACKAGES.iter().copied().chain([
            dom0_kernel_pkg.as_str(),
            guest_kernel_pkg.as_str(),
            "busybox-static",
        ]) {
            files.insert(
                p.to_owned(),
                sys::download_deb(p, &debs_dir).map_err(unavailable)?,
            );
        }
        Ok(Debs {
            dom0_kernel_pkg,
            guest_kernel_pkg,
            files,
        })
    }

    fn names(&self) -> Vec<String> {
        self.files.values().map(|d| debs::deb_name(d)).collect()
    }
}

/// The digest of everything the artefacts are built from.
fn input_digest(debs: &Debs, hostd: &Path, guest: &GuestBins) -> Result<String> {
    let assets = image::root().join("assets");
    let mut h = Sha256::new();
    h.update(RECIPE.to_le_bytes());
    for n in &debs.names() {
        h.update(n);
    }
    sha_files(&mut h, &files_under(&assets.join("xen"))?)?;
    sha_files(&mut h, &[hostd.to_path_buf()])?;
    guest.digest_into(&mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// The artefacts already in `dir`, if they were built from `input_digest` and are complete.
fn up_to_date(dir: &Path, input_digest: &str) -> Option<Artefacts> {
    let old = std::fs::read(dir.join("inputs.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Inputs>(&b).ok())?;
    let art = artefacts(dir, old.image_digest);
    let complete = [&art.xen, &art.dom0_kernel, &art.dom0_initrd]
        .iter()
        .all(|p| p.exists());
    (old.input_digest == input_digest && complete).then_some(art)
}

/// The packages unpacked under `target/xen-work`.
struct Unpacked {
    xen_root: PathBuf,
    dom0_kernel: PathBuf,
    guest_kernel: PathBuf,
    busybox: PathBuf,
}

impl Unpacked {
    fn new(debs: &Debs, work: &Path) -> Result<Unpacked> {
        let unpacked = |name: &str, packages: &[&str]| -> Result<PathBuf> {
            let to = work.join(name);
            std::fs::create_dir_all(&to)?;
            for p in packages {
                sys::run(
                    Command::new("dpkg-deb")
                        .arg("-x")
                        .arg(&debs.files[*p])
                        .arg(&to),
                )?;
            }
            Ok(to)
        };
        Ok(Unpacked {
            xen_root: unpacked("xen", XEN_PACKAGES)?,
            dom0_kernel: unpacked("dom0-kernel", &[debs.dom0_kernel_pkg.as_str()])?,
            guest_kernel: unpacked("guest-kernel", &[debs.guest_kernel_pkg.as_str()])?,
            busybox: unpacked("busybox", &["busybox-static"])?.join("bin/busybox"),
        })
    }

    /// The hypervisor, unzipped.
    fn hypervisor(&self) -> Result<Vec<u8>> {
        let mut xen = Vec::new();
        let gz = self.xen_root.join(HYPERVISOR_GZ);
        flate2::read::GzDecoder::new(
            std::fs::File::open(&gz).with_context(|| format!("opening {}", gz.display()))?,
        )
        .read_to_end(&mut xen)
        .with_context(|| format!("unzipping {}", gz.display()))?;
        Ok(xen)
    }
}

/// The game VMs' image: the cloud kernel, an initramfs with the game's data (no data disk).
struct GuestImage {
    vmlinuz: Vec<u8>,
    initrd: Vec<u8>,
    manifest: Manifest,
}

impl GuestImage {
    fn build(u: &Unpacked, guest: &GuestBins, debs: &Debs, input_digest: &str) -> Result<Self> {
        let assets = image::root().join("assets");
        let vmlinuz = std::fs::read(initrd::find_vmlinuz(&u.guest_kernel)?)?;
        let initrd = GuestInitrd {
            init: &std::fs::read(assets.join("xen/guest-init"))?,
            busybox: &u.busybox,
            guest,
            kernel_root: &u.guest_kernel,
            modules: &initrd::module_list(&assets.join("xen/guest-modules"))?,
            data_inside: true,
        }
        .build()?;
        let mut h = Sha256::new();
        h.update(&vmlinuz);
        h.update(&initrd);
        let manifest = Manifest {
            format: 1,
            digest: hex::encode(h.finalize()),
            input_digest: input_digest.to_owned(),
            kernel: "vmlinuz".into(),
            initrd: "initrd.cpio".into(),
            disk: String::new(),
            kernel_package: debs.guest_kernel_pkg.clone(),
            cmdline: GUEST_CMDLINE.into(),
            game: guest.manifest.runtime(),
        };
        Ok(GuestImage {
            vmlinuz,
            initrd,
            manifest,
        })
    }
}

/// dom0's initramfs (uncompressed cpio): busybox, the Xen tree and the libraries its binaries
/// and hostd need, the modules, hostd with its config, and the game VMs' image.
fn dom0_cpio(u: &Unpacked, hostd: &Path, image: &GuestImage, work: &Path) -> Result<Vec<u8>> {
    let assets = image::root().join("assets");
    let stripped_hostd = work.join("berth-hostd");
    sys::run(
        Command::new("strip")
            .arg("-o")
            .arg(&stripped_hostd)
            .arg(hostd),
    )?;
    let mut cpio = Cpio::default();
    cpio.skeleton(&[
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "var/run/xen",
        "var/lib/xen",
        "var/log/xen",
        "lib/modules",
        "lib64",
        "etc/xen/scripts",
        "berth/image",
    ]);
    cpio.file("init", 0o755, &std::fs::read(assets.join("xen/dom0-init"))?);
    cpio.file("bin/busybox", 0o755, &std::fs::read(&u.busybox)?);
    for t in XEN_TREE {
        cpio.tree(&u.xen_root, Path::new(t), XEN_TREE_SKIP)?;
    }
    let mut elves = elf_files(&u.xen_root, &[XEN_BIN, "usr/bin", "usr/sbin"])?;
    elves.push(stripped_hostd.clone());
    for (name, host_file) in libraries(&elves, &u.xen_root)? {
        cpio.file(&name, 0o755, &std::fs::read(&host_file)?);
    }
    cpio.file("bin/berth-hostd", 0o755, &std::fs::read(&stripped_hostd)?);
    initrd::add_modules(
        &mut cpio,
        &u.dom0_kernel,
        &initrd::module_list(&assets.join("xen/dom0-modules"))?,
    )?;
    for (name, mode, from) in [
        ("etc/xen/scripts/vif-berth", 0o755, "xen/vif-berth"),
        ("berth/hostd.toml", 0o644, "xen/hostd.toml"),
    ] {
        cpio.file(name, mode, &std::fs::read(assets.join(from))?);
    }
    cpio.file("berth/image/vmlinuz", 0o644, &image.vmlinuz);
    cpio.file("berth/image/initrd.cpio", 0o644, &image.initrd);
    cpio.file(
        "berth/image/manifest.json",
        0o644,
        &serde_json::to_vec_pretty(&image.manifest)?,
    );
    Ok(cpio.finish())
}

/// Builds (or reuses) `target/xen/`: `xen`, `vmlinuz-dom0`, `dom0.cpio.gz`, `inputs.json`.
/// Rebuilt only when an input changes: the packages, `assets/xen`, the game (its manifest,
/// data and binary), the hostd and
/// guest binaries.
pub fn build() -> Result<Artefacts> {
    let root = image::root();
    let dir = xen_dir();
    let debs = Debs::download()?;
    crate::build::build_workspace()?;
    let hostd = root.join("target/debug/berth-hostd");
    let guest = image::build_guest(&image::arena_manifest()?)?;
    let input_digest = input_digest(&debs, &hostd, &guest)?;
    if let Some(art) = up_to_date(&dir, &input_digest) {
        eprintln!("xtask: Xen artefacts up to date ({})", &input_digest[..12]);
        return Ok(art);
    }
    let t0 = Instant::now();
    eprintln!(
        "xtask: building the nested-Xen artefacts ({} dom0, Xen 4.17)",
        debs.dom0_kernel_pkg
    );
    let work = root.join("target/xen-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&dir)?;
    let unpacked = Unpacked::new(&debs, &work)?;
    let xen = unpacked.hypervisor()?;
    let image = GuestImage::build(&unpacked, &guest, &debs, &input_digest)?;
    let cpio = dom0_cpio(&unpacked, &hostd, &image, &work)?;
    // gzip at level 1: the kernel unpacks it in a fraction of the time a tighter level saves.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&cpio)?;
    let dom0_initrd = gz.finish()?;

    let art = artefacts(&dir, image.manifest.digest.clone());
    // inputs.json last: it is what says the others are complete.
    let inputs_path = dir.join("inputs.json");
    let _ = std::fs::remove_file(&inputs_path);
    write_atomic(&art.xen, &xen)?;
    write_atomic(
        &art.dom0_kernel,
        &std::fs::read(initrd::find_vmlinuz(&unpacked.dom0_kernel)?)?,
    )?;
    write_atomic(&art.dom0_initrd, &dom0_initrd)?;
    let inputs = Inputs {
        input_digest,
        image_digest: image.manifest.digest.clone(),
        debs: debs.names(),
        dom0_kernel_package: debs.dom0_kernel_pkg,
        guest_kernel_package: debs.guest_kernel_pkg,
    };
    write_atomic(&inputs_path, &serde_json::to_vec_pretty(&inputs)?)?;
    let _ = std::fs::remove_dir_all(&work);
    let mib = |n: usize| n as f64 / 1048576.0;
    eprintln!(
        "xtask: Xen artefacts in {} ({:.1} s): xen {:.1} MiB, dom0 initramfs {:.1} MiB \
         ({:.1} MiB unpacked), guest image {}",
        dir.display(),
        t0.elapsed().as_secs_f64(),
        mib(xen.len()),
        mib(dom0_initrd.len()),
        mib(cpio.len()),
        &image.manifest.digest[..12],
    );
    Ok(art)
}

/// The ELF files (not links) directly in `dirs` of `base`.
fn elf_files(base: &Path, dirs: &[&str]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for d in dirs {
        for e in std::fs::read_dir(base.join(d))? {
            let p = e?.path();
            if debs::is_elf(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The host's shared libraries that `elves` need, as (path in dom0, file on this host): each
/// resolved by `ldd` with the unpacked Xen libraries first on the search path (those are in
/// dom0's tree already), the dynamic loader included, plus [`DLOPENED`].
fn libraries(elves: &[PathBuf], xen_root: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    let mut add = |host: &Path| {
        let name = host.to_string_lossy().trim_start_matches('/').to_string();
        out.insert(name, host.to_path_buf());
    };
    for elf in elves {
        let o = Command::new("ldd")
            .env("LD_LIBRARY_PATH", xen_root.join(XEN_LIBS))
            .arg(elf)
            .output()
            .context("running ldd")?;
        let text = String::from_utf8_lossy(&o.stdout);
        if !o.status.success() {
            bail!(
                "ldd {}: {}{}",
                elf.display(),
                text,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        for lib in debs::ldd_paths(&text).with_context(|| format!("ldd {}", elf.display()))? {
            if !lib.starts_with(xen_root) {
                add(&lib);
            }
        }
    }
    for lib in DLOPENED {
        let host = HOST_LIB_DIRS
            .iter()
            .map(|d| Path::new(d).join(lib))
            .find(|p| p.exists())
            .with_context(|| format!("{lib} is not on this host (in {HOST_LIB_DIRS:?})"))?;
        add(&host);
    }
    Ok(out)
}

/// What dom0 runs: picked on its kernel command line (`berth.run=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Prime, activate `sessions` VMs through hostd's pool, destroy.
    Selftest,
    /// The same, plus `runs` timed activations per path and `cold_runs` cold boots.
    Bench { runs: usize, cold_runs: usize },
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Selftest => "selftest",
            Self::Bench { .. } => "bench",
        }
    }

    fn default_timeout(self) -> Duration {
        match self {
            Self::Selftest => Duration::from_secs(15 * 60),
            Self::Bench { .. } => Duration::from_secs(40 * 60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunOpts {
    /// Game VMs the run activates at once.
    pub sessions: usize,
    /// How long the whole nested run may take; `None`: 15 min for a selftest, 40 for a bench.
    pub timeout: Option<Duration>,
}

impl Default for RunOpts {
    fn default() -> Self {
        Self {
            sessions: 3,
            timeout: None,
        }
    }
}

/// dom0's kernel command line. QEMU splits `-initrd` into multiboot modules at commas, so
/// there is none in it.
fn dom0_cmdline(mode: Mode, opts: &RunOpts) -> String {
    let mut line = format!(
        "console=hvc0 quiet berth.run={} berth.sessions={}",
        mode.name(),
        opts.sessions
    );
    if let Mode::Bench { runs, cold_runs } = mode {
        line += &format!(" berth.runs={runs} berth.cold={cold_runs}");
    }
    line
}

/// The nested machine's QEMU, owned here alone: killed and reaped when dropped, so it never
/// outlives the runner, whichever way the runner leaves.
struct Machine(Child);

impl Drop for Machine {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Boots Xen and the Berth dom0 in QEMU (TCG; never KVM: it is no use for a nested Xen here)
/// and returns the JSON result dom0 printed. The serial console goes to
/// `target/xen/<mode>.log`; `BERTH-` lines and errors are echoed to stderr as they come.
pub fn run(art: &Artefacts, mode: Mode, opts: &RunOpts) -> Result<Value> {
    if !Path::new(sys::QEMU.proof).exists() {
        return Err(Unavailable(format!("{QEMU} is missing ({})", sys::QEMU.package)).into());
    }
    for p in [&art.dom0_kernel, &art.dom0_initrd] {
        let s = p.to_string_lossy();
        if s.contains(',') || s.contains(' ') {
            bail!("{s}: QEMU's -initrd cannot take a path with a comma or a space");
        }
    }
    let timeout = opts.timeout.unwrap_or(mode.default_timeout());
    let log_path = xen_dir().join(format!("{}.log", mode.name()));
    let modules = format!(
        "{} {},{}",
        art.dom0_kernel.display(),
        dom0_cmdline(mode, opts),
        art.dom0_initrd.display()
    );
    let mut cmd = Command::new(QEMU);
    cmd.args(["-accel", "tcg,thread=multi", "-cpu", MACHINE_CPU])
        .args(["-m", &MACHINE_MIB.to_string()])
        .args(["-smp", &MACHINE_CPUS.to_string()])
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&art.xen)
        .args(["-append", &format!("console=com1 {DOM0_MEM}")])
        .args(["-initrd", &modules]);
    eprintln!(
        "xtask: booting nested Xen ({}; timeout {} min; console in {})",
        mode.name(),
        timeout.as_secs() / 60,
        log_path.display()
    );
    let t0 = Instant::now();
    let (lines, status) = supervise(&mut cmd, &log_path, timeout)
        .with_context(|| format!("nested Xen run ({})", mode.name()))?;
    eprintln!(
        "xtask: nested Xen run ({}) ended after {:.1} s ({status})",
        mode.name(),
        t0.elapsed().as_secs_f64()
    );
    let Console { exit, json } = parse_console(&lines);
    let (why, result) = match (exit, json) {
        (Some(0), Some(Ok(v))) => return Ok(v),
        (Some(0), None) => ("no JSON between the BERTH-RESULT markers".to_string(), None),
        (Some(0), Some(Err(e))) => (format!("the result is not JSON: {e}"), None),
        (Some(rc), json) => (
            format!("berth-hostd exited with {rc}"),
            json.and_then(Result::ok),
        ),
        (None, json) => (
            format!("dom0 never printed BERTH-EXIT (QEMU: {status})"),
            json.and_then(Result::ok),
        ),
    };
    let errors = result
        .map(|v| format!("\nerrors in the result: {}", v["errors"]))
        .unwrap_or_default();
    bail!(
        "nested Xen run ({}) failed: {why}{errors}\nlog {}; last 60 lines:\n{}",
        mode.name(),
        log_path.display(),
        tail(&lines, 60)
    )
}

/// Runs `cmd` with its stdout as a serial console (streamed to `log_path`, see
/// [`read_console`]) until it exits, or until `timeout`, or until the guest kernel reports a
/// hung task (the nested emulation's known stall: nothing recovers from it, so waiting out the
/// timeout would only cost minutes): then it is killed and this fails with the console's last
/// 40 lines. Returns every console line and how the process ended.
fn supervise(
    cmd: &mut Command,
    log_path: &Path,
    timeout: Duration,
) -> Result<(Vec<String>, std::process::ExitStatus)> {
    let log = std::fs::File::create(log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let t0 = Instant::now();
    let mut machine = Machine(
        cmd.spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?,
    );
    let stdout = machine.0.stdout.take().expect("stdout is piped");
    let hung = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = hung.clone();
    let console = std::thread::spawn(move || read_console(stdout, log, t0, &seen));
    let status = loop {
        if let Some(status) = machine.0.try_wait()? {
            break status;
        }
        let stalled = hung.load(std::sync::atomic::Ordering::Relaxed);
        if t0.elapsed() >= timeout || stalled {
            drop(machine);
            let lines = console.join().expect("console reader does not panic")?;
            let why = if stalled {
                "a guest kernel task hung (the nested emulation stalled)".to_owned()
            } else {
                format!("timed out after {} s", timeout.as_secs())
            };
            bail!(
                "{why}; {:?} killed. Last 40 console lines (all in {}):\n{}",
                cmd.get_program(),
                log_path.display(),
                tail(&lines, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(machine);
    let lines = console.join().expect("console reader does not panic")?;
    Ok((lines, status))
}

/// Reads the serial console until QEMU closes it: each line (without `\r`) into the log, the
/// interesting ones echoed to stderr with the time since boot. Returns every line.
fn read_console(
    stdout: std::process::ChildStdout,
    log: std::fs::File,
    t0: Instant,
    hung: &std::sync::atomic::AtomicBool,
) -> Result<Vec<String>> {
    let mut log = std::io::LineWriter::new(log);
    let mut reader = std::io::BufReader::new(stdout);
    let mut lines = Vec::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(lines);
        }
        let line: String = String::from_utf8_lossy(&buf)
            .chars()
            .filter(|c| *c != '\r' && *c != '\n')
            .collect();
        writeln!(log, "{line}")?;
        // The kernel's hung-task watchdog: "INFO: task xenbus:29 blocked for more than 120 s".
        if line.contains("blocked for more than") {
            hung.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if line.starts_with("BERTH-") || line.to_lowercase().contains("error") {
            eprintln!("xen [{:6.1} s] {line}", t0.elapsed().as_secs_f64());
        }
        lines.push(line);
    }
}

/// What dom0 said at the end of a run.
#[derive(Debug)]
struct Console {
    /// From `BERTH-EXIT <rc>`.
    exit: Option<i32>,
    /// The text between `BERTH-RESULT-BEGIN` and `BERTH-RESULT-END`, parsed; `None` if empty.
    json: Option<std::result::Result<Value, String>>,
}

/// Lines Xen and dom0's kernel print on the same console (`(XEN) …`, `[   12.3] …`), which
/// may land between the result's lines.
fn is_console_noise(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("(XEN)")
        || t.strip_prefix('[')
            .and_then(|r| r.split_once(']'))
            .is_some_and(|(ts, _)| ts.trim().parse::<f64>().is_ok())
}

fn parse_console(lines: &[String]) -> Console {
    let exit = lines
        .iter()
        .rev()
        .find_map(|l| l.trim().strip_prefix("BERTH-EXIT "))
        .and_then(|rc| rc.trim().parse().ok());
    let begin = lines.iter().rposition(|l| l.trim() == "BERTH-RESULT-BEGIN");
    let json = begin.and_then(|b| {
        let body: Vec<&str> = lines[b + 1..]
            .iter()
            .take_while(|l| l.trim() != "BERTH-RESULT-END")
            .filter(|l| !is_console_noise(l))
            .map(String::as_str)
            .collect();
        let body = body.join("\n");
        (!body.trim().is_empty()).then(|| serde_json::from_str(&body).map_err(|e| e.to_string()))
    });
    Console { exit, json }
}

/// Every way a selftest result falls short of a pass; empty when it passes.
pub fn checks(v: &Value) -> Vec<String> {
    let mut bad = Vec::new();
    if v["ok"] != json!(true) {
        bad.push(format!(
            "ok is {}, not true (errors: {})",
            v["ok"], v["errors"]
        ));
    }
    if v["driver"] != json!("xen") {
        bad.push(format!("driver is {}, not \"xen\"", v["driver"]));
    }
    match v["sessions"].as_array() {
        None => bad.push("no sessions array".into()),
        Some(sessions) => {
            if sessions.len() != 3 {
                bad.push(format!("{} sessions, not 3", sessions.len()));
            }
            let mut distinct = |key: &str| {
                let all: Vec<String> = sessions.iter().map(|s| s[key].to_string()).collect();
                let set: BTreeSet<&String> = all.iter().collect();
                if set.len() != all.len() {
                    bad.push(format!("{key}s are not distinct: {}", all.join(", ")));
                }
            };
            distinct("session_id");
            distinct("vm_id");
            distinct("domid");
            for (i, s) in sessions.iter().enumerate() {
                let who = format!("session {} ({})", i + 1, s["session_id"]);
                if !s["session_id"].is_string() || !s["vm_id"].is_string() {
                    bad.push(format!("{who}: session_id or vm_id missing"));
                }
                if s["domid"].as_u64().unwrap_or(0) == 0 {
                    bad.push(format!("{who}: domid {} is not a guest's", s["domid"]));
                }
                if s["answered"] != json!(true) {
                    bad.push(format!("{who}: the game did not answer"));
                }
                for key in ["session_id", "vm_id"] {
                    if s["hello"][key] != s[key] {
                        bad.push(format!(
                            "{who}: the game's hello says {key} {}, not {}",
                            s["hello"][key], s[key]
                        ));
                    }
                }
            }
        }
    }
    if v["leftovers"].as_array().is_none_or(|l| !l.is_empty()) {
        bad.push(format!("leftovers: {}", v["leftovers"]));
    }
    if v["prime"]["state_bytes"].as_u64().unwrap_or(0) == 0 {
        bad.push(format!(
            "prime.state_bytes is {}, not positive",
            v["prime"]["state_bytes"]
        ));
    }
    bad
}

/// The Xen tier of `cargo xtask test`: build, boot a selftest, check its result strictly,
/// print a summary.
pub fn selftest() -> Result<()> {
    let art = build()?;
    let t0 = Instant::now();
    let v = run(&art, Mode::Selftest, &RunOpts::default())?;
    let total = t0.elapsed();
    let bad = checks(&v);
    if !bad.is_empty() {
        bail!(
            "the Xen selftest's result fails its checks:\n  {}\nresult: {v}",
            bad.join("\n  ")
        );
    }
    let ms = |x: &Value| x.as_f64().map_or("?".into(), |m| format!("{m:.0}"));
    let activations: Vec<String> = v["sessions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            format!(
                "{} {} ms (domid {}, {})",
                s["session_id"].as_str().unwrap_or("?"),
                ms(&s["activate_ms"]),
                s["domid"],
                s["path"].as_str().unwrap_or("?")
            )
        })
        .collect();
    eprintln!(
        "xtask: Xen tier passed on {}: prime {} ms (boot {} + dock {}, state {:.1} MiB); \
         activations: {}; whole run {:.0} s",
        v["hypervisor"].as_str().unwrap_or("?"),
        ms(&json!(
            v["prime"]["boot_ms"].as_f64().unwrap_or(0.0)
                + v["prime"]["dock_ms"].as_f64().unwrap_or(0.0)
        )),
        ms(&v["prime"]["boot_ms"]),
        ms(&v["prime"]["dock_ms"]),
        v["prime"]["state_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        activations.join(", "),
        total.as_secs_f64()
    );
    for r in v["retried"].as_array().into_iter().flatten() {
        let first = r.as_str().unwrap_or("?").lines().next().unwrap_or("?");
        eprintln!("xtask: Xen tier: retried inside the run (nested emulation faults): {first}");
    }
    Ok(())
}

/// `cargo xtask bench activation --driver xen`: the activation benchmark run by hostd inside
/// the nested dom0, written to `target/bench/activation-xen.json` with the QEMU bench's field
/// names where they apply (null where they do not).
pub fn bench(runs: usize, cold_runs: usize) -> Result<()> {
    let art = build()?;
    let t0 = Instant::now();
    let v = run(&art, Mode::Bench { runs, cold_runs }, &RunOpts::default())?;
    let report = bench_report(&v, runs, t0.elapsed(), &art.image_digest)?;
    let out = image::root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    let path = out.join("activation-xen.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    print_table(&report);
    println!("wrote {}", path.display());
    Ok(())
}

fn bench_report(v: &Value, runs: usize, wall: Duration, image_digest: &str) -> Result<Value> {
    if v["ok"] != json!(true) {
        bail!("the Xen bench run was not ok: errors {}", v["errors"]);
    }
    let samples = |key: &str| -> Result<Vec<f64>> {
        v["bench"][key]
            .as_array()
            .with_context(|| format!("the result has no bench.{key}"))?
            .iter()
            .map(|x| {
                x.as_f64()
                    .with_context(|| format!("bench.{key}: {x} is no number"))
            })
            .collect()
    };
    let (cold, substrate, warm) = (
        samples("cold_boot_ms")?,
        samples("substrate_ms")?,
        samples("warm_ms")?,
    );
    let p50 = |s: &[f64]| {
        let mut s = s.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        crate::bench::percentile(&s, 50.0)
    };
    let ratio = |a: &[f64], b: &[f64]| {
        let r = crate::bench::round(p50(a) / p50(b));
        if r.is_finite() {
            json!(r)
        } else {
            Value::Null
        }
    };
    let prime = &v["prime"];
    Ok(json!({
        "accel": "xen-nested-tcg",
        "hypervisor": v["hypervisor"],
        "qemu": null,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "guest_memory_mib": 128,
        "runs": runs,
        "cold_boot_ms": crate::bench::summary(cold.clone()),
        "substrate_ms": crate::bench::summary(substrate.clone()),
        "cow_ms": null,
        "warm_ms": crate::bench::summary(warm.clone()),
        "cold_over_substrate": ratio(&cold, &substrate),
        "cold_over_cow": null,
        "cold_over_warm": ratio(&cold, &warm),
        "concurrent4_all_ready_ms": null,
        "concurrent16_all_ready_ms": null,
        "pss_mib_per_cow_vm": null,
        "idle_cpu_pct_per_vm": null,
        "substrate_mib": null,
        "full_substrate_mib": null,
        "substrate_state_kib": crate::bench::round(
            prime["state_bytes"].as_f64().unwrap_or(f64::NAN) / 1024.0
        ),
        "prime_ms": crate::bench::round(
            prime["boot_ms"].as_f64().unwrap_or(f64::NAN)
                + prime["dock_ms"].as_f64().unwrap_or(f64::NAN)
        ),
        "many_vms": null,
        "nested_run_s": crate::bench::round(wall.as_secs_f64()),
        "retried": v["retried"].clone(),
        "image_digest": image_digest,
    }))
}

fn print_table(r: &Value) {
    // serde_json's Display ignores widths: numbers become strings first.
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    println!(
        "\nactivation benchmark — {} nested in QEMU TCG ({}), {} host CPUs, 128 MiB guest",
        cell(&r["hypervisor"]),
        cell(&r["accel"]),
        r["cpus"]
    );
    println!(
        "{:<34} {:>10} {:>10}",
        "until the game answers", "p50 ms", "p99 ms"
    );
    for (k, label) in [
        ("cold_boot_ms", "cold boot (xl create)"),
        ("substrate_ms", "substrate (xl restore)"),
        ("warm_ms", "warm clone (identity + unpause)"),
    ] {
        println!(
            "{:<34} {:>10} {:>10}",
            label,
            cell(&r[k]["p50"]),
            cell(&r[k]["p99"])
        );
    }
    println!(
        "cold ÷ substrate: {}   cold ÷ warm: {}",
        r["cold_over_substrate"], r["cold_over_warm"]
    );
    println!(
        "substrate state {} KiB   prime: {} ms   whole nested run: {} s",
        r["substrate_state_kib"], r["prime_ms"], r["nested_run_s"]
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        let session = |n: u64| {
            json!({
                "session_id": format!("selftest-{n}"), "vm_id": format!("vm-{n}"), "domid": n + 2,
                "path": "warm", "game_addr": "[fe80::1%4]:7000", "activate_ms": 1234.5,
                "answer_ms": 2000.1, "answered": true,
                "hello": {"session_id": format!("selftest-{n}"), "vm_id": format!("vm-{n}"),
                          "hostname": "h"}
            })
        };
        json!({
            "ok": true, "driver": "xen", "accel": "xen", "hypervisor": "Xen 4.17.7",
            "prime": {"boot_ms": 30000, "dock_ms": 9000, "state_bytes": 77807385},
            "sessions": [session(1), session(2), session(3)],
            "leftovers": [], "errors": []
        })
    }

    #[test]
    fn a_good_result_passes() {
        assert_eq!(checks(&sample()), Vec::<String>::new());
    }

    #[test]
    fn every_shortfall_is_caught() {
        type Spoil = fn(&mut Value);
        let cases: [(&str, Spoil); 12] = [
            ("ok is", |v| v["ok"] = json!(false)),
            ("driver", |v| v["driver"] = json!("qemu")),
            ("2 sessions", |v| {
                v["sessions"].as_array_mut().expect("array").pop();
            }),
            ("session_ids are not distinct", |v| {
                v["sessions"][1]["session_id"] = json!("selftest-1");
                v["sessions"][1]["hello"]["session_id"] = json!("selftest-1");
            }),
            ("vm_ids are not distinct", |v| {
                v["sessions"][2]["vm_id"] = json!("vm-1");
                v["sessions"][2]["hello"]["vm_id"] = json!("vm-1");
            }),
            ("domids are not distinct", |v| {
                v["sessions"][2]["domid"] = json!(3)
            }),
            ("domid 0", |v| v["sessions"][0]["domid"] = json!(0)),
            ("did not answer", |v| {
                v["sessions"][0]["answered"] = json!(false)
            }),
            ("hello says session_id", |v| {
                v["sessions"][0]["hello"]["session_id"] = json!("selftest-2")
            }),
            ("hello says vm_id", |v| {
                v["sessions"][1]["hello"]["vm_id"] = json!("vm-9")
            }),
            ("leftovers", |v| {
                v["leftovers"] = json!(["domain berth-vm-1"])
            }),
            ("state_bytes", |v| v["prime"]["state_bytes"] = json!(0)),
        ];
        for (want, spoil) in cases {
            let mut v = sample();
            spoil(&mut v);
            let bad = checks(&v);
            assert!(
                bad.iter().any(|b| b.contains(want)),
                "{want:?} not in {bad:?}"
            );
        }
        let mut v = sample();
        v.as_object_mut().expect("object").remove("leftovers");
        assert!(checks(&v).iter().any(|b| b.contains("leftovers")));
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn the_result_is_read_between_markers_through_console_noise() {
        let log = lines(
            "(XEN) Xen version 4.17\nBERTH-DOM0-UP run=selftest uptime=9.1\nBERTH-RESULT-BEGIN\n\
             {\"ok\":true,\n(XEN) d1v0 something\n[   41.123456] xen-netback: noise\n\
             \"driver\":\"xen\"}\n\nBERTH-RESULT-END\nBERTH-EXIT 0",
        );
        let c = parse_console(&log);
        assert_eq!(c.exit, Some(0));
        let v = c.json.expect("some").expect("json");
        assert_eq!(v["driver"], "xen");
    }

    #[test]
    fn a_failed_run_has_its_exit_code_and_no_json() {
        let c = parse_console(&lines(
            "BERTH-DOM0-UP\nerror: unrecognized subcommand\nBERTH-RESULT-BEGIN\n\n\
             BERTH-RESULT-END\nBERTH-EXIT 2",
        ));
        assert_eq!(c.exit, Some(2));
        assert!(c.json.is_none());
        let c = parse_console(&lines("BERTH-DOM0-UP\nKernel panic"));
        assert_eq!(c.exit, None);
        assert!(c.json.is_none());
    }

    #[test]
    fn a_run_past_its_timeout_is_killed_and_shows_its_console() {
        let dir = tempfile::tempdir().expect("temp dir");
        let t0 = Instant::now();
        let err = supervise(
            Command::new("sh").args([
                "-c",
                "echo BERTH-DOM0-UP; printf 'half\\r\\n'; exec sleep 31.4159",
            ]),
            &dir.path().join("t.log"),
            Duration::from_secs(1),
        )
        .expect_err("times out");
        let msg = format!("{err:#}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{msg}");
        assert!(msg.contains("timed out after 1 s"), "{msg}");
        assert!(msg.contains("BERTH-DOM0-UP\nhalf"), "{msg}");
        let left = Command::new("pgrep")
            .args(["-f", "sleep 31.4159"])
            .output()
            .expect("pgrep");
        assert!(left.stdout.is_empty(), "the process outlived its runner");
    }

    #[test]
    fn a_finished_run_gives_its_lines_without_carriage_returns() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (lines, status) = supervise(
            Command::new("sh").args(["-c", "printf 'a\\r\\nBERTH-EXIT 0\\r\\n'; exit 3"]),
            &dir.path().join("t.log"),
            Duration::from_secs(30),
        )
        .expect("runs");
        assert_eq!(lines, ["a", "BERTH-EXIT 0"]);
        assert_eq!(status.code(), Some(3));
        let log = std::fs::read_to_string(dir.path().join("t.log")).expect("log");
        assert_eq!(log, "a\nBERTH-EXIT 0\n");
    }

    #[test]
    fn a_machine_that_cannot_run_the_tier_is_told_from_a_failure() {
        let e = unavailable(anyhow::anyhow!("apt-get download xen-utils-4.17 failed"))
            .context("building the Xen artefacts");
        assert_eq!(
            unavailable_reason(&e),
            Some("apt-get download xen-utils-4.17 failed")
        );
        let e = anyhow::anyhow!("berth-hostd exited with 1").context("nested Xen run");
        assert_eq!(unavailable_reason(&e), None);
    }

    #[test]
    fn dom0_command_line_has_no_comma() {
        let opts = RunOpts::default();
        let bench = dom0_cmdline(
            Mode::Bench {
                runs: 5,
                cold_runs: 2,
            },
            &opts,
        );
        assert_eq!(
            bench,
            "console=hvc0 quiet berth.run=bench berth.sessions=3 berth.runs=5 berth.cold=2"
        );
        assert!(!dom0_cmdline(Mode::Selftest, &opts).contains(','));
    }

    #[test]
    fn the_bench_report_uses_the_qemu_bench_names() {
        let mut v = sample();
        v["bench"] = json!({"cold_boot_ms": [9000.0, 11000.0], "substrate_ms": [3000.0, 3000.0],
                            "warm_ms": [1000.0, 1000.0]});
        let r = bench_report(&v, 2, Duration::from_secs(300), "abc").expect("report");
        assert_eq!(r["accel"], "xen-nested-tcg");
        assert_eq!(r["substrate_ms"]["p50"], 3000.0);
        assert_eq!(r["cow_ms"], Value::Null);
        assert_eq!(r["prime_ms"], 39000.0);
        assert_eq!(r["nested_run_s"], 300.0);
        assert!(r["cold_over_warm"].as_f64().is_some_and(|x| x >= 9.0));
        v["bench"] = Value::Null;
        assert!(bench_report(&v, 2, Duration::ZERO, "abc").is_err());
    }
}
