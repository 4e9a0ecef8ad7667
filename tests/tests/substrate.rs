//! Substrates for real: hostd pools with real QEMU (TCG) VMs running the real guest.

use anyhow::Result;
use berth_hostd::pool::{ActivateRequest, ActivationPath, PoolEvent};
use berth_protocol::game::GameAnswer;
use berth_protocol::{PlayerId, SessionId};
use berth_testkit::*;
use std::time::Duration;

fn request(session: &str) -> ActivateRequest {
    ActivateRequest {
        teams: vec![],
        session_id: SessionId::new(session).expect("valid"),
        image: "arena".into(),
        players: vec![
            PlayerId::new("alice").expect("valid"),
            PlayerId::new("bob").expect("valid"),
        ],
        params: serde_json::json!({"score_limit": 5}),
        ticket_key: KEY.into(),
        deadline_ms: 0,
    }
}

const KEY: &str = "0123456789abcdef0123456789abcdef";

/// A session ticket for `player`, minted the way the server does.
fn ticket(session: &str, player: &str) -> String {
    berth_server::auth::Auth::new(&berth_server::config::AuthConfig {
        secret: "test-secret-0123456789".into(),
        ..Default::default()
    })
    .expect("auth")
    .ticket(
        KEY,
        &SessionId::new(session).expect("id"),
        &PlayerId::new(player).expect("id"),
        60_000,
    )
    .expect("mint")
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activate_applies_identity_and_destroy_leaves_nothing() -> Result<()> {
    let sb = Sandbox::docked("identity").await?;
    let vm = sb.pool.activate(request("match-1")).await?;
    assert_eq!(vm.path, ActivationPath::Substrate);
    let GameAnswer::Hello {
        session_id,
        vm_id,
        hostname,
        players,
        clock_ms,
        map_tiles,
        ..
    } = game_hello(vm.game_addr).await?
    else {
        panic!("expected a hello");
    };
    let host_now = now_ms();
    assert_eq!(session_id.as_str(), "match-1");
    assert_eq!(vm_id, vm.vm_id);
    assert_eq!(
        hostname,
        format!("berth-{}", vm.vm_id.as_str().trim_start_matches("vm-"))
    );
    assert_eq!(players.len(), 2);
    assert!(map_tiles > 0, "the game loaded its maps from the VM's disk");
    // The substrate was parked long before: the clock is right only because it was set.
    let skew = host_now as i64 - clock_ms as i64;
    assert!(skew.abs() < 1000, "guest clock off by {skew} ms");

    let vm_dir = sb.dir.join("vms").join(vm.vm_id.as_str());
    assert!(
        vm_dir.join("overlay.qcow2").exists(),
        "each VM has its own disk overlay"
    );
    assert!(berth_hostd::util::pid_alive(vm.pid));
    sb.pool.destroy(vm.vm_id.as_str()).await?;
    assert!(
        !vm_dir.exists(),
        "destroy removes the VM's folder, sockets and overlay"
    );
    assert!(!berth_hostd::util::pid_alive(vm.pid), "destroy kills QEMU");
    assert!(sb.pool.status().vms.is_empty());
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clones_each_carry_their_own_identity_and_sessions_are_idempotent() -> Result<()>
{
    let sb = Sandbox::docked("clones").await?;
    // Three sessions at once, one of them asked for twice concurrently.
    let (a, b, c, a2) = tokio::join!(
        sb.pool.activate(request("s-a")),
        sb.pool.activate(request("s-b")),
        sb.pool.activate(request("s-c")),
        sb.pool.activate(request("s-a")),
    );
    let (a, b, c, a2) = (a?, b?, c?, a2?);
    assert_eq!(a.vm_id, a2.vm_id, "the same session id gives the same VM");
    assert_eq!(sb.pool.activate(request("s-b")).await?.vm_id, b.vm_id);
    assert_eq!(sb.pool.status().vms.len(), 3);
    let mut draws = Vec::new();
    for vm in [&a, &b, &c] {
        let GameAnswer::Hello {
            session_id,
            vm_id,
            rng_draw,
            ..
        } = game_hello(vm.game_addr).await?
        else {
            panic!("expected a hello");
        };
        assert_eq!(session_id, vm.session_id);
        assert_eq!(vm_id, vm.vm_id);
        draws.push(rng_draw);
    }
    draws.sort();
    draws.dedup();
    assert_eq!(draws.len(), 3, "each clone's RNG was reseeded");
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_clones_activate_and_are_refilled() -> Result<()> {
    let sb = Sandbox::start("warm", 1).await?;
    sb.pool
        .wait_ready("arena", 1, Duration::from_secs(60))
        .await?;
    let vm = sb.pool.activate(request("warm-1")).await?;
    assert_eq!(vm.path, ActivationPath::Warm);
    assert!(matches!(
        game_hello(vm.game_addr).await?,
        GameAnswer::Hello { .. }
    ));
    // The pool refills the warm tier in the background.
    sb.pool
        .wait_ready("arena", 1, Duration::from_secs(30))
        .await?;
    let st = sb.pool.status();
    assert_eq!((st.images[0].warm, st.images[0].active), (1, 1));
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn game_over_is_reported_and_the_vm_returns_to_the_pool() -> Result<()> {
    let sb = Sandbox::docked("ended").await?;
    let mut events = sb.pool.subscribe();
    let vm = sb.pool.activate(request("ends")).await?;
    // A player gives up (the game checks the ticket with the key given at activation).
    let (_, results) = game_surrender(vm.game_addr, &ticket("ends", "bob")).await?;
    assert_eq!(results.winner, Some(0), "alice's side wins");
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match events.recv().await {
                Ok(PoolEvent::Ended {
                    session_id,
                    results,
                    ..
                }) => return Some((session_id, results)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    })
    .await?
    .expect("an ended event");
    assert_eq!(ended.0.as_str(), "ends");
    assert_eq!(ended.1["winner"], 0);
    // Garbage from a player gets a stable error, not a dead game server.
    let other = sb.pool.activate(request("garbage")).await?;
    let answers = game_request(other.game_addr, "{not json").await?;
    assert!(matches!(&answers[1], GameAnswer::Error { code, .. } if code == "bad_json"));
    tokio::time::timeout(Duration::from_secs(20), async {
        while sb.pool.status().vms.iter().any(|v| v.vm_id == vm.vm_id) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await?;
    assert!(!sb.dir.join("vms").join(vm.vm_id.as_str()).exists());
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_qemu_is_detected_and_reported() -> Result<()> {
    let sb = Sandbox::docked("killed").await?;
    let mut events = sb.pool.subscribe();
    let vm = sb.pool.activate(request("doomed")).await?;
    signal(vm.pid, nix::sys::signal::Signal::SIGKILL)?;
    let failed = next_failure(&mut events, Duration::from_secs(10)).await?;
    assert_eq!(failed.0, vm.vm_id);
    assert_eq!(failed.1, "vm_exited");
    assert!(failed.2.contains("signal: 9"), "{}", failed.2);
    let st = sb.pool.status();
    assert!(st.vms.is_empty());
    assert_eq!(st.failures.len(), 1);
    assert!(!sb.dir.join("vms").join(vm.vm_id.as_str()).exists());
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_mismatched_substrates_are_reprimed() -> Result<()> {
    // A substrate from "another QEMU": re-primed at start-up, not restored.
    let dir = Sandbox::state_dir("mismatch");
    let _ = std::fs::remove_dir_all(&dir);
    let ic = image_config("arena", 0);
    seed_substrate(&dir, &ic).await?;
    let header_path = dir.join("substrates/arena/substrate.json");
    let mut header: serde_json::Value = serde_json::from_slice(&std::fs::read(&header_path)?)?;
    header["fingerprint"]["hypervisor_version"] = "QEMU 0.1".into();
    std::fs::write(&header_path, serde_json::to_vec(&header)?)?;
    let sb = Sandbox::start_with("mismatch", vec![ic], false).await?;
    assert_ne!(sb.pool.status().images[0].substrate, "docked");
    sb.pool
        .wait_ready("arena", 0, Duration::from_secs(120))
        .await?;
    let header: serde_json::Value = serde_json::from_slice(&std::fs::read(&header_path)?)?;
    assert_ne!(header["fingerprint"]["hypervisor_version"], "QEMU 0.1");

    // Corrupted while docked: the restore fails with a clear error, the substrate is re-primed
    // and the next activation works.
    std::fs::write(sb.dir.join("substrates/arena/state"), b"QEVM garbage")?;
    let err = sb
        .pool
        .activate(request("first"))
        .await
        .expect_err("a corrupt substrate cannot restore");
    assert_eq!(err.code(), "activation_failed");
    assert!(err.to_string().contains("restore_failed"), "{err}");
    sb.pool
        .wait_ready("arena", 0, Duration::from_secs(120))
        .await?;
    let vm = sb.pool.activate(request("second")).await?;
    assert!(matches!(
        game_hello(vm.game_addr).await?,
        GameAnswer::Hello { .. }
    ));
    sb.finish().await
}

/// What QEMU 7.2's discard of file-backed RAM does to a substrate (a postcopy migration of a
/// clone did it): holes punched through the whole RAM file, which keeps its size and reads as
/// zeros.
fn punch_holes(ram: &std::path::Path) -> Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new().write(true).open(ram)?;
    let len = file.metadata()?.len() as i64;
    let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(file.as_raw_fd(), mode, 0, len)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_substrate_zeroed_under_a_running_pool_is_found_damaged_and_reprimed() -> Result<()> {
    let sb = Sandbox::start_custom(
        "damaged",
        vec![image_config("arena", 0)],
        &["arena".into()],
        |c| c.ready_timeout_s = 5,
    )
    .await?;
    sb.pool
        .wait_ready("arena", 0, Duration::from_secs(60))
        .await?;
    let mut events = sb.pool.subscribe();
    punch_holes(&sb.dir.join("substrates/arena/ram"))?;
    // Its clones restore (the RAM is not in the migration stream) and die when they run; a
    // few in a row get the substrate checked, found damaged and primed again.
    let mut failed = 0;
    let vm = loop {
        match sb.pool.activate(request(&format!("try-{failed}"))).await {
            Ok(vm) => break vm,
            Err(e) if failed < 10 => {
                assert_eq!(e.code(), "activation_failed", "{e}");
                failed += 1;
                // The re-prime takes a while: wait for it rather than fail against it.
                let _ = sb
                    .pool
                    .wait_ready("arena", 0, Duration::from_secs(120))
                    .await;
            }
            Err(e) => anyhow::bail!("still failing after {failed} activations: {e}"),
        }
    };
    assert!(
        failed >= 1,
        "the damaged substrate's first clone cannot have worked"
    );
    assert!(matches!(
        game_hello(vm.game_addr).await?,
        GameAnswer::Hello { .. }
    ));
    let discarded = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if let Ok(PoolEvent::SubstrateDiscarded { code, reason, .. }) = events.recv().await {
                return (code, reason);
            }
        }
    })
    .await?;
    assert_eq!(discarded.0, "substrate_damaged");
    assert!(discarded.1.contains("RAM file"), "{}", discarded.1);
    let reprimes = sb.pool.status().images[0].reprimes.clone();
    assert_eq!(reprimes.get("substrate_damaged"), Some(&1), "{reprimes:?}");
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_answers_times_out_with_a_clear_error() -> Result<()> {
    let mut ic = image_config("mute", 0);
    // The game's start-up work now takes ten minutes: `initialised` never comes in time.
    ic.cmdline = Some("BERTH_INIT_MS=600000".into());
    let sb = Sandbox::start_custom("mute", vec![ic], &[], |c| c.boot_timeout_s = 8).await?;
    let err = sb
        .pool
        .wait_ready("mute", 0, Duration::from_secs(60))
        .await
        .expect_err("never docks");
    assert!(
        err.to_string()
            .contains("did not say initialised within 8s"),
        "{err}"
    );
    let mut req = request("nope");
    req.image = "mute".into();
    let err = sb.pool.activate(req).await.expect_err("no substrate");
    assert_eq!(err.code(), "not_docked");
    assert!(
        qemu_naming(&sb.dir).is_empty(),
        "the timed-out template was killed"
    );
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_images_and_capacity_get_stable_errors() -> Result<()> {
    let sb = Sandbox::start_custom(
        "capacity",
        vec![image_config("arena", 0)],
        &["arena".into()],
        |c| c.max_vms = 1,
    )
    .await?;
    let mut req = request("x");
    req.image = "nosuch".into();
    assert_eq!(
        sb.pool.activate(req).await.expect_err("unknown").code(),
        "unknown_image"
    );
    sb.pool.activate(request("one")).await?;
    assert_eq!(
        sb.pool
            .activate(request("two"))
            .await
            .expect_err("full")
            .code(),
        "at_capacity"
    );
    assert_eq!(
        sb.pool.destroy("nosuch").await.expect_err("unknown").code(),
        "unknown_vm"
    );
    sb.pool.destroy("one").await?;
    sb.pool.activate(request("two")).await?;
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_is_detected_and_reported() -> Result<()> {
    let sb = Sandbox::start_custom(
        "silent",
        vec![image_config("arena", 0)],
        &["arena".into()],
        |c| c.agent_silence_s = 3,
    )
    .await?;
    let mut events = sb.pool.subscribe();
    let vm = sb.pool.activate(request("frozen")).await?;
    // Freeze the whole VM: QEMU still exists, but the agent says nothing any more.
    signal(vm.pid, nix::sys::signal::Signal::SIGSTOP)?;
    let (_, code, reason) = next_failure(&mut events, Duration::from_secs(15)).await?;
    assert_eq!(code, "agent_silent");
    assert!(reason.contains("no heartbeat"), "{reason}");
    assert!(
        !berth_hostd::util::pid_alive(vm.pid),
        "the frozen VM was destroyed"
    );
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ballooned_substrate_is_smaller_and_its_clones_work() -> Result<()> {
    let mut small = image_config("small", 0);
    small.balloon_mib = Some(96);
    let images = vec![image_config("arena", 0), small];
    let sb = Sandbox::start_custom("balloon", images, &["arena".into()], |_| {}).await?;
    sb.pool
        .wait_ready("small", 0, Duration::from_secs(120))
        .await?;
    let header: serde_json::Value = serde_json::from_slice(&std::fs::read(
        sb.dir.join("substrates/small/substrate.json"),
    )?)?;
    assert_eq!(header["fingerprint"]["machine"]["balloon_mib"], 96);
    let st = sb.pool.status();
    let bytes = |name: &str| {
        st.images
            .iter()
            .find(|i| i.name == name)
            .map(|i| i.substrate_bytes)
    };
    let (plain_bytes, small_bytes) = (
        bytes("arena").expect("arena"),
        bytes("small").expect("small"),
    );
    // The balloon hands the guest's free pages back: they are holes in the RAM file.
    assert!(
        small_bytes + (16 << 20) < plain_bytes,
        "ballooned substrate {} MiB vs plain {} MiB",
        small_bytes >> 20,
        plain_bytes >> 20
    );
    let mut req = request("small-1");
    req.image = "small".into();
    let vm = sb.pool.activate(req).await?;
    assert!(matches!(
        game_hello(vm.game_addr).await?,
        GameAnswer::Hello { .. }
    ));
    sb.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balloon_that_would_starve_the_guest_is_refused_naming_the_key() -> Result<()> {
    // 64 of 128 MiB: the arena's guest gives memory back only down to ~83 MiB, so a substrate
    // docked "anyway" left every clone to panic out of memory once its session started.
    let mut lean = image_config("lean", 0);
    lean.balloon_mib = Some(64);
    let sb = Sandbox::start_custom("lean", vec![lean], &[], |_| {}).await?;
    let err = sb
        .pool
        .wait_ready("lean", 0, Duration::from_secs(120))
        .await
        .expect_err("refused, not docked");
    let message = err.to_string();
    assert!(
        message.contains("images.lean.balloon_mib = 64 starves the guest"),
        "{message}"
    );
    assert!(
        message.contains("gives memory back only down to"),
        "{message}"
    );
    let st = sb.pool.status();
    assert_eq!(st.images[0].substrate, "failed");
    assert!(
        qemu_naming(&sb.dir).is_empty(),
        "the refused template was killed"
    );
    let mut req = request("lean-1");
    req.image = "lean".into();
    let refused = sb.pool.activate(req).await.expect_err("nothing docked");
    assert_eq!(refused.code(), "not_docked");
    sb.finish().await
}
