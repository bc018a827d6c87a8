//! Ferry's 255-byte connection data (a decision in `docs/protocol.md`, "Allocation IDs and connection data").
//!
//! ```text
//! 0..16   owner allocation ID (so BIND resolves its allocation, and steering reads it at offset 8)
//! 16      format (1)
//! 17..33  tag: HMAC-SHA256(relay secret, ID)[..16]
//! 33..255 zero
//! ```
//!
//! The structural check (format byte, zero tail) costs no crypto and throws away random blobs
//! before any table work. The tag proves that this relay minted the blob; it is checked where a
//! blob names a *target* (CONNECT_REQUEST). BIND needs no tag check: its HMAC under the
//! allocation's own key already covers the whole blob.

use subtle::ConstantTimeEq;

use super::PreKeyedHmac;
use crate::wire::AllocationId;

pub const CONNECTION_DATA_LEN: usize = 255;
const FORMAT: usize = 16;
const FORMAT_V1: u8 = 1;
const TAG: std::ops::Range<usize> = 17..33;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnDataError {
    /// Not 255 bytes, unknown format or a non-zero tail.
    Malformed,
    /// Well formed but not minted by this relay.
    BadTag,
}

impl ConnDataError {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "conn_data_malformed",
            Self::BadTag => "conn_data_forged",
        }
    }
}

/// Builds and checks connection data under a relay secret.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionData {
    secret: PreKeyedHmac,
}

impl ConnectionData {
    pub fn new(secret: &[u8; 64]) -> Self {
        Self { secret: PreKeyedHmac::new(secret) }
    }

    fn tag(&self, id: &AllocationId) -> [u8; 32] {
        self.secret.mac(&id.0)
    }

    pub fn build(&self, id: &AllocationId) -> [u8; CONNECTION_DATA_LEN] {
        let mut out = [0u8; CONNECTION_DATA_LEN];
        out[..16].copy_from_slice(&id.0);
        out[FORMAT] = FORMAT_V1;
        out[TAG].copy_from_slice(&self.tag(id)[..16]);
        out
    }

    /// Structural check only (no crypto): returns the owner ID.
    #[inline]
    pub fn parse(data: &[u8]) -> Result<AllocationId, ConnDataError> {
        if data.len() != CONNECTION_DATA_LEN || data[FORMAT] != FORMAT_V1 {
            return Err(ConnDataError::Malformed);
        }
        if data[TAG.end..].iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return Err(ConnDataError::Malformed);
        }
        Ok(AllocationId::read(data, 0))
    }

    /// Structural check plus the tag, in constant time.
    pub fn verify(&self, data: &[u8]) -> Result<AllocationId, ConnDataError> {
        let id = Self::parse(data)?;
        if bool::from(self.tag(&id)[..16].ct_eq(&data[TAG])) {
            Ok(id)
        } else {
            Err(ConnDataError::BadTag)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_parse_verify() {
        let cd = ConnectionData::new(&[7; 64]);
        let id = AllocationId([0x42; 16]);
        let data = cd.build(&id);
        assert_eq!(&data[..16], &id.0);
        assert_eq!(ConnectionData::parse(&data), Ok(id));
        assert_eq!(cd.verify(&data), Ok(id));
        let other = ConnectionData::new(&[8; 64]);
        assert_eq!(other.verify(&data), Err(ConnDataError::BadTag));
        let mut bad = data;
        bad[200] = 1;
        assert_eq!(cd.verify(&bad), Err(ConnDataError::Malformed));
        assert_eq!(ConnectionData::parse(&data[..254]), Err(ConnDataError::Malformed));
        let mut forged = data;
        forged[0] ^= 1;
        assert_eq!(cd.verify(&forged), Err(ConnDataError::BadTag));
    }
}
