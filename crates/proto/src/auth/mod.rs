//! Keys, BIND verification and the connection-data format (`docs/protocol.md`, "BIND authentication" and "Allocation IDs").
//!
//! Each allocation keeps only a [`PreKeyedHmac`]: the two SHA-256 midstates after absorbing
//! `key ^ ipad` and `key ^ opad` (64 bytes). Verifying a UTP BIND then costs the compression of
//! its 263 signed bytes plus one outer block, and the raw key is never stored by the relay.

mod conndata;
mod hmac;
pub mod token;

pub use conndata::{ConnDataError, ConnectionData, CONNECTION_DATA_LEN};
pub use hmac::PreKeyedHmac;

use base64::Engine as _;
use subtle::ConstantTimeEq;

use crate::wire::Bind;

/// Size of an allocation key (UTP refuses any other length).
pub const KEY_LEN: usize = 64;

/// A 64-byte allocation key.
#[derive(Clone, PartialEq, Eq)]
pub struct AllocationKey(pub [u8; KEY_LEN]);

impl AllocationKey {
    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut k = [0u8; KEY_LEN];
        getrandom::getrandom(&mut k)?;
        Ok(Self(k))
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    pub fn from_base64(s: &str) -> Option<Self> {
        let v = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
        Some(Self(v.try_into().ok()?))
    }
}

impl std::fmt::Debug for AllocationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AllocationKey(..)")
    }
}

/// Verifies a checked BIND's HMAC over its raw signed bytes, in constant time.
#[inline]
pub fn verify_bind<T: AsRef<[u8]>>(state: &PreKeyedHmac, bind: &Bind<T>) -> bool {
    let mac = state.mac(bind.signed_part());
    mac.ct_eq(bind.mac()).into()
}

/// Signs a BIND written by [`Bind::emit_unsigned`]: computes the HMAC over `out[..signed_len]`
/// and appends it. Returns the full datagram length.
pub fn sign_bind(key: &AllocationKey, out: &mut [u8], signed_len: usize) -> Option<usize> {
    let total = signed_len + 32;
    if out.len() < total {
        return None;
    }
    let mac = PreKeyedHmac::new(&key.0).mac(&out[..signed_len]);
    out[signed_len..total].copy_from_slice(&mac);
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn unity_vector_verifies() {
        let key = AllocationKey::from_base64(
            "cSzQ2I5ZCQ7vnHMt9fDB2/+xDkL2VUKoUT7AVNYhe+kaTQLptQ0gUbco/Qgiicow89VtxOXcw92IozbdDG848w==",
        )
        .unwrap();
        let data = STANDARD.decode("sGsP0X8REiXn+PS51+lQDPBjowDlvV5zPgh15puL5YXFd3XdQ/oHkXh0a+m8A3riVvtUdZvZloYNpsi19flB6cvfpXNvib9SQ5UUMH0V+hNVExAog21jLA7PlBPp2eLHtKeCRflhR2pSq6FmRplmXLfdu4fV3eCgruvpr/pr6lVxeATN5k13OiY4lnEv5otyUsfkKFyIO+Sann97MsEklKgoAtVmlw6QurBVb+W3GDIyAHYF15UrQkkHE46fBkCbgFdry2hDQjn+6uXnxC3LVPfJw0jS4FpdbLfiUik/qATkZyX9eu97PNLw9lL1aogDLRG/ztmpi4Slwpl3awXr").unwrap();
        assert_eq!(data.len(), 255);
        let mut out = [0u8; 295];
        let n = Bind::emit_unsigned(&mut out, 23, &data).unwrap();
        assert_eq!(&out[..12], &hex("da720000001700ffb06b0fd1")[..]);
        assert_eq!(sign_bind(&key, &mut out, n), Some(295));
        assert_eq!(&out[263..], &hex("515f838630585f99fc959376284109f26b62433f70292338c0cfd5dd74787f09")[..]);
        let state = PreKeyedHmac::new(&key.0);
        let view = Bind::new_checked(&out[..]).unwrap();
        assert!(verify_bind(&state, &view));
        out[100] ^= 1;
        assert!(!verify_bind(&state, &Bind::new_checked(&out[..]).unwrap()));
    }

    #[test]
    fn invented_vector_verifies() {
        let mut key = [0u8; 64];
        for (i, b) in key.iter_mut().enumerate() {
            *b = i as u8;
        }
        let mut data = [0u8; 255];
        for (i, b) in data.iter_mut().take(16).enumerate() {
            *b = 0xa0 + i as u8;
        }
        let mut out = [0u8; 295];
        let n = Bind::emit_unsigned(&mut out, 258, &data).unwrap();
        assert_eq!(&out[5..7], &[0x02, 0x01]);
        sign_bind(&AllocationKey(key), &mut out, n).unwrap();
        assert_eq!(&out[263..], &hex("f0e78c22cea77beecb379b6cbd623e2ae4991cf145faf98a10b25b291402cc01")[..]);
    }

    #[test]
    fn generated_keys_differ_and_round_trip() {
        let a = AllocationKey::generate().unwrap();
        let b = AllocationKey::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(AllocationKey::from_base64(&a.to_base64()), Some(a));
        assert_eq!(AllocationKey::from_base64("AAAA"), None);
    }
}
