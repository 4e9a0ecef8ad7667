//! hostd's gateway for real: players' websockets through the gateway to the game servers in real
//! QEMU (TCG) VMs, with session tickets minted the way the matchmaking server mints them (its
//! own `Auth`), and forged ones made with `jsonwebtoken`.
//!
//! Two tests, so that at most two VMs run at once: one without VMs (the refusals that need no
//! session) and one with two sessions live on the host.

use anyhow::{bail, Context, Result};
use base64::Engine;
use berth_hostd::gateway::{self, GatewayStats};
use berth_hostd::pool::ActivateRequest;
use berth_protocol::game::{GameAnswer, Welcome};
use berth_protocol::{PlayerId, SessionId};
use berth_server::auth::Auth;
use berth_server::config::AuthConfig;
use berth_testkit::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const WAIT: Duration = Duration::from_secs(10);

fn auth() -> Auth {
    Auth::new(&AuthConfig {
        secret: "gateway-test-secret-0123".into(),
        ..AuthConfig::default()
    })
    .expect("test auth")
}

fn key_a() -> String {
    "a1".repeat(32)
}

fn key_b() -> String {
    "b2".repeat(32)
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn sid(s: &str) -> SessionId {
    SessionId::new(s).expect("valid")
}

fn pid(p: &str) -> PlayerId {
    PlayerId::new(p).expect("valid")
}

/// A ticket as the server mints it.
fn ticket(key_hex: &str, session: &str, player: &str) -> String {
    auth()
        .ticket(key_hex, &sid(session), &pid(player), 60_000)
        .expect("mint")
        .0
}

fn claims(session: &str, player: &str, exp_s: u64) -> serde_json::Value {
    let now_s = now_ms() / 1000;
    serde_json::json!({"sub": player, "sid": session, "aud": "berth-ticket", "iss": "berth",
        "exp": exp_s, "iat": now_s, "jti": format!("forged-{}", now_ms())})
}

/// A ticket made by hand: header `kid`, any claims, signed with `key_hex`.
fn forge(kid: &str, claims: &serde_json::Value, key_hex: &str) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(&unhex(key_hex)),
    )
    .expect("encode")
}

fn activation(session: &str, players: &[&str], key_hex: &str) -> ActivateRequest {
    ActivateRequest {
        session_id: sid(session),
        image: "arena".into(),
        players: players.iter().map(|p| pid(p)).collect(),
        teams: players.iter().map(|p| vec![pid(p)]).collect(),
        params: serde_json::json!({"time_limit_s": 600, "abandon_after_s": 600}),
        ticket_key: key_hex.into(),
        deadline_ms: 0,
    }
}

/// Joins with `ticket` and returns the refusal: (error code, close code, close reason).
async fn refusal(gw: SocketAddr, ticket: &str) -> Result<(String, u16, String)> {
    Ok(GameWs::join(gw, ticket).await?.refused(WAIT).await?)
}

fn refused(code: &str, close: u16) -> (String, u16, String) {
    (code.into(), close, code.into())
}

/// The game's hello, which it sends first on every connection.
async fn hello(ws: &mut GameWs, session: &str) -> Result<()> {
    match ws.next(WAIT).await? {
        Heard::Answer(GameAnswer::Hello { session_id, .. }) if session_id.as_str() == session => {
            Ok(())
        }
        other => bail!("expected the hello of {session}, heard {other:?}"),
    }
}

/// The game's answer to the join (pongs and states that came first are skipped).
async fn welcome(ws: &mut GameWs, player: &str) -> Result<Welcome> {
    match ws
        .until(WAIT, |h| {
            matches!(
                h,
                Heard::Answer(GameAnswer::Welcome(_) | GameAnswer::Error { .. })
            )
        })
        .await?
    {
        Heard::Answer(GameAnswer::Welcome(w)) if w.player.as_str() == player => Ok(w),
        other => bail!("expected {player}'s welcome, heard {other:?}"),
    }
}

/// A `ping` → `pong` round trip through the gateway.
async fn ping(ws: &mut GameWs, nonce: u64) -> Result<Duration> {
    let t0 = Instant::now();
    ws.send_text(&serde_json::json!({"type": "ping", "nonce": nonce}).to_string())
        .await?;
    ws.until(
        WAIT,
        |h| matches!(h, Heard::Answer(GameAnswer::Pong { nonce: n, .. }) if *n == nonce),
    )
    .await
    .with_context(|| format!("pong {nonce}"))?;
    Ok(t0.elapsed())
}

fn count(map: &std::collections::BTreeMap<String, u64>, key: &str) -> u64 {
    map.get(key).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_that_need_no_vm_and_the_stats_on_the_control_api() -> Result<()> {
    let sb = Sandbox::start_with("gateway-novm", vec![], false).await?;
    let gw = gateway::start(sb.pool.clone(), SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = gw.addr;
    let control = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let control_addr = control.local_addr()?;
    let router = berth_hostd::control::router(sb.pool.clone(), Some(gw.meter()));
    let control_task = tokio::spawn(async move { axum::serve(control, router).await });

    // Silent after connecting: refused once 5 s have passed (runs while the rest goes on).
    let silent = tokio::spawn(async move {
        let t0 = Instant::now();
        let mut ws = GameWs::connect(addr).await?;
        let refused = ws.refused(WAIT).await?;
        anyhow::Ok((refused, t0.elapsed()))
    });

    assert_eq!(
        refusal(addr, "not-a-jwt").await?,
        refused("bad_ticket", 4401)
    );
    assert_eq!(
        refusal(addr, &ticket(&key_a(), "nobody-here", "alice")).await?,
        refused("unknown_session", 4404)
    );
    let mut ws = GameWs::connect(addr).await?;
    ws.send_text(r#"{"type":"ping","nonce":1}"#).await?;
    assert_eq!(ws.refused(WAIT).await?, refused("join_first", 4400));
    // The latency probe: 204, not cached, timeable from any page.
    let probe = reqwest::get(format!("http://{addr}/v1/probe")).await?;
    assert_eq!(probe.status(), 204);
    let header = |name: &str| probe.headers().get(name).and_then(|v| v.to_str().ok());
    assert_eq!(header("cache-control"), Some("no-store"));
    assert_eq!(header("access-control-allow-origin"), Some("*"));
    assert_eq!(header("timing-allow-origin"), Some("*"));
    let mut ws = GameWs::connect(addr).await?;
    ws.send_text(r#"{"type":"join"}"#).await?;
    assert_eq!(ws.refused(WAIT).await?, refused("join_first", 4400));
    let mut ws = GameWs::connect(addr).await?;
    ws.send_binary(br#"{"type":"join","ticket":"x"}"#).await?;
    assert_eq!(ws.refused(WAIT).await?, refused("join_first", 4400));
    // Over 4 KiB: closed with 1009 and no error frame.
    let mut ws = GameWs::connect(addr).await?;
    let big = format!(r#"{{"type":"join","ticket":"{}"}}"#, "x".repeat(5000));
    ws.send_text(&big).await?;
    assert_eq!(
        ws.next(WAIT).await?,
        Heard::Close(1009, "message_too_big".into())
    );
    // Gone before a join: nothing to refuse.
    GameWs::connect(addr).await?.close().await?;

    let (timed_out, after) = silent.await??;
    assert_eq!(timed_out, refused("join_timeout", 4408));
    assert!(
        after >= gateway::JOIN_TIMEOUT && after < gateway::JOIN_TIMEOUT + Duration::from_secs(3),
        "refused after {after:?}"
    );

    // The control API serves the same stats the library hands out.
    let stats = berth_hostd::control::Client::new(control_addr)
        .gateway()
        .await?;
    assert_eq!(stats.listen, addr);
    assert_eq!(count(&stats.refused, "bad_ticket"), 1);
    assert_eq!(count(&stats.refused, "unknown_session"), 1);
    assert_eq!(count(&stats.refused, "join_first"), 3);
    assert_eq!(count(&stats.refused, "join_timeout"), 1);
    assert_eq!(count(&stats.refused, "message_too_big"), 1);
    assert_eq!(stats.connections.total, 8);
    assert_eq!(stats.connections.admitted, 0);
    assert_eq!(stats.forwarded.to_game, 0);
    let raw: serde_json::Value = reqwest::get(format!("http://{control_addr}/v1/gateway"))
        .await?
        .json()
        .await?;
    for key in [
        "listen",
        "connections",
        "refused",
        "closed",
        "forwarded",
        "overhead_us",
    ] {
        assert!(raw.get(key).is_some(), "{key} in {raw}");
    }
    assert!(raw["overhead_us"]["to_client"]["p99"].is_u64());

    // Stopping closes a connection still waiting to join with 1001.
    let mut waiting = GameWs::connect(addr).await?;
    let meter = gw.meter();
    let (refused_on_stop, ()) = tokio::join!(waiting.refused(WAIT), gw.shutdown());
    assert_eq!(refused_on_stop?, refused("shutting_down", 1001));
    assert_eq!(meter.stats().connections.open, 0);
    assert!(
        GameWs::connect(addr).await.is_err(),
        "a stopped gateway accepts nothing"
    );
    control_task.abort();
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn players_reach_their_own_game_through_the_gateway() -> Result<()> {
    let sb = Sandbox::docked("gateway").await?;
    let (a, b) = tokio::join!(
        sb.pool
            .activate(activation("gw-a", &["alice", "bob"], &key_a())),
        sb.pool.activate(activation("gw-b", &["carol"], &key_b())),
    );
    let (a, b) = (a?, b?);
    let gw = gateway::start(sb.pool.clone(), SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = gw.addr;
    let status = serde_json::to_string(&sb.pool.status())?;
    assert!(
        !status.contains(&key_a()) && !status.contains(&key_b()),
        "ticket keys never show in status"
    );
    // The key and players are on record, so that a restarted hostd adopting the VM gates it.
    let record = berth_hostd::driver::VmRecord::load(&sb.dir.join("vms").join(a.vm_id.as_str()))
        .context("gw-a's record")?;
    assert_eq!(record.ticket_key, key_a());
    assert_eq!(record.players, vec![pid("alice"), pid("bob")]);
    let gate = sb.pool.gate(&sid("gw-a")).context("gw-a is gated")?;
    assert_eq!((gate.vm_id, gate.key), (a.vm_id.clone(), unhex(&key_a())));
    let shown = format!("{:?}", sb.pool.gate(&sid("gw-b")).context("gw-b is gated")?);
    assert!(
        shown.contains("redacted") && !shown.contains("178, 178"),
        "{shown}"
    );

    // A valid ticket: the game's hello, its answer to the join, and a ping round trip.
    let alice_ticket = ticket(&key_a(), "gw-a", "alice");
    let mut alice = GameWs::join(addr, &alice_ticket).await?;
    hello(&mut alice, "gw-a").await?;
    let w = welcome(&mut alice, "alice").await?;
    assert_eq!(w.session_id.as_str(), "gw-a");
    ping(&mut alice, 7).await?;

    // The same ticket while its connection lives: refused; the live one is untouched.
    assert_eq!(
        refusal(addr, &alice_ticket).await?,
        refused("ticket_in_use", 4409)
    );
    ping(&mut alice, 8).await?;

    // Frames that are not one text line are refused; the connection stays.
    alice.send_binary(b"{}").await?;
    alice
        .until(
            WAIT,
            |h| matches!(h, Heard::Answer(GameAnswer::Error { code, .. }) if code == "bad_frame"),
        )
        .await?;
    alice.send_text("{\"type\":\"ping\",\n\"nonce\":1}").await?;
    alice
        .until(
            WAIT,
            |h| matches!(h, Heard::Answer(GameAnswer::Error { code, .. }) if code == "bad_frame"),
        )
        .await?;
    ping(&mut alice, 9).await?;

    // Another player of the session joins alongside.
    let mut bob = GameWs::join(addr, &ticket(&key_a(), "gw-a", "bob")).await?;
    hello(&mut bob, "gw-a").await?;

    // A newer ticket of the same player replaces the older connection.
    let newer = ticket(&key_a(), "gw-a", "alice");
    let mut alice2 = GameWs::join(addr, &newer).await?;
    assert_eq!(alice.refused(WAIT).await?, refused("replaced", 4409));
    hello(&mut alice2, "gw-a").await?;
    welcome(&mut alice2, "alice").await?;
    // A ticket may be used again once its connection closed (phones reconnect).
    alice2.close().await?;
    let mut alice3 = GameWs::join(addr, &newer).await?;
    hello(&mut alice3, "gw-a").await?;
    assert!(welcome(&mut alice3, "alice").await?.rejoined);
    ping(&mut alice3, 10).await?;

    // Each session's ticket leads to its own VM, and only there.
    let mut carol = GameWs::join(addr, &ticket(&key_b(), "gw-b", "carol")).await?;
    hello(&mut carol, "gw-b").await?;
    welcome(&mut carol, "carol").await?;
    let exp = now_ms() / 1000 + 60;
    // B's ticket (signed with B's key) presented as A's: A's key does not verify it.
    let relabelled = forge("gw-a", &claims("gw-b", "carol", exp), &key_b());
    assert_eq!(
        refusal(addr, &relabelled).await?,
        refused("bad_ticket", 4401)
    );
    // Signed with A's key but naming B.
    let crossed = forge("gw-a", &claims("gw-b", "alice", exp), &key_a());
    assert_eq!(
        refusal(addr, &crossed).await?,
        refused("wrong_session", 4401)
    );
    // A player of A with a real ticket for B is not one of B's players.
    assert_eq!(
        refusal(addr, &ticket(&key_b(), "gw-b", "alice")).await?,
        refused("not_a_player", 4401)
    );

    // Expired, forged, not a player, `none`, garbage, unknown session.
    let expired = forge("gw-a", &claims("gw-a", "alice", exp - 120), &key_a());
    assert_eq!(
        refusal(addr, &expired).await?,
        refused("ticket_expired", 4401)
    );
    let forged = ticket(&"00".repeat(32), "gw-a", "alice");
    assert_eq!(refusal(addr, &forged).await?, refused("bad_ticket", 4401));
    assert_eq!(
        refusal(addr, &ticket(&key_a(), "gw-a", "mallory")).await?,
        refused("not_a_player", 4401)
    );
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none = format!(
        "{}.{}.",
        b64(serde_json::json!({"alg": "none", "kid": "gw-a"})),
        b64(claims("gw-a", "alice", exp))
    );
    assert_eq!(refusal(addr, &none).await?, refused("bad_ticket", 4401));
    assert_eq!(
        refusal(addr, "eyJhbGciOiJIUzI1NiJ9.garbage.garbage").await?,
        refused("bad_ticket", 4401)
    );
    assert_eq!(
        refusal(addr, &ticket(&key_a(), "gw-nowhere", "alice")).await?,
        refused("unknown_session", 4404)
    );

    // Over 4 KiB after the join: closed with 1009.
    bob.send_text(&"x".repeat(5000)).await?;
    assert_eq!(
        bob.until(WAIT, |h| matches!(h, Heard::Close(..))).await?,
        Heard::Close(1009, "message_too_big".into())
    );

    // A flood: refused frame by frame, then closed with 4429.
    let mut flood = GameWs::join(addr, &ticket(&key_b(), "gw-b", "carol")).await?;
    assert_eq!(carol.refused(WAIT).await?, refused("replaced", 4409));
    hello(&mut flood, "gw-b").await?;
    welcome(&mut flood, "carol").await?;
    for nonce in 0..200 {
        let ping = format!(r#"{{"type":"ping","nonce":{nonce}}}"#);
        if flood.send_text(&ping).await.is_err() {
            break; // already closed
        }
    }
    assert_eq!(flood.refused(WAIT).await?, refused("rate_limited", 4429));

    // The gateway's own overhead, seen from outside: ping round trips through it against
    // round trips straight to the game's port, on the same VM.
    let mut carol = GameWs::join(addr, &ticket(&key_b(), "gw-b", "carol")).await?;
    hello(&mut carol, "gw-b").await?;
    welcome(&mut carol, "carol").await?;
    let mut through = Vec::new();
    for nonce in 1000..1100 {
        through.push(ping(&mut carol, nonce).await?);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut direct = direct_round_trips(b.game_addr, 100).await?;
    let p50 = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    eprintln!(
        "ping round trip p50: through the gateway {:?}, straight to the game {:?}",
        p50(&mut through),
        p50(&mut direct)
    );

    // A killed VM closes its players' connections with game_over / 1001, as a destroyed one
    // does: its game's socket closes a moment before the pool sees the VM go.
    signal(a.pid, nix::sys::signal::Signal::SIGKILL)?;
    assert_eq!(alice3.refused(WAIT).await?, refused("game_over", 1001));
    let deadline = Instant::now() + WAIT;
    while sb.pool.gate(&sid("gw-a")).is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        refusal(addr, &ticket(&key_a(), "gw-a", "bob")).await?,
        refused("unknown_session", 4404)
    );
    // The other session is untouched.
    ping(&mut carol, 2000).await?;

    // Connections end a moment after their close handshake.
    let deadline = Instant::now() + WAIT;
    while gw.stats().connections.open > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = gw.stats();
    eprintln!("gateway stats: {}", serde_json::to_string_pretty(&stats)?);
    check_stats(&stats);

    // Stopping the gateway closes what is left with 1001.
    let meter = gw.meter();
    let (on_stop, ()) = tokio::join!(carol.refused(WAIT), gw.shutdown());
    assert_eq!(on_stop?, refused("shutting_down", 1001));
    assert_eq!(meter.stats().connections.open, 0);
    sb.finish().await
}

fn check_stats(stats: &GatewayStats) {
    let c = &stats.connections;
    assert_eq!((c.open, c.playing), (1, 1), "only carol's last connection");
    assert_eq!(c.admitted, 7);
    let refused = |code| count(&stats.refused, code);
    assert_eq!(refused("ticket_in_use"), 1);
    assert_eq!(refused("bad_ticket"), 4);
    assert_eq!(refused("wrong_session"), 1);
    assert_eq!(refused("not_a_player"), 2);
    assert_eq!(refused("ticket_expired"), 1);
    assert_eq!(refused("unknown_session"), 2);
    assert_eq!(refused("bad_frame"), 2);
    assert!(refused("rate_limited") > 20);
    let closed = |reason| count(&stats.closed, reason);
    assert_eq!(closed("replaced"), 2);
    assert_eq!(closed("client_closed"), 1);
    assert_eq!(closed("message_too_big"), 1);
    assert_eq!(closed("rate_limited"), 1);
    assert_eq!(closed("game_over"), 1);
    assert!(stats.forwarded.to_game >= 100 && stats.forwarded.to_client >= 100);
    for o in [&stats.overhead_us.to_game, &stats.overhead_us.to_client] {
        assert!(o.p50 <= o.p99 && o.p99 <= o.max && o.max > 0, "{o:?}");
    }
}

/// Ping round trips straight to a game port (what the gateway adds to).
async fn direct_round_trips(game: SocketAddr, n: u64) -> Result<Vec<Duration>> {
    let stream = tokio::net::TcpStream::connect(game).await?;
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    let mut out = Vec::new();
    for nonce in 0..n {
        let t0 = Instant::now();
        wr.write_all(format!("{{\"type\":\"ping\",\"nonce\":{nonce}}}\n").as_bytes())
            .await?;
        loop {
            let line = tokio::time::timeout(WAIT, lines.next_line())
                .await
                .context("no pong")??
                .context("closed")?;
            if let Ok(GameAnswer::Pong { nonce: n, .. }) = serde_json::from_str(&line) {
                if n == nonce {
                    break;
                }
            }
        }
        out.push(t0.elapsed());
        // Paced like the round trips through the gateway.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    Ok(out)
}
