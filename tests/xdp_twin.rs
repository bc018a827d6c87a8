//! The fast path's twin (`src/xdp/twin.rs`) against the loaded program itself: the same frames
//! through `BPF_PROG_TEST_RUN` and through `twin::decide`, with the same map contents, must
//! give the same verdict, the same output bytes and the same counters. Needs root (CI runs as
//! root); fails without it rather than skipping.

use std::net::SocketAddr;

use ferry::xdp::layout::{self, Endpoint, Link, L2};
use ferry::xdp::twin::{self, Decision, Links, Reason};
use ferry::xdp::{frames, sys, Program};
use proptest::prelude::*;

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "loading XDP programs needs root: run the tests as root");
}

fn addrs() -> Vec<SocketAddr> {
    [
        "10.9.0.2:4000",
        "10.9.0.3:5000",
        "10.9.0.2:4001",
        "[fd09::2]:4000",
        "[fd09::3]:5000",
        "[::ffff:10.9.0.3]:5000",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect()
}

fn relays() -> Vec<SocketAddr> {
    ["10.9.0.1:7777", "[fd09::1]:7777", "0.0.0.0:7777", "[::]:7777"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
}

const IDS: [[u8; 16]; 3] = [[0x11; 16], [0x22; 16], [0x33; 16]];

#[derive(Clone, Debug)]
enum Mutation {
    None,
    Flip { at: usize, xor: u8 },
    Truncate(usize),
    Pad(usize),
    Set { at: usize, value: u8 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => Just(Mutation::None),
        3 => (0usize..120, 1u8..=255).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        1 => (0usize..100).prop_map(Mutation::Truncate),
        1 => (1usize..40).prop_map(Mutation::Pad),
        // Ethertype, version/IHL, fragment bits, protocol, next header.
        2 => prop_oneof![Just(12usize), Just(14), Just(20), Just(21), Just(23), Just(22)]
            .prop_flat_map(|at| (Just(at), any::<u8>()))
            .prop_map(|(at, value)| Mutation::Set { at, value }),
        // IPv4 with options (IHL 6–15): a random version/IHL byte hits these only 1 time in 25.
        1 => (0x46u8..=0x4f).prop_map(|value| Mutation::Set { at: 14, value }),
    ]
}

/// Source address, from, to, destination kind, payload, mutation, and the link to follow.
type FrameSpec = (usize, usize, usize, usize, Vec<u8>, Mutation, Option<usize>);

#[derive(Clone, Debug)]
struct Case {
    relay: usize,
    links: Vec<(usize, usize, usize, usize)>,
    frames: Vec<FrameSpec>,
}

fn case() -> impl Strategy<Value = Case> {
    let n = addrs().len();
    (
        0..relays().len(),
        prop::collection::vec((0..3usize, 0..3usize, 0..n, 0..n), 0..5),
        prop::collection::vec(
            (
                0..n,
                0..3usize,
                0..3usize,
                0..2usize,
                prop::collection::vec(any::<u8>(), 0..64),
                mutation(),
                // Half the frames are sent as one of the links' senders would send them.
                prop::option::of(0..5usize),
            ),
            1..12,
        ),
    )
        .prop_map(|(relay, links, frames)| Case { relay, links, frames })
}

fn apply(f: &mut Vec<u8>, m: &Mutation) {
    match *m {
        Mutation::None => {}
        Mutation::Flip { at, xor } => {
            if let Some(b) = f.get_mut(at) {
                *b ^= xor;
            }
        }
        Mutation::Truncate(n) => f.truncate(f.len().saturating_sub(n).max(14)),
        Mutation::Pad(n) => f.extend(std::iter::repeat_n(0u8, n)),
        Mutation::Set { at, value } => {
            if let Some(b) = f.get_mut(at) {
                *b = value;
            }
        }
    }
}

fn totals(p: &Program) -> Vec<(Reason, u64, u64)> {
    p.counters().expect("read the per-CPU counters")
}

#[test]
fn every_program_in_the_object_passes_the_verifier() {
    require_root();
    let names = ferry::xdp::verify_object().expect("the verifier accepts bpf/ferry_xdp.o");
    assert_eq!(names, ["ferry_xdp", "ferry_xdp_gen", "ferry_xdp_pass", "ferry_xdp_sink"]);
}

#[test]
fn the_program_and_its_twin_agree_frame_for_frame() {
    require_root();
    let program = Program::load(64, &[], L2::Reflect).expect("load bpf/ferry_xdp.o");
    let (addrs, relays) = (addrs(), relays());
    let forwarded = std::cell::Cell::new(0u32);
    let passed = std::cell::RefCell::new(std::collections::HashSet::new());
    let cfg = ProptestConfig { cases: 600, failure_persistence: None, ..ProptestConfig::default() };
    proptest!(cfg, |(c in case())| {
        let relay = relays[c.relay];
        let listen = Endpoint::for_listen(relay);
        program.configure(&listen, L2::Reflect).unwrap();
        // A case that failed half-way (and is being shrunk) left its entries behind.
        for f in &IDS {
            for t in &IDS {
                program.raw_links().delete(&layout::link_key(&id(f), &id(t))).unwrap();
            }
        }
        let mut links = Links::new();
        for &(f, t, a, b) in &c.links {
            // One family per entry, as the map stores it; a frame of the other family must
            // still be refused.
            if let Some(l) = Link::new(addrs[a], addrs[b]) {
                links.insert((IDS[f], IDS[t]), l);
            }
        }
        for ((f, t), l) in &links {
            program.raw_links().update(&layout::link_key(&id(f), &id(t)), &l.encode()).unwrap();
        }
        for (src, from, to, dst_kind, payload, m, follow) in &c.frames {
            let (src, from, to) = match follow.and_then(|k| c.links.get(k)) {
                Some(&(f, t, a, _)) => (addrs[a], f, t),
                None => (addrs[*src], *from, *to),
            };
            let (from, to) = (&from, &to);
            // To the relay, or to the relay's port on another address.
            let dst = match (*dst_kind, relay.ip().is_unspecified()) {
                (0, false) => relay,
                (0, true) | (1, _) => {
                    if canon(src).is_ipv4() { "10.9.0.1:7777".parse().unwrap() } else { "[fd09::1]:7777".parse().unwrap() }
                }
                _ => unreachable!(),
            };
            let (src, dst) = (canon(src), canon(dst));
            if src.is_ipv4() != dst.is_ipv4() {
                continue;
            }
            let mut frame = frames::relay_frame(src, dst, &IDS[*from], &IDS[*to], payload);
            apply(&mut frame, m);
            let before = totals(&program);
            let (ret, out) = sys::test_run(program.fd().unwrap(), &frame).expect("BPF_PROG_TEST_RUN");
            let after = totals(&program);
            let mut mine = frame.clone();
            let (d, bytes) = twin::decide(&listen, &links, L2::Reflect, &mut mine);
            let reason = match d {
                Decision::Forward { .. } => {
                    forwarded.set(forwarded.get() + 1);
                    prop_assert_eq!(ret, XDP_TX, "kernel passed what the twin forwards: {:?}", m);
                    prop_assert_eq!(&out, &mine, "rewritten bytes differ");
                    Reason::Forwarded
                }
                Decision::Pass(r) => {
                    passed.borrow_mut().insert(r);
                    prop_assert_eq!(ret, XDP_PASS, "kernel sent what the twin passes ({:?}): {:?}", r, m);
                    prop_assert_eq!(&out, &frame, "a passed frame must leave untouched");
                    r
                }
            };
            for ((r, p0, b0), (_, p1, b1)) in before.iter().zip(&after) {
                let (dp, db) = if *r == reason { (1, bytes) } else { (0, 0) };
                prop_assert_eq!((p1 - p0, b1 - b0), (dp, db), "counter {}", r.as_str());
            }
        }
    });
    let (forwarded, passed) = (forwarded.get(), passed.into_inner());
    assert!(forwarded > 100, "the cases forwarded only {forwarded} frames");
    for r in [
        Reason::NotIp,
        Reason::NotUdp,
        Reason::IpOptions,
        Reason::Fragment,
        Reason::NotRelayPort,
        Reason::Malformed,
        Reason::NotRelay,
        Reason::NoLink,
        Reason::WrongSource,
    ] {
        assert!(passed.contains(&r), "no case exercised {}", r.as_str());
    }
}

fn id(b: &[u8; 16]) -> ferry::wire::AllocationId {
    ferry::wire::AllocationId(*b)
}

fn canon(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(ferry::core::canonical_ip(a.ip()), a.port())
}
