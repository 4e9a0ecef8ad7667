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
