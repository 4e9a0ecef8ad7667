//! Guest images as `berth-hostd image build` (and `cargo xtask image`) writes them: a folder with `manifest.json`, the kernel,
//! the initramfs and the data disk.

use crate::manifest::GameRuntime;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `manifest.json` of an image folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// sha256 over kernel, initramfs and disk: goes into every substrate header.
    pub digest: String,
    /// sha256 over the build inputs (decides whether `xtask image` rebuilds).
    pub input_digest: String,
    pub kernel: String,
    pub initrd: String,
    /// The game's data disk; empty when the game data is inside the initramfs (Xen images:
    /// the xen driver attaches no disk, see `driver::xen`).
    pub disk: String,
    pub kernel_package: String,
    /// Kernel command line; hostd appends what depends on the host (`tsc_early_khz`).
    pub cmdline: String,
    /// The game's run-time settings from its `game.toml` (an older image without them gets
    /// the defaults: SDK, `lines`).
    #[serde(default)]
    pub game: GameRuntime,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("reading image manifest {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image manifest {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("image manifest {path}: format {found} is not supported (expected 1)")]
    Format { path: PathBuf, found: u32 },
    #[error("image file {0} is missing")]
    Missing(PathBuf),
}

/// A loaded image: its folder and manifest.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Image {
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join("manifest.json");
        let bytes = std::fs::read(&path).map_err(|source| ImageError::Read {
            path: path.clone(),
            source,
        })?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| ImageError::Parse {
                path: path.clone(),
                source,
            })?;
        if manifest.format != 1 {
            return Err(ImageError::Format {
                path,
                found: manifest.format,
            });
        }
        let image = Self {
            dir: dir.to_path_buf(),
            manifest,
        };
        let disk = (!image.manifest.disk.is_empty()).then(|| image.disk());
        for p in [image.kernel(), image.initrd()].into_iter().chain(disk) {
            if !p.exists() {
                return Err(ImageError::Missing(p));
            }
        }
        Ok(image)
    }

    pub fn kernel(&self) -> PathBuf {
        self.dir.join(&self.manifest.kernel)
    }
    pub fn initrd(&self) -> PathBuf {
        self.dir.join(&self.manifest.initrd)
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join(&self.manifest.disk)
    }
}
