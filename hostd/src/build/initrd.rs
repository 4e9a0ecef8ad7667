//! The guest's initramfs: busybox, `/init`, the agent, the game's files and packages, the
//! kernel modules it loads, and the agent's [`GameSpec`](berth_protocol::guest::GameSpec).

use super::cpio::Cpio;
use super::{files_under, GuestBins};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Reads `depends=` from a kernel module's `.modinfo` section.
pub fn module_depends(ko: &[u8]) -> Vec<String> {
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
pub fn module_order(modules: &BTreeMap<String, PathBuf>, wanted: &[String]) -> Result<Vec<String>> {
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
pub fn kernel_modules(kernel_root: &Path) -> Result<BTreeMap<String, PathBuf>> {
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
pub fn module_list(path: &Path) -> Result<Vec<String>> {
    Ok(module_names(
        &std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    ))
}

/// The module names of a list file's text.
pub fn module_names(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// The compressed kernel (`boot/vmlinuz-*`) of an extracted kernel package.
pub fn find_vmlinuz(kernel_root: &Path) -> Result<PathBuf> {
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
pub fn add_modules(cpio: &mut Cpio, kernel_root: &Path, wanted: &[String]) -> Result<()> {
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
pub struct GuestInitrd<'a> {
    /// The `/init` script.
    pub init: &'a [u8],
    pub busybox: &'a Path,
    pub guest: &'a GuestBins,
    /// An extracted kernel package, and the modules to load from it.
    pub kernel_root: &'a Path,
    pub modules: &'a [String],
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
        cpio.file("init", 0o755, self.init);
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
        add_modules(&mut cpio, self.kernel_root, self.modules)?;
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
