//! BIND (type 0, client → relay) and BIND_RECEIVED (type 1, relay → client).
//!
//! ```text
//! 0..4 header · 4 accept mode · 5..7 nonce (u16 LE) · 7 L · 8..8+L connection data · 32-byte HMAC
//! ```

use super::{check_header, write_header, MessageType, WireError, HEADER_LEN};

/// Size of a BIND_RECEIVED (header only).
pub const BIND_RECEIVED_LEN: usize = HEADER_LEN;

const ACCEPT_MODE: usize = 4;
const NONCE: usize = 5;
const DATA_LEN: usize = 7;
const DATA: usize = 8;
/// Size of the trailing HMAC-SHA256.
pub const MAC_LEN: usize = 32;

/// A checked view over a BIND datagram.
#[derive(Debug, Clone, Copy)]
pub struct Bind<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> Bind<T> {
    /// Smallest possible BIND (empty connection data).
    pub const MIN_LEN: usize = DATA + MAC_LEN;

    /// Validates header, type, exact length and accept mode.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        check_header(b, MessageType::Bind)?;
        if b.len() < Self::MIN_LEN {
            return Err(WireError::Short);
        }
        if b.len() != DATA + b[DATA_LEN] as usize + MAC_LEN {
            return Err(WireError::BadLength);
        }
        if b[ACCEPT_MODE] != 0 {
            return Err(WireError::BadField);
        }
        Ok(Self { buf })
    }

    pub fn nonce(&self) -> u16 {
        let b = self.buf.as_ref();
        u16::from_le_bytes([b[NONCE], b[NONCE + 1]])
    }

    pub fn connection_data(&self) -> &[u8] {
        let b = self.buf.as_ref();
        &b[DATA..DATA + b[DATA_LEN] as usize]
    }

    /// The bytes the HMAC covers: everything before the MAC, exactly as received.
    pub fn signed_part(&self) -> &[u8] {
        let b = self.buf.as_ref();
        &b[..b.len() - MAC_LEN]
    }

    pub fn mac(&self) -> &[u8] {
        let b = self.buf.as_ref();
        &b[b.len() - MAC_LEN..]
    }
}

impl Bind<()> {
    /// Total size of a BIND carrying `data_len` bytes of connection data.
    pub const fn len_for(data_len: usize) -> usize {
        DATA + data_len + MAC_LEN
    }

    /// Writes a BIND without its MAC and returns the length of the signed part; the caller
    /// computes the HMAC over `out[..n]` and writes it to `out[n..n + 32]`.
    pub fn emit_unsigned(out: &mut [u8], nonce: u16, connection_data: &[u8]) -> Result<usize, WireError> {
        let l = connection_data.len();
        if l > u8::MAX as usize {
            return Err(WireError::BadField);
        }
        if out.len() < DATA + l + MAC_LEN {
            return Err(WireError::BufferTooSmall);
        }
        write_header(out, MessageType::Bind);
        out[ACCEPT_MODE] = 0;
        out[NONCE..NONCE + 2].copy_from_slice(&nonce.to_le_bytes());
        out[DATA_LEN] = l as u8;
        out[DATA..DATA + l].copy_from_slice(connection_data);
        Ok(DATA + l)
    }
}

/// Writes a BIND_RECEIVED.
pub fn emit_bind_received(out: &mut [u8; BIND_RECEIVED_LEN]) -> usize {
    write_header(out, MessageType::BindReceived);
    BIND_RECEIVED_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_spec() {
        let data = [0xAB; 255];
        let mut out = [0u8; 295];
        let n = Bind::emit_unsigned(&mut out, 258, &data).unwrap();
        assert_eq!(n, 263);
        assert_eq!(&out[..8], &[0xDA, 0x72, 0x00, 0x00, 0x00, 0x02, 0x01, 0xFF]);
        let v = Bind::new_checked(&out[..]).unwrap();
        assert_eq!(v.nonce(), 258);
        assert_eq!(v.connection_data(), &data[..]);
        assert_eq!(v.signed_part().len(), 263);
        assert_eq!(v.mac().len(), 32);
    }

    #[test]
    fn rejects_bad_lengths_and_mode() {
        let mut out = [0u8; 296];
        Bind::emit_unsigned(&mut out, 0, &[0; 255]).unwrap();
        assert_eq!(Bind::new_checked(&out[..]).unwrap_err(), WireError::BadLength);
        assert_eq!(Bind::new_checked(&out[..294]).unwrap_err(), WireError::BadLength);
        assert_eq!(Bind::new_checked(&out[..39]).unwrap_err(), WireError::Short);
        out[4] = 1;
        assert_eq!(Bind::new_checked(&out[..295]).unwrap_err(), WireError::BadField);
        out[3] = 10;
        assert_eq!(Bind::new_checked(&out[..295]).unwrap_err(), WireError::WrongType);
    }

    #[test]
    fn bind_received_is_header_only() {
        let mut out = [0u8; 4];
        assert_eq!(emit_bind_received(&mut out), 4);
        assert_eq!(out, [0xDA, 0x72, 0, 1]);
    }
}
