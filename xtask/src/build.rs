//! Building this workspace's binaries, once, for the tests and the tiers that take them.

use crate::{image, sys};
use anyhow::Result;
use std::process::Command;

/// The features every test build turns on (the Xen driver and transport, next to QEMU's).
pub const FEATURES: &str = "berth-hostd/xen,berth-guest/xen";

/// Builds every binary of the workspace (debug) with the features the tests use. The Xen tier's
/// dom0 takes `target/debug/berth-hostd` from this same build, so `cargo xtask test` compiles
/// once.
pub fn build_workspace() -> Result<()> {
    sys::run(
        Command::new(env!("CARGO"))
            .current_dir(image::root())
            .args(["build", "--workspace", "--bins", "--features", FEATURES]),
    )
}
