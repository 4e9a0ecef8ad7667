//! Regions that mean something, on a real server: players who queue with measured latencies
//! are matched in the region best for the group and told which and why; `GET /v1/regions`
//! lists where to measure; bad latencies are refused with codes. Test-driven host sockets
//! stand in for hostd (real sockets; the full fleet with real hostds is `tests/fleet.rs`).

mod common;

use anyhow::{bail, Result};
use berth_client::play::queue_by_latency;
use berth_protocol::codes::ActivationPath;
use berth_protocol::host::{HostMessage, ServerToHost};
use berth_protocol::play::{ClientMessage, RegionReason, Regions, ServerMessage};
use berth_protocol::{RegionRule, VmId};
use berth_server::app::Server;
use berth_server::auth::Role;
use common::host::*;
use common::*;
use std::collections::BTreeMap;
use std::time::Duration;

/// Host `name` registered in `region` with gateway `ws://ip:7071/v1/game`.
async fn host_in(s: &Server, name: &str, region: &str, ip: &str) -> Result<Ws> {
    let mut ws = host_socket(s, &auth().mint(name, Role::Host, 600)?).await?;
    let mut r = register(name, vec![]);
    if let HostMessage::Register {
        region: reg,
        gateway,
        ..
    } = &mut r
    {
        *reg = Some(region.into());
        *gateway = format!("ws://{ip}:7071/v1/game");
    }
    send(&mut ws, &r).await?;
    match recv(&mut ws).await? {
        ServerToHost::Welcome { .. } => Ok(ws),
        other => bail!("expected welcome, got {other:?}"),
    }
}

fn ms(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
    pairs.iter().map(|(r, ms)| (r.to_string(), *ms)).collect()
}

/// Waits for `c`'s `matched`: its region, why, and endpoint.
async fn matched(c: &mut Client) -> Result<(String, Option<RegionReason>, String)> {
    let m = c
        .until(Duration::from_secs(10), |m| {
            matches!(m, ServerMessage::Matched { .. })
        })
        .await?;
    match m {
        ServerMessage::Matched {
            region,
            region_reason,
            endpoint,
            ..
        } => Ok((region, region_reason, endpoint)),
        other => bail!("expected matched, got {other:?}"),
    }
}

/// The next `activate` on `ws`, answered `activated`.
async fn activate(ws: &mut Ws) -> Result<()> {
    loop {
        if let ServerToHost::Activate { session, .. } = recv(ws).await? {
            let activated = HostMessage::Activated {
                vm: VmId::new(format!("vm-{session}"))?,
                session,
                path: ActivationPath::Warm,
                activate_us: 1,
            };
            return send(ws, &activated).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_queued_players_play_in_the_region_best_for_the_group() -> Result<()> {
    let mut cfg = config();
    cfg.timeouts.placing_ms = 60_000;
    let s = Server::start(cfg).await?;
    let mut eu = host_in(&s, "h-eu", "eu", "10.0.0.1").await?;
    let mut us = host_in(&s, "h-us", "us", "10.0.0.2").await?;
    // a is near eu, b is nearer us; eu is best for both together (worst 60 ms against 100).
    let mut a = player(&s, "lat-a").await?;
    let mut b = player(&s, "lat-b").await?;
    a.send(&queue_by_latency(
        "duel",
        ms(&[("eu", 30), ("us", 100)]),
        None,
        None,
    ))
    .await?;
    match a.recv().await? {
        ServerMessage::QueueStatus {
            region,
            latency_allowed_ms,
            ..
        } => {
            assert_eq!(region, "*");
            assert_eq!(latency_allowed_ms, Some(100), "duel's starting allowance");
        }
        other => bail!("expected queue_status, got {other:?}"),
    }
    b.send(&queue_by_latency(
        "duel",
        ms(&[("eu", 60), ("us", 40)]),
        None,
        None,
    ))
    .await?;
    tokio::select! {
        r = activate(&mut eu) => r?,
        m = recv(&mut us) => bail!("the us host was asked: {m:?}"),
        _ = tokio::time::sleep(Duration::from_secs(10)) => bail!("never placed"),
    }
    for c in [&mut a, &mut b] {
        let (region, reason, endpoint) = matched(c).await?;
        assert_eq!(region, "eu");
        assert_eq!(endpoint, "ws://10.0.0.1:7071/v1/game");
        let by_latency = RegionReason {
            rule: RegionRule::Latency,
            worst_ms: Some(60),
            allowed_ms: Some(100),
        };
        assert_eq!(reason, Some(by_latency));
    }
    // A named-region match says so.
    let mut c = player(&s, "named-c").await?;
    let mut d = player(&s, "named-d").await?;
    c.send(&queue("duel", "us")).await?;
    d.send(&queue("duel", "us")).await?;
    activate(&mut us).await?;
    let (region, region_reason, _) = matched(&mut c).await?;
    assert_eq!(region, "us");
    assert_eq!(region_reason, Some(RegionReason::named()));
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn players_far_from_each_other_wait_until_the_allowance_widens() -> Result<()> {
    let s = Server::start(config()).await?;
    let mut eu = host_in(&s, "h-eu", "eu", "10.0.0.1").await?;
    // No region has both within duel's 100 ms at first: us is 150 for a, eu is 130 for b.
    // duel widens 10 ms per second: after ~3 s eu (worst 130) is allowed.
    let mut a = player(&s, "far-a").await?;
    let mut b = player(&s, "far-b").await?;
    a.send(&queue_by_latency(
        "duel",
        ms(&[("eu", 20), ("us", 150)]),
        None,
        None,
    ))
    .await?;
    b.send(&queue_by_latency(
        "duel",
        ms(&[("eu", 130), ("us", 20)]),
        None,
        None,
    ))
    .await?;
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(15), activate(&mut eu)).await??;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "matched after {waited:?}: before the allowance reached 130 ms"
    );
    let (_, region_reason, _) = matched(&mut a).await?;
    let reason = region_reason.expect("a reason");
    assert_eq!(reason.worst_ms, Some(130));
    assert!(reason.allowed_ms.is_some_and(|a| a >= 130), "{reason:?}");
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn bad_latencies_are_refused_with_codes() -> Result<()> {
    let s = Server::start(config()).await?;
    let mut c = player(&s, "bad-lat").await?;
    let both = ClientMessage::Queue {
        mode: "duel".into(),
        region: Some("eu".into()),
        latencies: Some(ms(&[("eu", 10)])),
        party: None,
        skill: None,
    };
    let neither = ClientMessage::Queue {
        mode: "duel".into(),
        region: None,
        latencies: None,
        party: None,
        skill: None,
    };
    c.send(&both).await?;
    c.expect_error("region_or_latencies").await?;
    c.send(&neither).await?;
    c.expect_error("region_or_latencies").await?;
    let too_many: BTreeMap<String, u32> = (0..33).map(|i| (format!("r{i}"), 10)).collect();
    for bad in [
        BTreeMap::new(),
        too_many,
        ms(&[("eu", 60_001)]),
        ms(&[("eu west", 10)]),
    ] {
        c.send(&queue_by_latency("duel", bad, None, None)).await?;
        c.expect_error("bad_latencies").await?;
    }
    // Only regions the mode is not offered in.
    c.send(&queue_by_latency("duel", ms(&[("mars", 10)]), None, None))
        .await?;
    c.expect_error("unknown_region").await?;
    // A negative or fractional latency is not a u32: the frame itself is refused.
    c.raw(r#"{"type":"queue","mode":"duel","latencies":{"eu":-1}}"#.into())
        .await?;
    c.expect_error("bad_message").await?;
    // Still usable: a good queue is taken.
    c.send(&queue_by_latency(
        "duel",
        ms(&[("eu", 10), ("mars", 5)]),
        None,
        None,
    ))
    .await?;
    assert!(matches!(c.recv().await?, ServerMessage::QueueStatus { .. }));
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn regions_list_probes_for_players_only() -> Result<()> {
    let s = Server::start(config()).await?;
    let _eu = host_in(&s, "h-eu", "eu", "10.0.0.1").await?;
    let _us = host_in(&s, "h-us", "us", "10.0.0.2").await?;
    let url = format!("http://{}/v1/regions", s.addr);
    let http = reqwest::Client::new();
    let r = http.get(&url).bearer_auth(token("alice")).send().await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let regions: Regions = r.json().await?;
    let got: Vec<(&str, &[String])> = regions
        .regions
        .iter()
        .map(|r| (r.region.as_str(), r.probes.as_slice()))
        .collect();
    assert_eq!(
        got,
        [
            ("eu", &["http://10.0.0.1:7071/v1/probe".to_owned()][..]),
            ("us", &["http://10.0.0.2:7071/v1/probe".to_owned()][..])
        ]
    );
    for (bearer, status, code) in [
        (None, 401, "missing_token"),
        (Some("junk".to_owned()), 401, "bad_token"),
        (Some(admin_token()), 403, "wrong_role"),
    ] {
        let mut req = http.get(&url);
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        let r = req.send().await?;
        assert_eq!(r.status(), status);
        let body: serde_json::Value = r.json().await?;
        assert_eq!(body["code"], code, "{body}");
    }
    s.shutdown().await;
    Ok(())
}
