//! hostd's config file (TOML), validated into [`HostdConfig`] at start-up.
//!
//! ```toml
//! host_id = "host-1"
//! state_dir = "/dev/shm/berth"   # substrates and per-VM files; tmpfs is the point
//! control = "127.0.0.1:7070"     # operator HTTP surface (loopback only by default)
//! accel = "auto"                 # auto | tcg | kvm
//! max_vms = 64
//!
//! [[images]]
//! name = "arena"
//! dir = "target/image"           # a folder written by `cargo xtask image`
//! memory_mib = 128
//! vcpus = 1
//! balloon_mib = 96               # optional: miniaturise before docking
//! warm = 2                       # clones kept restored and paused
//! ```

use berth_protocol::guest::MAX_LINE;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM if a guest really boots on it here, else TCG.
    #[default]
    Auto,
    Tcg,
    Kvm,
}

fn default_state_dir() -> PathBuf {
    "/dev/shm/berth".into()
}
fn default_control() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7070))
}
fn default_host_id() -> String {
    "host-1".into()
}
fn default_qemu() -> PathBuf {
    "qemu-system-x86_64".into()
}
fn default_max_vms() -> u32 {
    64
}
fn default_boot_timeout() -> u64 {
    90
}
fn default_ready_timeout() -> u64 {
    10
}
fn default_silence() -> u64 {
    15
}
fn default_memory() -> u32 {
    128
}
fn default_true() -> bool {
    true
}
fn default_vcpus() -> u32 {
    1
}

/// One `[[images]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    pub name: String,
    pub dir: PathBuf,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Balloon the template down to this before docking (miniaturisation).
    #[serde(default)]
    pub balloon_mib: Option<u32>,
    /// Clones kept restored and paused, waiting only for identity.
    #[serde(default)]
    pub warm: u32,
    /// Clones map the substrate's RAM copy-on-write (the default). `false` keeps the RAM in
    /// the state file and copies it into every clone (the plain-substrate baseline).
    #[serde(default = "default_true")]
    pub cow: bool,
    /// Extra kernel command line (appended after the image's own).
    #[serde(default)]
    pub cmdline: Option<String>,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostdConfig {
    #[serde(default = "default_host_id")]
    pub host_id: String,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_control")]
    pub control: SocketAddr,
    #[serde(default)]
    pub accel: AccelChoice,
    #[serde(default = "default_qemu")]
    pub qemu: PathBuf,
    #[serde(default = "default_max_vms")]
    pub max_vms: u32,
    /// Seconds a cold boot may take until the agent says `initialised`.
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_s: u64,
    /// Seconds from identity to the agent's `ready`.
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout_s: u64,
    /// Seconds without a heartbeat after which an active VM counts as failed.
    #[serde(default = "default_silence")]
    pub agent_silence_s: u64,
    /// Leave docked substrates in place on a clean shutdown (a crash always leaves them).
    #[serde(default)]
    pub keep_substrates: bool,
    #[serde(default)]
    pub images: Vec<ImageConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {key}: {message}")]
    Invalid { key: String, message: String },
}

impl Default for HostdConfig {
    fn default() -> Self {
        toml::from_str("").expect("an empty config takes every default")
    }
}

impl HostdConfig {
    /// Reads and validates a config file; a bad file names the key at fault.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        // Relative image folders are relative to the config file.
        let base = path.parent().unwrap_or(Path::new("."));
        for image in &mut config.images {
            if image.dir.is_relative() {
                image.dir = base.join(&image.dir);
            }
        }
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: String, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        };
        if berth_protocol::HostId::new(self.host_id.clone()).is_err() {
            return invalid(
                "host_id".into(),
                "must be 1-64 letters, digits, '-', '_' or '.'",
            );
        }
        if self.max_vms == 0 {
            return invalid("max_vms".into(), "must be at least 1");
        }
        if self.state_dir.as_os_str().is_empty() || self.state_dir == Path::new("/") {
            return invalid("state_dir".into(), "must be a dedicated folder");
        }
        if self.boot_timeout_s == 0 || self.ready_timeout_s == 0 || self.agent_silence_s == 0 {
            return invalid("timeouts".into(), "must be at least 1 second");
        }
        let mut names = std::collections::HashSet::new();
        for (i, image) in self.images.iter().enumerate() {
            let key = |k: &str| format!("images[{i}].{k}");
            if berth_protocol::VmId::new(image.name.clone()).is_err() {
                return invalid(key("name"), "must be 1-64 letters, digits, '-', '_' or '.'");
            }
            if !names.insert(&image.name) {
                return invalid(key("name"), "is used by another image");
            }
            if !(32..=65536).contains(&image.memory_mib) {
                return invalid(key("memory_mib"), "must be between 32 and 65536");
            }
            if !(1..=64).contains(&image.vcpus) {
                return invalid(key("vcpus"), "must be between 1 and 64");
            }
            if let Some(b) = image.balloon_mib {
                if b == 0 || b >= image.memory_mib {
                    return invalid(key("balloon_mib"), "must be above 0 and below memory_mib");
                }
            }
            if image.warm > self.max_vms {
                return invalid(key("warm"), "cannot exceed max_vms");
            }
            if image
                .cmdline
                .as_ref()
                .is_some_and(|c| c.len() > MAX_LINE || c.contains('\n'))
            {
                return invalid(key("cmdline"), "must be one short line");
            }
        }
        Ok(())
    }

    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs(self.boot_timeout_s)
    }
    pub fn ready_timeout(&self) -> Duration {
        Duration::from_secs(self.ready_timeout_s)
    }
    pub fn agent_silence(&self) -> Duration {
        Duration::from_secs(self.agent_silence_s)
    }
    pub fn image(&self, name: &str) -> Option<&ImageConfig> {
        self.images.iter().find(|i| i.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = HostdConfig::default();
        assert_eq!(c.state_dir, PathBuf::from("/dev/shm/berth"));
        assert_eq!(c.accel, AccelChoice::Auto);
    }

    #[test]
    fn full_file_parses() {
        let c = HostdConfig::parse(
            r#"
            host_id = "h1"
            accel = "tcg"
            [[images]]
            name = "arena"
            dir = "img"
            balloon_mib = 96
            warm = 2
            "#,
        )
        .expect("valid");
        let img = c.image("arena").expect("image");
        assert_eq!(
            (img.memory_mib, img.balloon_mib, img.warm),
            (128, Some(96), 2)
        );
    }

    fn err(text: &str) -> String {
        HostdConfig::parse(text).expect_err("invalid").to_string()
    }

    #[test]
    fn bad_files_name_the_key() {
        assert!(err("surprise = 1").contains("unknown field"));
        assert!(err("accel = \"warp\"").contains("unknown variant"));
        assert!(err("max_vms = 0").contains("max_vms"));
        let img = |extra: &str| format!("[[images]]\nname = \"a\"\ndir = \"d\"\n{extra}");
        assert!(err(&img("memory_mib = 8")).contains("images[0].memory_mib"));
        assert!(err(&img("balloon_mib = 200")).contains("images[0].balloon_mib"));
        assert!(err(&img("warm = 1000")).contains("images[0].warm"));
        assert!(err("[[images]]\nname = \"../x\"\ndir = \"d\"").contains("images[0].name"));
        let twice = format!("{}\n{}", img(""), img(""));
        assert!(err(&twice).contains("used by another image"));
        assert!(err("state_dir = \"/\"").contains("state_dir"));
    }
}
