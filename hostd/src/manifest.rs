//! A game's manifest, `game.toml`: what its image holds and how its server runs. The image
//! builder reads it to make the image, and writes its [`GameSpec`] into the image for the
//! agent. A bad manifest is refused naming the key at fault.
//!
//! ```toml
//! name = "arena"
//! language = "rust"
//!
//! [server]
//! command = ["/game/berth-arena"]     # the program and its arguments, in the image
//! cwd = "/data"
//! env = { BERTH_INIT_MS = "1000" }
//! port = 7000                         # the game port players are proxied to
//! sdk = true                          # false: an unmodified server (the agent stands in)
//! framing = "lines"                   # or "frames" (kind byte + length), "stream" (raw bytes)
//!
//! [build]
//! cargo = "berth-arena"               # a workspace binary, built static, installed at command[0]
//! data = "data"                       # a folder (next to this file): the read-only disk at /data
//! files = { "/game/assets" = "assets" }  # more files or folders into the image
//! packages = ["python3.11-minimal"]   # Debian packages unpacked into it, with their libraries
//!
//! [resources]
//! memory_mib = 128
//! vcpus = 1
//!
//! [limits]
//! health_timeout_ms = 10000
//! max_frame_bytes = 4096              # the largest frame a player may send
//! frames_per_s = 40                   # frames a player may send per second
//! ```

use berth_protocol::framing::Framing;
use berth_protocol::guest::GameSpec;
use berth_protocol::ids::ID_RULE;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The manifest's file name in a game's folder.
pub const FILE_NAME: &str = "game.toml";

/// Image paths a game may not put files at: the agent's own.
const RESERVED: &[&str] = &[
    "/init",
    "/bin",
    "/lib",
    "/etc/berth",
    "/dev",
    "/proc",
    "/sys",
];

/// `game.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GameManifest {
    /// The game's (and its image's) name: an id ([`ID_RULE`]).
    pub name: String,
    /// The language the server is written in, for reports and benchmarks.
    #[serde(default = "unknown")]
    pub language: String,
    pub server: Server,
    #[serde(default)]
    pub build: Build,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub limits: Limits,
}

fn unknown() -> String {
    "unknown".into()
}

/// `[server]`: how the agent starts the game server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// The program (an absolute path in the image) and its arguments.
    pub command: Vec<String>,
    #[serde(default = "root")]
    pub cwd: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "game_port")]
    pub port: u16,
    /// Whether the server speaks the SDK (`false`: an unmodified server; the agent stands in:
    /// ready when the port accepts, ended when the process exits, tickets checked by the
    /// gateway alone).
    #[serde(default = "yes")]
    pub sdk: bool,
    /// How players' frames cross the gateway to the game port.
    #[serde(default)]
    pub framing: Framing,
}

fn yes() -> bool {
    true
}

fn root() -> String {
    "/".into()
}
fn game_port() -> u16 {
    berth_protocol::guest::GAME_PORT
}

/// `[build]`: what goes into the image besides the agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    /// A binary of this workspace, built static and installed at `server.command[0]`.
    #[serde(default)]
    pub cargo: Option<String>,
    /// A folder that becomes the read-only data disk, mounted at `/data`.
    #[serde(default)]
    pub data: Option<PathBuf>,
    /// More files or folders, by their absolute path in the image.
    #[serde(default)]
    pub files: BTreeMap<String, PathBuf>,
    /// Debian packages unpacked into the image (never installed on the build host), with the
    /// shared libraries their programs need.
    #[serde(default)]
    pub packages: Vec<String>,
}

/// `[resources]`: the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default = "memory")]
    pub memory_mib: u32,
    #[serde(default = "vcpus")]
    pub vcpus: u32,
}

fn memory() -> u32 {
    128
}
fn vcpus() -> u32 {
    1
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            memory_mib: memory(),
            vcpus: vcpus(),
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Once ready, silence on the SDK's `health` longer than this ends the session
    /// `game_unhealthy`.
    #[serde(default = "health")]
    pub health_timeout_ms: u64,
    /// The largest frame a player may send (bytes of payload; in `stream` framing, of one
    /// binary frame). Larger: `bad_frame` (or the websocket's own `1009` past 64 KiB).
    #[serde(default = "max_frame")]
    pub max_frame_bytes: u32,
    /// Frames a player may send per second (bursts of twice that), else `rate_limited`.
    #[serde(default = "frames_per_s")]
    pub frames_per_s: u32,
}

fn max_frame() -> u32 {
    DEFAULT_MAX_FRAME
}
fn frames_per_s() -> u32 {
    DEFAULT_FRAMES_PER_S
}

/// The default `[limits] max_frame_bytes`.
pub const DEFAULT_MAX_FRAME: u32 = 4096;
/// The default `[limits] frames_per_s`.
pub const DEFAULT_FRAMES_PER_S: u32 = 40;
/// The largest `max_frame_bytes` an image may set (the websocket's own message limit).
pub const MAX_FRAME_LIMIT: u32 = 65536;

/// What hostd needs of a game at run time, kept in its image's `manifest.json` by the image
/// builder: how players' frames reach it, their limits, and whether it speaks the SDK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GameRuntime {
    pub name: String,
    pub language: String,
    pub sdk: bool,
    pub framing: Framing,
    pub max_frame_bytes: u32,
    pub frames_per_s: u32,
}

impl Default for GameRuntime {
    /// An image built before images said (the arena's defaults).
    fn default() -> Self {
        GameRuntime {
            name: String::new(),
            language: unknown(),
            sdk: true,
            framing: Framing::Lines,
            max_frame_bytes: DEFAULT_MAX_FRAME,
            frames_per_s: DEFAULT_FRAMES_PER_S,
        }
    }
}

fn health() -> u64 {
    berth_protocol::sdk::DEFAULT_HEALTH_TIMEOUT_MS
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            health_timeout_ms: health(),
            max_frame_bytes: max_frame(),
            frames_per_s: frames_per_s(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

fn invalid(path: &Path, key: impl Into<String>, message: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        path: path.to_owned(),
        key: key.into(),
        message: message.into(),
    }
}

impl GameManifest {
    /// Reads `path` (a `game.toml`); its `build` paths become relative to its folder and
    /// must exist.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut m = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(data) = m.build.data.as_mut() {
            *data = base.join(&*data);
            if !data.is_dir() {
                return Err(invalid(
                    path,
                    "build.data",
                    format!("{} is not a folder", data.display()),
                ));
            }
        }
        for (at, source) in m.build.files.iter_mut() {
            *source = base.join(&*source);
            if !source.exists() {
                let key = format!("build.files.{at:?}");
                return Err(invalid(
                    path,
                    key,
                    format!("{} does not exist", source.display()),
                ));
            }
        }
        Ok(m)
    }

    /// Parses a manifest's text (`path` names it in errors) and checks it.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ManifestError> {
        let de = toml::Deserializer::new(text);
        let m: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let message = e.into_inner().message().trim().to_owned();
            invalid(path, if key == "." { "(top)".into() } else { key }, message)
        })?;
        m.check(path)?;
        Ok(m)
    }

    fn check(&self, path: &Path) -> Result<(), ManifestError> {
        let bad = |key: &str, message: &str| Err(invalid(path, key, message));
        if berth_protocol::VmId::new(self.name.clone()).is_err() {
            return bad("name", &format!("must be {ID_RULE}"));
        }
        let s = &self.server;
        match s.command.first() {
            None => return bad("server.command", "must name the program"),
            Some(p) if !p.starts_with('/') => {
                return bad(
                    "server.command",
                    "the program must be an absolute path in the image",
                )
            }
            _ => {}
        }
        if !s.cwd.starts_with('/') {
            return bad("server.cwd", "must be an absolute path in the image");
        }
        if s.port == 0 || s.port == sdk_port() {
            return bad(
                "server.port",
                "must be a port from 1 to 65535 other than the SDK's 7001",
            );
        }
        if let Some(k) = s
            .env
            .keys()
            .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return bad(
                &format!("server.env.{k:?}"),
                "is not an environment variable name",
            );
        }
        for at in self.build.files.keys() {
            let reserved = RESERVED
                .iter()
                .any(|r| at == r || at.starts_with(&format!("{r}/")));
            if !at.starts_with('/') || at == "/" || reserved || at.contains("..") {
                let key = format!("build.files.{at:?}");
                return bad(
                    &key,
                    "must be an absolute path in the image outside the agent's own",
                );
            }
        }
        if let Some(p) = self.build.packages.iter().find(|p| !debian_name(p)) {
            return bad(
                &format!("build.packages.{p:?}"),
                "is not a Debian package name (a-z, 0-9, '+', '-', '.'; 2 or more)",
            );
        }
        let r = &self.resources;
        if !(32..=65536).contains(&r.memory_mib) {
            return bad("resources.memory_mib", "must be between 32 and 65536");
        }
        if !(1..=64).contains(&r.vcpus) {
            return bad("resources.vcpus", "must be between 1 and 64");
        }
        let l = &self.limits;
        if l.health_timeout_ms < 1000 {
            return bad("limits.health_timeout_ms", "must be at least 1000");
        }
        if !(16..=MAX_FRAME_LIMIT).contains(&l.max_frame_bytes) {
            return bad("limits.max_frame_bytes", "must be between 16 and 65536");
        }
        if !(1..=1000).contains(&l.frames_per_s) {
            return bad("limits.frames_per_s", "must be between 1 and 1000");
        }
        Ok(())
    }

    /// What the agent reads from the image to start the game.
    pub fn spec(&self) -> GameSpec {
        GameSpec {
            name: self.name.clone(),
            command: self.server.command.clone(),
            env: self.server.env.clone(),
            cwd: self.server.cwd.clone(),
            game_port: self.server.port,
            health_timeout_ms: self.limits.health_timeout_ms,
            sdk: self.server.sdk,
        }
    }

    /// What hostd keeps of it at run time.
    pub fn runtime(&self) -> GameRuntime {
        GameRuntime {
            name: self.name.clone(),
            language: self.language.clone(),
            sdk: self.server.sdk,
            framing: self.server.framing,
            max_frame_bytes: self.limits.max_frame_bytes,
            frames_per_s: self.limits.frames_per_s,
        }
    }
}

/// Debian policy's package names: lower-case letters, digits, `+`, `-`, `.`; at least two,
/// starting with a letter or digit.
fn debian_name(name: &str) -> bool {
    name.len() >= 2
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

fn sdk_port() -> u16 {
    berth_protocol::sdk::SDK_ADDR
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(7001)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "arena"
language = "rust"
[server]
command = ["/game/berth-arena", "--fast"]
cwd = "/data"
env = { BERTH_INIT_MS = "1000" }
[build]
cargo = "berth-arena"
[resources]
memory_mib = 256
"#;

    fn error(text: &str) -> String {
        GameManifest::parse(text, Path::new("game.toml"))
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn a_good_manifest_gives_the_agents_spec() {
        let m = GameManifest::parse(GOOD, Path::new("game.toml")).expect("valid");
        assert_eq!((m.resources.memory_mib, m.resources.vcpus), (256, 1));
        let spec = m.spec();
        assert_eq!(spec.command, ["/game/berth-arena", "--fast"]);
        assert_eq!((spec.cwd.as_str(), spec.game_port), ("/data", 7000));
        assert_eq!(spec.env["BERTH_INIT_MS"], "1000");
    }

    #[test]
    fn bad_manifests_name_the_key() {
        let with = |from: &str, to: &str| error(&GOOD.replace(from, to));
        assert!(with("memory_mib = 256", "memory_mib = 8").contains("resources.memory_mib"));
        assert!(with("memory_mib = 256", "memory_mib = \"lots\"").contains("resources.memory_mib"));
        assert!(with("cwd = \"/data\"", "cwd = \"/data\"\nport = 7001").contains("server.port"));
        assert!(with("cwd = \"/data\"", "cwd = \"data\"").contains("server.cwd"));
        assert!(with("[\"/game/berth-arena\", \"--fast\"]", "[]").contains("server.command"));
        assert!(
            with("[\"/game/berth-arena\", \"--fast\"]", "[\"game\"]").contains("server.command")
        );
        assert!(with("name = \"arena\"", "name = \"a b\"").contains("name"));
        assert!(with("language = \"rust\"", "colour = \"red\"").contains("colour"));
        assert!(with("[build]", "[build]\nfiles = { \"/bin/sh\" = \"x\" }").contains("build.files"));
        assert!(with(
            "[build]",
            "[build]\nfiles = { \"/etc/berth/game.json\" = \"x\" }"
        )
        .contains("build.files"));
        assert!(with("[build]", "[build]\npackages = [\"Python3\"]").contains("build.packages"));
        assert!(with("cwd = \"/data\"", "framing = \"xml\"").contains("server.framing"));
        assert!(with(
            "[resources]",
            "[limits]\nmax_frame_bytes = 1000000\n[resources]"
        )
        .contains("limits.max_frame_bytes"));
        assert!(
            with("[resources]", "[limits]\nframes_per_s = 0\n[resources]")
                .contains("limits.frames_per_s")
        );
        assert!(with("[build]", "[build]\npackages = [\"-rf\"]").contains("build.packages"));
        assert!(
            error("name = \"x\"").contains("server"),
            "server is required"
        );
        assert!(error("not toml at all [").contains("game.toml"));
    }

    #[test]
    fn load_resolves_build_paths_and_checks_they_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("data")).expect("data");
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, GOOD.replace("[build]", "[build]\ndata = \"data\"")).expect("write");
        let m = GameManifest::load(&path).expect("loads");
        assert_eq!(m.build.data, Some(dir.path().join("data")));
        std::fs::write(
            &path,
            GOOD.replace("[build]", "[build]\ndata = \"missing\""),
        )
        .expect("write");
        let e = GameManifest::load(&path).expect_err("refused").to_string();
        assert!(e.contains("build.data"), "{e}");
        let e = GameManifest::load(&dir.path().join("nope.toml"))
            .expect_err("refused")
            .to_string();
        assert!(e.contains("nope.toml"), "{e}");
    }
}
