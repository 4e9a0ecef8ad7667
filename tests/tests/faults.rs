//! Every way a game server can fail, on real VMs, with a game that fails on purpose
//! (`tests/games/faulty`: a busybox shell script on the documented HTTP SDK): each gives its
//! stable code, ends the session with its reason, and leaves no VM, file or process behind.

use anyhow::{Context, Result};
use berth_hostd::pool::{ActivateRequest, PoolEvent};
use berth_protocol::{PlayerId, SessionId};
use berth_testkit::*;
use std::time::Duration;
use tokio::sync::broadcast::Receiver;

fn request(session: &str, fault: &str) -> ActivateRequest {
    ActivateRequest {
        session_id: SessionId::new(session).expect("valid"),
        image: "faulty".into(),
        players: vec![PlayerId::new("alice").expect("valid")],
        teams: vec![],
        params: serde_json::json!({ "fault": fault }),
        ticket_key: String::new(),
        deadline_ms: 0,
    }
}

/// A pool with the faulty game's substrate docked; `tweak` may change its config.
async fn faulty(name: &str, tweak: impl FnOnce(&mut berth_hostd::HostdConfig)) -> Result<Sandbox> {
    let ic = test_game_config("faulty", 0);
    let sb = Sandbox::start_custom(name, vec![ic], &["faulty".to_owned()], tweak).await?;
    sb.pool
        .wait_ready("faulty", 0, Duration::from_secs(60))
        .await?;
    Ok(sb)
}

/// The next `ended` of `session`, within `within`.
async fn ended(
    events: &mut Receiver<PoolEvent>,
    session: &str,
    within: Duration,
) -> Result<(String, serde_json::Value)> {
    tokio::time::timeout(within, async {
        loop {
            match events.recv().await? {
                PoolEvent::Ended {
                    session_id,
                    reason,
                    results,
                    ..
                } if session_id.as_str() == session => return Ok((reason, results)),
                _ => continue,
            }
        }
    })
    .await
    .with_context(|| format!("no end of {session} within {within:?}"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_game_that_dies_while_loading_fails_priming_with_its_last_words() -> Result<()> {
    let mut ic = test_game_config("faulty", 0);
    ic.cmdline = Some("FAULT=boot_crash".into());
    let sb = Sandbox::start_custom("faults-boot", vec![ic], &[], |_| {}).await?;
    let mut events = sb.pool.subscribe();
    let failed = tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            if let PoolEvent::PrimeFailed { code, message, .. } = events.recv().await? {
                return anyhow::Ok((code, message));
            }
        }
    })
    .await
    .context("priming never failed")??;
    assert_eq!(failed.0, "game_crashed", "{}", failed.1);
    assert!(
        failed
            .1
            .contains("loading level 3 failed: checksum mismatch"),
        "the game's stderr is in the error: {}",
        failed.1
    );
    assert!(failed.1.contains("exit status: 3"), "{}", failed.1);
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_game_that_dies_after_activation_ends_its_session_game_crashed() -> Result<()> {
    let sb = faulty("faults-crash", |_| {}).await?;
    let mut events = sb.pool.subscribe();
    sb.pool.activate(request("crash-1", "crash")).await?;
    let (reason, results) = ended(&mut events, "crash-1", Duration::from_secs(20)).await?;
    assert_eq!(reason, "game_crashed");
    assert_eq!(results, serde_json::Value::Null);
    sb.gone("crash-1").await?;
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_game_that_never_says_ready_fails_its_activation() -> Result<()> {
    let sb = faulty("faults-ready", |c| c.ready_timeout_s = 3).await?;
    let err = sb
        .pool
        .activate(request("slow-1", "never_ready"))
        .await
        .expect_err("never ready");
    assert_eq!(err.code().as_str(), "activation_failed");
    assert!(err.to_string().contains("ready_timeout"), "{err}");
    sb.gone("slow-1").await?;
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_game_that_stops_calling_health_ends_game_unhealthy() -> Result<()> {
    let sb = faulty("faults-health", |_| {}).await?;
    let mut events = sb.pool.subscribe();
    sb.pool.activate(request("silent-1", "silent")).await?;
    // Its limit is 1.5 s; the agent checks at each heartbeat (2 s).
    let (reason, _) = ended(&mut events, "silent-1", Duration::from_secs(20)).await?;
    assert_eq!(reason, "game_unhealthy");
    sb.gone("silent-1").await?;
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_misuse_gets_stable_codes_and_a_well_behaved_game_ends_normally() -> Result<()> {
    let sb = faulty("faults-misuse", |_| {}).await?;
    let mut events = sb.pool.subscribe();
    sb.pool.activate(request("misuse-1", "misuse")).await?;
    let (reason, results) = ended(&mut events, "misuse-1", Duration::from_secs(20)).await?;
    assert_eq!(reason, "misused");
    assert_eq!(
        results,
        serde_json::json!({
            "initialised_again": 409,
            "bad_reason": 400,
            "bad_body": 400,
            "unknown": 404,
            "ready": 200,
        })
    );
    // The same game without a fault: ready, healthy, ended with its own reason.
    sb.pool.activate(request("fine-1", "none")).await?;
    let (reason, _) = ended(&mut events, "fine-1", Duration::from_secs(30)).await?;
    assert_eq!(reason, "done");
    sb.gone("misuse-1").await?;
    sb.gone("fine-1").await?;
    sb.finish().await
}
