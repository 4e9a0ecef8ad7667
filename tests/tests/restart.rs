//! The real `berth-hostd` binary: killed while VMs run, restarted, it adopts the active VMs,
//! cleans the warm leftovers, and a clean stop removes everything. Also the control API's
//! answers to bad requests.

use anyhow::{Context, Result};
use berth_hostd::control::{Client, ClientError};
use berth_hostd::pool::{ActivateRequest, ActivationPath};
use berth_protocol::game::GameAnswer;
use berth_protocol::SessionId;
use berth_testkit::fixtures::TempDir;
use berth_testkit::*;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A running `berth-hostd`; killed and reaped if the test ends early.
struct Hostd(Child);

impl Hostd {
    fn id(&self) -> u32 {
        self.0.id()
    }
    fn kill(&mut self) -> std::io::Result<()> {
        self.0.kill()?;
        self.0.wait().map(|_| ())
    }
    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.0.wait()
    }
}

impl Drop for Hostd {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn(config: &Path) -> Hostd {
    Hostd(
        Command::new(hostd_bin())
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .spawn()
            .expect("starting berth-hostd"),
    )
}

async fn wait_warm(client: &Client, warm: u32) -> Result<berth_hostd::pool::Status> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = client.status().await {
            if s.images
                .first()
                .is_some_and(|i| i.substrate == "docked" && i.warm >= warm)
            {
                return Ok(s);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "hostd never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_hostd_adopts_running_vms_and_cleans_the_rest() -> Result<()> {
    init_logs();
    let dir = Sandbox::state_dir("restart");
    let _ = std::fs::remove_dir_all(&dir);
    let ic = image_config("arena", 1);
    seed_substrate(&dir, &ic).await?;
    let port = free_port();
    let conf_dir = TempDir::new("conf-restart")?;
    let config = conf_dir.0.join("hostd.toml");
    std::fs::write(
        &config,
        format!(
            "host_id = \"restart\"\nstate_dir = \"{}\"\ncontrol = \"127.0.0.1:{port}\"\naccel = \"tcg\"\n\
             [[images]]\nname = \"arena\"\ndir = \"{}\"\nwarm = 1\n\
             [gateway]\nlisten = \"127.0.0.1:0\"\n",
            dir.display(),
            image_dir().display()
        ),
    )?;
    let _guard = DirGuard(dir.clone());
    let client = Client::new(([127, 0, 0, 1], port).into());

    let mut hostd = spawn(&config);
    wait_warm(&client, 1).await?;
    // Bad requests get stable codes.
    let http = reqwest_client();
    let resp = http
        .post(format!("http://127.0.0.1:{port}/v1/activate"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["code"], "bad_request");
    let resp = http
        .post(format!("http://127.0.0.1:{port}/v1/activate"))
        .json(&serde_json::json!({"session_id": "../etc", "image": "arena"}))
        .send()
        .await?;
    assert_eq!(resp.status(), 400, "path-like session ids are refused");
    let unknown = ActivateRequest {
        teams: vec![],
        session_id: SessionId::new("u")?,
        image: "nosuch".into(),
        players: vec![],
        params: serde_json::Value::Null,
        ticket_key: String::new(),
        deadline_ms: 0,
    };
    match client.activate(&unknown).await {
        Err(ClientError::Api(e)) => assert_eq!(e.code, "unknown_image"),
        other => panic!("expected unknown_image, got {other:?}"),
    }

    // A game nobody joins would end itself (abandoned) before the restart is over.
    let req = ActivateRequest {
        session_id: SessionId::new("kept")?,
        image: "arena".into(),
        params: serde_json::json!({"abandon_after_s": 3600, "time_limit_s": 3600}),
        ..unknown
    };
    let vm = client.activate(&req).await?;
    // The game server's output is kept with the VM's console, readable by id or session
    // (the arena logs its activation at its first health call, 2 s in).
    let deadline = Instant::now() + Duration::from_secs(20);
    let output = loop {
        let output = client.output("kept", 64 << 10).await?;
        if output.contains("berth-arena: activated for session kept") || Instant::now() > deadline {
            break output;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        output.contains("game err: berth-arena: activated for session kept"),
        "{output}"
    );
    match client.output("nope", 10).await {
        Err(ClientError::Api(e)) => assert_eq!(e.code, "unknown_vm"),
        other => panic!("expected unknown_vm, got {other:?}"),
    }
    let before = wait_warm(&client, 1).await?;
    let warm_pids: Vec<u32> = qemu_naming(&dir)
        .into_iter()
        .filter(|p| *p != vm.pid)
        .collect();
    assert_eq!(
        warm_pids.len(),
        1,
        "one warm clone besides the active VM: {before:?}"
    );

    // Crash.
    hostd.kill()?;
    assert!(
        berth_hostd::util::pid_alive(vm.pid),
        "VMs outlive a crashed hostd"
    );

    let mut hostd = spawn(&config);
    let after = wait_warm(&client, 1).await?;
    let adopted = after
        .vms
        .iter()
        .find(|v| v.vm_id == vm.vm_id)
        .context("VM not adopted")?;
    assert_eq!(adopted.path, ActivationPath::Adopted);
    assert_eq!(adopted.session_id, vm.session_id);
    assert!(
        !berth_hostd::util::pid_alive(warm_pids[0]),
        "the orphaned warm clone was destroyed"
    );
    let GameAnswer::Hello { session_id, .. } = game_hello(vm.game_addr).await? else {
        panic!("expected hello");
    };
    assert_eq!(session_id.as_str(), "kept");
    // Same session id after the restart: still the same VM.
    assert_eq!(client.activate(&req).await?.vm_id, vm.vm_id);

    client.destroy("kept").await?;
    assert!(!berth_hostd::util::pid_alive(vm.pid));
    signal(hostd.id(), nix::sys::signal::Signal::SIGTERM)?;
    let status = hostd.wait()?;
    assert!(status.success(), "clean stop: {status}");
    drop(conf_dir);
    assert_nothing_left(&dir)?;
    Ok(())
}

fn reqwest_client() -> reqwest::Client {
    reqwest::Client::new()
}

#[test]
fn a_bad_config_file_fails_fast_naming_the_key() {
    let dir = TempDir::new("conf-badconfig").expect("temp dir");
    let cases = [
        (
            "[[images]]\nname = \"a\"\ndir = \"x\"\nmemory_mib = 8\n",
            "images[0].memory_mib",
        ),
        ("surprise = true\n", "unknown field `surprise`"),
        ("accel = \"warp\"\n", "unknown variant `warp`"),
    ];
    for (text, expected) in cases {
        let path = dir.0.join("hostd.toml");
        std::fs::write(&path, text).expect("write config");
        let out = Command::new(hostd_bin())
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run berth-hostd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text:?} was accepted");
        assert!(stderr.contains(expected), "{text:?}: {stderr}");
    }
    let missing = Command::new(hostd_bin())
        .args(["run", "--config", "/nonexistent/hostd.toml"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run berth-hostd");
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("reading config /nonexistent/hostd.toml")
    );
    drop(dir);
}

/// Polls the server's view of host `host` until `f` holds.
async fn host_until(
    server: &berth_server::app::Server,
    host: &str,
    f: impl Fn(&berth_server::model::HostRecord) -> bool,
) -> Result<berth_server::model::HostRecord> {
    let id = berth_protocol::HostId::new(host)?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(h) = server.ctx.store.host(&id).await? {
            if f(&h) {
                return Ok(h);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "host {host} never got there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The next message that is not a queue status.
async fn next_news(
    c: &mut berth_testkit::player::Client,
) -> Result<berth_protocol::play::ServerMessage> {
    use berth_protocol::play::ServerMessage;
    Ok(c.until(Duration::from_secs(30), |m| {
        !matches!(m, ServerMessage::QueueStatus { .. })
    })
    .await?)
}

/// A real `berth-hostd` linked to `server` as `host`: one warm arena clone, its substrate
/// docked, its state folder removed (and checked) by the caller through `dir`.
struct Linked {
    hostd: Hostd,
    control: Client,
    config: std::path::PathBuf,
    dir: std::path::PathBuf,
    _guard: DirGuard,
    _conf: TempDir,
}

async fn linked_hostd(server: &berth_server::app::Server, host: &str) -> Result<Linked> {
    let dir = Sandbox::state_dir(host);
    let _ = std::fs::remove_dir_all(&dir);
    seed_substrate(&dir, &image_config("arena", 1)).await?;
    let guard = DirGuard(dir.clone());
    let conf = TempDir::new(&format!("conf-{host}"))?;
    let config = conf.0.join("hostd.toml");
    let port = free_port();
    let gateway = free_port();
    std::fs::write(
        &config,
        format!(
            "host_id = \"{host}\"\nstate_dir = \"{}\"\ncontrol = \"127.0.0.1:{port}\"\naccel = \"tcg\"\n\
             [[images]]\nname = \"arena\"\ndir = \"{}\"\nwarm = 1\n\
             [gateway]\nlisten = \"127.0.0.1:{gateway}\"\n\
             [server]\nurl = \"ws://{}/v1/hosts\"\ntoken = \"{}\"\ngateway = \"ws://127.0.0.1:{gateway}/v1/game\"\nreconnect_max_s = 1\n",
            dir.display(),
            image_dir().display(),
            server.addr,
            berth_testkit::fixtures::host_token(host),
        ),
    )?;
    let hostd = spawn(&config);
    host_until(server, host, |h| {
        h.images.iter().any(|i| i.docked && i.warm >= 1)
    })
    .await?;
    Ok(Linked {
        hostd,
        control: Client::new(([127, 0, 0, 1], port).into()),
        config,
        dir,
        _guard: guard,
        _conf: conf,
    })
}

/// Two players queue for a duel on `server` and are matched: both, the session, one ticket.
async fn duel(
    server: &berth_server::app::Server,
    names: [&str; 2],
) -> Result<(
    berth_testkit::player::Client,
    berth_testkit::player::Client,
    SessionId,
    String,
)> {
    use berth_protocol::play::ServerMessage;
    use berth_testkit::player as client;
    let mut a = client::player(server, names[0]).await?;
    let mut b = client::player(server, names[1]).await?;
    a.send(&client::queue("duel", "eu")).await?;
    b.send(&client::queue("duel", "eu")).await?;
    let ServerMessage::Matched {
        session, ticket, ..
    } = next_news(&mut a).await?
    else {
        anyhow::bail!("expected matched");
    };
    next_news(&mut b).await?;
    Ok((a, b, session, ticket))
}

/// A server whose hosts are lost after 1.5 s of silence but keep their sessions for 60 s.
async fn grace_server() -> Result<berth_server::app::Server> {
    let mut sc = berth_testkit::player::config();
    sc.timeouts.host_heartbeat_ms = 500;
    sc.timeouts.host_lost_ms = 1500;
    sc.timeouts.host_grace_ms = 60_000;
    berth_server::app::Server::start(sc).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_match_outlives_a_killed_hostd_that_comes_back_within_the_grace() -> Result<()> {
    use berth_server::model::{HostState, SessionState};
    use berth_testkit::player as client;
    init_logs();
    let server = grace_server().await?;
    let mut h = linked_hostd(&server, "outlive").await?;
    let (mut a, mut b, session, ticket) = duel(&server, ["ann", "ben"]).await?;
    let vm = h
        .control
        .status()
        .await?
        .vms
        .into_iter()
        .find(|v| v.session_id == session)
        .context("the session's VM")?;

    // hostd dies; the server marks the host lost, but the match goes on in its VM.
    h.hostd.kill()?;
    host_until(&server, "outlive", |h| h.state == HostState::Lost).await?;
    let s = server.ctx.store.session(&session).await?.context("kept")?;
    assert_eq!(s.state, SessionState::Active, "{:?}", s.end_reason);
    // Back within the grace: it adopts the VM, registers it, and the session stays.
    h.hostd = spawn(&h.config);
    host_until(&server, "outlive", |h| h.state == HostState::Up).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = server.ctx.store.session(&session).await?.context("kept")?;
    assert_eq!(s.state, SessionState::Active, "{:?}", s.end_reason);

    // The game plays on to its end, and both players hear its results.
    let (reason, _) = game_surrender(vm.game_addr, &ticket).await?;
    assert_eq!(reason, "surrender");
    for c in [&mut a, &mut b] {
        let (reason, results) = client::ended(c).await?;
        assert_eq!(reason, "surrender");
        assert!(!results["winner"].is_null(), "{results}");
    }
    signal(h.hostd.id(), nix::sys::signal::Signal::SIGTERM)?;
    assert!(h.hostd.wait()?.success());
    server.shutdown().await;
    assert_nothing_left(&h.dir)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_hostd_the_live_match_finishes_then_it_stops() -> Result<()> {
    use berth_testkit::player as client;
    init_logs();
    let server = grace_server().await?;
    let mut h = linked_hostd(&server, "drainer").await?;
    let (mut a, mut b, session, ticket) = duel(&server, ["cid", "dot"]).await?;
    let late = ActivateRequest {
        session_id: SessionId::new("too-late")?,
        image: "arena".into(),
        players: vec![],
        teams: vec![],
        params: serde_json::Value::Null,
        ticket_key: String::new(),
        deadline_ms: 0,
    };

    // Its control API says what it did: the activation, the live VM, ready.
    let control = h.control.base().to_owned();
    let get = |path: &str| reqwest::get(format!("{control}{path}"));
    let metrics = get("/metrics").await?.text().await?;
    for line in [
        r#"berth_hostd_vms{state="active"} 1"#,
        r#"berth_hostd_substrate_docked{image="arena"} 1"#,
        r#"berth_hostd_activation_seconds_count{path="warm"} 1"#,
        "berth_hostd_draining 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    assert!(metrics.contains(r#"berth_hostd_activations_total{image="arena",path="warm"} 1"#));
    assert_eq!(get("/healthz").await?.text().await?, "ok");
    assert_eq!(get("/readyz").await?.status(), 200);

    signal(h.hostd.id(), nix::sys::signal::Signal::SIGTERM)?;
    // The server hears the drain and places nothing more there; hostd refuses new sessions.
    host_until(&server, "drainer", |h| h.draining).await?;
    match h.control.activate(&late).await {
        Err(ClientError::Api(e)) => assert_eq!(e.code, "draining"),
        other => panic!("expected draining, got {other:?}"),
    }
    assert!(h.control.status().await?.draining);
    let ready = get("/readyz").await?;
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.text().await?, "draining");
    // The live match plays on to its end, and both players hear its results...
    let live = h.control.status().await?.vms;
    let game = live
        .iter()
        .find(|v| v.session_id == session)
        .context("live VM")?;
    assert_eq!(
        game_surrender(game.game_addr, &ticket).await?.0,
        "surrender"
    );
    for c in [&mut a, &mut b] {
        let (reason, results) = client::ended(c).await?;
        assert_eq!(reason, "surrender");
        assert!(!results["winner"].is_null(), "{results}");
    }
    // ...and then hostd stops by itself, cleanly.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = h.hostd.0.try_wait()? {
            break status;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "hostd did not stop after the drain"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "clean stop: {status}");
    server.shutdown().await;
    assert_nothing_left(&h.dir)?;
    Ok(())
}
