//! Small helpers.

pub use berth_protocol::now_ms;
use std::sync::{Mutex, MutexGuard};

/// Locks a std mutex held only for short, non-async critical sections.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh random id (uuid v4, simple form).
pub fn random_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// 32 random bytes, hex-encoded: a per-session ticket key.
pub fn random_key() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("{}{}", a.simple(), b.simple())
}

/// A TOML file that could not be read or parsed: the config file or a mode file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: std::path::PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

/// The text of `path`.
pub fn read_text(path: &std::path::Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })
}

/// `text` (read from `path`, which errors name) parsed as TOML.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &std::path::Path,
) -> Result<T, FileError> {
    toml::from_str(text).map_err(|source| FileError::Parse {
        path: path.to_owned(),
        source,
    })
}
