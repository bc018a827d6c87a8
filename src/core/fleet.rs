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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::auth::token::TokenRole;
    use crate::auth::AllocationKey;
    use crate::client::packets;
    use crate::core::{Action, Core, CoreConfig, DropReason};

    const FLEET_KEY: [u8; 32] = [3; 32];
    const UNIX_AT_ZERO: u64 = 1_800_000_000_000;

    fn core() -> Core {
        let mut c = CoreConfig::new([1; 64]);
        c.fleet = Some(FleetRelay::new("eu-1", 42, &[(1, FLEET_KEY.to_vec())], UNIX_AT_ZERO));
        Core::new(c, 0)
    }

    fn mint(id: [u8; 16], role: TokenRole) -> (AllocationId, AllocationKey, [u8; 255]) {
        let rk = relay_key(&FLEET_KEY, "eu-1", 42);
        let mut id = id;
        id[15] = 1;
        let id = AllocationId(id);
        let t = Token { id, role, relay: relay_tag("eu-1"), epoch: 42, not_after_ms: UNIX_AT_ZERO + 60_000 };
        (id, AllocationKey(crate::core::allocation_key(&rk, &id)), t.emit(&rk))
    }

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([10, 1, 1, 1], p))
    }

    #[test]
    fn a_session_of_fleet_tokens_and_a_joiner_that_binds_before_its_host() {
        let mut c = core();
        let (h, hk, hc) = mint([9; 16], TokenRole::Host { max_connections: 2 });
        let mut jid = [4; 16];
        jid[..4].copy_from_slice(&h.0[..4]);
        let (j, jk, jc) = mint(jid, TokenRole::Joiner { host: h });
        // The joiner first: its host is not here yet, so it is dropped (its client retries).
        let mut d = packets::bind(&jk, 1, &jc);
        assert_eq!(c.handle_datagram(10, addr(2), &mut d), Action::Drop(DropReason::TokenRefused));
        assert_eq!(c.stats().bind_rejects[BindReject::HostAbsent as usize], 1);
        let mut d = packets::bind(&hk, 1, &hc);
        assert_eq!(c.handle_datagram(20, addr(1), &mut d), Action::Reply(4));
        let mut d = packets::bind(&jk, 1, &jc);
        assert_eq!(c.handle_datagram(30, addr(2), &mut d), Action::Reply(4));
        let mut d = packets::connect_request(&j, &hc);
        assert!(matches!(c.handle_datagram(40, addr(2), &mut d), Action::Reply(36)));
        let mut d = packets::relay(&j, &h, b"hi").unwrap();
        assert_eq!(c.handle_datagram(50, addr(2), &mut d), Action::Forward(addr(1)));
        // A BIND signed with another key is refused like any bad HMAC.
        let mut d = packets::bind(&AllocationKey([0; 64]), 2, &hc);
        assert_eq!(c.handle_datagram(60, addr(3), &mut d), Action::Drop(DropReason::BadHmac));
        // The host leaves; its token cannot bring it back, and neither can the joiner's.
        let mut d = packets::close(&h);
        assert_eq!(c.handle_datagram(70, addr(1), &mut d), Action::Consumed);
        let mut d = packets::bind(&hk, 3, &hc);
        assert!(matches!(c.handle_datagram(80, addr(1), &mut d), Action::Reply(21)));
        assert_eq!(c.stats().bind_rejects[BindReject::Closed as usize], 1);
        // Once no token can still be in its bind window, the grave is forgotten.
        c.handle_timeout(70 + 60_000 + 5_000 + 1);
        let mut d = packets::bind(&hk, 3, &hc);
        assert!(matches!(c.handle_datagram(70 + 65_002, addr(1), &mut d), Action::Reply(21)));
        assert_eq!(c.stats().bind_rejects[BindReject::Expired as usize], 1, "by then the token has expired");
    }

    #[test]
    fn keys_rotate_through_reconfigure() {
        let mut c = core();
        let (_, hk, hc) = mint([8; 16], TokenRole::Host { max_connections: 2 });
        let next = FleetRelay::new("eu-1", 42, &[(2, vec![6; 32])], UNIX_AT_ZERO);
        let r = crate::core::Reconfig {
            policy: Default::default(),
            unbound_timeout: 60_000,
            idle_timeout: 10_000,
            host_alone_timeout: 60_000,
            rebind_quiet: 5_000,
            unconfirmed_budget: 32 * 1024,
            stun: true,
            qos: true,
            fleet: Some(next),
        };
        c.handle_control(1, crate::core::Control::Reconfigure(Box::new(r))).unwrap();
        let mut d = packets::bind(&hk, 1, &hc);
        assert_eq!(
            c.handle_datagram(2, addr(1), &mut d),
            Action::Drop(DropReason::TokenRefused),
            "kid 1 retired"
        );
        assert_eq!(c.stats().bind_rejects[BindReject::Forged as usize], 1);
    }
}
