//! `berth-sim`: swarms of simulated mobile players against a Berth server, for load tests,
//! latency reports and chaos.
//!
//! Each player (a *bot*) gets a development token (`POST /v1/dev/token`, so the server must run
//! with `auth.dev_tokens`), opens `/v1/play`, queues, follows `matched` to the host gateway,
//! joins the game with its ticket and plays it — wandering the map, shooting at the nearest
//! opponent, pinging once a second — until it holds the results. Phones misbehave on purpose
//! ([`Faults`]): game sockets drop mid-match, apps go to the background, links get slow.
//!
//! ```no_run
//! # async fn demo() -> Result<(), berth_sim::ConfigError> {
//! let config = berth_sim::SwarmConfig {
//!     arrivals: berth_sim::Arrivals::Fixed { players: 8, ramp: std::time::Duration::ZERO },
//!     ..Default::default()
//! };
//! let report = berth_sim::run(config, None).await?;
//! println!("{}", report.table());
//! # Ok(()) }
//! ```
//!
//! Modules: [`config`] (what a swarm does), `bot` (one player), `link` (one websocket with its
//! reader and writer tasks), [`steer`] (how a bot plays), [`report`] (counts and percentiles),
//! [`progress`] (live counters), [`plot`] (the PNG chart). The binary (`main.rs`) only parses
//! flags and shows progress.

mod bot;
pub mod config;
pub mod latency;
pub mod plot;
pub mod progress;
pub mod report;
pub mod steer;

pub use berth_client::ClientError;
pub use bot::Failure;
pub use config::{
    Arrivals, ConfigError, DurationRange, Faults, Matches, SkillSpread, SwarmConfig, Weighted,
};
pub use plot::{write_png, PlotError};
pub use progress::{Progress, ProgressSnapshot};
pub use report::{Histograms, Latency, Metric, Percentiles, Report};

use bot::{BotPlan, Shared};
use report::Tally;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

/// Bots get this long past `duration + drain` to wrap up before they are aborted.
const ABORT_GRACE: Duration = Duration::from_secs(5);
/// How long the run waits for the last sockets to finish closing.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Runs a swarm to its end and reports. Returns once every bot is done and every socket it
/// opened is closed: at the latest `duration + drain` plus a few seconds after the start.
/// `progress`, when given, is updated live.
pub async fn run(config: SwarmConfig, progress: Option<Progress>) -> Result<Report, ConfigError> {
    config.validate()?;
    let started = Instant::now();
    let end = started + config.duration;
    let hard_end = end + config.drain;
    let trust = config.trust()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .use_preconfigured_tls(trust.client_config().as_ref().clone())
        .build()
        .map_err(|e| ConfigError::Server(format!("cannot build an HTTP client: {e}")))?;
    let (alive, mut all_closed) = mpsc::channel::<()>(1);
    let progress = progress.unwrap_or_default();
    let shared = Arc::new(Shared {
        play_urls: config.play_urls()?,
        token_urls: config.token_urls()?,
        regions_urls: config.regions_urls()?,
        trust,
        config: config.clone(),
        http,
        progress: progress.clone(),
        alive,
        end,
        hard_end,
    });

    let mut arrivals = Schedule::new(&config, started);
    let mut rng = fastrand::Rng::with_seed(config.seed);
    let mut bots = JoinSet::new();
    let mut tally = Tally::default();
    let mut players: u64 = 0;
    let mut parties: u64 = 0;
    let mut next = arrivals.next();
    while let Some((at, size)) = next {
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {
                let party = (size > 1).then(|| {
                    parties += 1;
                    (parties, size)
                });
                for _ in 0..size {
                    let plan = BotPlan {
                        name: format!("{}-{players}", config.name_prefix),
                        party,
                        skill: config::normal(&mut rng, config.skill.mean, config.skill.spread)
                            .clamp(-1e9, 1e9),
                        seed: splitmix(config.seed.wrapping_add(players)),
                    };
                    players += 1;
                    progress.arrived();
                    let span = tracing::debug_span!("bot", player = %plan.name);
                    bots.spawn(bot::run_bot(shared.clone(), plan).instrument(span));
                }
                next = arrivals.next();
            }
            Some(done) = bots.join_next() => collect(&mut tally, done),
        }
    }
    // Every bot stops by `hard_end` on its own; the grace covers a bot stuck in a close.
    loop {
        match tokio::time::timeout_at(hard_end + ABORT_GRACE, bots.join_next()).await {
            Ok(Some(done)) => collect(&mut tally, done),
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(left = bots.len(), "aborting bots that did not stop in time");
                for _ in 0..bots.len() {
                    tally.fail("aborted");
                }
                bots.shutdown().await;
                break;
            }
        }
    }
    drop(shared);
    let _ = tokio::time::timeout(CLOSE_WAIT, all_closed.recv()).await;
    Ok(Report::assemble(config, players, started.elapsed(), tally))
}

fn collect(tally: &mut Tally, done: Result<Tally, tokio::task::JoinError>) {
    match done {
        Ok(t) => tally.merge(t),
        Err(e) => {
            tracing::error!(error = %e, "a bot panicked");
            tally.fail("bot_panicked");
        }
    }
}

/// When parties arrive, and their sizes. It draws from its own random stream, so a seed's
/// arrivals do not depend on anything else drawn.
struct Schedule {
    rng: fastrand::Rng,
    next: NextArrival,
}

enum NextArrival {
    /// Precomputed (time, size), in order.
    Fixed(std::collections::VecDeque<(Instant, u32)>),
    /// A Poisson process of parties until `end`: exponential gaps at `parties_per_s`.
    Rate {
        at: Instant,
        parties_per_s: f64,
        end: Instant,
        parties: Vec<Weighted<u32>>,
    },
}

impl Schedule {
    fn new(config: &SwarmConfig, start: Instant) -> Schedule {
        let mut rng = fastrand::Rng::with_seed(splitmix(config.seed ^ 0xa11));
        let next = match &config.arrivals {
            Arrivals::Fixed { players, ramp } => {
                let mut out = std::collections::VecDeque::new();
                let mut placed = 0u32;
                while placed < *players {
                    let size = (*config::pick(&config.parties, &mut rng)).min(players - placed);
                    let at = start + ramp.mul_f64(f64::from(placed) / f64::from(*players));
                    out.push_back((at, size));
                    placed += size;
                }
                NextArrival::Fixed(out)
            }
            Arrivals::Rate { per_s } => NextArrival::Rate {
                at: start,
                parties_per_s: per_s / config.mean_party_size(),
                end: start + config.duration,
                parties: config.parties.clone(),
            },
        };
        Schedule { rng, next }
    }

    fn next(&mut self) -> Option<(Instant, u32)> {
        match &mut self.next {
            NextArrival::Fixed(q) => q.pop_front(),
            NextArrival::Rate {
                at,
                parties_per_s,
                end,
                parties,
            } => {
                let gap = -(1.0 - self.rng.f64()).ln() / *parties_per_s;
                *at += Duration::from_secs_f64(gap.min(1e6));
                (*at < *end).then(|| (*at, *config::pick(parties, &mut self.rng)))
            }
        }
    }
}

/// A well-mixed 64-bit value from `x` (per-bot seeds from the run's seed).
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_arrivals_form_parties_that_add_up() {
        let config = SwarmConfig {
            arrivals: Arrivals::Fixed {
                players: 10,
                ramp: Duration::from_secs(10),
            },
            parties: vec![Weighted::new(3, 1.0)],
            ..SwarmConfig::default()
        };
        let start = Instant::now();
        let mut s = Schedule::new(&config, start);
        let mut got = Vec::new();
        while let Some((at, size)) = s.next() {
            got.push(((at - start).as_secs(), size));
        }
        assert_eq!(got, vec![(0, 3), (3, 3), (6, 3), (9, 1)]);
    }

    #[test]
    fn rate_arrivals_average_the_rate_over_the_duration() {
        let config = SwarmConfig {
            arrivals: Arrivals::Rate { per_s: 20.0 },
            duration: Duration::from_secs(100),
            parties: vec![Weighted::new(1, 1.0), Weighted::new(3, 1.0)],
            ..SwarmConfig::default()
        };
        let start = Instant::now();
        let mut s = Schedule::new(&config, start);
        let (mut players, mut last) = (0u32, start);
        while let Some((at, size)) = s.next() {
            assert!(at >= last && at < start + config.duration);
            last = at;
            players += size;
        }
        assert!(
            (1800..2200).contains(&players),
            "{players} players, expected ≈ 2000"
        );
        // Short runs too, over many seeds: 4 per second for 4 s is 16 on average.
        let total: usize = (1..=200)
            .map(|seed| {
                let config = SwarmConfig {
                    arrivals: Arrivals::Rate { per_s: 4.0 },
                    duration: Duration::from_secs(4),
                    seed,
                    ..SwarmConfig::default()
                };
                let mut s = Schedule::new(&config, start);
                std::iter::from_fn(|| s.next()).count()
            })
            .sum();
        let mean = total as f64 / 200.0;
        assert!((15.0..17.0).contains(&mean), "mean {mean}, expected ≈ 16");
    }

    #[tokio::test]
    async fn an_invalid_config_is_refused_before_anything_runs() {
        let config = SwarmConfig {
            arrivals: Arrivals::Rate { per_s: -1.0 },
            ..SwarmConfig::default()
        };
        let e = run(config, None).await.expect_err("invalid");
        assert!(matches!(e, ConfigError::Players(_)));
    }

    #[tokio::test]
    async fn a_server_that_is_not_there_fails_every_bot_once_its_retries_are_spent() {
        // A port nothing listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let config = SwarmConfig {
            server: format!("http://127.0.0.1:{port}"),
            arrivals: Arrivals::Fixed {
                players: 3,
                ramp: Duration::ZERO,
            },
            duration: Duration::from_secs(40),
            drain: Duration::from_secs(2),
            ..SwarmConfig::default()
        };
        let progress = Progress::new();
        // A replica may be restarting: each bot retries (~16 s of backoff), then gives up,
        // long before the run's end.
        let t = std::time::Instant::now();
        let report = run(config, Some(progress.clone())).await.expect("runs");
        assert!(t.elapsed() < Duration::from_secs(35), "{:?}", t.elapsed());
        assert_eq!(report.players, 3);
        assert_eq!(report.failed, 3);
        assert_eq!(report.failures["dev_token:unreachable"], 3);
        let p = progress.snapshot();
        assert_eq!(
            (p.arrived, p.failed, p.done, p.queued, p.playing),
            (3, 3, 3, 0, 0)
        );
    }
}
