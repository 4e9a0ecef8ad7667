//! A swarm against a server that terminates TLS itself, with a CA made at test time: with
//! `--ca` the bots get their dev tokens over `https://` and queue over `wss://` exactly as over
//! plain http (here, with no host, every match fails `placement_failed`); without it every bot
//! fails at its first request, the server's certificate not trusted.

mod common;

use anyhow::Result;
use berth_sim::{Arrivals, SwarmConfig};
use berth_testkit::TestCa;
use std::time::Duration;

fn swarm(port: u16, ca: Option<&TestCa>) -> SwarmConfig {
    SwarmConfig {
        server: format!("https://localhost:{port}"),
        ca: ca.map(TestCa::ca),
        arrivals: Arrivals::Fixed {
            players: 2,
            ramp: Duration::ZERO,
        },
        duration: Duration::from_secs(20),
        drain: Duration::from_secs(5),
        ..SwarmConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bots_play_over_https_and_wss_with_the_ca_and_fail_without_it() -> Result<()> {
    let ca = TestCa::new()?;
    let server = common::server_with(true, 300, |c| c.tls = Some(ca.files())).await?;
    let port = server.addr.port();

    let report = berth_sim::run(swarm(port, Some(&ca)), None).await?;
    assert_eq!((report.players, report.matches.attempted), (2, 2));
    let failures = &report.failures;
    assert_eq!(failures.get("placement_failed"), Some(&2), "{failures:?}");

    let report = berth_sim::run(swarm(port, None), None).await?;
    assert_eq!((report.players, report.matches.matched), (2, 0));
    assert_eq!(report.failed, 2, "{:?}", report.failures);
    assert!(
        report.failures.keys().all(|k| k.starts_with("dev_token")),
        "{:?}",
        report.failures
    );
    server.shutdown().await;
    Ok(())
}
