//! `cargo xtask image`: the guest image, from Debian packages and this workspace only.
//!
//! Output in `target/image/`: `vmlinuz` (from the kernel .deb, never installed on the host),
//! `initrd.cpio` (busybox-static, the virtio modules, `/init`, the static `berth-guest`),
//! `data.raw` (ext4 with the game's data folder: `games/arena/data`) and `manifest.json` with the
//! image digest hostd puts into every substrate header. Rebuilt only when an input changes.

use crate::cpio::Cpio;
use crate::sys;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const KERNEL_META: &str = "linux-image-cloud-amd64";

pub use berth_hostd::image::Manifest;
use berth_hostd::manifest::GameManifest;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .into()
}

pub fn image_dir() -> PathBuf {
    root().join("target/image")
}

pub(crate) fn sha_files(h: &mut Sha256, paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        h.update(p.to_string_lossy().as_bytes());
        h.update(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?);
    }
    Ok(())
}

/// Every file under `dir` (following no symlinks into directories), sorted.
pub(crate) fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(files_under(&p)?);
        } else {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// A .deb's file name (name, version, architecture): what an input digest records of a package.
pub(crate) fn deb_name(deb: &Path) -> String {
    deb.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// What an image is built from besides the kernel: the agent, the game's manifest and its
/// server binary (when the manifest builds one from this workspace).
#[derive(Debug, Clone)]
pub(crate) struct GuestBins {
    pub agent: PathBuf,
    pub manifest: GameManifest,
    pub game: Option<PathBuf>,
}

impl GuestBins {
    /// Every input file: binaries, the game's data and files.
    pub fn paths(&self) -> Result<Vec<PathBuf>> {
        let mut out = vec![self.agent.clone()];
        out.extend(self.game.clone());
        if let Some(data) = &self.manifest.build.data {
            out.extend(files_under(data)?);
        }
        for source in self.manifest.build.files.values() {
            if source.is_dir() {
                out.extend(files_under(source)?);
            } else {
                out.push(source.clone());
            }
        }
        Ok(out)
    }

    /// Hashes every input, the manifest included.
    pub fn digest_into(&self, h: &mut Sha256) -> Result<()> {
        sha_files(h, &self.paths()?)?;
        h.update(serde_json::to_vec(&self.manifest)?);
        Ok(())
    }
}

/// The arena's manifest (`games/arena/game.toml`).
pub(crate) fn arena_manifest() -> Result<GameManifest> {
    game_manifest("arena")
}

/// The manifest of the game in `games/<name>/`. Of the games there, the image builder makes
/// the arena's only so far: any other name is refused saying so.
pub(crate) fn game_manifest(name: &str) -> Result<GameManifest> {
    if name != "arena" {
        bail!(
            "no image for game {name:?}: `cargo xtask image` builds the arena's \
             (games/arena) only so far"
        );
    }
    let dir = root().join("games").join(name);
    Ok(GameManifest::load(
        &dir.join(berth_hostd::manifest::FILE_NAME),
    )?)
}

/// Builds the static guest binaries: the agent, and the game's server when its manifest
/// names a workspace binary (`build.cargo`). One agent serves the QEMU image and the Xen
/// image (`cargo xtask xen-image`): the `xen` feature only adds the XenStore transport, which
/// the agent picks at run time.
pub(crate) fn build_guest(manifest: &GameManifest) -> Result<GuestBins> {
    let target_dir = root().join("target/guest");
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(root())
        .args(["build", "--release", "--quiet", "-p", "berth-guest"])
        .args(["--features", "berth-guest/xen"])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        );
    if let Some(package) = &manifest.build.cargo {
        cargo.args(["-p", package]);
    }
    sys::run(&mut cargo)?;
    let bin = target_dir.join("x86_64-unknown-linux-gnu/release");
    Ok(GuestBins {
        agent: bin.join("berth-guest"),
        game: manifest.build.cargo.as_ref().map(|p| bin.join(p)),
        manifest: manifest.clone(),
    })
}

/// Reads `depends=` from a kernel module's `.modinfo` section.
pub(crate) fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    ko.windows(key.len())
        .position(|w| w == key)
        .map(|i| {
            let rest = &ko[i + key.len()..];
            let end = rest.iter().position(|b| *b == 0).unwrap_or(0);
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Module load order for `wanted`, dependencies first.
pub(crate) fn module_order(
    modules: &BTreeMap<String, PathBuf>,
    wanted: &[String],
) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        modules: &BTreeMap<String, PathBuf>,
        out: &mut Vec<String>,
        depth: usize,
    ) -> Result<()> {
        if out.iter().any(|m| m == name) {
            return Ok(());
        }
        if depth > 16 {
            bail!("module dependency loop at {name}");
        }
        let path = modules
            .get(name)
            .with_context(|| format!("kernel has no module {name}"))?;
        for dep in module_depends(&std::fs::read(path)?) {
            visit(&dep, modules, out, depth + 1)?;
        }
        out.push(name.to_string());
        Ok(())
    }
    let mut out = Vec::new();
    for w in wanted {
        visit(w, modules, &mut out, 0)?;
    }
    Ok(out)
}

/// The kernel modules of an extracted kernel package, by name.
pub(crate) fn kernel_modules(kernel_root: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut modules = BTreeMap::new();
    for p in files_under(&kernel_root.join("lib/modules"))? {
        if let Some(name) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            modules.insert(name.to_string(), p.clone());
        }
    }
    Ok(modules)
}

/// A list file of module names: one a line, `#` comments.
pub(crate) fn module_list(path: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// The compressed kernel (`boot/vmlinuz-*`) of an extracted kernel package.
pub(crate) fn find_vmlinuz(kernel_root: &Path) -> Result<PathBuf> {
    std::fs::read_dir(kernel_root.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("kernel package has no vmlinuz")
}

/// Adds `/lib/modules/<name>.ko` for `wanted` and their dependencies, and `/lib/modules/order`
/// (dependencies first) for the init script to `insmod` in that order.
pub(crate) fn add_modules(cpio: &mut Cpio, kernel_root: &Path, wanted: &[String]) -> Result<()> {
    let modules = kernel_modules(kernel_root)?;
    let order = module_order(&modules, wanted)?;
    cpio.dir("lib/modules");
    for m in &order {
        cpio.file(
            &format!("lib/modules/{m}.ko"),
            0o644,
            &std::fs::read(&modules[m])?,
        );
    }
    cpio.file(
        "lib/modules/order",
        0o644,
        (order.join("\n") + "\n").as_bytes(),
    );
    Ok(())
}

/// What goes into a guest's initramfs.
pub(crate) struct GuestInitrd<'a> {
    pub init: &'a Path,
    pub busybox: &'a Path,
    pub guest: &'a GuestBins,
    /// An extracted kernel package, and the list of modules to load from it.
    pub kernel_root: &'a Path,
    pub modules_list: &'a Path,
    /// The game's data under `/data` in the initramfs, for an image without a data disk
    /// (Xen); else `/data` stays empty for the data disk to be mounted on.
    pub data_inside: bool,
}

impl GuestInitrd<'_> {
    /// The initramfs: busybox, `/init`, the agent, the modules, the game's data if asked.
    pub fn build(&self) -> Result<Vec<u8>> {
        let mut cpio = Cpio::default();
        cpio.skeleton(&[
            "bin",
            "dev",
            "proc",
            "sys",
            "data",
            "tmp",
            "etc",
            "etc/berth",
            "lib",
            "lib/modules",
        ]);
        cpio.file("init", 0o755, &std::fs::read(self.init)?);
        cpio.file("bin/busybox", 0o755, &std::fs::read(self.busybox)?);
        cpio.file("bin/berth-guest", 0o755, &std::fs::read(&self.guest.agent)?);
        let m = &self.guest.manifest;
        if let (Some(game), Some(program)) = (&self.guest.game, m.server.command.first()) {
            cpio.file(
                program.trim_start_matches('/'),
                0o755,
                &std::fs::read(game)?,
            );
        }
        for (at, source) in &m.build.files {
            add_path(&mut cpio, at.trim_start_matches('/'), source)?;
        }
        let spec = serde_json::to_vec_pretty(&m.spec())?;
        cpio.file(
            berth_protocol::guest::GAME_SPEC_PATH.trim_start_matches('/'),
            0o644,
            &spec,
        );
        add_modules(
            &mut cpio,
            self.kernel_root,
            &module_list(self.modules_list)?,
        )?;
        if self.data_inside {
            if let Some(data) = &m.build.data {
                add_path(&mut cpio, "data", data)?;
            }
        }
        Ok(cpio.finish())
    }
}

/// `source` (a file, or a folder and everything under it) at `at` in the initramfs; files
/// keep their executable bit.
fn add_path(cpio: &mut Cpio, at: &str, source: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let files = if source.is_dir() {
        files_under(source)?
    } else {
        vec![source.to_path_buf()]
    };
    for f in files {
        let rel = f
            .strip_prefix(source)
            .expect("files_under stays under its root");
        let name = if rel.as_os_str().is_empty() {
            at.to_owned()
        } else {
            format!("{at}/{}", rel.display())
        };
        let exec = std::fs::metadata(&f)?.permissions().mode() & 0o111 != 0;
        cpio.file(&name, if exec { 0o755 } else { 0o644 }, &std::fs::read(&f)?);
    }
    Ok(())
}

/// The packages every image is made of, downloaded once.
struct Base {
    kernel_pkg: String,
    kernel_deb: PathBuf,
    busybox_deb: PathBuf,
}

/// Builds (or reuses) the arena's image in `target/image` and each test game's
/// (`tests/games/*/game.toml`) in `target/images/<name>`; returns the arena's manifest.
pub fn build() -> Result<Manifest> {
    sys::ensure(&[sys::E2FS])?;
    let debs = root().join("target/debs");
    let kernel_pkg = sys::resolve_meta(KERNEL_META, "linux-image-")?;
    let base = Base {
        kernel_deb: sys::download_deb(&kernel_pkg, &debs)?,
        busybox_deb: sys::download_deb("busybox-static", &debs)?,
        kernel_pkg,
    };
    let arena = build_image(&base, &arena_manifest()?, &image_dir())?;
    for game in test_games()? {
        build_image(&base, &game, &images_dir().join(&game.name))?;
    }
    Ok(arena)
}

/// Where the test games' images go: `target/images/<name>`.
pub fn images_dir() -> PathBuf {
    root().join("target/images")
}

/// The manifests of the games the tests use (`tests/games/*/game.toml`).
fn test_games() -> Result<Vec<GameManifest>> {
    let mut out = Vec::new();
    let dir = root().join("tests/games");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| {
            e.ok()
                .map(|e| e.path().join(berth_hostd::manifest::FILE_NAME))
        })
        .filter(|p| p.exists())
        .collect();
    entries.sort();
    for path in entries {
        out.push(GameManifest::load(&path)?);
    }
    Ok(out)
}

/// Builds (or reuses) the image of `game` in `dir`.
fn build_image(base: &Base, game: &GameManifest, dir: &Path) -> Result<Manifest> {
    let guest = build_guest(game)?;
    let assets = root().join("assets");
    let init = assets.join("image/init");
    let modules_list = assets.join("image/modules");

    let mut h = Sha256::new();
    h.update(deb_name(&base.kernel_deb));
    h.update(deb_name(&base.busybox_deb));
    guest.digest_into(&mut h)?;
    sha_files(&mut h, &[init.clone(), modules_list.clone()])?;
    let input_digest = hex::encode(h.finalize());

    let manifest_path = dir.join("manifest.json");
    if let Ok(old) = std::fs::read(&manifest_path) {
        if let Ok(old) = serde_json::from_slice::<Manifest>(&old) {
            if old.input_digest == input_digest && dir.join(&old.disk).exists() {
                eprintln!(
                    "xtask: image of {} up to date ({})",
                    game.name,
                    &old.digest[..12]
                );
                return Ok(old);
            }
        }
    }
    eprintln!(
        "xtask: building the image of {} from {} and busybox-static",
        game.name, base.kernel_pkg
    );
    let work = root().join(format!("target/image-work-{}", game.name));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(dir)?;
    for deb in [&base.kernel_deb, &base.busybox_deb] {
        sys::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&work))?;
    }
    std::fs::copy(find_vmlinuz(&work)?, dir.join("vmlinuz"))?;
    let initrd = GuestInitrd {
        init: &init,
        busybox: &work.join("bin/busybox"),
        guest: &guest,
        kernel_root: &work,
        modules_list: &modules_list,
        data_inside: false,
    };
    std::fs::write(dir.join("initrd.cpio"), initrd.build()?)?;
    let disk = data_disk(&guest.manifest, &work, dir)?;

    let mut h = Sha256::new();
    sha_files(
        &mut h,
        &[dir.join("vmlinuz"), dir.join("initrd.cpio"), disk],
    )?;
    let manifest = Manifest {
        format: 1,
        digest: hex::encode(h.finalize()),
        input_digest,
        kernel: "vmlinuz".into(),
        initrd: "initrd.cpio".into(),
        disk: "data.raw".into(),
        kernel_package: base.kernel_pkg.clone(),
        cmdline: "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init BERTH_INIT_MS=1000".into(),
    };
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&manifest)?)?;
    let _ = std::fs::remove_dir_all(&work);
    eprintln!(
        "xtask: image {} in {}",
        &manifest.digest[..12],
        dir.display()
    );
    Ok(manifest)
}

/// The data disk `dir/data.raw`: ext4 holding the game's data (an empty one when it has
/// none).
fn data_disk(game: &GameManifest, work: &Path, dir: &Path) -> Result<PathBuf> {
    let data = match &game.build.data {
        Some(d) => d.clone(),
        None => {
            let empty = work.join("empty-data");
            std::fs::create_dir_all(&empty)?;
            empty
        }
    };
    let disk = dir.join("data.raw");
    let _ = std::fs::remove_file(&disk);
    sys::run(
        Command::new("mke2fs")
            .args([
                "-q",
                "-t",
                "ext4",
                "-L",
                "berth-data",
                "-O",
                "^has_journal",
                "-d",
            ])
            .arg(&data)
            .arg(&disk)
            .arg("16M"),
    )?;
    Ok(disk)
}
