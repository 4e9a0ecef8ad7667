//! Images from a game's manifest (`game.toml`): `berth-hostd image build`, and the xtask
//! commands that build this workspace's games.
//!
//! An image is a folder with the kernel (from Debian's cloud kernel package), an initramfs
//! ([`initrd`]: busybox, `/init`, the agent, the game's files, its Debian packages and their
//! shared libraries, the virtio modules), the game's read-only data disk (ext4) and
//! `manifest.json` ([`crate::image::Manifest`]). Everything comes from Debian packages that are
//! downloaded ([`debs`]), never installed on the build host. The result is cached: a folder
//! whose `manifest.json` records the same input digest is reused as it is.

pub mod cpio;
pub mod debs;
pub mod initrd;

use crate::image::Manifest;
use crate::manifest::GameManifest;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

pub use initrd::GuestInitrd;

/// The Debian metapackage of the game VMs' kernel.
pub const KERNEL_META: &str = "linux-image-cloud-amd64";
/// The game VM's `/init` (devices, modules, network, data disk, then the agent).
const INIT: &str = include_str!("../../../assets/image/init");
/// The kernel modules the game VM loads.
const MODULES: &str = include_str!("../../../assets/image/modules");
const CMDLINE: &str = "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init BERTH_INIT_MS=1000";
/// Bumped when this recipe changes what it builds from the same inputs.
const RECIPE: u32 = 3;
/// What an image never needs of a package.
const PACKAGE_SKIP: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/lintian",
    "usr/share/locale",
    "usr/share/bug",
];
/// Where the data disk holds the image's packages: the guest's `/init` links them into `/`
/// (in the guest: `/data/.berth/root`). On the disk rather than in the initramfs, they are read
/// through the page cache instead of taking the VM's memory.
const DISK_ROOT: &str = ".berth/root";
/// Loaded with `dlopen` by glibc (a thread's unwinding goes through it), so `ldd` never
/// lists it.
const DLOPENED: &str = "libgcc_s.so.1";
const HOST_LIB_DIRS: &[&str] = &["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"];

/// Hashes each file's path and contents.
pub fn sha_files(h: &mut Sha256, paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        h.update(p.to_string_lossy().as_bytes());
        h.update(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?);
    }
    Ok(())
}

/// Every file under `dir` (following no symlinks into directories), sorted.
pub fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if std::fs::symlink_metadata(&p)?.is_dir() {
            out.extend(files_under(&p)?);
        } else {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// What an image is built from besides packages: the agent, the game's manifest and its
/// server binary (when the manifest names one built from this workspace, `build.cargo`).
#[derive(Debug, Clone)]
pub struct GuestBins {
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

/// Builds (or reuses) the image of every `[[images]]` entry that names its game's
/// `manifest`, into its `dir`, with `agent`; downloaded Debian packages are kept in
/// [`DEB_CACHE_ENV`], else in `.debs` next to the first such image. Blocking: for the start
/// of `berth-hostd run`.
pub fn configured_images(config: &crate::HostdConfig, agent: &Path) -> Result<()> {
    let mut base = None;
    for (i, ic) in config.images.iter().enumerate() {
        let Some(path) = &ic.manifest else {
            continue;
        };
        let key = format!("images[{i}].manifest");
        let manifest = GameManifest::load(path).with_context(|| key.clone())?;
        if manifest.name != ic.name {
            bail!(
                "{key}: {} is the game {:?}, not {:?}",
                path.display(),
                manifest.name,
                ic.name
            );
        }
        if let Some(cargo) = &manifest.build.cargo {
            bail!(
                "{key}: build.cargo ({cargo:?}) builds from Berth's workspace; \
                 put your server's binary in build.files"
            );
        }
        if base.is_none() {
            check_static(agent)?;
            let debs = std::env::var_os(DEB_CACHE_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| ic.dir.parent().unwrap_or(Path::new(".")).join(".debs"));
            base = Some(Base::download(&debs)?);
        }
        let guest = GuestBins {
            agent: agent.to_owned(),
            manifest,
            game: None,
        };
        let base = base.as_ref().expect("set above");
        build_image(base, &guest, &ic.dir).with_context(|| format!("{key}: building the image"))?;
    }
    Ok(())
}

/// Where [`configured_images`] keeps downloaded Debian packages, if set.
pub const DEB_CACHE_ENV: &str = "BERTH_DEB_CACHE";

/// Refuses a program that is not statically linked: the agent runs as PID 1 in a VM that has
/// no C library of its own.
pub fn check_static(program: &Path) -> Result<()> {
    if !debs::is_elf(program) {
        bail!(
            "{} is not a program (the agent, a static berth-guest)",
            program.display()
        );
    }
    let o = Command::new("ldd")
        .arg(program)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&o.stdout);
    if o.status.success() && text.contains("=>") {
        bail!(
            "{} is linked dynamically; the agent must be static \
             (RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p berth-guest \
             --target x86_64-unknown-linux-gnu)",
            program.display()
        );
    }
    Ok(())
}

/// The packages every image is made of, downloaded once into `debs`.
pub struct Base {
    pub kernel_pkg: String,
    pub kernel_deb: PathBuf,
    pub busybox_deb: PathBuf,
    pub debs: PathBuf,
}

impl Base {
    pub fn download(debs: &Path) -> Result<Base> {
        let kernel_pkg = debs::resolve_meta(KERNEL_META, "linux-image-")?;
        Ok(Base {
            kernel_deb: debs::download_deb(&kernel_pkg, debs)?,
            busybox_deb: debs::download_deb("busybox-static", debs)?,
            kernel_pkg,
            debs: debs.to_owned(),
        })
    }
}

/// A manifest's Debian packages unpacked under `root`, and the shared libraries their
/// programs need (path in the image → file to copy).
pub struct Unpacked {
    root: PathBuf,
    libs: BTreeMap<String, PathBuf>,
}

impl Unpacked {
    /// The .debs of `packages` and of the library packages they depend on, downloaded.
    fn debs(packages: &[String], debs_dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
        if packages.is_empty() {
            return Ok((vec![], vec![]));
        }
        let listed = packages
            .iter()
            .map(|p| debs::download_deb(p, debs_dir))
            .collect::<Result<Vec<_>>>()?;
        let libraries = debs::library_closure(packages)?
            .iter()
            .map(|p| debs::download_deb(p, debs_dir))
            .collect::<Result<Vec<_>>>()?;
        Ok((listed, libraries))
    }

    /// Unpacks the packages into `work` and finds their programs' libraries.
    fn new(listed: &[PathBuf], libraries: &[PathBuf], work: &Path) -> Result<Unpacked> {
        let root = work.join("packages");
        let lib_root = work.join("libraries");
        for (debs, to) in [(listed, &root), (libraries, &lib_root)] {
            std::fs::create_dir_all(to)?;
            for deb in debs {
                debs::unpack(deb, to)?;
            }
        }
        let search: Vec<PathBuf> = [&root, &lib_root]
            .iter()
            .flat_map(|r| HOST_LIB_DIRS.iter().map(|d| r.join(&d[1..])))
            .filter(|d| d.is_dir())
            .collect();
        let elves: Vec<PathBuf> = files_under(&root)?
            .into_iter()
            .filter(|p| debs::is_elf(p))
            .collect();
        let mut libs = debs::libraries(&elves, &search)?;
        // Those in the packages' own tree go in with it.
        libs.retain(|_, from| !from.starts_with(&root));
        if let Some(host) = HOST_LIB_DIRS
            .iter()
            .map(|d| Path::new(d).join(DLOPENED))
            .find(|p| p.exists())
        {
            libs.insert(format!("lib/x86_64-linux-gnu/{DLOPENED}"), host);
        }
        Ok(Unpacked { root, libs })
    }

    /// Moves the packages' files (but [`PACKAGE_SKIP`]) to `to` and copies the libraries in:
    /// the tree the data disk holds at [`DISK_ROOT`].
    fn stage(&self, to: &Path) -> Result<()> {
        for skip in PACKAGE_SKIP {
            let _ = std::fs::remove_dir_all(self.root.join(skip));
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(&self.root, to)?;
        for (name, from) in &self.libs {
            let at = to.join(name);
            if let Some(parent) = at.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let _ = std::fs::remove_file(&at);
            std::fs::copy(from, &at).with_context(|| format!("copying {}", from.display()))?;
        }
        Ok(())
    }
}

/// Builds the image of `guest` into `dir`, or reuses what is there when it was built from the
/// same inputs. `work` is a scratch folder, removed after.
pub fn build_image(base: &Base, guest: &GuestBins, dir: &Path) -> Result<Manifest> {
    let game = &guest.manifest;
    let (listed, libraries) = Unpacked::debs(&game.build.packages, &base.debs)?;
    let mut h = Sha256::new();
    h.update(RECIPE.to_le_bytes());
    for deb in [&base.kernel_deb, &base.busybox_deb]
        .into_iter()
        .chain(&listed)
        .chain(&libraries)
    {
        h.update(debs::deb_name(deb));
    }
    guest.digest_into(&mut h)?;
    h.update(INIT);
    h.update(MODULES);
    let input_digest = hex::encode(h.finalize());

    let manifest_path = dir.join("manifest.json");
    if let Some(old) = cached(&manifest_path, dir, &input_digest) {
        eprintln!("image of {} up to date ({})", game.name, &old.digest[..12]);
        return Ok(old);
    }
    eprintln!(
        "building the image of {} from {}, busybox-static{}",
        game.name,
        base.kernel_pkg,
        if listed.is_empty() {
            String::new()
        } else {
            format!(" and {}", game.build.packages.join(", "))
        }
    );
    let work = dir.with_file_name(format!(
        ".{}-work",
        dir.file_name()
            .map_or("image".into(), |n| n.to_string_lossy())
    ));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(dir)?;
    let built = write_image(base, guest, dir, &work, (&listed, &libraries), input_digest);
    let _ = std::fs::remove_dir_all(&work);
    let manifest = built?;
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&manifest)?)?;
    eprintln!("image {} in {}", &manifest.digest[..12], dir.display());
    Ok(manifest)
}

/// The manifest in `dir` if it was built from `input_digest` and its files are there.
fn cached(manifest_path: &Path, dir: &Path, input_digest: &str) -> Option<Manifest> {
    let old: Manifest = serde_json::from_slice(&std::fs::read(manifest_path).ok()?).ok()?;
    (old.input_digest == input_digest && dir.join(&old.disk).exists()).then_some(old)
}

/// Writes the kernel, the initramfs and the data disk into `dir`; their manifest.
fn write_image(
    base: &Base,
    guest: &GuestBins,
    dir: &Path,
    work: &Path,
    (listed, libraries): (&[PathBuf], &[PathBuf]),
    input_digest: String,
) -> Result<Manifest> {
    let kernel_root = work.join("kernel");
    debs::unpack(&base.kernel_deb, &kernel_root)?;
    debs::unpack(&base.busybox_deb, &kernel_root)?;
    std::fs::copy(initrd::find_vmlinuz(&kernel_root)?, dir.join("vmlinuz"))?;
    let packages = if listed.is_empty() {
        None
    } else {
        Some(Unpacked::new(listed, libraries, work)?)
    };
    let initrd = GuestInitrd {
        init: INIT.as_bytes(),
        busybox: &kernel_root.join("bin/busybox"),
        guest,
        kernel_root: &kernel_root,
        modules: &initrd::module_names(MODULES),
        data_inside: false,
    };
    std::fs::write(dir.join("initrd.cpio"), initrd.build()?)?;
    let disk = data_disk(&guest.manifest, packages.as_ref(), work, dir)?;
    let mut h = Sha256::new();
    sha_files(
        &mut h,
        &[dir.join("vmlinuz"), dir.join("initrd.cpio"), disk],
    )?;
    Ok(Manifest {
        format: 1,
        digest: hex::encode(h.finalize()),
        input_digest,
        kernel: "vmlinuz".into(),
        initrd: "initrd.cpio".into(),
        disk: "data.raw".into(),
        kernel_package: base.kernel_pkg.clone(),
        cmdline: CMDLINE.into(),
        game: guest.manifest.runtime(),
    })
}

/// The data disk `dir/data.raw`: ext4 holding the game's data and its packages (at
/// [`DISK_ROOT`]), sized to fit them.
fn data_disk(
    game: &GameManifest,
    packages: Option<&Unpacked>,
    work: &Path,
    dir: &Path,
) -> Result<PathBuf> {
    let data = work.join("disk");
    std::fs::create_dir_all(&data)?;
    if let Some(d) = &game.build.data {
        debs::run(Command::new("cp").arg("-a").arg(d.join(".")).arg(&data))?;
    }
    if let Some(p) = packages {
        p.stage(&data.join(DISK_ROOT))?;
    }
    let bytes: u64 = files_under(&data)?
        .iter()
        .filter_map(|f| std::fs::symlink_metadata(f).ok())
        .map(|m| m.len().next_multiple_of(4096))
        .sum();
    let mib = (bytes * 5 / 4 / 1048576 + 16).max(16);
    let disk = dir.join("data.raw");
    let _ = std::fs::remove_file(&disk);
    let mke2fs = ["/usr/sbin/mke2fs", "/sbin/mke2fs"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(mke2fs) = mke2fs else {
        bail!("mke2fs is missing: install Debian's e2fsprogs");
    };
    debs::run(
        Command::new(mke2fs)
            .args(["-q", "-t", "ext4", "-L", "berth-data"])
            .args(["-O", "^has_journal", "-d"])
            .arg(&data)
            .arg(&disk)
            .arg(format!("{mib}M")),
    )?;
    Ok(disk)
}
