//! The player websocket on a real socket: auth, resume, queueing, and every kind of bad input.

mod common;

use anyhow::Context;
use anyhow::Result;
use base64::Engine;
use berth_client::probe::{stall, Probe};
use berth_protocol::play::{ClientMessage, PartySpec, ServerMessage};
use berth_server::app::Server;
use common::*;
use std::time::Duration;

async fn server() -> Result<Server> {
    Server::start(config()).await
}

#[tokio::test]
async fn hello_by_message_or_by_header() -> Result<()> {
    let s = server().await?;
    let mut a = common::player(&s, "alice").await?;
    a.ping_pong(7).await?;
    let mut b = common::open(&s, Some(&token("bob"))).await?;
    b.send(&ClientMessage::Hello { v: 1, token: None }).await?;
    assert!(
        matches!(b.recv().await?, ServerMessage::Welcome { player, .. } if player.as_str() == "bob")
    );
    s.shutdown().await;
    Ok(())
}

fn b64(v: serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn bad_tokens_are_refused_with_their_code_and_closed() -> Result<()> {
    let s = server().await?;
    let now = berth_server::util::now_ms() / 1000;
    let other_aud = {
        let mut c = config();
        c.auth.audience = "someone-else".into();
        berth_server::auth::Auth::new(&c.auth)?.mint("eve", berth_server::auth::Role::Player, 60)?
    };
    let wrong_secret = {
        let mut c = config();
        c.auth.secret = "another-secret-0123456789".into();
        berth_server::auth::Auth::new(&c.auth)?.mint("eve", berth_server::auth::Role::Player, 60)?
    };
    let alg_none = format!(
        "{}.{}.",
        b64(serde_json::json!({"alg":"none","typ":"JWT"})),
        b64(serde_json::json!({"sub":"eve","iss":"berth","aud":"berth","exp": now + 60}))
    );
    let expired = {
        let claims = berth_server::auth::Claims {
            sub: "eve".into(),
            iss: "berth".into(),
            aud: "berth".into(),
            exp: now - 3600,
            iat: now - 7200,
            role: berth_server::auth::Role::Player,
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )?
    };
    let admin = admin_token();
    for (tok, code) in [
        (Some(other_aud), "wrong_audience"),
        (Some(wrong_secret), "bad_signature"),
        (Some(alg_none), "bad_algorithm"),
        (Some(expired), "expired_token"),
        (Some("garbage".to_owned()), "bad_token"),
        (Some(admin), "wrong_role"),
        (None, "missing_token"),
    ] {
        let mut c = common::open(&s, None).await?;
        c.send(&ClientMessage::Hello { v: 1, token: tok }).await?;
        match c.recv().await? {
            ServerMessage::Error { code: got, .. } => {
                // `alg: none` is refused either as an algorithm or as a malformed token.
                assert!(
                    got == code || (code == "bad_algorithm" && got == "bad_token"),
                    "{code}: got {got}"
                );
            }
            other => panic!("{code}: expected an error, got {other:?}"),
        }
        assert_eq!(close_code(&c.closed().await?), 4401, "{code}");
    }
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn protocol_errors_before_hello_close_the_connection() -> Result<()> {
    let s = server().await?;
    let mut c = common::open(&s, None).await?;
    c.send(&ClientMessage::Hello {
        v: 99,
        token: Some(token("a")),
    })
    .await?;
    c.expect_error("unsupported_version").await?;
    assert_eq!(close_code(&c.closed().await?), 4400);

    let mut c = common::open(&s, None).await?;
    c.send(&queue("duel", "eu")).await?;
    c.expect_error("hello_required").await?;
    assert_eq!(close_code(&c.closed().await?), 4400);

    let mut c = common::open(&s, None).await?;
    c.raw_binary(vec![1, 2, 3]).await?;
    c.expect_error("binary_not_supported").await?;
    assert_eq!(close_code(&c.closed().await?), 4400);
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn hello_timeout_closes() -> Result<()> {
    let mut cfg = config();
    cfg.timeouts.hello_ms = 300;
    let s = Server::start(cfg).await?;
    let mut c = common::open(&s, None).await?;
    c.expect_error("hello_timeout").await?;
    assert_eq!(close_code(&c.closed().await?), 4408);
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn bad_messages_get_codes_and_the_connection_lives_on() -> Result<()> {
    let s = server().await?;
    let mut c = common::player(&s, "carol").await?;
    c.raw("{not json".into()).await?;
    c.expect_error("bad_json").await?;
    c.raw(r#"{"type":"teleport"}"#.into()).await?;
    c.expect_error("unknown_type").await?;
    c.raw(r#"{"type":"queue","mode":7}"#.into()).await?;
    c.expect_error("bad_message").await?;
    c.raw_binary(vec![0; 10]).await?;
    c.expect_error("binary_not_supported").await?;
    c.send(&ClientMessage::Hello { v: 1, token: None }).await?;
    c.expect_error("already_hello").await?;
    c.send(&queue("chess", "eu")).await?;
    c.expect_error("unknown_mode").await?;
    c.send(&queue("duel", "mars")).await?;
    c.expect_error("unknown_region").await?;
    // A huge region is quoted back cut short, not whole.
    c.send(&queue("duel", &"r".repeat(10_000))).await?;
    match c.recv().await? {
        ServerMessage::Error { code, message } if code == "unknown_region" => {
            assert!(message.len() < 200, "{} bytes: {message}", message.len());
            assert!(message.contains("rrrr…"), "{message}");
        }
        other => panic!("expected unknown_region, got {other:?}"),
    }
    c.send(&queue(&"m".repeat(10_000), "eu")).await?;
    match c.recv().await? {
        ServerMessage::Error { code, message } if code == "unknown_mode" => {
            assert!(message.len() < 300, "{} bytes: {message}", message.len());
        }
        other => panic!("expected unknown_mode, got {other:?}"),
    }
    c.send(&ClientMessage::Queue {
        mode: "arena".into(),
        region: Some("eu".into()),
        latencies: None,
        party: Some(PartySpec {
            id: "p1".into(),
            size: 5,
        }),
        skill: None,
    })
    .await?;
    c.expect_error("party_too_big").await?;
    c.send(&ClientMessage::Cancel {}).await?;
    c.expect_error("not_queued").await?;
    c.ping_pong(1).await?;
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn oversize_frames_close_with_1009_and_others_are_unaffected() -> Result<()> {
    let s = server().await?;
    let mut bystander = common::player(&s, "dave").await?;
    let mut c = common::player(&s, "mallory").await?;
    let huge = format!(
        r#"{{"type":"ping","nonce":1,"pad":"{}"}}"#,
        "x".repeat(64 * 1024)
    );
    let _ = c.raw(huge).await;
    assert_eq!(close_code(&c.closed().await?), 1009);
    bystander.ping_pong(2).await?;
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_connection_that_never_finishes_its_upgrade_is_closed() -> Result<()> {
    let mut cfg = config();
    cfg.timeouts.header_read_ms = 300;
    let s = Server::start(cfg).await?;
    let wait = Duration::from_secs(5);
    let half = b"GET /v1/play HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n";
    for sent in [&b""[..], &half[..]] {
        let stalled = stall(s.addr, sent, wait).await?;
        let after = stalled.closed_after.context("still open after 5 s")?;
        assert!(
            after < Duration::from_millis(1500),
            "closed after {after:?}"
        );
    }
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn connections_not_past_hello_are_capped() -> Result<()> {
    let mut cfg = config();
    cfg.limits.max_pending = 1;
    let s = Server::start(cfg).await?;
    // A player past hello holds no seat: the next signs in too.
    let mut alice = common::player(&s, "alice").await?;
    let mut bob = common::player(&s, "bob").await?;
    // One connection that says nothing takes the one seat…
    let silent = tokio::spawn(stall(s.addr, b"", Duration::from_secs(2)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // …so the next is refused before its upgrade, with a code.
    match common::open(&s, None).await {
        Err(e) => match e.downcast_ref::<berth_client::ClientError>() {
            Some(berth_client::ClientError::Http { status: 503, body }) => {
                assert!(body.contains("too_many_connections"), "{body}");
            }
            _ => panic!("expected a 503, got {e:?}"),
        },
        Ok(_) => panic!("a connection over the cap was let in"),
    }
    silent.abort();
    let metrics = s.ctx.metrics.render();
    assert!(
        metrics.contains(r#"code="too_many_connections""#),
        "not counted"
    );
    alice.ping_pong(1).await?;
    bob.ping_pong(2).await?;
    s.shutdown().await;
    Ok(())
}

/// A signed-in player's socket driven by hand (nothing read until asked).
async fn probe(s: &Server, name: &str) -> Result<Probe> {
    let mut p = Probe::connect(&common::play_url(s), Some(&token(name))).await?;
    anyhow::ensure!(p.send_text(r#"{"type":"hello","v":1}"#).await, "hello");
    Ok(p)
}

#[tokio::test]
async fn a_flood_that_does_not_read_gets_its_4429_not_a_reset() -> Result<()> {
    let mut cfg = config();
    cfg.limits.messages_per_s = 5;
    cfg.limits.burst = 5;
    cfg.limits.rate_strikes = 10;
    let s = Server::start(cfg).await?;
    let mut bystander = common::player(&s, "erin").await?;
    let mut flooder = probe(&s, "flooder").await?;
    // Far more than the limit, all written before anything is read: the server closes with
    // most of it still unread in its receive buffer.
    let sent = flooder.flood(r#"{"type":"ping","nonce":1}"#, 2000).await;
    assert_eq!(sent, 2000);
    let end = flooder.until_closed(Duration::from_secs(10)).await?;
    let limited = end
        .texts
        .iter()
        .filter(|t| t.contains("rate_limited"))
        .count();
    assert!(limited >= 10, "{limited} rate_limited errors");
    assert!(end.closed.frame, "no close frame: {:?}", end.closed);
    assert_eq!(end.closed.code, Some(4429), "{:?}", end.closed);
    assert_eq!(end.closed.reason, "rate_limited");
    bystander.ping_pong(3).await?;
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_text_frame_that_is_not_utf8_closes_with_1007() -> Result<()> {
    let s = server().await?;
    // After hello…
    let mut p = probe(&s, "mallory").await?;
    assert!(p.send_invalid_utf8().await);
    let end = p.until_closed(Duration::from_secs(5)).await?;
    assert!(
        end.texts.iter().any(|t| t.contains("welcome")),
        "{:?}",
        end.texts
    );
    assert_eq!(
        (end.closed.frame, end.closed.code),
        (true, Some(1007)),
        "{:?}",
        end.closed
    );
    assert_eq!(end.closed.reason, "invalid_utf8");
    // …and as the very first frame.
    let mut p = Probe::connect(&common::play_url(&s), None).await?;
    assert!(p.send_invalid_utf8().await);
    let end = p.until_closed(Duration::from_secs(5)).await?;
    assert_eq!(end.closed.code, Some(1007), "{:?}", end.closed);
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn second_connection_replaces_the_first_and_keeps_the_ticket() -> Result<()> {
    let s = server().await?;
    let mut first = common::player(&s, "frank").await?;
    first.send(&queue("arena", "eu")).await?;
    let ticket = match first.recv().await? {
        ServerMessage::QueueStatus { ticket, .. } => ticket,
        other => panic!("expected queue_status, got {other:?}"),
    };
    let mut second = common::player(&s, "frank").await?;
    // Resumed: told it is still queued, same ticket.
    match second.recv().await? {
        ServerMessage::QueueStatus { ticket: t, .. } => assert_eq!(t, ticket),
        other => panic!("expected queue_status, got {other:?}"),
    }
    first
        .until(
            Duration::from_secs(5),
            |m| matches!(m, ServerMessage::Error { code, .. } if code == "replaced"),
        )
        .await?;
    assert_eq!(close_code(&first.closed().await?), 4409);
    second.send(&queue("duel", "eu")).await?;
    second.expect_error("already_queued").await?;
    second.send(&ClientMessage::Cancel {}).await?;
    second
        .until(
            Duration::from_secs(5),
            |m| matches!(m, ServerMessage::Dequeued { reason, .. } if reason == "cancelled"),
        )
        .await?;
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn away_past_the_grace_loses_the_ticket_within_it_keeps_it() -> Result<()> {
    let mut cfg = config();
    cfg.timeouts.reconnect_grace_ms = 1000;
    let s = Server::start(cfg).await?;
    let mut c = common::player(&s, "gina").await?;
    c.send(&queue("arena", "eu")).await?;
    assert!(matches!(c.recv().await?, ServerMessage::QueueStatus { .. }));
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = common::player(&s, "gina").await?;
    assert!(
        matches!(c.recv().await?, ServerMessage::QueueStatus { .. }),
        "resumed within grace"
    );
    drop(c);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let mut c = common::player(&s, "gina").await?;
    c.send(&ClientMessage::Cancel {}).await?;
    c.expect_error("not_queued").await?;
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn parties_are_capped_at_their_size() -> Result<()> {
    let s = server().await?;
    let party = |size| ClientMessage::Queue {
        mode: "arena".into(),
        region: Some("eu".into()),
        latencies: None,
        party: Some(PartySpec {
            id: "crew".into(),
            size,
        }),
        skill: Some(1000.0),
    };
    let mut a = common::player(&s, "p1").await?;
    let mut b = common::player(&s, "p2").await?;
    let mut c = common::player(&s, "p3").await?;
    a.send(&party(2)).await?;
    assert!(matches!(a.recv().await?, ServerMessage::QueueStatus { .. }));
    b.send(&party(2)).await?;
    assert!(matches!(b.recv().await?, ServerMessage::QueueStatus { .. }));
    c.send(&party(2)).await?;
    c.expect_error("party_full").await?;
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn without_hosts_a_match_ends_as_placement_failed_and_players_are_told() -> Result<()> {
    let mut cfg = config();
    cfg.timeouts.placing_ms = 500;
    let s = Server::start(cfg).await?;
    let mut a = common::player(&s, "hana").await?;
    let mut b = common::player(&s, "ivan").await?;
    a.send(&queue("duel", "eu")).await?;
    b.send(&queue("duel", "eu")).await?;
    for c in [&mut a, &mut b] {
        let m = c
            .until(Duration::from_secs(5), |m| {
                matches!(m, ServerMessage::SessionEnded { .. })
            })
            .await?;
        assert!(
            matches!(&m, ServerMessage::SessionEnded { reason, .. } if reason == "placement_failed"),
            "{m:?}"
        );
    }
    // Free to queue again.
    a.send(&queue("duel", "eu")).await?;
    assert!(matches!(
        a.until(Duration::from_secs(5), |m| !matches!(
            m,
            ServerMessage::Pong { .. }
        ))
        .await?,
        ServerMessage::QueueStatus { .. }
    ));
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_silent_player_is_closed_after_the_idle_timeout() -> Result<()> {
    let mut cfg = config();
    cfg.timeouts.idle_ms = 600;
    let s = Server::start(cfg).await?;
    let mut c = common::player(&s, "quiet").await?;
    assert_eq!(close_code(&c.closed().await?), 4408);
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_full_replica_refuses_with_server_full() -> Result<()> {
    let mut cfg = config();
    cfg.limits.max_players = 1;
    let s = Server::start(cfg).await?;
    let _first = common::player(&s, "one").await?;
    match common::open(&s, None).await {
        Err(e) => assert!(e.to_string().contains("503"), "{e}"),
        Ok(_) => panic!("a second player was let in"),
    }
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn shutdown_tells_players_to_reconnect() -> Result<()> {
    let s = server().await?;
    let mut c = common::player(&s, "leaving").await?;
    let stopping = tokio::spawn(s.shutdown());
    c.until(
        Duration::from_secs(5),
        |m| matches!(m, ServerMessage::Error { code, .. } if code == "shutting_down"),
    )
    .await?;
    assert_eq!(close_code(&c.closed().await?), 1001);
    stopping.await?;
    Ok(())
}
