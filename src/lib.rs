//! Ferry: a self-hostable, high-performance UDP relay for online games that speaks Unity Relay's
//! wire protocol and allocations API.
//!
//! Layers, each depending only on those above it:
//! - [`wire`]: zero-copy views over datagrams;
//! - [`auth`]: keys, BIND verification, connection data;
//! - [`timer`]: the hierarchical timer wheel;
//! - [`core`]: the sans-IO shard state machine (no sockets, no clock).

pub mod auth;
pub mod client;
pub mod clock;
pub mod core;
pub mod timer;
pub mod wire;
