//! The record protection of an established DTLS 1.2 session, done by Ferry itself.
//!
//! OpenSSL runs the handshake; once it is done, the session's keys are derived here from the
//! master secret and the two randoms (RFC 5246 §6.3, the TLS 1.2 PRF) and the SSL object is freed.
//! An established session then costs a few hundred bytes instead of OpenSSL's tens of kilobytes,
//! and each record is one AEAD call with no BIO in between. Only AEAD suites are offloaded:
//! AES-GCM (explicit 8-byte nonce, RFC 5288) and ChaCha20-Poly1305 (nonce from the sequence
//! number, RFC 7905); a session on any other suite stays with OpenSSL.
//!
//! Incoming records are checked against a 64-record anti-replay window (RFC 6347 §4.1.2.6).

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};

use super::record::{self, APPLICATION_DATA, HEADER};

/// The AEAD suites Ferry protects records for itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Suite {
    /// The suite of an OpenSSL cipher name, when Ferry can take it over.
    pub fn from_openssl(name: &str) -> Option<Self> {
        match name {
            "PSK-AES128-GCM-SHA256" => Some(Self::Aes128Gcm),
            "PSK-AES256-GCM-SHA384" => Some(Self::Aes256Gcm),
            "PSK-CHACHA20-POLY1305" => Some(Self::Chacha20Poly1305),
            _ => None,
        }
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Self::Aes128Gcm => &aead::AES_128_GCM,
            Self::Aes256Gcm => &aead::AES_256_GCM,
            Self::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    fn key_len(self) -> usize {
        self.algorithm().key_len()
    }

    /// The implicit IV bytes from the key block (the salt for GCM, the whole IV for ChaCha).
    fn fixed_iv_len(self) -> usize {
        match self {
            Self::Aes128Gcm | Self::Aes256Gcm => 4,
            Self::Chacha20Poly1305 => 12,
        }
    }

    /// Bytes between the record header and the ciphertext.
    fn explicit_nonce_len(self) -> usize {
        match self {
            Self::Aes128Gcm | Self::Aes256Gcm => 8,
            Self::Chacha20Poly1305 => 0,
        }
    }

    /// Record overhead: header, explicit nonce, tag.
    pub fn overhead(self) -> usize {
        HEADER + self.explicit_nonce_len() + 16
    }

    fn sha384(self) -> bool {
        self == Self::Aes256Gcm
    }
}

/// The TLS 1.2 PRF: P_SHA256, or P_SHA384 for SHA-384 suites.
fn prf(sha384: bool, secret: &[u8], label: &[u8], seed: &[u8], out: &mut [u8]) {
    use hmac::{Mac, SimpleHmac};
    fn p_hash<D: sha2::Digest + hmac::digest::core_api::BlockSizeUser + Clone>(
        secret: &[u8],
        seed: &[&[u8]],
        out: &mut [u8],
    ) {
        let mac = |parts: &[&[u8]]| {
            let mut m = <SimpleHmac<D> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
            for p in parts {
                m.update(p);
            }
            m.finalize().into_bytes().to_vec()
        };
        let mut a = mac(seed);
        let mut at = 0;
        while at < out.len() {
            let mut parts: Vec<&[u8]> = vec![&a];
            parts.extend_from_slice(seed);
            let block = mac(&parts);
            let n = block.len().min(out.len() - at);
            out[at..at + n].copy_from_slice(&block[..n]);
            at += n;
            a = mac(&[&a]);
        }
    }
    if sha384 {
        p_hash::<sha2::Sha384>(secret, &[label, seed], out);
    } else {
        p_hash::<sha2::Sha256>(secret, &[label, seed], out);
    }
}

/// One direction's key, implicit IV and sequence state.
struct Direction {
    key: LessSafeKey,
    iv: [u8; 12],
}

impl Direction {
    fn nonce(&self, suite: Suite, seq: u64, explicit: Option<&[u8]>) -> Nonce {
        let mut n = self.iv;
        match (suite, explicit) {
            (Suite::Chacha20Poly1305, _) => {
                for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
                    *b ^= s;
                }
            }
            (_, Some(e)) => n[4..].copy_from_slice(e),
            (_, None) => n[4..].copy_from_slice(&seq.to_be_bytes()),
        }
        Nonce::assume_unique_for_key(n)
    }
}

/// Why an incoming record was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not epoch 1, too short, or not an application-data/alert record.
    Unexpected,
    /// Seen before, or older than the window.
    Replayed,
    /// The tag did not verify.
    Forged,
}

/// An established session's record layer (epoch 1).
pub struct Records {
    suite: Suite,
    read: Direction,
    write: Direction,
    /// The next sequence number to send (the server's Finished used 0).
    write_seq: u64,
    /// Anti-replay: the highest sequence number accepted, and which of the 64 below it were.
    top: u64,
    window: u64,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records").field("suite", &self.suite).field("write_seq", &self.write_seq).finish()
    }
}

/// A decrypted record: its content type and plaintext length (the plaintext is in the caller's
/// buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub content_type: u8,
    pub len: usize,
}

const EPOCH: u16 = 1;
const MAX_SEQ: u64 = (1 << 48) - 1;

impl Records {
    /// The server side's record layer from the handshake's secrets.
    pub fn server(
        suite: Suite,
        master: &[u8],
        client_random: &[u8; 32],
        server_random: &[u8; 32],
    ) -> Option<Self> {
        let (k, iv) = (suite.key_len(), suite.fixed_iv_len());
        let mut block = [0u8; 2 * 32 + 2 * 12];
        let block = &mut block[..2 * (k + iv)];
        let mut seed = [0u8; 64];
        seed[..32].copy_from_slice(server_random);
        seed[32..].copy_from_slice(client_random);
        prf(suite.sha384(), master, b"key expansion", &seed, block);
        let dir = |key: &[u8], fixed: &[u8]| -> Option<Direction> {
            let key = LessSafeKey::new(UnboundKey::new(suite.algorithm(), key).ok()?);
            let mut iv = [0u8; 12];
            iv[..fixed.len()].copy_from_slice(fixed);
            Some(Direction { key, iv })
        };
        let (client_key, rest) = block.split_at(k);
        let (server_key, rest) = rest.split_at(k);
        let (client_iv, server_iv) = rest.split_at(iv);
        Some(Self {
            suite,
            read: dir(client_key, client_iv)?,
            write: dir(server_key, server_iv)?,
            write_seq: 1,
            top: 0,
            window: 1,
        })
    }

    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// Largest plaintext that fits a datagram of `mtu` bytes.
    pub fn max_plaintext(&self, mtu: usize) -> usize {
        mtu.saturating_sub(self.suite.overhead())
    }

    /// Decrypts one record into `out`.
    pub fn open(&mut self, r: &record::Record<'_>, out: &mut [u8]) -> Result<Opened, Refused> {
        if r.epoch != EPOCH || !(r.content_type == APPLICATION_DATA || r.content_type == record::ALERT) {
            return Err(Refused::Unexpected);
        }
        let seq = r.seq;
        if seq + 64 <= self.top || (seq <= self.top && self.window & (1 << (self.top - seq)) != 0) {
            return Err(Refused::Replayed);
        }
        let en = self.suite.explicit_nonce_len();
        let frag = r.fragment;
        if frag.len() < en + 16 || frag.len() - en > out.len() {
            return Err(Refused::Unexpected);
        }
        let (explicit, sealed) = frag.split_at(en);
        let plain_len = sealed.len() - 16;
        let nonce = self.read.nonce(self.suite, (EPOCH as u64) << 48 | seq, (en > 0).then_some(explicit));
        let aad = aad(EPOCH, seq, r.content_type, plain_len);
        let buf = &mut out[..sealed.len()];
        buf.copy_from_slice(sealed);
        self.read.key.open_in_place(nonce, Aad::from(aad), buf).map_err(|_| Refused::Forged)?;
        if seq > self.top {
            let shift = seq - self.top;
            self.window = if shift >= 64 { 1 } else { (self.window << shift) | 1 };
            self.top = seq;
        } else {
            self.window |= 1 << (self.top - seq);
        }
        Ok(Opened { content_type: r.content_type, len: plain_len })
    }

    /// Encrypts `msg` as one application-data record into `out`; returns its length, or `None`
    /// when `out` is too small or the sequence space is spent.
    pub fn seal(&mut self, msg: &[u8], out: &mut [u8]) -> Option<usize> {
        let en = self.suite.explicit_nonce_len();
        let total = HEADER + en + msg.len() + 16;
        if total > out.len() || self.write_seq > MAX_SEQ {
            return None;
        }
        let seq = self.write_seq;
        self.write_seq += 1;
        let full = (EPOCH as u64) << 48 | seq;
        out[0] = APPLICATION_DATA;
        out[1..3].copy_from_slice(&[0xFE, 0xFD]);
        out[3..11].copy_from_slice(&full.to_be_bytes());
        out[11..13].copy_from_slice(&((en + msg.len() + 16) as u16).to_be_bytes());
        if en > 0 {
            out[HEADER..HEADER + en].copy_from_slice(&full.to_be_bytes());
        }
        let body = HEADER + en;
        out[body..body + msg.len()].copy_from_slice(msg);
        let nonce = self.write.nonce(self.suite, full, None);
        let tag = self
            .write
            .key
            .seal_in_place_separate_tag(
                nonce,
                Aad::from(aad(EPOCH, seq, APPLICATION_DATA, msg.len())),
                &mut out[body..body + msg.len()],
            )
            .ok()?;
        out[body + msg.len()..total].copy_from_slice(tag.as_ref());
        Some(total)
    }
}

fn aad(epoch: u16, seq: u64, content_type: u8, len: usize) -> [u8; 13] {
    let mut a = [0u8; 13];
    a[..8].copy_from_slice(&((epoch as u64) << 48 | seq).to_be_bytes());
    a[8] = content_type;
    a[9..11].copy_from_slice(&[0xFE, 0xFD]);
    a[11..13].copy_from_slice(&(len as u16).to_be_bytes());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5246's PRF with SHA-256: the widely used test vector (label "test label").
    #[test]
    fn prf_sha256_matches_the_known_vector() {
        let secret = hex("9bbe436ba940f017b17652849a71db35");
        let seed = hex("a0ba9f936cda311827a6f796ffd5198c");
        let mut out = [0u8; 100];
        prf(false, &secret, b"test label", &seed, &mut out);
        assert_eq!(
            &out[..16],
            &hex("e3f229ba727be17b8d122620557cd453")[..],
            "first bytes of the published P_SHA256 output"
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn replayed_and_forged_records_are_refused() {
        let mut r = Records::server(Suite::Aes128Gcm, &[1; 48], &[2; 32], &[3; 32]).unwrap();
        // A client-side twin: its write keys are the server's read keys.
        let mut c = Records::server(Suite::Aes128Gcm, &[1; 48], &[2; 32], &[3; 32]).unwrap();
        std::mem::swap(&mut c.read, &mut c.write);
        let mut d = [0u8; 200];
        let n = c.seal(b"hello", &mut d).unwrap();
        let mut out = [0u8; 200];
        let rec = record::Records::new(&d[..n]).next().unwrap();
        assert_eq!(r.open(&rec, &mut out), Ok(Opened { content_type: APPLICATION_DATA, len: 5 }));
        assert_eq!(&out[..5], b"hello");
        assert_eq!(r.open(&rec, &mut out), Err(Refused::Replayed));
        let m = c.seal(b"again", &mut d).unwrap();
        d[m - 1] ^= 1;
        let rec = record::Records::new(&d[..m]).next().unwrap();
        assert_eq!(r.open(&rec, &mut out), Err(Refused::Forged));
    }
}
