//! Secure transports for Unity games (`docs/protocol.md`, "Secure transports"): Relay messages
//! inside DTLS 1.2 records on the relay port ([`dtls`], one layer per shard), and inside
//! WebSocket binary frames over TLS or plain TCP ([`ws`], a listener bridged to the shards).
//!
//! The core never knows which transport a client uses: the shard unwraps what arrives and wraps
//! what the core decides to send, enforcing each destination's largest message.

pub mod dtls;
pub mod record;
pub mod records;
pub mod stream;
/// The WebSocket protocol, shared with the SDK.
pub use ferry_proto::ws;
