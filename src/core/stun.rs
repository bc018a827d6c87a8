//! The STUN Binding responder: stateless, answered by whichever shard receives the request.
//! Cheap checks first (source policy, then the request's shape), then the rate limits, and a
//! reply only when it is at most [`MAX_AMPLIFICATION`] times the request (a bare 20-byte request
//! from an IPv6 source, whose answer would be 44 bytes, is dropped and counted).

use std::net::SocketAddr;

use super::{Action, Core, DropReason};
use crate::clock::Millis;
use crate::wire::stun::{BindingRequest, StunError};

/// A reply is never larger than this many times its request (as a ratio 8/5).
pub const MAX_AMPLIFICATION: f64 = 1.6;

/// STUN outcomes, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StunOutcome {
    Answered,
    Disabled,
    Malformed,
    NotBindingRequest,
    UnknownAttribute,
    BadFingerprint,
    RateLimited,
    Amplification,
    BadSource,
}

impl StunOutcome {
    pub const COUNT: usize = 9;
    pub const ALL: [StunOutcome; Self::COUNT] = [
        Self::Answered,
        Self::Disabled,
        Self::Malformed,
        Self::NotBindingRequest,
        Self::UnknownAttribute,
        Self::BadFingerprint,
        Self::RateLimited,
        Self::Amplification,
        Self::BadSource,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::Disabled => "disabled",
            Self::Malformed => "malformed",
            Self::NotBindingRequest => "not_binding_request",
            Self::UnknownAttribute => "unknown_attribute",
            Self::BadFingerprint => "bad_fingerprint",
            Self::RateLimited => "rate_limited",
            Self::Amplification => "amplification",
            Self::BadSource => "bad_source",
        }
    }
}

impl Core {
    /// Answers a STUN datagram of `len` bytes at the start of `buf` (the whole receive buffer,
    /// so the reply can be written in place even when it is longer than the request).
    pub fn handle_stun(&mut self, now: Millis, src: SocketAddr, buf: &mut [u8], len: usize) -> Action {
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += len as u64;
        match self.stun_reply(now, src, buf, len) {
            Ok(n) => {
                self.stats.reply_packets += 1;
                self.stats.reply_bytes += n as u64;
                self.stats.stun[StunOutcome::Answered as usize] += 1;
                Action::Reply(n)
            }
            Err(o) => {
                self.stats.stun[o as usize] += 1;
                self.stats.drops[DropReason::Stun as usize] += 1;
                Action::Drop(DropReason::Stun)
            }
        }
    }

    fn stun_reply(
        &mut self,
        now: Millis,
        src: SocketAddr,
        buf: &mut [u8],
        len: usize,
    ) -> Result<usize, StunOutcome> {
        if !self.cfg.stun {
            return Err(StunOutcome::Disabled);
        }
        if !self.cfg.policy.allows(&src) {
            return Err(StunOutcome::BadSource);
        }
        let req = buf.get(..len).ok_or(StunOutcome::Malformed)?;
        let req = BindingRequest::parse(req).map_err(|e| match e {
            StunError::Malformed => StunOutcome::Malformed,
            StunError::NotBindingRequest => StunOutcome::NotBindingRequest,
            StunError::UnknownAttribute => StunOutcome::UnknownAttribute,
            StunError::BadFingerprint => StunOutcome::BadFingerprint,
        })?;
        let n = req.response_len(&src);
        if n * 5 > len * 8 {
            return Err(StunOutcome::Amplification);
        }
        if !self.stun_limiter.allow(now, src.ip()) {
            return Err(StunOutcome::RateLimited);
        }
        req.emit_response(&src, buf).ok_or(StunOutcome::Malformed)
    }
}
