//! The Redis backend (being written).
