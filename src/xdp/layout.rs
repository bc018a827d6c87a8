//! Byte layouts of the program's maps (`bpf/ferry_xdp.c`: `struct link_key`, `struct link`,
//! `struct config`, `struct counter`), written and read here only.

use std::net::{IpAddr, SocketAddr};

use crate::core::canonical_ip;
use crate::wire::AllocationId;

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const KEY_SIZE: usize = 32;
/// `struct link`: addresses and ports (40 bytes), counters (24), the cached next hop (24).
pub const LINK_SIZE: usize = 88;
pub const CONFIG_SIZE: usize = 88;
pub const COUNTER_SIZE: usize = 16;
pub const MAX_LISTEN: usize = 4;
/// `endpoint.flags`: any local address.
const ANY_ADDR: u8 = 1;

/// `struct link_key`: (sender, recipient).
pub fn link_key(from: &AllocationId, to: &AllocationId) -> [u8; KEY_SIZE] {
    let mut k = [0u8; KEY_SIZE];
    k[..16].copy_from_slice(&from.0);
    k[16..].copy_from_slice(&to.0);
    k
}

/// An address as the program stores it: family, 16 address bytes (IPv4 in the first 4), port.
pub fn ip_bytes(a: &SocketAddr) -> (u8, [u8; 16]) {
    let mut b = [0u8; 16];
    match canonical_ip(a.ip()) {
        IpAddr::V4(v) => {
            b[..4].copy_from_slice(&v.octets());
            (AF_INET, b)
        }
        IpAddr::V6(v) => (AF_INET6, v.octets()),
    }
}

/// The forwarding part of `struct link` (the counters follow it in the map).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    /// The address the sender is bound to (a RELAY from elsewhere is not the kernel's).
    pub from: SocketAddr,
    /// The recipient's bound address.
    pub to: SocketAddr,
}

impl Link {
    /// Both ends in one family (the program rewrites headers in place and cannot change it).
    pub fn new(from: SocketAddr, to: SocketAddr) -> Option<Self> {
        let (from, to) = (canon(from), canon(to));
        (from.is_ipv4() == to.is_ipv4()).then_some(Self { from, to })
    }

    /// A new entry: zero counters, and no next hop yet (the program looks it up).
    pub fn encode(&self) -> [u8; LINK_SIZE] {
        let mut v = [0u8; LINK_SIZE];
        let (family, from) = ip_bytes(&self.from);
        let (_, to) = ip_bytes(&self.to);
        v[..16].copy_from_slice(&from);
        v[16..32].copy_from_slice(&to);
        v[32..34].copy_from_slice(&self.from.port().to_be_bytes());
        v[34..36].copy_from_slice(&self.to.port().to_be_bytes());
        v[36] = family;
        v
    }
}

fn canon(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(a.ip()), a.port())
}

/// The counters of a link entry: RELAYs forwarded, their payload bytes, and the
/// `CLOCK_MONOTONIC` time of the latest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub packets: u64,
    pub bytes: u64,
    pub last_ns: u64,
}

impl LinkCounters {
    pub fn decode(v: &[u8; LINK_SIZE]) -> Self {
        let u = |i: usize| u64::from_ne_bytes(v[i..i + 8].try_into().expect("8 bytes"));
        Self { packets: u(40), bytes: u(48), last_ns: u(56) }
    }
}

/// Where the relay listens, as the program matches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Any local address on `addr`'s port (a wildcard `relay_listen`).
    pub any: bool,
}

impl Endpoint {
    /// The endpoints a socket bound to `listen` receives on: a wildcard IPv6 socket is
    /// dual-stack, so it takes IPv4 too.
    pub fn for_listen(listen: SocketAddr) -> Vec<Endpoint> {
        let port = listen.port();
        match listen.ip() {
            IpAddr::V4(v) if v.is_unspecified() => vec![Endpoint { addr: listen, any: true }],
            IpAddr::V6(v) if v.is_unspecified() => vec![
                Endpoint { addr: listen, any: true },
                Endpoint { addr: SocketAddr::from(([0, 0, 0, 0], port)), any: true },
            ],
            ip => vec![Endpoint { addr: SocketAddr::new(canonical_ip(ip), port), any: false }],
        }
    }
}

/// Forwarding decisions: where the next hop's MAC address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2 {
    /// The kernel's FIB and neighbour table (`bpf_fib_lookup`).
    Fib = 0,
    /// Back to the sender's MAC address (a host whose only neighbour is its gateway).
    Reflect = 1,
}

/// `struct config`.
pub fn config(listen: &[Endpoint], l2: L2) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    for (i, e) in listen.iter().take(MAX_LISTEN).enumerate() {
        let o = i * 20;
        let (family, ip) = ip_bytes(&e.addr);
        c[o..o + 16].copy_from_slice(&ip);
        c[o + 16..o + 18].copy_from_slice(&e.addr.port().to_be_bytes());
        c[o + 18] = family;
        c[o + 19] = if e.any { ANY_ADDR } else { 0 };
    }
    c[80..84].copy_from_slice(&(l2 as u32).to_ne_bytes());
    c
}
