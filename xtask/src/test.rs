//! `cargo xtask test`: everything the project's tests need, then every test.
//!
//! Installs what is missing (as root, with apt-get), builds the guest image, builds the
//! workspace once (debug), starts a private Redis for the store tests (`BERTH_TEST_REDIS`), runs
//! the whole suite with nextest (VM tests at most two at a time, see `.config/nextest.toml`),
//! stops that Redis, then checks that no test left a QEMU process or a `/dev/shm` folder behind.

use crate::{image, sys};
use anyhow::{bail, Result};
use std::process::Command;

pub const FEATURES: &str = "berth-hostd/xen,berth-guest/xen";

pub fn run(extra: &[String]) -> Result<()> {
    sys::ensure(&[
        sys::QEMU,
        sys::QEMU_UTILS,
        sys::E2FS,
        sys::REDIS,
        sys::CHROMIUM,
        sys::CHROMEDRIVER,
        sys::FONTS,
    ])?;
    image::build()?;
    let root = image::root();
    let cargo = env!("CARGO");
    sys::run(Command::new(cargo).current_dir(&root).args([
        "build",
        "--workspace",
        "--bins",
        "--features",
        FEATURES,
    ]))?;
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
    let leaks = leftovers();
    result?;
    if !leaks.is_empty() {
        bail!("tests left things behind: {leaks:?}");
    }
    eprintln!("xtask: all tests passed; nothing left in /dev/shm, no QEMU process left");
    Ok(())
}

/// Test folders in /dev/shm and QEMU processes that a test run left.
fn leftovers() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path().display().to_string())
                .filter(|p| p.contains("berth-test-"))
                .collect()
        })
        .unwrap_or_default();
    if let Ok(o) = Command::new("pgrep").args(["-af", "berth-test-"]).output() {
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains("qemu-system"))
                .map(|l| format!("process {l}")),
        );
    }
    out
}
