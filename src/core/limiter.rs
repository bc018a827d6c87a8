//! Rate limits for ERROR and REJECTED replies: a token bucket per source IP in a fixed-size,
//! keyed-hash table (IPs that collide share a bucket, so memory never grows), under a global
//! bucket per shard. Only the error path touches it.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;

use crate::clock::Millis;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    milli_tokens: u64,
    last: Millis,
}

#[derive(Clone, Copy, Debug)]
pub struct Rate {
    pub per_sec: u32,
    pub burst: u32,
}

impl Bucket {
    fn full(rate: Rate) -> Self {
        Self { milli_tokens: rate.burst as u64 * 1000, last: 0 }
    }

    fn take(&mut self, now: Millis, rate: Rate) -> bool {
        if now > self.last {
            let refill = (now - self.last).saturating_mul(rate.per_sec as u64);
            self.milli_tokens = (self.milli_tokens.saturating_add(refill)).min(rate.burst as u64 * 1000);
            self.last = now;
        }
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
pub struct ErrorLimiter {
    buckets: Box<[Bucket]>,
    hasher: RandomState,
    per_ip: Rate,
    global: Bucket,
    global_rate: Rate,
}

impl ErrorLimiter {
    /// `buckets` is rounded up to a power of two.
    pub fn new(buckets: usize, per_ip: Rate, global: Rate) -> Self {
        let n = buckets.max(1).next_power_of_two();
        Self {
            buckets: vec![Bucket::full(per_ip); n].into_boxed_slice(),
            hasher: RandomState::new(),
            per_ip,
            global: Bucket::full(global),
            global_rate: global,
        }
    }

    /// Whether one more error reply to `ip` is allowed at `now`.
    pub fn allow(&mut self, now: Millis, ip: IpAddr) -> bool {
        let i = (self.hasher.hash_one(ip) as usize) & (self.buckets.len() - 1);
        self.buckets[i].take(now, self.per_ip) && self.global.take(now, self.global_rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_burst_then_refill() {
        let mut l =
            ErrorLimiter::new(64, Rate { per_sec: 10, burst: 3 }, Rate { per_sec: 1000, burst: 1000 });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!((0..3).all(|_| l.allow(0, ip)));
        assert!(!l.allow(0, ip));
        assert!(!l.allow(99, ip));
        assert!(l.allow(100, ip), "one token per 100 ms at 10/s");
        assert!(!l.allow(100, ip));
    }

    #[test]
    fn global_bucket_caps_many_sources() {
        let mut l =
            ErrorLimiter::new(1 << 12, Rate { per_sec: 10, burst: 10 }, Rate { per_sec: 5, burst: 5 });
        let allowed = (0..1000u32).filter(|i| l.allow(0, IpAddr::from(i.to_be_bytes()))).count();
        assert_eq!(allowed, 5);
    }
}
