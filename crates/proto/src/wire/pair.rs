//! ACCEPTED (6), REJECTED (8) and DISCONNECT (9): `4..20` from · `20..36` to. 36 bytes each.
//! In ACCEPTED and REJECTED, *from* is the host and *to* the requester.

use std::marker::PhantomData;

use super::{check_header, write_header, AllocationId, MessageType, WireError, ID_LEN};

/// Which of the three from/to messages a [`Pair`] view is.
pub trait PairKind {
    const TYPE: MessageType;
}

#[derive(Debug, Clone, Copy)]
pub struct AcceptedKind;
#[derive(Debug, Clone, Copy)]
pub struct RejectedKind;
#[derive(Debug, Clone, Copy)]
pub struct DisconnectKind;

impl PairKind for AcceptedKind {
    const TYPE: MessageType = MessageType::Accepted;
}
impl PairKind for RejectedKind {
    const TYPE: MessageType = MessageType::Rejected;
}
impl PairKind for DisconnectKind {
    const TYPE: MessageType = MessageType::Disconnect;
}

/// A checked view over a from/to message of kind `K`.
#[derive(Debug, Clone, Copy)]
pub struct Pair<K: PairKind, T> {
    buf: T,
    _kind: PhantomData<K>,
}

pub type Accepted<T> = Pair<AcceptedKind, T>;
pub type Rejected<T> = Pair<RejectedKind, T>;
pub type Disconnect<T> = Pair<DisconnectKind, T>;

/// Size of every from/to message.
pub const PAIR_LEN: usize = 36;

impl<K: PairKind, T: AsRef<[u8]>> Pair<K, T> {
    pub const LEN: usize = PAIR_LEN;

    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        check_header(b, K::TYPE)?;
        if b.len() != PAIR_LEN {
            return Err(if b.len() < PAIR_LEN { WireError::Short } else { WireError::BadLength });
        }
        Ok(Self { buf, _kind: PhantomData })
    }

    pub fn from(&self) -> AllocationId {
        AllocationId::read(self.buf.as_ref(), 4)
    }

    pub fn to(&self) -> AllocationId {
        AllocationId::read(self.buf.as_ref(), 20)
    }
}

impl<K: PairKind> Pair<K, ()> {
    pub fn emit(out: &mut [u8; PAIR_LEN], from: &AllocationId, to: &AllocationId) -> usize {
        write_header(out, K::TYPE);
        out[4..4 + ID_LEN].copy_from_slice(&from.0);
        out[20..20 + ID_LEN].copy_from_slice(&to.0);
        PAIR_LEN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_round_trips_and_checks_type() {
        let (a, b) = (AllocationId([1; 16]), AllocationId([2; 16]));
        let mut out = [0u8; 36];
        Accepted::emit(&mut out, &a, &b);
        assert_eq!(out[3], 6);
        let v = Accepted::new_checked(&out[..]).unwrap();
        assert_eq!((v.from(), v.to()), (a, b));
        assert_eq!(Rejected::new_checked(&out[..]).unwrap_err(), WireError::WrongType);
        Rejected::emit(&mut out, &a, &b);
        assert_eq!(out[3], 8);
        Disconnect::emit(&mut out, &b, &a);
        assert_eq!(out[3], 9);
        let d = Disconnect::new_checked(&out[..]).unwrap();
        assert_eq!((d.from(), d.to()), (b, a));
        assert_eq!(Disconnect::new_checked(&out[..35]).unwrap_err(), WireError::Short);
    }
}
