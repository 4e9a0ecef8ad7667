//! Swarms against the real matchmaking server in this process (port 0) with no host at all:
//! the failure accounting. The whole path (hostd with real VMs, its gateway and the game) is
//! played in `tests/tests/swarm.rs`.

mod common;

use anyhow::Result;
use berth_sim::{Arrivals, Progress, SwarmConfig, Weighted};
use std::time::{Duration, Instant};

fn swarm(server: &berth_server::app::Server, players: u32) -> SwarmConfig {
    SwarmConfig {
        server: format!("http://{}", server.addr),
        arrivals: Arrivals::Fixed {
            players,
            ramp: Duration::ZERO,
        },
        duration: Duration::from_secs(30),
        drain: Duration::from_secs(10),
        think: berth_sim::DurationRange::fixed(Duration::from_millis(100)),
        ..SwarmConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_host_every_bot_fails_as_placement_failed() -> Result<()> {
    let server = common::server(true, 500).await?;
    let progress = Progress::new();
    let t = Instant::now();
    let report = berth_sim::run(swarm(&server, 4), Some(progress.clone())).await?;
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(report.players, 4);
    assert_eq!(report.matches.attempted, 4);
    assert_eq!(report.matches.matched, 0);
    assert_eq!(report.matches.finished, 0);
    assert_eq!(report.failed, 4, "{:?}", report.failures);
    assert_eq!(
        report.failures.get("placement_failed"),
        Some(&4),
        "{:?}",
        report.failures
    );
    assert_eq!(report.sessions, 0, "no matched, so no session seen");
    assert_eq!(report.latency.time_to_match_ms.count, 0);
    let p = progress.snapshot();
    assert_eq!(
        (p.arrived, p.failed, p.done, p.queued, p.playing),
        (4, 4, 4, 0, 0)
    );
    let json = serde_json::to_value(&report)?;
    assert_eq!(json["failures"]["placement_failed"], 4);
    // Every socket was closed: the server lets go of all four players.
    common::eventually("players disconnected", || {
        server
            .ctx
            .registry
            .players
            .lock()
            .is_ok_and(|p| p.is_empty())
    })
    .await?;
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn players_fail_over_from_a_dead_replica_to_a_live_one() -> Result<()> {
    let server = common::server(true, 500).await?;
    // Half the players start on a replica that is gone (nothing listens on port 1).
    let mut config = swarm(&server, 4);
    config.server = format!("http://127.0.0.1:1,http://{}", server.addr);
    let report = berth_sim::run(config, None).await?;
    // Every one of them reached the live replica and was matched there (no host: the match
    // then fails placement), none was lost to the dead one.
    assert_eq!(
        report.failures.get("placement_failed"),
        Some(&4),
        "{:?}",
        report.failures
    );
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refusals_are_counted_by_code() -> Result<()> {
    let server = common::server(false, 500).await?;
    let report = berth_sim::run(swarm(&server, 2), None).await?;
    assert_eq!(
        report.failures.get("dev_token:dev_tokens_disabled"),
        Some(&2),
        "{:?}",
        report.failures
    );
    server.shutdown().await;

    let server = common::server(true, 500).await?;
    let config = SwarmConfig {
        modes: vec![Weighted::new("curling".into(), 1.0)],
        ..swarm(&server, 2)
    };
    let report = berth_sim::run(config, None).await?;
    assert_eq!(
        report.failures.get("queue_refused:unknown_mode"),
        Some(&2),
        "{:?}",
        report.failures
    );
    // A party bigger than a duel team is refused by the server.
    let config = SwarmConfig {
        parties: vec![Weighted::new(2, 1.0)],
        ..swarm(&server, 2)
    };
    let report = berth_sim::run(config, None).await?;
    assert_eq!(
        report.failures.get("queue_refused:party_too_big"),
        Some(&2),
        "{:?}",
        report.failures
    );
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_player_is_cancelled_when_the_run_ends() -> Result<()> {
    let server = common::server(true, 500).await?;
    let config = SwarmConfig {
        duration: Duration::from_secs(2),
        ..swarm(&server, 1)
    };
    let t = Instant::now();
    let report = berth_sim::run(config, None).await?;
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(report.matches.cancelled, 1, "{report:#?}");
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    server.shutdown().await;
    Ok(())
}
