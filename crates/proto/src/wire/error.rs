//! ERROR (type 12, relay → client): `4..20` the recipient's own allocation ID · `20` code. 21 bytes.

use super::{check_header, write_header, AllocationId, MessageType, WireError, ID_LEN};

/// ERROR codes (`docs/protocol.md`, "Error codes").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorCode {
    InvalidProtocolVersion = 0,
    AllocationTimedOut = 1,
    Unauthorized = 2,
    BoundElsewhere = 3,
    AllocationNotFound = 4,
    NotConnected = 5,
    SelfConnect = 6,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 7] = [
        Self::InvalidProtocolVersion,
        Self::AllocationTimedOut,
        Self::Unauthorized,
        Self::BoundElsewhere,
        Self::AllocationNotFound,
        Self::NotConnected,
        Self::SelfConnect,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidProtocolVersion => "invalid_version",
            Self::AllocationTimedOut => "timed_out",
            Self::Unauthorized => "unauthorized",
            Self::BoundElsewhere => "bound_elsewhere",
            Self::AllocationNotFound => "not_found",
            Self::NotConnected => "not_connected",
            Self::SelfConnect => "self_connect",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ErrorMsg<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> ErrorMsg<T> {
    pub const LEN: usize = 21;

    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        check_header(b, MessageType::Error)?;
        if b.len() != Self::LEN {
            return Err(if b.len() < Self::LEN { WireError::Short } else { WireError::BadLength });
        }
        if ErrorCode::from_u8(b[20]).is_none() {
            return Err(WireError::BadField);
        }
        Ok(Self { buf })
    }

    pub fn allocation_id(&self) -> AllocationId {
        AllocationId::read(self.buf.as_ref(), 4)
    }

    pub fn code(&self) -> ErrorCode {
        ErrorCode::from_u8(self.buf.as_ref()[20]).unwrap_or(ErrorCode::AllocationNotFound)
    }
}

impl ErrorMsg<()> {
    pub fn emit(out: &mut [u8; 21], id: &AllocationId, code: ErrorCode) -> usize {
        write_header(out, MessageType::Error);
        out[4..4 + ID_LEN].copy_from_slice(&id.0);
        out[20] = code as u8;
        21
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips() {
        let id = AllocationId([5; 16]);
        for code in ErrorCode::ALL {
            let mut out = [0u8; 21];
            assert_eq!(ErrorMsg::emit(&mut out, &id, code), 21);
            assert_eq!(&out[..4], &[0xDA, 0x72, 0, 12]);
            let e = ErrorMsg::new_checked(&out[..]).unwrap();
            assert_eq!((e.allocation_id(), e.code()), (id, code));
        }
        let mut out = [0u8; 21];
        ErrorMsg::emit(&mut out, &id, ErrorCode::NotConnected);
        out[20] = 7;
        assert_eq!(ErrorMsg::new_checked(&out[..]).unwrap_err(), WireError::BadField);
    }
}
