//! A VM's life as the SDK sees it — starting, waiting (docked), activated, ready, ended — and
//! what each SDK call may do in each phase. Pure state behind one lock: the SDK server
//! ([`crate::sdk`]) and the hostd link ([`crate::agent`]) both act on it; what hostd must hear
//! comes out as [`Report`]s.

use berth_protocol::game::code as ticket_code;
use berth_protocol::guest::Identity;
use berth_protocol::sdk::{
    code, valid_reason, Activation, Phase, SessionState, Verified, MAX_RESULTS, SDK_VERSION,
};
use berth_protocol::ticket;
use berth_protocol::{now_ms, PlayerId, SessionId, VmId};
use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What hostd must be told, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    Initialised {
        init_ms: u64,
    },
    Ready {
        session_id: SessionId,
        vm_id: VmId,
        /// From the identity line to the game's `ready`.
        apply_us: u64,
    },
    Ended {
        session_id: SessionId,
        reason: String,
        results: serde_json::Value,
    },
    GameExited {
        status: String,
        stderr: Vec<String>,
    },
}

/// Where reports go: written to hostd at once, from whichever thread has one.
pub type Sink = std::sync::Arc<dyn Fn(Report) + Send + Sync>;

/// An SDK refusal: a stable code and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

fn refuse(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

#[derive(Debug)]
struct State {
    phase: Phase,
    identity: Option<Identity>,
    key: Vec<u8>,
    activated_at: Option<Instant>,
    connected: BTreeSet<PlayerId>,
    last_health: Instant,
}

/// The VM's life; shared by the SDK server and the hostd link.
#[derive(Debug)]
pub struct Life {
    state: Mutex<State>,
    booted: Instant,
    health_timeout: Duration,
}

impl Life {
    pub fn new(booted: Instant, health_timeout: Duration) -> Self {
        Life {
            state: Mutex::new(State {
                phase: Phase::Starting,
                identity: None,
                key: Vec::new(),
                activated_at: None,
                connected: BTreeSet::new(),
                last_health: Instant::now(),
            }),
            booted,
            health_timeout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// `POST /v1/initialised`: the first one reports; a repeat before activation is harmless.
    pub fn initialised(&self) -> Result<Option<Report>, Refusal> {
        let mut s = self.lock();
        match s.phase {
            Phase::Starting => {
                s.phase = Phase::Waiting;
                Ok(Some(Report::Initialised {
                    init_ms: self.booted.elapsed().as_millis() as u64,
                }))
            }
            Phase::Waiting => Ok(None),
            _ => Err(refuse(
                code::ALREADY_ACTIVATED,
                "this VM is already activated",
            )),
        }
    }

    /// hostd's identity (already applied to the machine). Refused when one was taken already.
    pub fn activate(&self, identity: Identity, at: Instant) -> Result<(), Refusal> {
        let mut s = self.lock();
        if let Some(current) = &s.identity {
            return Err(refuse(
                "already_activated",
                format!(
                    "this VM is already activated for session {}",
                    current.session_id
                ),
            ));
        }
        s.key = hex::decode(&identity.ticket_key).unwrap_or_default();
        s.identity = Some(identity);
        s.activated_at = Some(at);
        if s.phase != Phase::Ended {
            s.phase = Phase::Activated;
        }
        Ok(())
    }

    /// What `GET /v1/activation` answers, once activated.
    pub fn activation(&self) -> Option<Activation> {
        let s = self.lock();
        let i = s.identity.as_ref()?;
        Some(Activation {
            v: SDK_VERSION,
            session_id: i.session_id.clone(),
            vm_id: i.vm_id.clone(),
            hostname: i.hostname.clone(),
            players: i.players.clone(),
            teams: i.teams.clone(),
            params: i.params.clone(),
            rng_seed: i.rng_seed,
            deadline_ms: i.deadline_ms,
            wall_clock_ms: i.wall_clock_ms,
        })
    }

    /// `POST /v1/ready`.
    pub fn ready(&self) -> Result<Option<Report>, Refusal> {
        let mut s = self.lock();
        match s.phase {
            Phase::Activated => {
                s.phase = Phase::Ready;
                s.last_health = Instant::now();
                let i = s.identity.as_ref().expect("activated has an identity");
                Ok(Some(Report::Ready {
                    session_id: i.session_id.clone(),
                    vm_id: i.vm_id.clone(),
                    apply_us: s
                        .activated_at
                        .map(|t| t.elapsed().as_micros() as u64)
                        .unwrap_or(0),
                }))
            }
            Phase::Ready => Ok(None),
            Phase::Ended => Err(refuse(code::ALREADY_ENDED, "the session is over")),
            Phase::Starting | Phase::Waiting => Err(not_activated()),
        }
    }

    /// `POST /v1/tickets/verify`: signature, expiry, session and player.
    pub fn verify(&self, token: &str) -> Result<Verified, Refusal> {
        let s = self.lock();
        let Some(i) = s.identity.as_ref() else {
            return Err(not_activated());
        };
        if s.key.is_empty() {
            return Err(refuse(
                ticket_code::BAD_TICKET,
                "this session has no ticket key",
            ));
        }
        let claims = ticket::verify(token, &s.key, &i.session_id, now_ms() / 1000)
            .map_err(|e| refuse(e.code(), e.to_string()))?;
        let team = team_of(i, &claims.sub).ok_or_else(|| {
            refuse(
                ticket_code::NOT_A_PLAYER,
                format!("{} is not a player of this session", claims.sub),
            )
        })?;
        Ok(Verified {
            player: claims.sub,
            team,
            expires_s: claims.exp,
            ticket_id: claims.jti,
        })
    }

    /// `POST /v1/players/joined` (`joined`) and `/left`.
    pub fn player(&self, player: PlayerId, joined: bool) -> Result<(), Refusal> {
        let mut s = self.lock();
        let Some(i) = s.identity.as_ref() else {
            return Err(not_activated());
        };
        if !i.players.contains(&player) {
            return Err(refuse(
                code::NOT_A_PLAYER,
                format!("{player} is not a player of this session"),
            ));
        }
        if s.phase == Phase::Ended {
            return Err(refuse(code::ALREADY_ENDED, "the session is over"));
        }
        if joined {
            s.connected.insert(player);
        } else {
            s.connected.remove(&player);
        }
        Ok(())
    }

    /// `POST /v1/health`.
    pub fn health(&self) -> Result<(), Refusal> {
        let mut s = self.lock();
        match s.phase {
            Phase::Starting | Phase::Waiting => Err(not_activated()),
            Phase::Ended => Err(refuse(code::ALREADY_ENDED, "the session is over")),
            Phase::Activated | Phase::Ready => {
                s.last_health = Instant::now();
                Ok(())
            }
        }
    }

    /// `POST /v1/ended` from the game.
    pub fn ended(&self, reason: &str, results: serde_json::Value) -> Result<Report, Refusal> {
        if !valid_reason(reason) {
            return Err(refuse(
                code::BAD_BODY,
                "reason must be at most 64 bytes of a-z, 0-9 and _",
            ));
        }
        let size = results.to_string().len();
        if size > MAX_RESULTS {
            return Err(refuse(
                code::RESULTS_TOO_LARGE,
                format!("results are {size} bytes; at most {MAX_RESULTS}"),
            ));
        }
        self.end(reason, results)
    }

    /// Ends the session for `reason` (the game's, or the agent's own: `game_crashed`,
    /// `game_unhealthy`).
    pub fn end(&self, reason: &str, results: serde_json::Value) -> Result<Report, Refusal> {
        let mut s = self.lock();
        match s.phase {
            Phase::Starting | Phase::Waiting => Err(not_activated()),
            Phase::Ended => Err(refuse(code::ALREADY_ENDED, "the session already ended")),
            Phase::Activated | Phase::Ready => {
                s.phase = Phase::Ended;
                let i = s.identity.as_ref().expect("activated has an identity");
                Ok(Report::Ended {
                    session_id: i.session_id.clone(),
                    reason: reason.to_owned(),
                    results,
                })
            }
        }
    }

    /// The game's process exited: what hostd must hear, in order (nothing once ended). With
    /// `game_over`, an exit after activation is the match's end (a server without the SDK
    /// that exited with status 0), else a crash.
    pub fn game_exited(&self, status: String, stderr: Vec<String>, game_over: bool) -> Vec<Report> {
        let phase = self.phase();
        let exited = Report::GameExited { status, stderr };
        let reason = if game_over { "" } else { "game_crashed" };
        match phase {
            Phase::Ended => vec![],
            Phase::Activated | Phase::Ready => match self.end(reason, serde_json::Value::Null) {
                Ok(ended) => vec![ended, exited],
                Err(_) => vec![],
            },
            Phase::Starting | Phase::Waiting => vec![exited],
        }
    }

    /// A ready game silent on `health` for longer than its limit: the report that ends it.
    pub fn health_overdue(&self) -> Option<Report> {
        let overdue = {
            let s = self.lock();
            s.phase == Phase::Ready && s.last_health.elapsed() > self.health_timeout
        };
        if overdue {
            self.end("game_unhealthy", serde_json::Value::Null).ok()
        } else {
            None
        }
    }

    /// `GET /v1/session`.
    pub fn session(&self) -> SessionState {
        let s = self.lock();
        SessionState {
            v: SDK_VERSION,
            phase: s.phase,
            session_id: s.identity.as_ref().map(|i| i.session_id.clone()),
            connected: s.connected.iter().cloned().collect(),
        }
    }

    /// The activated session's id, if any.
    pub fn session_id(&self) -> Option<SessionId> {
        self.lock().identity.as_ref().map(|i| i.session_id.clone())
    }
}

fn not_activated() -> Refusal {
    refuse(code::NOT_ACTIVATED, "this VM has no session yet")
}

/// `player`'s team: its index in `teams`, or with no teams its own index among the players.
fn team_of(identity: &Identity, player: &PlayerId) -> Option<u32> {
    if !identity.players.contains(player) {
        return None;
    }
    if identity.teams.is_empty() {
        return identity
            .players
            .iter()
            .position(|p| p == player)
            .map(|i| i as u32);
    }
    identity
        .teams
        .iter()
        .position(|t| t.contains(player))
        .map(|i| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        let p = |n: &str| PlayerId::new(n).expect("id");
        Identity {
            session_id: SessionId::new("s1").expect("id"),
            vm_id: VmId::new("vm1").expect("id"),
            hostname: "berth-vm1".into(),
            players: vec![p("ann"), p("bob")],
            teams: vec![vec![p("ann")], vec![p("bob")]],
            ticket_key: "00ff".repeat(16),
            params: serde_json::json!({}),
            wall_clock_ms: now_ms(),
            rng_seed: 7,
            deadline_ms: 0,
        }
    }

    fn life() -> Life {
        Life::new(Instant::now(), Duration::from_millis(50))
    }

    #[test]
    fn calls_out_of_order_get_their_codes() {
        let l = life();
        assert_eq!(l.ready().expect_err("refused").code, code::NOT_ACTIVATED);
        assert_eq!(l.health().expect_err("refused").code, code::NOT_ACTIVATED);
        assert_eq!(
            l.ended("", serde_json::Value::Null)
                .expect_err("refused")
                .code,
            code::NOT_ACTIVATED
        );
        assert!(matches!(
            l.initialised(),
            Ok(Some(Report::Initialised { .. }))
        ));
        assert_eq!(l.initialised(), Ok(None), "a repeat is harmless");
        l.activate(identity(), Instant::now()).expect("activate");
        assert_eq!(
            l.activate(identity(), Instant::now())
                .expect_err("refused")
                .code,
            "already_activated"
        );
        assert_eq!(
            l.initialised().expect_err("refused").code,
            code::ALREADY_ACTIVATED
        );
        assert!(matches!(l.ready(), Ok(Some(Report::Ready { .. }))));
        assert_eq!(l.ready(), Ok(None));
        assert!(l.ended("score_limit", serde_json::json!({"w": 1})).is_ok());
        assert_eq!(
            l.ended("score_limit", serde_json::Value::Null)
                .expect_err("refused")
                .code,
            code::ALREADY_ENDED
        );
        assert_eq!(l.ready().expect_err("refused").code, code::ALREADY_ENDED);
    }

    #[test]
    fn bad_reasons_and_oversize_results_are_refused_and_change_nothing() {
        let l = life();
        l.initialised().expect("init");
        l.activate(identity(), Instant::now()).expect("activate");
        assert_eq!(
            l.ended("Bad Reason", serde_json::Value::Null)
                .expect_err("refused")
                .code,
            code::BAD_BODY
        );
        let big = serde_json::json!({ "blob": "x".repeat(MAX_RESULTS) });
        assert_eq!(
            l.ended("", big).expect_err("refused").code,
            code::RESULTS_TOO_LARGE
        );
        assert_eq!(l.phase(), Phase::Activated);
    }

    #[test]
    fn players_and_tickets_are_checked_against_the_session() {
        let l = life();
        assert_eq!(
            l.verify("x").expect_err("refused").code,
            code::NOT_ACTIVATED
        );
        l.activate(identity(), Instant::now()).expect("activate");
        assert_eq!(l.verify("x.y.z").expect_err("refused").code, "bad_ticket");
        let ann = PlayerId::new("ann").expect("id");
        let eve = PlayerId::new("eve").expect("id");
        l.player(ann.clone(), true).expect("ann joins");
        assert_eq!(
            l.player(eve, true).expect_err("refused").code,
            code::NOT_A_PLAYER
        );
        assert_eq!(l.session().connected, vec![ann.clone()]);
        l.player(ann, false).expect("ann leaves");
        assert!(l.session().connected.is_empty());
        assert_eq!(
            team_of(&identity(), &PlayerId::new("bob").expect("id")),
            Some(1)
        );
    }

    #[test]
    fn a_crash_ends_a_live_session_and_silence_ends_a_ready_one() {
        let l = life();
        assert!(matches!(
            l.game_exited("exit 1".into(), vec![], false).as_slice(),
            [Report::GameExited { .. }]
        ));
        let l = life();
        l.activate(identity(), Instant::now()).expect("activate");
        let reports = l.game_exited("killed".into(), vec!["boom".into()], false);
        assert!(matches!(
            reports.as_slice(),
            [Report::Ended { reason, .. }, Report::GameExited { .. }] if reason == "game_crashed"
        ));
        assert!(l.game_exited("again".into(), vec![], false).is_empty());
        // A server without the SDK that exits with status 0 has ended its match.
        let l = life();
        l.activate(identity(), Instant::now()).expect("activate");
        assert!(matches!(
            l.game_exited("exit status: 0".into(), vec![], true).as_slice(),
            [Report::Ended { reason, .. }, Report::GameExited { .. }] if reason.is_empty()
        ));
        let l = life();
        l.activate(identity(), Instant::now()).expect("activate");
        assert_eq!(l.health_overdue(), None, "not ready yet");
        l.ready().expect("ready");
        std::thread::sleep(Duration::from_millis(80));
        assert!(matches!(
            l.health_overdue(),
            Some(Report::Ended { reason, .. }) if reason == "game_unhealthy"
        ));
    }
}
