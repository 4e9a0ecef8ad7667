//! Every player hears the end: what a player missed while its socket was down, or while its
//! replica's event stream had a gap, is read back from the store. A test-driven host socket
//! stands in for hostd (real sockets, real server).

mod common;

use anyhow::{bail, Result};
use berth_protocol::codes::ActivationPath;
use berth_protocol::host::{HostMessage, ServerToHost};
use berth_protocol::play::ServerMessage;
use berth_protocol::{SessionId, VmId};
use berth_server::app::Server;
use berth_server::auth::Role;
use berth_server::store::redis::RedisStore;
use berth_server::store::Store;
use berth_testkit::redis::PrivateRedis;
use common::host::*;
use common::*;
use std::sync::Arc;
use std::time::Duration;

/// A host `h1` registered on `s`, answering nothing yet.
async fn host(s: &Server) -> Result<Ws> {
    let mut ws = host_socket(s, &auth().mint("h1", Role::Host, 600)?).await?;
    send(&mut ws, &register("h1", vec![])).await?;
    match recv(&mut ws).await? {
        ServerToHost::Welcome { .. } => Ok(ws),
        other => bail!("expected welcome, got {other:?}"),
    }
}

/// The next message to the host that is `activate`, answered `activated`: the session and
/// its VM.
async fn activate(ws: &mut Ws) -> Result<(SessionId, VmId)> {
    loop {
        if let ServerToHost::Activate { session, .. } = recv(ws).await? {
            let vm = VmId::new(format!("vm-{session}"))?;
            let activated = HostMessage::Activated {
                session: session.clone(),
                vm: vm.clone(),
                path: ActivationPath::Warm,
                activate_us: 1,
            };
            send(ws, &activated).await?;
            return Ok((session, vm));
        }
    }
}

/// The host says the game in `vm` ended with a winner, waits for `recorded`, and destroys the
/// VM when asked.
async fn game_over(ws: &mut Ws, session: &SessionId, vm: &VmId) -> Result<()> {
    let ended = HostMessage::Ended {
        session: session.clone(),
        vm: vm.clone(),
        reason: "score".into(),
        results: serde_json::json!({"winner": 1}),
    };
    send(ws, &ended).await?;
    let (mut recorded, mut destroyed) = (false, false);
    while !(recorded && destroyed) {
        match recv(ws).await? {
            ServerToHost::Recorded { .. } => recorded = true,
            ServerToHost::Destroy { .. } => {
                let gone = HostMessage::Destroyed {
                    session: session.clone(),
                    vm: vm.clone(),
                };
                send(ws, &gone).await?;
                destroyed = true;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The next message that is not a queue status.
async fn news(c: &mut Client) -> Result<ServerMessage> {
    Ok(c.until(Duration::from_secs(15), |m| {
        !matches!(m, ServerMessage::QueueStatus { .. })
    })
    .await?)
}

/// Two players matched on host `ws`: the players, the session and its VM.
async fn matched_pair(
    s: &Server,
    ws: &mut Ws,
    names: [&str; 2],
) -> Result<(Client, Client, SessionId, VmId)> {
    let mut a = player(s, names[0]).await?;
    let mut b = player(s, names[1]).await?;
    a.send(&queue("duel", "eu")).await?;
    b.send(&queue("duel", "eu")).await?;
    let (session, vm) = activate(ws).await?;
    for c in [&mut a, &mut b] {
        match news(c).await? {
            ServerMessage::Matched { session: m, .. } if m == session => {}
            other => bail!("expected matched for {session}, got {other:?}"),
        }
    }
    Ok((a, b, session, vm))
}

fn is_end_of(m: &ServerMessage, session: &SessionId) -> bool {
    matches!(m, ServerMessage::SessionEnded { session: s, reason, results }
        if s == session && reason == "score" && results["winner"] == 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_away_when_its_session_ends_hears_how_on_reconnect() -> Result<()> {
    let s = Server::start(config()).await?;
    let mut ws = host(&s).await?;
    let (ann, mut ben, session, vm) = matched_pair(&s, &mut ws, ["ann", "ben"]).await?;
    // ann's network drops (no close frame), and the game ends meanwhile.
    ann.kill();
    game_over(&mut ws, &session, &vm).await?;
    assert!(is_end_of(&news(&mut ben).await?, &session));

    // Back: the first thing ann hears is how it ended, on every new connection...
    for _ in 0..2 {
        let mut ann = player(&s, "ann").await?;
        let m = news(&mut ann).await?;
        assert!(is_end_of(&m, &session), "{m:?}");
        ann.close().await?;
    }
    // ...until ann queues again (once the VM is gone): then that is where ann stands.
    for _ in 0..100 {
        let state = s.ctx.store.session(&session).await?.map(|s| s.state);
        if state == Some(berth_server::model::SessionState::Ended) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ann = player(&s, "ann").await?;
    news(&mut ann).await?;
    ann.send(&queue("duel", "eu")).await?;
    ann.until(Duration::from_secs(5), |m| {
        matches!(m, ServerMessage::QueueStatus { .. })
    })
    .await?;
    ann.close().await?;
    let mut ann = player(&s, "ann").await?;
    let m = ann.recv_within(Duration::from_secs(5)).await?;
    assert!(matches!(m, ServerMessage::QueueStatus { .. }), "{m:?}");
    s.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_published_into_a_gap_of_the_event_stream_still_reaches_the_players() -> Result<()> {
    let redis = PrivateRedis::start().await?;
    let prefix = "standing-gap:";
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&redis.url(), prefix).await?);
    let s = Server::start_with(config(), store).await?;
    let mut ws = host(&s).await?;
    let (mut cat, mut dan, session, vm) = matched_pair(&s, &mut ws, ["cat", "dan"]).await?;

    // The replica's subscription keeps dropping (data kept) while the game ends: its event is
    // published while nobody on that replica listens.
    let gap = async {
        for _ in 0..25 {
            let killed = redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).await?;
            anyhow::ensure!(
                killed.starts_with(':'),
                "CLIENT KILL answers a count: {killed}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    };
    let (gap, over) = tokio::join!(gap, game_over(&mut ws, &session, &vm));
    gap?;
    over?;
    for c in [&mut cat, &mut dan] {
        let m = news(c).await?;
        assert!(is_end_of(&m, &session), "{m:?}");
    }
    s.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_player_whose_ticket_the_store_lost_is_told() -> Result<()> {
    let mut redis = PrivateRedis::start().await?;
    let store: Arc<dyn Store> =
        Arc::new(RedisStore::connect(&redis.url(), "standing-lost:").await?);
    let s = Server::start_with(config(), store).await?;
    let mut eve = player(&s, "eve").await?;
    eve.send(&queue("duel", "eu")).await?;
    let ticket = match eve.recv_within(Duration::from_secs(5)).await? {
        ServerMessage::QueueStatus { ticket, .. } => ticket,
        other => bail!("expected queue_status, got {other:?}"),
    };
    // Redis without persistence restarts: the ticket is gone.
    redis.restart().await?;
    match news(&mut eve).await? {
        ServerMessage::Dequeued { ticket: t, reason } => {
            assert_eq!((t, reason.as_str()), (ticket, "ticket_lost"));
        }
        other => bail!("expected dequeued, got {other:?}"),
    }
    // The player can queue again at once.
    eve.send(&queue("duel", "eu")).await?;
    let m = eve.recv_within(Duration::from_secs(5)).await?;
    assert!(matches!(m, ServerMessage::QueueStatus { .. }), "{m:?}");
    s.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_answered_while_the_store_is_down_is_taken_when_it_is_back() -> Result<()> {
    let mut redis = PrivateRedis::start_persistent().await?;
    let store: Arc<dyn Store> =
        Arc::new(RedisStore::connect(&redis.url(), "standing-down:").await?);
    let s = Server::start_with(config(), store).await?;
    let mut ws = host(&s).await?;
    let mut fay = player(&s, "fay").await?;
    let mut gus = player(&s, "gus").await?;
    fay.send(&queue("duel", "eu")).await?;
    gus.send(&queue("duel", "eu")).await?;
    let session = loop {
        if let ServerToHost::Activate { session, .. } = recv(&mut ws).await? {
            break session;
        }
    };
    // The VM is up just as the store goes away: `activated` cannot be recorded now.
    redis.stop();
    let activated = HostMessage::Activated {
        session: session.clone(),
        vm: VmId::new("vm-1")?,
        path: ActivationPath::Warm,
        activate_us: 1,
    };
    send(&mut ws, &activated).await?;
    match recv(&mut ws).await? {
        ServerToHost::Error { code, .. } => assert_eq!(code, "store_unavailable"),
        other => bail!("expected store_unavailable, got {other:?}"),
    }
    // Back (with its data). hostd says nothing more than its heartbeats, and yet the session
    // becomes active and both players are matched.
    redis.restart().await?;
    let beat = async {
        loop {
            send(&mut ws, &heartbeat()).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    };
    let heard = async {
        for c in [&mut fay, &mut gus] {
            match news(c).await? {
                ServerMessage::Matched { session: m, .. } if m == session => {}
                other => bail!("expected matched for {session}, got {other:?}"),
            }
        }
        Ok(())
    };
    tokio::select! {
        r = beat => r?,
        r = heard => r?,
    }
    s.shutdown().await;
    Ok(())
}
