//! The server's listener over TLS, with a CA made at test time: players over `wss://` as over
//! `ws://`, clients that do not trust the certificate (refused, and nobody else notices),
//! connections that never finish a handshake (closed after the header-read timeout), and
//! certificate files that cannot be used (a config error naming the key).

mod common;

use anyhow::{bail, Result};
use berth_client::probe::stall;
use berth_client::{ClientError, PlayClient, PlayConfig, Trust};
use berth_protocol::play::ServerMessage;
use berth_server::app::Server;
use berth_testkit::TestCa;
use common::*;
use std::time::Duration;

const HEADER_READ: Duration = Duration::from_millis(400);

async fn tls_server(ca: &TestCa) -> Result<Server> {
    let mut c = config();
    c.tls = Some(ca.files());
    c.timeouts.header_read_ms = HEADER_READ.as_millis() as u64;
    Server::start(c).await
}

fn wss(s: &Server, host: &str) -> String {
    format!("wss://{host}:{}/v1/play", s.addr.port())
}

/// `player` signed in over `url`, trusting `trust`.
async fn connect(url: String, player: &str, trust: Trust) -> Result<PlayClient, ClientError> {
    let mut config = PlayConfig::new(url, token(player));
    config.socket.trust = trust;
    PlayClient::connect(config).await
}

#[tokio::test]
async fn a_player_over_wss_signs_in_and_queues_as_over_ws() -> Result<()> {
    let ca = TestCa::new()?;
    let s = tls_server(&ca).await?;
    for host in ["127.0.0.1", "localhost"] {
        let mut p = connect(wss(&s, host), &format!("p-{host}"), ca.trust()).await?;
        p.ping_pong(1).await?;
        p.send(&queue("duel", "local")).await?;
        match p.recv().await? {
            ServerMessage::QueueStatus { mode, .. } if mode == "duel" => {}
            other => bail!("expected queue_status over wss, got {other:?}"),
        }
        p.close().await?;
    }
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_is_refused_and_the_server_carries_on() -> Result<()> {
    let ca = TestCa::new()?;
    let s = tls_server(&ca).await?;
    let mut alice = connect(wss(&s, "127.0.0.1"), "alice", ca.trust()).await?;
    let stranger = TestCa::new()?;
    for trust in [Trust::roots(), stranger.trust()] {
        match connect(wss(&s, "127.0.0.1"), "eve", trust).await {
            Err(e @ ClientError::Tls(_)) => {
                assert_eq!(e.code(), "tls");
                assert!(e.is_final(), "retrying cannot help: {e}");
            }
            other => bail!("expected a TLS handshake error, got {other:?}"),
        }
    }
    // Plain websocket to the TLS port: no upgrade, a failed handshake.
    let plain = format!("ws://127.0.0.1:{}/v1/play", s.addr.port());
    assert!(connect(plain, "eve", ca.trust()).await.is_err());
    // The signed-in player and new trusting clients are served as before.
    alice.ping_pong(2).await?;
    let mut bob = connect(wss(&s, "localhost"), "bob", ca.trust()).await?;
    bob.ping_pong(3).await?;
    eventually("three failed handshakes counted", async || {
        Ok(refused_total(&s, berth_net::TLS_HANDSHAKE_FAILED) == 3)
    })
    .await?;
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_connection_that_never_finishes_its_handshake_is_closed_after_the_header_timeout(
) -> Result<()> {
    let ca = TestCa::new()?;
    let s = tls_server(&ca).await?;
    let wait = Duration::from_secs(5);
    // No ClientHello at all, and half a TLS record (its header promises 512 bytes).
    let silent = stall(s.addr, b"", wait).await?;
    let half = stall(s.addr, b"\x16\x03\x01\x02\x00\x01\x00", wait).await?;
    for stalled in [&silent, &half] {
        let closed = stalled.closed_after;
        assert!(
            closed.is_some_and(|d| d >= HEADER_READ && d < HEADER_READ * 4),
            "{stalled:?}"
        );
        assert!(stalled.answer.is_empty(), "{stalled:?}");
    }
    eventually("two handshake timeouts counted", async || {
        Ok(refused_total(&s, berth_net::TLS_HANDSHAKE_TIMEOUT) == 2)
    })
    .await?;
    // The server carries on.
    let p = connect(wss(&s, "127.0.0.1"), "carol", ca.trust()).await?;
    p.close().await?;
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn unusable_certificate_files_fail_start_up_naming_the_key() -> Result<()> {
    let ca = TestCa::new()?;
    let other = TestCa::new()?;
    let start = |cert: std::path::PathBuf, key: std::path::PathBuf| {
        let mut c = config();
        c.tls = Some(berth_net::tls::TlsFiles { cert, key });
        Server::start(c)
    };
    let files = ca.files();
    let e = start(ca.dir().join("nonexistent.pem"), files.key.clone())
        .await
        .expect_err("no such file");
    assert!(
        format!("{e:#}").starts_with("tls.cert: cannot read"),
        "{e:#}"
    );
    let e = start(files.cert.clone(), ca.dir().join("nonexistent.pem"))
        .await
        .expect_err("no such file");
    assert!(
        format!("{e:#}").starts_with("tls.key: cannot read"),
        "{e:#}"
    );
    // The CA certificate is not a key; another CA's key does not fit this certificate.
    let e = start(files.cert.clone(), ca.ca())
        .await
        .expect_err("no key");
    assert!(format!("{e:#}").starts_with("tls.key:"), "{e:#}");
    let e = start(files.cert.clone(), other.files().key)
        .await
        .expect_err("a key of another certificate");
    assert!(format!("{e:#}").starts_with("tls.key:"), "{e:#}");
    Ok(())
}
