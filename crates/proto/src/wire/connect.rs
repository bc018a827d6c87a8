//! CONNECT_REQUEST (type 3, client → relay):
//! `4..20` requester ID · `20` L · `21..21+L` the target's connection data. UTP: L = 255.

use super::{check_header, write_header, AllocationId, MessageType, WireError, ID_LEN};

const DATA_LEN: usize = 20;
const DATA: usize = 21;

#[derive(Debug, Clone, Copy)]
pub struct ConnectRequest<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> ConnectRequest<T> {
    pub const MIN_LEN: usize = DATA;

    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        check_header(b, MessageType::ConnectRequest)?;
        if b.len() < DATA {
            return Err(WireError::Short);
        }
        if b.len() != DATA + b[DATA_LEN] as usize {
            return Err(WireError::BadLength);
        }
        Ok(Self { buf })
    }

    pub fn requester(&self) -> AllocationId {
        AllocationId::read(self.buf.as_ref(), 4)
    }

    pub fn target_connection_data(&self) -> &[u8] {
        &self.buf.as_ref()[DATA..]
    }
}

impl ConnectRequest<()> {
    pub fn emit(out: &mut [u8], requester: &AllocationId, target_data: &[u8]) -> Result<usize, WireError> {
        let l = target_data.len();
        if l > u8::MAX as usize {
            return Err(WireError::BadField);
        }
        if out.len() < DATA + l {
            return Err(WireError::BufferTooSmall);
        }
        write_header(out, MessageType::ConnectRequest);
        out[4..4 + ID_LEN].copy_from_slice(&requester.0);
        out[DATA_LEN] = l as u8;
        out[DATA..DATA + l].copy_from_slice(target_data);
        Ok(DATA + l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utp_sized_round_trip() {
        let id = AllocationId([9; 16]);
        let data = [0x5A; 255];
        let mut out = [0u8; 276];
        assert_eq!(ConnectRequest::emit(&mut out, &id, &data).unwrap(), 276);
        assert_eq!(&out[..4], &[0xDA, 0x72, 0, 3]);
        assert_eq!(out[20], 255);
        let c = ConnectRequest::new_checked(&out[..]).unwrap();
        assert_eq!(c.requester(), id);
        assert_eq!(c.target_connection_data(), &data[..]);
        assert_eq!(ConnectRequest::new_checked(&out[..275]).unwrap_err(), WireError::BadLength);
        assert_eq!(ConnectRequest::new_checked(&out[..20]).unwrap_err(), WireError::Short);
    }
}
