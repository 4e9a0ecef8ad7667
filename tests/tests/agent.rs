//! The hostd ↔ agent boundary on a real clone: a refused identity gets a stable code and
//! leaves the VM usable; a second identity for an activated VM is refused.

use anyhow::Result;
use berth_hostd::driver::{DriverError, VmSpec};
use berth_hostd::substrate::Substrate;
use berth_protocol::game::GameAnswer;
use berth_protocol::guest::Identity;
use berth_protocol::{SessionId, VmId};
use berth_testkit::*;
use std::time::Duration;

fn identity(session: &str, hostname: &str) -> Identity {
    Identity {
        teams: vec![],
        session_id: SessionId::new(session).expect("valid"),
        vm_id: VmId::new("agent-vm").expect("valid"),
        hostname: hostname.into(),
        players: vec![],
        ticket_key: String::new(),
        params: serde_json::Value::Null,
        wall_clock_ms: 0,
        rng_seed: 7,
        deadline_ms: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_identities_get_stable_codes_and_leave_the_vm_usable() -> Result<()> {
    init_logs();
    let dir = Sandbox::state_dir("agent");
    let _guard = DirGuard(dir.clone());
    let ic = image_config("arena", 0);
    seed_substrate(&dir, &ic).await?;
    let driver = tcg_driver().await;
    let spec = VmSpec {
        image: image(),
        config: ic,
    };
    let substrate = Substrate::open(&dir.join("substrates/arena"), &driver.fingerprint(&spec))?;
    let vm_dir = dir.join("vms/agent-vm");
    let mut vm = driver
        .restore(&spec, &substrate, VmId::new("agent-vm")?, &vm_dir)
        .await?;

    match vm
        .activate(identity("s1", "not a hostname"), Duration::from_secs(20))
        .await
    {
        Err(DriverError::AgentRefused { code, message }) => {
            assert_eq!(code, "bad_identity");
            assert!(message.contains("not a hostname"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Before activation the game server does not hand out a session.
    assert!(matches!(
        game_hello(vm.game_addr()).await?,
        GameAnswer::Error { code, .. } if code == "not_activated"
    ));
    let ready = vm
        .activate(identity("s1", "berth-ok"), Duration::from_secs(20))
        .await?;
    assert_eq!(ready.session_id.as_str(), "s1");
    match vm
        .activate(identity("s2", "berth-ok"), Duration::from_secs(20))
        .await
    {
        Err(DriverError::AgentRefused { code, .. }) => assert_eq!(code, "already_activated"),
        other => panic!("expected already_activated, got {other:?}"),
    }
    let GameAnswer::Hello {
        session_id,
        hostname,
        ..
    } = game_hello(vm.game_addr()).await?
    else {
        panic!("expected hello");
    };
    assert_eq!((session_id.as_str(), hostname.as_str()), ("s1", "berth-ok"));
    vm.destroy().await;
    assert!(!vm_dir.exists());
    std::fs::remove_dir_all(&dir)?;
    assert_nothing_left(&dir)
}
