//! Property tests over the core: random and mutated datagrams from random sources.

mod common;

use common::*;
use ferry::client::packets;
use proptest::prelude::*;

fn mutate(mut d: Vec<u8>, flips: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    for &(i, x) in flips {
        if !d.is_empty() {
            let n = d.len();
            d[i % n] ^= x;
        }
    }
    if let Some(c) = cut {
        d.truncate(c % (d.len() + 1));
    }
    d
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever arrives, no reply is larger than its trigger, nothing goes to an unbound address,
    /// and nothing is forwarded between allocations that are not linked.
    #[test]
    fn no_amplification_no_misdelivery(
        inputs in prop::collection::vec((0usize..8, any::<u16>(), prop::collection::vec((any::<usize>(), any::<u8>()), 0..4), prop::option::of(any::<usize>()), prop::collection::vec(any::<u8>(), 0..64)), 1..60)
    ) {
        let mut sim = Sim::new();
        let (host, joiners) = sim.session(2, 2);
        let stranger = sim.joiner(&host, addr(50));
        let all = [host.clone(), joiners[0].clone(), joiners[1].clone(), stranger.clone()];
        for (kind, srcn, flips, cut, raw) in inputs {
            let a = &all[srcn as usize % 4];
            let b = &all[(srcn as usize / 4) % 4];
            let base = match kind {
                0 => packets::bind(&a.key, srcn, &a.conn),
                1 => packets::relay(&a.id, &b.id, &raw).unwrap(),
                2 => packets::ping(&a.id, srcn),
                3 => packets::connect_request(&a.id, &b.conn),
                4 => packets::disconnect(&a.id, &b.id),
                5 => packets::close(&a.id),
                _ => raw.clone(),
            };
            let d = mutate(base, &flips, cut);
            let src = if srcn % 3 == 0 { a.addr } else { addr(srcn) };
            // Sim::send asserts reply <= trigger and forwards unchanged.
            if let Out::Forward(to, _) = sim.send(src, &d) {
                let bound: Vec<_> = all.iter().filter_map(|c| sim.core.bound_addr(&c.id)).collect();
                prop_assert!(bound.contains(&to) || to == host.addr || joiners.iter().any(|j| j.addr == to));
                prop_assert!(to != stranger.addr);
            }
            for t in sim.transmits() {
                prop_assert!(t.len <= 36);
            }
        }
    }

    /// Random bytes never create state and never get more than 21 bytes back.
    #[test]
    fn random_bytes_create_nothing(datagrams in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..1600), 1..100), port in 1u16..) {
        let mut sim = Sim::new();
        for mut d in datagrams {
            if d.len() >= 2 { d[0] = 0xDA; d[1] = 0x72; }
            let src = std::net::SocketAddr::from(([10, 1, 2, 3], port));
            if let Out::Reply(r) = sim.send(src, &d) {
                prop_assert!(r.len() <= 21);
            }
        }
        prop_assert_eq!(sim.core.allocations(), 0);
        prop_assert_eq!(sim.core.stats().forwarded_packets, 0);
    }
}
