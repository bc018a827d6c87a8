//! The Rust SDK: what a game (and Ferry's own tests and load generator) uses to talk to Ferry.
//!
//! - [`ApiClient`]: allocate, join code, join, regions over the HTTP API;
//! - [`RelayClient`]: one allocation's UDP connection — bind, connect, send, receive, keep-alive,
//!   rebind, close;
//! - [`packets`]: the raw datagrams, exactly as Unity Transport builds them;
//! - [`peer::PeerLink`]: game datagrams to one peer, direct when the NATs allow it and through
//!   the relay when not, under a [`path::Policy`].
//!
//! ```no_run
//! use ferry_client::{ApiClient, RelayClient};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let api = ApiClient::new("http://127.0.0.1:7880");
//! let host_alloc = api.allocate(4, None)?;
//! let code = api.join_code(&host_alloc.allocation_id)?;
//! let mut host = RelayClient::new(&host_alloc)?;
//! host.bind()?;
//!
//! let join = api.join(&code)?;
//! let mut peer = RelayClient::new(&join.allocation)?;
//! peer.bind()?;
//! let host_id = peer.connect_b64(&join.host_connection_data)?;
//! peer.send(&host_id, b"hello")?;
//! let (from, payload) = host.recv_relay(std::time::Duration::from_secs(5))?.expect("a message");
//! host.send(&from, &payload)?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod conn;
pub mod demo;
pub mod http;
pub mod packets;
pub mod path;
pub mod peer;
pub mod transport;
pub mod tunnel;

pub use api::{ApiClient, ApiError};

// The formats, under the paths the SDK's modules use.
pub use conn::{ClientError, ClientOptions, Incoming, Received, RelayClient};
pub use ferry_proto::{auth, clock, model, units, wire};
pub use transport::Transport;
