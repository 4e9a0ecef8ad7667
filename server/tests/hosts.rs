//! The host websocket on a real socket: credentials, register, and bad host input.

mod common;

use anyhow::{bail, Context, Result};
use berth_protocol::host::{HostMessage, HostVm, ServerToHost};
use berth_protocol::{HostId, SessionId, VmId};
use berth_server::app::Server;
use berth_server::auth::Role;
use berth_server::model::HostState;
use common::host::*;
use common::*;
use futures_util::SinkExt;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn only_host_credentials_open_the_host_socket() -> Result<()> {
    let s = Server::start(config()).await?;
    for token in [token("alice"), admin_token(), "junk".to_owned()] {
        let mut req = format!("ws://{}/v1/hosts", s.addr).into_client_request()?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        match tokio_tungstenite::connect_async(req).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
            other => bail!("expected 401, got {:?}", other.map(|_| ())),
        }
    }
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn register_must_come_first_name_the_credential_and_speak_this_version() -> Result<()> {
    let s = Server::start(config()).await?;
    let tok = auth().mint("h1", Role::Host, 60)?;

    let mut ws = host_socket(&s, &tok).await?;
    send(&mut ws, &heartbeat()).await?;
    expect_error(&mut ws, "register_required").await?;
    assert_eq!(close_of(&mut ws).await, 4400);

    let mut ws = host_socket(&s, &tok).await?;
    send(&mut ws, &register("h2", vec![])).await?;
    expect_error(&mut ws, "wrong_host").await?;
    assert_eq!(close_of(&mut ws).await, 4401);

    let mut ws = host_socket(&s, &tok).await?;
    let mut r = serde_json::to_value(register("h1", vec![]))?;
    r["v"] = 2.into();
    ws.send(Message::Text(r.to_string().into())).await?;
    expect_error(&mut ws, "unsupported_version").await?;
    assert_eq!(close_of(&mut ws).await, 4400);
    assert!(
        s.ctx.store.host(&HostId::new("h1")?).await?.is_none(),
        "nothing registered"
    );
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn bad_frames_get_codes_and_the_host_stays_connected() -> Result<()> {
    let s = Server::start(config()).await?;
    let mut ws = host_socket(&s, &auth().mint("h1", Role::Host, 60)?).await?;
    send(&mut ws, &register("h1", vec![])).await?;
    assert!(matches!(recv(&mut ws).await?, ServerToHost::Welcome { .. }));
    ws.send(Message::Text("{oops".into())).await?;
    expect_error(&mut ws, "bad_json").await?;
    ws.send(Message::Text(r#"{"type":"explode"}"#.into()))
        .await?;
    expect_error(&mut ws, "unknown_type").await?;
    ws.send(Message::Binary(vec![1].into())).await?;
    expect_error(&mut ws, "binary_not_supported").await?;
    send(&mut ws, &register("h1", vec![])).await?;
    expect_error(&mut ws, "already_registered").await?;
    // A host speaking about a session that is not placed on it changes nothing.
    let ghost = SessionId::new("s-not-mine")?;
    send(
        &mut ws,
        &HostMessage::Ended {
            session: ghost.clone(),
            vm: VmId::new("vm-x")?,
            reason: "game_over".into(),
            results: serde_json::Value::Null,
        },
    )
    .await?;
    expect_error(&mut ws, "foreign_session").await?;
    assert!(s.ctx.store.session(&ghost).await?.is_none());
    // Still registered and heard.
    send(&mut ws, &heartbeat()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let h = s
        .ctx
        .store
        .host(&HostId::new("h1")?)
        .await?
        .context("registered")?;
    assert!(h.images.is_empty(), "heartbeat applied");
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn reconciliation_destroys_vms_of_unknown_sessions() -> Result<()> {
    let s = Server::start(config()).await?;
    let mut ws = host_socket(&s, &auth().mint("h1", Role::Host, 60)?).await?;
    let vm = HostVm {
        vm: VmId::new("vm-old")?,
        session: SessionId::new("s-long-gone")?,
        image: "arena".into(),
    };
    send(&mut ws, &register("h1", vec![vm])).await?;
    assert!(matches!(recv(&mut ws).await?, ServerToHost::Welcome { .. }));
    match recv(&mut ws).await? {
        ServerToHost::Destroy { session } => assert_eq!(session.as_str(), "s-long-gone"),
        other => bail!("expected destroy, got {other:?}"),
    }
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_host_marked_lost_while_connected_is_asked_to_register_again() -> Result<()> {
    let s = Server::start(config()).await?;
    let mut ws = host_socket(&s, &auth().mint("h1", Role::Host, 60)?).await?;
    send(&mut ws, &register("h1", vec![])).await?;
    assert!(matches!(recv(&mut ws).await?, ServerToHost::Welcome { .. }));
    // The sweeper marked it lost (its heartbeats did not reach the store, say).
    let id = HostId::new("h1")?;
    let h = s.ctx.store.host(&id).await?.context("registered")?;
    assert!(
        s.ctx
            .store
            .mark_host(&id, h.last_seen_ms, HostState::Lost)
            .await?
    );
    send(&mut ws, &heartbeat()).await?;
    expect_error(&mut ws, "host_lost").await?;
    assert_eq!(close_of(&mut ws).await, 1001);
    let h = s.ctx.store.host(&id).await?.context("kept")?;
    assert_eq!(
        h.state,
        HostState::Lost,
        "a heartbeat does not revive a lost host"
    );
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn reports_in_the_outbox_are_answered_recorded_even_when_never_recordable() -> Result<()> {
    let s = Server::start(config()).await?;
    let mut ws = host_socket(&s, &auth().mint("h1", Role::Host, 60)?).await?;
    let ended = HostMessage::Ended {
        session: SessionId::new("s-not-mine")?,
        vm: VmId::new("vm-1")?,
        reason: String::new(),
        results: serde_json::json!({"winner": "a"}),
    };
    let with_outbox = register_with("h1", vec![], vec![ended, heartbeat()]);
    send(&mut ws, &with_outbox).await?;
    assert!(matches!(recv(&mut ws).await?, ServerToHost::Welcome { .. }));
    // Not this host's session: refused, but acknowledged so that hostd forgets it.
    expect_error(&mut ws, "foreign_session").await?;
    match recv(&mut ws).await? {
        ServerToHost::Recorded { session } => assert_eq!(session.as_str(), "s-not-mine"),
        other => bail!("expected recorded, got {other:?}"),
    }
    expect_error(&mut ws, "bad_outbox").await?;
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_outbox_report_is_recorded_before_reconciliation_could_call_its_session_lost(
) -> Result<()> {
    use berth_server::model::{PoolKey, Session, SessionState};
    let s = Server::start(config()).await?;
    // A session active on h1 whose game ended while h1's link was down: its VM is gone.
    let now = berth_protocol::now_ms();
    let session = Session {
        id: SessionId::new("s-ended-away")?,
        version: 0,
        pool: PoolKey {
            mode: "duel".into(),
            region: "eu".into(),
        },
        region: String::new(),
        region_reason: None,
        migration: None,
        image: "arena".into(),
        state: SessionState::Active,
        players: vec![],
        teams: vec![],
        ticket_key: "00".into(),
        params: serde_json::Value::Null,
        host: Some(HostId::new("h1")?),
        tried_hosts: vec![],
        vm: Some(VmId::new("vm-1")?),
        endpoint: None,
        created_ms: now,
        deadline_ms: now + 600_000,
        ends_by_ms: now + 600_000,
        history: vec![],
        end_reason: None,
        results: serde_json::Value::Null,
        match_ms: 0,
    };
    assert!(s.ctx.store.claim(&[], &session).await?);
    let mut ws = host_socket(&s, &auth().mint("h1", Role::Host, 60)?).await?;
    let ended = HostMessage::Ended {
        session: session.id.clone(),
        vm: VmId::new("vm-1")?,
        reason: "score".into(),
        results: serde_json::json!({"winner": 1}),
    };
    send(&mut ws, &register_with("h1", vec![], vec![ended])).await?;
    assert!(matches!(recv(&mut ws).await?, ServerToHost::Welcome { .. }));
    match recv(&mut ws).await? {
        ServerToHost::Recorded { session: r } => assert_eq!(r, session.id),
        other => bail!("expected recorded, got {other:?}"),
    }
    let stored = s.ctx.store.session(&session.id).await?.context("kept")?;
    assert_eq!(stored.end_reason.as_deref(), Some("score"), "not vm_lost");
    assert_eq!(stored.results["winner"], 1);
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_host_gets_sessions_of_its_own_region_only() -> Result<()> {
    let mut cfg = config();
    cfg.timeouts.placing_ms = 60_000;
    let s = Server::start(cfg).await?;
    let in_region = |host: &str, region: &str| {
        let mut r = register(host, vec![]);
        if let HostMessage::Register { region: r, .. } = &mut r {
            *r = Some(region.into());
        }
        r
    };
    // A host in `us` registers; a duel in `eu` forms, and is not placed on it.
    let mut us = host_socket(&s, &auth().mint("h-us", Role::Host, 60)?).await?;
    send(&mut us, &in_region("h-us", "us")).await?;
    assert!(matches!(recv(&mut us).await?, ServerToHost::Welcome { .. }));
    let mut a = common::player(&s, "reg-a").await?;
    let mut b = common::player(&s, "reg-b").await?;
    a.send(&queue("duel", "eu")).await?;
    b.send(&queue("duel", "eu")).await?;
    loop {
        match tokio::time::timeout(Duration::from_millis(1500), recv(&mut us)).await {
            Err(_) => break,
            Ok(Ok(ServerToHost::Activate { session, .. })) => bail!("{session} placed in us"),
            Ok(_) => continue,
        }
    }
    // A host in `eu` comes: the session is placed there.
    let mut eu = host_socket(&s, &auth().mint("h-eu", Role::Host, 60)?).await?;
    send(&mut eu, &in_region("h-eu", "eu")).await?;
    let activated = async {
        loop {
            if let ServerToHost::Activate { .. } = recv(&mut eu).await? {
                return Ok::<(), anyhow::Error>(());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), activated).await??;
    // A region that is not a name is refused at register.
    let mut bad = host_socket(&s, &auth().mint("h-bad", Role::Host, 60)?).await?;
    send(&mut bad, &in_region("h-bad", "eu west")).await?;
    expect_error(&mut bad, "bad_region").await?;
    assert_eq!(close_of(&mut bad).await, 4400);
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_want_for_a_substrate_gets_a_peer_and_the_peer_the_same_one_time_grant() -> Result<()> {
    let s = Server::start(config()).await?;
    // A peer with the arena docked under fingerprint `sha256:a`, serving substrates.
    let mut peer = host_socket(&s, &auth().mint("h-peer", Role::Host, 60)?).await?;
    let mut hello = register("h-peer", vec![]);
    if let HostMessage::Register { images, peer, .. } = &mut hello {
        images[0].substrate = Some("sha256:a".into());
        *peer = Some("http://10.0.0.7:7072".into());
    }
    send(&mut peer, &hello).await?;
    assert!(matches!(
        recv(&mut peer).await?,
        ServerToHost::Welcome { .. }
    ));
    let mut new = host_socket(&s, &auth().mint("h-new", Role::Host, 60)?).await?;
    send(&mut new, &register("h-new", vec![])).await?;
    assert!(matches!(
        recv(&mut new).await?,
        ServerToHost::Welcome { .. }
    ));

    let want = |fingerprint: &str| HostMessage::WantSubstrate {
        image: "arena".into(),
        fingerprint: fingerprint.into(),
    };
    send(&mut new, &want("sha256:a")).await?;
    let ServerToHost::FetchSubstrate { image, from, grant } = recv(&mut new).await? else {
        bail!("expected fetch_substrate");
    };
    assert_eq!(
        (image.as_str(), from.as_str()),
        ("arena", "http://10.0.0.7:7072")
    );
    assert_eq!(grant.len(), 64, "256 random bits");
    match recv(&mut peer).await? {
        ServerToHost::ShareSubstrate {
            image,
            grant: g,
            ttl_ms,
        } => {
            assert_eq!((image.as_str(), g.as_str()), ("arena", grant.as_str()));
            assert!(ttl_ms > 0);
        }
        other => bail!("expected share_substrate, got {other:?}"),
    }
    // Another version of the image: nobody has it, prime it.
    send(&mut new, &want("sha256:b")).await?;
    match recv(&mut new).await? {
        ServerToHost::NoSubstrate { image, reason } => {
            assert_eq!((image.as_str(), reason.as_str()), ("arena", "no_peer"))
        }
        other => bail!("expected no_substrate, got {other:?}"),
    }
    let metrics = s.ctx.metrics.render();
    for outcome in ["shipped", "no_peer"] {
        let line = format!("berth_substrate_wants_total{{outcome=\"{outcome}\"}} 1");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    s.shutdown().await;
    Ok(())
}
