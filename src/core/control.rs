//! What the control plane asks of a shard, and what a shard reports back.

use std::net::SocketAddr;

use super::stats::ReleaseReason;
use crate::auth::{AllocationKey, CONNECTION_DATA_LEN, KEY_LEN};
use crate::wire::AllocationId;

/// Randomness for one new allocation, drawn by the caller from the OS CSPRNG so the core stays
/// deterministic under test. (The key is not drawn: it derives from the relay secret and the ID,
/// see [`allocation_key`](super::allocation_key).)
#[derive(Clone)]
pub struct Entropy {
    pub id: [u8; 16],
}

impl Entropy {
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut e = Self { id: [0; 16] };
        getrandom::getrandom(&mut e.id)?;
        Ok(e)
    }
}

/// A control command.
#[derive(Clone)]
pub enum Control {
    /// A host allocation allowing `max_connections` peers.
    CreateHost { max_connections: u16, entropy: Entropy },
    /// A joiner allocation bound to `host`'s session.
    CreateJoiner { host: AllocationId, entropy: Entropy },
    /// Release an allocation as if it had expired (a host takes its joiners with it).
    Release { id: AllocationId },
    /// The host (proving itself with its allocation key) removes one of its joiners, or, with
    /// `joiner: None`, every joiner that has not connected: a leaked join code cannot keep a
    /// session's joiner slots full.
    RemoveJoiners { host: AllocationId, key: Box<[u8; KEY_LEN]>, joiner: Option<AllocationId> },
    /// Every live allocation of the shard, for operators (`ferry ctl allocations`).
    List,
    /// New values for what a configuration reload may change while sessions run.
    Reconfigure(Box<Reconfig>),
}

/// The core settings a reload changes live. Timeouts apply to every allocation from the next
/// check on; the source policy to the next BIND.
#[derive(Clone, Debug)]
pub struct Reconfig {
    pub policy: super::AddressPolicy,
    pub unbound_timeout: crate::clock::Millis,
    pub idle_timeout: crate::clock::Millis,
    pub host_alone_timeout: crate::clock::Millis,
    pub rebind_quiet: crate::clock::Millis,
    pub unconfirmed_budget: u32,
    pub stun: bool,
    pub qos: bool,
    /// New fleet keys (a rotation), for a relay in a fleet.
    pub fleet: Option<super::FleetRelay>,
}

/// One live allocation as an operator sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AllocationInfo {
    pub id: String,
    pub role: &'static str,
    /// The host of a joiner.
    pub host: Option<String>,
    pub age_ms: u64,
    pub idle_ms: u64,
    pub bound: Option<std::net::SocketAddr>,
    /// Linked peers (a host's count; 1 for a connected joiner).
    pub peers: u16,
    pub bytes_relayed: u64,
}

/// A new allocation: everything the API hands to the client.
#[derive(Clone, Debug)]
pub struct Created {
    pub id: AllocationId,
    pub key: AllocationKey,
    pub connection_data: [u8; CONNECTION_DATA_LEN],
}

#[derive(Clone, Debug)]
pub enum ControlReply {
    Created(Box<Created>),
    Released,
    /// How many joiners were removed.
    Removed(u32),
    List(Vec<AllocationInfo>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlError {
    /// The shard's allocation table is full.
    Full,
    /// `maxConnections` outside `1..=cap`.
    MaxConnectionsOutOfRange,
    /// The host allocation does not exist (any more).
    HostNotFound,
    /// The host's session already has as many joiner allocations as it may hold.
    SessionFull,
    /// Release of an unknown allocation.
    NotFound,
    /// The key presented is not the host allocation's.
    WrongKey,
}

impl ControlError {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Full => "relay full",
            Self::MaxConnectionsOutOfRange => "maxConnections out of range",
            Self::HostNotFound => "host allocation not found",
            Self::SessionFull => "session has too many joiners",
            Self::NotFound => "allocation not found",
            Self::WrongKey => "the key is not this host allocation's",
        }
    }
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for ControlError {}

/// Lifecycle events for the control plane (join-code invalidation, logs). Never per packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Bound {
        id: AllocationId,
        addr: SocketAddr,
        moved: bool,
    },
    Connected {
        host: AllocationId,
        joiner: AllocationId,
    },
    /// `bytes`: what the allocation's client sent through the relay.
    Released {
        id: AllocationId,
        is_host: bool,
        reason: ReleaseReason,
        bytes: u64,
    },
}
