//! Debian packages for images: downloaded with `apt-get download` (never installed on the
//! build host), unpacked with `dpkg-deb`, and the shared libraries their programs need found
//! with `ldd`.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `cmd`, its output going to stderr (stdout is the caller's answer); its failure names
/// the command.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .stdout(std::io::stderr())
        .status()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// `apt-get update`, unless apt's package lists are already there.
pub fn apt_update_once() -> Result<()> {
    let lists = std::fs::read_dir("/var/lib/apt/lists")
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
        .unwrap_or(false);
    if lists {
        return Ok(());
    }
    run(Command::new("apt-get").arg("update"))
}

/// Downloads a Debian package (not installed) into `dir`, unless it is there; its .deb path.
pub fn download_deb(package: &str, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let prefix = format!("{package}_");
    let find = |dir: &Path| -> Option<PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
            })
    };
    if let Some(p) = find(dir) {
        return Ok(p);
    }
    apt_update_once()?;
    run(Command::new("apt-get")
        .arg("download")
        .arg(package)
        .current_dir(dir))
    .with_context(|| format!("no Debian package {package:?} could be downloaded"))?;
    find(dir).with_context(|| format!("apt-get download {package} left no .deb"))
}

/// The real package a Debian metapackage (e.g. `linux-image-cloud-amd64`) depends on.
pub fn resolve_meta(meta: &str, prefix: &str) -> Result<String> {
    apt_update_once()?;
    let out = Command::new("apt-cache").args(["depends", meta]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with(prefix))
        .map(str::to_string)
        .with_context(|| format!("apt-cache depends {meta}: no {prefix}* dependency"))
}

/// A .deb's file name (name, version, architecture): what an input digest records of it.
pub fn deb_name(deb: &Path) -> String {
    deb.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Unpacks `deb` into `root`.
pub fn unpack(deb: &Path, root: &Path) -> Result<()> {
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root))
}

/// Libraries every image takes from the build host rather than from packages: the C library
/// and its loader must be the one version, and the build host is the same Debian release.
const FROM_HOST: &[&str] = &["libc6", "libgcc-s1", "libstdc++6", "gcc-12-base"];

/// The library packages (`lib*`) in the dependency closure of `packages` (Depends and
/// Pre-Depends, recursively), except [`FROM_HOST`]: where the shared libraries of their
/// programs come from.
pub fn library_closure(packages: &[String]) -> Result<Vec<String>> {
    apt_update_once()?;
    let out = Command::new("apt-cache")
        .args(["depends", "--recurse", "--no-recommends", "--no-suggests"])
        .args([
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
        ])
        .args(packages)
        .output()
        .context("running apt-cache depends")?;
    if !out.status.success() {
        bail!(
            "apt-cache depends {}: {}",
            packages.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let listed: BTreeSet<&str> = packages.iter().map(String::as_str).collect();
    let text = String::from_utf8_lossy(&out.stdout);
    let found: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('<'))
        .map(str::trim)
        .filter(|p| p.starts_with("lib") && !FROM_HOST.contains(p) && !listed.contains(p))
        .map(str::to_string)
        .collect();
    Ok(found.into_iter().collect())
}

/// Is `path` an ELF file (not a link)?
pub fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file())
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && magic == *b"\x7fELF"
}

/// The shared libraries `elves` need, as (path in the image, file to copy): each resolved by
/// `ldd` with `search` (unpacked library folders) first, then the build host's own. A library
/// found nowhere is an error naming it and the program that needs it.
pub fn libraries(elves: &[PathBuf], search: &[PathBuf]) -> Result<BTreeMap<String, PathBuf>> {
    let path = std::env::join_paths(search)?;
    let mut out = BTreeMap::new();
    for elf in elves {
        let o = Command::new("ldd")
            .env("LD_LIBRARY_PATH", &path)
            .arg(elf)
            .output()
            .context("running ldd")?;
        let text = String::from_utf8_lossy(&o.stdout);
        if !o.status.success() {
            // Not a dynamic program (a static one, or a data file that looks like ELF).
            continue;
        }
        for lib in ldd_paths(&text).with_context(|| format!("ldd {}", elf.display()))? {
            let at = search
                .iter()
                .find_map(|root| lib.strip_prefix(root).ok().map(|rest| (root, rest)));
            let name = match at {
                Some((_, rest)) => format!("usr/lib/x86_64-linux-gnu/{}", rest.display()),
                None => lib.to_string_lossy().trim_start_matches('/').to_string(),
            };
            out.insert(name, lib);
        }
    }
    Ok(out)
}

/// The files in `ldd`'s answer: `name => /path (0x…)` and the loader's `/path (0x…)`; the vDSO
/// has no file. A library `not found` is an error.
pub fn ldd_paths(text: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        let file = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!(
                        "shared library {} not found (add its Debian package to build.packages)",
                        name.trim()
                    );
                }
                rest.split_whitespace().next()
            }
            None => line.split_whitespace().next(),
        };
        if let Some(f) = file.filter(|f| f.starts_with('/')) {
            out.push(PathBuf::from(f));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_files_and_missing_libraries_fail() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let got = ldd_paths(text).expect("all found");
        assert_eq!(
            got,
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        let err = ldd_paths("\tlibyajl.so.2 => not found\n").expect_err("missing");
        assert!(err.to_string().contains("libyajl.so.2"), "{err}");
    }
}
