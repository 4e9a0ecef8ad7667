//! `berth-server`: Berth's control plane.
//!
//! - [`model`]: tickets, sessions, hosts, bindings, cross-replica events.
//! - [`store`]: the [`store::Store`] trait and its `memory` and `redis` backends.

pub mod model;
pub mod store;
pub mod util;
