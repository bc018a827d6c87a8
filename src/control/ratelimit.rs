//! Token buckets keyed by client IP or token, for the HTTP API. The table is bounded: when it
//! grows past its cap, buckets that have refilled completely (idle clients) are forgotten.

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
                // Everyone is active: share one bucket rather than grow without bound.
                self.map.clear();
            }
        }
        let burst = self.burst;
        let b = self.map.entry(key.clone()).or_insert(Bucket { tokens: burst, last: now });
        let elapsed = now.saturating_sub(b.last) as f64;
        b.tokens = (b.tokens + elapsed * self.per_ms).min(burst);
        b.last = b.last.max(now);
        b
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
}
