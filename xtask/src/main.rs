//! `cargo xtask`: build the guest image (and the nested-Xen artefacts), run the demo, run all
//! tests, run benchmarks.
mod bench;
mod bench_e2e;
mod bench_fleet;
mod bench_server;
mod bench_ship;
mod build;
mod chaos;
mod demo;
mod fleet;
mod image;
mod redis;
#[cfg(test)]
mod seams;
mod stack;
mod sys;
mod test;
mod xen;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Berth's project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build (or reuse) the guest image under target/image.
    Image,
    /// Build (or reuse) the nested-Xen artefacts under target/xen: the hypervisor, dom0's kernel
    /// and initramfs (Xen's toolstack, berth-hostd, the Xen guest image).
    XenImage {
        /// Then boot it in QEMU and check a selftest, as the Xen tier of `cargo xtask test` does.
        #[arg(long)]
        selftest: bool,
    },
    /// The main job: the whole stack with real game VMs, and a swarm of simulated phones playing.
    Demo(demo::DemoArgs),
    /// Install what is missing, build the image and run every test, then the nested-Xen tier.
    Test {
        /// Extra arguments for the test runner (e.g. a filter).
        #[arg(trailing_var_arg = true)]
        extra: Vec<String>,
    },
    /// The stack as separate processes under a timeline of faults (process kills, a stalled
    /// hostd, Redis restarts, drains, floods) while swarms play; writes target/bench/chaos.json
    /// and fails if a fault cost a player a match or results, or left anything behind.
    Chaos(chaos::ChaosArgs),
    /// A fleet on this machine: each hostd in its own network namespace at its own address, in
    /// regions and zones; a swarm queueing by latency plays while a host is cut off and comes
    /// back; fails if a session ran outside its region, results were lost or anything is left.
    Fleet(fleet::FleetArgs),
    /// Benchmarks; results go to target/bench/*.json.
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Cold boot vs substrate vs copy-on-write vs warm activation, and capacity (--driver xen:
    /// inside a nested Xen).
    Activation(bench::ActivationArgs),
    /// The matchmaking server: idle player sockets per process, matchmaking throughput.
    Server(bench_server::ServerArgs),
    /// The whole path under a swarm: queue → first game state, gateway overhead.
    E2e(bench_e2e::E2eArgs),
    /// Priming a substrate vs fetching a docked one from a peer (target/bench/ship.json).
    Ship(bench_ship::ShipArgs),
    /// The fleet: priming vs fetching a substrate, and live migrations of a running duel
    /// between two hosts with a player bot (downtime, MiB sent, the player's stall).
    Fleet(bench_fleet::FleetBenchArgs),
}

fn main() -> Result<()> {
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    match Cli::parse().cmd {
        Cmd::Image => {
            image::build()?;
        }
        Cmd::XenImage { selftest: false } => {
            xen::build()?;
        }
        Cmd::XenImage { selftest: true } => xen::selftest()?,
        Cmd::Demo(args) => {
            init_logs();
            rt()?.block_on(demo::run(args))?;
        }
        Cmd::Test { extra } => test::run(&extra)?,
        Cmd::Chaos(args) => {
            init_logs();
            rt()?.block_on(chaos::run(args))?;
        }
        Cmd::Fleet(args) => {
            init_logs();
            rt()?.block_on(fleet::run(args))?;
        }
        Cmd::Bench {
            which: BenchCmd::Activation(args),
        } if args.driver == bench::DriverArg::Xen => {
            sys::ensure(&[sys::QEMU])?;
            xen::bench(args.runs.unwrap_or(5), args.cold_runs.unwrap_or(2))?;
        }
        Cmd::Bench {
            which: BenchCmd::Activation(args),
        } => {
            sys::ensure(&[sys::QEMU, sys::QEMU_UTILS, sys::E2FS])?;
            init_logs();
            rt()?.block_on(bench::activation(args))?;
        }
        Cmd::Bench {
            which: BenchCmd::Server(args),
        } => {
            sys::ensure(&[sys::REDIS])?;
            init_logs();
            rt()?.block_on(bench_server::run(args))?;
        }
        Cmd::Bench {
            which: BenchCmd::Ship(args),
        } => {
            sys::ensure(&[sys::QEMU, sys::QEMU_UTILS, sys::E2FS])?;
            init_logs();
            rt()?.block_on(bench_ship::run(args))?;
        }
        Cmd::Bench {
            which: BenchCmd::Fleet(args),
        } => {
            sys::ensure(&[sys::QEMU, sys::QEMU_UTILS, sys::E2FS])?;
            init_logs();
            rt()?.block_on(bench_fleet::run(args))?;
        }
        Cmd::Bench {
            which: BenchCmd::E2e(args),
        } => {
            init_logs();
            rt()?.block_on(bench_e2e::run(args))?;
        }
    }
    Ok(())
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
}
