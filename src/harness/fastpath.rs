//! The kernel fast path against the core: arbitrary sessions driven through a core that
//! publishes its links, a model of the kernel map built only from the core's [`LinkOp`]s, and
//! every datagram shown first to the program's twin as the frame the NIC would deliver.

use std::collections::HashMap;
use std::net::SocketAddr;

use super::Bytes;
use crate::client::packets;
use crate::core::{Action, Control, Core, CoreConfig, Created, Entropy, Event, LinkOp, ReleaseReason};
use crate::wire::AllocationId;
use crate::xdp::frames;
use crate::xdp::layout::{Endpoint, Link, L2};
use crate::xdp::twin::{self, Decision, Links};

const SECRET: [u8; 64] = [0x31; 64];
const IDLE: u64 = 1_000;

/// A client address, IPv4 or IPv6; IPv4 spelt as a dual-stack socket spells it (IPv4-mapped)
/// when `mapped`.
fn addr(n: u8, mapped: bool) -> SocketAddr {
    let port = 20_000 + (n & 7) as u16;
    let host = 1 + ((n >> 3) & 3);
    match (n >> 6, mapped) {
        (0..=2, false) => SocketAddr::from(([127, 0, 0, host], port)),
        (0..=2, true) => format!("[::ffff:127.0.0.{host}]:{port}").parse().expect("address"),
        _ => SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], port + host as u16 * 8)),
    }
}

fn key(a: &AllocationId, b: &AllocationId) -> ([u8; 16], [u8; 16]) {
    (a.0, b.0)
}

/// What a run exercised (so a test can tell that its inputs reached the interesting paths).
#[derive(Clone, Copy, Debug, Default)]
pub struct Exercised {
    /// Frames the twin would forward, and of those the ones left to the kernel alone.
    pub forwarded: u32,
    pub kernel_only: u32,
    pub links_up: u32,
    pub links_down: u32,
    pub kernel_checks: u32,
}

/// Checked after every step:
/// - every frame the twin would forward, the core (fed the same datagram) forwards unchanged to
///   the same address;
/// - every entry of the kernel map links two live, linked allocations at the addresses the core
///   has them bound to (never a stale address);
/// - an allocation whose RELAYs only the kernel saw is not timed out before `idle_timeout` has
///   passed since the kernel last forwarded one;
/// - releasing everything empties the map.
pub fn fastpath_sequence(data: &[u8]) -> Exercised {
    let mut seen = Exercised::default();
    let mut cfg = CoreConfig::new(SECRET);
    cfg.max_allocations = 16;
    cfg.max_connections_cap = 3;
    cfg.unbound_timeout = 3_000;
    cfg.idle_timeout = IDLE;
    cfg.host_alone_timeout = 3_000;
    cfg.rebind_quiet = 300;
    cfg.kernel_links = true;
    let mut core = Core::new(cfg, 0);
    let listen = Endpoint::for_listen("[::]:7777".parse().expect("address"));
    let relay4: SocketAddr = "127.0.0.100:7777".parse().expect("address");
    let relay6: SocketAddr = "[::1]:7777".parse().expect("address");
    let mut allocs: Vec<Created> = Vec::new();
    let mut map = Links::new();
    // When the kernel (alone) last forwarded for each (sender, recipient).
    let mut kernel_seen: HashMap<([u8; 16], [u8; 16]), u64> = HashMap::new();
    // When the kernel last forwarded a RELAY from each allocation.
    let mut kernel_last: HashMap<AllocationId, u64> = HashMap::new();
    let mut linked: HashMap<AllocationId, AllocationId> = HashMap::new();
    let mut host_of: HashMap<AllocationId, AllocationId> = HashMap::new();
    let mut now = 0u64;
    let mut seed = 0u8;
    let mapped = data.first().is_some_and(|b| b & 1 == 1);
    let mut b = Bytes(data);
    let pick = |allocs: &[Created], i: u8| allocs.get(i as usize % allocs.len().max(1)).cloned();

    while let Some(op) = b.u8() {
        let arg = b.u8().unwrap_or(0);
        let random = addr(b.u8().unwrap_or(0), mapped);
        seed = seed.wrapping_add(1);
        let mut datagram: Option<Vec<u8>> = None;
        let mut kernel_only = false;
        // The peer a message of `a` names: its session's other side most of the time.
        let partner = |allocs: &[Created], a: &Created, i: u8| {
            let mine = allocs
                .iter()
                .find(|c| host_of.get(&a.id) == Some(&c.id) || host_of.get(&c.id) == Some(&a.id));
            match (mine, i % 4) {
                (Some(p), 0..=2) => Some(p.clone()),
                _ => pick(allocs, i),
            }
        };
        match op % 16 {
            0 | 1 => {
                if let Ok(c) = core.create_host(now, 1 + (arg % 3) as u16, Entropy { id: [seed; 16] }) {
                    allocs.push(c);
                }
            }
            2 | 3 => {
                if let Some(h) = pick(&allocs, arg) {
                    if let Ok(c) = core.create_joiner(now, &h.id, Entropy { id: [seed; 16] }) {
                        host_of.insert(c.id, h.id);
                        allocs.push(c);
                    }
                }
            }
            4..=6 => {
                if let Some(a) = pick(&allocs, arg) {
                    datagram = Some(packets::bind(&a.key, b.u16().unwrap_or(0), &a.connection_data));
                }
            }
            7 | 8 => {
                if let Some(a) = pick(&allocs, arg) {
                    if let Some(t) = partner(&allocs, &a, arg / 7) {
                        datagram = Some(packets::connect_request(&a.id, &t.connection_data));
                    }
                }
            }
            9..=11 => {
                // A RELAY; op 11 leaves it to the kernel alone when the kernel takes it.
                if let Some(a) = pick(&allocs, arg) {
                    if let Some(t) = partner(&allocs, &a, arg / 5) {
                        let n = b.u8().unwrap_or(0) as usize;
                        datagram = packets::relay(&a.id, &t.id, &vec![0xAB; n]).ok();
                        kernel_only = op % 16 == 11;
                    }
                }
            }
            12 => datagram = pick(&allocs, arg).map(|a| packets::ping(&a.id, 1)),
            13 => {
                if let Some(a) = pick(&allocs, arg) {
                    if let Some(t) = partner(&allocs, &a, arg / 3) {
                        datagram = Some(packets::disconnect(&a.id, &t.id));
                    }
                }
            }
            14 => match arg % 3 {
                0 => datagram = pick(&allocs, arg / 3).map(|a| packets::close(&a.id)),
                _ => {
                    if let Some(a) = pick(&allocs, arg / 3) {
                        let _ = core.handle_control(now, Control::Release { id: a.id });
                    }
                }
            },
            _ => {
                now += (arg % 64) as u64 * 10;
                core.handle_timeout(now);
            }
        }
        // A client sends from where it is bound most of the time, from its usual address
        // (binding there) sometimes, and rarely from anywhere.
        let from = match &datagram {
            Some(d) => {
                let i = allocs.iter().position(|a| Some(a.id) == sender(d)).unwrap_or(0);
                let home = addr((i as u8).wrapping_mul(37), mapped);
                match b.u8().unwrap_or(0) % 8 {
                    0..=4 => sender(d).and_then(|s| core.bound_addr(&s)).unwrap_or(home),
                    5 | 6 => home,
                    _ => random,
                }
            }
            None => random,
        };

        if let Some(mut d) = datagram {
            let canon = SocketAddr::new(crate::core::canonical_ip(from.ip()), from.port());
            let relay = if canon.is_ipv4() { relay4 } else { relay6 };
            let mut frame = frames::udp_frame(canon, relay, &d);
            let (decision, _) = twin::decide(&listen, &map, L2::Fib, &mut frame);
            match decision {
                Decision::Forward { .. } if kernel_only => {
                    seen.forwarded += 1;
                    seen.kernel_only += 1;
                    let sender = AllocationId::read(&d, 4);
                    kernel_seen.insert(key(&sender, &AllocationId::read(&d, 20)), now);
                    kernel_last.insert(sender, now);
                }
                Decision::Forward { to } => {
                    seen.forwarded += 1;
                    let snapshot = d.clone();
                    match core.handle_datagram(now, from, &mut d) {
                        Action::Forward(dst) => {
                            let dst = SocketAddr::new(crate::core::canonical_ip(dst.ip()), dst.port());
                            assert_eq!(dst, to, "the kernel and the core forward to different addresses");
                            assert_eq!(d, snapshot, "the core changed a datagram the kernel would forward");
                        }
                        other => panic!("the kernel would forward what the core answers {other:?}"),
                    }
                }
                Decision::Pass(_) => {
                    let is_disconnect = d.len() >= 4 && d[3] == 9;
                    let action = core.handle_datagram(now, from, &mut d);
                    if is_disconnect && matches!(action, Action::Forward(_) | Action::Consumed) {
                        let (a, t) = (AllocationId::read(&d, 4), AllocationId::read(&d, 20));
                        linked.retain(|j, h| !(*j == a && *h == t || *j == t && *h == a));
                    }
                }
            }
        }
        // The kernel's answers to the core's questions, from the same model; then the core's
        // ops (an answer may expire an allocation), applied before anything else as the shard
        // does. A link's counters are read before it is deleted.
        loop {
            let mut idle = true;
            while let Some(c) = core.poll_kernel_check() {
                idle = false;
                seen.kernel_checks += 1;
                let last = c.links.iter().filter_map(|(f, t)| kernel_seen.get(&key(f, t)).copied()).max();
                core.kernel_seen(now, &c.id, last);
            }
            while let Some(op) = core.poll_link_op() {
                idle = false;
                match op {
                    LinkOp::Up { host, host_addr, joiner, joiner_addr } => {
                        seen.links_up += 1;
                        if let (Some(hj), Some(jh)) =
                            (Link::new(host_addr, joiner_addr), Link::new(joiner_addr, host_addr))
                        {
                            map.insert(key(&host, &joiner), hj);
                            map.insert(key(&joiner, &host), jh);
                        }
                    }
                    LinkOp::Down { host, joiner } => {
                        seen.links_down += 1;
                        for (f, t) in [(host, joiner), (joiner, host)] {
                            map.remove(&key(&f, &t));
                            if let Some(at) = kernel_seen.remove(&key(&f, &t)) {
                                core.kernel_activity(&f, at);
                            }
                        }
                    }
                }
            }
            if idle {
                break;
            }
        }
        while let Some(ev) = core.poll_event() {
            match ev {
                Event::Connected { host, joiner } => {
                    linked.insert(joiner, host);
                }
                Event::Released { id, reason, .. } => {
                    if reason == ReleaseReason::TimedOut {
                        if let Some(&t) = kernel_last.get(&id) {
                            assert!(
                                now >= t + IDLE,
                                "{id} timed out {}ms after the kernel forwarded for it",
                                now - t
                            );
                        }
                    }
                    linked.retain(|j, h| *j != id && *h != id);
                }
                Event::Bound { .. } => {}
            }
        }
        for ((f, t), l) in &map {
            let (f, t) = (AllocationId(*f), AllocationId(*t));
            let canon = |a: Option<SocketAddr>| {
                a.map(|a| SocketAddr::new(crate::core::canonical_ip(a.ip()), a.port()))
            };
            assert_eq!(canon(core.bound_addr(&f)), Some(l.from), "kernel entry {f}→{t} with a stale sender");
            assert_eq!(canon(core.bound_addr(&t)), Some(l.to), "kernel entry {f}→{t} to a stale address");
            let pair = linked.get(&f) == Some(&t) || linked.get(&t) == Some(&f);
            assert!(pair, "kernel entry {f}→{t} between allocations that are not linked");
        }
        while core.poll_transmit().is_some() {}
    }
    for a in &allocs {
        let _ = core.handle_control(now, Control::Release { id: a.id });
    }
    while let Some(op) = core.poll_link_op() {
        if let LinkOp::Down { host, joiner } = op {
            map.remove(&key(&host, &joiner));
            map.remove(&key(&joiner, &host));
        }
    }
    assert!(map.is_empty(), "links left in the kernel after every allocation was released");
    seen
}

/// The allocation a datagram names as its sender (at offset 4; 8 in a BIND, inside its
/// connection data).
fn sender(d: &[u8]) -> Option<AllocationId> {
    let at = if d.get(3) == Some(&0) { 8 } else { 4 };
    (d.len() >= at + 16).then(|| AllocationId::read(d, at))
}
