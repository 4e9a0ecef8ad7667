//! Frames through the gateway for games other than the arena, on real VMs: a game on the
//! `frames` framing (text and binary frames both ways, its image's own frame-size and rate
//! limits with today's codes), and an unmodified game server from Debian's packages —
//! Wesnoth's wesnothd, no SDK — reached through `stream` framing, its tickets checked by the
//! gateway alone.

use anyhow::{bail, Context, Result};
use berth_hostd::gateway;
use berth_hostd::pool::ActivateRequest;
use berth_protocol::{PlayerId, SessionId};
use berth_server::auth::Auth;
use berth_server::config::AuthConfig;
use berth_testkit::*;
use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

fn auth() -> Auth {
    Auth::new(&AuthConfig {
        secret: "framing-test-secret-0123".into(),
        ..AuthConfig::default()
    })
    .expect("test auth")
}

fn key() -> String {
    "c3".repeat(32)
}

fn ticket(session: &str, player: &str) -> String {
    let (sid, pid) = (SessionId::new(session), PlayerId::new(player));
    auth()
        .ticket(&key(), &sid.expect("valid"), &pid.expect("valid"), 60_000)
        .expect("mint")
        .0
}

fn activation(image: &str, session: &str) -> ActivateRequest {
    ActivateRequest {
        session_id: SessionId::new(session).expect("valid"),
        image: image.into(),
        players: vec![PlayerId::new("alice").expect("valid")],
        teams: vec![],
        params: serde_json::Value::Null,
        ticket_key: key(),
        deadline_ms: 0,
    }
}

/// A pool with `game`'s substrate docked, one session of it active, and a gateway.
async fn one_session(game: &str) -> Result<(Sandbox, gateway::Gateway)> {
    let seeded = [game.to_owned()];
    let sb = Sandbox::start_custom(game, vec![test_game_config(game, 0)], &seeded, |_| {}).await?;
    sb.pool
        .wait_ready(game, 0, Duration::from_secs(120))
        .await?;
    sb.pool
        .activate(activation(game, &format!("{game}-1")))
        .await?;
    let gw = gateway::start(sb.pool.clone(), SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    Ok((sb, gw))
}

async fn next(ws: &mut GameWs) -> Result<Heard> {
    Ok(ws.next(WAIT).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_game_on_frames_gets_text_and_binary_frames_within_its_limits() -> Result<()> {
    let (sb, gw) = one_session("echo").await?;
    let mut ws = GameWs::join(gw.addr, &ticket("echo-1", "alice")).await?;
    // The join reached the game as a text frame, and its ticket was good for the SDK.
    match next(&mut ws).await? {
        Heard::Text(t) if t.contains("\"welcome\"") && t.contains("\"join_kind\": 1") => {}
        other => bail!("expected the echo's welcome, heard {other:?}"),
    }
    // Binary frames arrive whole (the game echoes them reversed) and text stays text.
    ws.send_binary(&[0, 1, 2, 255]).await?;
    assert_eq!(next(&mut ws).await?, Heard::Binary(vec![255, 2, 1, 0]));
    ws.send_text("{\"héllo\": \"wörld\"}").await?;
    assert_eq!(
        next(&mut ws).await?,
        Heard::Text("{\"héllo\": \"wörld\"}".into())
    );
    let edge = vec![7u8; 1024];
    ws.send_binary(&edge).await?;
    assert_eq!(next(&mut ws).await?, Heard::Binary(edge));
    // The image allows frames of 1,024 bytes: one more closes with 1009, as at the default.
    ws.send_binary(&[7u8; 1025]).await?;
    assert_eq!(
        ws.until(WAIT, |h| matches!(h, Heard::Close(..))).await?,
        Heard::Close(1009, "message_too_big".into())
    );

    // It allows 10 frames a second (bursts of 20): a flood is refused `rate_limited`.
    let mut ws = GameWs::join(gw.addr, &ticket("echo-1", "alice")).await?;
    next(&mut ws).await?;
    for _ in 0..30 {
        ws.send_binary(b"x").await?;
    }
    let refused = ws
        .until(WAIT, |h| matches!(h, Heard::Answer(_)))
        .await
        .context("a refusal")?;
    assert!(
        format!("{refused:?}").contains("rate_limited"),
        "{refused:?}"
    );
    ws.close().await?;
    gw.shutdown().await;
    sb.finish().await
}

/// wesnothd's first packet after the handshake: a u32 length, then that many bytes of gzip.
fn wml(bytes: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let body = bytes.get(4..4 + len)?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(body)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmodified_debian_server_is_reached_through_stream_framing() -> Result<()> {
    // Priming it proved "initialised" (its port accepted) and activating it "ready".
    let (sb, gw) = one_session("wesnothd").await?;

    // Tickets are the gateway's to check: a bad one never reaches the server.
    let mut bad = GameWs::join(gw.addr, "not-a-ticket").await?;
    assert_eq!(bad.refused(WAIT).await?.0, "bad_ticket");

    let mut ws = GameWs::join(gw.addr, &ticket("wesnothd-1", "alice")).await?;
    // Wesnoth's handshake, byte for byte: four zero bytes; it answers with a connection
    // number, then asks for the client's version in a gzipped WML packet.
    ws.send_binary(&[0, 0, 0, 0]).await?;
    let mut got = Vec::new();
    while wml(got.get(4..).unwrap_or_default()).is_none() {
        match next(&mut ws).await? {
            Heard::Binary(b) => got.extend(b),
            other => bail!("expected wesnothd's bytes, heard {other:?} after {got:?}"),
        }
    }
    let asked = wml(&got[4..]).context("a packet")?;
    assert_eq!(asked.trim(), "[version]\n[/version]");

    // Text frames are not part of a byte stream: refused, the connection stays.
    ws.send_text("hello").await?;
    let refused = ws.until(WAIT, |h| matches!(h, Heard::Answer(_))).await?;
    assert!(format!("{refused:?}").contains("bad_frame"), "{refused:?}");
    ws.close().await?;
    gw.shutdown().await;
    sb.finish().await
}
