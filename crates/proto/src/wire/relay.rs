//! RELAY (type 10): `4..20` from · `20..36` to · `36..38` N (u16 **BE**) · `38..38+N` payload.

use super::{check_header, write_header, AllocationId, MessageType, WireError, ID_LEN};

const LEN_FIELD: usize = 36;
const PAYLOAD: usize = 38;

#[derive(Debug, Clone, Copy)]
pub struct Relay<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> Relay<T> {
    /// Size of the fixed part before the payload.
    pub const HEADER_LEN: usize = PAYLOAD;

    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        check_header(b, MessageType::Relay)?;
        if b.len() < PAYLOAD {
            return Err(WireError::Short);
        }
        let n = u16::from_be_bytes([b[LEN_FIELD], b[LEN_FIELD + 1]]) as usize;
        if b.len() != PAYLOAD + n {
            return Err(WireError::BadLength);
        }
        Ok(Self { buf })
    }

    pub fn from(&self) -> AllocationId {
        AllocationId::read(self.buf.as_ref(), 4)
    }

    pub fn to(&self) -> AllocationId {
        AllocationId::read(self.buf.as_ref(), 20)
    }

    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[PAYLOAD..]
    }
}

impl Relay<()> {
    pub fn emit(
        out: &mut [u8],
        from: &AllocationId,
        to: &AllocationId,
        payload: &[u8],
    ) -> Result<usize, WireError> {
        let n = payload.len();
        if n > u16::MAX as usize {
            return Err(WireError::BadField);
        }
        if out.len() < PAYLOAD + n {
            return Err(WireError::BufferTooSmall);
        }
        write_header(out, MessageType::Relay);
        out[4..4 + ID_LEN].copy_from_slice(&from.0);
        out[20..20 + ID_LEN].copy_from_slice(&to.0);
        out[LEN_FIELD..PAYLOAD].copy_from_slice(&(n as u16).to_be_bytes());
        out[PAYLOAD..PAYLOAD + n].copy_from_slice(payload);
        Ok(PAYLOAD + n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_is_big_endian_and_exact() {
        let (a, b) = (AllocationId([1; 16]), AllocationId([2; 16]));
        let payload = [0x11u8; 300];
        let mut out = [0u8; 400];
        let n = Relay::emit(&mut out, &a, &b, &payload).unwrap();
        assert_eq!(n, 338);
        assert_eq!(&out[36..38], &[0x01, 0x2C]);
        let r = Relay::new_checked(&out[..n]).unwrap();
        assert_eq!((r.from(), r.to(), r.payload()), (a, b, &payload[..]));
        assert_eq!(Relay::new_checked(&out[..n - 1]).unwrap_err(), WireError::BadLength);
        assert_eq!(Relay::new_checked(&out[..n + 1]).unwrap_err(), WireError::BadLength);
        assert_eq!(Relay::new_checked(&out[..37]).unwrap_err(), WireError::Short);
        let empty = Relay::emit(&mut out, &a, &b, &[]).unwrap();
        assert_eq!(empty, 38);
        assert!(Relay::new_checked(&out[..38]).is_ok());
        assert_eq!(Relay::emit(&mut out[..10], &a, &b, &[]).unwrap_err(), WireError::BufferTooSmall);
    }
}
