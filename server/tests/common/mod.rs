//! The server's socket tests take their fixtures and players from the test kit.
#![allow(dead_code, unused_imports)]

pub use berth_testkit::player::*;

pub mod host;
