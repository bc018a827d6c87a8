//! The Rust SDK: what a game (and Ferry's own tests and load generator) uses to talk to a relay.

pub mod packets;
