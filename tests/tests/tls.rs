//! TLS between the real pieces, with a CA made at test time: hostd, configured from a file as an
//! operator writes it (`[server] url = "wss://…"` with `ca`, `[gateway.tls]`), links to a
//! server that terminates TLS itself, and its gateway serves players over `wss://`. A hostd or a
//! player that does not trust the CA is refused at the handshake, and counted. And a whole
//! match, with TLS on every hop, from the queue through the gateway to the results, on a real VM.

use anyhow::{bail, Context, Result};
use berth_client::{ClientError, ConnectOptions, Trust};
use berth_hostd::Hostd;
use berth_hostd::HostdConfig;
use berth_protocol::game::GameRequest;
use berth_protocol::HostId;
use berth_server::app::Server;
use berth_testkit::player::{config, eventually, host_token, refused_total};
use berth_testkit::*;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);
const HOST: &str = "tls-host";

/// hostd's config file in `ca`'s folder, next to the PEM files it names by relative path;
/// `images` is its `[[images]]` text (may be empty).
fn hostd_toml(
    ca: &TestCa,
    server_port: u16,
    state_dir: &std::path::Path,
    images: &str,
) -> Result<HostdConfig> {
    std::fs::write(ca.dir().join("host.jwt"), host_token(HOST))?;
    let text = format!(
        r#"
host_id = "{HOST}"
state_dir = "{state}"
control = "127.0.0.1:0"
accel = "tcg"
{images}

[gateway]
listen = "127.0.0.1:0"

[gateway.tls]
cert = "cert.pem"
key = "key.pem"

[server]
url = "wss://localhost:{server_port}/v1/hosts"
ca = "ca.pem"
token_file = "host.jwt"
gateway = "wss://127.0.0.1:7071/v1/game"
"#,
        state = state_dir.display()
    );
    let path = ca.dir().join("hostd.toml");
    std::fs::write(&path, text)?;
    Ok(HostdConfig::load(&path)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostd_links_over_wss_with_its_ca_and_its_gateway_serves_wss() -> Result<()> {
    init_logs();
    let ca = TestCa::new()?;
    let mut sc = config();
    sc.tls = Some(ca.files());
    let server = Server::start(sc).await?;
    let state_dir = Sandbox::state_dir("tls");
    let _cleanup = DirGuard(state_dir.clone());
    let hostd_config = hostd_toml(&ca, server.addr.port(), &state_dir, "")?;
    let mut link = hostd_config.server_link()?.context("a [server] table")?;
    let mut hostd = Hostd::start_with(hostd_config, tcg_driver().await, None).await?;
    let gateway = format!("wss://127.0.0.1:{}/v1/game", hostd.gateway().addr.port());
    link.gateway = gateway.clone();

    // A hostd that trusts only Mozilla's roots is refused at the handshake, and never registers.
    let mut stranger = link.clone();
    stranger.trust = Trust::roots();
    let (stop_stranger, stranger_task) = {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = berth_hostd::link::run(hostd.pool().clone(), stranger, async move {
            let _ = stopped.await;
        });
        (stop, tokio::spawn(run))
    };
    eventually("the stranger's handshake is refused", async || {
        Ok(refused_total(&server, berth_net::TLS_HANDSHAKE_FAILED) >= 1)
    })
    .await?;
    let _ = stop_stranger.send(());
    stranger_task.await?;
    let host = HostId::new(HOST)?;
    assert!(server.ctx.store.host(&host).await?.is_none());

    // With its CA, hostd registers over wss:// and advertises its wss:// gateway.
    hostd.connect(link);
    eventually("hostd registers over wss", async || {
        Ok(server.ctx.store.host(&host).await?.is_some())
    })
    .await?;
    let record = server.ctx.store.host(&host).await?.context("registered")?;
    assert_eq!(record.gateway, gateway);

    // The gateway over wss://: a join is answered as over ws:// (here: a bad ticket refused).
    let trusting = ConnectOptions {
        trust: ca.trust(),
        ..ConnectOptions::default()
    };
    let mut ws = GameWs::connect_url(&gateway, trusting.clone()).await?;
    ws.send(&GameRequest::Join {
        ticket: "not-a-jwt".into(),
    })
    .await?;
    let bad_ticket = ("bad_ticket".to_owned(), 4401, "bad_ticket".to_owned());
    assert_eq!(ws.refused(WAIT).await?, bad_ticket);
    // A player that does not trust the CA is refused at the handshake, and counted.
    match GameWs::connect_url(&gateway, ConnectOptions::default()).await {
        Err(ClientError::Tls(_)) => {}
        other => bail!("expected a TLS handshake error, got {other:?}"),
    }
    let gw = hostd.gateway();
    eventually("the gateway counts the failed handshake", async || {
        let refused = gw.stats().refused;
        Ok(refused.get(berth_net::TLS_HANDSHAKE_FAILED) == Some(&1))
    })
    .await?;
    // …and the gateway carries on.
    let mut ws = GameWs::connect_url(&gateway, trusting).await?;
    ws.send(&GameRequest::Join {
        ticket: "still-not-a-jwt".into(),
    })
    .await?;
    assert_eq!(ws.refused(WAIT).await?, bad_ticket);

    hostd.shutdown().await?;
    server.shutdown().await;
    Ok(())
}

/// A whole match with TLS on every hop: players on `wss://` to the server, hostd linked over
/// `wss://`, the game through the gateway's `wss://`, results back to the players.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_match_over_tls_from_queue_to_results() -> Result<()> {
    use berth_protocol::play::ServerMessage;
    init_logs();
    let ca = TestCa::new()?;
    let mut sc = config();
    sc.tls = Some(ca.files());
    let server = Server::start(sc).await?;
    let state_dir = Sandbox::state_dir("tls-match");
    let _ = std::fs::remove_dir_all(&state_dir);
    seed_substrate(&state_dir, &image_config("arena", 1)).await?;
    let _cleanup = DirGuard(state_dir.clone());
    let images = format!(
        "[[images]]\nname = \"arena\"\ndir = \"{}\"\nwarm = 1\n",
        image_dir().display()
    );
    let hostd_config = hostd_toml(&ca, server.addr.port(), &state_dir, &images)?;
    let mut link = hostd_config.server_link()?.context("a [server] table")?;
    let mut hostd = Hostd::start_with(hostd_config, tcg_driver().await, None).await?;
    link.gateway = format!("wss://localhost:{}/v1/game", hostd.gateway().addr.port());
    hostd.connect(link);
    let host = HostId::new(HOST)?;
    eventually("hostd is up with its substrate docked", async || {
        let h = server.ctx.store.host(&host).await?;
        Ok(h.is_some_and(|h| h.images.iter().any(|i| i.docked)))
    })
    .await?;

    let trusting = ConnectOptions {
        trust: ca.trust(),
        ..ConnectOptions::default()
    };
    let play = format!("wss://localhost:{}/v1/play", server.addr.port());
    let mut players = Vec::new();
    for name in ["tia", "ugo"] {
        let mut config =
            berth_client::PlayConfig::new(play.clone(), berth_testkit::player::token(name));
        config.socket = trusting.clone();
        let mut p = berth_client::PlayClient::connect(config).await?;
        p.send(&berth_testkit::player::queue("duel", "eu")).await?;
        players.push(p);
    }
    let mut tickets = Vec::new();
    for p in &mut players {
        let m = p
            .until(Duration::from_secs(30), |m| {
                matches!(m, ServerMessage::Matched { .. })
            })
            .await?;
        let ServerMessage::Matched {
            endpoint, ticket, ..
        } = m
        else {
            bail!("filtered above");
        };
        assert!(endpoint.starts_with("wss://"), "{endpoint}");
        tickets.push((endpoint, ticket));
    }
    // Through the gateway over wss://: join, and give up; the other side wins.
    let (endpoint, ticket) = &tickets[0];
    let mut game = GameWs::connect_url(endpoint, trusting).await?;
    game.send(&GameRequest::Join {
        ticket: ticket.clone(),
    })
    .await?;
    game.until(WAIT, |h| {
        matches!(
            h,
            Heard::Answer(berth_protocol::game::GameAnswer::Welcome(_))
        )
    })
    .await?;
    game.send(&GameRequest::Surrender).await?;
    for p in &mut players {
        let (reason, results) = berth_testkit::player::ended(p).await?;
        assert_eq!(reason, "surrender");
        assert!(!results["winner"].is_null(), "{results}");
    }
    hostd.shutdown().await?;
    server.shutdown().await;
    assert_nothing_left(&state_dir)?;
    Ok(())
}
