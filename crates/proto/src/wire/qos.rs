//! Unity's QoS ping (`0x59` request, `0x95` reply), which clients use to measure their latency to
//! each region's relays before allocating. Little-endian fields:
//!
//! ```text
//! request:  59 | ver/flow | title len + 1 | title (N) | seq | id (2) | timestamp ms (8)   15..=1500 bytes
//! reply:    95 | ver/flow | seq | id (2) | timestamp (8)                                  13 bytes
//! ```
//!
//! The reply echoes the sequence, identifier and timestamp unchanged; the client takes
//! `now − timestamp` as the round trip. It is always smaller than any valid request.

/// First byte of a request.
pub const REQUEST_MAGIC: u8 = 0x59;
/// First byte of a reply.
pub const REPLY_MAGIC: u8 = 0x95;
/// Length of a reply.
pub const REPLY_LEN: usize = 13;
/// Smallest and largest valid requests (an empty title).
pub const MIN_REQUEST: usize = 14;
pub const MAX_REQUEST: usize = 1500;

/// Why a request is not answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosError {
    /// Wrong length, magic, version, or a title that does not fit.
    Malformed,
}

/// The echoed fields of a valid request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QosRequest {
    pub sequence: u8,
    pub identifier: u16,
    pub timestamp: u64,
}

impl QosRequest {
    /// Whether `d` looks like a QoS request (its first byte).
    #[inline]
    pub fn is_qos(d: &[u8]) -> bool {
        d.first() == Some(&REQUEST_MAGIC)
    }

    pub fn parse(d: &[u8]) -> Result<Self, QosError> {
        if !(MIN_REQUEST..=MAX_REQUEST).contains(&d.len()) || d[0] != REQUEST_MAGIC || d[1] >> 4 != 0 {
            return Err(QosError::Malformed);
        }
        let title = (d[2] as usize).checked_sub(1).ok_or(QosError::Malformed)?;
        let at = 3 + title;
        let rest = d.get(at..at + 11).ok_or(QosError::Malformed)?;
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&rest[3..11]);
        Ok(Self {
            sequence: rest[0],
            identifier: u16::from_le_bytes([rest[1], rest[2]]),
            timestamp: u64::from_le_bytes(ts),
        })
    }

    /// Writes the reply into `out` (at least [`REPLY_LEN`] bytes); returns its length.
    pub fn emit_reply(&self, out: &mut [u8]) -> Option<usize> {
        let o = out.get_mut(..REPLY_LEN)?;
        o[0] = REPLY_MAGIC;
        o[1] = 0;
        o[2] = self.sequence;
        o[3..5].copy_from_slice(&self.identifier.to_le_bytes());
        o[5..13].copy_from_slice(&self.timestamp.to_le_bytes());
        Some(REPLY_LEN)
    }
}

/// The request Unity's QoS runner sends (`QosJob`): title "QoS request", 25 bytes; `ts` is
/// echoed back unchanged (Unity sends milliseconds since 0001-01-01).
pub fn unity_request(seq: u8, id: u16, ts: u64) -> Vec<u8> {
    let mut v = vec![0x59, 0x00, 12];
    v.extend_from_slice(b"QoS request");
    v.push(seq);
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&ts.to_le_bytes());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_sequence_identifier_and_timestamp() {
        let d = unity_request(3, 0xBEEF, 63_870_000_000_123);
        assert_eq!(d.len(), 25);
        let r = QosRequest::parse(&d).unwrap();
        let mut out = [0u8; 13];
        assert_eq!(r.emit_reply(&mut out), Some(13));
        assert_eq!(out[..3], [0x95, 0, 3]);
        assert_eq!(u16::from_le_bytes([out[3], out[4]]), 0xBEEF);
        assert_eq!(u64::from_le_bytes(out[5..13].try_into().unwrap()), 63_870_000_000_123);
    }

    #[test]
    fn refuses_what_is_not_a_request() {
        let d = unity_request(0, 1, 2);
        assert!(QosRequest::parse(&d[..13]).is_err(), "too short");
        let mut v = d.clone();
        v[1] = 0x10;
        assert!(QosRequest::parse(&v).is_err(), "version 1");
        let mut v = d.clone();
        v[2] = 0;
        assert!(QosRequest::parse(&v).is_err(), "title length byte counts itself");
        let mut v = d.clone();
        v[2] = 200;
        assert!(QosRequest::parse(&v).is_err(), "title past the end");
        assert!(QosRequest::parse(&[0x59; 1501]).is_err());
        let mut empty_title = vec![0x59, 0, 1, 9, 1, 0];
        empty_title.extend_from_slice(&[0; 8]);
        assert_eq!(QosRequest::parse(&empty_title).unwrap().sequence, 9);
    }
}
