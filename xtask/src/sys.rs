//! Host prerequisites: what the project needs from Debian (QEMU, e2fsprogs, Redis for the
//! tests), installed when run as root.

use anyhow::{bail, Result};
pub use berth_hostd::build::debs::{apt_update_once, download_deb, resolve_meta, run};
use std::path::Path;
use std::process::Command;

/// A Debian package and a file that proves it is installed.
pub struct Need {
    pub package: &'static str,
    pub proof: &'static str,
}

impl Need {
    const fn new(package: &'static str, proof: &'static str) -> Need {
        Need { package, proof }
    }
}

pub const QEMU: Need = Need::new("qemu-system-x86", "/usr/bin/qemu-system-x86_64");
pub const QEMU_UTILS: Need = Need::new("qemu-utils", "/usr/bin/qemu-img");
pub const E2FS: Need = Need::new("e2fsprogs", "/usr/sbin/mke2fs");
/// `ip netns`, bridges and veth pairs: the fleet tests' hosts on their own addresses.
pub const IPROUTE: Need = Need::new("iproute2", "/usr/sbin/ip");
/// The tests' Redis: `cargo xtask test` runs its own `redis-server` (see `redis.rs`), never the
/// distribution's service that the package also installs.
pub const REDIS: Need = Need::new("redis-server", "/usr/bin/redis-server");

/// Headless Chromium and its WebDriver, for the web pages' tests (`/play`, `/admin`).
pub const CHROMIUM: Need = Need::new("chromium", "/usr/bin/chromium");
pub const CHROMEDRIVER: Need = Need::new("chromium-driver", "/usr/bin/chromedriver");
/// The font `berth-sim --plot` draws its chart's text with.
pub const FONTS: Need = Need::new(
    "fonts-dejavu-core",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
);

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Makes sure every package in `needs` is installed: with apt-get as root, else says what to run.
///
/// Installing can remove another need: Debian's qemu-system-x86 (7.2) replaces a backported
/// qemu-utils (10.x) that some machines come with, taking `qemu-img` away. So the check runs
/// again after each install, a few rounds at most.
pub fn ensure(needs: &[Need]) -> Result<()> {
    for _ in 0..3 {
        let missing: Vec<&str> = needs
            .iter()
            .filter(|n| !Path::new(n.proof).exists())
            .map(|n| n.package)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if !is_root() {
            bail!(
                "missing packages; run: sudo apt-get update && sudo apt-get install -y {}",
                missing.join(" ")
            );
        }
        eprintln!("xtask: installing {}", missing.join(" "));
        apt_update_once()?;
        let install = || {
            run(Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing))
        };
        if install().is_err() {
            // Package lists older than the archive (a security update replaced a version):
            // refresh them once and try again.
            eprintln!("xtask: install failed; refreshing the package lists and retrying");
            run(Command::new("apt-get").arg("update"))?;
            install()?;
        }
    }
    bail!("packages still missing after installing them: check apt's output above")
}
