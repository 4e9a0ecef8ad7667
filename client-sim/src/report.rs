//! What a run measured: counts, failures by stable code, and latency percentiles from HDR
//! histograms. The raw histograms stay in the [`Report`] (not in its JSON) so a bench can merge
//! runs or export them.

use crate::config::SwarmConfig;
use berth_protocol::SessionId;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

/// Histograms record microseconds from 1 µs to an hour, to 3 significant digits.
const HIGHEST_US: u64 = 3_600_000_000;

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("constant, valid bounds")
}

/// The latencies a run measures, one histogram each (microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// `queue` sent → `matched` received.
    TimeToMatch,
    /// `queue` sent → the game's first `state`.
    TimeToPlay,
    /// `matched` → the game's first `state` (gateway, join, game hello and welcome).
    TimeToFirstState,
    /// The game's first `state` → its end (`ended` or `session_ended`, whichever came first).
    Session,
    /// Game `ping` → `pong` through the gateway, once per second per bot.
    GameRtt,
}

impl Metric {
    pub const ALL: [Metric; 5] = [
        Metric::TimeToMatch,
        Metric::TimeToPlay,
        Metric::TimeToFirstState,
        Metric::Session,
        Metric::GameRtt,
    ];

    /// The name in the report (`latency.<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Metric::TimeToMatch => "time_to_match_ms",
            Metric::TimeToPlay => "time_to_play_ms",
            Metric::TimeToFirstState => "time_to_first_state_ms",
            Metric::Session => "session_ms",
            Metric::GameRtt => "game_rtt_ms",
        }
    }
}

/// The raw histograms of a run, in microseconds.
#[derive(Debug, Clone)]
pub struct Histograms {
    pub time_to_match: Histogram<u64>,
    pub time_to_play: Histogram<u64>,
    pub time_to_first_state: Histogram<u64>,
    pub session: Histogram<u64>,
    pub game_rtt: Histogram<u64>,
}

impl Default for Histograms {
    fn default() -> Self {
        Self {
            time_to_match: new_histogram(),
            time_to_play: new_histogram(),
            time_to_first_state: new_histogram(),
            session: new_histogram(),
            game_rtt: new_histogram(),
        }
    }
}

impl Histograms {
    pub fn get(&self, m: Metric) -> &Histogram<u64> {
        match m {
            Metric::TimeToMatch => &self.time_to_match,
            Metric::TimeToPlay => &self.time_to_play,
            Metric::TimeToFirstState => &self.time_to_first_state,
            Metric::Session => &self.session,
            Metric::GameRtt => &self.game_rtt,
        }
    }

    fn get_mut(&mut self, m: Metric) -> &mut Histogram<u64> {
        match m {
            Metric::TimeToMatch => &mut self.time_to_match,
            Metric::TimeToPlay => &mut self.time_to_play,
            Metric::TimeToFirstState => &mut self.time_to_first_state,
            Metric::Session => &mut self.session,
            Metric::GameRtt => &mut self.game_rtt,
        }
    }

    /// Records one sample (clamped to the histogram's 1 µs .. 1 h).
    pub fn record(&mut self, m: Metric, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, HIGHEST_US);
        self.get_mut(m).saturating_record(us);
    }

    pub fn merge(&mut self, other: &Histograms) {
        for m in Metric::ALL {
            self.get_mut(m)
                .add(other.get(m))
                .expect("histograms with the same bounds merge");
        }
    }
}

/// Percentiles of one latency, in milliseconds (3 decimals); all zero when `count` is 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self {
                count: 0,
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                max: 0.0,
            };
        }
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

/// The latency section of the report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    pub time_to_match_ms: Percentiles,
    pub time_to_play_ms: Percentiles,
    pub time_to_first_state_ms: Percentiles,
    pub session_ms: Percentiles,
    pub game_rtt_ms: Percentiles,
}

impl Latency {
    pub fn from_histograms(h: &Histograms) -> Self {
        let p = |m| Percentiles::from_histogram(h.get(m));
        Self {
            time_to_match_ms: p(Metric::TimeToMatch),
            time_to_play_ms: p(Metric::TimeToPlay),
            time_to_first_state_ms: p(Metric::TimeToFirstState),
            session_ms: p(Metric::Session),
            game_rtt_ms: p(Metric::GameRtt),
        }
    }

    pub fn get(&self, m: Metric) -> &Percentiles {
        match m {
            Metric::TimeToMatch => &self.time_to_match_ms,
            Metric::TimeToPlay => &self.time_to_play_ms,
            Metric::TimeToFirstState => &self.time_to_first_state_ms,
            Metric::Session => &self.session_ms,
            Metric::GameRtt => &self.game_rtt_ms,
        }
    }
}

/// Match attempts and how far they got. One attempt is one `queue`; `failed` and `cancelled`
/// and `finished` never overlap, and with `drain_timeout` counted as a failure they add up to
/// `attempted`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MatchCounts {
    /// `queue` sent.
    pub attempted: u64,
    /// `matched` received.
    pub matched: u64,
    /// The game's first `state` received.
    pub played: u64,
    /// Results held (from the game's `ended` or the server's `session_ended`).
    pub finished: u64,
    /// Still queued when `duration` ended, and cancelled.
    pub cancelled: u64,
    /// Both the game and the server gave results and they were compared (winner, scores).
    pub results_compared: u64,
}

/// Faults injected (each at most once per match).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FaultCounts {
    pub drop_game: u64,
    pub background: u64,
    /// Backgrounds after which the sockets were found dead.
    pub background_killed: u64,
    pub slow_link: u64,
}

/// Sockets opened again after a loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Reconnects {
    /// `/v1/play` reopened (after a drop, a background, or for a fresh ticket).
    pub play: u64,
    /// Game socket reopened within one match.
    pub game: u64,
    /// Game `welcome`s with `rejoined: true`.
    pub rejoined: u64,
    /// Game sockets closed `session_moved`: the match moved to another host and was rejoined
    /// there.
    pub moved: u64,
}

impl MatchCounts {
    fn add(&mut self, o: &MatchCounts) {
        self.attempted += o.attempted;
        self.matched += o.matched;
        self.played += o.played;
        self.finished += o.finished;
        self.cancelled += o.cancelled;
        self.results_compared += o.results_compared;
    }
}

impl FaultCounts {
    fn add(&mut self, o: &FaultCounts) {
        self.drop_game += o.drop_game;
        self.background += o.background;
        self.background_killed += o.background_killed;
        self.slow_link += o.slow_link;
    }
}

impl Reconnects {
    fn add(&mut self, o: &Reconnects) {
        self.play += o.play;
        self.game += o.game;
        self.rejoined += o.rejoined;
        self.moved += o.moved;
    }
}

/// What one bot (or a whole run) counted; merged into a [`Report`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Tally {
    pub matches: MatchCounts,
    pub failures: BTreeMap<String, u64>,
    pub end_reasons: BTreeMap<String, u64>,
    pub faults: FaultCounts,
    pub reconnects: Reconnects,
    pub sessions: BTreeSet<SessionId>,
    /// Matches by the region `matched` named.
    pub regions: BTreeMap<String, u64>,
    pub histograms: Histograms,
}

impl Tally {
    pub fn fail(&mut self, code: &str) {
        *self.failures.entry(code.to_owned()).or_default() += 1;
    }

    pub fn merge(&mut self, o: Tally) {
        self.matches.add(&o.matches);
        add_counts(&mut self.failures, &o.failures);
        add_counts(&mut self.end_reasons, &o.end_reasons);
        add_counts(&mut self.regions, &o.regions);
        self.faults.add(&o.faults);
        self.reconnects.add(&o.reconnects);
        self.sessions.extend(o.sessions);
        self.histograms.merge(&o.histograms);
    }
}

fn add_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// The result of a run. Serialises to the JSON `--json` writes; `histograms` and
/// `session_ids` stay out of the JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Wall time of the run.
    pub elapsed_ms: u64,
    /// Players that arrived (each a bot with its own name and token).
    pub players: u64,
    /// Distinct session ids seen in `matched`.
    pub sessions: u64,
    pub matches: MatchCounts,
    /// Match attempts that failed; `failures` splits them by code.
    pub failed: u64,
    /// Failure code → count. Codes are stable: see [`crate::Failure::code`].
    pub failures: BTreeMap<String, u64>,
    /// How finished matches ended (the game's `ended.reason`, else the server's).
    pub end_reasons: BTreeMap<String, u64>,
    /// Matches by the region they were played in (as `matched` said; per player).
    pub regions: BTreeMap<String, u64>,
    pub faults: FaultCounts,
    pub reconnects: Reconnects,
    pub latency: Latency,
    /// The configuration this run used.
    pub config: SwarmConfig,
    #[serde(skip)]
    pub histograms: Histograms,
    #[serde(skip)]
    pub session_ids: BTreeSet<SessionId>,
}

impl Report {
    pub(crate) fn assemble(
        config: SwarmConfig,
        players: u64,
        elapsed: Duration,
        t: Tally,
    ) -> Report {
        Report {
            elapsed_ms: elapsed.as_millis() as u64,
            players,
            sessions: t.sessions.len() as u64,
            matches: t.matches,
            failed: t.failures.values().sum(),
            failures: t.failures,
            end_reasons: t.end_reasons,
            regions: t.regions,
            faults: t.faults,
            reconnects: t.reconnects,
            latency: Latency::from_histograms(&t.histograms),
            config,
            histograms: t.histograms,
            session_ids: t.sessions,
        }
    }

    /// Adds another run's counts and samples to this one (percentiles are recomputed from the
    /// merged histograms; `config` and `elapsed_ms` stay this run's, `elapsed_ms` the longer).
    pub fn merge(&mut self, o: &Report) {
        self.elapsed_ms = self.elapsed_ms.max(o.elapsed_ms);
        self.players += o.players;
        self.matches.add(&o.matches);
        add_counts(&mut self.failures, &o.failures);
        self.failed = self.failures.values().sum();
        add_counts(&mut self.end_reasons, &o.end_reasons);
        add_counts(&mut self.regions, &o.regions);
        self.faults.add(&o.faults);
        self.reconnects.add(&o.reconnects);
        self.session_ids.extend(o.session_ids.iter().cloned());
        self.sessions = self.session_ids.len() as u64;
        self.histograms.merge(&o.histograms);
        self.latency = Latency::from_histograms(&self.histograms);
    }

    /// A table for people (what the binary prints).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let m = &self.matches;
        let _ = writeln!(
            s,
            "berth-sim: {} players, {} sessions, {:.1} s",
            self.players,
            self.sessions,
            self.elapsed_ms as f64 / 1000.0
        );
        let _ = writeln!(
            s,
            "matches: {} attempted, {} matched, {} played, {} finished, {} failed, {} cancelled",
            m.attempted, m.matched, m.played, m.finished, self.failed, m.cancelled
        );
        if !self.end_reasons.is_empty() {
            let _ = writeln!(s, "ended:    {}", join_counts(&self.end_reasons));
        }
        if !self.failures.is_empty() {
            let _ = writeln!(s, "failures: {}", join_counts(&self.failures));
        }
        let f = &self.faults;
        if f.drop_game + f.background + f.slow_link > 0 {
            let _ = writeln!(
                s,
                "faults:   drop_game {}, background {} ({} killed), slow_link {}",
                f.drop_game, f.background, f.background_killed, f.slow_link
            );
        }
        let r = &self.reconnects;
        if r.play + r.game > 0 {
            let _ = writeln!(
                s,
                "reconnects: play {}, game {} ({} rejoined)",
                r.play, r.game, r.rejoined
            );
        }
        let _ = writeln!(
            s,
            "\n{:<24} {:>8} {:>10} {:>10} {:>10} {:>10}",
            "latency (ms)", "count", "p50", "p90", "p99", "max"
        );
        for metric in Metric::ALL {
            let p = self.latency.get(metric);
            if p.count == 0 {
                let _ = writeln!(s, "{:<24} {:>8} {:>10}", metric.name(), 0, "-");
                continue;
            }
            let _ = writeln!(
                s,
                "{:<24} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                metric.name(),
                p.count,
                p.p50,
                p.p90,
                p.p99,
                p.max
            );
        }
        s
    }
}

fn join_counts(m: &BTreeMap<String, u64>) -> String {
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_tally() -> Tally {
        let mut t = Tally::default();
        for ms in 1..=100 {
            t.histograms
                .record(Metric::TimeToMatch, Duration::from_millis(ms));
        }
        t.histograms
            .record(Metric::GameRtt, Duration::from_micros(850));
        t.matches.attempted = 4;
        t.matches.finished = 2;
        t.fail("placement_failed");
        t.fail("placement_failed");
        t.end_reasons.insert("score_limit".into(), 2);
        t.sessions.insert(SessionId::new("s-1").expect("id"));
        t
    }

    #[test]
    fn percentiles_come_from_the_histograms() {
        let r = Report::assemble(
            SwarmConfig::default(),
            4,
            Duration::from_secs(3),
            sample_tally(),
        );
        let p = r.latency.time_to_match_ms;
        assert_eq!(p.count, 100);
        assert!((p.p50 - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p90 - 90.0).abs() < 0.1, "{p:?}");
        assert!((p.p99 - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max - 100.0).abs() < 0.1, "{p:?}");
        assert_eq!(r.latency.game_rtt_ms.count, 1);
        assert!((r.latency.game_rtt_ms.p50 - 0.85).abs() < 0.002);
        assert_eq!(r.latency.session_ms.count, 0);
        assert_eq!(r.latency.session_ms.max, 0.0);
        assert_eq!(r.failed, 2);
        assert_eq!(r.sessions, 1);
    }

    #[test]
    fn merging_adds_counts_and_samples() {
        let mut a = Report::assemble(
            SwarmConfig::default(),
            4,
            Duration::from_secs(3),
            sample_tally(),
        );
        let mut t = sample_tally();
        t.sessions.insert(SessionId::new("s-2").expect("id"));
        t.fail("queue_timeout");
        let b = Report::assemble(SwarmConfig::default(), 2, Duration::from_secs(5), t);
        a.merge(&b);
        assert_eq!(a.players, 6);
        assert_eq!(a.sessions, 2, "s-1 is counted once");
        assert_eq!(a.failed, 5);
        assert_eq!(a.failures["placement_failed"], 4);
        assert_eq!(a.latency.time_to_match_ms.count, 200);
        assert_eq!(a.elapsed_ms, 5000);
        assert_eq!(a.end_reasons["score_limit"], 4);
    }

    #[test]
    fn the_json_has_the_documented_shape() {
        let r = Report::assemble(
            SwarmConfig::default(),
            4,
            Duration::from_secs(3),
            sample_tally(),
        );
        let v = serde_json::to_value(&r).expect("serialise");
        for key in [
            "elapsed_ms",
            "players",
            "sessions",
            "matches",
            "failed",
            "failures",
            "end_reasons",
            "faults",
            "reconnects",
            "latency",
            "config",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        assert!(v.get("histograms").is_none());
        assert_eq!(v["failures"]["placement_failed"], 2);
        assert_eq!(v["matches"]["attempted"], 4);
        for m in Metric::ALL {
            let p = &v["latency"][m.name()];
            for k in ["count", "p50", "p90", "p99", "max"] {
                assert!(p[k].is_number(), "{} lacks {k}: {p}", m.name());
            }
        }
        assert_eq!(v["config"]["duration"], 60_000);
        assert_eq!(v["config"]["arrivals"]["fixed"]["players"], 2);
        assert_eq!(
            v["config"]["faults"]["slow_delay"],
            serde_json::json!([50, 300])
        );
        let table = r.table();
        assert!(table.contains("time_to_match_ms"), "{table}");
        assert!(table.contains("placement_failed 2"), "{table}");
    }
}
