//! The tunnel protocol inside RELAY payloads (`docs/tunnel-protocol.md`). Sans-IO: parse and
//! write frames into caller buffers; game datagrams cross unchanged after a 12-byte header.
//!
//! ```text
//! every frame   [0xF7][version 1][kind]
//! JOIN    0x01  joiner → host, until HELLO arrives
//! HELLO   0x02  host → joiner   [ports n u8][port u16 BE] × n   (the forward list, in order)
//! DATA    0x03  either way      [port index u8][flow u32 BE][seq u32 BE][game datagram]
//! CLOSE   0x04  either way      [port index u8][flow u32 BE]     (flow closed; sockets freed)
//! PING    0x05  either way      [id u32 BE][sent µs u64 BE]
//! PONG    0x06  either way      the PING's body, echoed
//! BYE     0x07  either way      the sender is leaving
//! CANDS   0x08  either way      [have yours u8][path candidates]   (`docs/paths.md`)
//! ```
//!
//! DATA frames also travel straight between the tunnels once a direct path is proven; every
//! other frame goes through the relay.

/// First byte of every tunnel frame.
pub const MAGIC: u8 = 0xF7;
/// Protocol version.
pub const VERSION: u8 = 1;
/// Bytes before the game datagram in a DATA frame.
pub const DATA_HEADER: usize = 12;
/// Largest RELAY payload (the relay's 1,472-byte datagram limit less RELAY's 38-byte header).
pub const MAX_RELAY_PAYLOAD: usize = 1434;
/// Largest game datagram a tunnel carries.
pub const MAX_GAME_DATAGRAM: usize = MAX_RELAY_PAYLOAD - DATA_HEADER;
/// Most forwarded ports one tunnel exposes.
pub const MAX_PORTS: usize = 16;

const JOIN: u8 = 1;
const HELLO: u8 = 2;
const DATA: u8 = 3;
const CLOSE: u8 = 4;
const PING: u8 = 5;
const PONG: u8 = 6;
const BYE: u8 = 7;
const CANDIDATES: u8 = 8;

/// A parsed frame, borrowing the game datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Join,
    Hello {
        ports: Vec<u16>,
    },
    Data {
        port: u8,
        flow: u32,
        seq: u32,
        payload: &'a [u8],
    },
    Close {
        port: u8,
        flow: u32,
    },
    Ping {
        id: u32,
        sent_us: u64,
    },
    Pong {
        id: u32,
        sent_us: u64,
    },
    Bye,
    /// This side's path candidates (`[have yours u8]` + [`crate::path::Candidates`]).
    Candidates {
        body: &'a [u8],
    },
}

/// Why bytes are not a tunnel frame (counted, never answered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    Short,
    BadMagic,
    /// A frame of another protocol version.
    Version,
    UnknownKind,
    BadLength,
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3], b[i + 4], b[i + 5], b[i + 6], b[i + 7]])
}

impl<'a> Frame<'a> {
    pub fn parse(b: &'a [u8]) -> Result<Self, FrameError> {
        if b.len() < 3 {
            return Err(FrameError::Short);
        }
        if b[0] != MAGIC {
            return Err(FrameError::BadMagic);
        }
        if b[1] != VERSION {
            return Err(FrameError::Version);
        }
        let body = &b[3..];
        let exact = |n: usize| if body.len() == n { Ok(()) } else { Err(FrameError::BadLength) };
        match b[2] {
            JOIN => exact(0).map(|_| Frame::Join),
            HELLO => {
                let n = *body.first().ok_or(FrameError::BadLength)? as usize;
                if n > MAX_PORTS {
                    return Err(FrameError::BadLength);
                }
                exact(1 + 2 * n)?;
                Ok(Frame::Hello {
                    ports: (0..n).map(|i| u16::from_be_bytes([body[1 + 2 * i], body[2 + 2 * i]])).collect(),
                })
            }
            DATA => {
                if body.len() < DATA_HEADER - 3 {
                    return Err(FrameError::BadLength);
                }
                Ok(Frame::Data {
                    port: body[0],
                    flow: u32_at(body, 1),
                    seq: u32_at(body, 5),
                    payload: &body[DATA_HEADER - 3..],
                })
            }
            CLOSE => exact(5).map(|_| Frame::Close { port: body[0], flow: u32_at(body, 1) }),
            PING => exact(12).map(|_| Frame::Ping { id: u32_at(body, 0), sent_us: u64_at(body, 4) }),
            PONG => exact(12).map(|_| Frame::Pong { id: u32_at(body, 0), sent_us: u64_at(body, 4) }),
            BYE => exact(0).map(|_| Frame::Bye),
            CANDIDATES => {
                let ok = body.len() > 1 && crate::path::Candidates::decode(&body[1..]).is_some();
                ok.then_some(Frame::Candidates { body }).ok_or(FrameError::BadLength)
            }
            _ => Err(FrameError::UnknownKind),
        }
    }

    /// Writes this frame into `out`; returns its length, or `None` when it does not fit (or a
    /// DATA payload is over [`MAX_GAME_DATAGRAM`]).
    pub fn write(&self, out: &mut [u8]) -> Option<usize> {
        let mut v: Vec<u8> = Vec::new();
        let kind = match self {
            Frame::Join => JOIN,
            Frame::Hello { ports } => {
                if ports.len() > MAX_PORTS {
                    return None;
                }
                v.push(ports.len() as u8);
                for p in ports {
                    v.extend_from_slice(&p.to_be_bytes());
                }
                HELLO
            }
            Frame::Data { port, flow, seq, payload } => {
                return write_data(out, *port, *flow, *seq, payload);
            }
            Frame::Close { port, flow } => {
                v.push(*port);
                v.extend_from_slice(&flow.to_be_bytes());
                CLOSE
            }
            Frame::Ping { id, sent_us } | Frame::Pong { id, sent_us } => {
                v.extend_from_slice(&id.to_be_bytes());
                v.extend_from_slice(&sent_us.to_be_bytes());
                if matches!(self, Frame::Ping { .. }) {
                    PING
                } else {
                    PONG
                }
            }
            Frame::Bye => BYE,
            Frame::Candidates { body } => {
                v.extend_from_slice(body);
                CANDIDATES
            }
        };
        let n = 3 + v.len();
        let out = out.get_mut(..n)?;
        out[..3].copy_from_slice(&[MAGIC, VERSION, kind]);
        out[3..].copy_from_slice(&v);
        Some(n)
    }

    /// The frame as a new vector (for control frames; DATA goes through [`write_data`]).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; MAX_RELAY_PAYLOAD];
        let n = self.write(&mut out).unwrap_or(0);
        out.truncate(n);
        out
    }
}

/// Writes a DATA frame around `payload` into `out` without building a [`Frame`].
pub fn write_data(out: &mut [u8], port: u8, flow: u32, seq: u32, payload: &[u8]) -> Option<usize> {
    if payload.len() > MAX_GAME_DATAGRAM {
        return None;
    }
    let n = DATA_HEADER + payload.len();
    let out = out.get_mut(..n)?;
    out[..4].copy_from_slice(&[MAGIC, VERSION, DATA, port]);
    out[4..8].copy_from_slice(&flow.to_be_bytes());
    out[8..12].copy_from_slice(&seq.to_be_bytes());
    out[12..].copy_from_slice(payload);
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let payload = [9u8; 100];
        let mut cands = vec![0u8];
        cands.extend(
            crate::path::Candidates { policy: Default::default(), key: [7; 16], addrs: vec![] }.encode(),
        );
        for f in [
            Frame::Join,
            Frame::Hello { ports: vec![7777, 7778] },
            Frame::Data { port: 1, flow: 0xDEAD_BEEF, seq: 42, payload: &payload },
            Frame::Close { port: 0, flow: 3 },
            Frame::Ping { id: 5, sent_us: 1 << 40 },
            Frame::Pong { id: 5, sent_us: 7 },
            Frame::Bye,
            Frame::Candidates { body: &cands },
        ] {
            let v = f.to_vec();
            assert_eq!(Frame::parse(&v), Ok(f.clone()), "{v:02x?}");
        }
    }

    #[test]
    fn limits_and_garbage() {
        let mut out = [0u8; 2000];
        assert_eq!(write_data(&mut out, 0, 1, 1, &[0; MAX_GAME_DATAGRAM]), Some(MAX_RELAY_PAYLOAD));
        assert_eq!(write_data(&mut out, 0, 1, 1, &[0; MAX_GAME_DATAGRAM + 1]), None);
        assert_eq!(Frame::parse(&[MAGIC, 2, JOIN]), Err(FrameError::Version));
        assert_eq!(Frame::parse(&[0xDA, 0x72, 0]), Err(FrameError::BadMagic));
        assert_eq!(Frame::parse(&[MAGIC, VERSION, 99]), Err(FrameError::UnknownKind));
        assert_eq!(Frame::parse(&[MAGIC, VERSION, HELLO, 2, 0, 1]), Err(FrameError::BadLength));
        assert_eq!(Frame::parse(&[MAGIC, VERSION, DATA, 0, 0]), Err(FrameError::BadLength));
    }
}
