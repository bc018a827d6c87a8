//! Scenario tests for every rule of `docs/protocol.md` ("Sessions"), in virtual time.

mod common;

use common::*;
use ferry::client::packets;
use ferry::core::{DropReason, Event, ReleaseReason};
use ferry::wire::ErrorCode;

#[test]
fn host_and_three_joiners_relay_both_ways() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(3, 3);
    for (i, j) in joiners.iter().enumerate() {
        let payload = vec![i as u8; 100 + i];
        let d = packets::relay(&j.id, &host.id, &payload).unwrap();
        assert_eq!(sim.relay(j, &host, &payload), Out::Forward(host.addr, d));
        let back = vec![0xF0 | i as u8; 1400 - 38];
        let d = packets::relay(&host.id, &j.id, &back).unwrap();
        assert_eq!(sim.relay(&host, j, &back), Out::Forward(j.addr, d));
    }
    // Joiners are not linked with each other.
    assert_eq!(
        sim.relay(&joiners[0], &joiners[1], b"x"),
        Out::Reply(error(&joiners[0].id, ErrorCode::NotConnected))
    );
    // PING from the bound address is echoed unchanged.
    let p = packets::ping(&host.id, 1);
    assert_eq!(sim.ping(&host), Out::Reply(p));
    let s = sim.core.stats();
    assert_eq!(s.forwarded_packets, 6);
    assert_eq!(s.connects_accepted, 3);
    assert_eq!(s.binds_new, 4);
    assert_eq!(sim.core.allocations(), 4);
}

#[test]
fn accepted_goes_to_the_requester_only() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(1, 1);
    assert!(sim.transmits().is_empty(), "nothing is sent to the host on connect");
    let evs = sim.events();
    assert!(evs.contains(&Event::Connected { host: host.id, joiner: joiners[0].id }));
}

#[test]
fn repeats_are_idempotent() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(1, 1);
    let j = &joiners[0];
    for _ in 0..3 {
        assert_eq!(sim.bind(&host), Out::Reply(BIND_RECEIVED.to_vec()));
        assert_eq!(sim.bind(j), Out::Reply(BIND_RECEIVED.to_vec()));
        assert_eq!(sim.connect(j, &host), Out::Reply(accepted(&host, j)));
    }
    let s = sim.core.stats();
    assert_eq!((s.binds_new, s.binds_repeat, s.connects_accepted), (2, 6, 1));
    // A repeated CONNECT did not consume capacity: a second joiner is still rejected, not the first.
    let j2 = sim.joiner(&host, addr(7));
    sim.bind(&j2);
    assert_eq!(sim.connect(&j2, &host), Out::Reply(rejected(&host, &j2)));
}

#[test]
fn rejected_at_capacity_then_accepted_after_disconnect() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(2, 2);
    let extra = sim.joiner(&host, addr(9));
    sim.bind(&extra);
    assert_eq!(sim.connect(&extra, &host), Out::Reply(rejected(&host, &extra)));
    assert_eq!(sim.core.stats().connects_rejected, 1);
    assert_eq!(sim.relay(&extra, &host, b"hi"), Out::Reply(error(&extra.id, ErrorCode::NotConnected)));
    // A peer leaves: its DISCONNECT is forwarded unchanged to the host and frees a place.
    let d = disconnect(&joiners[0], &host);
    assert_eq!(sim.send(joiners[0].addr, &d), Out::Forward(host.addr, d.clone()));
    assert_eq!(
        sim.relay(&joiners[0], &host, b"x"),
        Out::Reply(error(&joiners[0].id, ErrorCode::NotConnected))
    );
    assert_eq!(sim.connect(&extra, &host), Out::Reply(accepted(&host, &extra)));
}

#[test]
fn disconnect_from_host_is_forwarded_to_the_peer() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(2, 2);
    let d = disconnect(&host, &joiners[1]);
    assert_eq!(sim.send(host.addr, &d), Out::Forward(joiners[1].addr, d.clone()));
    // Not linked any more: a second DISCONNECT is dropped, traffic gets ERROR 5.
    assert_eq!(sim.send(host.addr, &d), Out::Drop(DropReason::NotLinked));
    assert_eq!(sim.relay(&host, &joiners[1], b"x"), Out::Reply(error(&host.id, ErrorCode::NotConnected)));
    // The other peer is untouched.
    assert!(matches!(sim.relay(&host, &joiners[0], b"x"), Out::Forward(..)));
}

#[test]
fn every_error_code() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(2, 1);
    let j = &joiners[0];

    // 0: invalid protocol version (the ID field echoed back).
    let mut d = packets::relay(&j.id, &host.id, b"v").unwrap();
    d[2] = 1;
    assert_eq!(sim.send(j.addr, &d), Out::Reply(error(&j.id, ErrorCode::InvalidProtocolVersion)));

    // 2: CONNECT to something that is not the requester's own host.
    let (other_host, _) = {
        let h = sim.host(2, addr(3000));
        sim.bind(&h);
        (h, ())
    };
    assert_eq!(sim.connect(j, &other_host), Out::Reply(error(&j.id, ErrorCode::Unauthorized)));
    let j2 = sim.joiner(&host, addr(3001));
    sim.bind(&j2);
    assert_eq!(
        sim.connect(&j2, j),
        Out::Reply(error(&j2.id, ErrorCode::Unauthorized)),
        "a joiner is no target"
    );
    let mut forged = host.conn.clone();
    forged[20] ^= 0xFF;
    let d = packets::connect_request(&j2.id, &forged);
    assert_eq!(sim.send(j2.addr, &d), Out::Reply(error(&j2.id, ErrorCode::Unauthorized)), "forged blob");
    assert_eq!(sim.connect(&host, &host), Out::Reply(error(&host.id, ErrorCode::SelfConnect)));

    // 6: self-connect.
    assert_eq!(sim.connect(&j2, &j2), Out::Reply(error(&j2.id, ErrorCode::SelfConnect)));

    // 3: a message from an address the allocation is not bound to.
    let d = packets::relay(&j.id, &host.id, b"x").unwrap();
    assert_eq!(sim.send(addr(4000), &d), Out::Reply(error(&j.id, ErrorCode::BoundElsewhere)));
    let unbound = sim.joiner(&host, addr(4001));
    assert_eq!(sim.ping(&unbound), Out::Reply(error(&unbound.id, ErrorCode::BoundElsewhere)));

    // 4: unknown allocation, for BIND and for everything else.
    let mut ghost = j.clone();
    ghost.id.0[12..16].copy_from_slice(&[0, 0, 0x7F, 0xFF]);
    assert_eq!(sim.relay(&ghost, &host, b"x"), Out::Reply(error(&ghost.id, ErrorCode::AllocationNotFound)));
    let mut ghost_conn = j.conn.clone();
    ghost_conn[15] ^= 0x55;
    let d = packets::bind(&j.key, 0, &ghost_conn);
    let mut gid = j.id;
    gid.0[15] ^= 0x55;
    assert_eq!(sim.send(addr(4002), &d), Out::Reply(error(&gid, ErrorCode::AllocationNotFound)));

    // 5: a peer that does not exist is "not connected", never ERROR 4 (that would kill the sender).
    let d = packets::relay(&host.id, &ghost.id, b"x").unwrap();
    assert_eq!(sim.send(host.addr, &d), Out::Reply(error(&host.id, ErrorCode::NotConnected)));

    // 1: allocation timed out (the host stays alive, so the joiner's own deadline is what ends it).
    sim.now = 9_000;
    sim.ping(&host);
    sim.advance_to(10_000);
    assert_eq!(sim.ping(j), Out::Reply(error(&j.id, ErrorCode::AllocationTimedOut)));

    for code in ErrorCode::ALL {
        assert!(sim.core.stats().errors(code) > 0, "{code:?} never sent");
    }
}

#[test]
fn close_releases_and_later_messages_get_error_4() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(2, 2);
    let j = &joiners[0];
    assert_eq!(sim.send(j.addr, &packets::close(&j.id)), Out::Consumed);
    assert_eq!(sim.ping(j), Out::Reply(error(&j.id, ErrorCode::AllocationNotFound)));
    assert_eq!(sim.relay(&host, j, b"x"), Out::Reply(error(&host.id, ErrorCode::NotConnected)));
    assert!(matches!(sim.relay(&host, &joiners[1], b"x"), Out::Forward(..)));
    // CLOSE from the wrong address, or for an unknown ID, does nothing.
    let j1 = &joiners[1];
    assert_eq!(sim.send(addr(5000), &packets::close(&j1.id)), Out::Drop(DropReason::NotBound));
    assert!(sim.core.is_live(&j1.id));
    assert_eq!(sim.core.stats().released_by(ReleaseReason::Closed), 1);
}

fn assert_host_gone(
    sim: &mut Sim,
    host: &Client,
    joiners: &[Client],
    linked: &[usize],
    reason: ReleaseReason,
) {
    let tx = sim.transmits();
    assert_eq!(tx.len(), linked.len());
    for &i in linked {
        let j = &joiners[i];
        assert!(
            tx.iter().any(|t| t.to == j.addr && t.payload() == disconnect(host, j).as_slice()),
            "peer {i} got DISCONNECT(from host, to peer)"
        );
    }
    for j in joiners {
        assert!(!sim.core.is_live(&j.id));
        assert_eq!(sim.ping(j), Out::Reply(error(&j.id, ErrorCode::AllocationNotFound)));
    }
    let evs = sim.events();
    let released = |id, host, why| {
        evs.iter().any(|e| matches!(e, Event::Released { id: i, is_host: h, reason: r, .. } if *i == id && *h == host && *r == why))
    };
    assert!(released(host.id, true, reason));
    for j in joiners {
        assert!(released(j.id, false, ReleaseReason::HostGone));
    }
    assert_eq!(sim.core.allocations(), 0);
}

#[test]
fn host_close_disconnects_peers_and_releases_joiners() {
    let mut sim = Sim::new();
    let (host, mut joiners) = sim.session(3, 2);
    let pending = sim.joiner(&host, addr(77));
    sim.bind(&pending);
    joiners.push(pending);
    sim.events();
    assert_eq!(sim.send(host.addr, &packets::close(&host.id)), Out::Consumed);
    assert_host_gone(&mut sim, &host, &joiners, &[0, 1], ReleaseReason::Closed);
}

#[test]
fn host_timeout_disconnects_peers_and_releases_joiners() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(3, 2);
    sim.events();
    // Joiners keep talking; the host falls silent.
    for t in (1_000..10_000).step_by(1_000) {
        sim.run_until(t);
        for j in &joiners {
            assert_eq!(sim.ping(j), Out::Reply(packets::ping(&j.id, 1)));
        }
    }
    sim.run_until(9_999);
    assert!(sim.core.is_live(&host.id));
    sim.run_until(10_000);
    assert!(!sim.core.is_live(&host.id));
    assert_host_gone(&mut sim, &host, &joiners, &[0, 1], ReleaseReason::TimedOut);
}

#[test]
fn unbound_allocation_expires_exactly_at_60s() {
    let mut sim = Sim::new();
    let host = sim.host(1, addr(1));
    sim.now = 5;
    let j = sim.joiner(&host, addr(2));
    sim.run_until(59_999);
    assert!(sim.core.is_live(&host.id));
    sim.run_until(60_000);
    assert!(!sim.core.is_live(&host.id));
    assert!(!sim.core.is_live(&j.id), "joiner released with its host");
    assert_eq!(sim.bind(&host), Out::Reply(error(&host.id, ErrorCode::AllocationTimedOut)));
}

#[test]
fn unbound_joiner_expires_at_60s_after_its_creation() {
    let mut sim = Sim::new();
    let host = sim.host(1, addr(1));
    sim.bind(&host);
    sim.now = 30_000;
    let j = sim.joiner(&host, addr(2));
    for t in (31_000..=90_000).step_by(2_000) {
        sim.run_until(t);
        sim.ping(&host);
    }
    sim.run_until(89_999);
    assert!(sim.core.is_live(&j.id));
    sim.run_until(90_000);
    assert!(!sim.core.is_live(&j.id));
    assert!(sim.core.is_live(&host.id));
}

#[test]
fn bound_joiner_idles_out_exactly_at_10s() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(2, 1);
    sim.now = 1_234;
    assert!(matches!(sim.relay(&joiners[0], &host, b"x"), Out::Forward(..)));
    for t in (2_000..=11_000).step_by(1_000) {
        sim.run_until(t);
        sim.ping(&host);
    }
    sim.run_until(11_233);
    assert!(sim.core.is_live(&joiners[0].id));
    sim.run_until(11_234);
    assert!(!sim.core.is_live(&joiners[0].id));
    assert!(sim.core.is_live(&host.id));
    // Host alone again: it now gets 60 s from its last datagram (at 11 000).
    sim.run_until(70_999);
    assert!(sim.core.is_live(&host.id));
    sim.run_until(71_000);
    assert!(!sim.core.is_live(&host.id));
}

#[test]
fn host_alone_gets_60s_and_10s_once_linked() {
    let mut sim = Sim::new();
    let host = sim.host(2, addr(1));
    sim.now = 100;
    sim.bind(&host);
    sim.run_until(60_099);
    assert!(sim.core.is_live(&host.id));
    sim.ping(&host); // last seen at 60 099
    let j = sim.joiner(&host, addr(2));
    sim.bind(&j);
    assert_eq!(sim.connect(&j, &host), Out::Reply(accepted(&host, &j)));
    // Linked now: the host's deadline drops to last-seen + 10 s and fires exactly then.
    for t in (61_000..=70_000).step_by(1_000) {
        sim.run_until(t);
        sim.ping(&j);
    }
    sim.run_until(70_098);
    assert!(sim.core.is_live(&host.id));
    sim.run_until(70_099);
    assert!(!sim.core.is_live(&host.id));
}

#[test]
fn expiry_is_exact_even_without_timer_polls() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(1, 1);
    sim.now = 9_999;
    assert!(matches!(sim.relay(&joiners[0], &host, b"x"), Out::Forward(..)));
    sim.now = 10_000;
    // The host expired at 10 000 but no timer ran: a message to it still finds it gone.
    assert_eq!(
        sim.relay(&joiners[0], &host, b"x"),
        Out::Reply(error(&joiners[0].id, ErrorCode::AllocationNotFound))
    );
    assert!(!sim.core.is_live(&host.id));
}

#[test]
fn rebind_with_higher_nonce_moves_and_old_address_gets_nothing() {
    let mut sim = Sim::new();
    let (host, mut joiners) = sim.session(1, 1);
    let old = joiners[0].addr;
    let new = addr(6000);
    assert_eq!(sim.bind_from(&joiners[0], new, 1), Out::Reply(BIND_RECEIVED.to_vec()));
    joiners[0].addr = new;
    assert!(sim.events().contains(&Event::Bound { id: joiners[0].id, addr: new, moved: true }));
    let d = packets::relay(&host.id, &joiners[0].id, b"to-new").unwrap();
    assert_eq!(sim.send(host.addr, &d), Out::Forward(new, d.clone()));
    let from_old = packets::relay(&joiners[0].id, &host.id, b"x").unwrap();
    assert_eq!(sim.send(old, &from_old), Out::Reply(error(&joiners[0].id, ErrorCode::BoundElsewhere)));
    assert!(matches!(sim.relay(&joiners[0], &host, b"x"), Out::Forward(..)), "link survives the move");
}

#[test]
fn replayed_bind_refused_while_live_then_moves_after_quiet_period() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(1, 1);
    let j = &joiners[0];
    let captured = packets::bind(&j.key, 0, &j.conn);
    let attacker = addr(6666);
    sim.now = 1_000;
    sim.ping(j);
    sim.now = 5_999;
    assert_eq!(sim.send(attacker, &captured), Out::Drop(DropReason::RebindRefused));
    assert_eq!(sim.core.bound_addr(&j.id), Some(j.addr));
    sim.ping(&host);
    // 5 s of silence from the bound address: the same BIND now moves the binding (UTP 1.x roaming).
    sim.now = 6_000;
    assert_eq!(sim.send(attacker, &captured), Out::Reply(BIND_RECEIVED.to_vec()));
    assert_eq!(sim.core.bound_addr(&j.id), Some(attacker));
}

#[test]
fn same_nonce_from_new_address_is_refused_while_live() {
    let mut sim = Sim::new();
    let (_host, joiners) = sim.session(1, 1);
    let mut j = joiners[0].clone();
    j.nonce = 5;
    sim.bind(&j);
    assert_eq!(sim.bind_from(&j, addr(6001), 5), Out::Drop(DropReason::RebindRefused));
    assert_eq!(sim.bind_from(&j, addr(6001), 4), Out::Drop(DropReason::RebindRefused));
    assert_eq!(sim.bind_from(&j, addr(6001), 6), Out::Reply(BIND_RECEIVED.to_vec()));
}

#[test]
fn bad_hmac_is_dropped_silently() {
    let mut sim = Sim::new();
    let host = sim.host(1, addr(1));
    let mut d = packets::bind(&host.key, 0, &host.conn);
    d[294] ^= 1;
    assert_eq!(sim.send(host.addr, &d), Out::Drop(DropReason::BadHmac));
    assert_eq!(sim.core.bound_addr(&host.id), None);
    let mut wrong_key = host.clone();
    wrong_key.key.0[0] ^= 1;
    assert_eq!(sim.bind(&wrong_key), Out::Drop(DropReason::BadHmac));
}

#[test]
fn malformed_and_oversize_datagrams_are_dropped_and_counted() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(1, 1);
    let j = &joiners[0];
    let good = packets::relay(&j.id, &host.id, &[1; 100]).unwrap();
    let cases: Vec<(Vec<u8>, DropReason)> = vec![
        (vec![], DropReason::Short),
        (vec![0xDA, 0x72, 0], DropReason::Short),
        (vec![0xDB, 0x72, 0, 10], DropReason::BadSignature),
        (vec![0xDA, 0x72, 0, 4], DropReason::UnknownType),
        (vec![0xDA, 0x72, 0, 13, 0, 0], DropReason::UnknownType),
        (good[..good.len() - 1].to_vec(), DropReason::BadLength),
        ([good.clone(), vec![0]].concat(), DropReason::BadLength),
        (good[..37].to_vec(), DropReason::Short),
        (vec![0xDA, 0x72, 1, 10], DropReason::BadVersion),
        (packets::relay(&j.id, &host.id, &[0; 1435]).unwrap(), DropReason::Oversize),
        (error(&j.id, ErrorCode::NotConnected), DropReason::UnexpectedType),
        (BIND_RECEIVED.to_vec(), DropReason::UnexpectedType),
        (accepted(&host, j), DropReason::UnexpectedType),
        (rejected(&host, j), DropReason::UnexpectedType),
    ];
    for (d, reason) in &cases {
        assert_eq!(sim.send(j.addr, d), Out::Drop(*reason), "{d:02x?}");
    }
    let mut mode = packets::bind(&j.key, 0, &j.conn);
    mode[4] = 1;
    assert_eq!(sim.send(j.addr, &mode), Out::Drop(DropReason::BadField));
    let s = sim.core.stats();
    assert_eq!(s.drop_count(DropReason::UnknownType), 2);
    assert_eq!(s.drop_count(DropReason::UnexpectedType), 4);
    assert_eq!(s.drop_count(DropReason::Oversize), 1);
    // 1472 bytes is still forwarded.
    let max = packets::relay(&j.id, &host.id, &[0; 1434]).unwrap();
    assert_eq!(max.len(), 1472);
    assert!(matches!(sim.send(j.addr, &max), Out::Forward(..)));
}

#[test]
fn bad_version_replies_are_never_answered() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(1, 1);
    let j = &joiners[0];
    // Every message kind that is itself a reply, with a wrong version byte: dropped, not ERROR 0.
    for mut d in [
        error(&j.id, ErrorCode::NotConnected),
        BIND_RECEIVED.to_vec(),
        accepted(&host, j),
        rejected(&host, j),
        [BIND_RECEIVED.to_vec(), vec![0; 30]].concat(),
    ] {
        d[2] = 7;
        assert_eq!(sim.send(j.addr, &d), Out::Drop(DropReason::BadVersion), "{d:02x?}");
    }
    // A request with a wrong version still gets ERROR 0.
    let mut d = packets::ping(&j.id, 1);
    d[2] = 7;
    assert_eq!(sim.send(j.addr, &d), Out::Reply(error(&j.id, ErrorCode::InvalidProtocolVersion)));
}

#[test]
fn never_answers_port_zero_or_non_unicast_sources() {
    let mut sim = Sim::new();
    let host = sim.host(1, addr(1));
    let d = packets::bind(&host.key, 0, &host.conn);
    for src in ["127.0.0.1:0", "0.0.0.0:5000", "255.255.255.255:5000", "224.0.0.1:5000", "[ff02::1]:5000"] {
        assert_eq!(sim.send(src.parse().unwrap(), &d), Out::Drop(DropReason::BadSource), "{src}");
    }
    assert_eq!(sim.core.bound_addr(&host.id), None);
}

#[test]
fn replies_never_exceed_their_trigger() {
    let mut sim = Sim::new();
    let (host, joiners) = sim.session(1, 1);
    // A CONNECT_REQUEST with a short target blob would need a 21-byte ERROR 2: allowed (21 <= 21)…
    let d = packets::connect_request(&joiners[0].id, &[]);
    let short = &d[..21];
    let mut short = short.to_vec();
    short[20] = 0;
    assert_eq!(sim.send(joiners[0].addr, &short), Out::Reply(error(&joiners[0].id, ErrorCode::Unauthorized)));
    // …but a 20-byte CLOSE from a stranger is never answered with a 21-byte ERROR.
    assert_eq!(sim.send(addr(9999), &packets::close(&host.id)), Out::Drop(DropReason::NotBound));
}

#[test]
fn error_replies_are_rate_limited_per_source() {
    let mut sim = Sim::with(|c| c.error_rate_per_ip = ferry::core::Rate { per_sec: 10, burst: 5 });
    let (host, _) = sim.session(1, 0);
    let d = packets::relay(&host.id, &host.id, b"x").unwrap();
    let spoofer = addr(1234);
    let replies = (0..100).filter(|_| matches!(sim.send(spoofer, &d), Out::Reply(_))).count();
    assert_eq!(replies, 5);
    assert_eq!(sim.core.stats().drop_count(DropReason::ReplyRateLimited), 95);
    // Another source still gets its answer, and the limit refills with time.
    assert!(matches!(sim.send(addr(4321), &d), Out::Reply(_)));
    sim.now += 100;
    assert!(matches!(sim.send(spoofer, &d), Out::Reply(_)));
}

#[test]
fn control_release_and_capacity() {
    let mut sim = Sim::with(|c| c.max_allocations = 3);
    let (host, joiners) = sim.session(5, 2);
    let e = ferry::core::Entropy { id: [9; 16] };
    assert_eq!(sim.core.create_host(0, 1, e.clone()).unwrap_err(), ferry::core::ControlError::Full);
    assert_eq!(
        sim.core.create_host(0, 0, e.clone()).unwrap_err(),
        ferry::core::ControlError::MaxConnectionsOutOfRange
    );
    assert!(sim.core.handle_control(0, ferry::core::Control::Release { id: host.id }).is_ok());
    assert_eq!(sim.transmits().len(), 2);
    assert!(joiners.iter().all(|j| !sim.core.is_live(&j.id)));
    assert_eq!(sim.core.create_joiner(0, &host.id, e).unwrap_err(), ferry::core::ControlError::HostNotFound);
}
