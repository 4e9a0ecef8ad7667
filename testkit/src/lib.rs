//! Berth's test kit: real components started in-process on loopback port 0 and wired together
//! (Quilkin's "sandbox" idea), for the integration tests in `tests/`, the server's socket tests,
//! and `cargo xtask demo` and its benchmarks. Nothing here is a mock: VMs are real QEMU guests
//! running the real guest image, servers are the real `berth-server`, browsers real Chromium.
//!
//! - [`fixtures`]: the workspace's folders, a server config on port 0, tokens.
//! - [`vm`]: hostd pools on private `/dev/shm` folders sharing one primed substrate
//!   ([`Sandbox`]), leak checks, a hostd link to a test server.
//! - [`stack`]: a whole server + hostd in this process ([`Stack`]).
//! - [`player`]: players on [`berth_client`] for tests of the server's sockets.
//! - [`redis`]: a private `redis-server` a test may stop and restart.
//! - [`netns`]: hosts on their own addresses: network namespaces on a bridge.
//! - [`game`]: raw clients of a game VM's port (the gateway's client is
//!   [`berth_client::GameClient`], re-exported here as `GameWs`).
//! - [`pages`]: the web pages' files, headers and links as a browser fetches them.
//! - [`browser`]: real headless Chromium through chromedriver.
//! - [`tls`]: a CA and a server certificate for loopback, made at test time ([`TestCa`]).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let sandbox = berth_testkit::Sandbox::start("my-test", 1).await?; // a pool, substrate docked
//! // ... activate sessions on sandbox.pool ...
//! sandbox.finish().await?; // fails if a VM, a QEMU process or a file is left
//! # Ok(()) }
//! ```

pub mod browser;
pub mod fixtures;
pub mod game;
pub mod netns;
pub mod pages;
pub mod player;
pub mod redis;
pub mod stack;
pub mod tls;
pub mod vm;

pub use berth_client::{GameClient as GameWs, Heard};
pub use game::{game_hello, game_request, game_surrender};
pub use stack::{Stack, StackOptions};
pub use tls::TestCa;
pub use vm::*;
