//! A hierarchical timer wheel: a pure data structure, generic over the key.
//!
//! Six levels of 64 slots; level `L` slots span `64^L` ticks, so the wheel covers `2^36` ticks
//! (with 1 ms ticks, about 795 days; later deadlines are clamped). Entries live in a slab and
//! form intrusive doubly linked lists per slot, so insert and cancel are O(1). A per-level
//! occupancy bitmap finds the next non-empty slot with one `trailing_zeros`. Polling cascades
//! entries from higher levels down as time reaches their slot; an entry fires at exactly its
//! deadline tick, never earlier.

const LEVELS: usize = 6;
const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
/// Deadlines are clamped to this many ticks after the wheel's current time.
pub const MAX_SPAN: u64 = (1 << (SLOT_BITS as u64 * LEVELS as u64)) - 1;
const NIL: u32 = u32::MAX;
/// List index for entries that were already due when inserted.
const DUE: usize = LEVELS * SLOTS;

/// Identifies an inserted timer; stale handles are detected by generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TimerHandle {
    idx: u32,
    gen: u32,
}

#[derive(Clone, Debug)]
struct Entry<K> {
    key: Option<K>,
    deadline: u64,
    next: u32,
    prev: u32,
    list: u32,
    gen: u32,
}

/// The wheel. `K` is whatever the owner wants back when a timer fires.
#[derive(Debug)]
pub struct TimerWheel<K> {
    entries: Vec<Entry<K>>,
    free: u32,
    heads: Vec<u32>,
    occupied: [u64; LEVELS],
    elapsed: u64,
    len: usize,
}

impl<K: Copy> Default for TimerWheel<K> {
    fn default() -> Self {
        Self::new(0)
    }
}

impl<K: Copy> TimerWheel<K> {
    /// An empty wheel whose clock starts at `now`.
    pub fn new(now: u64) -> Self {
        Self {
            entries: Vec::new(),
            free: NIL,
            heads: vec![NIL; DUE + 1],
            occupied: [0; LEVELS],
            elapsed: now,
            len: 0,
        }
    }

    /// An empty wheel with room for `n` timers before its slab grows.
    pub fn with_capacity(now: u64, n: usize) -> Self {
        let mut w = Self::new(now);
        w.entries.reserve(n);
        w
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `key` to fire at `deadline`. A deadline at or before the wheel's time fires on
    /// the next poll.
    pub fn insert(&mut self, deadline: u64, key: K) -> TimerHandle {
        let deadline = deadline.min(self.elapsed.saturating_add(MAX_SPAN));
        let idx = if self.free != NIL {
            let i = self.free;
            self.free = self.entries[i as usize].next;
            let e = &mut self.entries[i as usize];
            e.key = Some(key);
            e.deadline = deadline;
            e.gen = e.gen.wrapping_add(1);
            i
        } else {
            self.entries.push(Entry { key: Some(key), deadline, next: NIL, prev: NIL, list: 0, gen: 0 });
            (self.entries.len() - 1) as u32
        };
        self.link(idx);
        self.len += 1;
        TimerHandle { idx, gen: self.entries[idx as usize].gen }
    }

    /// Cancels a pending timer and returns its key; `None` if it already fired or was cancelled.
    pub fn cancel(&mut self, h: TimerHandle) -> Option<K> {
        let e = self.entries.get(h.idx as usize)?;
        if e.gen != h.gen || e.key.is_none() {
            return None;
        }
        self.unlink(h.idx);
        Some(self.release(h.idx))
    }

    /// The deadline of a pending timer.
    pub fn deadline(&self, h: TimerHandle) -> Option<u64> {
        let e = self.entries.get(h.idx as usize)?;
        (e.gen == h.gen && e.key.is_some()).then_some(e.deadline)
    }

    /// Earliest time at which [`poll`](Self::poll) has work to do: a lower bound on the
    /// earliest pending deadline (exact for timers in the finest level).
    pub fn next_expiry(&self) -> Option<u64> {
        if self.heads[DUE] != NIL {
            return Some(self.elapsed);
        }
        (0..LEVELS).filter_map(|l| self.next_slot(l).map(|(_, t)| t)).min()
    }

    /// Advances the wheel to `now` and appends every key whose deadline is `<= now` to `out`.
    pub fn poll(&mut self, now: u64, out: &mut Vec<K>) {
        self.drain_list(DUE, out);
        while let Some((level, slot, start)) = self.next_due(now) {
            self.elapsed = start;
            self.occupied[level] &= !(1u64 << slot);
            let mut i = std::mem::replace(&mut self.heads[level * SLOTS + slot], NIL);
            while i != NIL {
                let next = self.entries[i as usize].next;
                if self.entries[i as usize].deadline <= start {
                    out.push(self.release(i));
                } else {
                    self.link(i);
                }
                i = next;
            }
        }
        if now > self.elapsed {
            self.elapsed = now;
        }
    }

    fn next_due(&self, now: u64) -> Option<(usize, usize, u64)> {
        let mut best: Option<(usize, usize, u64)> = None;
        for level in 0..LEVELS {
            if let Some((slot, t)) = self.next_slot(level) {
                if t <= now && best.is_none_or(|b| t < b.2) {
                    best = Some((level, slot, t));
                }
            }
        }
        best
    }

    /// The next occupied slot of `level` and the tick at which it starts.
    fn next_slot(&self, level: usize) -> Option<(usize, u64)> {
        let occ = self.occupied[level];
        if occ == 0 {
            return None;
        }
        let shift = SLOT_BITS * level as u32;
        let now_slot = ((self.elapsed >> shift) & (SLOTS as u64 - 1)) as u32;
        let slot = ((occ.rotate_right(now_slot).trailing_zeros() + now_slot) % SLOTS as u32) as u64;
        let level_range = 1u64 << (shift + SLOT_BITS);
        let level_start = self.elapsed & !(level_range - 1);
        let mut t = level_start + (slot << shift);
        if t < self.elapsed {
            // Only the top level wraps: its slots act as a ring for clamped far deadlines.
            t += level_range;
        }
        Some((slot as usize, t))
    }

    fn list_for(&self, deadline: u64) -> usize {
        if deadline <= self.elapsed {
            return DUE;
        }
        let masked = (self.elapsed ^ deadline) | (SLOTS as u64 - 1);
        let significant = 63 - masked.leading_zeros();
        let level = ((significant / SLOT_BITS) as usize).min(LEVELS - 1);
        let slot = ((deadline >> (SLOT_BITS * level as u32)) & (SLOTS as u64 - 1)) as usize;
        level * SLOTS + slot
    }

    fn link(&mut self, i: u32) {
        let list = self.list_for(self.entries[i as usize].deadline);
        let head = self.heads[list];
        {
            let e = &mut self.entries[i as usize];
            e.list = list as u32;
            e.prev = NIL;
            e.next = head;
        }
        if head != NIL {
            self.entries[head as usize].prev = i;
        }
        self.heads[list] = i;
        if list < DUE {
            self.occupied[list / SLOTS] |= 1u64 << (list % SLOTS);
        }
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next, list) = {
            let e = &self.entries[i as usize];
            (e.prev, e.next, e.list as usize)
        };
        if prev != NIL {
            self.entries[prev as usize].next = next;
        } else {
            self.heads[list] = next;
            if next == NIL && list < DUE {
                self.occupied[list / SLOTS] &= !(1u64 << (list % SLOTS));
            }
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
    }

    fn release(&mut self, i: u32) -> K {
        let e = &mut self.entries[i as usize];
        let key = e.key.take();
        e.next = self.free;
        self.free = i;
        self.len -= 1;
        match key {
            Some(k) => k,
            None => unreachable!("released a vacant timer entry"),
        }
    }

    fn drain_list(&mut self, list: usize, out: &mut Vec<K>) {
        let mut i = std::mem::replace(&mut self.heads[list], NIL);
        while i != NIL {
            let next = self.entries[i as usize].next;
            out.push(self.release(i));
            i = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_exactly_at_deadline() {
        for deadline in [1u64, 63, 64, 65, 4095, 4096, 10_000, 60_000, 1 << 20] {
            let mut w = TimerWheel::new(0);
            w.insert(deadline, deadline);
            let mut out = Vec::new();
            while let Some(next) = w.next_expiry().filter(|&n| n < deadline) {
                w.poll(next, &mut out);
                assert!(out.is_empty(), "fired early at {next} for {deadline}");
            }
            assert_eq!(w.next_expiry(), Some(deadline));
            w.poll(deadline - 1, &mut out);
            assert!(out.is_empty());
            w.poll(deadline, &mut out);
            assert_eq!(out, vec![deadline]);
            assert!(w.is_empty());
        }
    }

    #[test]
    fn cancel_and_stale_handles() {
        let mut w = TimerWheel::new(100);
        let a = w.insert(200, 'a');
        let b = w.insert(50, 'b');
        assert_eq!(w.cancel(a), Some('a'));
        assert_eq!(w.cancel(a), None);
        let c = w.insert(300, 'c');
        assert_eq!(w.cancel(a), None, "reused slot must not be cancelled via a stale handle");
        let mut out = Vec::new();
        w.poll(100, &mut out);
        assert_eq!(out, vec!['b']);
        assert_eq!(w.cancel(b), None);
        assert_eq!(w.deadline(c), Some(300));
        w.poll(1000, &mut out);
        assert_eq!(out, vec!['b', 'c']);
    }

    #[test]
    fn far_deadlines_are_clamped_not_lost() {
        let mut w = TimerWheel::new(0);
        w.insert(u64::MAX, 1u8);
        let mut out = Vec::new();
        w.poll(MAX_SPAN - 1, &mut out);
        assert!(out.is_empty());
        w.poll(MAX_SPAN, &mut out);
        assert_eq!(out, vec![1]);
    }
}
