//! CLOSE (type 11, client → relay): `0..4` header · `4..20` sender allocation ID. 20 bytes.

use super::{check_header, write_header, AllocationId, MessageType, WireError, ID_LEN};

#[derive(Debug, Clone, Copy)]
pub struct Close<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> Close<T> {
    pub const LEN: usize = 20;

    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        check_header(b, MessageType::Close)?;
        if b.len() != Self::LEN {
            return Err(if b.len() < Self::LEN { WireError::Short } else { WireError::BadLength });
        }
        Ok(Self { buf })
    }

    pub fn sender(&self) -> AllocationId {
        AllocationId::read(self.buf.as_ref(), 4)
    }
}

impl Close<()> {
    pub fn emit(out: &mut [u8; 20], sender: &AllocationId) -> usize {
        write_header(out, MessageType::Close);
        out[4..4 + ID_LEN].copy_from_slice(&sender.0);
        20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id = AllocationId([7; 16]);
        let mut out = [0u8; 20];
        assert_eq!(Close::emit(&mut out, &id), 20);
        assert_eq!(&out[..4], &[0xDA, 0x72, 0, 11]);
        assert_eq!(Close::new_checked(&out[..]).unwrap().sender(), id);
        assert_eq!(Close::new_checked(&out[..19]).unwrap_err(), WireError::Short);
        let mut long = [0u8; 21];
        long[..20].copy_from_slice(&out);
        assert_eq!(Close::new_checked(&long[..]).unwrap_err(), WireError::BadLength);
    }
}
