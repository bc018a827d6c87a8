//! HMAC-SHA256 for 64-byte keys with the key schedule precomputed.

use sha2::digest::{consts::U64, generic_array::GenericArray};

const H0: [u32; 8] =
    [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
const BLOCK: usize = 64;

/// HMAC-SHA256 state after absorbing a 64-byte key: 64 bytes, `Copy`, no heap.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PreKeyedHmac {
    inner: [u32; 8],
    outer: [u32; 8],
}

#[inline]
fn compress(state: &mut [u32; 8], block: &[u8]) {
    let block: &GenericArray<u8, U64> = GenericArray::from_slice(block);
    sha2::compress256(state, std::slice::from_ref(block));
}

/// Pads and absorbs the final partial block; `total` counts every byte hashed, key block included.
#[inline]
fn finish(state: &mut [u32; 8], rem: &[u8], total: usize) -> [u8; 32] {
    let mut block = [0u8; BLOCK];
    block[..rem.len()].copy_from_slice(rem);
    block[rem.len()] = 0x80;
    if rem.len() >= BLOCK - 8 {
        compress(state, &block);
        block = [0u8; BLOCK];
    }
    block[BLOCK - 8..].copy_from_slice(&((total as u64) * 8).to_be_bytes());
    compress(state, &block);
    let mut out = [0u8; 32];
    for (o, w) in out.chunks_exact_mut(4).zip(state.iter()) {
        o.copy_from_slice(&w.to_be_bytes());
    }
    out
}

impl PreKeyedHmac {
    pub fn new(key: &[u8; 64]) -> Self {
        let mut ipad = [0x36u8; BLOCK];
        let mut opad = [0x5cu8; BLOCK];
        for i in 0..BLOCK {
            ipad[i] ^= key[i];
            opad[i] ^= key[i];
        }
        let (mut inner, mut outer) = (H0, H0);
        compress(&mut inner, &ipad);
        compress(&mut outer, &opad);
        Self { inner, outer }
    }

    /// HMAC-SHA256(key, msg).
    #[inline]
    pub fn mac(&self, msg: &[u8]) -> [u8; 32] {
        let mut st = self.inner;
        let mut chunks = msg.chunks_exact(BLOCK);
        for c in &mut chunks {
            compress(&mut st, c);
        }
        let digest = finish(&mut st, chunks.remainder(), BLOCK + msg.len());
        let mut st = self.outer;
        finish(&mut st, &digest, BLOCK + 32)
    }
}

impl std::fmt::Debug for PreKeyedHmac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreKeyedHmac(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::Mac;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_reference_hmac(key in prop::array::uniform32(any::<u8>()), key2 in prop::array::uniform32(any::<u8>()), msg in prop::collection::vec(any::<u8>(), 0..400)) {
            let mut k = [0u8; 64];
            k[..32].copy_from_slice(&key);
            k[32..].copy_from_slice(&key2);
            let mut r = hmac::Hmac::<sha2::Sha256>::new_from_slice(&k).unwrap();
            r.update(&msg);
            let want: [u8; 32] = r.finalize().into_bytes().into();
            prop_assert_eq!(PreKeyedHmac::new(&k).mac(&msg), want);
        }
    }
}
