//! The SDK's stand-in for a game server that does not speak it (`[server] sdk = false` in its
//! `game.toml`: an unmodified server from a Debian package). The agent makes the game's calls
//! for it, through the SDK like any game, from what it can see of the server: its game port.
//!
//! - `initialised` once the port accepts a connection (the server has loaded);
//! - then `GET /v1/activation`, kept waiting across docking like any game's;
//! - `ready` once the port accepts again after activation;
//! - `health` every [`HEALTH_EVERY`] while the port accepts (a server that stops accepting
//!   ends the session `game_unhealthy` past its limit);
//! - the session's end is the process's exit (see [`crate::life::Life::game_exited`]).
//!
//! Players' tickets are checked by the gateway alone; the server sees only their bytes.

use crate::GuestError;
use berth_protocol::sdk::{code, SDK_ADDR};
use berth_sdk::Sdk;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// How often the port is tried while the server loads.
const POLL: Duration = Duration::from_millis(50);
/// How often a ready server's port is checked (and `health` sent).
pub const HEALTH_EVERY: Duration = Duration::from_secs(2);

/// Starts the stand-in's thread for the game on `port`.
pub fn start(port: u16) -> Result<(), GuestError> {
    std::thread::Builder::new()
        .name("sdk-standin".into())
        .spawn(move || run(port))
        .map(drop)
        .map_err(|e| GuestError::Game(format!("starting the SDK stand-in: {e}")))
}

/// Whether the game port accepts a connection now.
fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

fn until_accepts(port: u16) {
    while !accepts(port) {
        std::thread::sleep(POLL);
    }
}

fn run(port: u16) {
    let sdk = Sdk::new(SDK_ADDR);
    until_accepts(port);
    if let Err(e) = sdk.initialised() {
        eprintln!("berth-guest: stand-in initialised: {e}");
        return;
    }
    if let Err(e) = sdk.activation() {
        eprintln!("berth-guest: stand-in activation: {e}");
        return;
    }
    until_accepts(port);
    if let Err(e) = sdk.ready() {
        eprintln!("berth-guest: stand-in ready: {e}");
        return;
    }
    loop {
        std::thread::sleep(HEALTH_EVERY);
        if !accepts(port) {
            continue;
        }
        match sdk.health() {
            Err(e) if e.code() == Some(code::ALREADY_ENDED) => return,
            _ => {}
        }
    }
}
