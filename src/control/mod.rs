//! The control plane: the allocation service, join codes, the HTTP API and the control socket.
//! It reaches the relay's shards only by message ([`relay::RelayHandle`]).

pub mod api;
mod fetch;
pub mod guard;
pub mod http;
pub mod joincode;
pub mod jwt;
pub mod ratelimit;
pub mod relay;
pub mod service;
pub mod socket;
pub mod tls;

pub use ferry_proto::model;
