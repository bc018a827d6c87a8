//! The sans-IO shard state machine (`docs/protocol.md`, "Sessions").
//!
//! A [`Core`] owns the allocations of one shard outright. It is fed datagrams, control commands
//! and the current time, and answers with what to send where:
//!
//! - [`Core::handle_datagram`]`(now, src, buf)` → [`Action`]: forward `buf` unchanged, reply with
//!   `buf[..n]` (replies are written in place: a reply is never larger than its trigger), or drop
//!   for a counted reason;
//! - [`Core::handle_control`]`(now, cmd)` for the control plane;
//! - [`Core::handle_timeout`]`(now)` / [`Core::poll_timeout`] for the timer wheel;
//! - [`Core::poll_transmit`] for relay-originated datagrams (DISCONNECT when a host goes away) and
//!   [`Core::poll_event`] for lifecycle events.
//!
//! It reads no clock, opens no socket and allocates nothing per forwarded packet.
//!
//! Timers are lazy: each allocation has one wheel entry. Traffic only stores `last_seen`; when the
//! entry fires, the real deadline is recomputed and the entry re-armed if it moved. Changes that
//! bring a deadline *earlier* (first BIND, a host's first peer) re-arm at once. A message that
//! finds its allocation past the deadline expires it on the spot, so expiry is exact whatever the
//! driver's polling cadence.

mod control;
mod fleet;
mod handlers;
mod kernel;
mod limiter;
mod policy;
mod qos;
mod stats;
mod stun;
mod table;

pub use control::{AllocationInfo, Control, ControlError, ControlReply, Created, Entropy, Event, Reconfig};
pub use fleet::{BindReject, FleetRelay};
pub use kernel::{KernelCheck, LinkOp};
pub use limiter::Rate;
pub use policy::{canonical_ip, AddressPolicy, Cidr};
pub use qos::QosOutcome;
pub use stats::{DropReason, ReleaseReason, Stats};
pub use stun::{StunOutcome, MAX_AMPLIFICATION};
pub use table::owner_shard;

use std::collections::VecDeque;
use std::net::SocketAddr;

use limiter::ErrorLimiter;
use table::{mint_id, Role, Table, NIL};

use crate::auth::{AllocationKey, ConnectionData, PreKeyedHmac};
use crate::clock::Millis;
use crate::timer::TimerWheel;
use crate::wire::{AllocationId, Disconnect};

/// The key of allocation `id`: HMAC-SHA-512 of the ID under the relay secret, so every shard (and
/// the DTLS layer, which needs it as the PSK before it knows which shard owns the allocation) can
/// recompute it from the ID alone. It is as unpredictable as a random key while the secret is.
pub fn allocation_key(secret: &[u8; 64], id: &AllocationId) -> [u8; 64] {
    use hmac::Mac;
    let mut m = <hmac::Hmac<sha2::Sha512> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(b"ferry allocation key");
    m.update(&id.0);
    m.finalize().into_bytes().into()
}

/// Tunables of one shard. Times are in milliseconds.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// This shard's index and the total; minted IDs satisfy `owner_shard(id, shards) == shard`.
    pub shard: u32,
    pub shards: u32,
    /// Most allocations this shard holds at once.
    pub max_allocations: u32,
    /// Largest `maxConnections` a host may ask for.
    pub max_connections_cap: u16,
    /// An allocation never bound expires this long after creation.
    pub unbound_timeout: Millis,
    /// A bound allocation expires after this long with no datagram from its client.
    pub idle_timeout: Millis,
    /// A bound host with no linked peer gets this instead of `idle_timeout`.
    pub host_alone_timeout: Millis,
    /// A valid BIND from a new address moves the binding once the old one has been quiet this long.
    pub rebind_quiet: Millis,
    /// ERROR/REJECTED replies per source IP, and per shard.
    pub error_rate_per_ip: Rate,
    pub error_rate_global: Rate,
    /// Buckets in the per-IP reply limiter table.
    pub limiter_buckets: usize,
    /// The relay secret under which connection data is minted and checked.
    pub conn_secret: [u8; 64],
    /// Which sources may be answered and bound.
    pub policy: AddressPolicy,
    /// Bytes relayed to a newly bound address before its client has sent anything but BINDs
    /// (bounds what a spoofed BIND can point at a third party).
    pub unconfirmed_budget: u32,
    /// Answer STUN Binding requests on the relay port.
    pub stun: bool,
    /// STUN answers per source IP, and per shard.
    pub stun_rate_per_ip: Rate,
    pub stun_rate_global: Rate,
    /// Answer Unity QoS pings on the relay port.
    pub qos: bool,
    /// QoS answers per source IP, and per shard.
    pub qos_rate_per_ip: Rate,
    pub qos_rate_global: Rate,
    /// Fleet mode: allocations are minted by API instances and admitted at BIND.
    pub fleet: Option<FleetRelay>,
    /// Publish established links for the kernel fast path ([`Core::poll_link_op`]).
    pub kernel_links: bool,
}

impl CoreConfig {
    /// Documented defaults with the given relay secret.
    pub fn new(conn_secret: [u8; 64]) -> Self {
        Self {
            shard: 0,
            shards: 1,
            max_allocations: 1 << 20,
            max_connections_cap: 100,
            unbound_timeout: 60_000,
            idle_timeout: 10_000,
            host_alone_timeout: 60_000,
            rebind_quiet: 5_000,
            error_rate_per_ip: Rate { per_sec: 20, burst: 40 },
            error_rate_global: Rate { per_sec: 20_000, burst: 20_000 },
            limiter_buckets: 4096,
            conn_secret,
            policy: AddressPolicy::default(),
            unconfirmed_budget: 32 * 1024,
            stun: true,
            stun_rate_per_ip: Rate { per_sec: 10, burst: 20 },
            stun_rate_global: Rate { per_sec: 10_000, burst: 10_000 },
            qos: true,
            qos_rate_per_ip: Rate { per_sec: 10, burst: 20 },
            qos_rate_global: Rate { per_sec: 20_000, burst: 20_000 },
            fleet: None,
            kernel_links: false,
        }
    }
}

/// What to do with a datagram after [`Core::handle_datagram`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send the datagram, unchanged, to this address.
    Forward(SocketAddr),
    /// Send `buf[..n]` back to the source.
    Reply(usize),
    /// Accepted; nothing to send.
    Consumed,
    /// Nothing to send, counted under this reason.
    Drop(DropReason),
}

/// A datagram the relay originates (not a reply): a DISCONNECT to a host's peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub len: usize,
    pub data: [u8; Disconnect::<&[u8]>::LEN],
}

impl Transmit {
    pub fn payload(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

/// One shard's relay state machine.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    table: Table,
    wheel: TimerWheel<u32>,
    conn: ConnectionData,
    limiter: ErrorLimiter,
    stun_limiter: ErrorLimiter,
    qos_limiter: ErrorLimiter,
    stats: Stats,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    fired: Vec<u32>,
    link_ops: VecDeque<LinkOp>,
    kernel_checks: VecDeque<KernelCheck>,
    /// The latest time the core was driven with (for work that has no `now` of its own).
    now: Millis,
}

impl Core {
    pub fn new(cfg: CoreConfig, now: Millis) -> Self {
        let cipher = {
            let m = PreKeyedHmac::new(&cfg.conn_secret).mac(b"ferry slot permutation");
            let k = |i: usize| u32::from_be_bytes([m[i], m[i + 1], m[i + 2], m[i + 3]]);
            table::SlotCipher::new([k(0), k(4), k(8), k(12)])
        };
        Self {
            table: match cfg.fleet {
                Some(_) => Table::new_indexed(cfg.max_allocations as usize, cipher),
                None => Table::new(cfg.max_allocations as usize, cipher),
            },
            now,
            wheel: TimerWheel::new(now),
            conn: ConnectionData::new(&cfg.conn_secret),
            limiter: ErrorLimiter::new(cfg.limiter_buckets, cfg.error_rate_per_ip, cfg.error_rate_global),
            stun_limiter: ErrorLimiter::new(cfg.limiter_buckets, cfg.stun_rate_per_ip, cfg.stun_rate_global),
            qos_limiter: ErrorLimiter::new(cfg.limiter_buckets, cfg.qos_rate_per_ip, cfg.qos_rate_global),
            stats: Stats::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            fired: Vec::new(),
            link_ops: VecDeque::new(),
            kernel_checks: VecDeque::new(),
            cfg,
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Allocations currently live on this shard.
    pub fn allocations(&self) -> usize {
        self.table.live()
    }

    /// The address `id` is bound to, if it is live and bound.
    pub fn bound_addr(&self, id: &AllocationId) -> Option<SocketAddr> {
        match self.table.find(id) {
            table::Found::Live(i) => self.table.slots[i as usize].bound,
            _ => None,
        }
    }

    /// Whether `id` is a live allocation.
    pub fn is_live(&self, id: &AllocationId) -> bool {
        matches!(self.table.find(id), table::Found::Live(_))
    }

    pub fn handle_control(&mut self, now: Millis, cmd: Control) -> Result<ControlReply, ControlError> {
        self.now = self.now.max(now);
        match cmd {
            Control::CreateHost { max_connections, entropy } => {
                self.create_host(now, max_connections, entropy).map(|c| ControlReply::Created(Box::new(c)))
            }
            Control::CreateJoiner { host, entropy } => {
                self.create_joiner(now, &host, entropy).map(|c| ControlReply::Created(Box::new(c)))
            }
            Control::Release { id } => match self.table.find(&id) {
                table::Found::Live(i) => {
                    self.release(i, ReleaseReason::Control);
                    Ok(ControlReply::Released)
                }
                _ => Err(ControlError::NotFound),
            },
            Control::RemoveJoiners { host, key, joiner } => {
                self.remove_joiners(now, &host, &key, joiner).map(ControlReply::Removed)
            }
            Control::List => Ok(ControlReply::List(self.list(now))),
            Control::Reconfigure(r) => {
                let c = &mut self.cfg;
                c.policy = r.policy;
                c.unbound_timeout = r.unbound_timeout;
                c.idle_timeout = r.idle_timeout;
                c.host_alone_timeout = r.host_alone_timeout;
                c.rebind_quiet = r.rebind_quiet;
                c.unconfirmed_budget = r.unconfirmed_budget;
                c.stun = r.stun;
                c.qos = r.qos;
                if let (Some(mine), Some(new)) = (&mut c.fleet, r.fleet) {
                    mine.keys = new.keys;
                    mine.unix_at_zero = new.unix_at_zero;
                }
                self.resync_links();
                Ok(ControlReply::Released)
            }
        }
    }

    fn list(&self, now: Millis) -> Vec<AllocationInfo> {
        let slots = &self.table.slots;
        slots
            .iter()
            .filter(|s| s.state == table::SlotState::Live)
            .map(|s| {
                let (role, host, peers) = match s.role {
                    Role::Host { linked, .. } => ("host", None, linked),
                    Role::Joiner { host, linked, .. } => {
                        ("joiner", Some(slots[host as usize].id.to_string()), linked as u16)
                    }
                };
                AllocationInfo {
                    id: s.id.to_string(),
                    role,
                    host,
                    age_ms: now.saturating_sub(s.created),
                    idle_ms: now.saturating_sub(s.last_seen),
                    bound: s.bound,
                    peers,
                    bytes_relayed: s.rx_bytes,
                }
            })
            .collect()
    }

    fn remove_joiners(
        &mut self,
        now: Millis,
        host: &AllocationId,
        key: &[u8; 64],
        joiner: Option<AllocationId>,
    ) -> Result<u32, ControlError> {
        let h = match self.table.find(host) {
            table::Found::Live(h) if !self.lapsed(h, now) => h,
            _ => return Err(ControlError::HostNotFound),
        };
        let Role::Host { first_joiner, .. } = self.table.slots[h as usize].role else {
            return Err(ControlError::HostNotFound);
        };
        const PROOF: &[u8] = b"ferry host proof";
        let stored = self.table.keys[h as usize].mac(PROOF);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&stored[..], &PreKeyedHmac::new(key).mac(PROOF)[..])) {
            return Err(ControlError::WrongKey);
        }
        let mut victims = Vec::new();
        let mut j = first_joiner;
        while j != NIL {
            let s = &self.table.slots[j as usize];
            let Role::Joiner { next, linked, .. } = s.role else { break };
            if joiner.map_or(!linked, |id| id == s.id) {
                victims.push(j);
            }
            j = next;
        }
        if joiner.is_some() && victims.is_empty() {
            return Err(ControlError::NotFound);
        }
        for &v in &victims {
            self.release(v, ReleaseReason::Control);
        }
        Ok(victims.len() as u32)
    }

    pub fn create_host(
        &mut self,
        now: Millis,
        max_connections: u16,
        entropy: Entropy,
    ) -> Result<Created, ControlError> {
        if max_connections == 0 || max_connections > self.cfg.max_connections_cap {
            return Err(ControlError::MaxConnectionsOutOfRange);
        }
        let role = Role::Host { max_peers: max_connections, linked: 0, joiners: 0, first_joiner: NIL };
        let i = self.alloc(now, role, &entropy)?;
        Ok(self.created(i))
    }

    pub fn create_joiner(
        &mut self,
        now: Millis,
        host: &AllocationId,
        entropy: Entropy,
    ) -> Result<Created, ControlError> {
        let (h, role) = self.joiner_role(now, host)?;
        let j = self.alloc(now, role, &entropy)?;
        self.link_joiner(h, j);
        Ok(self.created(j))
    }

    /// The live host `host` and the role a new joiner of it takes, if the session has room.
    fn joiner_role(&mut self, now: Millis, host: &AllocationId) -> Result<(u32, Role), ControlError> {
        let h = match self.table.find(host) {
            table::Found::Live(h) => h,
            _ => return Err(ControlError::HostNotFound),
        };
        if self.lapsed(h, now) {
            self.release(h, ReleaseReason::TimedOut);
            return Err(ControlError::HostNotFound);
        }
        let (max_peers, joiners, first) = match self.table.slots[h as usize].role {
            Role::Host { max_peers, joiners, first_joiner, .. } => (max_peers, joiners, first_joiner),
            Role::Joiner { .. } => return Err(ControlError::HostNotFound),
        };
        // Joining costs no link capacity, but a leaked join code must not fill the table.
        if joiners as u32 >= (2 * max_peers as u32).max(max_peers as u32 + 16) {
            return Err(ControlError::SessionFull);
        }
        Ok((h, Role::Joiner { host: h, linked: false, prev: NIL, next: first }))
    }

    /// Puts new joiner `j` at the head of its host `h`'s list.
    fn link_joiner(&mut self, h: u32, j: u32) {
        let Role::Joiner { next: first, .. } = self.table.slots[j as usize].role else { return };
        if first != NIL {
            if let Role::Joiner { prev, .. } = &mut self.table.slots[first as usize].role {
                *prev = j;
            }
        }
        if let Role::Host { joiners, first_joiner, .. } = &mut self.table.slots[h as usize].role {
            *joiners += 1;
            *first_joiner = j;
        }
    }

    /// Fleet mode: takes a slot for admitted allocation `id` with `role` and its key.
    fn admit_slot(&mut self, now: Millis, id: AllocationId, role: Role, key: PreKeyedHmac) -> Option<u32> {
        let i = self.table.alloc(now, role, |_| id)?;
        self.arm(now, i, key);
        Some(i)
    }

    fn alloc(&mut self, now: Millis, role: Role, entropy: &Entropy) -> Result<u32, ControlError> {
        if self.table.is_indexed() {
            // A fleet relay's allocations are minted by the API instances.
            return Err(ControlError::Full);
        }
        let (shard, shards, cipher) = (self.cfg.shard, self.cfg.shards, self.table.cipher);
        let seed = entropy.id;
        let i = self
            .table
            .alloc(now, role, |slot| mint_id(seed, shard, shards, slot, &cipher))
            .ok_or(ControlError::Full)?;
        let key = allocation_key(&self.cfg.conn_secret, &self.table.slots[i as usize].id);
        self.arm(now, i, PreKeyedHmac::new(&key));
        Ok(i)
    }

    /// Sets up a freshly taken slot: its key and its timer.
    fn arm(&mut self, _now: Millis, i: u32, key: PreKeyedHmac) {
        self.table.keys[i as usize] = key;
        let deadline = self.deadline(i);
        self.table.slots[i as usize].timer = self.wheel.insert(deadline, i);
        self.stats.allocations_created += 1;
    }

    fn created(&self, i: u32) -> Created {
        let id = self.table.slots[i as usize].id;
        let key = allocation_key(&self.cfg.conn_secret, &id);
        Created { id, key: AllocationKey(key), connection_data: self.conn.build(&id) }
    }

    /// Earliest time at which [`handle_timeout`](Self::handle_timeout) has work.
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.wheel.next_expiry()
    }

    /// Expires every allocation whose deadline is `<= now`.
    pub fn handle_timeout(&mut self, now: Millis) {
        let mut fired = std::mem::take(&mut self.fired);
        self.now = self.now.max(now);
        self.table.purge_graves(now);
        self.wheel.poll(now, &mut fired);
        for &i in &fired {
            let s = &self.table.slots[i as usize];
            // A host released earlier in this batch may have taken this joiner with it.
            if s.state != table::SlotState::Live || self.wheel.deadline(s.timer).is_some() {
                continue;
            }
            let deadline = self.deadline(i);
            if now >= deadline && self.table.slots[i as usize].kernel > 0 {
                self.check_kernel(now, i);
            } else if now >= deadline {
                self.release(i, ReleaseReason::TimedOut);
            } else {
                self.table.slots[i as usize].timer = self.wheel.insert(deadline, i);
            }
        }
        fired.clear();
        self.fired = fired;
    }

    /// The next relay-originated datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next lifecycle event for the control plane.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    #[inline]
    fn deadline(&self, i: u32) -> Millis {
        let s = &self.table.slots[i as usize];
        match (s.bound, s.role) {
            (None, _) => s.created + self.cfg.unbound_timeout,
            (Some(_), Role::Host { linked: 0, .. }) => s.last_seen + self.cfg.host_alone_timeout,
            (Some(_), _) => s.last_seen + self.cfg.idle_timeout,
        }
    }

    /// Re-arms `i`'s timer at its current deadline (after a change that may bring it earlier).
    fn rearm(&mut self, i: u32) {
        let t = self.table.slots[i as usize].timer;
        self.wheel.cancel(t);
        let d = self.deadline(i);
        self.table.slots[i as usize].timer = self.wheel.insert(d, i);
    }

    /// Releases `i`. A host first sends DISCONNECT to each linked peer and takes every joiner of
    /// its session with it; a joiner leaves its host's session.
    fn release(&mut self, i: u32, reason: ReleaseReason) {
        // The kernel stops forwarding for `i` before anything else happens to it.
        match self.table.slots[i as usize].role {
            Role::Joiner { .. } => self.unpublish(i),
            Role::Host { first_joiner, .. } if self.table.slots[i as usize].kernel > 0 => {
                let mut j = first_joiner;
                while j != NIL {
                    let Role::Joiner { next, .. } = self.table.slots[j as usize].role else { break };
                    self.unpublish(j);
                    j = next;
                }
            }
            Role::Host { .. } => {}
        }
        let slot = self.table.slots[i as usize].clone();
        self.wheel.cancel(slot.timer);
        match slot.role {
            Role::Host { first_joiner, .. } => {
                let mut j = first_joiner;
                while j != NIL {
                    let js = &self.table.slots[j as usize];
                    let (next, linked, bound, jid, timer) = match js.role {
                        Role::Joiner { next, linked, .. } => (next, linked, js.bound, js.id, js.timer),
                        Role::Host { .. } => (NIL, false, None, js.id, js.timer),
                    };
                    if let (true, Some(to)) = (linked, bound) {
                        let mut data = [0u8; 36];
                        let len = Disconnect::emit(&mut data, &slot.id, &jid);
                        self.transmits.push_back(Transmit { to, len, data });
                        self.stats.notify_packets += 1;
                    }
                    self.wheel.cancel(timer);
                    self.free(j, jid, false, ReleaseReason::HostGone);
                    j = next;
                }
            }
            Role::Joiner { host, linked, prev, next } => {
                if prev != NIL {
                    if let Role::Joiner { next: n, .. } = &mut self.table.slots[prev as usize].role {
                        *n = next;
                    }
                }
                if next != NIL {
                    if let Role::Joiner { prev: p, .. } = &mut self.table.slots[next as usize].role {
                        *p = prev;
                    }
                }
                if let Role::Host { linked: l, joiners, first_joiner, .. } =
                    &mut self.table.slots[host as usize].role
                {
                    *joiners -= 1;
                    if linked {
                        *l -= 1;
                    }
                    if *first_joiner == i {
                        *first_joiner = next;
                    }
                }
            }
        }
        self.free(i, slot.id, matches!(slot.role, Role::Host { .. }), reason);
    }

    fn free(&mut self, i: u32, id: AllocationId, is_host: bool, reason: ReleaseReason) {
        let bytes = self.table.slots[i as usize].rx_bytes;
        let timed_out = reason == ReleaseReason::TimedOut;
        self.table.free(i, timed_out);
        if self.table.is_indexed() {
            // No token for `id` can still be inside its bind window after this.
            let skew = self.cfg.fleet.as_ref().map_or(0, |f| f.skew_ms);
            self.table.bury(id, timed_out, self.now + self.cfg.unbound_timeout + skew);
        }
        self.stats.released[reason as usize] += 1;
        self.events.push_back(Event::Released { id, is_host, reason, bytes });
    }
}
