//! berth-client against the real server, in this process on port 0 (memory store).

use anyhow::{bail, Result};
use berth_client::{Backoff, ClientError, PlayClient, PlayConfig};
use berth_protocol::play::ServerMessage;
use berth_protocol::{DequeueReason, ErrorCode};
use berth_server::app::Server;
use berth_testkit::fixtures::{server_config, token};
use std::time::Duration;

fn url(s: &Server) -> String {
    format!("ws://{}/v1/play", s.addr)
}

#[tokio::test]
async fn hello_queue_ping_cancel_with_the_token_in_hello_or_in_the_header() -> Result<()> {
    let s = Server::start(server_config()).await?;
    for in_header in [false, true] {
        let mut config = PlayConfig::new(url(&s), token("alice"));
        config.token_in_header = in_header;
        let mut c = PlayClient::connect(config).await?;
        let welcome = c.welcome.clone().expect("welcome");
        assert_eq!(welcome.player.as_str(), "alice");
        assert!(welcome.ping_interval > Duration::ZERO);
        c.queue("duel", "local", None, Some(1200.0)).await?;
        let status = c.recv().await?;
        assert!(
            matches!(status, ServerMessage::QueueStatus { .. }),
            "{status:?}"
        );
        let nonce = c.ping().await?;
        let pong = c
            .until(Duration::from_secs(5), |m| {
                matches!(m, ServerMessage::Pong { .. })
            })
            .await?;
        assert!(matches!(pong, ServerMessage::Pong { nonce: n, .. } if n == nonce));
        c.cancel().await?;
        match c
            .until(Duration::from_secs(5), |m| {
                matches!(m, ServerMessage::Dequeued { .. })
            })
            .await?
        {
            ServerMessage::Dequeued { reason, .. } => assert_eq!(reason, DequeueReason::Cancelled),
            other => bail!("{other:?}"),
        }
        c.close().await?;
    }
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_bad_token_is_a_final_refusal_with_its_code() -> Result<()> {
    let s = Server::start(server_config()).await?;
    let err = PlayClient::connect(PlayConfig::new(url(&s), "not-a-jwt"))
        .await
        .expect_err("refused");
    match &err {
        ClientError::Refused { code, .. } => assert_eq!(*code, ErrorCode::BadToken),
        other => bail!("{other}"),
    }
    assert!(err.is_final());
    assert_eq!(err.code(), "bad_token");
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_reconnect_resumes_the_queued_ticket() -> Result<()> {
    let s = Server::start(server_config()).await?;
    let mut c = PlayClient::connect(PlayConfig::new(url(&s), token("bob"))).await?;
    c.queue("duel", "local", None, None).await?;
    let ServerMessage::QueueStatus { ticket, .. } = c.recv().await? else {
        bail!("no queue_status");
    };
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(100), 1);
    let mut c = c.reconnect(&mut backoff, 5).await?;
    match c.recv().await? {
        ServerMessage::QueueStatus { ticket: again, .. } => assert_eq!(again, ticket),
        other => bail!("expected the same ticket again, got {other:?}"),
    }
    c.close().await?;
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn raw_frames_get_the_servers_answers_and_the_close_arrives() -> Result<()> {
    let s = Server::start(server_config()).await?;
    let mut c = PlayClient::open(&url(&s), None).await?;
    c.raw_binary(vec![1, 2, 3]).await?;
    match c.recv().await? {
        ServerMessage::Error { code, .. } => assert_eq!(code, ErrorCode::BinaryNotSupported),
        other => bail!("{other:?}"),
    }
    let closed = c.closed().await?.expect("a close frame");
    assert_eq!(closed.code, Some(4400));
    s.shutdown().await;
    Ok(())
}
