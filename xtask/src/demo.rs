//! `cargo xtask demo`: the main job on the embedded defaults — build the guest image, start a
//! hostd pool with the qemu driver, prime the substrate, activate game VMs from it (warm and
//! on-demand), show each one's game answer, and clean everything up.

use anyhow::{Context, Result};
use berth_hostd::config::ImageConfig;
use berth_hostd::pool::ActivateRequest;
use berth_hostd::{HostdConfig, Pool};
use berth_protocol::{PlayerId, SessionId};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Game VMs to activate.
    #[arg(long, default_value_t = 6)]
    pub vms: usize,
    /// Warm clones kept per image.
    #[arg(long, default_value_t = 2)]
    pub warm: u32,
}

pub async fn run(args: DemoArgs) -> Result<()> {
    crate::sys::ensure(&[crate::sys::QEMU, crate::sys::QEMU_UTILS, crate::sys::E2FS])?;
    let manifest = crate::image::build()?;
    let mut config = HostdConfig {
        state_dir: format!("/dev/shm/berth-demo-{}", std::process::id()).into(),
        ..HostdConfig::default()
    };
    config.images.push(ImageConfig {
        name: "arena".into(),
        dir: crate::image::image_dir(),
        memory_mib: 128,
        vcpus: 1,
        balloon_mib: None,
        warm: args.warm,
        cow: true,
        cmdline: None,
    });
    println!(
        "image {} ({})",
        &manifest.digest[..12],
        manifest.kernel_package
    );
    let driver = berth_hostd::driver_for(&config).await?;
    println!("driver qemu, accelerator {}", driver.accel());
    let pool = Pool::start(config, driver).await?;
    let result = demo(&pool, &args).await;
    pool.shutdown().await;
    println!("pool shut down: VMs destroyed, substrate removed");
    result
}

async fn demo(pool: &Pool, args: &DemoArgs) -> Result<()> {
    let t = Instant::now();
    println!("priming the substrate (cold boot of the game VM, once)...");
    pool.wait_ready("arena", args.warm, Duration::from_secs(300))
        .await?;
    let img = &pool.status().images[0];
    println!(
        "docked in {} ms: {:.1} MiB in /dev/shm, {} warm clones paused (ready after {:.1} s)",
        img.prime_ms.unwrap_or(0),
        img.substrate_bytes as f64 / 1048576.0,
        img.warm,
        t.elapsed().as_secs_f64()
    );
    println!(
        "\n{:<10} {:<20} {:<10} {:>12} {:>14}  game answer",
        "session", "vm", "path", "activate ms", "to answer ms"
    );
    for i in 0..args.vms {
        let session = format!("match-{}", i + 1);
        let t = Instant::now();
        let vm = pool
            .activate(ActivateRequest {
                session_id: SessionId::new(&session)?,
                image: "arena".into(),
                players: vec![
                    PlayerId::new(format!("p{}", 2 * i))?,
                    PlayerId::new(format!("p{}", 2 * i + 1))?,
                ],
                params: serde_json::json!({"score_limit": 10}),
                ticket_key: String::new(),
            })
            .await?;
        let stream = tokio::net::TcpStream::connect(vm.game_addr).await?;
        let line = tokio::io::BufReader::new(stream)
            .lines()
            .next_line()
            .await?
            .context("the game closed without answering")?;
        let answered = t.elapsed().as_secs_f64() * 1000.0;
        let short: String = line.chars().take(90).collect();
        println!(
            "{:<10} {:<20} {:<10} {:>12.1} {:>14.1}  {short}…",
            session,
            vm.vm_id,
            format!("{:?}", vm.path).to_lowercase(),
            vm.activate_us as f64 / 1000.0,
            answered
        );
    }
    let st = pool.status();
    println!(
        "\n{} VMs active; destroying them (slots go back to the pool)",
        st.vms.len()
    );
    for vm in st.vms {
        pool.destroy(vm.vm_id.as_str()).await?;
    }
    Ok(())
}
