//! `cargo xtask`: build the guest image, run the demo, run all tests, run benchmarks.
mod cpio;
mod image;
mod sys;

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
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Image => {
            image::build()?;
        }
    }
    Ok(())
}
