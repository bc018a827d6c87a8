//! STUN Binding (RFC 8489) on the relay port: a checked view of a Binding request and the
//! emitter of its success response, written in place over the request.
//!
//! Only what a reflexive-address query needs: a request is accepted when its header is
//! well formed (first two bits 0, magic cookie, length a multiple of 4 and equal to the
//! attributes' total), its type is Binding request, every attribute fits, no
//! comprehension-required attribute is one this responder does not understand, and a
//! FINGERPRINT, if any, is last and correct. The response carries XOR-MAPPED-ADDRESS of the
//! observed source, plus FINGERPRINT when the request had one; nothing else is ever sent (no
//! error responses, no RFC 3489 CHANGE-REQUEST or RESPONSE-ADDRESS behaviour).

use std::net::SocketAddr;

/// STUN's magic cookie, bytes 4..8 of every message.
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// Header bytes.
pub const HEADER_LEN: usize = 20;
/// Largest request answered (the size RFC 8489 lets clients assume fits any path).
pub const MAX_REQUEST: usize = 548;
/// Largest response: header, IPv6 XOR-MAPPED-ADDRESS, FINGERPRINT.
pub const MAX_RESPONSE: usize = HEADER_LEN + 24 + 8;

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
const FINGERPRINT: u16 = 0x8028;
const FINGERPRINT_XOR: u32 = 0x5354_554e;
const CHANGE_REQUEST: u16 = 0x0003;

/// Comprehension-required attributes a Binding request may carry that change nothing in the
/// answer: USERNAME, MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256, PRIORITY, USE-CANDIDATE,
/// USERHASH, PASSWORD-ALGORITHM(S) (ICE checks and authenticated clients; the reflexive address
/// is the same either way).
const UNDERSTOOD: [u16; 7] = [0x0006, 0x0008, 0x001C, 0x0024, 0x0025, 0x001E, 0x001D];

/// Why a datagram that looks like STUN is not answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StunError {
    /// Bad header or attribute layout.
    Malformed,
    /// A well-formed message that is not a Binding request (responses, indications, other methods).
    NotBindingRequest,
    /// A comprehension-required attribute this responder does not understand, or a
    /// CHANGE-REQUEST that asks for another address or port.
    UnknownAttribute,
    /// A FINGERPRINT that is not last or does not match.
    BadFingerprint,
}

/// Whether a datagram is STUN by its first bytes (RFC 7983 demultiplexing): top two bits 0,
/// the magic cookie at bytes 4..8, at least a header long.
#[inline]
pub fn is_stun(b: &[u8]) -> bool {
    b.len() >= HEADER_LEN && b[0] & 0xC0 == 0 && b[4..8] == MAGIC_COOKIE
}

/// A checked Binding request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindingRequest {
    pub transaction_id: [u8; 12],
    pub fingerprint: bool,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

impl BindingRequest {
    /// Checks `b` (one whole datagram). No accessor can panic afterwards.
    pub fn parse(b: &[u8]) -> Result<Self, StunError> {
        if !is_stun(b) || b.len() > MAX_REQUEST || !b.len().is_multiple_of(4) {
            return Err(StunError::Malformed);
        }
        if u16_at(b, 2) as usize != b.len() - HEADER_LEN {
            return Err(StunError::Malformed);
        }
        // Walk the attributes first: a bad layout is malformed whatever the type.
        let mut i = HEADER_LEN;
        let mut fingerprint = false;
        let mut unknown = false;
        while i < b.len() {
            if fingerprint {
                return Err(StunError::BadFingerprint);
            }
            if i + 4 > b.len() {
                return Err(StunError::Malformed);
            }
            let (kind, len) = (u16_at(b, i), u16_at(b, i + 2) as usize);
            let value = i + 4;
            let end = value + len.div_ceil(4) * 4;
            if end > b.len() {
                return Err(StunError::Malformed);
            }
            match kind {
                FINGERPRINT => {
                    if len != 4 {
                        return Err(StunError::Malformed);
                    }
                    let want = crc32(&b[..i]) ^ FINGERPRINT_XOR;
                    let got = u32::from_be_bytes([b[value], b[value + 1], b[value + 2], b[value + 3]]);
                    if want != got {
                        return Err(StunError::BadFingerprint);
                    }
                    fingerprint = true;
                }
                // Only "no change" is answerable from one address and port.
                CHANGE_REQUEST if len != 4 || b[value..value + 4] != [0; 4] => unknown = true,
                CHANGE_REQUEST => {}
                k if k < 0x8000 && !UNDERSTOOD.contains(&k) => unknown = true,
                _ => {}
            }
            i = end;
        }
        if u16_at(b, 0) != BINDING_REQUEST {
            return Err(StunError::NotBindingRequest);
        }
        if unknown {
            return Err(StunError::UnknownAttribute);
        }
        let mut transaction_id = [0u8; 12];
        transaction_id.copy_from_slice(&b[8..20]);
        Ok(Self { transaction_id, fingerprint })
    }

    /// Length of the success response for a source of this family.
    pub fn response_len(&self, observed: &SocketAddr) -> usize {
        let addr = if observed.is_ipv4() { 12 } else { 24 };
        HEADER_LEN + addr + if self.fingerprint { 8 } else { 0 }
    }

    /// Writes the success response (XOR-MAPPED-ADDRESS of `observed`, FINGERPRINT if the
    /// request had one) into `out`; returns its length, or `None` if `out` is too short.
    pub fn emit_response(&self, observed: &SocketAddr, out: &mut [u8]) -> Option<usize> {
        let len = self.response_len(observed);
        let out = out.get_mut(..len)?;
        out[0..2].copy_from_slice(&BINDING_SUCCESS.to_be_bytes());
        out[2..4].copy_from_slice(&((len - HEADER_LEN) as u16).to_be_bytes());
        out[4..8].copy_from_slice(&MAGIC_COOKIE);
        out[8..20].copy_from_slice(&self.transaction_id);
        let port = observed.port() ^ 0x2112;
        let (family, addr_len) = if observed.is_ipv4() { (1u8, 4usize) } else { (2u8, 16usize) };
        out[20..22].copy_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
        out[22..24].copy_from_slice(&((4 + addr_len) as u16).to_be_bytes());
        out[24] = 0;
        out[25] = family;
        out[26..28].copy_from_slice(&port.to_be_bytes());
        match observed {
            SocketAddr::V4(a) => {
                for (k, b) in a.ip().octets().iter().enumerate() {
                    out[28 + k] = b ^ MAGIC_COOKIE[k];
                }
            }
            SocketAddr::V6(a) => {
                let mut key = [0u8; 16];
                key[..4].copy_from_slice(&MAGIC_COOKIE);
                key[4..].copy_from_slice(&self.transaction_id);
                for (k, b) in a.ip().octets().iter().enumerate() {
                    out[28 + k] = b ^ key[k];
                }
            }
        }
        if self.fingerprint {
            let at = 28 + addr_len;
            out[at..at + 2].copy_from_slice(&FINGERPRINT.to_be_bytes());
            out[at + 2..at + 4].copy_from_slice(&4u16.to_be_bytes());
            let crc = crc32(&out[..at]) ^ FINGERPRINT_XOR;
            out[at + 4..at + 8].copy_from_slice(&crc.to_be_bytes());
        }
        Some(len)
    }
}

/// A Binding request with this transaction ID and no attributes (the client side: what a tunnel
/// or the SDK sends to the relay port to learn its reflexive address).
pub fn binding_request(transaction_id: [u8; 12]) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[0..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE);
    out[8..20].copy_from_slice(&transaction_id);
    out
}

/// The XOR-MAPPED-ADDRESS of a Binding success response to `transaction_id`, if `b` is one.
pub fn mapped_address(b: &[u8], transaction_id: &[u8; 12]) -> Option<SocketAddr> {
    if b.len() < HEADER_LEN || b[0..2] != BINDING_SUCCESS.to_be_bytes() || b[4..8] != MAGIC_COOKIE {
        return None;
    }
    if &b[8..20] != transaction_id {
        return None;
    }
    let len = u16::from_be_bytes([b[2], b[3]]) as usize;
    let attrs = b.get(HEADER_LEN..HEADER_LEN + len)?;
    let mut at = 0;
    while at + 4 <= attrs.len() {
        let ty = u16::from_be_bytes([attrs[at], attrs[at + 1]]);
        let n = u16::from_be_bytes([attrs[at + 2], attrs[at + 3]]) as usize;
        let v = attrs.get(at + 4..at + 4 + n)?;
        if ty == XOR_MAPPED_ADDRESS && v.len() >= 8 {
            let port = u16::from_be_bytes([v[2], v[3]]) ^ 0x2112;
            return match (v[1], v.len()) {
                (1, 8) => {
                    let mut ip = [0u8; 4];
                    for k in 0..4 {
                        ip[k] = v[4 + k] ^ MAGIC_COOKIE[k];
                    }
                    Some(SocketAddr::from((ip, port)))
                }
                (2, 20) => {
                    let mut key = [0u8; 16];
                    key[..4].copy_from_slice(&MAGIC_COOKIE);
                    key[4..].copy_from_slice(transaction_id);
                    let mut ip = [0u8; 16];
                    for k in 0..16 {
                        ip[k] = v[4 + k] ^ key[k];
                    }
                    Some(SocketAddr::from((ip, port)))
                }
                _ => None,
            };
        }
        at += 4 + n.div_ceil(4) * 4;
    }
    None
}

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32 (ITU V.42, as zlib) for FINGERPRINT.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn client_request_and_response_round_trip() {
        let tx = [9u8; 12];
        for observed in ["203.0.113.7:40112".parse().unwrap(), "[2001:db8::5]:9".parse().unwrap()] {
            let req = binding_request(tx);
            let r = BindingRequest::parse(&req).unwrap();
            let mut out = [0u8; MAX_RESPONSE];
            let n = r.emit_response(&observed, &mut out).unwrap();
            assert_eq!(mapped_address(&out[..n], &tx), Some(observed));
            assert_eq!(mapped_address(&out[..n], &[8; 12]), None, "another transaction");
            assert_eq!(mapped_address(&req, &tx), None, "a request is no response");
        }
    }

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    /// RFC 5769 §2.1 sample request (SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME,
    /// MESSAGE-INTEGRITY, FINGERPRINT).
    const RFC5769_REQUEST: &str = "00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
        00 24 00 04 6e 00 01 ff 80 29 00 08 93 2f f9 b1 51 26 3b 36
        00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20 00 08 00 14
        9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
        80 28 00 04 e5 7a 3b cf";

    #[test]
    fn rfc5769_request_is_answered_with_its_transaction_id() {
        let req = hex(RFC5769_REQUEST);
        let r = BindingRequest::parse(&req).unwrap();
        assert!(r.fingerprint);
        assert_eq!(r.transaction_id.to_vec(), hex("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae"));
    }

    /// RFC 5769 §2.2 and §2.3: the XOR-MAPPED-ADDRESS bytes of 192.0.2.1:32853 and
    /// [2001:db8:1234:5678:11:2233:4455:6677]:32853 under that transaction ID.
    #[test]
    fn rfc5769_mapped_addresses() {
        let r = BindingRequest {
            transaction_id: hex("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae").try_into().unwrap(),
            fingerprint: true,
        };
        let mut out = [0u8; MAX_RESPONSE];
        let n = r.emit_response(&"192.0.2.1:32853".parse().unwrap(), &mut out).unwrap();
        assert_eq!(n, 40);
        assert_eq!(&out[20..32], &hex("00 20 00 08 00 01 a1 47 e1 12 a6 43")[..]);
        assert_eq!(
            BindingRequest::parse(&{
                let mut v = out[..n].to_vec();
                v[0..2].copy_from_slice(&[0, 1]);
                v
            })
            .map(|r| r.fingerprint),
            Err(StunError::BadFingerprint),
            "the CRC covers the type"
        );
        let v6: SocketAddr = "[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().unwrap();
        let n = r.emit_response(&v6, &mut out).unwrap();
        assert_eq!(n, 52);
        assert_eq!(
            &out[20..44],
            &hex("00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9")[..]
        );
        // The FINGERPRINT we write verifies under the same rule we check.
        let want = crc32(&out[..44]) ^ FINGERPRINT_XOR;
        assert_eq!(u32::from_be_bytes(out[48..52].try_into().unwrap()), want);
    }

    #[test]
    fn only_well_formed_binding_requests() {
        let mut bare = vec![0u8; 20];
        bare[1] = 1;
        bare[4..8].copy_from_slice(&MAGIC_COOKIE);
        assert!(BindingRequest::parse(&bare).is_ok());
        let mut indication = bare.clone();
        indication[1] = 0x11;
        assert_eq!(BindingRequest::parse(&indication), Err(StunError::NotBindingRequest));
        let mut response = bare.clone();
        response[0] = 1;
        assert_eq!(BindingRequest::parse(&response), Err(StunError::NotBindingRequest));
        let mut bad_len = bare.clone();
        bad_len[3] = 4;
        assert_eq!(BindingRequest::parse(&bad_len), Err(StunError::Malformed));
        // An unknown comprehension-required attribute (0x7777) is not answered; an unknown
        // optional one (0xC001) is ignored.
        for (kind, want) in [(0x7777u16, Err(StunError::UnknownAttribute)), (0xC001, Ok(()))] {
            let mut m = bare.clone();
            m[3] = 8;
            m.extend_from_slice(&kind.to_be_bytes());
            m.extend_from_slice(&[0, 4, 1, 2, 3, 4]);
            assert_eq!(BindingRequest::parse(&m).map(|_| ()), want, "{kind:#x}");
        }
        // CHANGE-REQUEST asking for another port: not answerable here.
        let mut change = bare.clone();
        change[3] = 8;
        change.extend_from_slice(&[0, 3, 0, 4, 0, 0, 0, 2]);
        assert_eq!(BindingRequest::parse(&change), Err(StunError::UnknownAttribute));
        // Unity's signature and DTLS never look like STUN.
        assert!(!is_stun(&[0xDA, 0x72, 0, 0, 0x21, 0x12, 0xA4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
        assert!(!is_stun(&[22; 40]));
    }
}
