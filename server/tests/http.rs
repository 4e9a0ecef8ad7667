//! The plain HTTP surface (health, readiness, metrics, dev tokens) and the binary's start-up
//! checks (bad config files fail naming the key; tokens are minted only when allowed).

mod common;

use anyhow::Result;
use berth_server::app::Server;
use common::*;
use std::process::Command;

#[tokio::test]
async fn health_readiness_and_metrics() -> Result<()> {
    let s = Server::start(config()).await?;
    let base = format!("http://{}", s.addr);
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await?
            .text()
            .await?,
        "ok"
    );
    assert_eq!(
        http.get(format!("{base}/readyz")).send().await?.status(),
        200
    );

    let mut c = common::player(&s, "mia").await?;
    c.send(&queue("arena", "eu")).await?;
    c.recv().await?;
    c.raw("{broken".into()).await?;
    c.expect_error("bad_json").await?;
    let m = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    for want in [
        r#"berth_queue_depth{mode="arena",region="eu"} 1"#,
        "berth_player_connections 1",
        r#"berth_refused_total{code="bad_json"} 1"#,
        r#"berth_sessions{state="active"} 0"#,
        "# TYPE berth_placement_seconds histogram",
    ] {
        assert!(m.contains(want), "metrics lack {want:?}:\n{m}");
    }
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn dev_tokens_only_in_dev_mode() -> Result<()> {
    let s = Server::start(config()).await?;
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/dev/token", s.addr))
        .json(&serde_json::json!({"player": "nina"}))
        .send()
        .await?;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<serde_json::Value>().await?["code"],
        "dev_tokens_disabled"
    );
    s.shutdown().await;

    let mut cfg = config();
    cfg.auth.dev_tokens = true;
    let s = Server::start(cfg).await?;
    let url = format!("http://{}/v1/dev/token", s.addr);
    let http = reqwest::Client::new();
    let bad = http
        .post(&url)
        .json(&serde_json::json!({"player": "no spaces"}))
        .send()
        .await?;
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.json::<serde_json::Value>().await?["code"], "bad_player");
    let ok: serde_json::Value = http
        .post(&url)
        .json(&serde_json::json!({"player": "nina"}))
        .send()
        .await?
        .json()
        .await?;
    let token = ok["token"].as_str().unwrap_or_default();
    assert_eq!(auth().verify_player(token)?.as_str(), "nina");
    s.shutdown().await;
    Ok(())
}

fn server_bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_berth-server"));
    c.env_remove("BERTH_AUTH_SECRET").env_remove("BERTH_CONFIG");
    c
}

#[test]
fn bad_config_files_fail_naming_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let modes = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/modes");
    for (text, key) in [
        ("[limits]\nmax_frame = 1\n", "max_frame"),
        (
            "[timeouts]\nhost_heartbeat_ms = 5000\nhost_lost_ms = 1000\n",
            "timeouts.host_lost_ms",
        ),
        ("[store]\nredis = \"http://x\"\n", "store.redis"),
        ("[store]\nredis = \"rediss://x\"\n", "rediss"),
        ("[auth]\nsecret = \"short\"\n", "auth.secret"),
        ("[placement]\npolicy = \"random\"\n", "random"),
    ] {
        let path = dir.path().join("server.toml");
        std::fs::write(&path, text)?;
        let out = server_bin()
            .args(["--config"])
            .arg(&path)
            .args(["run", "--listen", "127.0.0.1:0", "--modes"])
            .arg(&modes)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}: started");
        assert!(err.contains(key), "{text}: {err}");
    }
    let out = server_bin()
        .args(["--config", "/nonexistent/server.toml", "run"])
        .output()?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/server.toml"));
    Ok(())
}

#[test]
fn player_tokens_need_dev_mode_host_tokens_do_not() -> Result<()> {
    let secret = ("BERTH_AUTH_SECRET", SECRET);
    let out = server_bin()
        .env(secret.0, secret.1)
        .args(["token", "--player", "zoe"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dev"));
    let out = server_bin()
        .env(secret.0, secret.1)
        .args(["token", "--player", "zoe", "--dev"])
        .output()?;
    let token = String::from_utf8(out.stdout)?;
    assert_eq!(auth().verify_player(token.trim())?.as_str(), "zoe");
    let out = server_bin()
        .env(secret.0, secret.1)
        .args(["token", "--host", "h9"])
        .output()?;
    let claims = auth().verify(
        String::from_utf8(out.stdout)?.trim(),
        berth_server::auth::Role::Host,
    )?;
    assert_eq!(claims.sub, "h9");
    Ok(())
}

#[tokio::test]
async fn admin_session_lists_page_with_a_total() -> Result<()> {
    let mut cfg = config();
    // No host: the three matches stay `placing` for the whole test.
    cfg.timeouts.placing_ms = 60_000;
    let s = Server::start(cfg).await?;
    let mut players = Vec::new();
    for i in 0..6 {
        let mut c = common::player(&s, &format!("pg{i}")).await?;
        c.send(&queue("duel", "eu")).await?;
        players.push(c);
    }
    let http = reqwest::Client::new();
    let get = |q: &str| {
        http.get(format!("http://{}/v1/admin/sessions{q}", s.addr))
            .bearer_auth(admin_token())
            .send()
    };
    let mut total = 0;
    for _ in 0..50 {
        let r = get("?state=placing").await?;
        anyhow::ensure!(r.status() == 200, "{}: {}", r.status(), r.text().await?);
        total = r.headers()["x-total-count"].to_str()?.parse::<usize>()?;
        if total == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(total, 3);
    let all: Vec<serde_json::Value> = get("?state=placing").await?.json().await?;
    let page = get("?state=placing&limit=2&offset=1").await?;
    assert_eq!(page.headers()["x-total-count"], "3");
    let page: Vec<serde_json::Value> = page.json().await?;
    assert_eq!(page.len(), 2);
    assert_eq!(page[0]["id"], all[1]["id"], "oldest first, paged");
    for (q, code) in [
        ("?limit=0", "bad_limit"),
        ("?limit=99999", "bad_limit"),
        ("?limit=x", "bad_query"),
    ] {
        let r = get(q).await?;
        assert_eq!(r.status(), 400, "{q}");
        assert_eq!(r.json::<serde_json::Value>().await?["code"], code, "{q}");
    }
    s.shutdown().await;
    Ok(())
}

/// The real binary on SIGTERM: `/readyz` fails at once and new sockets are refused for the
/// configured delay, then its players are told to reconnect (1001) and it exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_makes_the_replica_unready_first_then_closes_its_players_and_exits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("server.toml");
    std::fs::write(&path, "[timeouts]\nshutdown_delay_ms = 1500\n")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let modes = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/modes");
    let mut child = server_bin()
        .env("BERTH_AUTH_SECRET", SECRET)
        .args(["--config"])
        .arg(&path)
        .args(["run", "--listen", &format!("127.0.0.1:{port}"), "--modes"])
        .arg(&modes)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let base = format!("http://127.0.0.1:{port}");
    let url = format!("ws://127.0.0.1:{port}/v1/play");
    let http = reqwest::Client::new();
    let mut up = false;
    for _ in 0..100 {
        if http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::ensure!(up, "the server never became ready");
    let connect = || {
        berth_client::PlayClient::connect(berth_client::PlayConfig::new(url.clone(), token("ola")))
    };
    let mut player = connect().await?;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let ready = http.get(format!("{base}/readyz")).send().await?;
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.text().await?, "shutting_down");
    match connect().await {
        Err(berth_client::ClientError::Http { status: 503, body }) => {
            assert!(body.contains("shutting_down"), "{body}");
        }
        other => panic!("expected a 503 shutting_down, got {:?}", other.map(|_| ())),
    }
    // The live player is served until the delay is over, then told to reconnect.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), player.closed())
        .await??
        .and_then(|c| c.code);
    assert_eq!(closed, Some(1001));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no exit after SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    Ok(())
}
