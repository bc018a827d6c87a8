//! Game-networking drivers shared by the tunnel tests (each test crate uses part of them).
#![allow(dead_code)]

pub mod main_feed;
pub mod quic;
