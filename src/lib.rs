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
//! - [`client`]: the Rust SDK and `ferry tunnel` (crate `ferry-client`); [`wire`], [`auth`] and
//!   [`clock`] come from crate `ferry-proto`.

pub mod cli;
pub mod config;
pub mod control;
pub mod core;
pub mod ctl;
pub mod fleet;
#[doc(hidden)]
pub mod harness;
pub mod io;
pub mod load;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod secure;
pub mod serve;
pub mod shard;
pub mod steer;
pub mod timer;
pub mod xdp;

// The formats and the client side live in their own crates (`crates/proto`, `crates/client`),
// which a game can use without the server; re-exported here under their familiar paths.
pub use ferry_client as client;
pub use ferry_proto::{auth, clock, wire};
