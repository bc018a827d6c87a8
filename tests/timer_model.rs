//! The timer wheel against a BTreeMap reference over random operation sequences.

use std::collections::BTreeMap;

use ferry::timer::{TimerHandle, TimerWheel};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Insert(u64),
    Cancel(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => prop_oneof![0u64..70, 0u64..5000, 0u64..300_000, 0u64..20_000_000].prop_map(Op::Insert),
        1 => any::<usize>().prop_map(Op::Cancel),
        2 => prop_oneof![0u64..3, 0u64..100, 0u64..10_000, 0u64..1_000_000].prop_map(Op::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn wheel_matches_reference(start in 0u64..1_000_000, ops in prop::collection::vec(op(), 1..200)) {
        let mut wheel = TimerWheel::new(start);
        let mut model: BTreeMap<u32, u64> = BTreeMap::new();
        let mut handles: Vec<(u32, TimerHandle)> = Vec::new();
        let mut now = start;
        let mut next_key = 0u32;
        let mut out = Vec::new();
        for op in ops {
            match op {
                Op::Insert(d) => {
                    let h = wheel.insert(now + d, next_key);
                    model.insert(next_key, now + d);
                    handles.push((next_key, h));
                    next_key += 1;
                }
                Op::Cancel(i) if !handles.is_empty() => {
                    let (k, h) = handles.swap_remove(i % handles.len());
                    prop_assert_eq!(wheel.cancel(h), model.remove(&k).map(|_| k));
                }
                Op::Cancel(_) => {}
                Op::Advance(d) => {
                    if let (Some(next), Some(min)) = (wheel.next_expiry(), model.values().min()) {
                        prop_assert!(next <= *min, "next_expiry {} after earliest deadline {}", next, min);
                    }
                    now += d;
                    out.clear();
                    wheel.poll(now, &mut out);
                    let mut fired = out.clone();
                    fired.sort_unstable();
                    let want: Vec<u32> = model.iter().filter(|(_, &t)| t <= now).map(|(&k, _)| k).collect();
                    prop_assert_eq!(&fired, &want);
                    for k in &want {
                        model.remove(k);
                    }
                    handles.retain(|(k, _)| model.contains_key(k));
                }
            }
            prop_assert_eq!(wheel.len(), model.len());
        }
    }

    #[test]
    fn stepping_by_next_expiry_fires_each_timer_at_its_deadline(deadlines in prop::collection::vec(1u64..5_000_000, 1..50)) {
        let mut wheel = TimerWheel::new(0);
        for (k, &d) in deadlines.iter().enumerate() {
            wheel.insert(d, k);
        }
        let mut out = Vec::new();
        let mut fired_at = vec![0u64; deadlines.len()];
        let mut steps = 0;
        while let Some(t) = wheel.next_expiry() {
            out.clear();
            wheel.poll(t, &mut out);
            for &k in &out {
                fired_at[k] = t;
            }
            steps += 1;
            prop_assert!(steps < 10_000);
        }
        prop_assert_eq!(fired_at, deadlines);
    }
}
