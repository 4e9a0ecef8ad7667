//! The whole product under a swarm: berth-server on a real Redis, hostd with real QEMU VMs and
//! its gateway, and `berth-sim` players who queue, are matched, connect through the gateway,
//! play the arena game to its end and hear the results. Afterwards the pool's books balance
//! and nothing is left behind.

use berth_testkit::player as client;

use anyhow::{Context, Result};
use berth_hostd::pool::PoolEvent;
use berth_protocol::HostId;
use berth_server::app::Server;
use berth_server::auth::Role;
use berth_server::model::{HostState, SessionState};
use berth_server::store::redis::RedisStore;
use berth_server::store::Store;
use berth_testkit::fixtures::{self, TempDir, TestMode};
use berth_testkit::Sandbox;
use std::sync::Arc;
use std::time::Duration;

/// A short duel for the test: first to 3 points or 8 seconds.
fn quick_mode() -> TestMode {
    TestMode {
        players: 2,
        session_max_s: 60,
        fill_wait_ms: None,
        params: "score_limit = 3\ntime_limit_s = 8\nrejoin_grace_s = 10\nabandon_after_s = 10\n",
    }
}

/// Two against two, parties of up to two, 8 seconds.
fn quick_arena() -> TestMode {
    TestMode {
        players: 4,
        session_max_s: 60,
        fill_wait_ms: Some(1000),
        params: "score_limit = 10\ntime_limit_s = 8\nrejoin_grace_s = 10\nabandon_after_s = 10\n",
    }
}

/// The real stack on one host: a Redis-backed server (dev tokens on, the quick modes), a hostd
/// pool with `warm` clones, its gateway, and the link.
struct Stack {
    sandbox: Sandbox,
    gateway: berth_hostd::gateway::Gateway,
    server: Server,
    store: Arc<dyn Store>,
    stop: tokio::sync::oneshot::Sender<()>,
    link: tokio::task::JoinHandle<()>,
    _modes: TempDir,
}

impl Stack {
    async fn start(name: &str, warm: u32) -> Result<Stack> {
        let url = berth_testkit::fixtures::redis_url()?;
        let modes = fixtures::modes(
            name,
            &[("quick", quick_mode()), ("quick-arena", quick_arena())],
        )?;
        let sandbox = Sandbox::start(name, warm).await?;
        let gateway =
            berth_hostd::gateway::start(sandbox.pool.clone(), ([127, 0, 0, 1], 0).into()).await?;
        let prefix = format!("berth-{name}-{}", std::process::id());
        let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&url, &prefix).await?);
        let mut config = client::config();
        config.auth.dev_tokens = true;
        config.modes_dir = modes.0.clone();
        let server = Server::start_with(config, store.clone()).await?;
        let token = client::auth().mint("swarm-host", Role::Host, 3600)?;
        let gateway_url = format!("ws://{}/v1/game", gateway.addr);
        let (stop, link) = berth_testkit::start_link(
            &sandbox.pool,
            &[server.addr],
            "swarm-host",
            token,
            &gateway_url,
        );
        let host = HostId::new("swarm-host")?;
        for _ in 0..600 {
            let h = store.host(&host).await?;
            if h.is_some_and(|h| {
                h.state == HostState::Up && h.images.iter().any(|i| i.warm >= warm)
            }) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Stack {
            sandbox,
            gateway,
            server,
            store,
            stop,
            link,
            _modes: modes,
        })
    }

    fn swarm(&self, players: u32, mode: &str) -> berth_sim::SwarmConfig {
        berth_sim::SwarmConfig {
            server: format!("http://{}", self.server.addr),
            arrivals: berth_sim::Arrivals::Fixed {
                players,
                ramp: Duration::from_secs(2),
            },
            duration: Duration::from_secs(30),
            drain: Duration::from_secs(40),
            modes: vec![berth_sim::Weighted::new(mode.into(), 1.0)],
            matches: berth_sim::Matches::Count(1),
            name_prefix: "swarm".into(),
            ..berth_sim::SwarmConfig::default()
        }
    }

    /// Waits until no VM runs and the warm tier is full again.
    async fn settled(&self, warm: u32) -> Result<()> {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let st = self.sandbox.pool.status();
                if st.vms.is_empty() && st.images[0].warm >= warm {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .context("the pool did not settle")
    }

    async fn finish(self) -> Result<()> {
        drop(self.stop);
        self.link.await?;
        self.gateway.shutdown().await;
        self.server.shutdown().await;
        self.sandbox.finish().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_plays_complete_matches_and_the_pool_balances() -> Result<()> {
    let stack = Stack::start("swarm", 2).await?;
    let (sandbox, gateway, store) = (&stack.sandbox, &stack.gateway, &stack.store);
    // Counts the VMs the pool destroys from here on.
    let destroyed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut events = sandbox.pool.subscribe();
    let counter = {
        let destroyed = destroyed.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(PoolEvent::Destroyed { .. }) => {
                        destroyed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        panic!("missed {n} pool events")
                    }
                    Err(_) => return,
                }
            }
        })
    };

    // 20 phones arrive over 4 s and play one match each.
    let swarm = berth_sim::SwarmConfig {
        arrivals: berth_sim::Arrivals::Fixed {
            players: 20,
            ramp: Duration::from_secs(4),
        },
        ..stack.swarm(20, "quick")
    };
    let report = berth_sim::run(swarm, None).await?;
    println!("{}", report.table());
    assert_eq!(report.players, 20);
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert_eq!(
        report.matches.finished, 20,
        "every player finished with results"
    );
    assert_eq!(report.sessions, 10, "ten duels");
    assert!(report.latency.time_to_play_ms.count >= 20);
    // Both sides of each match got results from the game and the server, and they agreed.
    assert_eq!(report.matches.results_compared, 20);
    for reason in report.end_reasons.keys() {
        assert!(
            ["score_limit", "time_limit"].contains(&reason.as_str()),
            "a played match ends by its rules, not {reason}"
        );
    }

    // Every session is over on the server, with the game's results.
    for id in &report.session_ids {
        let s = store.session(id).await?.context("session kept")?;
        assert!(
            matches!(s.state, SessionState::Ended | SessionState::Ending),
            "{id} is {:?}",
            s.state
        );
        assert!(s.results["players"]
            .as_array()
            .is_some_and(|p| p.len() == 2));
    }
    // The pool's books: ten activations, ten VMs destroyed, none running, the warm tier full.
    stack.settled(2).await?;
    let st = sandbox.pool.status();
    assert_eq!(st.activations, 10);
    assert_eq!(destroyed.load(std::sync::atomic::Ordering::Relaxed), 10);
    counter.abort();
    assert!(st.failures.is_empty(), "{:?}", st.failures);
    assert_eq!((st.images[0].active, st.images[0].warm), (0, 2));
    // The gateway admitted every player and holds no connection now.
    let gw = gateway.stats();
    assert!(gw.connections.admitted >= 20);
    assert_eq!(gw.connections.open, 0);

    stack.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parties_play_together_in_one_team() -> Result<()> {
    let stack = Stack::start("swarm-party", 1).await?;
    // Four phones in parties of two: one 2-against-2 arena match, each party one team.
    let swarm = berth_sim::SwarmConfig {
        parties: vec![berth_sim::Weighted::new(2, 1.0)],
        ..stack.swarm(4, "quick-arena")
    };
    let report = berth_sim::run(swarm, None).await?;
    println!("{}", report.table());
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert_eq!((report.matches.finished, report.sessions), (4, 1));
    let id = report.session_ids.iter().next().context("a session")?;
    let s = stack.store.session(id).await?.context("session kept")?;
    // Bots are named PREFIX-N and parties are consecutive: (0,1) and (2,3).
    for team in &s.teams {
        let parties: std::collections::BTreeSet<u64> = team
            .iter()
            .map(|p| {
                p.as_str()
                    .rsplit('-')
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(99)
                    / 2
            })
            .collect();
        assert_eq!(parties.len(), 1, "a party was split: {:?}", s.teams);
    }
    // The game saw the same teams the matchmaker formed.
    let results: berth_protocol::game::GameResults = serde_json::from_value(s.results.clone())?;
    for p in &results.players {
        let team = s
            .teams
            .iter()
            .position(|t| t.contains(&p.id))
            .context("in a team")?;
        assert_eq!(p.team as usize, team, "{} plays for its matched team", p.id);
    }
    stack.settled(1).await?;
    stack.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phones_that_drop_sleep_and_crawl_still_finish() -> Result<()> {
    let stack = Stack::start("swarm-faults", 2).await?;
    // Every fault on every phone: the game socket drops mid-match and comes back, the app goes
    // to the background (and the OS kills its sockets), and every message crawls.
    let mut swarm = stack.swarm(4, "quick");
    swarm.faults.drop_game = 1.0;
    swarm.faults.background = 1.0;
    swarm.faults.background_for =
        berth_sim::DurationRange::new(Duration::from_millis(300), Duration::from_millis(600));
    swarm.faults.background_kill = 1.0;
    swarm.faults.slow_link = 1.0;
    swarm.faults.slow_delay =
        berth_sim::DurationRange::new(Duration::from_millis(20), Duration::from_millis(80));
    let report = berth_sim::run(swarm, None).await?;
    println!("{}", report.table());
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert_eq!(report.matches.finished, 4);
    let f = report.faults;
    assert_eq!(
        (f.drop_game, f.background, f.background_killed, f.slow_link),
        (4, 4, 4, 4)
    );
    // Each came back to the game (twice: after the drop and after the background) and the
    // game took it back in its place.
    assert!(report.reconnects.game >= 8, "{:?}", report.reconnects);
    assert!(report.reconnects.rejoined >= 8, "{:?}", report.reconnects);
    assert!(
        report.latency.game_rtt_ms.p50 >= 40.0,
        "a slow link shows in the round trips"
    );
    stack.settled(2).await?;
    stack.finish().await
}
