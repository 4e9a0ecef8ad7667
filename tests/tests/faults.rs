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

/// A mode whose one player's game crashes once ready.
const CRASHY: &str = r#"image = "faulty"
teams = 1
regions = []
max_wait_s = 60
session_max_s = 120
[players]
min = 1
max = 1
[vm]
memory_mib = 128
vcpus = 1
[skill]
default = 1000.0
window = 2000.0
widen_per_s = 0.0
max_window = 2000.0
[params]
fault = "crash"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_game_that_dies_after_activation_ends_game_crashed_and_its_player_hears_it() -> Result<()>
{
    use berth_protocol::play::ServerMessage;
    use berth_server::app::Server;
    let sb = faulty("faults-crash", |_| {}).await?;
    let modes = fixtures::TempDir::new("faults-modes")?;
    std::fs::write(modes.0.join("crashy.toml"), CRASHY)?;
    let mut config = player::config();
    config.modes_dir = modes.0.clone();
    let server = Server::start(config).await?;
    let token = fixtures::host_token("faults-host");
    let (stop, task) = start_link(
        &sb.pool,
        &[server.addr],
        "faults-host",
        token,
        "ws://127.0.0.1:1/v1/game",
    );
    let host = berth_protocol::HostId::new("faults-host")?;
    for _ in 0..100 {
        let h = server.ctx.store.host(&host).await?;
        if h.is_some_and(|h| h.images.iter().any(|i| i.docked)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Matched through the server onto the faulty game, which crashes once ready: the player
    // is told, with the agent's reason.
    let mut alice = player::player(&server, "alice").await?;
    alice.send(&player::queue("crashy", "eu")).await?;
    let heard = alice
        .until(Duration::from_secs(60), |m| {
            matches!(m, ServerMessage::SessionEnded { .. })
        })
        .await?;
    let ServerMessage::SessionEnded {
        session, reason, ..
    } = heard
    else {
        unreachable!("matched above");
    };
    assert_eq!(reason.to_string(), "game_crashed");
    sb.gone(session.as_str()).await?;
    drop(stop);
    task.await?;
    server.shutdown().await;
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
