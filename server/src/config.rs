//! `berth-server`'s configuration: a TOML file (every key optional), then flags and
//! environment variables on top, validated into runtime types at start-up.

use crate::util::{parse_toml, read_text, FileError};
use berth_net::tls::{Acceptor, TlsError, TlsFiles};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("{key}")]
    Tls {
        key: &'static str,
        #[source]
        source: TlsError,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where players, hosts and operators connect.
    pub listen: SocketAddr,
    /// This replica's name (hosts connected to it are recorded under it); random if empty.
    pub replica: String,
    /// Game modes: every `*.toml` in this folder.
    pub modes_dir: PathBuf,
    pub store: StoreConfig,
    pub auth: AuthConfig,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub placement: Placement,
    /// Terminate TLS (`wss://`, `https://`) with this certificate and key; without it the
    /// listener speaks plain HTTP.
    pub tls: Option<TlsFiles>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: ([127, 0, 0, 1], 7080).into(),
            replica: String::new(),
            modes_dir: PathBuf::from("assets/modes"),
            store: StoreConfig::default(),
            auth: AuthConfig::default(),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            placement: Placement::default(),
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Empty: the embedded memory store. `redis://…`: shared state for many replicas.
    pub redis: String,
    /// Prefix of every Redis key (one deployment per prefix).
    pub prefix: Option<String>,
    /// How long an ended session (with its results) stays readable.
    pub ended_retention_s: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            redis: String::new(),
            prefix: None,
            ended_retention_s: crate::store::ENDED_RETENTION_MS / 1000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Algorithm {
    HS256,
    RS256,
    EdDSA,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The one algorithm accepted; a token naming another (or `none`) is refused.
    pub algorithm: Algorithm,
    /// HS256 shared secret (or `BERTH_AUTH_SECRET`): the key is its bytes as written (trimmed
    /// of surrounding whitespace), never base64- or hex-decoded.
    pub secret: String,
    /// The same from a file (its bytes, trimmed): used instead of `secret` when set.
    pub secret_file: Option<PathBuf>,
    /// RS256/EdDSA: PEM public key to verify with.
    pub public_key_file: Option<PathBuf>,
    /// RS256/EdDSA: PEM private key, only needed to mint tokens (dev mode, `token`).
    pub private_key_file: Option<PathBuf>,
    pub issuer: String,
    pub audience: String,
    /// Lets anyone mint player tokens at `POST /v1/dev/token` (and admin tokens with
    /// `berth-server token`). Never on in production.
    pub dev_tokens: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            algorithm: Algorithm::HS256,
            secret: String::new(),
            secret_file: None,
            public_key_file: None,
            private_key_file: None,
            issuer: "berth".into(),
            audience: "berth".into(),
            dev_tokens: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest websocket message accepted from a player or host.
    pub max_frame_bytes: usize,
    /// Messages per second a player connection may send (token bucket)…
    pub messages_per_s: u32,
    /// …with bursts up to this many.
    pub burst: u32,
    /// Rate-limited messages tolerated before the connection is closed.
    pub rate_strikes: u32,
    /// Most concurrent player connections on this replica.
    pub max_players: usize,
    /// Most connections not yet past `hello` (players) or `register` (hosts) at once: every
    /// accepted TCP connection counts until then (plain HTTP requests for their connection's
    /// life); beyond it a connection is answered 503 `too_many_connections` and closed.
    pub max_pending: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 16 * 1024,
            messages_per_s: 10,
            burst: 20,
            rate_strikes: 20,
            max_players: 100_000,
            max_pending: 4096,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// A connection must send its HTTP request head (a websocket's upgrade request) within
    /// this, and an idle keep-alive connection its next one; else it is closed.
    pub header_read_ms: u64,
    /// A player must send `hello` within this.
    pub hello_ms: u64,
    /// A player socket silent this long is closed (clients ping every third of it).
    pub idle_ms: u64,
    /// A disconnected player keeps its place in the queue this long.
    pub reconnect_grace_ms: u64,
    /// hostd heartbeats this often…
    pub host_heartbeat_ms: u64,
    /// …and is lost if not heard from for this long (or disconnected this long): nothing new
    /// is placed on it.
    pub host_lost_ms: u64,
    /// A lost host's live sessions wait this long (from when it was last heard) for it to come
    /// back with their VMs (a hostd restarted or stalled: its VMs run on) before they end
    /// `host_lost`.
    pub host_grace_ms: u64,
    /// Choosing a host.
    pub placing_ms: u64,
    /// hostd activating the VM, per attempt.
    pub activating_ms: u64,
    /// A session's VM being destroyed after it ended.
    pub ending_ms: u64,
    /// Session tickets are valid this long (a reconnecting player gets a fresh one).
    pub ticket_ttl_ms: u64,
    /// On SIGTERM, how long the replica answers `/readyz` 503 (so that load balancers stop
    /// sending it connections) before it closes its sockets and exits.
    pub shutdown_delay_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header_read_ms: 10_000,
            hello_ms: 10_000,
            idle_ms: 60_000,
            reconnect_grace_ms: 30_000,
            host_heartbeat_ms: 2_000,
            host_lost_ms: 6_000,
            host_grace_ms: 30_000,
            placing_ms: 5_000,
            activating_ms: 15_000,
            ending_ms: 10_000,
            ticket_ttl_ms: 60_000,
            shutdown_delay_ms: 2_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// The host with the fewest running VMs: spreads load and failure.
    Spread,
    /// The host with the most running VMs that still has room: frees whole hosts.
    Pack,
}

/// How a region's sessions are spread over its zones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Zones {
    /// Among equally ready hosts, one in the zone running the fewest of the candidates'
    /// sessions: a zone's outage costs the fewest matches.
    Spread,
    /// Zones play no part.
    Ignore,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Placement {
    pub policy: Policy,
    pub zones: Zones,
    /// Draining a host (admin API, or hostd stopping) moves its live sessions to other hosts
    /// by live migration; off: they play to their end where they are.
    pub move_on_drain: bool,
    /// Hosts tried per session before it ends as `placement_failed`.
    pub attempts: u32,
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            policy: Policy::Spread,
            zones: Zones::Spread,
            move_on_drain: true,
            attempts: 3,
        }
    }
}

impl ServerConfig {
    /// Reads `path` (all keys optional; unknown keys are refused).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_text(path)?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let c: ServerConfig = parse_toml(text, path)?;
        Ok(c)
    }

    /// Checks what serde cannot; run after flags are applied.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.max_frame_bytes < 256 || l.max_frame_bytes > 16 << 20 {
            return Err(invalid("limits.max_frame_bytes", "must be 256 B to 16 MiB"));
        }
        if l.messages_per_s == 0 || l.burst == 0 {
            return Err(invalid("limits.messages_per_s", "must be at least 1"));
        }
        if l.max_pending == 0 {
            return Err(invalid("limits.max_pending", "must be at least 1"));
        }
        let t = &self.timeouts;
        if t.host_lost_ms <= t.host_heartbeat_ms {
            return Err(invalid(
                "timeouts.host_lost_ms",
                "must be longer than timeouts.host_heartbeat_ms",
            ));
        }
        if t.host_grace_ms < t.host_lost_ms {
            return Err(invalid(
                "timeouts.host_grace_ms",
                "must be at least timeouts.host_lost_ms",
            ));
        }
        for (key, v) in [
            ("timeouts.header_read_ms", t.header_read_ms),
            ("timeouts.hello_ms", t.hello_ms),
            ("timeouts.idle_ms", t.idle_ms),
            ("timeouts.host_heartbeat_ms", t.host_heartbeat_ms),
            ("timeouts.placing_ms", t.placing_ms),
            ("timeouts.activating_ms", t.activating_ms),
            ("timeouts.ending_ms", t.ending_ms),
            ("timeouts.ticket_ttl_ms", t.ticket_ttl_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be more than 0"));
            }
        }
        if self.store.ended_retention_s == 0 {
            return Err(invalid("store.ended_retention_s", "must be more than 0"));
        }
        if self.placement.attempts == 0 {
            return Err(invalid("placement.attempts", "must be at least 1"));
        }
        let r = &self.store.redis;
        if r.starts_with("rediss://") {
            return Err(invalid(
                "store.redis",
                "TLS (rediss://) is not built in; reach Redis over a TLS tunnel with redis://",
            ));
        }
        let known = ["redis://", "redis+unix://", "unix://"];
        if !r.is_empty() && !known.iter().any(|k| r.starts_with(k)) {
            return Err(invalid("store.redis", "must be a redis:// URL"));
        }
        Ok(())
    }
}

impl ServerConfig {
    /// Applies `--tls-cert` / `--tls-key` (or their env vars) over the file: each replaces its
    /// key of the `[tls]` table; without a table both are needed.
    pub fn apply_tls_flags(
        &mut self,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<(), ConfigError> {
        match (cert, key, &mut self.tls) {
            (None, None, _) => {}
            (Some(cert), Some(key), tls) => *tls = Some(TlsFiles { cert, key }),
            (cert, key, Some(tls)) => {
                tls.cert = cert.unwrap_or_else(|| tls.cert.clone());
                tls.key = key.unwrap_or_else(|| tls.key.clone());
            }
            (Some(_), None, None) => return Err(invalid("tls.key", "is needed with tls.cert")),
            (None, Some(_), None) => return Err(invalid("tls.cert", "is needed with tls.key")),
        }
        Ok(())
    }

    /// The listener's TLS, read from the `[tls]` files (`None`: plain HTTP). A file that cannot
    /// be read or used fails start-up naming `tls.cert` or `tls.key`.
    pub fn tls_acceptor(&self) -> Result<Option<Acceptor>, ConfigError> {
        let Some(files) = &self.tls else {
            return Ok(None);
        };
        files.load().map(Some).map_err(|source| ConfigError::Tls {
            key: if source.field() == "cert" {
                "tls.cert"
            } else {
                "tls.key"
            },
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults_and_unknown_keys_are_named() {
        let c = ServerConfig::parse("", Path::new("x.toml")).expect("empty is fine");
        c.validate().expect("defaults are valid");
        let e = ServerConfig::parse("[limits]\nmax_frame = 3\n", Path::new("x.toml"))
            .expect_err("unknown key");
        assert!(e.to_string().contains("max_frame"), "{e}");
        let mut c = ServerConfig::default();
        c.timeouts.host_lost_ms = 1;
        let e = c.validate().expect_err("lost before heartbeat");
        assert!(e.to_string().starts_with("timeouts.host_lost_ms"), "{e}");
        let c = ServerConfig::parse(
            "[limits]\nmax_pending = 0\n[timeouts]\nheader_read_ms = 500\n",
            Path::new("x.toml"),
        )
        .expect("known keys");
        assert_eq!(c.timeouts.header_read_ms, 500);
        let e = c.validate().expect_err("no pending connection allowed");
        assert!(e.to_string().starts_with("limits.max_pending"), "{e}");
    }

    #[test]
    fn the_tls_table_and_its_flags() {
        let c = ServerConfig::parse("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n", Path::new("x"))
            .expect("valid");
        let tls = c.tls.as_ref().expect("tls");
        assert_eq!(
            (tls.cert.as_path(), tls.key.as_path()),
            (Path::new("c.pem"), Path::new("k.pem"))
        );
        let e =
            ServerConfig::parse("[tls]\ncert = \"c.pem\"\n", Path::new("x")).expect_err("no key");
        assert!(e.to_string().contains("key"), "{e}");
        let e = anyhow::Error::from(c.tls_acceptor().expect_err("no such files"));
        let e = format!("{e:#}");
        assert!(e.starts_with("tls.cert: cannot read c.pem: "), "{e}");
        let mut c = ServerConfig::default();
        let e = c
            .apply_tls_flags(Some("c".into()), None)
            .expect_err("no key");
        assert!(e.to_string().starts_with("tls.key"), "{e}");
        c.apply_tls_flags(Some("c".into()), Some("k".into()))
            .expect("both");
        c.apply_tls_flags(None, Some("k2".into()))
            .expect("over the table");
        let tls = c.tls.expect("tls");
        assert_eq!(
            (tls.cert.as_path(), tls.key.as_path()),
            (Path::new("c"), Path::new("k2"))
        );
        assert!(ServerConfig::default()
            .tls_acceptor()
            .expect("plain")
            .is_none());
    }
}
