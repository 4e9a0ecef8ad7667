//! What every in-process stack starts from: the workspace's folders, a server config on port 0
//! with a known secret, and tokens minted with it.

use berth_server::auth::{Auth, Role};
use berth_server::config::ServerConfig;
use std::path::{Path, PathBuf};

/// The secret test servers sign player, host and admin tokens with.
pub const SECRET: &str = "test-secret-0123456789";

/// The workspace's root folder.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the test kit sits in the workspace")
        .to_path_buf()
}

/// The game modes shipped in `assets/modes`.
pub fn modes_dir() -> PathBuf {
    workspace().join("assets/modes")
}

/// A server on loopback port 0, memory store, the shipped modes, tokens signed with [`SECRET`].
pub fn server_config() -> ServerConfig {
    let mut c = ServerConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        modes_dir: modes_dir(),
        ..ServerConfig::default()
    };
    c.auth.secret = SECRET.into();
    c
}

/// The token authority of [`server_config`].
pub fn auth() -> Auth {
    Auth::new(&server_config().auth).expect("the test auth config is valid")
}

/// A player token for `player`, valid for an hour.
pub fn token(player: &str) -> String {
    auth().mint(player, Role::Player, 3600).expect("mint")
}

/// An admin token, valid for an hour.
pub fn admin_token() -> String {
    auth().mint("ops", Role::Admin, 3600).expect("mint")
}

/// A host token for `host`, valid for an hour.
pub fn host_token(host: &str) -> String {
    auth().mint(host, Role::Host, 3600).expect("mint")
}

/// A scratch folder under the system's temp folder, named for the test and this process,
/// removed when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> std::io::Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("berth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A game mode of the arena for a test: `players` in two teams, any skill, any region.
#[derive(Debug, Clone)]
pub struct TestMode {
    pub players: u32,
    pub session_max_s: u64,
    /// How long a match may wait to fill up past `min` (unset: the mode's default).
    pub fill_wait_ms: Option<u64>,
    /// The `[params]` table's lines: the arena's score and time limits.
    pub params: &'static str,
}

impl TestMode {
    /// The mode file's text.
    pub fn toml(&self) -> String {
        let fill = self
            .fill_wait_ms
            .map(|ms| format!("fill_wait_ms = {ms}\n"))
            .unwrap_or_default();
        format!(
            "image = \"arena\"\nteams = 2\nregions = []\n{fill}max_wait_s = 60\n\
             session_max_s = {}\n\n[players]\nmin = {p}\nmax = {p}\n\n\
             [vm]\nmemory_mib = 128\nvcpus = 1\n\n\
             [skill]\ndefault = 1000.0\nwindow = 2000.0\nwiden_per_s = 0.0\nmax_window = 2000.0\n\n\
             [params]\n{}",
            self.session_max_s,
            self.params,
            p = self.players,
        )
    }
}

/// A modes folder for a server config (`modes_dir`) holding `modes` as `<name>.toml`, removed
/// when dropped.
pub fn modes(test: &str, modes: &[(&str, TestMode)]) -> std::io::Result<TempDir> {
    let dir = TempDir::new(&format!("{test}-modes"))?;
    for (name, mode) in modes {
        std::fs::write(dir.0.join(format!("{name}.toml")), mode.toml())?;
    }
    Ok(dir)
}

/// The tests' Redis (`BERTH_TEST_REDIS`), which `cargo xtask test` starts.
pub fn redis_url() -> anyhow::Result<String> {
    use anyhow::Context;
    std::env::var("BERTH_TEST_REDIS").context(
        "BERTH_TEST_REDIS is not set: run the tests with `cargo xtask test`, which starts Redis",
    )
}
