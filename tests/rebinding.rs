//! The rebinding and replay matrix, source policy and the unconfirmed-destination budget,
//! in virtual time.

mod common;

use common::*;
use ferry::client::packets;
use ferry::core::{AddressPolicy, DropReason};
use ferry::wire::ErrorCode;

#[test]
fn port_change_without_rebind_is_not_relayed() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(1, 1);
    let j = &joiners[0];
    let d = packets::relay(&j.id, &host.id, b"from a new port").unwrap();
    assert_eq!(sim.send(addr(7001), &d), Out::Reply(error(&j.id, ErrorCode::BoundElsewhere)));
    assert_eq!(sim.core.bound_addr(&j.id), Some(j.addr));
}

#[test]
fn flapping_between_two_addresses_grows_nothing() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(1, 1);
    let j = &joiners[0];
    let (a, b) = (addr(7100), addr(7200));
    let before = sim.core.allocations();
    for n in 1..=2000u16 {
        let src = if n % 2 == 0 { a } else { b };
        assert_eq!(sim.bind_from(j, src, n), Out::Reply(BIND_RECEIVED.to_vec()));
        assert_eq!(sim.core.bound_addr(&j.id), Some(src));
        sim.now += 1;
    }
    assert_eq!(sim.core.allocations(), before);
    assert_eq!(sim.core.stats().binds_moved, 2000);
    // The last address is the one that gets traffic.
    let d = packets::relay(&host.id, &j.id, b"x").unwrap();
    assert_eq!(sim.send(host.addr, &d), Out::Forward(a, d.clone()));
}

#[test]
fn both_peers_rebinding_at_once() {
    let mut sim = Sim::new();
    let (mut host, mut joiners) = sim.session(1, 1);
    let (h2, j2) = (addr(8001), addr(8002));
    assert_eq!(sim.bind_from(&host, h2, 1), Out::Reply(BIND_RECEIVED.to_vec()));
    assert_eq!(sim.bind_from(&joiners[0], j2, 1), Out::Reply(BIND_RECEIVED.to_vec()));
    host.addr = h2;
    joiners[0].addr = j2;
    let d = packets::relay(&joiners[0].id, &host.id, b"a").unwrap();
    assert_eq!(sim.send(j2, &d), Out::Forward(h2, d.clone()));
    let d = packets::relay(&host.id, &joiners[0].id, b"b").unwrap();
    assert_eq!(sim.send(h2, &d), Out::Forward(j2, d.clone()));
}

#[test]
fn replayed_bind_from_third_address_refused_while_live_moves_after_quiet() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(1, 1);
    let j = &joiners[0];
    let captured = packets::bind(&j.key, 0, &j.conn);
    for t in (1_000..5_000).step_by(1_000) {
        sim.now = t;
        sim.ping(j);
        assert_eq!(sim.send(addr(9000), &captured), Out::Drop(DropReason::RebindRefused));
    }
    sim.now = 9_000; // 5 s after the last ping at 4 000
    sim.ping(&host);
    assert_eq!(sim.send(addr(9000), &captured), Out::Reply(BIND_RECEIVED.to_vec()));
    assert_eq!(sim.core.bound_addr(&j.id), Some(addr(9000)));
}

#[test]
fn denied_sources_get_no_state_and_no_reply() {
    let relay = "203.0.113.7:7777".parse().unwrap();
    let mut sim = Sim::with(|c| {
        c.policy = AddressPolicy::new(&[relay], vec!["198.51.100.0/24".parse().unwrap()]);
    });
    let host = sim.host(1, addr(1));
    let d = packets::bind(&host.key, 0, &host.conn);
    for src in [
        "203.0.113.7:7777",
        "[::ffff:203.0.113.7]:7777",
        "[64:ff9b::cb00:7107]:7777",
        "198.51.100.20:5000",
        "[2002:c633:6414::1]:5000",
        "240.0.0.1:5000",
    ] {
        assert_eq!(sim.send(src.parse().unwrap(), &d), Out::Drop(DropReason::BadSource), "{src}");
    }
    assert_eq!(sim.core.bound_addr(&host.id), None);
    assert_eq!(sim.core.stats().reply_packets, 0);
    assert_eq!(sim.bind(&host), Out::Reply(BIND_RECEIVED.to_vec()));
}

#[test]
fn silent_destination_gets_a_bounded_number_of_bytes() {
    let mut sim = Sim::with(|c| c.unconfirmed_budget = 10_000);
    let host = sim.host(2, addr(1));
    let victim = addr(4242);
    // A BIND pointing the host's allocation at an address that never speaks.
    assert_eq!(sim.bind_from(&host, victim, 0), Out::Reply(BIND_RECEIVED.to_vec()));
    let j = sim.joiner(&host, addr(2));
    sim.bind(&j);
    assert_eq!(sim.connect(&j, &host), Out::Reply(accepted(&host, &j)));
    let payload = [0u8; 962]; // 1000-byte datagrams
    let mut delivered = 0;
    for _ in 0..50 {
        if let Out::Forward(to, d) = sim.relay(&j, &host, &payload) {
            assert_eq!(to, victim);
            delivered += d.len();
        }
    }
    assert_eq!(delivered, 10_000);
    assert_eq!(sim.core.stats().drop_count(DropReason::Unconfirmed), 40);
    // Once the bound client speaks, the limit is gone.
    let mut h = host.clone();
    h.addr = victim;
    assert!(matches!(sim.ping(&h), Out::Reply(_)));
    assert!(matches!(sim.relay(&j, &host, &payload), Out::Forward(..)));
}

#[test]
fn a_move_never_accepts_a_nonce_below_the_highest_used() {
    let mut sim = Sim::with(|c| c.rebind_quiet = 5_000);
    let (host, joiners) = sim.session(1, 1);
    let j = &joiners[0];
    let (thief, roam) = (addr(7301), addr(7302));
    // The client has used nonce 3 (e.g. UTP 2.2+ after a few attempts).
    assert_eq!(sim.bind_from(j, j.addr, 3), Out::Reply(BIND_RECEIVED.to_vec()));
    // Quiet past rebind_quiet (still inside the idle timeout): a captured nonce-0, 1 or 2 BIND
    // never moves the binding.
    sim.now += 6_000;
    for old in 0..3 {
        assert_eq!(sim.bind_from(j, thief, old), Out::Drop(DropReason::RebindRefused), "nonce {old}");
    }
    assert_eq!(sim.core.bound_addr(&j.id), Some(j.addr));
    // The same nonce after the quiet period is a NAT rebinding (UTP 1.x never changes its nonce).
    let mut sim2 = Sim::with(|c| c.rebind_quiet = 5_000);
    let (_h2, js2) = sim2.session(1, 1);
    let j2 = &js2[0];
    assert_eq!(sim2.bind_from(j2, j2.addr, 3), Out::Reply(BIND_RECEIVED.to_vec()));
    sim2.now += 1_000;
    assert_eq!(sim2.bind_from(j2, roam, 3), Out::Drop(DropReason::RebindRefused), "same nonce, not quiet");
    sim2.now += 5_000;
    assert_eq!(sim2.bind_from(j2, roam, 3), Out::Reply(BIND_RECEIVED.to_vec()), "same nonce after quiet");
    // A higher nonce moves at once; afterwards the earlier nonce is dead everywhere.
    assert_eq!(sim2.bind_from(j2, j2.addr, 4), Out::Reply(BIND_RECEIVED.to_vec()));
    assert_eq!(sim2.core.bound_addr(&j2.id), Some(j2.addr));
    sim2.now += 6_000;
    assert_eq!(sim2.bind_from(j2, roam, 3), Out::Drop(DropReason::RebindRefused));
    let _ = host;
}
