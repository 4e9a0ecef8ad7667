//! `cargo xtask bench fleet`: the fleet's figures side by side in one run. First priming a
//! substrate against fetching a docked one from a peer (`bench ship`'s measurement). Then live
//! migrations of a running duel between two hosts' pools, back and forth, with a player bot
//! connected throughout that rejoins on the new host as soon as its connection drops: QEMU's
//! downtime and total time, the MiB sent, and the bot's stall (its last game state before the
//! move to its first after, on the new host). The game is then finished where it ended up,
//! and its results must arrive. Writes `target/bench/fleet.json`.
//!
//! Last, a `cargo xtask fleet` run (separate processes, hosts in their own namespaces, a swarm
//! of 8) drains a host under load: `sessions_ended_by_drain` counts every match of that run
//! not ended by its game (an upper bound of what the drain cost), `sessions_moved_by_drain`
//! the sessions it moved.

use crate::bench::{round, summary};
use anyhow::{bail, Context, Result};
use berth_hostd::pool::{ActivateRequest, Pool, PoolEvent};
use berth_protocol::game::{GameAnswer, GameRequest};
use berth_protocol::guest::encode_line;
use berth_protocol::{PlayerId, SessionId};
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};

#[derive(Debug, Clone, clap::Args)]
pub struct FleetBenchArgs {
    /// Live migrations of the running duel (alternating between the two hosts).
    #[arg(long, default_value_t = 20)]
    pub migrations: usize,
    /// Substrate fetches timed against one priming.
    #[arg(long, default_value_t = 3)]
    pub fetches: usize,
}

const KEY: &str = "00112233445566778899aabbccddeeff";

pub async fn run(args: FleetBenchArgs) -> Result<()> {
    crate::image::build()?;
    let ship = crate::bench_ship::ShipArgs {
        runs: args.fetches,
        image: "arena".into(),
    };
    let shipped = crate::bench_ship::measure_in_place(&ship).await?;
    let base = PathBuf::from(format!("/dev/shm/berth-bench-fleet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let moved = migrations(&args, &base).await;
    berth_hostd::util::kill_processes_naming(&base);
    let _ = std::fs::remove_dir_all(&base);
    let moved = moved?;
    // A fleet run as separate processes drains a host under a swarm: what the drain cost.
    let run = crate::fleet::FleetArgs {
        hosts: "eu:a,eu:b,us:a".into(),
        replicas: 2,
        players: 8,
        duration: Duration::from_secs(60),
        cut: Duration::ZERO,
        keep: false,
    };
    let fleet = crate::fleet::report(&run)
        .await?
        .context("a fleet run reports")?;
    let report = json!({
        // The fleet run's; the migrations run between two hosts of one region.
        "hosts": fleet["hosts"],
        "regions": fleet["regions"],
        "accel": shipped["accel"],
        "cores": shipped["cores"],
        "prime_ms": shipped["prime_ms"],
        "substrate_fetch_ms": shipped["substrate_fetch_ms"],
        "fetch_to_prime": shipped["fetch_to_prime"],
        "migrations": moved.migrations,
        "migration_downtime_ms": summary(moved.downtime_ms),
        "migration_total_ms": summary(moved.total_ms),
        "migrated_mib": summary(moved.mib),
        "player_stall_ms": summary(moved.stall_ms),
        // Every match of the fleet run that did not end by its game (so at most the drain's).
        "sessions_ended_by_drain": fleet["matches_killed"],
        "sessions_moved_by_drain": fleet["moved"],
        "fleet_run_matches": fleet["matches"],
        "results_missing": moved.results_missing + fleet["results_lost"].as_u64().unwrap_or(0),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    let out = crate::image::root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    let path = out.join("fleet.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// What the migrations measured.
struct Moved {
    migrations: usize,
    downtime_ms: Vec<f64>,
    total_ms: Vec<f64>,
    mib: Vec<f64>,
    stall_ms: Vec<f64>,
    results_missing: u64,
}

/// Two pools on one substrate; a duel moved between them `args.migrations` times while the
/// bot plays; then finished.
async fn migrations(args: &FleetBenchArgs, base: &Path) -> Result<Moved> {
    let driver = berth_testkit::tcg_driver().await;
    let ic = berth_testkit::image_config("arena", 0);
    let mut pools = Vec::new();
    for name in ["a", "b"] {
        let dir = base.join(name);
        berth_testkit::seed_substrate(&dir, &ic).await?;
        let pool = Pool::start(
            berth_testkit::hostd_config(&dir, vec![ic.clone()]),
            driver.clone(),
        )
        .await?;
        pool.wait_ready("arena", 0, Duration::from_secs(120))
            .await?;
        pools.push(pool);
    }
    let req = duel();
    let first = pools[0].activate(req.clone()).await?;
    let (addr_tx, addr_rx) = watch::channel(first.game_addr);
    let (stall_tx, mut stalls) = mpsc::unbounded_channel();
    let bot = tokio::spawn(bot(addr_rx, ticket("alice")?, stall_tx));
    let mut m = Moved {
        migrations: 0,
        downtime_ms: vec![],
        total_ms: vec![],
        mib: vec![],
        stall_ms: vec![],
        results_missing: 0,
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..args.migrations {
        let (from, to) = (&pools[i % 2], &pools[(i + 1) % 2]);
        let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let incoming = to.receive(req.clone(), listen).await?;
        let sent = from.send(&req.session_id, listen).await?;
        let info = incoming.finish(Duration::from_secs(30)).await?;
        addr_tx.send_replace(info.game_addr);
        let stall = tokio::time::timeout(Duration::from_secs(15), stalls.recv())
            .await
            .context("the bot never saw the game again after a move")?
            .context("the bot stopped")?;
        m.migrations += 1;
        m.downtime_ms.push(sent.downtime_ms as f64);
        m.total_ms.push(sent.total_ms as f64);
        m.mib.push(round(sent.sent_bytes as f64 / (1 << 20) as f64));
        m.stall_ms.push(stall.as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let last = &pools[args.migrations % 2];
    let mut events = last.subscribe();
    surrender(*addr_tx.borrow(), &ticket("bob")?).await?;
    m.results_missing = ended_without_results(&mut events).await?;
    bot.abort();
    for p in pools {
        p.shutdown().await;
    }
    Ok(m)
}

fn duel() -> ActivateRequest {
    let p = |s: &str| PlayerId::new(s).expect("literal id");
    ActivateRequest {
        session_id: SessionId::new("bench-fleet").expect("literal id"),
        image: "arena".into(),
        players: vec![p("alice"), p("bob")],
        teams: vec![vec![p("alice")], vec![p("bob")]],
        params: json!({"score_limit": 1000, "time_limit_s": 600}),
        ticket_key: KEY.into(),
        deadline_ms: 0,
    }
}

fn ticket(player: &str) -> Result<String> {
    let auth = berth_server::auth::Auth::new(&berth_server::config::AuthConfig {
        secret: "bench-fleet-secret-0123456789".into(),
        ..Default::default()
    })?;
    let session = SessionId::new("bench-fleet")?;
    Ok(auth
        .ticket(KEY, &session, &PlayerId::new(player)?, 600_000)?
        .0)
}

/// Plays on whatever host the game is at (`addr`): joins, reads states, and when the
/// connection drops rejoins at the newest address; after each rejoin it sends the stall (last
/// state before the drop to first state after).
async fn bot(
    mut addr: watch::Receiver<SocketAddr>,
    ticket: String,
    stalls: mpsc::UnboundedSender<Duration>,
) {
    let mut last_state: Option<Instant> = None;
    loop {
        let at = *addr.borrow_and_update();
        let Ok(stream) = tokio::net::TcpStream::connect(at).await else {
            let _ = tokio::time::timeout(Duration::from_millis(20), addr.changed()).await;
            continue;
        };
        let (rd, mut wr) = stream.into_split();
        let join = encode_line(&GameRequest::Join {
            ticket: ticket.clone(),
        });
        if wr.write_all(&join).await.is_err() {
            continue;
        }
        let mut lines = BufReader::new(rd).lines();
        let mut first = true;
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(GameAnswer::State(_)) = serde_json::from_str::<GameAnswer>(&line) {
                let now = Instant::now();
                if first {
                    if let Some(before) = last_state {
                        if stalls.send(now - before).is_err() {
                            return;
                        }
                    }
                    first = false;
                }
                last_state = Some(now);
            }
        }
        // Dropped (the VM moved): wait for the new address, unless it is already there.
        if *addr.borrow() == at {
            let _ = tokio::time::timeout(Duration::from_secs(10), addr.changed()).await;
        }
    }
}

async fn surrender(addr: SocketAddr, ticket: &str) -> Result<()> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let lines: Vec<u8> = [
        GameRequest::Join {
            ticket: ticket.into(),
        },
        GameRequest::Surrender,
    ]
    .iter()
    .flat_map(encode_line)
    .collect();
    stream.write_all(&lines).await?;
    // Keep the connection until the game is over.
    let mut rd = BufReader::new(stream).lines();
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(30), rd.next_line()).await? {}
    Ok(())
}

/// 1 if the game's end reached the pool without results, 0 if with them.
async fn ended_without_results(
    events: &mut tokio::sync::broadcast::Receiver<PoolEvent>,
) -> Result<u64> {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.recv().await {
                Ok(PoolEvent::Ended { results, .. }) => return Ok(u64::from(results.is_null())),
                Ok(_) => continue,
                Err(e) => bail!("pool events ended: {e}"),
            }
        }
    })
    .await
    .context("the game's end never reached the pool")?
}
