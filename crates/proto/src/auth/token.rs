//! Fleet allocation tokens (`docs/fleet.md`, "Tokens").
//!
//! In fleet mode an API instance mints an allocation without calling any relay: the 255-byte
//! connection data it hands the client *is* a token, tagged under a key that only the named relay
//! (in its current boot) and the API instances can compute. The relay checks the token at the
//! first BIND and from then on treats the allocation like one it created itself.
//!
//! ```text
//! 0..16   allocation ID (byte 15 is the fleet key ID, so a DTLS handshake finds the key from
//!         the PSK identity alone; bytes 0..4 choose the owner shard, and a joiner copies its
//!         host's, so both land on the same shard whatever the relay's shard count)
//! 16      format (2)
//! 17      role: 1 host, 2 joiner
//! 18..20  maxConnections (host), big-endian
//! 20..24  relay tag: SHA-256("ferry relay" ‖ relay name)[..4]
//! 24..28  relay epoch (random per relay boot)
//! 28..36  not_after: Unix milliseconds; the first BIND must come before it
//! 36..52  host allocation ID (joiner), zero for a host
//! 52..68  tag: HMAC-SHA-256(relay key, bytes 0..52)[..16]
//! 68..255 zero
//! ```
//!
//! relay key = HMAC-SHA-512(fleet key[kid], "ferry relay key" ‖ len ‖ relay name ‖ epoch), and
//! the allocation key is derived from the relay key and the ID exactly as a single relay derives
//! it from its own secret. The fleet key itself never leaves the API instances and relays.

use hmac::Mac;
use sha2::Digest;
use subtle::ConstantTimeEq;

use super::{PreKeyedHmac, CONNECTION_DATA_LEN};
use crate::wire::AllocationId;

pub const FORMAT_FLEET: u8 = 2;
const FORMAT: usize = 16;
const ROLE: usize = 17;
const MAX: std::ops::Range<usize> = 18..20;
const RELAY: std::ops::Range<usize> = 20..24;
const EPOCH: std::ops::Range<usize> = 24..28;
const NOT_AFTER: std::ops::Range<usize> = 28..36;
const HOST: std::ops::Range<usize> = 36..52;
const TAG: std::ops::Range<usize> = 52..68;

/// Whether `data` claims the fleet format (a cheap look at the format byte).
#[inline]
pub fn is_fleet(data: &[u8]) -> bool {
    data.len() == CONNECTION_DATA_LEN && data[FORMAT] == FORMAT_FLEET
}

/// The tag naming relay `name` in tokens.
pub fn relay_tag(name: &str) -> u32 {
    let d = sha2::Sha256::new().chain_update(b"ferry relay").chain_update(name.as_bytes()).finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// The key a relay named `name` uses during boot `epoch`, under one fleet key.
pub fn relay_key(fleet_key: &[u8], name: &str, epoch: u32) -> [u8; 64] {
    let mut m =
        <hmac::Hmac<sha2::Sha512> as Mac>::new_from_slice(fleet_key).expect("HMAC takes any key length");
    m.update(b"ferry relay key");
    m.update(&[name.len().min(255) as u8]);
    m.update(&name.as_bytes()[..name.len().min(255)]);
    m.update(&epoch.to_be_bytes());
    m.finalize().into_bytes().into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRole {
    Host { max_connections: u16 },
    Joiner { host: AllocationId },
}

/// A parsed (not yet verified) fleet token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub id: AllocationId,
    pub role: TokenRole,
    pub relay: u32,
    pub epoch: u32,
    pub not_after_ms: u64,
}

/// Why a token is refused, counted by the relay under these names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Not the fleet format, a bad role or a non-zero tail.
    Malformed,
    /// The tag does not verify (or names an unknown fleet key).
    Forged,
    /// Minted for another relay.
    WrongRelay,
    /// Minted for an earlier boot of this relay.
    StaleEpoch,
    /// First BIND after `not_after`.
    Expired,
}

impl TokenError {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Forged => "forged",
            Self::WrongRelay => "wrong_relay",
            Self::StaleEpoch => "stale_epoch",
            Self::Expired => "expired",
        }
    }
}

impl Token {
    /// The fleet key ID a token's ID carries.
    pub fn kid(id: &AllocationId) -> u8 {
        id.0[15]
    }

    /// The 255-byte connection data of this token, tagged under `relay_key`.
    pub fn emit(&self, relay_key: &[u8; 64]) -> [u8; CONNECTION_DATA_LEN] {
        let mut out = [0u8; CONNECTION_DATA_LEN];
        out[..16].copy_from_slice(&self.id.0);
        out[FORMAT] = FORMAT_FLEET;
        match self.role {
            TokenRole::Host { max_connections } => {
                out[ROLE] = 1;
                out[MAX].copy_from_slice(&max_connections.to_be_bytes());
            }
            TokenRole::Joiner { host } => {
                out[ROLE] = 2;
                out[HOST].copy_from_slice(&host.0);
            }
        }
        out[RELAY].copy_from_slice(&self.relay.to_be_bytes());
        out[EPOCH].copy_from_slice(&self.epoch.to_be_bytes());
        out[NOT_AFTER].copy_from_slice(&self.not_after_ms.to_be_bytes());
        let tag = PreKeyedHmac::new(relay_key).mac(&out[..TAG.start]);
        out[TAG].copy_from_slice(&tag[..16]);
        out
    }

    /// Structural check only (no crypto).
    pub fn parse(data: &[u8]) -> Result<Self, TokenError> {
        if !is_fleet(data) || data[TAG.end..].iter().fold(0u8, |a, &b| a | b) != 0 {
            return Err(TokenError::Malformed);
        }
        let u16_at = |r: std::ops::Range<usize>| u16::from_be_bytes([data[r.start], data[r.start + 1]]);
        let u32_at = |r: std::ops::Range<usize>| {
            u32::from_be_bytes([data[r.start], data[r.start + 1], data[r.start + 2], data[r.start + 3]])
        };
        let role = match data[ROLE] {
            1 if data[HOST].iter().all(|&b| b == 0) => TokenRole::Host { max_connections: u16_at(MAX) },
            2 if u16_at(MAX) == 0 => TokenRole::Joiner { host: AllocationId::read(data, HOST.start) },
            _ => return Err(TokenError::Malformed),
        };
        let mut na = [0u8; 8];
        na.copy_from_slice(&data[NOT_AFTER]);
        Ok(Self {
            id: AllocationId::read(data, 0),
            role,
            relay: u32_at(RELAY),
            epoch: u32_at(EPOCH),
            not_after_ms: u64::from_be_bytes(na),
        })
    }

    /// Whether `data`'s tag verifies under `relay_key`, in constant time.
    pub fn tag_ok(data: &[u8], relay_key: &PreKeyedHmac) -> bool {
        data.len() == CONNECTION_DATA_LEN
            && bool::from(relay_key.mac(&data[..TAG.start])[..16].ct_eq(&data[TAG]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Token {
        Token {
            id: AllocationId([7; 16]),
            role: TokenRole::Host { max_connections: 4 },
            relay: relay_tag("eu-1"),
            epoch: 99,
            not_after_ms: 1_800_000_000_000,
        }
    }

    #[test]
    fn round_trip_and_tag() {
        let k = relay_key(b"fleet key 0123456789abcdef012345", "eu-1", 99);
        let t = host();
        let data = t.emit(&k);
        assert_eq!(&data[..16], &t.id.0);
        assert!(is_fleet(&data));
        assert_eq!(Token::parse(&data), Ok(t));
        assert!(Token::tag_ok(&data, &PreKeyedHmac::new(&k)));
        let other_epoch = relay_key(b"fleet key 0123456789abcdef012345", "eu-1", 100);
        assert!(!Token::tag_ok(&data, &PreKeyedHmac::new(&other_epoch)));
        let other_relay = relay_key(b"fleet key 0123456789abcdef012345", "eu-2", 99);
        assert!(!Token::tag_ok(&data, &PreKeyedHmac::new(&other_relay)));
        let mut forged = data;
        forged[30] ^= 1; // a later not_after
        assert!(!Token::tag_ok(&forged, &PreKeyedHmac::new(&k)));
        let j = Token { id: AllocationId([8; 16]), role: TokenRole::Joiner { host: t.id }, ..t };
        assert_eq!(Token::parse(&j.emit(&k)), Ok(j));
    }

    #[test]
    fn structural_rejects() {
        let k = [3u8; 64];
        let data = host().emit(&k);
        let mut tail = data;
        tail[200] = 1;
        assert_eq!(Token::parse(&tail), Err(TokenError::Malformed));
        let mut role = data;
        role[ROLE] = 3;
        assert_eq!(Token::parse(&role), Err(TokenError::Malformed));
        let mut host_with_host = data;
        host_with_host[40] = 1;
        assert_eq!(Token::parse(&host_with_host), Err(TokenError::Malformed));
        assert_eq!(Token::parse(&data[..254]), Err(TokenError::Malformed));
        let mut v1 = data;
        v1[FORMAT] = 1;
        assert!(!is_fleet(&v1));
        assert_ne!(relay_tag("a"), relay_tag("b"));
    }
}
