//! The game-server SDK over real HTTP on loopback: the agent's server (`berth_guest::sdk`) and
//! the Rust client (`berth-sdk`), with the VM's life driven as the hostd link drives it.

use berth_guest::life::{Life, Report, Sink};
use berth_guest::sdk::Sdk as Server;
use berth_protocol::guest::Identity;
use berth_protocol::sdk::{Phase, MAX_BODY, MAX_RESULTS};
use berth_protocol::ticket::{self, TicketClaims, TICKET_AUDIENCE};
use berth_protocol::{now_ms, PlayerId, SessionId, VmId};
use berth_sdk::{Sdk, SdkError};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "0123456789abcdef0123456789abcdef";

struct Vm {
    life: Arc<Life>,
    server: Arc<Server>,
    reports: Receiver<Report>,
    addr: SocketAddr,
}

fn vm() -> Vm {
    let life = Arc::new(Life::new(Instant::now(), Duration::from_millis(300)));
    let (tx, reports) = mpsc::channel();
    let sink: Sink = Arc::new(move |r| {
        let _ = tx.send(r);
    });
    let server = Server::bind("127.0.0.1:0", life.clone(), sink).expect("bind");
    server.spawn().expect("spawn");
    let addr = server.addr().expect("an IP address");
    Vm {
        life,
        server,
        reports,
        addr,
    }
}

fn pid(p: &str) -> PlayerId {
    PlayerId::new(p).expect("id")
}

fn identity() -> Identity {
    Identity {
        session_id: SessionId::new("match-1").expect("id"),
        vm_id: VmId::new("vm-1").expect("id"),
        hostname: "berth-1".into(),
        players: vec![pid("alice"), pid("bob")],
        teams: vec![vec![pid("alice")], vec![pid("bob")]],
        ticket_key: KEY.into(),
        params: serde_json::json!({"score_limit": 3}),
        wall_clock_ms: now_ms(),
        rng_seed: 99,
        deadline_ms: now_ms() + 60_000,
    }
}

fn ticket(player: &str, session: &str, jti: &str) -> String {
    ticket::mint(
        &TicketClaims {
            sub: pid(player),
            sid: SessionId::new(session).expect("id"),
            aud: TICKET_AUDIENCE.into(),
            iss: "test".into(),
            exp: now_ms() / 1000 + 60,
            iat: now_ms() / 1000,
            jti: jti.into(),
        },
        &hex::decode(KEY).expect("hex"),
    )
}

fn code(r: Result<impl std::fmt::Debug, SdkError>) -> (u16, String) {
    match r {
        Err(SdkError::Refused { status, code, .. }) => (status, code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// One raw request; the status and body of the answer.
fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(request).expect("write");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

#[test]
fn a_whole_session_through_the_sdk() {
    let vm = vm();
    let sdk = Sdk::new(&vm.addr.to_string());
    assert_eq!(code(sdk.ready()), (409, "not_activated".into()));
    sdk.initialised().expect("initialised");
    assert!(matches!(vm.reports.recv(), Ok(Report::Initialised { .. })));
    assert_eq!(sdk.session().expect("session").phase, Phase::Waiting);
    // The activation call waits — as it does across docking — until hostd's identity.
    let waiting = {
        let sdk = sdk.clone();
        std::thread::spawn(move || sdk.activation())
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiting.is_finished(), "answered before activation");
    vm.life
        .activate(identity(), Instant::now())
        .expect("activate");
    vm.server.wake();
    let a = waiting.join().expect("thread").expect("activation");
    assert_eq!(a.session_id.as_str(), "match-1");
    assert_eq!((a.rng_seed, a.players.len()), (99, 2));
    assert_eq!(a.params["score_limit"], 3);
    // Asked again after activation: at once.
    assert_eq!(sdk.activation().expect("again").vm_id.as_str(), "vm-1");
    assert_eq!(code(sdk.initialised()), (409, "already_activated".into()));

    sdk.ready().expect("ready");
    assert!(matches!(vm.reports.recv(), Ok(Report::Ready { .. })));
    let v = sdk
        .verify(&ticket("bob", "match-1", "t1"))
        .expect("bob's ticket");
    assert_eq!(
        (v.player.as_str(), v.team, v.ticket_id.as_str()),
        ("bob", 1, "t1")
    );
    assert_eq!(
        code(sdk.verify(&ticket("bob", "match-2", "t2"))),
        (403, "wrong_session".into())
    );
    assert_eq!(
        code(sdk.verify(&ticket("eve", "match-1", "t3"))),
        (403, "not_a_player".into())
    );
    assert_eq!(code(sdk.verify("not.a.ticket")), (403, "bad_ticket".into()));
    sdk.joined(&pid("bob")).expect("joined");
    assert_eq!(code(sdk.joined(&pid("eve"))), (403, "not_a_player".into()));
    assert_eq!(sdk.session().expect("session").connected, vec![pid("bob")]);
    sdk.health().expect("health");

    let big = serde_json::json!({ "blob": "x".repeat(MAX_RESULTS) });
    assert_eq!(code(sdk.ended("", &big)), (413, "results_too_large".into()));
    assert_eq!(
        code(sdk.ended("Not Valid", &serde_json::Value::Null)),
        (400, "bad_body".into())
    );
    let results = serde_json::json!({"winner": 1});
    sdk.ended("score_limit", &results).expect("ended");
    match vm.reports.recv() {
        Ok(Report::Ended {
            reason, results: r, ..
        }) => assert_eq!((reason.as_str(), r), ("score_limit", results)),
        other => panic!("expected ended, got {other:?}"),
    }
    assert_eq!(
        code(sdk.ended("score_limit", &serde_json::Value::Null)),
        (409, "already_ended".into())
    );
    assert_eq!(code(sdk.ready()), (409, "already_ended".into()));
    assert!(vm.reports.try_recv().is_err(), "refusals report nothing");
}

#[test]
fn bad_requests_get_stable_codes() {
    let vm = vm();
    let post = |path: &str, body: &str| {
        raw(
            vm.addr,
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    let (status, body) = post("/v2/ready", "{}");
    assert_eq!(status, 404);
    assert!(body.contains("\"not_found\""), "{body}");
    let (status, body) = raw(
        vm.addr,
        b"GET /v1/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("method_not_allowed"), "{body}");
    vm.life
        .activate(identity(), Instant::now())
        .expect("activate");
    let (status, body) = post("/v1/tickets/verify", "{not json");
    assert_eq!(status, 400);
    assert!(body.contains("bad_body"), "{body}");
    let (status, body) = post("/v1/tickets/verify", r#"{"ticket":"a","extra":1}"#);
    assert_eq!(status, 400, "unknown fields are refused: {body}");
    let huge = format!(r#"{{"ticket":"{}"}}"#, "a".repeat(MAX_BODY));
    let (status, body) = post("/v1/tickets/verify", &huge);
    assert_eq!(status, 413);
    assert!(body.contains("too_large"), "{body}");
    // Not HTTP, or a head past the limit: an answer, then the connection closes.
    let (status, body) = raw(vm.addr, b"HELLO THERE\r\n\r\n");
    assert_eq!(status, 400);
    assert!(body.contains("bad_request"), "{body}");
    let long = format!(
        "GET /v1/session HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let (status, body) = raw(vm.addr, long.as_bytes());
    assert_eq!(status, 431);
    assert!(body.contains("too_large"), "{body}");
    // The server still answers.
    let (status, _) = post("/v1/health", "{}");
    assert_eq!(status, 200);
}

#[test]
fn what_ordinary_http_clients_send_is_understood() {
    let vm = vm();
    vm.life
        .activate(identity(), Instant::now())
        .expect("activate");
    // curl's `Expect: 100-continue`, a chunked body, and two requests on one connection.
    let mut s = TcpStream::connect(vm.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(
        b"POST /v1/players/joined HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 18\r\n\r\n",
    )
    .expect("head");
    let mut continued = [0u8; 25];
    s.read_exact(&mut continued).expect("100 Continue");
    assert_eq!(&continued, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(br#"{"player":"alice"}"#).expect("body");
    s.write_all(
        b"POST /v1/players/left HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n8\r\n{\"player\r\na\r\n\":\"alice\"}\r\n0\r\n\r\n",
    )
    .expect("chunked");
    let mut answers = String::new();
    s.read_to_string(&mut answers).expect("answers");
    assert_eq!(answers.matches("HTTP/1.1 200 OK").count(), 2, "{answers}");
    assert!(vm.life.session().connected.is_empty(), "joined, then left");
    // HTTP/1.0 closes after the answer.
    let (status, body) = raw(vm.addr, b"GET /v1/session HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200);
    assert!(body.contains("\"phase\":\"activated\""), "{body}");
}

#[test]
fn a_ready_game_that_stops_calling_health_is_ended_unhealthy() {
    let vm = vm();
    let sdk = Sdk::new(&vm.addr.to_string());
    vm.life
        .activate(identity(), Instant::now())
        .expect("activate");
    sdk.ready().expect("ready");
    std::thread::sleep(Duration::from_millis(400));
    match vm.life.health_overdue() {
        Some(Report::Ended { reason, .. }) => assert_eq!(reason, "game_unhealthy"),
        other => panic!("expected game_unhealthy, got {other:?}"),
    }
    assert_eq!(code(sdk.health()), (409, "already_ended".into()));
}

#[test]
fn the_warm_up_hook_runs_the_games_warm_up_and_waits_for_it() {
    let vm = vm();
    // A game that never asked for warm-ups: the agent does not wait.
    let t = Instant::now();
    vm.server.prewarm_game(1, Duration::from_secs(5));
    assert!(t.elapsed() < Duration::from_secs(1));

    let sdk = Sdk::new(&vm.addr.to_string());
    sdk.initialised_with_warm_ups().expect("initialised");
    let (tx, warmed) = mpsc::channel();
    let game = {
        let sdk = sdk.clone();
        std::thread::spawn(move || {
            for _ in 0..2 {
                let ask = sdk.prewarm().expect("a warm-up");
                std::thread::sleep(Duration::from_millis(100)); // the game's warm-up
                tx.send(ask.wall_clock_ms).expect("send");
                sdk.prewarmed().expect("prewarmed");
            }
        })
    };
    for clock in [11, 12] {
        vm.server.prewarm_game(clock, Duration::from_secs(5));
        // Returned only after the game's warm-up was done.
        assert_eq!(warmed.try_recv(), Ok(clock));
    }
    game.join().expect("game");
    assert_eq!(sdk.session().expect("session").phase, Phase::Waiting);
}
