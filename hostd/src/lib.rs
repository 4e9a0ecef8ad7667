//! `berth-hostd`: everything one host does for Berth.
//!
//! - [`Hostd`]: hostd running in this process — pool, gateway, control API and link, started
//!   together and stopped in order; [`run`] is that plus a wait for the shutdown signal.
//! - [`config`]: the TOML config, validated into runtime types at start-up.
//! - [`image`]: guest images (a folder with `manifest.json`, the kernel, initramfs, disk).
//! - [`build`]: building an image from a game's manifest (`berth-hostd image build`): Debian
//!   packages and their libraries, the initramfs, the data disk; cached by input digest.
//! - [`manifest`]: a game's `game.toml`: its server, build inputs, resources and limits.
//! - [`substrate`]: the versioned header of a docked substrate and its checks.
//! - [`driver`]: the [`driver::VmDriver`] trait and its backends — [`driver::qemu`] (real, the
//!   default) and `driver::xen` (behind the `xen` feature).
//! - [`accel`]: which accelerator QEMU may use here (KVM only when a guest really boots on it).
//! - [`pool`]: per host, per image: the docked substrate, warm clones, running VMs; activation
//!   by session id (idempotent), destroy, health, refill, adoption after a restart.
//! - [`control`]: the operator's HTTP surface and its client (`berth-hostd status` etc.).
//! - [`metrics`]: `/metrics` (Prometheus) on the control API: activations, VMs, substrates,
//!   the gateway.
//! - [`token`]: this host's credential towards the server, read again on every connect.
//! - [`link`]: the one websocket to the matchmaking server: register, heartbeats, activate and
//!   destroy on the server's behalf, pool events upstream, reconnect and reconcile.
//! - [`outbox`]: the `ended`/`failed` reports of gone VMs, kept on disk until the server
//!   answers `recorded`.
//! - [`ship`]: substrates shipped between hosts instead of primed on each: the books (wants,
//!   one-time grants), the stream format, the fetching side.
//! - [`peer`]: the peer listener (`[peer] listen`): what this host serves other hosts (the
//!   substrate stream).
//! - [`selftest`]: `berth-hostd selftest`, prime → activate → destroy on this host with its
//!   configured driver, checking every game answers as its own session and nothing is left.
//! - [`gateway`]: the players' websocket: ticket check with the session's own key, then frames
//!   proxied to and from the game server in the session's VM.
//! - [`frames`]: the gateway's framings (`lines`, `frames`, `stream`) between a player's
//!   websocket frames and the game's TCP bytes.

pub mod accel;
mod app;
pub mod build;
pub mod config;
pub mod control;
pub mod driver;
pub mod frames;
pub mod gateway;
pub mod image;
pub mod link;
pub mod manifest;
pub mod metrics;
pub mod outbox;
pub mod peer;
pub mod pool;
pub mod selftest;
pub mod ship;
pub mod substrate;
pub mod token;
pub mod util;

pub use app::{driver_for, run, Hostd};
pub use config::HostdConfig;
pub use pool::Pool;
