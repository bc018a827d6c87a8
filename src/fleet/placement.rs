//! Choosing a relay for a new host allocation (pure; `docs/fleet.md`, "Placement").
//!
//! Candidates are the region's relays that are fresh (heartbeat younger than the expiry), not
//! draining, up for at least the warm-up, and below capacity. Of two candidates drawn at random
//! the less loaded wins ("power of two choices"): picking "the emptiest" would send every API
//! instance, working from the same snapshot, to the same relay until the next heartbeat.

use super::records::RelayRecord;

/// How a relay looks from the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayState {
    /// Placeable.
    Ready,
    /// Fresh but up for less than the warm-up.
    Warming,
    /// Fresh and draining: no new hosts, joiners of its sessions still land there.
    Draining,
    /// Full.
    Full,
    /// No heartbeat within the expiry.
    Stale,
}

impl RelayState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Warming => "warming",
            Self::Draining => "draining",
            Self::Full => "full",
            Self::Stale => "stale",
        }
    }
}

/// A relay as seen in one snapshot: its record and how old its last heartbeat is.
#[derive(Clone, Debug)]
pub struct Seen {
    pub record: RelayRecord,
    pub age_ms: u64,
}

pub fn state(s: &Seen, expiry_ms: u64, warmup_ms: u64) -> RelayState {
    let r = &s.record;
    if s.age_ms > expiry_ms {
        RelayState::Stale
    } else if r.draining {
        RelayState::Draining
    } else if r.uptime_ms + s.age_ms < warmup_ms {
        RelayState::Warming
    } else if r.allocations >= r.capacity {
        RelayState::Full
    } else {
        RelayState::Ready
    }
}

fn load(r: &RelayRecord) -> f64 {
    r.allocations as f64 / r.capacity.max(1) as f64
}

/// The relay for a new host in `region`, from two random draws `rnd`.
pub fn pick(relays: &[Seen], region: &str, expiry_ms: u64, warmup_ms: u64, rnd: [u64; 2]) -> Option<usize> {
    let c: Vec<usize> = (0..relays.len())
        .filter(|&i| {
            relays[i].record.region == region && state(&relays[i], expiry_ms, warmup_ms) == RelayState::Ready
        })
        .collect();
    match c.len() {
        0 => None,
        1 => Some(c[0]),
        n => {
            let a = c[(rnd[0] % n as u64) as usize];
            // A second draw among the others, so the two are distinct.
            let mut b = c[(rnd[1] % (n as u64 - 1)) as usize];
            if b == a {
                b = c[n - 1];
            }
            Some(if load(&relays[b].record) < load(&relays[a].record) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(name: &str, region: &str, allocations: u64) -> Seen {
        Seen {
            record: RelayRecord {
                name: name.into(),
                region: region.into(),
                allocations,
                capacity: 100,
                uptime_ms: 60_000,
                ..Default::default()
            },
            age_ms: 100,
        }
    }

    #[test]
    fn filters_and_prefers_the_less_loaded_of_two() {
        let mut rs = vec![relay("a", "eu", 10), relay("b", "eu", 50), relay("c", "us", 0)];
        for x in 0..20u64 {
            let i = pick(&rs, "eu", 3000, 3000, [x, x * 7 + 1]).unwrap();
            assert_eq!(rs[i].record.name, "a", "the two eu relays are always the two draws");
        }
        assert_eq!(pick(&rs, "asia", 3000, 3000, [0, 0]), None);
        rs[0].record.draining = true;
        assert_eq!(rs[pick(&rs, "eu", 3000, 3000, [0, 0]).unwrap()].record.name, "b");
        rs[1].age_ms = 5000;
        assert_eq!(state(&rs[1], 3000, 3000), RelayState::Stale);
        assert_eq!(pick(&rs, "eu", 3000, 3000, [0, 0]), None);
        let mut young = relay("d", "us", 0);
        young.record.uptime_ms = 100;
        assert_eq!(state(&young, 3000, 3000), RelayState::Warming);
        young.record.uptime_ms = 3000;
        young.record.allocations = 100;
        assert_eq!(state(&young, 3000, 3000), RelayState::Full);
    }

    #[test]
    fn spreads_over_equal_relays() {
        let rs: Vec<Seen> = (0..3).map(|i| relay(&format!("r{i}"), "eu", 0)).collect();
        let mut hits = [0u32; 3];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..3000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            hits[pick(&rs, "eu", 3000, 3000, [x, x.rotate_left(32)]).unwrap()] += 1;
        }
        assert!(hits.iter().all(|&h| h > 700), "{hits:?}");
    }
}
