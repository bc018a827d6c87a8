//! DTLS record-layer views: just enough to demultiplex and to act before OpenSSL sees a datagram.
//!
//! A datagram may carry several records (RFC 6347 §4.1): `type(1) version(2) epoch(2)
//! sequence(6) length(2) fragment`. Only epoch-0 handshake records are ever read here (they are
//! cleartext): to tell a ClientHello (which may open a session) from everything else, and to read
//! the PSK identity out of a ClientKeyExchange so the key can be found before the handshake needs
//! it. Nothing here allocates or panics on any input.

/// Record content types Ferry accepts on the relay port (RFC 6347: 20–23; 24 heartbeat, 25 tls12_cid).
pub const CHANGE_CIPHER_SPEC: u8 = 20;
pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;

/// Bytes of a DTLS record header.
pub const HEADER: usize = 13;
/// Bytes of a DTLS handshake message header (type, length, message_seq, fragment offset/length).
const HS_HEADER: usize = 12;
const CLIENT_HELLO: u8 = 1;
const CLIENT_KEY_EXCHANGE: u8 = 16;

/// Whether a datagram's first byte makes it a DTLS record (`design.md` §6: 20–63 on the relay
/// port); only 20–23 are accepted, the rest is counted as bad.
#[inline]
pub fn is_dtls(d: &[u8]) -> bool {
    matches!(d.first(), Some(20..=63))
}

/// One record: its content type, epoch and fragment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub content_type: u8,
    pub version: u16,
    pub epoch: u16,
    /// The 48-bit sequence number within the epoch.
    pub seq: u64,
    pub fragment: &'a [u8],
}

/// The records of a datagram, in order. Stops at the first malformed one (`malformed()` then says so).
pub struct Records<'a> {
    rest: &'a [u8],
    bad: bool,
}

impl<'a> Records<'a> {
    pub fn new(d: &'a [u8]) -> Self {
        Self { rest: d, bad: false }
    }

    /// Whether iteration stopped on a malformed record rather than at the end.
    pub fn malformed(&self) -> bool {
        self.bad
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Record<'a>;
    fn next(&mut self) -> Option<Record<'a>> {
        if self.rest.is_empty() || self.bad {
            return None;
        }
        let h = match self.rest.get(..HEADER) {
            Some(h) => h,
            None => {
                self.bad = true;
                return None;
            }
        };
        let len = u16::from_be_bytes([h[11], h[12]]) as usize;
        let Some(fragment) = self.rest.get(HEADER..HEADER + len) else {
            self.bad = true;
            return None;
        };
        let r = Record {
            content_type: h[0],
            version: u16::from_be_bytes([h[1], h[2]]),
            epoch: u16::from_be_bytes([h[3], h[4]]),
            seq: u64::from_be_bytes([0, 0, h[5], h[6], h[7], h[8], h[9], h[10]]),
            fragment,
        };
        self.rest = &self.rest[HEADER + len..];
        Some(r)
    }
}

/// Whether every record of `d` is well formed, has a known content type and a DTLS version
/// (1.0 `FE FF` in a first ClientHello, 1.2 `FE FD`).
pub fn well_formed(d: &[u8]) -> bool {
    let mut rs = Records::new(d);
    let mut any = false;
    for r in rs.by_ref() {
        if !(CHANGE_CIPHER_SPEC..=APPLICATION_DATA).contains(&r.content_type)
            || !(r.version == 0xFEFF || r.version == 0xFEFD)
        {
            return false;
        }
        any = true;
    }
    any && !rs.malformed()
}

/// Epoch-0 handshake messages in `d` (complete, unfragmented ones), as (type, body).
fn handshakes(d: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    Records::new(d).filter(|r| r.content_type == HANDSHAKE && r.epoch == 0).filter_map(|r| {
        let h = r.fragment.get(..HS_HEADER)?;
        let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
        let frag_off = u32::from_be_bytes([0, h[6], h[7], h[8]]) as usize;
        let frag_len = u32::from_be_bytes([0, h[9], h[10], h[11]]) as usize;
        if frag_off != 0 || frag_len != len {
            return None;
        }
        Some((h[0], r.fragment.get(HS_HEADER..HS_HEADER + len)?))
    })
}

/// Whether `d` opens with a ClientHello (epoch 0): the only thing that may start a session.
pub fn is_client_hello(d: &[u8]) -> bool {
    match Records::new(d).next() {
        Some(r) => r.content_type == HANDSHAKE && r.epoch == 0 && r.fragment.first() == Some(&CLIENT_HELLO),
        None => false,
    }
}

/// The cookie of a ClientHello that opens `d` (complete, unfragmented, epoch 0), with the
/// record's epoch and sequence bytes (echoed in a HelloVerifyRequest). `None` for anything else.
pub fn client_hello_cookie(d: &[u8]) -> Option<([u8; 8], &[u8])> {
    let r = Records::new(d).next()?;
    if r.content_type != HANDSHAKE || r.epoch != 0 {
        return None;
    }
    let h = r.fragment.get(..HS_HEADER)?;
    let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
    let (off, frag) =
        (u32::from_be_bytes([0, h[6], h[7], h[8]]), u32::from_be_bytes([0, h[9], h[10], h[11]]));
    if h[0] != CLIENT_HELLO || off != 0 || frag as usize != len {
        return None;
    }
    let body = r.fragment.get(HS_HEADER..HS_HEADER + len)?;
    // client_version(2) random(32) session_id<0..32> cookie<0..255>
    let sid = *body.get(34)? as usize;
    let at = 35 + sid;
    let n = *body.get(at)? as usize;
    let cookie = body.get(at + 1..at + 1 + n)?;
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&d[3..11]);
    Some((seq, cookie))
}

/// Writes a HelloVerifyRequest (RFC 6347 §4.2.1) carrying `cookie` into `out`, as OpenSSL
/// writes one: version 1.0 in the record and the message, the ClientHello's record sequence
/// echoed, message_seq 0. Returns its length.
pub fn hello_verify_request(seq: &[u8; 8], cookie: &[u8], out: &mut Vec<u8>) -> usize {
    let body = 3 + cookie.len();
    out.clear();
    out.extend_from_slice(&[HANDSHAKE, 0xFE, 0xFF]);
    out.extend_from_slice(seq);
    out.extend_from_slice(&((HS_HEADER + body) as u16).to_be_bytes());
    let l = (body as u32).to_be_bytes();
    out.extend_from_slice(&[
        3,
        l[1],
        l[2],
        l[3],
        0,
        0,
        0,
        0,
        0,
        l[1],
        l[2],
        l[3],
        0xFE,
        0xFF,
        cookie.len() as u8,
    ]);
    out.extend_from_slice(cookie);
    out.len()
}

/// The PSK identity a ClientKeyExchange in `d` carries (`u16 length ‖ identity`, RFC 4279 §2),
/// read whole (OpenSSL would cut it at a zero byte).
pub fn psk_identity(d: &[u8]) -> Option<&[u8]> {
    handshakes(d).find(|(t, _)| *t == CLIENT_KEY_EXCHANGE).and_then(|(_, body)| {
        let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
        body.get(2..2 + n)
    })
}

/// The allocation an identity names: the 16 raw ID bytes (what Unity Transport sends), or the
/// UUID's text form, with or without hyphens (what Unity's documentation describes).
pub fn identity_id(identity: &[u8]) -> Option<crate::wire::AllocationId> {
    if let Ok(raw) = <[u8; 16]>::try_from(identity) {
        return Some(crate::wire::AllocationId(raw));
    }
    let s = std::str::from_utf8(identity).ok()?;
    uuid::Uuid::try_parse(s).ok().map(|u| crate::wire::AllocationId(*u.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ct: u8, epoch: u16, body: &[u8]) -> Vec<u8> {
        let mut v = vec![ct, 0xFE, 0xFD];
        v.extend_from_slice(&epoch.to_be_bytes());
        v.extend_from_slice(&[0; 6]);
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn handshake(t: u8, body: &[u8]) -> Vec<u8> {
        let l = (body.len() as u32).to_be_bytes();
        let mut v = vec![t, l[1], l[2], l[3], 0, 0, 0, 0, 0, l[1], l[2], l[3]];
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn reads_the_whole_identity_even_with_zero_bytes() {
        let id = [0xAB, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 0];
        let mut body = vec![0, 16];
        body.extend_from_slice(&id);
        let mut d = record(HANDSHAKE, 0, &handshake(CLIENT_KEY_EXCHANGE, &body));
        d.extend(record(CHANGE_CIPHER_SPEC, 0, &[1]));
        d.extend(record(HANDSHAKE, 1, &[9; 40]));
        assert!(well_formed(&d));
        assert_eq!(psk_identity(&d), Some(&id[..]));
        assert_eq!(identity_id(&id).map(|a| a.0), Some(id));
        assert!(!is_client_hello(&d));
    }

    #[test]
    fn accepts_the_text_form_of_an_id() {
        let text = b"6f0b4c2e-9a51-4d7e-8a3b-1c2d3e4f5a6b";
        let id = identity_id(text).unwrap();
        assert_eq!(id.to_string(), "6f0b4c2e-9a51-4d7e-8a3b-1c2d3e4f5a6b");
        assert!(identity_id(b"not an id").is_none());
    }

    #[test]
    fn truncated_and_unknown_records_are_not_well_formed() {
        let d = record(HANDSHAKE, 0, &handshake(CLIENT_HELLO, &[0; 30]));
        assert!(is_client_hello(&d));
        assert!(well_formed(&d));
        assert!(!well_formed(&d[..d.len() - 1]));
        assert!(!well_formed(&record(24, 0, &[1, 2])));
        assert!(!well_formed(&[]));
        assert!(psk_identity(&d[..5]).is_none());
    }
}
