//! `berth-sim`: the command line around [`berth_sim::run`]: flags, a live progress bar, the
//! report table, `--json` and `--plot`. Bad flags exit with code 2.

use anyhow::Context;
use berth_sim::config::{parse_duration, parse_duration_range, parse_weighted};
use berth_sim::{Arrivals, DurationRange, Faults, Matches, Progress, SkillSpread, SwarmConfig};
use clap::Parser;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

/// Swarms of simulated mobile players against a Berth server (dev tokens must be on).
#[derive(Debug, Parser)]
#[command(name = "berth-sim", version)]
struct Args {
    /// The matchmaking server's base URL, or several replicas' comma-separated (each player
    /// starts on one and fails over to the next).
    #[arg(
        long,
        env = "BERTH_SIM_SERVER",
        default_value = "http://127.0.0.1:7080"
    )]
    server: String,
    /// A CA certificate (PEM) to trust besides Mozilla's roots, for an https:// server (and
    /// wss:// gateways) with certificates of a private CA.
    #[arg(long, env = "BERTH_SIM_CA")]
    ca: Option<PathBuf>,
    /// A fixed number of players (the default is 2 when --rate is not given).
    #[arg(long, conflicts_with = "rate")]
    players: Option<u32>,
    /// Spread the fixed players' arrivals over this long (e.g. 10s).
    #[arg(long, value_parser = parse_duration, default_value = "0s", requires = "players")]
    ramp: Duration,
    /// Players arriving per second (at random) for the whole --duration, instead of --players.
    #[arg(long, allow_negative_numbers = true)]
    rate: Option<f64>,
    /// How long players arrive and start matches; then queues are cancelled and running
    /// matches get --drain to finish.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    duration: Duration,
    /// How long running matches may take after --duration before the run is cut off.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    drain: Duration,
    /// Game modes with weights: `sprint`, or `sprint:3,arena:1`.
    #[arg(long, default_value = "sprint")]
    mode: String,
    /// The region to queue in, or `*` to time each region's gateway probes and queue with
    /// the latencies (the match is played in the region best for its players).
    #[arg(long, default_value = "local")]
    region: String,
    /// Party sizes with weights: `1`, or `1:3,2:1` (members queue with the same party id).
    #[arg(long, default_value = "1")]
    party: String,
    /// Mean skill rating.
    #[arg(long, default_value_t = 1000.0, allow_negative_numbers = true)]
    skill: f64,
    /// Standard deviation of the skill ratings.
    #[arg(long, default_value_t = 100.0, allow_negative_numbers = true)]
    skill_spread: f64,
    /// Pause between matches: `2s` or `500ms..3s`.
    #[arg(long, value_parser = parse_duration_range, default_value = "500ms..2s")]
    think: DurationRange,
    /// Matches per player: a number, or `loop` to play until --duration ends.
    #[arg(long, default_value = "1")]
    matches: String,
    /// A fault and its probability per match, repeatable: drop_game=0.1, background=0.05,
    /// slow_link=0.2.
    #[arg(long = "fault", value_name = "NAME=P")]
    faults: Vec<String>,
    /// How long the app stays in the background (background fault).
    #[arg(long, value_parser = parse_duration_range, default_value = "2s..6s")]
    background_for: DurationRange,
    /// Chance that the OS killed the sockets while in the background.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    background_kill: f64,
    /// Delay added to each message on a slow link.
    #[arg(long, value_parser = parse_duration_range, default_value = "50ms..300ms")]
    slow_delay: DurationRange,
    /// Pause before reconnecting a dropped game socket.
    #[arg(long, value_parser = parse_duration_range, default_value = "200ms..1s")]
    drop_pause: DurationRange,
    /// Player names are PREFIX-N: give concurrent swarms different prefixes.
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Seeds every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Give up on a queue after this long.
    #[arg(long, value_parser = parse_duration, default_value = "90s")]
    queue_timeout: Duration,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a PNG chart of the latency percentiles to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Turns the flags into a config; every error names its flag.
fn config(a: &Args) -> Result<SwarmConfig, String> {
    let arrivals = match (a.players, a.rate) {
        (_, Some(per_s)) => Arrivals::Rate { per_s },
        (players, None) => Arrivals::Fixed {
            players: players.unwrap_or(2),
            ramp: a.ramp,
        },
    };
    let modes =
        parse_weighted(&a.mode, |s| Ok(s.to_owned())).map_err(|e| format!("--mode: {e}"))?;
    let parties = parse_weighted(&a.party, |s| {
        s.parse::<u32>()
            .map_err(|_| format!("{s:?} is not a party size"))
    })
    .map_err(|e| format!("--party: {e}"))?;
    let matches = match a.matches.as_str() {
        "loop" => Matches::UntilEnd,
        n => Matches::Count(
            n.parse()
                .map_err(|_| format!("--matches: {n:?} is not a number or `loop`"))?,
        ),
    };
    let mut faults = Faults {
        background_for: a.background_for,
        background_kill: a.background_kill,
        slow_delay: a.slow_delay,
        drop_pause: a.drop_pause,
        ..Faults::default()
    };
    for f in &a.faults {
        let (name, p) = f
            .split_once('=')
            .ok_or_else(|| format!("--fault: {f:?} is not NAME=P (e.g. slow_link=0.2)"))?;
        let p: f64 = p
            .parse()
            .map_err(|_| format!("--fault: {p:?} in {f:?} is not a probability"))?;
        faults
            .set(name.trim(), p)
            .map_err(|e| format!("--fault: {e}"))?;
    }
    Ok(SwarmConfig {
        server: a.server.clone(),
        ca: a.ca.clone(),
        arrivals,
        duration: a.duration,
        drain: a.drain,
        modes,
        region: a.region.clone(),
        parties,
        skill: SkillSpread {
            mean: a.skill,
            spread: a.skill_spread,
        },
        think: a.think,
        matches,
        faults,
        name_prefix: a.prefix.clone(),
        seed: a.seed,
        queue_timeout: a.queue_timeout,
    })
}

/// Prints to stdout; a closed stdout (`| head`) is not worth a panic: the files still get
/// written.
fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// A bad command line: print it like clap does and exit 2.
fn usage_error(msg: impl std::fmt::Display) -> ! {
    eprintln!("error: {msg}\n\nFor more information, try '--help'.");
    std::process::exit(2)
}

/// A progress bar on stderr and the task that updates it from `progress` five times a second.
fn progress_bar(
    config: &SwarmConfig,
    progress: Progress,
) -> (indicatif::ProgressBar, tokio::task::JoinHandle<()>) {
    use indicatif::{ProgressBar, ProgressStyle};
    // Matches to play when that is known; else the run's duration in seconds.
    let (len, by_matches) = match (&config.arrivals, config.matches) {
        (Arrivals::Fixed { players, .. }, Matches::Count(n)) => {
            (u64::from(*players) * u64::from(n), true)
        }
        _ => (config.duration.as_secs().max(1), false),
    };
    let bar = ProgressBar::new(len);
    let template = if by_matches {
        "{elapsed_precise} [{bar:30}] {pos}/{len} matches  {msg}"
    } else {
        "{elapsed_precise} [{bar:30}] {pos}/{len} s  {msg}"
    };
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let start = std::time::Instant::now();
    let shown = bar.clone();
    let ticker = tokio::spawn(async move {
        loop {
            let p = progress.snapshot();
            bar.set_position(if by_matches {
                p.finished + p.failed + p.cancelled
            } else {
                start.elapsed().as_secs().min(len)
            });
            bar.set_message(format!(
                "players {}  queued {}  playing {}  finished {}  failed {}",
                p.arrived, p.queued, p.playing, p.finished, p.failed
            ));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    (shown, ticker)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = config(&args).unwrap_or_else(|e| usage_error(e));
    if let Err(e) = config.validate() {
        usage_error(e);
    }
    let progress = Progress::new();
    let show = !args.quiet && std::io::stderr().is_terminal();
    let bar = show.then(|| progress_bar(&config, progress.clone()));
    let report = berth_sim::run(config, Some(progress))
        .await
        .unwrap_or_else(|e| usage_error(e));
    if let Some((bar, ticker)) = bar {
        ticker.abort();
        let _ = ticker.await;
        bar.finish_and_clear();
    }
    say(&report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        say(&format!("wrote {}\n", path.display()));
    }
    if let Some(path) = &args.plot {
        berth_sim::write_png(&report, path)
            .with_context(|| format!("writing {}", path.display()))?;
        say(&format!("wrote {}\n", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<SwarmConfig, String> {
        let a = Args::try_parse_from(std::iter::once("berth-sim").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let c = config(&a)?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn flags_become_a_config() {
        let c = parse(&[
            "--rate",
            "5",
            "--duration",
            "2m",
            "--mode",
            "sprint:3,arena",
            "--party",
            "1:2,2:1",
            "--fault",
            "slow_link=0.2",
            "--fault",
            "drop_game=0.1",
            "--matches",
            "loop",
            "--think",
            "1s..3s",
        ])
        .expect("valid");
        assert_eq!(c.arrivals, Arrivals::Rate { per_s: 5.0 });
        assert_eq!(c.duration, Duration::from_secs(120));
        assert_eq!(c.modes.len(), 2);
        assert_eq!(c.parties[1].value, 2);
        assert_eq!(c.faults.slow_link, 0.2);
        assert_eq!(c.faults.drop_game, 0.1);
        assert_eq!(c.matches, Matches::UntilEnd);
        assert_eq!(c.think.max, Duration::from_secs(3));
        let c = parse(&["--players", "4"]).expect("valid");
        assert!(matches!(c.arrivals, Arrivals::Fixed { players: 4, .. }));
    }

    #[test]
    fn bad_flags_are_refused_with_the_flag_named() {
        for (args, needle) in [
            (&["--players", "0"][..], "players"),
            (&["--rate", "-3"][..], "players"),
            (&["--fault", "meteor=0.1"][..], "meteor"),
            (&["--fault", "slow_link"][..], "NAME=P"),
            (&["--server", "not a url"][..], "server"),
            (&["--matches", "many"][..], "--matches"),
            (&["--duration", "soon"][..], "duration"),
            (
                &["--players", "2", "--rate", "1"][..],
                "cannot be used with",
            ),
        ] {
            let e = parse(args).expect_err("must be refused");
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }
}
