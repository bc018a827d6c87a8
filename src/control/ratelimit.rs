//! Token buckets keyed by client IP or token, for the HTTP API. The table is bounded: when it
//! is full, buckets that have refilled completely (idle clients, who lose nothing by being
//! forgotten) go first; if that frees nothing, the least recently used eighth is evicted. Active
//! clients' histories (a guesser's spent failed-join budget) survive a flood of new keys.

use std::collections::HashMap;
use std::hash::Hash;

use crate::clock::Millis;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Millis,
}

#[derive(Debug)]
pub struct KeyedLimiter<K> {
    map: HashMap<K, Bucket>,
    per_ms: f64,
    burst: f64,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// `rate` tokens every `per_ms` milliseconds, up to `burst`.
    pub fn new(rate: f64, per_ms: f64, burst: f64, max_keys: usize) -> Self {
        Self { map: HashMap::new(), per_ms: rate / per_ms, burst, max_keys }
    }

    fn bucket(&mut self, key: &K, now: Millis) -> &mut Bucket {
        if self.map.len() >= self.max_keys && !self.map.contains_key(key) {
            let (per_ms, burst) = (self.per_ms, self.burst);
            self.map.retain(|_, b| b.tokens + (now.saturating_sub(b.last)) as f64 * per_ms < burst);
            if self.map.len() >= self.max_keys {
                self.evict_least_recent();
            }
        }
        let burst = self.burst;
        let b = self.map.entry(key.clone()).or_insert(Bucket { tokens: burst, last: now });
        let elapsed = now.saturating_sub(b.last) as f64;
        b.tokens = (b.tokens + elapsed * self.per_ms).min(burst);
        b.last = b.last.max(now);
        b
    }

    /// Forgets the least recently used eighth of the keys (at least one). Amortised O(1) per
    /// new key: one linear selection frees room for `max_keys / 8` newcomers.
    fn evict_least_recent(&mut self) {
        let n = (self.map.len() / 8).max(1);
        let mut ages: Vec<Millis> = self.map.values().map(|b| b.last).collect();
        let idx = n.min(ages.len()) - 1;
        let (_, cutoff, _) = ages.select_nth_unstable(idx);
        let cutoff = *cutoff;
        let mut left = n;
        self.map.retain(|_, b| {
            if left > 0 && b.last <= cutoff {
                left -= 1;
                false
            } else {
                true
            }
        });
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, key: &K, now: Millis) -> bool {
        let b = self.bucket(key, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether a token is available, without taking it.
    pub fn has(&mut self, key: &K, now: Millis) -> bool {
        self.bucket(key, now).tokens >= 1.0
    }

    /// Seconds until a token is available (for `Retry-After`).
    pub fn retry_after_secs(&mut self, key: &K, now: Millis) -> u64 {
        let missing = (1.0 - self.bucket(key, now).tokens).max(0.0);
        ((missing / self.per_ms) / 1000.0).ceil().max(1.0) as u64
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_and_table_stays_bounded() {
        let mut l = KeyedLimiter::new(10.0, 1000.0, 2.0, 100);
        assert!(l.take(&1, 0) && l.take(&1, 0));
        assert!(!l.take(&1, 0));
        assert!(!l.has(&1, 50));
        assert!(l.has(&1, 100));
        assert_eq!(l.retry_after_secs(&1, 0), 1);
        for k in 0..10_000 {
            l.take(&k, 1000);
        }
        assert!(l.len() <= 100);
    }

    #[test]
    fn a_full_table_keeps_the_recently_active() {
        // A spent failed-join budget must survive a flood of new keys.
        let mut l = KeyedLimiter::new(1.0, 60_000.0, 1.0, 100);
        assert!(l.take(&0, 0));
        assert!(!l.has(&0, 0));
        for k in 1..1000u32 {
            l.take(&k, 1 + k as u64);
            // The guesser keeps trying: it stays recent and keeps its empty bucket.
            assert!(!l.has(&0, 1 + k as u64), "history of key 0 lost at key {k}");
        }
        assert!(l.len() <= 100);
    }
}
