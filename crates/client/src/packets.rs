//! Builders for client→relay datagrams exactly as Unity Transport sends them
//! (`docs/protocol.md`, "What UTP does as a client"): connection data zero-padded to 255 bytes, nonces and ping
//! sequences little-endian, RELAY length big-endian.

use crate::auth::{sign_bind, AllocationKey};
use crate::wire::{AllocationId, Bind, Close, ConnectRequest, Disconnect, Ping, Relay, WireError};

/// UTP pads connection data to this length.
pub const UTP_CONNECTION_DATA_LEN: usize = 255;

fn padded(data: &[u8]) -> [u8; UTP_CONNECTION_DATA_LEN] {
    let mut out = [0u8; UTP_CONNECTION_DATA_LEN];
    let n = data.len().min(UTP_CONNECTION_DATA_LEN);
    out[..n].copy_from_slice(&data[..n]);
    out
}

/// A signed BIND (295 bytes for UTP-sized connection data).
pub fn bind(key: &AllocationKey, nonce: u16, connection_data: &[u8]) -> Vec<u8> {
    let data = padded(connection_data);
    let mut out = vec![0u8; Bind::len_for(UTP_CONNECTION_DATA_LEN)];
    let signed = match Bind::emit_unsigned(&mut out, nonce, &data) {
        Ok(n) => n,
        Err(_) => unreachable!("buffer sized by len_for"),
    };
    let _ = sign_bind(key, &mut out, signed);
    out
}

/// A CONNECT_REQUEST naming the host's connection data (276 bytes).
pub fn connect_request(requester: &AllocationId, host_connection_data: &[u8]) -> Vec<u8> {
    let data = padded(host_connection_data);
    let mut out = vec![0u8; 21 + UTP_CONNECTION_DATA_LEN];
    let _ = ConnectRequest::emit(&mut out, requester, &data);
    out
}

/// A RELAY carrying `payload`.
pub fn relay(from: &AllocationId, to: &AllocationId, payload: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut out = vec![0u8; Relay::<&[u8]>::HEADER_LEN + payload.len()];
    Relay::emit(&mut out, from, to, payload)?;
    Ok(out)
}

/// A PING (UTP always sends sequence 1).
/// A Unity QoS ping (25 bytes) for measuring a region's relays; see `wire::qos`.
pub use crate::wire::qos::unity_request as qos_request;

pub fn ping(sender: &AllocationId, sequence: u16) -> Vec<u8> {
    let mut out = [0u8; 22];
    Ping::emit(&mut out, sender, sequence);
    out.to_vec()
}

pub fn disconnect(from: &AllocationId, to: &AllocationId) -> Vec<u8> {
    let mut out = [0u8; 36];
    Disconnect::emit(&mut out, from, to);
    out.to_vec()
}

pub fn close(sender: &AllocationId) -> Vec<u8> {
    let mut out = [0u8; 20];
    Close::emit(&mut out, sender);
    out.to_vec()
}
