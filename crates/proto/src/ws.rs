//! The WebSocket protocol (RFC 6455) as Unity Transport's `ws`/`wss` clients and browsers speak
//! it to a relay: the relay's side, and the SDK's client side. Sans-IO: bytes in, frames and
//! answers out.
//!
//! - The upgrade: `GET <any path> HTTP/1.1` with `Upgrade: websocket`, `Connection: upgrade`,
//!   `Sec-WebSocket-Version: 13` and a key. The 101 names no subprotocol and no extension (Unity's
//!   client rejects one that does), whatever the client offered.
//! - One Relay message is one binary message. Client frames must be masked; server frames are
//!   not. Text frames, reserved bits, unknown opcodes, fragmented or oversize control frames and
//!   messages over [`MAX_MESSAGE`] end the connection with a close code.
//! - Pings are answered with pongs; a close is answered with a close.

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Largest Relay message accepted from a WebSocket client (Relay's own datagram limit).
pub const MAX_MESSAGE: usize = crate::wire::MAX_DATAGRAM;
/// Largest Relay message sent to a WebSocket client: Unity Transport's native client aborts its
/// connection on anything larger (1400-byte receive buffers less 14 bytes of frame header).
pub const MAX_TO_CLIENT: usize = 1386;
/// Largest upgrade request head.
pub const MAX_HEAD: usize = 4096;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Why an upgrade request was refused (answered with `400` and this text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpgradeError {
    /// The head is not complete yet.
    Incomplete,
    TooLarge,
    NotGet,
    NotHttp11,
    NoUpgrade,
    BadVersion,
    BadKey,
}

impl UpgradeError {
    pub fn detail(self) -> &'static str {
        match self {
            Self::Incomplete => "incomplete request",
            Self::TooLarge => "request head over 4 KiB",
            Self::NotGet => "a WebSocket upgrade is a GET",
            Self::NotHttp11 => "HTTP/1.1 is required",
            Self::NoUpgrade => "Upgrade: websocket and Connection: upgrade are required",
            Self::BadVersion => "Sec-WebSocket-Version: 13 is required",
            Self::BadKey => "Sec-WebSocket-Key must be 16 bytes in base64",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Incomplete => "incomplete",
            Self::TooLarge => "too_large",
            Self::NotGet => "not_get",
            Self::NotHttp11 => "not_http11",
            Self::NoUpgrade => "no_upgrade",
            Self::BadVersion => "bad_version",
            Self::BadKey => "bad_key",
        }
    }
}

/// Reads an upgrade request from the start of `buf`. On success returns the head's length and
/// the 101 answer to send.
pub fn accept_upgrade(buf: &[u8]) -> Result<(usize, String), UpgradeError> {
    let end = match buf.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(p) => p + 4,
        None if buf.len() >= MAX_HEAD => return Err(UpgradeError::TooLarge),
        None => return Err(UpgradeError::Incomplete),
    };
    if end > MAX_HEAD {
        return Err(UpgradeError::TooLarge);
    }
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| UpgradeError::NotGet)?;
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or_default();
    let mut parts = request.split(' ');
    if parts.next() != Some("GET") || parts.next().is_none_or(|p| p.is_empty()) {
        return Err(UpgradeError::NotGet);
    }
    if parts.next() != Some("HTTP/1.1") {
        return Err(UpgradeError::NotHttp11);
    }
    let (mut upgrade, mut connection, mut version, mut key) = (false, false, false, None);
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "upgrade" => upgrade = value.eq_ignore_ascii_case("websocket"),
            "connection" => connection = value.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")),
            "sec-websocket-version" => version = value == "13",
            "sec-websocket-key" => key = Some(value),
            _ => {}
        }
    }
    if !upgrade || !connection {
        return Err(UpgradeError::NoUpgrade);
    }
    if !version {
        return Err(UpgradeError::BadVersion);
    }
    let key = key.ok_or(UpgradeError::BadKey)?;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(k) if k.len() == 16 => {}
        _ => return Err(UpgradeError::BadKey),
    }
    let accept = base64::engine::general_purpose::STANDARD
        .encode(Sha1::new().chain_update(key).chain_update(GUID).finalize());
    Ok((
        end,
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        ),
    ))
}

/// The answer to a refused upgrade.
pub fn refuse_upgrade(e: UpgradeError) -> String {
    let body = e.detail();
    format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A complete frame (or reassembled message) read from a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A whole binary message.
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    /// The client closes, with this status code (1005 when it gave none).
    Close(u16),
}

/// Why a connection was ended by protocol error; the close code sent is [`Violation::code`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Text frames are not Relay messages.
    Text,
    Unmasked,
    ReservedBits,
    UnknownOpcode,
    BadControlFrame,
    TooBig,
    BadContinuation,
}

impl Violation {
    pub fn code(self) -> u16 {
        match self {
            Self::Text => 1003,
            Self::TooBig => 1009,
            _ => 1002,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text_frame",
            Self::Unmasked => "unmasked",
            Self::ReservedBits => "reserved_bits",
            Self::UnknownOpcode => "unknown_opcode",
            Self::BadControlFrame => "bad_control_frame",
            Self::TooBig => "too_big",
            Self::BadContinuation => "bad_continuation",
        }
    }
}

/// Reassembles frames from a byte stream: a relay's decoder takes only masked frames (a client
/// must mask), a client's only unmasked ones. Holds at most one message being reassembled.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Frames come from the server (unmasked), not from a client.
    from_server: bool,
    /// A fragmented binary message in progress.
    partial: Vec<u8>,
    fragmented: bool,
    /// The last frame's unmasked payload, returned by reference.
    payload: Vec<u8>,
}

impl Decoder {
    /// The decoder of a client (it reads the server's unmasked frames).
    pub fn client() -> Self {
        Self { from_server: true, ..Self::default() }
    }

    /// Reads one frame from the start of `buf`. `Ok(None)` when more bytes are needed; otherwise
    /// the bytes consumed and the frame, if it completed one (a non-final fragment completes
    /// nothing).
    pub fn decode(&mut self, buf: &[u8]) -> Result<Option<(usize, Option<Frame<'_>>)>, Violation> {
        let [b0, b1, ..] = *buf else { return Ok(None) };
        let (fin, rsv, opcode) = (b0 & 0x80 != 0, b0 & 0x70, b0 & 0x0F);
        if rsv != 0 {
            return Err(Violation::ReservedBits);
        }
        if (b1 & 0x80 == 0) != self.from_server {
            return Err(Violation::Unmasked);
        }
        let (len, mut at) = match b1 & 0x7F {
            126 => match buf.get(2..4) {
                Some(l) => (u16::from_be_bytes([l[0], l[1]]) as u64, 4),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(l) => (u64::from_be_bytes(l.try_into().unwrap_or([0xFF; 8])), 10),
                None => return Ok(None),
            },
            n => (n as u64, 2),
        };
        let control = opcode & 0x08 != 0;
        if control && (!fin || len > 125) {
            return Err(Violation::BadControlFrame);
        }
        if len > MAX_MESSAGE as u64 {
            return Err(Violation::TooBig);
        }
        let mut mask = [0u8; 4];
        if !self.from_server {
            let Some(m) = buf.get(at..at + 4) else { return Ok(None) };
            mask.copy_from_slice(m);
            at += 4;
        }
        let len = len as usize;
        let Some(data) = buf.get(at..at + len) else { return Ok(None) };
        self.payload.clear();
        self.payload.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        let used = at + len;
        let frame = match opcode {
            0x0 => {
                if !self.fragmented {
                    return Err(Violation::BadContinuation);
                }
                if self.partial.len() + len > MAX_MESSAGE {
                    return Err(Violation::TooBig);
                }
                self.partial.extend_from_slice(&self.payload);
                if !fin {
                    return Ok(Some((used, None)));
                }
                self.fragmented = false;
                std::mem::swap(&mut self.partial, &mut self.payload);
                self.partial.clear();
                Frame::Binary(&self.payload)
            }
            0x1 => return Err(Violation::Text),
            0x2 => {
                if self.fragmented {
                    return Err(Violation::BadContinuation);
                }
                if !fin {
                    self.fragmented = true;
                    self.partial.clear();
                    self.partial.extend_from_slice(&self.payload);
                    return Ok(Some((used, None)));
                }
                Frame::Binary(&self.payload)
            }
            0x8 => Frame::Close(match self.payload.get(..2) {
                Some(c) => u16::from_be_bytes([c[0], c[1]]),
                None => 1005,
            }),
            0x9 => Frame::Ping(&self.payload),
            0xA => Frame::Pong,
            _ => return Err(Violation::UnknownOpcode),
        };
        Ok(Some((used, Some(frame))))
    }

    /// Frees the reassembly buffers (an idle connection then holds none).
    pub fn shrink(&mut self) {
        if !self.fragmented {
            self.partial = Vec::new();
        }
        self.payload = Vec::new();
    }
}

/// Appends an unmasked server frame (`opcode` 0x2 binary, 0x8 close, 0xA pong).
pub fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(n as u8),
        n @ 126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Appends a client frame, masked with `mask` (RFC 6455 §5.3: a fresh unpredictable key per
/// frame).
pub fn encode_masked(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    let start = out.len();
    encode(out, opcode, payload);
    out[start + 1] |= 0x80;
    let at = out.len() - payload.len();
    out.splice(at..at, mask);
    for (i, b) in out[at + 4..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// A client's upgrade request, byte for byte what Unity Transport's native client sends.
pub fn upgrade_request(host: &str, path: &str, key: &[u8; 16]) -> String {
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    )
}

/// Checks a server's answer to [`upgrade_request`] the way Unity Transport does: `101`,
/// `Upgrade: websocket`, `Connection` with `upgrade`, the right accept value, and neither a
/// subprotocol nor an extension. Returns the head's length (`Ok(None)` while incomplete).
pub fn check_upgrade_response(buf: &[u8], key: &[u8; 16]) -> Result<Option<usize>, &'static str> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else {
        return if buf.len() >= MAX_HEAD { Err("answer head too large") } else { Ok(None) };
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "answer is not text")?;
    if !head.starts_with("HTTP/1.1 101 ") {
        return Err("the relay did not switch protocols");
    }
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let want = base64::engine::general_purpose::STANDARD
        .encode(Sha1::new().chain_update(&key).chain_update(GUID).finalize());
    let (mut upgrade, mut connection, mut accept) = (false, false, false);
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "upgrade" => upgrade = value.eq_ignore_ascii_case("websocket"),
            "connection" => connection = value.to_ascii_lowercase().contains("upgrade"),
            "sec-websocket-accept" => accept = value == want,
            "sec-websocket-protocol" | "sec-websocket-extensions" => {
                return Err("the relay named a subprotocol or an extension")
            }
            _ => {}
        }
    }
    if upgrade && connection && accept {
        Ok(Some(end))
    } else {
        Err("bad upgrade answer")
    }
}

/// A close frame with `code`.
pub fn encode_close(out: &mut Vec<u8>, code: u16) {
    encode(out, 0x8, &code.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n @ 0..=125 => v.push(0x80 | n as u8),
            n => {
                v.push(0x80 | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        v
    }

    #[test]
    fn answers_unity_transports_upgrade_exactly() {
        // RFC 6455 §1.3's example key, in the request Unity Transport's native client sends.
        let req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:7778\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nextra";
        let (n, answer) = accept_upgrade(req).unwrap();
        assert_eq!(&req[n..], b"extra");
        assert!(answer.starts_with("HTTP/1.1 101 "));
        assert!(answer.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(!answer.to_ascii_lowercase().contains("sec-websocket-protocol"));
        assert!(!answer.to_ascii_lowercase().contains("sec-websocket-extensions"));
        assert_eq!(accept_upgrade(&req[..40]), Err(UpgradeError::Incomplete));
        assert_eq!(accept_upgrade(b"POST / HTTP/1.1\r\n\r\n"), Err(UpgradeError::NotGet));
        assert_eq!(accept_upgrade(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Err(UpgradeError::NoUpgrade));
        assert_eq!(accept_upgrade(&[b'a'; 5000]), Err(UpgradeError::TooLarge));
    }

    #[test]
    fn reassembles_binary_and_refuses_what_unity_would_not_send() {
        let mut d = Decoder::default();
        let f = masked(0x2, true, b"relay");
        assert_eq!(d.decode(&f).unwrap(), Some((f.len(), Some(Frame::Binary(b"relay")))));
        assert_eq!(d.decode(&f[..f.len() - 1]).unwrap(), None);
        let (a, b) = (masked(0x2, false, b"he"), masked(0x0, true, b"llo"));
        assert_eq!(d.decode(&a).unwrap(), Some((a.len(), None)));
        assert_eq!(d.decode(&b).unwrap(), Some((b.len(), Some(Frame::Binary(b"hello")))));
        let p = masked(0x9, true, b"hb");
        assert_eq!(d.decode(&p).unwrap(), Some((p.len(), Some(Frame::Ping(b"hb")))));
        let c = masked(0x8, true, &1000u16.to_be_bytes());
        assert_eq!(d.decode(&c).unwrap(), Some((c.len(), Some(Frame::Close(1000)))));
        assert_eq!(d.decode(&masked(0x1, true, b"text")), Err(Violation::Text));
        assert_eq!(d.decode(&[0x82, 0x01, 0x00]), Err(Violation::Unmasked));
        assert_eq!(d.decode(&masked(0x2, true, &[0; 1473])), Err(Violation::TooBig));
        assert_eq!(d.decode(&masked(0x0, true, b"x")), Err(Violation::BadContinuation));
        assert_eq!(d.decode(&[0xC2, 0x80, 0, 0, 0, 0]), Err(Violation::ReservedBits));
    }

    #[test]
    fn a_client_round_trip() {
        let key = [7u8; 16];
        let req = upgrade_request("127.0.0.1:7778", "/", &key);
        let (n, answer) = accept_upgrade(req.as_bytes()).unwrap();
        assert_eq!(n, req.len());
        assert_eq!(check_upgrade_response(answer.as_bytes(), &key), Ok(Some(answer.len())));
        assert!(check_upgrade_response(answer.as_bytes(), &[8; 16]).is_err());
        let mut f = Vec::new();
        encode_masked(&mut f, 0x2, &[9; 200], [1, 2, 3, 4]);
        let mut server = Decoder::default();
        assert_eq!(server.decode(&f).unwrap(), Some((f.len(), Some(Frame::Binary(&[9; 200])))));
        let mut back = Vec::new();
        encode(&mut back, 0x2, b"reply");
        let mut client = Decoder::client();
        assert_eq!(client.decode(&back).unwrap(), Some((back.len(), Some(Frame::Binary(b"reply")))));
        assert_eq!(client.decode(&f), Err(Violation::Unmasked));
    }

    #[test]
    fn server_frames_are_unmasked_with_the_shortest_length() {
        let mut out = Vec::new();
        encode(&mut out, 0x2, &[7; 125]);
        assert_eq!(&out[..2], &[0x82, 125]);
        out.clear();
        encode(&mut out, 0x2, &[7; 1386]);
        assert_eq!(&out[..4], &[0x82, 126, 0x05, 0x6A]);
        assert_eq!(out.len(), 1390);
    }
}
