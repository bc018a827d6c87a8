//! Ferry: a self-hostable, high-performance UDP relay for online games that speaks Unity Relay's
//! wire protocol and allocations API.
//!
//! Layers, each depending only on those above it:
//! - [`wire`]: zero-copy views over datagrams;
//! - [`auth`]: keys, BIND verification, connection data;
//! - [`timer`]: the hierarchical timer wheel;
//! - [`core`]: the sans-IO shard state machine (no sockets, no clock);
//! - [`io`]: datagram backends; [`shard`]: one event loop per thread around a core;
//! - [`control`]: the allocation service, join codes, the HTTP API and the control socket;
//! - [`client`]: the Rust SDK.

pub mod auth;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod control;
pub mod core;
#[doc(hidden)]
pub mod harness;
pub mod io;
pub mod load;
pub mod logging;
pub mod metrics;
pub mod serve;
pub mod shard;
pub mod steer;
pub mod timer;
pub mod wire;
