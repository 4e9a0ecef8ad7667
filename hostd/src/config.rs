//! hostd's config file (TOML), validated into [`HostdConfig`] at start-up.
//!
//! ```toml
//! host_id = "host-1"
//! region = "eu"                  # optional: only this region's sessions (unset: any region)
//! zone = "eu-1a"                 # optional: its zone, for the operators' views
//! state_dir = "/dev/shm/berth"   # substrates and per-VM files; tmpfs is the point
//! control = "127.0.0.1:7070"     # operator HTTP surface (loopback only by default)
//! accel = "auto"                 # auto | tcg | kvm
//! max_vms = 64
//! drain_timeout_s = 900          # SIGTERM: no new sessions, live ones finish (0: stop at once)
//!
//! [[images]]
//! name = "arena"
//! dir = "target/image"           # a folder written by `berth-hostd image build`
//! # manifest = "games/arena/game.toml"  # or: build it from the game's manifest at start
//! memory_mib = 128
//! vcpus = 1
//! balloon_mib = 96               # optional: miniaturise before docking (a value the guest
//!                                # cannot reach fails priming, naming this key)
//! warm = 2                       # clones kept restored and paused
//!
//! [gateway]                      # the players' websocket (see `gateway`)
//! listen = "0.0.0.0:7071"        # default 127.0.0.1:7071
//! header_read_timeout_ms = 10000 # a connection's upgrade request must come within this
//! max_connections = 4096         # open connections at most; more are answered 503
//!
//! [gateway.tls]                  # optional: players connect over wss://
//! cert = "gateway.pem"           # certificate chain (PEM), relative to this file
//! key = "gateway.key"            # its private key (PEM)
//!
//! [server]                       # optional: without it hostd runs standalone
//! url = "wss://berth.example:7080/v1/hosts"   # ws:// or wss://; or a list of replicas' URLs
//! ca = "ca.pem"                  # optional: a private CA to trust besides Mozilla's roots
//! token_file = "host-1.jwt"      # or `token = "…"`: this host's JWT (role `host`)
//! gateway = "wss://203.0.113.7:7071/v1/game"  # the gateway's URL as players reach it
//! reconnect_max_s = 10
//! ```

use crate::token::{is_token, Token};
use berth_client::{Trust, TrustError};
use berth_net::tls::{Acceptor, TlsError, TlsFiles};
use berth_protocol::guest::MAX_LINE;
use berth_protocol::ids::ID_RULE;
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

/// Which hypervisor backend hostd drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DriverChoice {
    /// QEMU processes on this host (`accel` picks KVM or TCG).
    #[default]
    Qemu,
    /// Xen domains through `xl` and XenStore; hostd must run in dom0 and be built with the
    /// `xen` cargo feature.
    Xen,
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
fn default_drain_timeout() -> u64 {
    900
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
    /// The image folder. With `manifest`, where hostd builds it (default `images/<name>`
    /// next to the config file).
    #[serde(default)]
    pub dir: PathBuf,
    /// The game's `game.toml`: hostd builds the image from it at start (`berth-hostd image
    /// build`, reused while nothing changed) into `dir`.
    #[serde(default)]
    pub manifest: Option<PathBuf>,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Balloon the template down to this before docking (miniaturisation); clones get
    /// `memory_mib` back before they run. Below `memory_mib` here; how low the guest can go
    /// is measured at priming, which fails naming this key when the guest stops giving memory
    /// back above it (its clones would run out of memory: see `driver::balloon_reached`).
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

impl ImageConfig {
    /// An image with the defaults a config file gets (128 MiB, 1 vCPU, CoW, no balloon) and
    /// `warm` warm clones.
    pub fn new(name: &str, dir: PathBuf, warm: u32) -> Self {
        ImageConfig {
            name: name.to_owned(),
            dir,
            manifest: None,
            memory_mib: default_memory(),
            vcpus: default_vcpus(),
            balloon_mib: None,
            warm,
            cow: default_true(),
            cmdline: None,
        }
    }
}

fn default_gateway() -> String {
    "ws://127.0.0.1:7071/v1/game".into()
}
fn default_gateway_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7071))
}

fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_gateway_connections() -> usize {
    4096
}

/// The `[gateway]` table: where the players' websocket listens, and its limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The gateway's listen address (players reach it as `[server] gateway` says).
    #[serde(default = "default_gateway_listen")]
    pub listen: SocketAddr,
    /// A connection must send its upgrade request within this (ms); else it is closed.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Most open connections (joining or playing); more are answered 503
    /// `too_many_connections` before their request is read.
    #[serde(default = "default_gateway_connections")]
    pub max_connections: usize,
    /// `[gateway.tls]`: serve `wss://` with this certificate and key (relative to the config
    /// file); without it the gateway speaks plain `ws://`.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig::at(default_gateway_listen())
    }
}

impl GatewayConfig {
    /// The default limits, listening on `listen`.
    pub fn at(listen: SocketAddr) -> Self {
        GatewayConfig {
            listen,
            header_read_timeout_ms: default_header_read_timeout_ms(),
            max_connections: default_gateway_connections(),
            tls: None,
        }
    }
}
fn default_reconnect_max() -> u64 {
    10
}

/// The optional `[server]` table: the matchmaking server this host registers with.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The server's host websocket, `ws://host:port/v1/hosts` or `wss://…`: one URL, or a list
    /// of the replicas' (TOML `url = ["wss://a/v1/hosts", "wss://b/v1/hosts"]`); the link tries
    /// them in turn when one fails (see [`crate::link`]).
    #[serde(deserialize_with = "one_or_many")]
    pub url: Vec<String>,
    /// A CA certificate file (PEM, relative to the config file) trusted for `wss://` besides
    /// Mozilla's roots: a deployment's private CA.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// This host's credential (a JWT), sent as `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the token instead (relative to the config file); read again on every
    /// reconnect, so a renewed token is picked up without a restart.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Where players reach this host's gateway, advertised in `register`.
    #[serde(default = "default_gateway")]
    pub gateway: String,
    /// Longest wait between reconnect attempts (seconds).
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_s: u64,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("url", &self.url)
            .field("ca", &self.ca)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("gateway", &self.gateway)
            .field("reconnect_max_s", &self.reconnect_max_s)
            .finish()
    }
}

impl ServerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: format!("server.{key}"),
                message: message.into(),
            })
        };
        if self.url.is_empty() {
            return invalid("url", "must name at least one server");
        }
        if self.url.len() > MAX_SERVERS {
            return invalid("url", "lists more than 16 servers");
        }
        for url in &self.url {
            if !(url.starts_with("ws://") || url.starts_with("wss://")) || !is_uri(url) {
                return invalid("url", "must be a ws:// or wss:// URL");
            }
        }
        if !(self.gateway.starts_with("ws://") || self.gateway.starts_with("wss://"))
            || !is_uri(&self.gateway)
        {
            return invalid("gateway", "must be a ws:// or wss:// URL");
        }
        match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => return invalid("token", "set token or token_file, not both"),
            (Some(t), None) if !is_token(t) => {
                return invalid("token", "must be a JWT (visible ASCII, no spaces)")
            }
            _ => {}
        }
        if !(1..=3600).contains(&self.reconnect_max_s) {
            return invalid("reconnect_max_s", "must be between 1 and 3600");
        }
        Ok(())
    }

    /// The runtime settings of the link: reads `token_file` (so a missing or empty file fails
    /// start-up) and insists on a token.
    pub fn resolve(&self, host_id: &str) -> Result<ServerLink, ConfigError> {
        self.validate()?;
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Token::Inline(t.clone()),
            (None, Some(path)) => {
                let token = Token::File(path.clone());
                token.read().map_err(|e| ConfigError::Invalid {
                    key: "server.token_file".into(),
                    message: e.to_string(),
                })?;
                token
            }
            (None, None) => {
                return Err(ConfigError::Invalid {
                    key: "server.token".into(),
                    message: "is needed (token, token_file, --server-token or BERTH_SERVER_TOKEN)"
                        .into(),
                })
            }
        };
        let trust = Trust::from_ca(self.ca.as_deref()).map_err(|source| ConfigError::Trust {
            key: "server.ca".into(),
            source,
        })?;
        Ok(ServerLink {
            urls: self.url.clone(),
            trust,
            host: berth_protocol::HostId::new(host_id.to_owned()).map_err(|_| {
                ConfigError::Invalid {
                    key: "host_id".into(),
                    message: format!("must be {ID_RULE}"),
                }
            })?,
            token,
            gateway: self.gateway.clone(),
            reconnect_max: Duration::from_secs(self.reconnect_max_s),
        })
    }
}

/// Most server URLs one `[server]` table may list.
const MAX_SERVERS: usize = 16;

/// `url = "ws://…"` or `url = ["ws://…", …]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    match OneOrMany::deserialize(d) {
        Ok(OneOrMany::One(url)) => Ok(vec![url]),
        Ok(OneOrMany::Many(urls)) => Ok(urls),
        Err(_) => Err(serde::de::Error::custom(
            "expected a ws:// URL or a list of them",
        )),
    }
}

/// The URLs of `--server-url`: one, or several separated by commas.
fn split_urls(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

fn is_uri(s: &str) -> bool {
    s.parse::<tokio_tungstenite::tungstenite::http::Uri>()
        .is_ok_and(|u| u.host().is_some_and(|h| !h.is_empty()))
}

/// The link's runtime settings, validated from the `[server]` table
/// ([`ServerConfig::resolve`]).
#[derive(Debug, Clone)]
pub struct ServerLink {
    /// `ws://…/v1/hosts` (or `wss://…`) of each replica, tried in turn (never empty).
    pub urls: Vec<String>,
    /// The roots a `wss://` server is checked against (`[server] ca` and Mozilla's).
    pub trust: Trust,
    pub host: berth_protocol::HostId,
    pub token: Token,
    /// Where players reach this host's gateway, advertised in `register`.
    pub gateway: String,
    /// Cap of the reconnect backoff.
    pub reconnect_max: Duration,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostdConfig {
    #[serde(default = "default_host_id")]
    pub host_id: String,
    /// The region this host serves (a region name of the modes): the server places only that
    /// region's sessions here. Unset: any region.
    #[serde(default)]
    pub region: Option<String>,
    /// Its zone within the region, for the operators' views.
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_control")]
    pub control: SocketAddr,
    #[serde(default)]
    pub driver: DriverChoice,
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
    /// On SIGTERM, how long hostd drains (no new sessions, live ones play to their end)
    /// before it stops; 0 stops at once, ending live matches. A second signal stops at once.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_s: u64,
    #[serde(default)]
    pub images: Vec<ImageConfig>,
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// The matchmaking server to register with; `None` runs standalone.
    #[serde(default)]
    pub server: Option<ServerConfig>,
    /// `[peer]`: serve docked substrates to other hosts, and fetch one from a peer instead of
    /// priming (needs `[server]`, which brokers it); `None`: neither, every image is primed.
    #[serde(default)]
    pub peer: Option<PeerConfig>,
}

/// The optional `[peer]` table (see [`crate::ship`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Where the peer listener binds (port 0: any free port).
    pub listen: SocketAddr,
    /// How other hosts reach it: `IP`, `IP:PORT`, `NAME` or `NAME:PORT` (no port: the bound
    /// one). Required when `listen` is an unspecified address (`0.0.0.0`): the address is
    /// never guessed.
    #[serde(default)]
    pub advertise: Option<String>,
    /// How long to wait for the server's answer to `want_substrate` before priming (ms).
    #[serde(default = "default_peer_ask_ms")]
    pub ask_ms: u64,
    /// How long fetching one substrate may take in all before it is given up (seconds).
    #[serde(default = "default_peer_fetch_timeout")]
    pub fetch_timeout_s: u64,
}

fn default_peer_ask_ms() -> u64 {
    5_000
}
fn default_peer_fetch_timeout() -> u64 {
    60
}

impl PeerConfig {
    /// The default waits, listening on `listen`, advertised as `advertise`.
    pub fn at(listen: SocketAddr, advertise: Option<String>) -> Self {
        PeerConfig {
            listen,
            advertise,
            ask_ms: default_peer_ask_ms(),
            fetch_timeout_s: default_peer_fetch_timeout(),
        }
    }

    /// The URL peers fetch from, once the listener is bound at `bound`.
    pub fn url(&self, bound: SocketAddr) -> String {
        let Some(a) = &self.advertise else {
            return format!("http://{bound}");
        };
        if let Ok(ip) = a.parse::<std::net::IpAddr>() {
            return format!("http://{}", SocketAddr::new(ip, bound.port()));
        }
        let has_port = a
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
        if has_port {
            format!("http://{a}")
        } else {
            format!("http://{a}:{}", bound.port())
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: format!("peer.{key}"),
                message: message.into(),
            })
        };
        match &self.advertise {
            None if self.listen.ip().is_unspecified() => {
                return invalid(
                    "advertise",
                    "must be set when listen is an unspecified address",
                )
            }
            Some(a) if a.is_empty() || !is_uri(&format!("http://{a}/")) || a.contains('/') => {
                return invalid("advertise", "must be HOST or HOST:PORT")
            }
            _ => {}
        }
        if !(100..=60_000).contains(&self.ask_ms) {
            return invalid("ask_ms", "must be between 100 and 60000");
        }
        if !(1..=3600).contains(&self.fetch_timeout_s) {
            return invalid("fetch_timeout_s", "must be between 1 and 3600");
        }
        Ok(())
    }
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
    #[error("config: {key}")]
    Tls {
        key: String,
        #[source]
        source: TlsError,
    },
    #[error("config: {key}")]
    Trust {
        key: String,
        #[source]
        source: TrustError,
    },
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
        // Relative image folders and manifests are relative to the config file.
        let base = path.parent().unwrap_or(Path::new("."));
        for image in &mut config.images {
            if image.dir.as_os_str().is_empty() {
                image.dir = Path::new("images").join(&image.name);
            }
            if image.dir.is_relative() {
                image.dir = base.join(&image.dir);
            }
            if let Some(m) = image.manifest.as_mut().filter(|m| m.is_relative()) {
                *m = base.join(&*m);
            }
        }
        let server = config.server.as_mut();
        let files = server
            .into_iter()
            .flat_map(|s| [&mut s.token_file, &mut s.ca]);
        for file in files.flatten() {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        if let Some(tls) = &mut config.gateway.tls {
            tls.relative_to(base);
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
            return invalid("host_id".into(), &format!("must be {ID_RULE}"));
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
        for (key, value) in [("region", &self.region), ("zone", &self.zone)] {
            if value
                .as_deref()
                .is_some_and(|v| berth_protocol::SessionId::new(v).is_err())
            {
                return invalid(key.into(), &format!("must be {ID_RULE}"));
            }
        }
        if self.drain_timeout_s > 86_400 {
            return invalid("drain_timeout_s".into(), "must be at most 86400 (a day)");
        }
        let (gateway, control) = (self.gateway.listen, self.control);
        let same_ip = gateway.ip() == control.ip()
            || gateway.ip().is_unspecified()
            || control.ip().is_unspecified();
        if gateway.port() != 0 && gateway.port() == control.port() && same_ip {
            return invalid("gateway.listen".into(), "must not be the control address");
        }
        if let Some(peer) = &self.peer {
            peer.validate()?;
        }
        if self.gateway.header_read_timeout_ms == 0 {
            return invalid(
                "gateway.header_read_timeout_ms".into(),
                "must be at least 1",
            );
        }
        if self.gateway.max_connections == 0 {
            return invalid("gateway.max_connections".into(), "must be at least 1");
        }
        let mut names = std::collections::HashSet::new();
        for (i, image) in self.images.iter().enumerate() {
            let key = |k: &str| format!("images[{i}].{k}");
            if berth_protocol::VmId::new(image.name.clone()).is_err() {
                return invalid(key("name"), &format!("must be {ID_RULE}"));
            }
            if !names.insert(&image.name) {
                return invalid(key("name"), "is used by another image");
            }
            if image.dir.as_os_str().is_empty() && image.manifest.is_none() {
                return invalid(key("dir"), "is required (or name the game's `manifest`)");
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
        if let Some(server) = &self.server {
            server.validate()?;
            if self.gateway.tls.is_some() && !server.gateway.starts_with("wss://") {
                return invalid(
                    "server.gateway".into(),
                    "must be a wss:// URL when [gateway.tls] is set",
                );
            }
        }
        Ok(())
    }

    /// The gateway's TLS, read from the `[gateway.tls]` files (`None`: plain `ws://`). A file
    /// that cannot be read or used fails start-up naming `gateway.tls.cert` or `.key`.
    pub fn gateway_tls(&self) -> Result<Option<Acceptor>, ConfigError> {
        let Some(files) = &self.gateway.tls else {
            return Ok(None);
        };
        files.load().map(Some).map_err(|source| ConfigError::Tls {
            key: format!("gateway.tls.{}", source.field()),
            source,
        })
    }

    /// Applies `--server-url` / `--server-token` (or their env vars) over the file: a URL (or
    /// several, comma-separated) without a `[server]` table creates one with defaults; a token
    /// replaces `token` and
    /// `token_file`.
    pub fn apply_server_flags(
        &mut self,
        url: Option<String>,
        token: Option<String>,
    ) -> Result<(), ConfigError> {
        if let Some(url) = url.as_deref().map(split_urls) {
            match &mut self.server {
                Some(s) => s.url = url,
                None => {
                    self.server = Some(ServerConfig {
                        url,
                        ca: None,
                        token: None,
                        token_file: None,
                        gateway: default_gateway(),
                        reconnect_max_s: default_reconnect_max(),
                    })
                }
            }
        }
        if let Some(token) = token {
            let Some(s) = &mut self.server else {
                return Err(ConfigError::Invalid {
                    key: "server.url".into(),
                    message: "is needed with a server token (--server-url or [server] url)".into(),
                });
            };
            s.token = Some(token);
            s.token_file = None;
        }
        self.validate()
    }

    /// The link's runtime settings if a server is configured (see [`ServerConfig::resolve`]).
    pub fn server_link(&self) -> Result<Option<ServerLink>, ConfigError> {
        self.server
            .as_ref()
            .map(|s| s.resolve(&self.host_id))
            .transpose()
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_s)
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
    use crate::link::chain;

    #[test]
    fn defaults_are_valid() {
        let c = HostdConfig::default();
        assert_eq!(c.driver, DriverChoice::Qemu);
        assert_eq!(
            HostdConfig::parse("driver = \"xen\"")
                .map(|c| c.driver)
                .ok(),
            Some(DriverChoice::Xen)
        );
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
        assert!(err("driver = \"vmware\"").contains("unknown variant"));
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

    #[test]
    fn gateway_table() {
        assert_eq!(
            HostdConfig::default().gateway.listen,
            SocketAddr::from(([127, 0, 0, 1], 7071))
        );
        let c = HostdConfig::parse("[gateway]\nlisten = \"0.0.0.0:9000\"").expect("valid");
        assert_eq!(c.gateway.listen, SocketAddr::from(([0, 0, 0, 0], 9000)));
        assert!(err("[gateway]\nlisten = \"nowhere\"").contains("listen"));
        assert!(err("[gateway]\nlisten = 7071").contains("listen"));
        assert!(err("[gateway]\nport = 1").contains("unknown field"));
        let limits = "[gateway]\nheader_read_timeout_ms = 500\nmax_connections = 9";
        let c = HostdConfig::parse(limits).expect("valid");
        assert_eq!(
            (c.gateway.header_read_timeout_ms, c.gateway.max_connections),
            (500, 9)
        );
        assert!(err("[gateway]\nmax_connections = 0").contains("gateway.max_connections"));
        let none = "[gateway]\nheader_read_timeout_ms = 0";
        assert!(err(none).contains("gateway.header_read_timeout_ms"));
        let clash = "control = \"127.0.0.1:7000\"\n[gateway]\nlisten = \"0.0.0.0:7000\"";
        assert!(err(clash).contains("gateway.listen"));
        HostdConfig::parse("control = \"127.0.0.1:0\"\n[gateway]\nlisten = \"127.0.0.1:0\"")
            .expect("ephemeral ports never clash");
    }

    #[test]
    fn the_example_config_is_valid() {
        let c = HostdConfig::parse(include_str!("../../assets/hostd.example.toml"))
            .expect("assets/hostd.example.toml parses");
        assert_eq!(c.gateway.listen, default_gateway_listen());
    }

    #[test]
    fn server_table_takes_defaults() {
        let c = HostdConfig::parse(
            "[server]\nurl = \"ws://127.0.0.1:7080/v1/hosts\"\ntoken = \"a.b.c\"",
        )
        .expect("valid");
        let s = c.server.as_ref().expect("server");
        assert_eq!(
            (s.gateway.as_str(), s.reconnect_max_s),
            ("ws://127.0.0.1:7071/v1/game", 10)
        );
        let link = c.server_link().expect("resolves").expect("configured");
        assert_eq!(link.host.as_str(), "host-1");
        assert_eq!(link.reconnect_max, Duration::from_secs(10));
        assert!(
            !format!("{s:?}{link:?}").contains("a.b.c"),
            "tokens stay out of logs"
        );
        assert!(HostdConfig::default().server_link().expect("ok").is_none());
    }

    #[test]
    fn bad_server_tables_name_the_key() {
        let server = |extra: &str| format!("[server]\nurl = \"ws://s:7080/v1/hosts\"\n{extra}");
        assert!(err("[server]\ngateway = \"ws://g\"").contains("missing field `url`"));
        assert!(err(&server("surprise = 1")).contains("unknown field"));
        assert!(err("[server]\nurl = \"http://s/v1/hosts\"").contains("server.url"));
        assert!(err("[server]\nurl = \"ftp://s/v1/hosts\"").contains("server.url"));
        assert!(err("[server]\nurl = \"ws://\"").contains("server.url"));
        assert!(err("[server]\nurl = []").contains("at least one"));
        assert!(err("[server]\nurl = [\"ws://a/v1/hosts\", 7]").contains("a list of them"));
        let two = "[server]\nurl = [\"ws://a/v1/hosts\", \"ws://b/v1/hosts\"]\ntoken = \"t\"";
        let link = HostdConfig::parse(two).expect("valid").server_link();
        assert_eq!(link.expect("ok").expect("server").urls.len(), 2);
        assert!(err(&server("gateway = \"tcp://g\"")).contains("server.gateway"));
        assert!(err(&server("reconnect_max_s = 0")).contains("server.reconnect_max_s"));
        assert!(err(&server("token = \"a b\"")).contains("server.token"));
        let both = server("token = \"t\"\ntoken_file = \"f\"");
        assert!(err(&both).contains("not both"));
        // Parses, but cannot start without a token.
        let c = HostdConfig::parse(&server("")).expect("valid file");
        let e = c.server_link().expect_err("no token").to_string();
        assert!(e.contains("server.token"), "{e}");
        let c = HostdConfig::parse(&server("token_file = \"/nonexistent/t.jwt\"")).expect("valid");
        let e = c.server_link().expect_err("unreadable").to_string();
        assert!(e.contains("server.token_file"), "{e}");
    }

    #[test]
    fn region_and_zone_are_names() {
        let c = HostdConfig::parse("region = \"eu\"\nzone = \"eu-1a\"").expect("valid");
        assert_eq!(
            (c.region.as_deref(), c.zone.as_deref()),
            (Some("eu"), Some("eu-1a"))
        );
        assert!(err("region = \"eu west\"").contains("region"));
        assert!(err("zone = \"\"").contains("zone"));
    }

    #[test]
    fn the_peer_table_is_never_guessed_onto_loopback() {
        let c = HostdConfig::parse("[peer]\nlisten = \"10.0.0.7:0\"").expect("valid");
        let peer = c.peer.expect("a peer table");
        let bound = SocketAddr::from(([10, 0, 0, 7], 40001));
        assert_eq!(peer.url(bound), "http://10.0.0.7:40001");
        let advertised = |a: &str| PeerConfig::at(bound, Some(a.into())).url(bound);
        assert_eq!(advertised("203.0.113.9"), "http://203.0.113.9:40001");
        assert_eq!(advertised("host7.example"), "http://host7.example:40001");
        assert_eq!(
            advertised("host7.example:7072"),
            "http://host7.example:7072"
        );
        assert_eq!(advertised("2001:db8::7"), "http://[2001:db8::7]:40001");
        // 0.0.0.0 says nothing about where peers reach it: advertise is then required.
        assert!(err("[peer]\nlisten = \"0.0.0.0:7072\"").contains("peer.advertise"));
        let ok = "[peer]\nlisten = \"0.0.0.0:7072\"\nadvertise = \"10.0.0.7\"";
        assert!(HostdConfig::parse(ok).is_ok());
        assert!(
            err("[peer]\nlisten = \"0.0.0.0:7072\"\nadvertise = \"a b/c\"")
                .contains("peer.advertise")
        );
        assert!(err("[peer]\nlisten = \"10.0.0.7:7072\"\nask_ms = 0").contains("peer.ask_ms"));
        assert!(err("[peer]\nlisten = \"10.0.0.7:7072\"\nfetch = 1").contains("fetch"));
    }

    #[test]
    fn token_file_is_relative_to_the_config_and_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("host.jwt"), "x.y.z\n").expect("write");
        let path = dir.path().join("hostd.toml");
        std::fs::write(
            &path,
            "[server]\nurl = \"ws://s:7080/v1/hosts\"\ntoken_file = \"host.jwt\"",
        )
        .expect("write");
        let c = HostdConfig::load(&path).expect("loads");
        let link = c.server_link().expect("resolves").expect("configured");
        assert_eq!(link.token.read().expect("readable"), "x.y.z");
    }

    #[test]
    fn tls_files_are_relative_to_the_config_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hostd.toml");
        let text = "[gateway.tls]\ncert = \"gw.pem\"\nkey = \"/etc/gw.key\"\n\
                    [server]\nurl = \"wss://s:7080/v1/hosts\"\nca = \"ca.pem\"\n\
                    token = \"a.b.c\"\ngateway = \"wss://g:7071/v1/game\"";
        std::fs::write(&path, text).expect("write");
        let c = HostdConfig::load(&path).expect("loads");
        let tls = c.gateway.tls.as_ref().expect("gateway tls");
        assert_eq!(tls.cert, dir.path().join("gw.pem"));
        assert_eq!(tls.key, Path::new("/etc/gw.key"));
        let ca = c.server.as_ref().and_then(|s| s.ca.clone());
        assert_eq!(ca, Some(dir.path().join("ca.pem")));
        // Neither file exists: start-up fails naming the key.
        let e = chain(&c.gateway_tls().expect_err("no cert file"));
        assert!(
            e.starts_with("config: gateway.tls.cert: cannot read"),
            "{e}"
        );
        let e = chain(&c.server_link().expect_err("no ca file"));
        assert!(e.starts_with("config: server.ca: cannot read"), "{e}");
        std::fs::write(dir.path().join("ca.pem"), "no pem here").expect("write");
        let e = chain(&c.server_link().expect_err("no certificate"));
        assert!(
            e.contains("server.ca") && e.contains("no PEM certificate"),
            "{e}"
        );
        // A TLS gateway advertised as ws:// would be unreachable from players.
        let plain = text.replace("wss://g:7071", "ws://g:7071");
        assert!(err(&plain).contains("server.gateway"));
        assert!(HostdConfig::default()
            .gateway_tls()
            .expect("plain")
            .is_none());
    }

    #[test]
    fn an_image_named_by_its_manifest_gets_a_folder_next_to_the_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hostd.toml");
        let text = "[[images]]\nname = \"reflex\"\nmanifest = \"games/reflex/game.toml\"\n\
                    [[images]]\nname = \"arena\"\ndir = \"/srv/arena\"";
        std::fs::write(&path, text).expect("write");
        let c = HostdConfig::load(&path).expect("loads");
        assert_eq!(c.images[0].dir, dir.path().join("images/reflex"));
        assert_eq!(
            c.images[0].manifest.as_deref(),
            Some(dir.path().join("games/reflex/game.toml").as_path())
        );
        assert_eq!(
            (c.images[1].dir.as_path(), &c.images[1].manifest),
            (Path::new("/srv/arena"), &None)
        );
        let e = HostdConfig::parse("[[images]]\nname = \"x\"").expect_err("no dir");
        assert!(e.to_string().contains("images[0].dir"), "{e}");
    }

    #[test]
    fn flags_override_the_file() {
        let mut c = HostdConfig::default();
        let e = c
            .apply_server_flags(None, Some("t".into()))
            .expect_err("no url");
        assert!(e.to_string().contains("server.url"));
        c.apply_server_flags(Some("ws://s:1/v1/hosts".into()), None)
            .expect("url alone makes a table");
        assert_eq!(c.server.as_ref().map(|s| s.reconnect_max_s), Some(10));
        let mut c = HostdConfig::parse(
            "[server]\nurl = \"ws://a:1/v1/hosts\"\ntoken_file = \"f\"\ngateway = \"ws://g:2\"",
        )
        .expect("valid");
        c.apply_server_flags(Some("ws://b:1/v1/hosts".into()), Some("t.o.k".into()))
            .expect("valid");
        let s = c.server.expect("server");
        assert_eq!(
            (
                s.url.join(","),
                s.token.as_deref(),
                s.token_file,
                s.gateway.as_str()
            ),
            ("ws://b:1/v1/hosts".into(), Some("t.o.k"), None, "ws://g:2")
        );
        let mut c = HostdConfig::default();
        c.apply_server_flags(Some("ws://a:1/v1/hosts, ws://b:1/v1/hosts".into()), None)
            .expect("a list of replicas");
        assert_eq!(
            c.server.map(|s| s.url),
            Some(vec![
                "ws://a:1/v1/hosts".to_owned(),
                "ws://b:1/v1/hosts".to_owned()
            ])
        );
        let mut c = HostdConfig::default();
        let e = c
            .apply_server_flags(Some("nope".into()), None)
            .expect_err("bad url");
        assert!(e.to_string().contains("server.url"));
    }
}
