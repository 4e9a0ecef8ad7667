//! `berth-server`: Berth's control plane.
//!
//! - [`model`]: tickets, sessions, hosts, bindings, cross-replica events.
//! - [`store`]: the [`store::Store`] trait and its `memory` and `redis` backends.
//! - [`admin`] and [`dashboard`]: the operators' API, and their page (`/admin`) with its live feed.

pub mod access;
pub mod admin;
pub mod app;
pub mod auth;
pub mod config;
pub mod dashboard;
pub mod dispatch;
pub mod domain;
pub mod feed;
pub mod hosts;
pub mod matching;
pub mod matchmaker;
pub mod metrics;
pub mod migration;
pub mod model;
pub mod modes;
pub mod play;
pub mod regions;
pub mod registry;
pub mod sessions;
pub mod shipping;
pub mod standing;
pub mod state;
pub mod store;
pub mod util;
pub mod views;
pub mod web;
pub mod wire;
