//! Game modes: one TOML file per mode in the modes folder (`assets/modes/*.toml`); the file's
//! stem is the mode's name. A mode says who may be matched together and what VM runs the match.

use crate::util::{parse_toml, read_text, FileError};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error("cannot read modes folder {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
    #[error("no game modes in {0} (add at least one *.toml)")]
    Empty(PathBuf),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Players {
    pub min: u32,
    pub max: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmResources {
    pub memory_mib: u32,
    #[serde(default = "one")]
    pub vcpus: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Skill {
    /// Rating assumed for a ticket that gives none.
    pub default: f64,
    /// Initial skill window (± around the oldest ticket's rating)…
    pub window: f64,
    /// …widened by this much per second waited…
    pub widen_per_s: f64,
    /// …up to this.
    pub max_window: f64,
}

impl Default for Skill {
    fn default() -> Self {
        Skill {
            default: 1000.0,
            window: 100.0,
            widen_per_s: 50.0,
            max_window: 1000.0,
        }
    }
}

impl Skill {
    /// The window a ticket that waited `waited_ms` is matched within.
    pub fn window_after(&self, waited_ms: u64) -> f64 {
        (self.window + self.widen_per_s * waited_ms as f64 / 1000.0).min(self.max_window)
    }
}

/// How far players queued with latencies may be from a match's region.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Latency {
    /// Every player of a match must have at most this latency to its region (ms)…
    pub allowed_ms: u32,
    /// …widened by this much per second the oldest player waited…
    pub widen_per_s: u32,
    /// …up to this.
    pub max_allowed_ms: u32,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            allowed_ms: 100,
            widen_per_s: 10,
            max_allowed_ms: 250,
        }
    }
}

impl Latency {
    /// The latency allowed once the oldest player waited `waited_ms`.
    pub fn allowed_after(&self, waited_ms: u64) -> u32 {
        let widened = u64::from(self.widen_per_s) * waited_ms / 1000;
        (u64::from(self.allowed_ms) + widened).min(u64::from(self.max_allowed_ms)) as u32
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mode {
    #[serde(skip)]
    pub name: String,
    /// The guest image (hostd `[[images]]` name) the match runs in.
    pub image: String,
    pub players: Players,
    #[serde(default = "one")]
    pub teams: u32,
    /// A match may start with a team nobody is in (off by default: a lone party waits for
    /// opponents rather than being matched against nobody).
    #[serde(default)]
    pub empty_teams: bool,
    /// Regions this mode is offered in; empty means any.
    #[serde(default)]
    pub regions: Vec<String>,
    pub vm: VmResources,
    #[serde(default)]
    pub skill: Skill,
    /// For players who queue with latencies instead of a region.
    #[serde(default)]
    pub latency: Latency,
    /// With at least `players.min` but fewer than `players.max` matchable, start once the
    /// oldest ticket waited this long.
    #[serde(default)]
    pub fill_wait_ms: u64,
    /// A ticket is dropped (`max_wait`) after this long.
    #[serde(default = "default_max_wait")]
    pub max_wait_s: u64,
    /// A match runs at most this long.
    #[serde(default = "default_session_max")]
    pub session_max_s: u64,
    /// Handed to the game server as-is.
    #[serde(default)]
    pub params: toml::Table,
}

fn default_max_wait() -> u64 {
    120
}

fn default_session_max() -> u64 {
    900
}

impl Mode {
    /// Largest party that fits in one team.
    pub fn team_size(&self) -> u32 {
        self.players.max.div_ceil(self.teams)
    }

    pub fn offers_region(&self, region: &str) -> bool {
        self.regions.is_empty() || self.regions.iter().any(|r| r == region)
    }

    pub fn params_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.params).unwrap_or(serde_json::Value::Null)
    }

    fn validate(&self, path: &Path) -> Result<(), ModeError> {
        let bad = |key: &'static str, message: &str| {
            Err(ModeError::Invalid {
                path: path.to_owned(),
                key,
                message: message.to_owned(),
            })
        };
        if berth_protocol::SessionId::new(self.name.clone()).is_err() {
            return bad(
                "name",
                &format!("file stem must be {}", berth_protocol::ids::ID_RULE),
            );
        }
        if self.players.min == 0 || self.players.max < self.players.min {
            return bad("players", "need 1 <= min <= max");
        }
        if self.players.max > 256 {
            return bad("players.max", "at most 256");
        }
        if self.teams == 0 || self.teams > self.players.max {
            return bad("teams", "need 1 <= teams <= players.max");
        }
        if self.vm.memory_mib == 0 || self.vm.vcpus == 0 {
            return bad("vm", "memory_mib and vcpus must be positive");
        }
        let s = &self.skill;
        let ordered = s.window >= 0.0 && s.widen_per_s >= 0.0 && s.max_window >= s.window;
        if !(ordered && s.default.is_finite()) {
            return bad("skill", "need 0 <= window <= max_window, widen_per_s >= 0");
        }
        let l = &self.latency;
        if l.max_allowed_ms < l.allowed_ms
            || l.max_allowed_ms > berth_protocol::play::MAX_LATENCY_MS
        {
            return bad("latency", "need allowed_ms <= max_allowed_ms <= 60000");
        }
        if self.max_wait_s == 0 || self.session_max_s == 0 {
            return bad(
                "max_wait_s",
                "max_wait_s and session_max_s must be positive",
            );
        }
        Ok(())
    }
}

/// Every mode, by name.
#[derive(Debug, Clone, Default)]
pub struct Modes(pub BTreeMap<String, Mode>);

impl Modes {
    pub fn load(dir: &Path) -> Result<Self, ModeError> {
        let entries = std::fs::read_dir(dir).map_err(|source| ModeError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        let mut modes = BTreeMap::new();
        for path in paths {
            let text = read_text(&path)?;
            let mode = Self::parse(&path, &text)?;
            modes.insert(mode.name.clone(), mode);
        }
        if modes.is_empty() {
            return Err(ModeError::Empty(dir.to_owned()));
        }
        Ok(Modes(modes))
    }

    pub fn parse(path: &Path, text: &str) -> Result<Mode, ModeError> {
        let mut mode: Mode = parse_toml(text, path)?;
        mode.name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        mode.validate(path)?;
        Ok(mode)
    }

    pub fn get(&self, name: &str) -> Option<&Mode> {
        self.0.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_modes_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/modes");
        let modes = Modes::load(&dir).expect("shipped modes are valid");
        let duel = modes.get("duel").expect("duel");
        assert_eq!(duel.team_size(), 1);
        assert!(duel.offers_region("eu") && !duel.offers_region("mars"));
        assert!(modes.get("arena").expect("arena").offers_region("anywhere"));
    }

    #[test]
    fn bad_modes_name_the_key() {
        let p = Path::new("bad.toml");
        let base = "image='a'\n[vm]\nmemory_mib=64\n";
        let e = Modes::parse(p, &format!("{base}[players]\nmin=3\nmax=2\n")).expect_err("min>max");
        assert!(e.to_string().contains("players"), "{e}");
        let e = Modes::parse(p, &format!("{base}colour=1\n[players]\nmin=1\nmax=2\n"))
            .expect_err("unknown key");
        assert!(e.to_string().contains("colour"), "{e}");
        let e = Modes::parse(p, &format!("teams=5\n{base}[players]\nmin=1\nmax=2\n"))
            .expect_err("teams");
        assert!(e.to_string().contains("teams"), "{e}");
    }

    #[test]
    fn skill_window_widens_to_its_cap() {
        let s = Skill::default();
        assert_eq!(s.window_after(0), 100.0);
        assert_eq!(s.window_after(2000), 200.0);
        assert_eq!(s.window_after(3_600_000), 1000.0);
    }
}
