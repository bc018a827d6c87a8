//! PING (type 2, client → relay, echoed): `4..20` sender ID · `20..22` sequence (u16 LE). 22 bytes.

use super::{check_header, write_header, AllocationId, MessageType, WireError, ID_LEN};

#[derive(Debug, Clone, Copy)]
pub struct Ping<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> Ping<T> {
    pub const LEN: usize = 22;

    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        check_header(b, MessageType::Ping)?;
        if b.len() != Self::LEN {
            return Err(if b.len() < Self::LEN { WireError::Short } else { WireError::BadLength });
        }
        Ok(Self { buf })
    }

    pub fn sender(&self) -> AllocationId {
        AllocationId::read(self.buf.as_ref(), 4)
    }

    pub fn sequence(&self) -> u16 {
        let b = self.buf.as_ref();
        u16::from_le_bytes([b[20], b[21]])
    }
}

impl Ping<()> {
    pub fn emit(out: &mut [u8; 22], sender: &AllocationId, sequence: u16) -> usize {
        write_header(out, MessageType::Ping);
        out[4..4 + ID_LEN].copy_from_slice(&sender.0);
        out[20..22].copy_from_slice(&sequence.to_le_bytes());
        22
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_spec() {
        let id = AllocationId([3; 16]);
        let mut out = [0u8; 22];
        Ping::emit(&mut out, &id, 1);
        assert_eq!(&out[..4], &[0xDA, 0x72, 0, 2]);
        assert_eq!(&out[20..], &[1, 0]);
        let p = Ping::new_checked(&out[..]).unwrap();
        assert_eq!((p.sender(), p.sequence()), (id, 1));
        assert!(Ping::new_checked(&out[..21]).is_err());
    }
}
