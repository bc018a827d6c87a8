//! Ferry's formats, shared by the relay and its clients: no I/O, no threads, portable.
//!
//! - [`wire`]: zero-copy views over Unity Relay datagrams, their emitters, and STUN Binding;
//! - [`auth`]: allocation keys, BIND verification (pre-keyed HMAC-SHA256), connection data;
//! - [`model`]: the allocations API's JSON shapes;
//! - [`clock`]: the one place that reads the clock; [`units`]: durations as operators write them.

pub mod auth;
pub mod clock;
pub mod model;
pub mod units;
pub mod wire;
pub mod ws;
