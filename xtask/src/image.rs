//! `cargo xtask image`: the images of this workspace's games, with the product's builder
//! (`berth_hostd::build`, the same as `berth-hostd image build`).
//!
//! The arena's image goes to `target/image/`, every other game's (`games/*`, and the tests'
//! `tests/games/*`) to `target/images/<name>/`. What xtask adds to the product's builder is
//! compiling this workspace's static binaries: the agent, and a game's server when its manifest
//! names one (`build.cargo`). Rebuilt only when an input changes.

use crate::sys;
use anyhow::{Context, Result};
use berth_hostd::build::{build_image, Base, GuestBins};
use std::path::{Path, PathBuf};
use std::process::Command;

pub use berth_hostd::image::Manifest;
use berth_hostd::manifest::{GameManifest, FILE_NAME};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .into()
}

/// The arena's image.
pub fn image_dir() -> PathBuf {
    root().join("target/image")
}

/// Where every other game's image goes: `target/images/<name>`.
pub fn images_dir() -> PathBuf {
    root().join("target/images")
}

/// The image folder of the game `name`.
pub fn image_dir_of(name: &str) -> PathBuf {
    if name == "arena" {
        image_dir()
    } else {
        images_dir().join(name)
    }
}

/// The arena's manifest (`games/arena/game.toml`).
pub(crate) fn arena_manifest() -> Result<GameManifest> {
    game_manifest("arena")
}

/// The manifest of the game `name`: `games/<name>/game.toml` or `tests/games/<name>/game.toml`.
pub(crate) fn game_manifest(name: &str) -> Result<GameManifest> {
    let path = all_games()?
        .into_iter()
        .find(|p| p.parent().and_then(Path::file_name) == Some(name.as_ref()))
        .with_context(|| {
            format!("no game {name:?}: games are games/<name>/{FILE_NAME} and tests/games/<name>/{FILE_NAME}")
        })?;
    Ok(GameManifest::load(&path)?)
}

/// Every game's manifest path, `games/*` first, then `tests/games/*`, sorted.
fn all_games() -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for dir in [root().join("games"), root().join("tests/games")] {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path().join(FILE_NAME)))
            .filter(|p| p.exists())
            .collect();
        entries.sort();
        out.extend(entries);
    }
    Ok(out)
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

/// Builds (or reuses) every game's image; returns the arena's manifest.
pub fn build() -> Result<Manifest> {
    sys::ensure(&[sys::E2FS])?;
    let base = Base::download(&root().join("target/debs"))?;
    let mut arena = None;
    for path in all_games()? {
        let game = GameManifest::load(&path)?;
        let built = build_image(&base, &build_guest(&game)?, &image_dir_of(&game.name))?;
        if game.name == "arena" {
            arena = Some(built);
        }
    }
    arena.context("games/arena/game.toml is missing")
}
