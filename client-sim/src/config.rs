//! What a swarm does: who arrives when, what they queue for, how long they think between
//! matches, and how their phones misbehave. [`SwarmConfig::validate`] checks all of it before a
//! single socket opens, naming the field at fault.

use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

/// Why a [`SwarmConfig`] cannot run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("server: {0}")]
    Server(String),
    #[error("ca: {0}")]
    Ca(String),
    #[error("players: {0}")]
    Players(String),
    #[error("duration: {0}")]
    Duration(String),
    #[error("modes: {0}")]
    Modes(String),
    #[error("parties: {0}")]
    Parties(String),
    #[error("skill: {0}")]
    Skill(String),
    #[error("think: {0}")]
    Think(String),
    #[error("matches: {0}")]
    Matches(String),
    #[error("faults: {0}")]
    Faults(String),
    #[error("name_prefix: {0}")]
    NamePrefix(String),
    #[error("region: {0}")]
    Region(String),
    #[error("queue_timeout: {0}")]
    QueueTimeout(String),
}

/// How players arrive.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrivals {
    /// This many players, their arrivals spread evenly over `ramp` (zero: all at once).
    Fixed {
        players: u32,
        #[serde(with = "as_ms")]
        ramp: Duration,
    },
    /// Players arrive at random (a Poisson process) at this mean rate per second for the whole
    /// `duration`; a party arrives together and counts as its size.
    Rate { per_s: f64 },
}

/// How many matches each player plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Matches {
    /// This many (the last ones may be cut off by the end of `duration`).
    Count(u32),
    /// Match after match until `duration` is over.
    UntilEnd,
}

/// One choice of a weighted draw.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Weighted<T> {
    pub value: T,
    pub weight: f64,
}

impl<T> Weighted<T> {
    pub fn new(value: T, weight: f64) -> Self {
        Self { value, weight }
    }
}

/// An inclusive range of durations a value is drawn from uniformly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DurationRange {
    #[serde(with = "as_ms")]
    pub min: Duration,
    #[serde(with = "as_ms")]
    pub max: Duration,
}

impl DurationRange {
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self { min, max }
    }

    pub const fn fixed(d: Duration) -> Self {
        Self { min: d, max: d }
    }

    pub const fn zero() -> Self {
        Self::fixed(Duration::ZERO)
    }

    /// A uniform draw in `[min, max]`.
    pub fn draw(&self, rng: &mut fastrand::Rng) -> Duration {
        let (lo, hi) = (self.min.as_micros() as u64, self.max.as_micros() as u64);
        if hi <= lo {
            return self.min;
        }
        Duration::from_micros(rng.u64(lo..=hi))
    }

    fn check(&self) -> Result<(), String> {
        if self.min > self.max {
            return Err(format!(
                "the range {} .. {} runs backwards",
                fmt_duration(self.min),
                fmt_duration(self.max)
            ));
        }
        Ok(())
    }
}

/// Skill ratings are drawn from a normal distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SkillSpread {
    pub mean: f64,
    /// The standard deviation; 0 gives every player `mean`.
    pub spread: f64,
}

/// What goes wrong on a phone, each a probability per match (0 to 1).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Faults {
    /// The game socket drops once mid-match (no close handshake) and the bot reconnects with
    /// the same ticket after `drop_pause`.
    pub drop_game: f64,
    #[serde(with = "as_ms_range")]
    pub drop_pause: DurationRange,
    /// The app goes to the background once mid-match: it stops sending and reading for
    /// `background_for`; afterwards, with probability `background_kill`, the OS has killed its
    /// sockets and it reconnects both (play first, for a fresh ticket).
    pub background: f64,
    #[serde(with = "as_ms_range")]
    pub background_for: DurationRange,
    pub background_kill: f64,
    /// Every message sent or received during the match (both sockets) is delayed by a draw
    /// from `slow_delay`, keeping their order.
    pub slow_link: f64,
    #[serde(with = "as_ms_range")]
    pub slow_delay: DurationRange,
}

impl Faults {
    /// The names `--fault NAME=P` accepts.
    pub const NAMES: [&'static str; 3] = ["drop_game", "background", "slow_link"];

    /// Sets the probability of the fault called `name`.
    pub fn set(&mut self, name: &str, p: f64) -> Result<(), ConfigError> {
        match name {
            "drop_game" => self.drop_game = p,
            "background" => self.background = p,
            "slow_link" => self.slow_link = p,
            _ => {
                return Err(ConfigError::Faults(format!(
                    "unknown fault {name:?} (known: {})",
                    Self::NAMES.join(", ")
                )))
            }
        }
        Ok(())
    }
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            drop_game: 0.0,
            drop_pause: DurationRange::new(Duration::from_millis(200), Duration::from_millis(1000)),
            background: 0.0,
            background_for: DurationRange::new(Duration::from_secs(2), Duration::from_secs(6)),
            background_kill: 0.5,
            slow_link: 0.0,
            slow_delay: DurationRange::new(Duration::from_millis(50), Duration::from_millis(300)),
        }
    }
}

/// Everything a swarm run needs. Build it with `..SwarmConfig::default()` and change what
/// matters; [`crate::run`] validates it first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SwarmConfig {
    /// The matchmaking server's base URL (`http://HOST:PORT`, or `https://` for a server that
    /// terminates TLS); `/v1/play` and `/v1/dev/token` are under it. `ws://` and `wss://` work
    /// too. Several replicas, comma-separated: each player starts on one and fails over to the
    /// next.
    pub server: String,
    /// A CA certificate (PEM) trusted besides Mozilla's roots, for a server and gateways with
    /// certificates of a private CA.
    pub ca: Option<PathBuf>,
    pub arrivals: Arrivals,
    /// No player arrives or starts a match after this; players queued at that moment cancel.
    #[serde(with = "as_ms")]
    pub duration: Duration,
    /// How long matches under way at the end of `duration` may take to finish; then the run is
    /// cut off (those matches count as `drain_timeout`).
    #[serde(with = "as_ms")]
    pub drain: Duration,
    /// Game modes to queue for, drawn per match by weight.
    pub modes: Vec<Weighted<String>>,
    /// The region to queue in, or `*`: measure each region's gateways (`GET /v1/regions`)
    /// and queue with the latencies, to play in the region best for the match.
    pub region: String,
    /// Party sizes, drawn per party by weight; members queue with the same `party` and a size
    /// of 1 queues solo.
    pub parties: Vec<Weighted<u32>>,
    pub skill: SkillSpread,
    /// Pause between one match's end and the next queue.
    #[serde(with = "as_ms_range")]
    pub think: DurationRange,
    pub matches: Matches,
    pub faults: Faults,
    /// Player names are `PREFIX-N`; give each concurrent swarm its own prefix.
    pub name_prefix: String,
    /// Seeds every random choice (arrivals, modes, skill, faults, wandering).
    pub seed: u64,
    /// Give up waiting for `matched` after this long in the queue (`queue_timeout`).
    #[serde(with = "as_ms")]
    pub queue_timeout: Duration,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        Self {
            server: "http://127.0.0.1:7080".into(),
            ca: None,
            arrivals: Arrivals::Fixed {
                players: 2,
                ramp: Duration::ZERO,
            },
            duration: Duration::from_secs(60),
            drain: Duration::from_secs(30),
            modes: vec![Weighted::new("sprint".into(), 1.0)],
            region: "local".into(),
            parties: vec![Weighted::new(1, 1.0)],
            skill: SkillSpread {
                mean: 1000.0,
                spread: 100.0,
            },
            think: DurationRange::new(Duration::from_millis(500), Duration::from_secs(2)),
            matches: Matches::Count(1),
            faults: Faults::default(),
            name_prefix: "sim".into(),
            seed: 1,
            queue_timeout: Duration::from_secs(90),
        }
    }
}

/// The longest prefix: `PREFIX-N` must stay a valid player id (64 bytes).
pub const MAX_PREFIX_LEN: usize = 48;

impl SwarmConfig {
    /// Checks every field; the error names the first one at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.play_urls()?;
        self.trust()?;
        match &self.arrivals {
            Arrivals::Fixed { players: 0, .. } => {
                return Err(ConfigError::Players("at least one player is needed".into()))
            }
            Arrivals::Fixed { .. } => {}
            Arrivals::Rate { per_s } if !(per_s.is_finite() && *per_s > 0.0) => {
                return Err(ConfigError::Players(format!(
                    "the arrival rate must be a positive number of players per second, not {per_s}"
                )))
            }
            Arrivals::Rate { .. } => {}
        }
        if self.duration.is_zero() {
            return Err(ConfigError::Duration("must be longer than zero".into()));
        }
        check_weights(&self.modes, |m| !m.is_empty(), "a mode name is empty")
            .map_err(ConfigError::Modes)?;
        check_weights(
            &self.parties,
            |s| *s >= 1,
            "a party size is 0 (1 means solo)",
        )
        .map_err(ConfigError::Parties)?;
        if !self.skill.mean.is_finite() || self.skill.mean.abs() > 1e9 {
            return Err(ConfigError::Skill(format!(
                "the mean must be a finite number within ±1e9, not {}",
                self.skill.mean
            )));
        }
        if !(self.skill.spread.is_finite() && self.skill.spread >= 0.0) {
            return Err(ConfigError::Skill(format!(
                "the spread must be a number ≥ 0, not {}",
                self.skill.spread
            )));
        }
        self.think.check().map_err(ConfigError::Think)?;
        if self.matches == Matches::Count(0) {
            return Err(ConfigError::Matches(
                "at least one match per player (or `loop`)".into(),
            ));
        }
        let f = &self.faults;
        for (name, p) in [
            ("drop_game", f.drop_game),
            ("background", f.background),
            ("background_kill", f.background_kill),
            ("slow_link", f.slow_link),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(ConfigError::Faults(format!(
                    "{name} is a probability between 0 and 1, not {p}"
                )));
            }
        }
        for (name, r) in [
            ("drop_pause", f.drop_pause),
            ("background_for", f.background_for),
            ("slow_delay", f.slow_delay),
        ] {
            r.check()
                .map_err(|e| ConfigError::Faults(format!("{name}: {e}")))?;
        }
        if self.name_prefix.is_empty() || self.name_prefix.len() > MAX_PREFIX_LEN {
            return Err(ConfigError::NamePrefix(format!(
                "must be 1 to {MAX_PREFIX_LEN} characters"
            )));
        }
        if let Err(e) = berth_protocol::PlayerId::new(format!("{}-0", self.name_prefix)) {
            return Err(ConfigError::NamePrefix(e.to_string()));
        }
        if self.region.is_empty() {
            return Err(ConfigError::Region("must not be empty".into()));
        }
        if self.queue_timeout.is_zero() {
            return Err(ConfigError::QueueTimeout("must be longer than zero".into()));
        }
        Ok(())
    }

    /// `ws://HOST:PORT/v1/play` (`wss://` for TLS) of each replica in `server`.
    pub fn play_urls(&self) -> Result<Vec<String>, ConfigError> {
        self.bases(("ws", "wss"), "/v1/play")
    }

    /// `http://HOST:PORT/v1/dev/token` (`https://` for TLS) of each replica in `server`.
    pub fn token_urls(&self) -> Result<Vec<String>, ConfigError> {
        self.bases(("http", "https"), "/v1/dev/token")
    }

    /// `http://HOST:PORT/v1/regions` (`https://` for TLS) of each replica in `server`.
    pub fn regions_urls(&self) -> Result<Vec<String>, ConfigError> {
        self.bases(("http", "https"), "/v1/regions")
    }

    /// `scheme://host[:port]` + `path` of each comma-separated URL of `server`; the scheme is
    /// `schemes.0`, or `schemes.1` for a TLS server.
    fn bases(&self, schemes: (&str, &str), path: &str) -> Result<Vec<String>, ConfigError> {
        let servers: Vec<&str> = self
            .server
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if servers.is_empty() {
            return Err(ConfigError::Server("no server URL given".into()));
        }
        servers
            .into_iter()
            .map(|s| Ok(format!("{}{path}", base(s, schemes)?)))
            .collect()
    }

    /// What the bots trust over TLS: Mozilla's roots, and `ca` when given.
    pub fn trust(&self) -> Result<berth_client::Trust, ConfigError> {
        berth_client::Trust::from_ca(self.ca.as_deref()).map_err(|e| {
            let cause = std::error::Error::source(&e).map(|s| format!(": {s}"));
            ConfigError::Ca(format!("{e}{}", cause.unwrap_or_default()))
        })
    }
}

/// `scheme://host[:port]` of `server`, which must be an `http`, `https`, `ws` or `wss` URL with
/// a host and no path beyond `/`; the scheme is `schemes.0`, or `schemes.1` for a TLS server.
fn base(server: &str, (plain, tls): (&str, &str)) -> Result<String, ConfigError> {
    {
        let bad = |why: &str| ConfigError::Server(format!("{server:?}: {why}"));
        let url = reqwest::Url::parse(server).map_err(|e| bad(&e.to_string()))?;
        let scheme = match url.scheme() {
            "http" | "ws" => plain,
            "https" | "wss" => tls,
            other => {
                return Err(bad(&format!(
                    "scheme {other:?} is not http://, https://, ws:// or wss://"
                )))
            }
        };
        let host = url.host_str().ok_or_else(|| bad("no host"))?;
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            return Err(bad(
                "give the base URL only (e.g. http://127.0.0.1:7080), without a path",
            ));
        }
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        Ok(match url.port() {
            Some(p) => format!("{scheme}://{host}:{p}"),
            None => format!("{scheme}://{host}"),
        })
    }
}

impl SwarmConfig {
    /// The mean party size, by weight.
    pub(crate) fn mean_party_size(&self) -> f64 {
        let total: f64 = self.parties.iter().map(|w| w.weight).sum();
        if total <= 0.0 {
            return 1.0;
        }
        self.parties
            .iter()
            .map(|w| w.value as f64 * w.weight)
            .sum::<f64>()
            / total
    }
}

fn check_weights<T>(
    items: &[Weighted<T>],
    valid: impl Fn(&T) -> bool,
    invalid: &str,
) -> Result<(), String> {
    if items.is_empty() {
        return Err("at least one is needed".into());
    }
    let mut total = 0.0;
    for w in items {
        if !valid(&w.value) {
            return Err(invalid.into());
        }
        if !(w.weight.is_finite() && w.weight >= 0.0) {
            return Err(format!("weight {} is not a number ≥ 0", w.weight));
        }
        total += w.weight;
    }
    if total <= 0.0 {
        return Err("the weights add up to 0".into());
    }
    Ok(())
}

/// A weighted draw (weights validated: at least one positive).
pub(crate) fn pick<'a, T>(items: &'a [Weighted<T>], rng: &mut fastrand::Rng) -> &'a T {
    let total: f64 = items.iter().map(|w| w.weight).sum();
    let mut x = rng.f64() * total;
    for w in items {
        if x < w.weight {
            return &w.value;
        }
        x -= w.weight;
    }
    &items
        .iter()
        .rev()
        .find(|w| w.weight > 0.0)
        .unwrap_or(&items[items.len() - 1])
        .value
}

/// A draw from a normal distribution (Box–Muller).
pub(crate) fn normal(rng: &mut fastrand::Rng, mean: f64, sd: f64) -> f64 {
    if sd == 0.0 {
        return mean;
    }
    let u1 = rng.f64().max(f64::MIN_POSITIVE);
    let u2 = rng.f64();
    mean + sd * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Parses `250ms`, `1.5s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 20s, 2m)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("unknown unit {u:?} in {s:?} (ms, s, m or h)")),
    };
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("{s:?} is too long"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `MIN..MAX` or a single duration.
pub fn parse_duration_range(s: &str) -> Result<DurationRange, String> {
    let r = match s.split_once("..") {
        Some((a, b)) => DurationRange::new(parse_duration(a)?, parse_duration(b)?),
        None => DurationRange::fixed(parse_duration(s)?),
    };
    r.check()?;
    Ok(r)
}

/// Parses `a:3,b:1` (or `a`, weight 1) into weighted choices.
pub fn parse_weighted<T>(
    s: &str,
    value: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<Weighted<T>>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (v, w) = match part.split_once(':') {
            Some((v, w)) => (
                v.trim(),
                w.trim()
                    .parse::<f64>()
                    .map_err(|_| format!("weight {w:?} in {part:?} is not a number"))?,
            ),
            None => (part, 1.0),
        };
        out.push(Weighted::new(value(v)?, w));
    }
    if out.is_empty() {
        return Err("empty list".into());
    }
    Ok(out)
}

pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Durations as whole milliseconds in the report's echo of the config.
mod as_ms {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

/// A range as `[min_ms, max_ms]`.
mod as_ms_range {
    use super::DurationRange;
    use serde::Serializer;

    pub fn serialize<S: Serializer>(r: &DurationRange, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(2))?;
        seq.serialize_element(&(r.min.as_millis() as u64))?;
        seq.serialize_element(&(r.max.as_millis() as u64))?;
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_valid_and_urls_derive_from_the_base() {
        let c = SwarmConfig::default();
        c.validate().expect("default is valid");
        assert_eq!(c.play_urls().expect("url"), ["ws://127.0.0.1:7080/v1/play"]);
        assert_eq!(
            c.token_urls().expect("url"),
            ["http://127.0.0.1:7080/v1/dev/token"]
        );
        let c = SwarmConfig {
            server: "ws://[::1]:9000/, http://10.0.0.2:7080".into(),
            ..SwarmConfig::default()
        };
        assert_eq!(
            c.play_urls().expect("urls"),
            ["ws://[::1]:9000/v1/play", "ws://10.0.0.2:7080/v1/play"]
        );
        let c = SwarmConfig {
            server: "https://berth.example:7443".into(),
            ..SwarmConfig::default()
        };
        assert_eq!(
            c.play_urls().expect("url"),
            ["wss://berth.example:7443/v1/play"]
        );
        let token = c.token_urls().expect("url");
        assert_eq!(token, ["https://berth.example:7443/v1/dev/token"]);
    }

    #[test]
    fn bad_configs_name_their_field() {
        let bad = |f: &dyn Fn(&mut SwarmConfig)| {
            let mut c = SwarmConfig::default();
            f(&mut c);
            c.validate().expect_err("must be refused")
        };
        assert!(matches!(
            bad(&|c| c.server = "not a url".into()),
            ConfigError::Server(_)
        ));
        assert!(matches!(
            bad(&|c| c.server = " , ".into()),
            ConfigError::Server(_)
        ));
        assert!(matches!(
            bad(&|c| c.server = "http://a:1,nope".into()),
            ConfigError::Server(_)
        ));
        assert!(matches!(
            bad(&|c| c.server = "ftp://example.test".into()),
            ConfigError::Server(_)
        ));
        assert!(matches!(
            bad(&|c| c.ca = Some("/nonexistent/ca.pem".into())),
            ConfigError::Ca(e) if e.contains("/nonexistent/ca.pem")
        ));
        assert!(matches!(
            bad(&|c| c.server = "http://127.0.0.1:7080/v1/play".into()),
            ConfigError::Server(_)
        ));
        assert!(matches!(
            bad(&|c| c.arrivals = Arrivals::Fixed {
                players: 0,
                ramp: Duration::ZERO
            }),
            ConfigError::Players(_)
        ));
        for r in [-1.0, 0.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                bad(&|c| c.arrivals = Arrivals::Rate { per_s: r }),
                ConfigError::Players(_)
            ));
        }
        assert!(matches!(
            bad(&|c| c.duration = Duration::ZERO),
            ConfigError::Duration(_)
        ));
        assert!(matches!(bad(&|c| c.modes.clear()), ConfigError::Modes(_)));
        assert!(matches!(
            bad(&|c| c.modes = vec![Weighted::new("sprint".into(), 0.0)]),
            ConfigError::Modes(_)
        ));
        assert!(matches!(
            bad(&|c| c.parties = vec![Weighted::new(0, 1.0)]),
            ConfigError::Parties(_)
        ));
        assert!(matches!(
            bad(&|c| c.skill.spread = -1.0),
            ConfigError::Skill(_)
        ));
        assert!(matches!(
            bad(&|c| c.think = DurationRange::new(Duration::from_secs(2), Duration::from_secs(1))),
            ConfigError::Think(_)
        ));
        assert!(matches!(
            bad(&|c| c.matches = Matches::Count(0)),
            ConfigError::Matches(_)
        ));
        assert!(matches!(
            bad(&|c| c.faults.slow_link = 1.5),
            ConfigError::Faults(_)
        ));
        assert!(matches!(
            bad(&|c| c.name_prefix = "bad name".into()),
            ConfigError::NamePrefix(_)
        ));
        assert!(matches!(
            bad(&|c| c.name_prefix = "x".repeat(49)),
            ConfigError::NamePrefix(_)
        ));
        let e = bad(&|c| c.arrivals = Arrivals::Rate { per_s: -2.0 });
        assert!(e.to_string().starts_with("players: "), "{e}");
    }

    #[test]
    fn faults_are_set_by_name() {
        let mut f = Faults::default();
        f.set("slow_link", 0.25).expect("known");
        assert_eq!(f.slow_link, 0.25);
        let e = f.set("meteor", 0.1).expect_err("unknown");
        assert!(e.to_string().contains("meteor"), "{e}");
    }

    #[test]
    fn durations_and_lists_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(
            parse_duration_range("50ms..300ms"),
            Ok(DurationRange::new(
                Duration::from_millis(50),
                Duration::from_millis(300)
            ))
        );
        assert!(parse_duration_range("3s..1s").is_err());
        let modes = parse_weighted("sprint:3, arena", |s| Ok(s.to_owned())).expect("list");
        assert_eq!(
            modes,
            vec![
                Weighted::new("sprint".to_owned(), 3.0),
                Weighted::new("arena".to_owned(), 1.0)
            ]
        );
        assert!(parse_weighted("a:x", |s| Ok(s.to_owned())).is_err());
    }

    #[test]
    fn draws_follow_their_weights() {
        let items = vec![
            Weighted::new('a', 3.0),
            Weighted::new('b', 1.0),
            Weighted::new('c', 0.0),
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = [0; 3];
        for _ in 0..4000 {
            counts[(*pick(&items, &mut rng) as u8 - b'a') as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        assert!((2800..3200).contains(&counts[0]), "{counts:?}");
        let mean = (0..4000)
            .map(|_| normal(&mut rng, 1000.0, 100.0))
            .sum::<f64>()
            / 4000.0;
        assert!((990.0..1010.0).contains(&mean), "{mean}");
        let c = SwarmConfig {
            parties: vec![Weighted::new(1, 1.0), Weighted::new(3, 1.0)],
            ..SwarmConfig::default()
        };
        assert_eq!(c.mean_party_size(), 2.0);
    }
}
