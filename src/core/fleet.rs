//! Allocations minted by fleet API instances, admitted at their first BIND (`docs/fleet.md`).
//!
//! The relay learns of a fleet allocation only when its client binds: the connection data is a
//! token ([`crate::auth::token`]) naming this relay, this boot's epoch, the role and a deadline,
//! tagged under this relay's key. Once admitted, the allocation lives in the table like any
//! other; an allocation that ends is remembered ("buried") until no token for it can still be
//! inside its bind window, so a closed allocation's token cannot bind it again.

use crate::auth::token::{relay_key, relay_tag, Token};
use crate::auth::PreKeyedHmac;
use crate::wire::AllocationId;

/// What a relay in a fleet needs to check tokens.
#[derive(Clone)]
pub struct FleetRelay {
    /// This relay's tag ([`relay_tag`] of its name).
    pub relay: u32,
    /// This boot's epoch.
    pub epoch: u32,
    /// Relay keys by fleet key ID (at most a few: the current key and those being rotated out).
    pub keys: Vec<(u8, [u8; 64], PreKeyedHmac)>,
    /// Unix milliseconds at the shard clock's zero (tokens carry wall-clock deadlines).
    pub unix_at_zero: u64,
    /// Clock difference tolerated between API instances and relays.
    pub skew_ms: u64,
}

impl std::fmt::Debug for FleetRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetRelay")
            .field("relay", &self.relay)
            .field("epoch", &self.epoch)
            .field("kids", &self.keys.iter().map(|k| k.0).collect::<Vec<_>>())
            .finish()
    }
}

impl FleetRelay {
    pub fn new(name: &str, epoch: u32, fleet_keys: &[(u8, Vec<u8>)], unix_at_zero: u64) -> Self {
        let keys = fleet_keys
            .iter()
            .map(|(kid, k)| {
                let rk = relay_key(k, name, epoch);
                (*kid, rk, PreKeyedHmac::new(&rk))
            })
            .collect();
        Self { relay: relay_tag(name), epoch, keys, unix_at_zero, skew_ms: 5_000 }
    }

    /// The relay key for fleet key `kid`.
    pub fn key(&self, kid: u8) -> Option<(&[u8; 64], &PreKeyedHmac)> {
        self.keys.iter().find(|k| k.0 == kid).map(|k| (&k.1, &k.2))
    }

    /// The allocation key of fleet allocation `id` (what its client signs BINDs with and uses
    /// as its DTLS pre-shared key).
    pub fn allocation_key(&self, id: &AllocationId) -> Option<[u8; 64]> {
        self.key(Token::kid(id)).map(|(rk, _)| super::allocation_key(rk, id))
    }

    /// Checks a CONNECT_REQUEST's target token: well formed, for this relay and boot, tagged.
    pub fn verify_target(&self, data: &[u8]) -> Option<AllocationId> {
        let t = Token::parse(data).ok()?;
        if t.relay != self.relay || t.epoch != self.epoch {
            return None;
        }
        let (_, mac) = self.key(Token::kid(&t.id))?;
        Token::tag_ok(data, mac).then_some(t.id)
    }
}

/// Why a fleet BIND was refused (`ferry_relay_bind_rejects_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BindReject {
    /// The tag does not verify, or names a fleet key this relay does not hold.
    Forged,
    /// A token for another relay.
    WrongRelay,
    /// A token for an earlier boot of this relay (it restarted; the allocation is gone).
    StaleEpoch,
    /// First BIND after the token's deadline.
    Expired,
    /// The allocation already ended here.
    Closed,
    /// A joiner whose host is not live on this relay (not bound yet, or gone).
    HostAbsent,
    /// The relay is at `max_allocations`, or the host's session has no joiner slot left.
    Full,
    /// A fleet token reached a relay that is not in a fleet.
    NotFleet,
}

impl BindReject {
    pub const ALL: [BindReject; 8] = [
        Self::Forged,
        Self::WrongRelay,
        Self::StaleEpoch,
        Self::Expired,
        Self::Closed,
        Self::HostAbsent,
        Self::Full,
        Self::NotFleet,
    ];
    pub const COUNT: usize = Self::ALL.len();

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Forged => "forged",
            Self::WrongRelay => "wrong_relay",
            Self::StaleEpoch => "stale_epoch",
            Self::Expired => "expired",
            Self::Closed => "closed",
            Self::HostAbsent => "host_absent",
            Self::Full => "full",
            Self::NotFleet => "not_fleet",
        }
    }
}
