//! `berth-hostd selftest`, the real binary on a QEMU host: prime, three sessions each answering
//! as itself, destroy, nothing left; and what it says about configs it cannot use. (The same
//! command drives the xen driver in the nested-Xen tier of `cargo xtask test`.)

use berth_testkit::*;
use std::path::Path;
use std::process::{Command, Output};

fn selftest(config: &Path, json: &Path) -> Output {
    Command::new(hostd_bin())
        .args(["selftest", "--sessions", "3", "--config"])
        .arg(config)
        .arg("--json")
        .arg(json)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run berth-hostd selftest")
}

#[test]
fn a_qemu_host_checks_itself_end_to_end() {
    let state = Sandbox::state_dir("selftest");
    let files = Sandbox::state_dir("selftest-files");
    std::fs::create_dir_all(&files).expect("mkdir");
    let config = files.join("hostd.toml");
    std::fs::write(
        &config,
        format!(
            "host_id = \"selftest\"\nstate_dir = \"{}\"\naccel = \"tcg\"\ncontrol = \"127.0.0.1:0\"\n\
             [gateway]\nlisten = \"127.0.0.1:0\"\n\
             [[images]]\nname = \"arena\"\ndir = \"{}\"\nwarm = 1\n",
            state.display(),
            image_dir().display()
        ),
    )
    .expect("write config");
    let json = files.join("report.json");
    let out = selftest(&config, &json);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the report is written"))
            .expect("the report is JSON");
    let _ = std::fs::remove_dir_all(&files);
    assert!(
        out.status.success(),
        "selftest failed: {}\n{report:#}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["ok"], true);
    assert_eq!(report["driver"], "qemu");
    assert!(report["prime"]["state_bytes"]
        .as_u64()
        .is_some_and(|b| b > 0));
    let sessions = report["sessions"].as_array().expect("sessions");
    assert_eq!(sessions.len(), 3, "{report:#}");
    let mut vms = std::collections::HashSet::new();
    for s in sessions {
        assert_eq!(s["answered"], true);
        assert_eq!(s["hello"]["session_id"], s["session_id"], "{s}");
        assert_eq!(s["hello"]["vm_id"], s["vm_id"], "{s}");
        assert!(vms.insert(s["vm_id"].to_string()), "one VM per session");
    }
    assert_eq!(report["leftovers"], serde_json::json!([]));
    assert!(
        !state.exists(),
        "the state folder is gone after the selftest"
    );
}

#[test]
fn configs_it_cannot_use_are_named() {
    let files = Sandbox::state_dir("selftest-bad");
    std::fs::create_dir_all(&files).expect("mkdir");
    let json = files.join("report.json");
    let run = |name: &str, text: &str| {
        let config = files.join(name);
        std::fs::write(&config, text).expect("write config");
        let out = selftest(&config, &json);
        assert!(!out.status.success(), "{name} must fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let state = files.join("state");
    let none = run(
        "no-images.toml",
        &format!("state_dir = \"{}\"\naccel = \"tcg\"\n", state.display()),
    );
    assert!(none.contains("no [[images]]"), "{none}");
    let typo = run("typo.toml", "drivr = \"xen\"\n");
    assert!(typo.contains("unknown field"), "{typo}");
    // This machine is no Xen dom0: the xen driver says what it could not do.
    let xen = run(
        "xen.toml",
        &format!("driver = \"xen\"\nstate_dir = \"{}\"\n", state.display()),
    );
    assert!(xen.contains("xl"), "{xen}");
    let missing = selftest(&files.join("absent.toml"), &json);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("absent.toml"));
    let _ = std::fs::remove_dir_all(&files);
}
