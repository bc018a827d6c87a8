//! Per-shard counters: plain integers owned by the shard, copied out at scrape time.

use crate::wire::{ErrorCode, WireError};

/// Why a datagram produced nothing. Doubles as the `reason` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    Oversize,
    Short,
    BadSignature,
    BadVersion,
    UnknownType,
    BadLength,
    BadField,
    /// A relay→client type (BIND_RECEIVED, ACCEPTED, REJECTED, ERROR) sent to the relay.
    UnexpectedType,
    /// A source the address policy refuses (port 0, unspecified, multicast, broadcast, reserved,
    /// the relay itself, or an operator-denied prefix).
    BadSource,
    /// BIND whose connection data is not Ferry's format.
    BadConnData,
    /// BIND whose HMAC does not verify.
    BadHmac,
    /// Valid BIND from a new address while the client is live, with no higher nonce.
    RebindRefused,
    /// CLOSE from an unknown allocation or from an address it is not bound to.
    NotBound,
    /// DISCONNECT for a pair that is not linked.
    NotLinked,
    /// An ERROR or REJECTED reply withheld by the rate limiter.
    ReplyRateLimited,
    /// A reply withheld because it would be larger than the datagram that caused it.
    ReplyTooLarge,
    /// Relayed traffic beyond the budget of an address that has only sent BINDs.
    Unconfirmed,
    /// A STUN datagram that was not answered (the reason is in the STUN counters).
    Stun,
    /// A QoS ping that was not answered (the reason is in the QoS counters).
    Qos,
    /// A fleet BIND whose token was refused (the reason is in the bind-reject counters).
    TokenRefused,
}

impl DropReason {
    pub const ALL: [DropReason; 20] = [
        Self::Oversize,
        Self::Short,
        Self::BadSignature,
        Self::BadVersion,
        Self::UnknownType,
        Self::BadLength,
        Self::BadField,
        Self::UnexpectedType,
        Self::BadSource,
        Self::BadConnData,
        Self::BadHmac,
        Self::RebindRefused,
        Self::NotBound,
        Self::NotLinked,
        Self::ReplyRateLimited,
        Self::ReplyTooLarge,
        Self::Unconfirmed,
        Self::Stun,
        Self::Qos,
        Self::TokenRefused,
    ];
    pub const COUNT: usize = Self::ALL.len();

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Oversize => "oversize",
            Self::Short => "short",
            Self::BadSignature => "bad_signature",
            Self::BadVersion => "bad_version",
            Self::UnknownType => "unknown_type",
            Self::BadLength => "bad_length",
            Self::BadField => "bad_field",
            Self::UnexpectedType => "unexpected_type",
            Self::BadSource => "bad_source",
            Self::BadConnData => "bad_conn_data",
            Self::BadHmac => "bad_hmac",
            Self::RebindRefused => "rebind_refused",
            Self::NotBound => "not_bound",
            Self::NotLinked => "not_linked",
            Self::ReplyRateLimited => "reply_rate_limited",
            Self::ReplyTooLarge => "reply_too_large",
            Self::Unconfirmed => "unconfirmed_destination",
            Self::Stun => "stun",
            Self::Qos => "qos",
            Self::TokenRefused => "token_refused",
        }
    }
}

impl From<WireError> for DropReason {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Short => Self::Short,
            WireError::BadSignature => Self::BadSignature,
            WireError::BadVersion => Self::BadVersion,
            WireError::UnknownType => Self::UnknownType,
            WireError::BadLength => Self::BadLength,
            WireError::WrongType | WireError::BadField | WireError::BufferTooSmall => Self::BadField,
        }
    }
}

/// Why an allocation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReleaseReason {
    /// The client sent CLOSE.
    Closed,
    /// No traffic before its deadline.
    TimedOut,
    /// A joiner released because its host went away.
    HostGone,
    /// Released through the control interface.
    Control,
}

impl ReleaseReason {
    pub const ALL: [ReleaseReason; 4] = [Self::Closed, Self::TimedOut, Self::HostGone, Self::Control];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::TimedOut => "timed_out",
            Self::HostGone => "host_gone",
            Self::Control => "control",
        }
    }
}

/// Counters of one shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    /// Replies to the sender (BIND_RECEIVED, PING echo, ACCEPTED, REJECTED, ERROR).
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Relay-originated datagrams (DISCONNECT when a host goes away).
    pub notify_packets: u64,
    pub drops: [u64; DropReason::COUNT],
    pub errors_sent: [u64; 7],
    pub binds_new: u64,
    pub binds_repeat: u64,
    pub binds_moved: u64,
    pub connects_accepted: u64,
    pub connects_rejected: u64,
    pub allocations_created: u64,
    pub released: [u64; 4],
    /// STUN datagrams by outcome ([`super::StunOutcome`]).
    pub stun: [u64; super::StunOutcome::COUNT],
    /// QoS pings by outcome ([`super::QosOutcome`]).
    pub qos: [u64; super::QosOutcome::COUNT],
    /// Fleet BINDs refused, by reason ([`super::BindReject`]).
    pub bind_rejects: [u64; super::BindReject::COUNT],
}

impl Stats {
    pub fn drop_count(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }

    pub fn errors(&self, c: ErrorCode) -> u64 {
        self.errors_sent[c as usize]
    }

    pub fn released_by(&self, r: ReleaseReason) -> u64 {
        self.released[r as usize]
    }

    /// Adds another shard's counters into these.
    pub fn merge(&mut self, o: &Stats) {
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.forwarded_packets += o.forwarded_packets;
        self.forwarded_bytes += o.forwarded_bytes;
        self.reply_packets += o.reply_packets;
        self.reply_bytes += o.reply_bytes;
        self.notify_packets += o.notify_packets;
        for (a, b) in self.drops.iter_mut().zip(o.drops) {
            *a += b;
        }
        for (a, b) in self.errors_sent.iter_mut().zip(o.errors_sent) {
            *a += b;
        }
        self.binds_new += o.binds_new;
        self.binds_repeat += o.binds_repeat;
        self.binds_moved += o.binds_moved;
        self.connects_accepted += o.connects_accepted;
        self.connects_rejected += o.connects_rejected;
        self.allocations_created += o.allocations_created;
        for (a, b) in self.released.iter_mut().zip(o.released) {
            *a += b;
        }
        for (a, b) in self.stun.iter_mut().zip(o.stun) {
            *a += b;
        }
        for (a, b) in self.qos.iter_mut().zip(o.qos) {
            *a += b;
        }
        for (a, b) in self.bind_rejects.iter_mut().zip(o.bind_rejects) {
            *a += b;
        }
    }
}
