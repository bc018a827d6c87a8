//! The allocation table: a slab of slots addressed by an index embedded in the allocation ID.
//!
//! The relay mints every ID, so it writes the slot index into ID bytes `12..16` (big-endian).
//! A lookup reads that index, bounds-checks it and compares all 16 bytes: O(1), no hashing of
//! attacker-chosen bytes, and a forged ID can only ever name a slot whose full ID it must match.
//! Freed slots keep their last ID as a tombstone (until reused, FIFO) so a message from an
//! allocation that timed out can be told apart from one that never existed.
//!
//! Hot routing fields and the cold 64-byte HMAC states live in separate vectors.

use std::net::SocketAddr;

use crate::auth::PreKeyedHmac;
use crate::clock::Millis;
use crate::timer::TimerHandle;
use crate::wire::AllocationId;

pub(crate) const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotState {
    Live,
    /// Free; the last occupant was released for another reason (or there was none).
    Vacant,
    /// Free; the last occupant timed out.
    TimedOut,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Host { max_peers: u16, linked: u16, joiners: u16, first_joiner: u32 },
    Joiner { host: u32, linked: bool, prev: u32, next: u32 },
}

#[derive(Clone, Debug)]
pub(crate) struct Slot {
    pub id: AllocationId,
    pub bound: Option<SocketAddr>,
    pub last_seen: Millis,
    pub created: Millis,
    pub timer: TimerHandle,
    pub role: Role,
    pub nonce: u16,
    pub state: SlotState,
    pub next_free: u32,
    /// Bytes that may still be relayed to `bound` before its client speaks; [`CONFIRMED`] once it has.
    pub budget: u32,
    /// Bytes of RELAY traffic this allocation's client has sent (for operators' listings).
    pub rx_bytes: u64,
    /// Links of this allocation published to the kernel fast path (a joiner's 0 or 1, a host's
    /// count). While non-zero its last traffic may be known only to the kernel.
    pub kernel: u16,
}

/// `Slot::budget` of an address that has sent something other than a BIND.
pub(crate) const CONFIRMED: u32 = u32::MAX;

pub(crate) enum Found {
    Live(u32),
    TimedOut,
    Unknown,
}

/// A keyed permutation of 32-bit slot indices (a four-round Feistel network on 16-bit halves),
/// so the index an ID carries looks random: two IDs minted a thousand allocations apart do not
/// differ by about a thousand, and IDs reveal nothing about how many allocations were made. Its
/// keys derive from the relay secret. Two multiplications per round: a few nanoseconds per
/// lookup.
#[derive(Clone, Copy, Debug)]
pub struct SlotCipher {
    keys: [u32; 4],
}

impl SlotCipher {
    pub fn new(keys: [u32; 4]) -> Self {
        Self { keys }
    }

    #[inline]
    fn round(half: u32, key: u32) -> u32 {
        // lowbias32 over the half and the round key.
        let mut x = half ^ key;
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb_352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846c_a68b);
        x ^= x >> 16;
        x & 0xFFFF
    }

    #[inline]
    pub fn encrypt(&self, v: u32) -> u32 {
        let (mut l, mut r) = (v >> 16, v & 0xFFFF);
        for k in self.keys {
            (l, r) = (r, l ^ Self::round(r, k));
        }
        (l << 16) | r
    }

    #[inline]
    pub fn decrypt(&self, v: u32) -> u32 {
        let (mut l, mut r) = (v >> 16, v & 0xFFFF);
        for k in self.keys.iter().rev() {
            (l, r) = (r ^ Self::round(l, *k), l);
        }
        (l << 16) | r
    }
}

/// Writes version/variant bits, the owner shard and the enciphered slot index into fresh random
/// bytes.
pub(crate) fn mint_id(
    mut b: [u8; 16],
    shard: u32,
    shards: u32,
    slot: u32,
    cipher: &SlotCipher,
) -> AllocationId {
    let shards = shards.max(1);
    let v = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let (base, shard) = (v - v % shards, shard % shards);
    let owned = base.checked_add(shard).unwrap_or(base.wrapping_sub(shards).wrapping_add(shard));
    b[..4].copy_from_slice(&owned.to_be_bytes());
    b[6] = (b[6] & 0x0F) | 0x40;
    b[8] = (b[8] & 0x3F) | 0x80;
    b[12..16].copy_from_slice(&cipher.encrypt(slot).to_be_bytes());
    AllocationId(b)
}

/// The shard that owns `id` among `shards` (`docs/protocol.md`, "Allocation IDs and connection data").
pub fn owner_shard(id: &AllocationId, shards: u32) -> u32 {
    u32::from_be_bytes([id.0[0], id.0[1], id.0[2], id.0[3]]) % shards.max(1)
}

#[inline]
fn slot_of(id: &AllocationId, cipher: &SlotCipher) -> usize {
    cipher.decrypt(u32::from_be_bytes([id.0[12], id.0[13], id.0[14], id.0[15]])) as usize
}

#[derive(Debug)]
pub(crate) struct Table {
    pub slots: Vec<Slot>,
    pub keys: Vec<PreKeyedHmac>,
    free_head: u32,
    free_tail: u32,
    live: usize,
    cap: usize,
    /// Enciphers the slot index in IDs, so IDs do not reveal how many allocations exist.
    pub cipher: SlotCipher,
    /// Fleet mode only (boxed, so a single relay's table stays as small as it was).
    fleet: Option<Box<FleetIndex>>,
}

impl FleetIndex {
    /// Out of line: the hashing must not bloat the single relay's inlined lookup.
    #[inline(never)]
    fn find(&self, id: &AllocationId) -> Found {
        match self.index.get(id) {
            Some(&i) => Found::Live(i),
            None => match self.graves.get(id) {
                Some(true) => Found::TimedOut,
                _ => Found::Unknown,
            },
        }
    }
}

/// How a fleet relay finds and remembers API-minted IDs.
#[derive(Debug, Default)]
struct FleetIndex {
    /// IDs carry no slot index, so they are found through this map (SipHash with a random key:
    /// attacker-chosen IDs cannot aim collisions).
    index: std::collections::HashMap<AllocationId, u32>,
    /// IDs that ended here (true: timed out), kept until `order` says they can no longer be
    /// inside a token's bind window.
    graves: std::collections::HashMap<AllocationId, bool>,
    order: std::collections::VecDeque<(Millis, AllocationId)>,
}

impl Table {
    pub fn new(cap: usize, cipher: SlotCipher) -> Self {
        Self {
            slots: Vec::new(),
            keys: Vec::new(),
            free_head: NIL,
            free_tail: NIL,
            live: 0,
            cap,
            cipher,
            fleet: None,
        }
    }

    /// A table for fleet-minted IDs (found by map, not by an index they carry).
    pub fn new_indexed(cap: usize, cipher: SlotCipher) -> Self {
        Self { fleet: Some(Box::default()), ..Self::new(cap, cipher) }
    }

    pub fn is_indexed(&self) -> bool {
        self.fleet.is_some()
    }

    /// Fleet mode: remembers that `id` ended here until `until`.
    pub fn bury(&mut self, id: AllocationId, timed_out: bool, until: Millis) {
        let cap = self.cap;
        let Some(f) = &mut self.fleet else { return };
        if f.graves.insert(id, timed_out).is_none() {
            f.order.push_back((until, id));
        }
        while f.order.len() > cap {
            if let Some((_, old)) = f.order.pop_front() {
                f.graves.remove(&old);
            }
        }
    }

    /// Forgets graves whose time has passed.
    pub fn purge_graves(&mut self, now: Millis) {
        let Some(f) = &mut self.fleet else { return };
        while f.order.front().is_some_and(|(until, _)| *until <= now) {
            if let Some((_, id)) = f.order.pop_front() {
                f.graves.remove(&id);
            }
        }
    }

    /// Whether `id` ended here recently (fleet mode).
    pub fn buried(&self, id: &AllocationId) -> bool {
        self.fleet.as_ref().is_some_and(|f| f.graves.contains_key(id))
    }

    pub fn live(&self) -> usize {
        self.live
    }

    #[inline(always)]
    pub fn find(&self, id: &AllocationId) -> Found {
        if self.fleet.is_some() {
            return self.find_indexed(id);
        }
        let i = slot_of(id, &self.cipher);
        match self.slots.get(i) {
            Some(s) if s.id == *id => match s.state {
                SlotState::Live => Found::Live(i as u32),
                SlotState::TimedOut => Found::TimedOut,
                SlotState::Vacant => Found::Unknown,
            },
            _ => Found::Unknown,
        }
    }

    /// A fleet relay's lookup: cold and out of line, so a single relay's `find` stays a few
    /// inlined instructions (BENCHMARKS.md, "Core micro-benchmarks": with the fleet lookup inline,
    /// a RELAY at 100k and 1M allocations measured about 10–25 ns slower).
    #[cold]
    #[inline(never)]
    fn find_indexed(&self, id: &AllocationId) -> Found {
        self.fleet.as_ref().map_or(Found::Unknown, |f| f.find(id))
    }

    /// Takes a free slot (oldest freed first) or grows, up to the cap.
    pub fn alloc(&mut self, now: Millis, role: Role, mint: impl FnOnce(u32) -> AllocationId) -> Option<u32> {
        let idx = if self.free_head != NIL {
            let i = self.free_head;
            self.free_head = self.slots[i as usize].next_free;
            if self.free_head == NIL {
                self.free_tail = NIL;
            }
            i
        } else if self.slots.len() < self.cap {
            self.slots.push(Slot {
                id: AllocationId::default(),
                bound: None,
                last_seen: now,
                created: now,
                timer: TimerHandle::default(),
                role,
                nonce: 0,
                state: SlotState::Vacant,
                next_free: NIL,
                budget: 0,
                rx_bytes: 0,
                kernel: 0,
            });
            self.keys.push(PreKeyedHmac::new(&[0; 64]));
            (self.slots.len() - 1) as u32
        } else {
            return None;
        };
        let mut id = mint(idx);
        if id == self.slots[idx as usize].id && self.fleet.is_none() {
            id.0[9] ^= 1;
        }
        if let Some(f) = &mut self.fleet {
            f.index.insert(id, idx);
        }
        let s = &mut self.slots[idx as usize];
        *s = Slot {
            id,
            bound: None,
            last_seen: now,
            created: now,
            timer: TimerHandle::default(),
            role,
            nonce: 0,
            state: SlotState::Live,
            next_free: NIL,
            budget: 0,
            rx_bytes: 0,
            kernel: 0,
        };
        self.live += 1;
        Some(idx)
    }

    pub fn free(&mut self, i: u32, timed_out: bool) {
        if let Some(f) = &mut self.fleet {
            f.index.remove(&self.slots[i as usize].id);
        }
        let s = &mut self.slots[i as usize];
        s.state = if timed_out { SlotState::TimedOut } else { SlotState::Vacant };
        s.bound = None;
        s.next_free = NIL;
        self.live -= 1;
        if self.free_tail == NIL {
            self.free_head = i;
        } else {
            self.slots[self.free_tail as usize].next_free = i;
        }
        self.free_tail = i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_ids_are_uuid_v4_owned_and_indexed() {
        for shards in [1u32, 2, 3, 7, 16, 64] {
            for shard in 0..shards {
                for seed in [[0u8; 16], [0xFF; 16], [0x5A; 16]] {
                    let c = SlotCipher::new([0xA5A5_0F0F, 1, 2, 3]);
                    let id = mint_id(seed, shard, shards, 12345, &c);
                    assert_eq!(owner_shard(&id, shards), shard);
                    assert_eq!(id.0[6] >> 4, 4);
                    assert_eq!(id.0[8] >> 6, 0b10);
                    assert_eq!(slot_of(&id, &c), 12345);
                    assert_ne!(&id.0[12..16], &12345u32.to_be_bytes());
                }
            }
        }
    }

    #[test]
    fn slot_cipher_is_a_permutation_that_hides_order() {
        let c = SlotCipher::new([0x1234_5678, 0x9abc_def0, 0x0f1e_2d3c, 0x4b5a_6978]);
        let mut seen = std::collections::HashSet::new();
        for v in (0..200_000u32).chain([u32::MAX, u32::MAX - 1, 1 << 31]) {
            let e = c.encrypt(v);
            assert_eq!(c.decrypt(e), v);
            assert!(seen.insert(e), "collision at {v}");
        }
        // Consecutive and 1,001-apart slots do not give nearby or evenly spaced indices.
        let near = (0..1000u32).filter(|&v| c.encrypt(v + 1001).abs_diff(c.encrypt(v)) < 65_536).count();
        assert!(near < 10, "{near} of 1000 pairs within 2^16");
        assert_ne!(c.encrypt(1) ^ c.encrypt(0), c.encrypt(2) ^ c.encrypt(3));
    }

    #[test]
    fn tombstones_and_fifo_reuse() {
        let role = Role::Host { max_peers: 1, linked: 0, joiners: 0, first_joiner: NIL };
        let c7 = SlotCipher::new([7; 4]);
        let mut t = Table::new(2, c7);
        let a = t.alloc(0, role, |i| mint_id([1; 16], 0, 1, i, &c7)).unwrap();
        let b = t.alloc(0, role, |i| mint_id([2; 16], 0, 1, i, &c7)).unwrap();
        assert!(t.alloc(0, role, |i| mint_id([3; 16], 0, 1, i, &c7)).is_none(), "cap");
        let (ida, idb) = (t.slots[a as usize].id, t.slots[b as usize].id);
        t.free(a, true);
        t.free(b, false);
        assert!(matches!(t.find(&ida), Found::TimedOut));
        assert!(matches!(t.find(&idb), Found::Unknown));
        let c = t.alloc(0, role, |i| mint_id([4; 16], 0, 1, i, &c7)).unwrap();
        assert_eq!(c, a, "oldest freed slot is reused first");
        assert!(matches!(t.find(&ida), Found::Unknown));
        assert!(matches!(t.find(&idb), Found::Unknown));
        assert_eq!(t.live(), 1);
    }
}
