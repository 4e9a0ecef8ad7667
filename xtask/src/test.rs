//! `cargo xtask test`: everything the project's tests need, then every test.
//!
//! Installs what is missing (as root, with apt-get), builds the guest image, builds the
//! workspace once (debug), starts a private Redis for the store tests (`BERTH_TEST_REDIS`), runs
//! the whole suite with nextest (VM tests at most two at a time, see `.config/nextest.toml`),
//! stops that Redis, then runs the short chaos run (`chaos.rs`: two replicas, two hostds and
//! two swarms as processes under a timeline of faults), then the short fleet run (`fleet.rs`:
//! three hostds in their own network namespaces in two regions, a host cut off), then the
//! nested-Xen tier (`xen.rs`: Xen and a Berth dom0 inside QEMU;
//! skipped, and said so, where its packages cannot be downloaded or `BERTH_XEN_TIER=0`), then
//! checks that no test left a QEMU process or a `/dev/shm` folder behind.

use crate::build::{build_workspace, FEATURES};
use crate::{image, sys, xen};
use anyhow::{bail, Result};
use std::process::Command;

pub fn run(extra: &[String]) -> Result<()> {
    sys::ensure(&[
        sys::QEMU,
        sys::QEMU_UTILS,
        sys::E2FS,
        sys::IPROUTE,
        sys::REDIS,
        sys::CHROMIUM,
        sys::CHROMEDRIVER,
        sys::FONTS,
    ])?;
    image::build()?;
    let root = image::root();
    let cargo = env!("CARGO");
    build_workspace()?;
    let _ = std::fs::remove_dir_all("/dev/shm/berth-test-cache");
    let redis = crate::redis::RedisServer::start()?;
    eprintln!("xtask: test redis at {}", redis.url);
    let nextest = Command::new(cargo)
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let result = if nextest {
        sys::run(
            Command::new(cargo)
                .current_dir(&root)
                .env("BERTH_TEST_REDIS", &redis.url)
                .args([
                    "nextest",
                    "run",
                    "--workspace",
                    "--features",
                    FEATURES,
                    "--no-fail-fast",
                ])
                .args(extra),
        )
    } else {
        eprintln!("xtask: cargo-nextest not found; running cargo test one test at a time");
        sys::run(
            Command::new(cargo)
                .current_dir(&root)
                .env("BERTH_TEST_REDIS", &redis.url)
                .args([
                    "test",
                    "--workspace",
                    "--features",
                    FEATURES,
                    "--no-fail-fast",
                ])
                .args(extra)
                .args(["--", "--test-threads=1"]),
        )
    };
    drop(redis);
    let _ = std::fs::remove_dir_all("/dev/shm/berth-test-cache");
    let result = result
        .and_then(|()| chaos_tier())
        .and_then(|()| fleet_tier());
    let xen = xen_tier();
    let leaks = leftovers();
    match (result, xen) {
        (Err(tests), Err(xen)) => bail!("{tests:#}; and the Xen tier failed: {xen:#}"),
        (Err(tests), Ok(_)) => return Err(tests),
        (Ok(()), Err(xen)) => bail!("Xen tier failed: {xen:#}"),
        (Ok(()), Ok(xen)) => {
            if !leaks.is_empty() {
                bail!("tests left things behind: {leaks:?}");
            }
            match xen {
                XenTier::Passed => eprintln!(
                    "xtask: all tests passed, the Xen tier too; nothing left in /dev/shm, no QEMU \
                     process left"
                ),
                XenTier::Skipped(why) => eprintln!(
                    "xtask: all tests passed; Xen tier SKIPPED ({why}); nothing left in /dev/shm, \
                     no QEMU process left"
                ),
            }
        }
    }
    Ok(())
}

/// The short `cargo xtask chaos` (8 players, 80 s, every fault): it fails the run if a fault
/// costs a match or results, or leaves anything behind. `BERTH_CHAOS_TIER=0` skips it, and
/// says so.
fn chaos_tier() -> Result<()> {
    if std::env::var("BERTH_CHAOS_TIER").is_ok_and(|v| v == "0") {
        eprintln!("xtask: chaos tier SKIPPED (BERTH_CHAOS_TIER=0)");
        return Ok(());
    }
    eprintln!("xtask: chaos tier: separate processes under a timeline of faults");
    crate::chaos::short()
}

/// The short `cargo xtask fleet` (3 hosts in namespaces, 2 regions, 4 players queueing by
/// latency, a host cut off for 6 s): it fails the run if a session ran outside its region,
/// results were lost or anything is left. `BERTH_FLEET_TIER=0` skips it, and says so.
fn fleet_tier() -> Result<()> {
    if std::env::var("BERTH_FLEET_TIER").is_ok_and(|v| v == "0") {
        eprintln!("xtask: fleet tier SKIPPED (BERTH_FLEET_TIER=0)");
        return Ok(());
    }
    eprintln!("xtask: fleet tier: hosts in their own namespaces, regions, a host cut off");
    crate::fleet::short()
}

/// How the nested-Xen tier went, when it did not fail.
enum XenTier {
    Passed,
    /// It could not run here (packages not downloadable, no QEMU, `BERTH_XEN_TIER=0`): never
    /// to be read as a pass.
    Skipped(String),
}

/// Boots of the nested Xen the tier may take. The nested emulation loses a VM now and then,
/// or stalls dom0 outright (a hung kernel task, caught within about two minutes by
/// `xen::supervise`): each is a fault of the emulation, not of hostd, and a new boot is the
/// only cure.
const XEN_ATTEMPTS: u32 = 3;

fn xen_tier() -> Result<XenTier> {
    let skip = |why: String| {
        eprintln!("xtask: Xen tier SKIPPED: {why}");
        Ok(XenTier::Skipped(why))
    };
    if std::env::var("BERTH_XEN_TIER").is_ok_and(|v| v == "0") {
        return skip("BERTH_XEN_TIER=0".into());
    }
    eprintln!("xtask: Xen tier: Xen 4.17 and a Berth dom0 nested in QEMU (TCG)");
    // The nested environment corrupts memory now and then (docs/operations.md, "Xen"); the
    // selftest replaces what it can inside one boot, and a whole boot gets one more chance.
    // Every failed attempt is printed.
    let mut attempt = 1;
    loop {
        match xen::selftest() {
            Ok(()) => return Ok(XenTier::Passed),
            Err(e) => {
                match xen::unavailable_reason(&e) {
                    Some(why) => return skip(why.to_string()),
                    None if attempt < XEN_ATTEMPTS => {
                        eprintln!("xtask: Xen tier attempt {attempt} FAILED: {e:#}\nxtask: booting it again");
                        attempt += 1;
                    }
                    None => return Err(e),
                }
            }
        }
    }
}

/// Test folders in /dev/shm and QEMU processes that a test run left: the VM tests' (named after
/// their `berth-test-` folders) and the Xen tier's (booting from `target/xen/`).
fn leftovers() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path().display().to_string())
                .filter(|p| p.contains("berth-test-"))
                .collect()
        })
        .unwrap_or_default();
    if let Ok(o) = Command::new("pgrep").args(["-af", "qemu-system"]).output() {
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains("berth-test-") || l.contains("target/xen/"))
                .map(|l| format!("process {l}")),
        );
    }
    out
}
