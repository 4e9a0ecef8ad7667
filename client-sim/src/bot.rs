//! One simulated player: gets a dev token, keeps `/v1/play` open, and for each match queues,
//! waits for `matched`, joins the game through the host gateway, plays (the arena: inputs at
//! the game's tick rate; Reflex: a tap a reaction time after each `go`, see `bot/reflex.rs`;
//! a `ping` every second) until it holds results, then thinks and goes again.
//! Mobile faults are injected here: a dropped game socket, the app going to the background,
//! a slow link. Everything a bot measures goes into its own [`Tally`].
//!
//! The bot owns its sockets; one `select!` loop per match reads both and fires timers, so
//! there is no shared state between a bot's parts. A match's one-shot deadlines (reconnects,
//! faults, waits for results or a ticket) live in one table, `timers::Timers`, keyed by
//! `timers::Timer`; the loop sleeps until the earliest and then fires those due.

use crate::config::{pick, Matches, SwarmConfig};
use crate::progress::{Progress, Stage};
use crate::report::{Metric, Tally};
use crate::steer::{self, Grid};
use berth_client::socket::{Closed, ConnectOptions, Faults, Incoming};
use berth_client::{GameClient, PlayClient, PlayConfig};
use berth_protocol::game::{GameAnswer, GameRequest, GameResults, PlayerView};
use berth_protocol::play::{ClientMessage, PartySpec, ServerMessage, BY_LATENCY};
use berth_protocol::SessionId;
use std::sync::Arc;
use std::time::Duration;
use timers::{Timer, Timers};
use tokio::sync::mpsc;
use tokio::time::Instant;

mod reflex;
mod timers;

/// After one side (game or server) reported the end, how long to wait for the other.
const RESULTS_WAIT: Duration = Duration::from_secs(5);
/// The gateway's error when hostd stops (not in `berth_protocol::game::code`).
const SHUTTING_DOWN: &str = "shutting_down";
/// A match is given up this long after the server's session deadline.
const DEADLINE_SLACK: Duration = Duration::from_secs(15);
/// Attempts at (re)opening the game socket within one match before giving up.
const MAX_GAME_ATTEMPTS: u32 = 6;
/// Attempts at (re)opening `/v1/play` in a row before giving up.
const MAX_PLAY_ATTEMPTS: u32 = 8;
/// How long a Reflex match lasts, about (for placing faults within it).
const REFLEX_MATCH: Duration = Duration::from_secs(12);
/// How long `in_session` and other transient queue refusals are retried.
const REQUEUE_FOR: Duration = Duration::from_secs(20);
/// Game pings are sent this often.
const GAME_PING_EVERY: Duration = Duration::from_secs(1);
/// How long to wait for a fresh ticket after the gateway said `ticket_expired`.
const TICKET_WAIT: Duration = Duration::from_secs(10);
/// The timers that run even while the app is in the background (they only give up or wait).
const ALWAYS_TIMERS: [Timer; 5] = [
    Timer::EndWait,
    Timer::Requeue,
    Timer::CancelUntil,
    Timer::AwaitingTicket,
    Timer::BackgroundUntil,
];
/// The timers that touch a socket, so they wait while the app is in the background.
const FOREGROUND_TIMERS: [Timer; 4] = [
    Timer::PlayReconnect,
    Timer::GameConnect,
    Timer::Drop,
    Timer::Background,
];

/// Why a match attempt failed. [`Failure::code`] is the stable label in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// `POST /v1/dev/token` failed: the error code the server gave, an HTTP status, or
    /// `unreachable`.
    DevToken(String),
    /// `/v1/play` could not be opened (after retries).
    PlayUnreachable(String),
    /// The server refused `hello` (a token error code).
    HelloRefused(String),
    /// The server refused `queue` with this error code.
    QueueRefused(String),
    /// Queueing by latency, the regions could not be measured (`GET /v1/regions` or every
    /// probe failed): `unreachable`, `http_<status>`, `bad_body` or `no_regions`.
    Regions(String),
    /// No `matched` within the configured queue timeout, or the server's `max_wait`.
    QueueTimeout,
    /// Dequeued for another reason (`away`, `mode_removed`, a `cancel` the bot did not send).
    Dequeued(String),
    /// `session_ended` with `placement_failed`: no host could run the match.
    PlacementFailed,
    /// The session ended with a reason that is not a game's end (`vm_failed`, `host_lost`, …).
    SessionEnded(String),
    /// The gateway could not be reached (after retries).
    GatewayUnreachable,
    /// The gateway or the game refused the `join` with this code.
    GatewayRefused(String),
    /// The game sent this error during the match.
    GameError(String),
    /// Another connection of this player took over (`replaced`).
    Replaced,
    /// A socket kept dropping and could not be reopened within the match.
    Disconnected,
    /// The match ended without results from either side.
    NoResults,
    /// The game's `ended` and the server's `session_ended` named different winners.
    ResultsMismatch,
    /// Still in the match well after the session's deadline.
    SessionTimeout,
    /// Cut off by the end of the run's drain time.
    DrainTimeout,
}

impl Failure {
    /// The stable code: `placement_failed`, `queue_timeout`, `gateway_refused:<code>`, …
    pub fn code(&self) -> String {
        match self {
            Failure::DevToken(c) => format!("dev_token:{}", label(c)),
            Failure::PlayUnreachable(c) => format!("play_unreachable:{}", label(c)),
            Failure::HelloRefused(c) => format!("hello_refused:{}", label(c)),
            Failure::QueueRefused(c) => format!("queue_refused:{}", label(c)),
            Failure::Regions(c) => format!("regions:{}", label(c)),
            Failure::QueueTimeout => "queue_timeout".into(),
            Failure::Dequeued(r) => format!("dequeued:{}", label(r)),
            Failure::PlacementFailed => "placement_failed".into(),
            Failure::SessionEnded(r) => format!("session_ended:{}", label(r)),
            Failure::GatewayUnreachable => "gateway_unreachable".into(),
            Failure::GatewayRefused(c) => format!("gateway_refused:{}", label(c)),
            Failure::GameError(c) => format!("game_error:{}", label(c)),
            Failure::Replaced => "replaced".into(),
            Failure::Disconnected => "disconnected".into(),
            Failure::NoResults => "no_results".into(),
            Failure::ResultsMismatch => "results_mismatch".into(),
            Failure::SessionTimeout => "session_timeout".into(),
            Failure::DrainTimeout => "drain_timeout".into(),
        }
    }

    /// Failures after which this bot stops: retrying would fail the same way. A replica that
    /// cannot be reached (or is stopping) is not one: the next attempt goes to another.
    fn is_fatal(&self) -> bool {
        match self {
            Failure::DevToken(c) => c != "unreachable" && !c.starts_with("http_5"),
            Failure::HelloRefused(_) | Failure::Replaced => true,
            _ => false,
        }
    }
}

/// A code from the wire, kept to a short label of `[a-z0-9_]` so reports stay tidy.
fn label(s: &str) -> String {
    let s: String = s
        .chars()
        .take(40)
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "unknown".into()
    } else {
        s
    }
}

/// Whether a `session_ended` reason is a game's end (anything not known to be bad: the game
/// may report its own reasons, and clients treat unknown ones like `game_over`).
pub(crate) fn is_good_end(reason: &str) -> bool {
    berth_protocol::EndReason::from(reason).is_the_games()
}

/// The winners the two sides named agree: true when the server's results carry no `winner`
/// field to compare (then nothing is compared).
pub(crate) fn winners_agree(game: &GameResults, server: &serde_json::Value) -> Option<bool> {
    let w = server.get("winner")?;
    Some(w.as_u64() == game.winner.map(u64::from) && (w.is_null() || w.is_u64()))
}

/// What every bot of a run shares.
pub(crate) struct Shared {
    pub config: SwarmConfig,
    /// Each replica's `/v1/play`, `/v1/dev/token` and `/v1/regions` (same order, never
    /// empty).
    pub play_urls: Vec<String>,
    pub token_urls: Vec<String>,
    pub regions_urls: Vec<String>,
    /// What the bots' sockets trust over `wss://` (the server's and the gateways').
    pub trust: berth_client::Trust,
    pub http: reqwest::Client,
    pub progress: Progress,
    /// Cloned into every socket's writer task; the run waits until all are dropped.
    pub alive: mpsc::Sender<()>,
    /// No match starts after this.
    pub end: Instant,
    /// Everything stops here.
    pub hard_end: Instant,
}

/// Who a bot is.
#[derive(Debug, Clone)]
pub(crate) struct BotPlan {
    pub name: String,
    /// The party (index, size) when it has more than one member.
    pub party: Option<(u64, u32)>,
    pub skill: f64,
    pub seed: u64,
}

/// `/v1/play`, open.
struct Play {
    link: PlayClient,
    ping_every: Duration,
    next_ping: Instant,
    nonce: u64,
}

/// The game socket of the current match.
struct Game {
    link: GameClient,
    me: String,
    grid: Option<Grid>,
    players: Vec<PlayerView>,
    welcomed: bool,
    seq: u32,
    heading: f32,
    input_every: Duration,
    next_input: Instant,
    next_ping: Instant,
    ping: Option<(u64, Instant)>,
    nonce: u64,
    /// Set when the game is Reflex (its `welcome` says so), not the arena.
    reflex: Option<reflex::Reflex>,
}

/// What `matched` said (the latest one: tickets are renewed).
struct Matched {
    session: SessionId,
    /// The region it is played in.
    region: String,
    endpoint: String,
    ticket: String,
    ticket_expires: Instant,
    deadline: Instant,
}

/// Everything about the match under way.
struct Match {
    t_queue: Instant,
    matched: Option<Matched>,
    t_matched: Option<Instant>,
    t_first_state: Option<Instant>,
    t_end: Option<Instant>,
    game: Option<Game>,
    /// The game said it is over (`ended`, or `game_over`): never reconnect.
    game_done: bool,
    game_results: Option<(String, GameResults)>,
    play_end: Option<(String, serde_json::Value)>,
    /// A refusal from the gateway to report if no results come.
    game_refusal: Option<String>,
    /// The endpoint the game socket last joined, and the one a `session_moved` left (the
    /// match goes on where the next `matched` says, not there).
    joined: Option<String>,
    moved_from: Option<String>,
    queue_msg: String,
    /// The server holds a ticket for this queue (`queue_status` or `already_queued` seen).
    queued: bool,
    /// The first transient refusal of `queue` (retried until `REQUEUE_FOR` after it).
    requeue_since: Option<Instant>,
    cancel_sent: bool,
    /// Every one-shot deadline of this match.
    timers: Timers,
    /// Failed or refused game connections since the last `welcome`.
    game_attempts: u32,
    /// Game sockets opened in this match (the second and later are reconnects).
    game_opens: u32,
    play_attempts: u32,
    plan_drop: bool,
    plan_background: bool,
}

/// How a match attempt ended.
enum Outcome {
    Finished(String),
    Failed(Failure),
    Cancelled,
}

enum Event {
    Play(Incoming),
    Game(Incoming),
    Tick,
}

pub(crate) struct Bot {
    shared: Arc<Shared>,
    plan: BotPlan,
    rng: fastrand::Rng,
    slow: Arc<Faults>,
    token: Option<String>,
    play: Option<Play>,
    /// The session of the last match, whose late messages are ignored.
    last_session: Option<SessionId>,
    stage: Stage,
    in_match: bool,
    tally: Tally,
    links_opened: u64,
    /// The replica this bot talks to; the next one after it proved unreachable.
    replica: usize,
}

/// Runs one bot to its end (bounded by the run's hard end) and returns what it counted.
pub(crate) async fn run_bot(shared: Arc<Shared>, plan: BotPlan) -> Tally {
    let hard_end = shared.hard_end;
    let mut bot = Bot {
        rng: fastrand::Rng::with_seed(plan.seed),
        shared,
        plan,
        slow: Arc::new(Faults::default()),
        token: None,
        play: None,
        last_session: None,
        stage: Stage::Idle,
        in_match: false,
        tally: Tally::default(),
        links_opened: 0,
        replica: 0,
    };
    // Players spread over the replicas.
    bot.replica = (bot.plan.seed % bot.shared.play_urls.len().max(1) as u64) as usize;
    if tokio::time::timeout_at(hard_end, bot.run()).await.is_err() && bot.in_match {
        bot.outcome(Outcome::Failed(Failure::DrainTimeout));
    }
    bot.set_stage(Stage::Idle);
    // Dropping the play link closes it politely.
    bot.play = None;
    bot.shared.progress.done();
    bot.tally
}

impl Bot {
    async fn run(&mut self) {
        let shared = self.shared.clone();
        let cfg = &shared.config;
        let mut k: u32 = 0;
        loop {
            if let Matches::Count(n) = cfg.matches {
                if k >= n {
                    return;
                }
            }
            if Instant::now() >= self.shared.end {
                return;
            }
            let outcome = self.play_match(k).await;
            k += 1;
            let pause = match &outcome {
                Outcome::Failed(f) if f.is_fatal() => {
                    self.outcome(outcome);
                    return;
                }
                // Never hammer a failing server: at least a second between attempts.
                Outcome::Failed(_) => cfg.think.draw(&mut self.rng).max(Duration::from_secs(1)),
                _ => cfg.think.draw(&mut self.rng),
            };
            self.outcome(outcome);
            let more = match cfg.matches {
                Matches::Count(n) => k < n,
                Matches::UntilEnd => true,
            };
            if more {
                self.idle_until((Instant::now() + pause).min(self.shared.end))
                    .await;
            }
        }
    }

    /// Books a match's end: counters, progress, stage.
    fn outcome(&mut self, o: Outcome) {
        self.in_match = false;
        self.set_stage(Stage::Idle);
        self.slow.set_delay(None);
        let p = &self.shared.progress;
        match o {
            Outcome::Finished(reason) => {
                self.tally.matches.finished += 1;
                *self.tally.end_reasons.entry(label(&reason)).or_default() += 1;
                p.outcome(true, false, false);
            }
            Outcome::Failed(f) => {
                tracing::debug!(player = %self.plan.name, code = %f.code(), "match failed");
                self.tally.fail(&f.code());
                p.outcome(false, true, false);
            }
            Outcome::Cancelled => {
                self.tally.matches.cancelled += 1;
                p.outcome(false, false, true);
            }
        }
    }

    fn set_stage(&mut self, s: Stage) {
        if self.stage != s {
            self.shared.progress.stage(self.stage, s);
            self.stage = s;
        }
    }

    /// Waits until `until` between matches, keeping `/v1/play` alive (pings) and drained.
    async fn idle_until(&mut self, until: Instant) {
        loop {
            let now = Instant::now();
            if now >= until {
                return;
            }
            self.play_ping(now).await;
            let wake = self.play.as_ref().map_or(until, |p| p.next_ping.min(until));
            let item = match self.play.as_mut() {
                Some(p) => tokio::select! {
                    item = p.link.next_item() => Some(item),
                    _ = tokio::time::sleep_until(wake) => None,
                },
                None => {
                    tokio::time::sleep_until(until).await;
                    None
                }
            };
            if let Some(Incoming::Closed(_)) = item {
                self.play = None;
            }
        }
    }

    /// This match's `queue`: in the configured region, or (region `*`) with the latencies
    /// measured to each region now.
    async fn queue_message(
        &mut self,
        mode: String,
        party: Option<PartySpec>,
    ) -> Result<ClientMessage, Failure> {
        let skill = Some(self.plan.skill);
        let region = &self.shared.config.region;
        if region != BY_LATENCY {
            return Ok(berth_client::play::queue(&mode, region, party, skill));
        }
        let token = self.dev_token().await?;
        let url = &self.shared.regions_urls[self.replica];
        let latencies = crate::latency::measure(&self.shared.http, url, &token)
            .await
            .map_err(Failure::Regions)?;
        Ok(berth_client::play::queue_by_latency(
            &mode, latencies, party, skill,
        ))
    }

    async fn dev_token(&mut self) -> Result<String, Failure> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        let resp = self
            .shared
            .http
            .post(&self.shared.token_urls[self.replica])
            .json(&serde_json::json!({ "player": self.plan.name }))
            .send()
            .await
            .map_err(|_| {
                self.fail_over();
                Failure::DevToken("unreachable".into())
            })?;
        let status = resp.status();
        let body: serde_json::Value = resp
            .json()
            .await
            .map_err(|_| Failure::DevToken(format!("http_{}", status.as_u16())))?;
        match body.get("token").and_then(|t| t.as_str()) {
            Some(t) if status.is_success() => {
                self.token = Some(t.to_owned());
                Ok(t.to_owned())
            }
            _ => Err(Failure::DevToken(
                body.get("code")
                    .and_then(|c| c.as_str())
                    .map_or_else(|| format!("http_{}", status.as_u16()), str::to_owned),
            )),
        }
    }

    /// This bot's socket options: its slow-link fault, a seed for the delays, the run's
    /// `alive` tracking.
    fn socket_options(&self, seed: u64) -> ConnectOptions {
        ConnectOptions {
            faults: Some(self.slow.clone()),
            seed,
            alive: Some(self.shared.alive.clone()),
            trust: self.shared.trust.clone(),
            ..ConnectOptions::default()
        }
    }

    fn seed(&mut self) -> u64 {
        self.links_opened += 1;
        self.plan.seed ^ self.links_opened.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Opens `/v1/play` and says hello; returns after `welcome`.
    async fn connect_play(&mut self) -> Result<(), Failure> {
        let token = self.dev_token().await?;
        let seed = self.seed();
        let mut config = PlayConfig::new(self.shared.play_urls[self.replica].clone(), token);
        config.socket = self.socket_options(seed);
        let link = PlayClient::connect(config).await.map_err(|e| match e {
            berth_client::ClientError::Refused { code, .. } => {
                Failure::HelloRefused(code.to_string())
            }
            berth_client::ClientError::Timeout(_) => Failure::PlayUnreachable("timeout".into()),
            berth_client::ClientError::Closed(_) | berth_client::ClientError::Gone => {
                Failure::PlayUnreachable("closed".into())
            }
            berth_client::ClientError::Http { status, .. } => {
                Failure::PlayUnreachable(format!("http_{status}"))
            }
            berth_client::ClientError::Connect(_) => Failure::PlayUnreachable("refused".into()),
            _ => Failure::PlayUnreachable("no_welcome".into()),
        });
        if let Err(Failure::PlayUnreachable(_)) = &link {
            self.fail_over();
        }
        let link = link?;
        let ping_ms = link
            .welcome
            .as_ref()
            .map_or(20_000, |w| w.ping_interval.as_millis() as u64);
        let ping_every = Duration::from_millis(ping_ms.clamp(1000, 20_000));
        self.play = Some(Play {
            link,
            ping_every,
            next_ping: Instant::now() + ping_every,
            nonce: 0,
        });
        Ok(())
    }

    /// The next connection goes to the next replica (if there are several).
    fn fail_over(&mut self) {
        let n = self.shared.play_urls.len().max(1);
        if n > 1 {
            self.replica = (self.replica + 1) % n;
            tracing::debug!(player = %self.plan.name, replica = self.replica, "failing over");
        }
    }

    /// Makes sure `/v1/play` is open, retrying with backoff.
    async fn ensure_play(&mut self) -> Result<(), Failure> {
        let mut attempt = 0;
        while self.play.is_none() {
            match self.connect_play().await {
                Ok(()) => return Ok(()),
                Err(f) if f.is_fatal() => return Err(f),
                Err(f) => {
                    attempt += 1;
                    if attempt >= MAX_PLAY_ATTEMPTS {
                        return Err(f);
                    }
                    tokio::time::sleep(backoff(attempt, &mut self.rng)).await;
                }
            }
        }
        Ok(())
    }

    async fn play_send(&mut self, m: &ClientMessage) {
        if let Some(p) = self.play.as_mut() {
            if p.link.send(m).await.is_err() {
                self.play = None;
            }
        }
    }

    async fn play_ping(&mut self, now: Instant) {
        let Some(p) = self.play.as_mut() else { return };
        if now < p.next_ping {
            return;
        }
        p.nonce += 1;
        p.next_ping = now + p.ping_every;
        let ping = ClientMessage::Ping { nonce: p.nonce };
        self.play_send(&ping).await;
    }

    /// One match attempt, from `queue` to results (or a failure).
    async fn play_match(&mut self, k: u32) -> Outcome {
        let shared = self.shared.clone();
        let cfg = &shared.config;
        self.in_match = true;
        self.tally.matches.attempted += 1;
        // Party members draw the mode from the party's own seed, so they agree on it.
        let mode = match self.plan.party {
            Some((party, _)) => {
                let mut r = fastrand::Rng::with_seed(
                    cfg.seed ^ party.wrapping_mul(0x9e37_79b9) ^ (u64::from(k) << 40),
                );
                pick(&cfg.modes, &mut r).clone()
            }
            None => pick(&cfg.modes, &mut self.rng).clone(),
        };
        let party = self.plan.party.map(|(p, size)| PartySpec {
            id: format!("{}-p{p}-{k}", cfg.name_prefix),
            size,
        });
        let faults = &cfg.faults;
        let slow = self.rng.f64() < faults.slow_link;
        let plan_drop = self.rng.f64() < faults.drop_game;
        let plan_background = self.rng.f64() < faults.background;
        if slow {
            self.tally.faults.slow_link += 1;
            self.slow
                .set_delay(Some((faults.slow_delay.min, faults.slow_delay.max)));
        }
        if let Err(f) = self.ensure_play().await {
            return Outcome::Failed(f);
        }
        let queue = match self.queue_message(mode, party).await {
            Ok(q) => q,
            Err(f) => return Outcome::Failed(f),
        };
        let mut m = Match {
            t_queue: Instant::now(),
            matched: None,
            t_matched: None,
            t_first_state: None,
            t_end: None,
            game: None,
            game_done: false,
            game_results: None,
            play_end: None,
            game_refusal: None,
            joined: None,
            moved_from: None,
            queue_msg: to_json(&queue),
            queued: false,
            requeue_since: None,
            cancel_sent: false,
            timers: Timers::default(),
            game_attempts: 0,
            game_opens: 0,
            play_attempts: 0,
            plan_drop,
            plan_background,
        };
        self.send_queue(&m).await;
        self.set_stage(Stage::Queued);
        let outcome = self.match_loop(&mut m).await;
        if let Some(mm) = &m.matched {
            self.last_session = Some(mm.session.clone());
        }
        outcome
    }

    async fn send_queue(&mut self, m: &Match) {
        if let Some(p) = self.play.as_mut() {
            if p.link.raw(m.queue_msg.clone()).await.is_err() {
                self.play = None;
            }
        }
    }

    async fn match_loop(&mut self, m: &mut Match) -> Outcome {
        loop {
            let now = Instant::now();
            if let Some(o) = self.on_timers(m, now).await {
                return o;
            }
            let wake = self.next_wake(m, now);
            let background = m.timers.is_set(Timer::BackgroundUntil);
            let event = {
                let play = self
                    .play
                    .as_mut()
                    .filter(|_| !background)
                    .map(|p| p.link.next_item());
                let game = m
                    .game
                    .as_mut()
                    .filter(|_| !background)
                    .map(|g| g.link.next_item());
                tokio::select! {
                    item = recv(play) => Event::Play(item),
                    item = recv(game) => Event::Game(item),
                    _ = tokio::time::sleep_until(wake) => Event::Tick,
                }
            };
            let done = match event {
                Event::Play(item) => self.on_play(m, item).await,
                Event::Game(item) => self.on_game(m, item).await,
                Event::Tick => None,
            };
            if let Some(o) = done {
                return o;
            }
        }
    }

    /// The earliest moment a timer of this match is due (at most a second away).
    fn next_wake(&self, m: &Match, now: Instant) -> Instant {
        let cfg = &self.shared.config;
        let mut t = now + Duration::from_secs(1);
        let mut at = |x: Option<Instant>| {
            if let Some(x) = x {
                t = t.min(x);
            }
        };
        at(m.timers.earliest(&ALWAYS_TIMERS));
        if m.matched.is_none() {
            at(Some(m.t_queue + cfg.queue_timeout));
            if !m.cancel_sent {
                at(Some(self.shared.end));
            }
        }
        if !m.timers.is_set(Timer::BackgroundUntil) {
            at(m.timers.earliest(&FOREGROUND_TIMERS));
            at(self.play.as_ref().map(|p| p.next_ping));
            if let Some(g) = m.game.as_ref().filter(|g| g.welcomed) {
                at(Some(g.next_input));
                at(Some(g.next_ping));
            }
        }
        t.max(now)
    }

    /// Fires every due timer of the match, in a fixed order: first the ones that end the
    /// match, then the background fault (which freezes everything after it), then the
    /// reconnects and faults, last the recurring pings and inputs.
    async fn on_timers(&mut self, m: &mut Match, now: Instant) -> Option<Outcome> {
        if let Some(o) = self.on_deadlines(m, now).await {
            return Some(o);
        }
        if self.on_background(m, now) {
            return None;
        }
        if let Some(o) = self.on_play_reconnect(m, now).await {
            return Some(o);
        }
        if let Some(o) = self.on_game_timers(m, now).await {
            return Some(o);
        }
        self.play_ping(now).await;
        if let Some(g) = m.game.as_mut().filter(|g| g.welcomed) {
            self.game_beat(g, now).await;
        }
        None
    }

    /// The timers that give up or wait: results, the queue's and the session's limits, the
    /// run's end, a fresh ticket, a re-`queue`. They run even in the background.
    async fn on_deadlines(&mut self, m: &mut Match, now: Instant) -> Option<Outcome> {
        let queue_timeout = self.shared.config.queue_timeout;
        if m.timers.due(Timer::EndWait, now) {
            return Some(self.conclude(m));
        }
        match &m.matched {
            None => {
                if m.timers.due(Timer::CancelUntil, now) {
                    return Some(Outcome::Cancelled);
                }
                if now >= m.t_queue + queue_timeout {
                    self.play_send(&ClientMessage::Cancel {}).await;
                    return Some(Outcome::Failed(Failure::QueueTimeout));
                }
                if now >= self.shared.end && !m.cancel_sent {
                    // The run is over: leave the queue (a match may still form meanwhile).
                    m.cancel_sent = true;
                    m.timers
                        .set(Timer::CancelUntil, now + Duration::from_secs(5));
                    m.timers.clear(Timer::Requeue);
                    self.play_send(&ClientMessage::Cancel {}).await;
                }
            }
            Some(mm) => {
                if now >= mm.deadline + DEADLINE_SLACK {
                    return Some(Outcome::Failed(Failure::SessionTimeout));
                }
            }
        }
        if m.timers.due(Timer::AwaitingTicket, now) {
            return Some(Outcome::Failed(Failure::GatewayRefused(
                berth_protocol::game::code::TICKET_EXPIRED.into(),
            )));
        }
        if !m.cancel_sent && m.timers.take_due(Timer::Requeue, now) {
            self.send_queue(m).await;
        }
        None
    }

    /// The app in the background: no reading, no sending, no reconnecting. Comes back when
    /// its time is up (maybe with its sockets killed by the OS), and goes there when the
    /// fault is due. True while it is there: the other timers wait.
    fn on_background(&mut self, m: &mut Match, now: Instant) -> bool {
        let faults = &self.shared.config.faults;
        if let Some(until) = m.timers.get(Timer::BackgroundUntil) {
            if now < until {
                return true;
            }
            m.timers.clear(Timer::BackgroundUntil);
            let killed = self.rng.f64() < faults.background_kill;
            tracing::debug!(player = %self.plan.name, killed, "fault: back from the background");
            if killed {
                // The OS killed the sockets meanwhile: reopen /v1/play first (its `matched`
                // carries a fresh ticket), then the game; the old ticket is the fallback.
                self.tally.faults.background_killed += 1;
                if let Some(p) = self.play.take() {
                    p.link.kill();
                }
                if let Some(g) = m.game.take() {
                    g.link.kill();
                }
                m.timers.set(Timer::PlayReconnect, now);
                if !m.game_done && m.matched.is_some() {
                    m.timers
                        .set(Timer::GameConnect, now + Duration::from_secs(3));
                }
            }
        }
        if m.timers.take_due(Timer::Background, now) {
            tracing::debug!(player = %self.plan.name, "fault: to the background");
            self.tally.faults.background += 1;
            let away = faults.background_for.draw(&mut self.rng);
            m.timers.set(Timer::BackgroundUntil, now + away);
            return true;
        }
        false
    }

    /// Reopens `/v1/play` when due, or at once when it is closed and no retry is planned.
    async fn on_play_reconnect(&mut self, m: &mut Match, now: Instant) -> Option<Outcome> {
        if !(m.timers.due(Timer::PlayReconnect, now)
            || (self.play.is_none() && !m.timers.is_set(Timer::PlayReconnect)))
        {
            return None;
        }
        m.timers.clear(Timer::PlayReconnect);
        if let Some(p) = self.play.take() {
            drop(p); // closed politely first, as the protocol asks
        }
        match self.connect_play().await {
            Ok(()) => {
                tracing::debug!(player = %self.plan.name, "play socket reopened");
                self.tally.reconnects.play += 1;
                m.play_attempts = 0;
                if m.matched.is_none() && !m.cancel_sent {
                    // The server resumes a queued ticket (`already_queued` then) or has
                    // dropped it: queue again either way.
                    self.send_queue(m).await;
                }
            }
            Err(f) if f.is_fatal() => return Some(Outcome::Failed(f)),
            Err(_) => {
                m.play_attempts += 1;
                if m.play_attempts >= MAX_PLAY_ATTEMPTS {
                    if m.game_results.is_some() {
                        return Some(self.conclude(m));
                    }
                    if m.game.is_none() {
                        return Some(Outcome::Failed(Failure::Disconnected));
                    }
                    // Still playing: the game socket can carry the match to its end.
                }
                let wait = backoff(m.play_attempts, &mut self.rng);
                m.timers.set(Timer::PlayReconnect, now + wait);
            }
        }
        None
    }

    /// (Re)opens the game socket when due, and drops it when the fault is due.
    async fn on_game_timers(&mut self, m: &mut Match, now: Instant) -> Option<Outcome> {
        if m.timers.take_due(Timer::GameConnect, now) && m.game.is_none() && !m.game_done {
            if let Some(o) = self.connect_game(m).await {
                return Some(o);
            }
        }
        if m.timers.take_due(Timer::Drop, now) {
            match m.game.take() {
                Some(g) => {
                    tracing::debug!(player = %self.plan.name, "fault: game socket dropped");
                    self.tally.faults.drop_game += 1;
                    g.link.kill();
                    let pause = self.shared.config.faults.drop_pause.draw(&mut self.rng);
                    m.timers.set(Timer::GameConnect, now + pause);
                }
                // Not connected right now (reconnecting): drop it once it is back.
                None if !m.game_done => {
                    m.timers.set(Timer::Drop, now + Duration::from_millis(500));
                }
                None => {}
            }
        }
        None
    }

    /// The game's recurring beats once welcomed: an input at the tick rate, a `ping` every
    /// second (its `pong` gives the round trip).
    async fn game_beat(&mut self, g: &mut Game, now: Instant) {
        if let Some(r) = g.reflex.as_mut() {
            if let Some(tap) = r.due(now) {
                let _ = g.link.send_text(&tap).await;
            }
            g.next_input = r.next(now);
            if now >= g.next_ping {
                g.nonce += 1;
                g.ping = Some((g.nonce, now));
                g.next_ping = now + GAME_PING_EVERY;
                let _ = g.link.send_text(&reflex::ping(g.nonce)).await;
            }
            return;
        }
        if now >= g.next_input {
            let turn = self.rng.f32() * 2.0 - 1.0;
            let c = match &g.grid {
                Some(grid) => steer::decide(grid, &g.me, &g.players, g.heading, turn),
                None => steer::Controls {
                    dx: 0.0,
                    dy: 0.0,
                    fire: false,
                    aim: 0.0,
                    heading: g.heading,
                },
            };
            g.heading = c.heading;
            g.seq += 1;
            let input = GameRequest::Input {
                seq: g.seq,
                dx: c.dx,
                dy: c.dy,
                fire: c.fire,
                aim: c.aim,
            };
            g.next_input += g.input_every;
            if g.next_input < now {
                g.next_input = now + g.input_every;
            }
            let _ = g.link.send(&input).await;
        }
        if now >= g.next_ping {
            g.nonce += 1;
            g.ping = Some((g.nonce, now));
            g.next_ping = now + GAME_PING_EVERY;
            let _ = g.link.send(&GameRequest::Ping { nonce: g.nonce }).await;
        }
    }

    /// Opens the game socket with the latest ticket and sends `join`.
    async fn connect_game(&mut self, m: &mut Match) -> Option<Outcome> {
        let mm = m.matched.as_ref()?;
        let now = Instant::now();
        if m.moved_from.as_ref() == Some(&mm.endpoint) {
            // Moved, and the `matched` naming the new host has not come yet.
            m.timers.set(Timer::AwaitingTicket, now + TICKET_WAIT);
            return None;
        }
        if m.game_opens > 0
            && !m.timers.is_set(Timer::AwaitingTicket)
            && now + Duration::from_secs(1) >= mm.ticket_expires
        {
            // Reconnecting with a ticket that has (nearly) expired: renew it through
            // `/v1/play` first (its `matched` carries a fresh one).
            m.timers.set(Timer::AwaitingTicket, now + TICKET_WAIT);
            m.timers.set(Timer::PlayReconnect, now);
            return None;
        }
        m.game_attempts += 1;
        let seed = self.seed();
        m.joined = Some(mm.endpoint.clone());
        match GameClient::connect_url(&mm.endpoint, self.socket_options(seed)).await {
            Ok(mut link) => {
                tracing::debug!(player = %self.plan.name, session = %mm.session, opens = m.game_opens, "game socket open");
                m.game_opens += 1;
                if m.game_opens > 1 {
                    self.tally.reconnects.game += 1;
                }
                let join = GameRequest::Join {
                    ticket: mm.ticket.clone(),
                };
                let _ = link.send(&join).await;
                let now = Instant::now();
                m.game = Some(Game {
                    link,
                    me: self.plan.name.clone(),
                    grid: None,
                    players: Vec::new(),
                    welcomed: false,
                    seq: 0,
                    heading: self.rng.f32() * std::f32::consts::TAU,
                    input_every: Duration::from_millis(50),
                    next_input: now,
                    next_ping: now,
                    ping: None,
                    nonce: 0,
                    reflex: None,
                });
                None
            }
            Err(e) => {
                tracing::debug!(player = %self.plan.name, error = %e, "gateway connect failed");
                if m.game_attempts >= MAX_GAME_ATTEMPTS {
                    return Some(self.conclude_or(m, Failure::GatewayUnreachable));
                }
                m.timers.set(
                    Timer::GameConnect,
                    Instant::now() + backoff(m.game_attempts, &mut self.rng),
                );
                None
            }
        }
    }

    /// One item from `/v1/play`: what the server says about the queue and the session.
    async fn on_play(&mut self, m: &mut Match, item: Incoming) -> Option<Outcome> {
        let now = Instant::now();
        let text = match item {
            Incoming::Text(t) => t,
            Incoming::Binary(_) => return None,
            Incoming::Closed(closed) => return self.on_play_closed(m, closed, now),
        };
        let Ok(msg) = serde_json::from_str::<ServerMessage>(&text) else {
            tracing::debug!(player = %self.plan.name, %text, "unknown play message");
            return None;
        };
        match msg {
            ServerMessage::Matched {
                session,
                region,
                endpoint,
                ticket,
                ticket_expires_ms,
                deadline_ms,
                ..
            } => {
                let fresh = Matched {
                    session,
                    region,
                    endpoint,
                    ticket,
                    ticket_expires: at_epoch_ms(ticket_expires_ms, now),
                    deadline: at_epoch_ms(deadline_ms, now),
                };
                self.on_matched(m, fresh, now);
            }
            ServerMessage::SessionEnded {
                session,
                reason,
                results,
            } => return self.on_session_ended(m, &session, reason.to_string(), results, now),
            ServerMessage::Dequeued { reason, .. } => {
                if m.matched.is_some() {
                    return None;
                }
                return Some(match reason.as_str() {
                    "cancelled" if m.cancel_sent => Outcome::Cancelled,
                    "max_wait" => Outcome::Failed(Failure::QueueTimeout),
                    _ => Outcome::Failed(Failure::Dequeued(reason.to_string())),
                });
            }
            ServerMessage::Error { code, .. } => return on_play_error(m, code.as_str(), now),
            ServerMessage::QueueStatus { .. } => m.queued = true,
            ServerMessage::Welcome { .. } | ServerMessage::Pong { .. } => {}
        }
        None
    }

    /// `/v1/play` closed: the end for a replaced or refused player, else reopened later.
    fn on_play_closed(&mut self, m: &mut Match, closed: Closed, now: Instant) -> Option<Outcome> {
        let Closed { code, reason, .. } = closed;
        self.play = None;
        tracing::debug!(player = %self.plan.name, ?code, %reason, "play socket closed");
        match code {
            Some(4409) => return Some(Outcome::Failed(Failure::Replaced)),
            Some(4401) => return Some(Outcome::Failed(Failure::HelloRefused(reason))),
            _ => {}
        }
        if m.game_results.is_some() {
            // The game already gave results; the server's copy is not worth waiting for.
            return Some(self.conclude(m));
        }
        m.play_attempts += 1;
        let wait = backoff(m.play_attempts, &mut self.rng);
        m.timers.set(Timer::PlayReconnect, now + wait);
        None
    }

    /// `matched`: the first one starts the game; later ones (after a reconnect) renew the
    /// ticket. Late news of the last match and of other sessions is ignored.
    fn on_matched(&mut self, m: &mut Match, fresh: Matched, now: Instant) {
        if self.last_session.as_ref() == Some(&fresh.session) {
            return;
        }
        if let Some(mm) = &m.matched {
            if mm.session != fresh.session {
                tracing::debug!(player = %self.plan.name, session = %fresh.session, "matched for another session");
                return;
            }
        }
        if m.matched.is_none() {
            self.tally
                .histograms
                .record(Metric::TimeToMatch, now - m.t_queue);
            self.tally.matches.matched += 1;
            self.tally.sessions.insert(fresh.session.clone());
            *self.tally.regions.entry(fresh.region.clone()).or_default() += 1;
            self.set_stage(Stage::Playing);
            m.t_matched = Some(now);
            m.timers.clear(Timer::CancelUntil);
            m.timers.clear(Timer::Requeue);
            m.timers.set(Timer::GameConnect, now);
        }
        m.matched = Some(fresh);
        if m.timers.clear(Timer::AwaitingTicket) || (m.game.is_none() && !m.game_done) {
            m.timers.set(Timer::GameConnect, now);
        }
    }

    /// `session_ended`: before `matched` the match failed; after it, the server's results,
    /// concluded now or once the game's own end has had [`RESULTS_WAIT`] to come.
    fn on_session_ended(
        &mut self,
        m: &mut Match,
        session: &SessionId,
        reason: String,
        results: serde_json::Value,
        now: Instant,
    ) -> Option<Outcome> {
        if self.last_session.as_ref() == Some(session) {
            return None;
        }
        match &m.matched {
            None if reason == "placement_failed" => {
                return Some(Outcome::Failed(Failure::PlacementFailed))
            }
            None => return Some(Outcome::Failed(Failure::SessionEnded(reason))),
            Some(mm) if mm.session != *session => return None,
            Some(_) => {}
        }
        m.t_end.get_or_insert(now);
        m.play_end = Some((reason, results));
        if m.game_results.is_some() || m.game.is_none() {
            return Some(self.conclude(m));
        }
        m.timers.set_once(Timer::EndWait, now + RESULTS_WAIT);
        None
    }

    async fn on_game(&mut self, m: &mut Match, item: Incoming) -> Option<Outcome> {
        let now = Instant::now();
        let text = match item {
            Incoming::Text(t) => t,
            Incoming::Binary(_) => return None,
            Incoming::Closed(Closed { code, reason, .. }) => {
                m.game = None;
                tracing::debug!(player = %self.plan.name, ?code, %reason, "game socket closed");
                if m.game_done || m.game_results.is_some() {
                    m.timers.set_once(Timer::EndWait, now + RESULTS_WAIT);
                    return None;
                }
                if m.play_end.is_some() {
                    return Some(self.conclude(m));
                }
                if m.game_attempts >= MAX_GAME_ATTEMPTS {
                    return Some(self.conclude_or(m, Failure::Disconnected));
                }
                if !m.timers.is_set(Timer::GameConnect) && !m.timers.is_set(Timer::AwaitingTicket) {
                    m.timers.set(
                        Timer::GameConnect,
                        now + backoff(m.game_attempts, &mut self.rng),
                    );
                }
                return None;
            }
        };
        if let Some(msg) = reflex::parse(&text) {
            return self.on_reflex(m, msg, now);
        }
        let Ok(answer) = serde_json::from_str::<GameAnswer>(&text) else {
            tracing::debug!(player = %self.plan.name, text = %text.chars().take(200).collect::<String>(), "unknown game message");
            return None;
        };
        let g = m.game.as_mut()?;
        match answer {
            GameAnswer::Hello { .. } => {}
            GameAnswer::Welcome(w) => {
                g.welcomed = true;
                g.me = w.player.as_str().to_owned();
                g.grid = Some(Grid::from_map(&w.map));
                g.input_every = Duration::from_secs_f64(1.0 / f64::from(w.tick_hz.clamp(1, 120)));
                g.next_input = now;
                g.next_ping = now;
                if w.rejoined {
                    self.tally.reconnects.rejoined += 1;
                }
                m.game_attempts = 0;
                m.game_refusal = None;
            }
            GameAnswer::State(s) => {
                g.players = s.players;
                if m.t_first_state.is_none() {
                    self.first_state(m, now, Duration::from_millis(s.time_left_ms));
                }
            }
            GameAnswer::Pong { nonce, .. } => {
                if let Some((n, sent)) = g.ping {
                    if n == nonce {
                        g.ping = None;
                        self.tally.histograms.record(Metric::GameRtt, now - sent);
                    }
                }
            }
            GameAnswer::Ended { reason, results } => {
                m.game_done = true;
                m.t_end.get_or_insert(now);
                m.game_results = Some((reason, results));
                if m.play_end.is_some() {
                    return Some(self.conclude(m));
                }
                m.timers.set_once(Timer::EndWait, now + RESULTS_WAIT);
            }
            GameAnswer::Error { code, .. } => {
                return self.on_game_error(m, code, now);
            }
        }
        None
    }

    /// The match's first game state (the arena's first `state`, Reflex's first `round`): the
    /// match is played; faults are planned within the first 60 % of `time_left`.
    fn first_state(&mut self, m: &mut Match, now: Instant, time_left: Duration) {
        m.t_first_state = Some(now);
        self.tally.matches.played += 1;
        let h = &mut self.tally.histograms;
        h.record(Metric::TimeToPlay, now - m.t_queue);
        if let Some(t) = m.t_matched {
            h.record(Metric::TimeToFirstState, now - t);
        }
        let window = time_left.mul_f64(0.6).max(Duration::from_secs(1));
        if m.plan_drop {
            m.timers.set(
                Timer::Drop,
                now + window.mul_f64(0.2 + 0.8 * self.rng.f64()),
            );
        }
        if m.plan_background {
            m.timers.set(
                Timer::Background,
                now + window.mul_f64(0.2 + 0.8 * self.rng.f64()),
            );
        }
    }

    /// A Reflex message (`bot/reflex.rs`).
    fn on_reflex(&mut self, m: &mut Match, msg: reflex::Msg, now: Instant) -> Option<Outcome> {
        use reflex::Msg;
        match msg {
            Msg::Welcome { player } => {
                let g = m.game.as_mut()?;
                g.welcomed = true;
                g.me = player;
                let r = g.reflex.insert(reflex::Reflex::default());
                g.next_input = r.next(now);
                g.next_ping = now;
                m.game_attempts = 0;
                m.game_refusal = None;
            }
            Msg::Round if m.t_first_state.is_none() => {
                self.first_state(m, now, REFLEX_MATCH);
            }
            Msg::Go { n, dir } => {
                let g = m.game.as_mut()?;
                if let Some(r) = g.reflex.as_mut() {
                    g.next_input = r.on_go(n, &dir, now, &mut self.rng);
                }
            }
            Msg::Pong { t } => {
                let g = m.game.as_mut()?;
                if g.ping.is_some_and(|(n, _)| n == t) {
                    let sent = g.ping.take().map_or(now, |(_, at)| at);
                    self.tally.histograms.record(Metric::GameRtt, now - sent);
                }
            }
            Msg::Over => {
                m.game_done = true;
                m.t_end.get_or_insert(now);
                if m.play_end.is_some() {
                    return Some(self.conclude(m));
                }
                m.timers.set_once(Timer::EndWait, now + RESULTS_WAIT);
            }
            Msg::Round | Msg::Other => {}
        }
        None
    }

    fn on_game_error(&mut self, m: &mut Match, code: String, now: Instant) -> Option<Outcome> {
        use berth_protocol::game::code as c;
        let welcomed = m.game.as_ref().is_some_and(|g| g.welcomed);
        tracing::debug!(player = %self.plan.name, %code, welcomed, "game error");
        if code == c::GAME_OVER
            || code == SHUTTING_DOWN
            || (!welcomed && code == c::UNKNOWN_SESSION)
        {
            // The game is over (or its VM or host is going): the server's `session_ended`
            // tells how it ended.
            m.game_done = true;
            m.game = None;
            // A player who never got into the game was refused; one who played and came back
            // too late simply missed the end (`no_results` unless the server tells it).
            if code != c::GAME_OVER && m.t_first_state.is_none() {
                m.game_refusal = Some(code);
            }
            if m.play_end.is_some() {
                return Some(self.conclude(m));
            }
            m.timers.set_once(Timer::EndWait, now + RESULTS_WAIT);
            return None;
        }
        if code == c::SESSION_MOVED {
            // The match moved to another host, running: the next `matched` names it (it
            // may have come already); rejoin there.
            m.game = None;
            m.moved_from = m.joined.clone();
            self.tally.reconnects.moved += 1;
            m.timers.set(Timer::GameConnect, now);
            return None;
        }
        if welcomed {
            return match code.as_str() {
                c::RATE_LIMITED => None,
                // This player joined from elsewhere: do not fight over the seat.
                c::REPLACED => Some(Outcome::Failed(Failure::Replaced)),
                _ => Some(Outcome::Failed(Failure::GameError(code))),
            };
        }
        // The join was refused.
        m.game = None;
        match code.as_str() {
            c::TICKET_EXPIRED => {
                if m.timers.is_set(Timer::AwaitingTicket) || m.game_attempts >= MAX_GAME_ATTEMPTS {
                    return Some(Outcome::Failed(Failure::GatewayRefused(code)));
                }
                // A fresh ticket comes with the `matched` that follows a new `/v1/play`.
                m.timers.set(Timer::AwaitingTicket, now + TICKET_WAIT);
                m.timers.set(Timer::PlayReconnect, now);
                None
            }
            c::TICKET_IN_USE | c::GAME_UNREACHABLE | c::NOT_ACTIVATED | c::RATE_LIMITED
                if m.game_attempts < MAX_GAME_ATTEMPTS =>
            {
                m.timers.set(
                    Timer::GameConnect,
                    now + backoff(m.game_attempts, &mut self.rng),
                );
                None
            }
            _ => Some(Outcome::Failed(Failure::GatewayRefused(code))),
        }
    }

    /// Ends the match with the results held; `otherwise` when there are none.
    fn conclude_or(&mut self, m: &mut Match, otherwise: Failure) -> Outcome {
        if m.game_results.is_none() && m.play_end.is_none() {
            return Outcome::Failed(otherwise);
        }
        self.conclude(m)
    }

    /// Ends the match with what the two sides said.
    fn conclude(&mut self, m: &mut Match) -> Outcome {
        // Close the game socket now, politely.
        m.game = None;
        if let (Some(first), Some(end)) = (m.t_first_state, m.t_end) {
            self.tally.histograms.record(Metric::Session, end - first);
        }
        match (&m.game_results, &m.play_end) {
            (Some((reason, game)), Some((_, server))) => {
                match winners_agree(game, server) {
                    Some(false) => return Outcome::Failed(Failure::ResultsMismatch),
                    Some(true) => self.tally.matches.results_compared += 1,
                    None => {}
                }
                Outcome::Finished(reason.clone())
            }
            (Some((reason, _)), None) => Outcome::Finished(reason.clone()),
            (None, Some((reason, results))) => {
                if reason == "placement_failed" {
                    Outcome::Failed(Failure::PlacementFailed)
                } else if !is_good_end(reason) {
                    Outcome::Failed(Failure::SessionEnded(reason.clone()))
                } else if results.is_null() {
                    Outcome::Failed(Failure::NoResults)
                } else {
                    Outcome::Finished(reason.clone())
                }
            }
            (None, None) => Outcome::Failed(match m.game_refusal.take() {
                Some(code) => Failure::GatewayRefused(code),
                None => Failure::NoResults,
            }),
        }
    }
}

/// An `error` on `/v1/play`: `replaced` ends the bot; before `matched`, queue refusals are
/// retried, waited out or reported, and a late `cancel` is settled.
fn on_play_error(m: &mut Match, code: &str, now: Instant) -> Option<Outcome> {
    if code == "replaced" {
        return Some(Outcome::Failed(Failure::Replaced));
    }
    if m.matched.is_some() {
        return None;
    }
    match code {
        "already_queued" => m.queued = true,
        // Never queued (the queue was still being refused): nothing to cancel.
        "not_queued" if m.cancel_sent && !m.queued => return Some(Outcome::Cancelled),
        // Cancel came too late: the match is being placed; wait for its news
        // (placement ends in `matched` or `placement_failed` well within this).
        "not_queued" if m.cancel_sent => {
            m.timers
                .set(Timer::CancelUntil, now + Duration::from_secs(30));
        }
        // `in_session`: the last match's VM is still going away, or (after a
        // reconnect) this match is being placed; either way it settles soon.
        "in_session" | "rate_limited" | "store_unavailable" | "store_corrupt"
            if now < *m.requeue_since.get_or_insert(now) + REQUEUE_FOR =>
        {
            m.timers.set(Timer::Requeue, now + Duration::from_secs(1));
        }
        _ => return Some(Outcome::Failed(Failure::QueueRefused(code.to_string()))),
    }
    None
}

/// The next item of a socket; never, without one (or while the app is in the background).
async fn recv(next: Option<impl std::future::Future<Output = Incoming>>) -> Incoming {
    match next {
        Some(item) => item.await,
        None => std::future::pending().await,
    }
}

/// 250 ms doubling per attempt up to 4 s, ±20 % jitter.
fn backoff(attempt: u32, rng: &mut fastrand::Rng) -> Duration {
    let base = 250u64.saturating_mul(1 << attempt.saturating_sub(1).min(4));
    let jitter = 0.8 + 0.4 * rng.f64();
    Duration::from_millis(base.min(4000)).mul_f64(jitter)
}

/// The local instant of a server time in ms since the epoch.
fn at_epoch_ms(ms: u64, now: Instant) -> Instant {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if ms >= wall {
        now + Duration::from_millis(ms - wall)
    } else {
        now.checked_sub(Duration::from_millis(wall - ms))
            .unwrap_or(now)
    }
}

fn to_json<T: serde::Serialize>(m: &T) -> String {
    serde_json::to_string(m).expect("protocol messages always serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::game::PlayerResult;

    #[test]
    fn failure_codes_are_stable_labels() {
        assert_eq!(Failure::PlacementFailed.code(), "placement_failed");
        assert_eq!(Failure::QueueTimeout.code(), "queue_timeout");
        assert_eq!(
            Failure::GatewayRefused("ticket_expired".into()).code(),
            "gateway_refused:ticket_expired"
        );
        assert_eq!(
            Failure::GameError("Weird Code!".into()).code(),
            "game_error:weird_code_"
        );
        assert_eq!(
            Failure::SessionEnded("vm_failed".into()).code(),
            "session_ended:vm_failed"
        );
        assert_eq!(Failure::DevToken(String::new()).code(), "dev_token:unknown");
        assert!(Failure::Replaced.is_fatal() && !Failure::Disconnected.is_fatal());
    }

    #[test]
    fn end_reasons_and_winner_checks() {
        for r in [
            "game_over",
            "score_limit",
            "time_limit",
            "surrender",
            "abandoned",
            "new_thing",
        ] {
            assert!(is_good_end(r), "{r}");
        }
        for r in berth_protocol::EndReason::KNOWN {
            assert_eq!(
                is_good_end(r.as_str()),
                *r == berth_protocol::EndReason::GameOver,
                "{r}"
            );
        }
        let results = GameResults {
            winner: Some(1),
            scores: vec![2, 5],
            players: vec![PlayerResult {
                id: berth_protocol::PlayerId::new("a").expect("id"),
                team: 0,
                kills: 2,
                deaths: 5,
                joined: true,
                left: false,
            }],
            map: "m".into(),
            duration_ms: 1000,
            ticks: 20,
        };
        let server = serde_json::to_value(&results).expect("json");
        assert_eq!(winners_agree(&results, &server), Some(true));
        assert_eq!(
            winners_agree(&results, &serde_json::json!({"winner": 0})),
            Some(false)
        );
        assert_eq!(
            winners_agree(&results, &serde_json::json!({"winner": null})),
            Some(false)
        );
        assert_eq!(winners_agree(&results, &serde_json::json!({})), None);
        assert_eq!(winners_agree(&results, &serde_json::Value::Null), None);
        let draw = GameResults {
            winner: None,
            ..results
        };
        assert_eq!(
            winners_agree(&draw, &serde_json::json!({"winner": null})),
            Some(true)
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let mut rng = fastrand::Rng::with_seed(1);
        let b1 = backoff(1, &mut rng);
        assert!(b1 >= Duration::from_millis(200) && b1 <= Duration::from_millis(300));
        let b3 = backoff(3, &mut rng);
        assert!(b3 >= Duration::from_millis(800) && b3 <= Duration::from_millis(1200));
        assert!(backoff(30, &mut rng) <= Duration::from_millis(4800));
    }
}
