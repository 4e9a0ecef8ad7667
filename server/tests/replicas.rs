//! Two server replicas on one real Redis: players connected to either are matched together,
//! every ticket exactly once, and every player hears how its session ended.

mod common;

use anyhow::{bail, Result};
use berth_protocol::play::ServerMessage;
use berth_server::app::Server;
use berth_server::model::SessionState;
use berth_server::store::redis::RedisStore;
use berth_server::store::Store;
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ticket_is_matched_once_across_replicas() -> Result<()> {
    let url = berth_testkit::fixtures::redis_url()?;
    let prefix = format!("replicas-{}", uuid::Uuid::new_v4().simple());
    let mut cfg = config();
    // No host exists: every match ends as placement_failed soon after it is formed.
    cfg.timeouts.placing_ms = 800;
    let one: Arc<dyn Store> = Arc::new(RedisStore::connect(&url, &prefix).await?);
    let two: Arc<dyn Store> = Arc::new(RedisStore::connect(&url, &prefix).await?);
    let r1 = Server::start_with(cfg.clone(), one.clone()).await?;
    let r2 = Server::start_with(cfg, two).await?;

    let n = 60;
    let mut clients = Vec::new();
    for i in 0..n {
        let server = if i % 2 == 0 { &r1 } else { &r2 };
        clients.push(common::player(server, &format!("pl{i:02}")).await?);
    }
    // Everyone queues at once, half on each replica.
    let mut tasks = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            c.send(&queue("duel", "eu")).await?;
            let m = c
                .until(Duration::from_secs(20), |m| {
                    matches!(m, ServerMessage::SessionEnded { .. })
                })
                .await?;
            // Exactly one session_ended: nothing more arrives.
            if let Ok(extra) = c
                .until(Duration::from_millis(500), |m| {
                    matches!(m, ServerMessage::SessionEnded { .. })
                })
                .await
            {
                bail!("pl{i:02} heard a second end: {extra:?}");
            }
            match m {
                ServerMessage::SessionEnded {
                    session, reason, ..
                } => {
                    anyhow::ensure!(reason == "placement_failed", "{reason}");
                    Ok((format!("pl{i:02}"), session.to_string()))
                }
                _ => unreachable!("filtered above"),
            }
        }));
    }
    let mut told: BTreeMap<String, String> = BTreeMap::new();
    for t in tasks {
        let (p, s) = t.await??;
        told.insert(p, s);
    }
    assert_eq!(told.len(), n);

    let sessions = one.sessions(None).await?;
    assert_eq!(sessions.len(), n / 2, "one session per pair");
    let mut seen = BTreeSet::new();
    for s in &sessions {
        assert_eq!(s.state, SessionState::Ended);
        assert_eq!(s.players.len(), 2);
        for p in &s.players {
            assert!(seen.insert(p.to_string()), "{p} matched twice");
            assert_eq!(
                told.get(p.as_str()),
                Some(&s.id.to_string()),
                "{p} told another session"
            );
        }
    }
    assert_eq!(seen.len(), n, "nobody lost");
    assert!(one.pools().await?.is_empty(), "no ticket left queued");

    r1.shutdown().await;
    r2.shutdown().await;
    Ok(())
}
