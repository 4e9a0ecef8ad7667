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
