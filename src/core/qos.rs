//! The QoS responder (Unity's `0x59` ping): stateless, answered by whichever shard receives the
//! request, so clients can measure their latency to this relay before they allocate. Source
//! policy first, then the request's shape, then the rate limits; the 13-byte reply is written in
//! place and is always smaller than the request.

use std::net::SocketAddr;

use super::{Action, Core, DropReason};
use crate::clock::Millis;
use crate::wire::qos::QosRequest;

/// QoS outcomes, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum QosOutcome {
    Answered,
    Disabled,
    Malformed,
    RateLimited,
    BadSource,
}

impl QosOutcome {
    pub const COUNT: usize = 5;
    pub const ALL: [QosOutcome; Self::COUNT] =
        [Self::Answered, Self::Disabled, Self::Malformed, Self::RateLimited, Self::BadSource];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::Disabled => "disabled",
            Self::Malformed => "malformed",
            Self::RateLimited => "rate_limited",
            Self::BadSource => "bad_source",
        }
    }
}

impl Core {
    /// Answers a QoS request of `len` bytes at the start of `buf`, in place.
    pub fn handle_qos(&mut self, now: Millis, src: SocketAddr, buf: &mut [u8], len: usize) -> Action {
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += len as u64;
        let outcome = if !self.cfg.qos {
            Err(QosOutcome::Disabled)
        } else if !self.cfg.policy.allows(&src) {
            Err(QosOutcome::BadSource)
        } else {
            match buf.get(..len).map(QosRequest::parse) {
                Some(Ok(req)) if self.qos_limiter.allow(now, src.ip()) => {
                    req.emit_reply(buf).ok_or(QosOutcome::Malformed)
                }
                Some(Ok(_)) => Err(QosOutcome::RateLimited),
                _ => Err(QosOutcome::Malformed),
            }
        };
        match outcome {
            Ok(n) => {
                self.stats.reply_packets += 1;
                self.stats.reply_bytes += n as u64;
                self.stats.qos[QosOutcome::Answered as usize] += 1;
                Action::Reply(n)
            }
            Err(o) => {
                self.stats.qos[o as usize] += 1;
                self.stats.drops[DropReason::Qos as usize] += 1;
                Action::Drop(DropReason::Qos)
            }
        }
    }
}
