//! Zero-copy views over Unity Relay datagrams (`docs/protocol.md`, "Framing").
//!
//! Every view wraps a `T: AsRef<[u8]>` and is built with `new_checked`, which validates the header,
//! the type and the exact length of untrusted input. After that check no accessor can panic.
//! Emitters write into caller-owned buffers and return the number of bytes written; the
//! fixed-size messages take `&mut [u8; LEN]` so their size is checked by the compiler.
//! Nothing here allocates, reads a clock or knows a key.

mod bind;
mod close;
mod connect;
mod error;
pub mod pair;
mod ping;
pub mod qos;
mod relay;
pub mod stun;

pub use bind::{emit_bind_received, Bind, BIND_RECEIVED_LEN};
pub use close::Close;
pub use connect::ConnectRequest;
pub use error::{ErrorCode, ErrorMsg};
pub use pair::{Accepted, Disconnect, Pair, Rejected};
pub use ping::Ping;
pub use relay::Relay;

use std::fmt;

/// First signature byte of every message.
pub const SIGNATURE_0: u8 = 0xDA;
/// Second signature byte of every message.
pub const SIGNATURE_1: u8 = 0x72;
/// The only protocol version Ferry speaks.
pub const VERSION: u8 = 0;
/// Size of the common header.
pub const HEADER_LEN: usize = 4;
/// Largest datagram Ferry accepts (UTP's MTU ceiling).
pub const MAX_DATAGRAM: usize = 1472;
/// Size of an allocation ID on the wire.
pub const ID_LEN: usize = 16;

/// Message type byte (offset 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    Bind = 0,
    BindReceived = 1,
    Ping = 2,
    ConnectRequest = 3,
    Accepted = 6,
    Rejected = 8,
    Disconnect = 9,
    Relay = 10,
    Close = 11,
    Error = 12,
}

impl MessageType {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Bind,
            1 => Self::BindReceived,
            2 => Self::Ping,
            3 => Self::ConnectRequest,
            6 => Self::Accepted,
            8 => Self::Rejected,
            9 => Self::Disconnect,
            10 => Self::Relay,
            11 => Self::Close,
            12 => Self::Error,
            _ => return None,
        })
    }
}

/// Why a datagram failed validation. Doubles as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WireError {
    /// Shorter than the header or than the message's fixed part.
    Short,
    /// The first two bytes are not `DA 72`.
    BadSignature,
    /// Version byte is not 0.
    BadVersion,
    /// Type byte is 4, 5, 7 or above 12.
    UnknownType,
    /// The type byte does not match the view that was asked for.
    WrongType,
    /// The datagram length does not equal the length its fields announce.
    BadLength,
    /// A field holds a value the protocol forbids (e.g. BIND accept mode ≠ 0).
    BadField,
    /// The output buffer is too small for the message being emitted.
    BufferTooSmall,
}

impl WireError {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Short => "short",
            Self::BadSignature => "bad_signature",
            Self::BadVersion => "bad_version",
            Self::UnknownType => "unknown_type",
            Self::WrongType => "wrong_type",
            Self::BadLength => "bad_length",
            Self::BadField => "bad_field",
            Self::BufferTooSmall => "buffer_too_small",
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for WireError {}

/// A 16-byte allocation ID, the UUID's bytes in RFC 4122 order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct AllocationId(pub [u8; 16]);

impl AllocationId {
    /// Reads the ID at `off`. Panics unless `off + 16 <= b.len()`; views call it only after
    /// their length check.
    #[inline]
    pub fn read(b: &[u8], off: usize) -> Self {
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[off..off + ID_LEN]);
        Self(id)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Parses the canonical hyphenated form (case-insensitive) or 32 bare hex digits.
    pub fn parse(s: &str) -> Option<Self> {
        let hex: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
        if hex.len() != 32 || s.len() > 36 {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Self(out))
    }
}

impl fmt::Display for AllocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for AllocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Validates the 4-byte header and returns the message type.
#[inline]
pub fn parse_header(b: &[u8]) -> Result<MessageType, WireError> {
    if b.len() < HEADER_LEN {
        return Err(WireError::Short);
    }
    if b[0] != SIGNATURE_0 || b[1] != SIGNATURE_1 {
        return Err(WireError::BadSignature);
    }
    if b[2] != VERSION {
        return Err(WireError::BadVersion);
    }
    MessageType::from_u8(b[3]).ok_or(WireError::UnknownType)
}

/// Validates the header and that it announces `ty`.
#[inline]
pub(crate) fn check_header(b: &[u8], ty: MessageType) -> Result<(), WireError> {
    if parse_header(b)? != ty {
        return Err(WireError::WrongType);
    }
    Ok(())
}

#[inline]
pub fn write_header(out: &mut [u8], ty: MessageType) {
    out[0] = SIGNATURE_0;
    out[1] = SIGNATURE_1;
    out[2] = VERSION;
    out[3] = ty as u8;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_validation() {
        assert_eq!(parse_header(&[0xDA, 0x72, 0, 10]), Ok(MessageType::Relay));
        assert_eq!(parse_header(&[0xDA, 0x72, 0]), Err(WireError::Short));
        assert_eq!(parse_header(&[0xDA, 0x73, 0, 10]), Err(WireError::BadSignature));
        assert_eq!(parse_header(&[0xDA, 0x72, 1, 10]), Err(WireError::BadVersion));
        for t in [4u8, 5, 7, 13, 255] {
            assert_eq!(parse_header(&[0xDA, 0x72, 0, t]), Err(WireError::UnknownType));
        }
    }

    #[test]
    fn id_display_and_parse() {
        let id = AllocationId([
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0x4d, 0xef, 0x81, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef,
        ]);
        let s = id.to_string();
        assert_eq!(s, "12345678-9abc-4def-8123-456789abcdef");
        assert_eq!(AllocationId::parse(&s), Some(id));
        assert_eq!(AllocationId::parse(&s.to_uppercase()), Some(id));
        assert_eq!(AllocationId::parse("123"), None);
        assert_eq!(AllocationId::parse("zz345678-9abc-4def-8123-456789abcdef"), None);
    }
}
