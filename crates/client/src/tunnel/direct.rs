//! Direct paths inside a tunnel (`docs/paths.md`). Every peer tunnel gets a [`PeerPath`]; game
//! DATA frames go on the route it names — through the relay, straight to the peer from the same
//! socket, or both while a direct path is in doubt — and the receiver drops duplicates with the
//! flow's replay window. Candidates cross the relay session as CANDIDATES frames; probes and
//! answers go straight between the tunnels' relay sockets.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};

use super::batch::SendBatch;
use super::frame::MAX_RELAY_PAYLOAD;
use crate::clock::Millis;
use crate::path::{Candidates, PathConfig, PathStats, PeerPath, Policy, Route, MAX_CANDIDATES};
use crate::wire::{stun, AllocationId};
use crate::RelayClient;

/// A tunnel's path settings (`--path`, `--punch-interval`, `--punch-attempts`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathOptions {
    pub policy: Policy,
    pub cfg: PathConfig,
}

/// DATA frames kept per peer while its policy waits for a path (`direct-first` before its
/// fallback, `direct`); the oldest go first beyond this.
pub const MAX_HELD: usize = 256;
/// Without a STUN answer from the relay after this long, candidates go out with local
/// addresses only (a relay with STUN off).
const STUN_PATIENCE: Millis = 3_000;
/// Between copies of our candidates while the peer's have not arrived.
const CANDIDATES_EVERY: Millis = 1_000;

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // A failing system RNG leaves zeros: probes then still work, only their key is guessable.
    let _ = getrandom::getrandom(&mut b);
    b
}

/// This tunnel's reflexive address, learned with a STUN Binding to the relay port from the
/// relay socket itself (another socket would have another NAT mapping).
pub(crate) struct Reflexive {
    tx: [u8; 12],
    next: Millis,
    since: Millis,
    tries: u32,
    pub addr: Option<SocketAddr>,
}

/// STUN requests before giving up (a relay with STUN off never answers).
const STUN_TRIES: u32 = 10;

impl Reflexive {
    pub fn new(now: Millis) -> Self {
        Self { tx: random(), next: now, since: now, tries: 0, addr: None }
    }

    /// The request to send now, if one is due (every 500 ms until answered, 10 at most).
    pub fn due(&mut self, now: Millis) -> Option<[u8; stun::HEADER_LEN]> {
        if self.addr.is_some() || now < self.next || self.tries >= STUN_TRIES {
            return None;
        }
        self.tries += 1;
        self.next = now + 500;
        Some(stun::binding_request(self.tx))
    }

    /// Takes a datagram from the relay's address; returns whether it was STUN (consumed).
    pub fn on_datagram(&mut self, d: &[u8]) -> bool {
        if !stun::is_stun(d) {
            return false;
        }
        if let Some(a) = stun::mapped_address(d, &self.tx) {
            self.addr = Some(a);
        }
        true
    }

    /// The socket moved: ask again.
    pub fn reset(&mut self, now: Millis) {
        *self = Self::new(now);
    }

    /// Whether candidates can go out: the reflexive address is known, or STUN is not answering.
    pub fn settled(&self, now: Millis) -> bool {
        self.addr.is_some() || now >= self.since + STUN_PATIENCE
    }
}

/// This side's candidates: the reflexive address, then the host's own interface addresses with
/// the socket's port (players behind one NAT reach each other on their LAN).
pub(crate) fn local_candidates(sock: Option<SocketAddr>, reflexive: Option<SocketAddr>) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = reflexive.into_iter().collect();
    let Some(sock) = sock else { return out };
    let ips = if sock.ip().is_unspecified() { interface_ips(sock.is_ipv4()) } else { vec![sock.ip()] };
    for ip in ips {
        let a = SocketAddr::new(ip, sock.port());
        if out.len() < MAX_CANDIDATES && !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// Usable unicast addresses of this host's interfaces in one family (no loopback, no IPv6
/// link-local: neither reaches another machine without a scope).
#[cfg(unix)]
fn interface_ips(v4: bool) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list that freeifaddrs releases; every node and
    // address pointer is checked before it is read, and sockaddr_in/in6 are read only when the
    // family says so.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut p = head;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                let fam = i32::from((*a).sa_family);
                if v4 && fam == libc::AF_INET {
                    let s = &*(a as *const libc::sockaddr_in);
                    out.push(IpAddr::from(u32::from_be(s.sin_addr.s_addr).to_be_bytes()));
                } else if !v4 && fam == libc::AF_INET6 {
                    let s = &*(a as *const libc::sockaddr_in6);
                    out.push(IpAddr::from(s.sin6_addr.s6_addr));
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out.retain(|ip| match ip {
        IpAddr::V4(v) => !v.is_loopback() && !v.is_unspecified() && !v.is_link_local(),
        IpAddr::V6(v) => !v.is_loopback() && !v.is_unspecified() && (v.segments()[0] & 0xffc0) != 0xfe80,
    });
    out
}

#[cfg(not(unix))]
fn interface_ips(_v4: bool) -> Vec<IpAddr> {
    Vec::new()
}

/// One peer tunnel's path: the machine, frames held for a path, and the candidate exchange.
pub(super) struct PeerDirect {
    pub path: PeerPath,
    held: VecDeque<Vec<u8>>,
    /// The peer's candidates arrived.
    got: bool,
    /// When ours go out next (`Millis::MAX`: only when the peer asks).
    next_send: Millis,
    /// What was last reported (route, reason, direct address).
    reported: Option<(&'static str, &'static str, Option<SocketAddr>)>,
    failed_reported: bool,
}

impl PeerDirect {
    /// `initiator`: send candidates until the peer's arrive (the joiner); otherwise only in
    /// answer to the peer's (the host).
    pub fn new(now: Millis, opts: &PathOptions, initiator: bool) -> Self {
        Self {
            path: PeerPath::new(now, opts.policy, opts.cfg, random()),
            held: VecDeque::new(),
            got: false,
            next_send: if initiator { now } else { Millis::MAX },
            reported: None,
            failed_reported: false,
        }
    }

    /// The peer's CANDIDATES frame body: `[have yours u8][candidates]`.
    pub fn on_candidates(&mut self, now: Millis, body: &[u8]) {
        let Some((&have, rest)) = body.split_first() else { return };
        let Some(c) = Candidates::decode(rest) else { return };
        if !self.got {
            self.got = true;
            self.path.on_candidates(now, &c);
        }
        // The peer lacks ours (the first copy, or our answer was lost): answer.
        self.next_send = if have == 0 { now } else { Millis::MAX };
    }

    /// Our CANDIDATES frame body, when one is due.
    pub fn candidates_due(
        &mut self,
        now: Millis,
        refl: &Reflexive,
        sock: Option<SocketAddr>,
    ) -> Option<Vec<u8>> {
        if now < self.next_send || !(refl.settled(now) || self.path.policy() == Policy::Relay) {
            return None;
        }
        self.next_send = if self.got { Millis::MAX } else { now + CANDIDATES_EVERY };
        let addrs =
            if self.path.policy() == Policy::Relay { Vec::new() } else { local_candidates(sock, refl.addr) };
        let mut body = vec![u8::from(self.got)];
        body.extend_from_slice(&self.path.candidates(addrs).encode());
        Some(body)
    }

    /// Puts one DATA frame (written by `write`) into `tx` on the route the path names now, or
    /// holds it; returns how many datagrams were queued for the relay and directly.
    pub fn route_data(
        &mut self,
        now: Millis,
        tx: &mut SendBatch,
        relay: &RelayClient,
        to: &AllocationId,
        write: impl Fn(&mut [u8]) -> Option<usize>,
    ) -> (u64, u64) {
        let route = self.path.route(now);
        let mut len = 0;
        let (mut r, mut d) = (0, 0);
        let relay_addr = relay.relay_addr();
        let to_relay = |tx: &mut SendBatch, len: &mut usize| {
            tx.push(Some(relay_addr), |b| {
                let n = relay.write_relay(to, b, &write)?;
                *len = n - crate::wire::Relay::<&[u8]>::HEADER_LEN;
                Some(n)
            })
        };
        match route {
            Route::Relay => r += u64::from(to_relay(tx, &mut len)),
            Route::Direct(a) | Route::Both(a) => {
                let pushed = tx.push(Some(a), |b| {
                    let n = write(b)?;
                    len = n;
                    Some(n)
                });
                d += u64::from(pushed);
                if matches!(route, Route::Both(_)) {
                    r += u64::from(to_relay(tx, &mut len));
                } else if let Some(f) = tx.last().filter(|_| pushed) {
                    // Kept until proven, to go again through the relay if the path lost it.
                    self.path.remember(now, f);
                }
            }
            Route::Hold => {
                let mut v = vec![0u8; MAX_RELAY_PAYLOAD];
                if let Some(n) = write(&mut v) {
                    v.truncate(n);
                    self.hold(v);
                }
            }
        }
        self.path.on_sent(route, len);
        (r, d)
    }

    /// One turn of the schedule: probes and answers due go out from `relay`'s socket, and held
    /// frames leave once there is a route.
    pub fn drive(&mut self, now: Millis, relay: &mut RelayClient, to: &AllocationId) {
        if self.path.poll_timeout().is_some_and(|t| t <= now) {
            self.path.handle_timeout(now);
        }
        self.send_transmits(relay);
        // What the direct path may have lost goes again on the current route (the peer drops
        // what it already has).
        while let Some(f) = self.path.poll_resend() {
            if !self.put(now, relay, to, &f) {
                self.hold(f);
            }
        }
        while !self.held.is_empty() && self.path.route(now) != Route::Hold {
            let Some(f) = self.held.pop_front() else { break };
            self.put(now, relay, to, &f);
        }
    }

    fn hold(&mut self, f: Vec<u8>) {
        if self.held.len() >= MAX_HELD {
            self.held.pop_front();
        }
        self.held.push_back(f);
    }

    /// Sends one frame on the current route, outside a batch; false when there is none yet.
    fn put(&mut self, now: Millis, relay: &mut RelayClient, to: &AllocationId, f: &[u8]) -> bool {
        let route = self.path.route(now);
        match route {
            Route::Relay => {
                let _ = relay.send(to, f);
            }
            Route::Direct(a) => {
                let _ = relay.socket().send_to(f, a);
                self.path.remember(now, f);
            }
            Route::Both(a) => {
                let _ = relay.socket().send_to(f, a);
                let _ = relay.send(to, f);
            }
            Route::Hold => return false,
        }
        self.path.on_sent(route, f.len());
        true
    }

    /// Sends what the path machine wants sent straight to the peer (probes, answers).
    pub fn send_transmits(&mut self, relay: &RelayClient) {
        while let Some(t) = self.path.poll_transmit() {
            // An unreachable candidate fails here or with an ICMP error later; both are normal.
            let _ = relay.socket().send_to(&t.data, t.to);
        }
    }

    /// The stats when the route, its reason or the direct address changed since last asked.
    pub fn changed(&mut self, now: Millis) -> Option<PathStats> {
        let s = self.path.stats(now);
        let key = (s.route, s.last_reason, s.direct);
        if self.reported == Some(key) {
            return None;
        }
        self.reported = Some(key);
        Some(s)
    }

    /// The reason the two policies cannot work, once.
    pub fn failure_once(&mut self) -> Option<String> {
        if self.failed_reported {
            return None;
        }
        let f = self.path.failure()?.to_string();
        self.failed_reported = true;
        Some(f)
    }
}

/// A peer's path as `ferry tunnel status` and `--json` show it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PeerStatus {
    pub peer: String,
    pub policy: &'static str,
    #[serde(flatten)]
    pub stats: PathStats,
}

impl PeerStatus {
    pub(super) fn of(peer: &AllocationId, d: &PeerDirect, now: Millis) -> Self {
        Self { peer: peer.to_string(), policy: d.path.policy().as_str(), stats: d.path.stats(now) }
    }
}

/// Whether bytes are a peer tunnel's direct path traffic at all (a probe, an answer or a frame).
pub(super) fn is_direct_traffic(d: &[u8]) -> bool {
    crate::path::is_path_message(d) || d.first() == Some(&super::frame::MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_answered_once_and_not_ping_ponged() {
        let opts = PathOptions::default();
        let mut j = PeerDirect::new(0, &opts, true);
        let mut h = PeerDirect::new(0, &opts, false);
        let mut refl = Reflexive::new(0);
        refl.addr = Some("192.0.2.1:5000".parse().unwrap());
        let sock = Some("0.0.0.0:5000".parse().unwrap());
        assert!(h.candidates_due(0, &refl, sock).is_none(), "the host waits to be asked");
        let c1 = j.candidates_due(0, &refl, sock).unwrap();
        assert_eq!(c1[0], 0);
        assert!(j.candidates_due(10, &refl, sock).is_none());
        h.on_candidates(10, &c1);
        let a1 = h.candidates_due(10, &refl, sock).unwrap();
        assert_eq!(a1[0], 1, "the host has the joiner's");
        j.on_candidates(20, &a1);
        // Both have each other's: nobody sends again, ever.
        for t in [20, 1_000, 5_000, 60_000] {
            assert!(j.candidates_due(t, &refl, sock).is_none(), "{t}");
            assert!(h.candidates_due(t, &refl, sock).is_none(), "{t}");
        }
    }

    #[test]
    fn a_lost_answer_is_asked_for_again() {
        let opts = PathOptions::default();
        let mut j = PeerDirect::new(0, &opts, true);
        let mut h = PeerDirect::new(0, &opts, false);
        let refl = Reflexive::new(0);
        // No STUN answer: candidates wait, then go with local addresses only.
        assert!(j.candidates_due(0, &refl, None).is_none());
        let c1 = j.candidates_due(STUN_PATIENCE, &refl, None).unwrap();
        h.on_candidates(STUN_PATIENCE, &c1);
        let _lost = h.candidates_due(STUN_PATIENCE, &refl, None).unwrap();
        let c2 = j.candidates_due(STUN_PATIENCE + CANDIDATES_EVERY, &refl, None).unwrap();
        assert_eq!(c2[0], 0);
        h.on_candidates(STUN_PATIENCE + CANDIDATES_EVERY, &c2);
        assert!(h.candidates_due(STUN_PATIENCE + CANDIDATES_EVERY, &refl, None).is_some());
    }

    #[test]
    fn stun_is_asked_every_half_second_and_given_up_after_ten() {
        let mut r = Reflexive::new(0);
        let sent = (0..20_000).step_by(100).filter(|&t| r.due(t).is_some()).count();
        assert_eq!(sent, STUN_TRIES as usize);
        assert!(r.settled(STUN_PATIENCE), "candidates go out without it");
    }

    #[test]
    fn the_relay_policy_reveals_no_address() {
        let opts = PathOptions { policy: Policy::Relay, cfg: PathConfig::default() };
        let mut j = PeerDirect::new(0, &opts, true);
        let mut refl = Reflexive::new(0);
        refl.addr = Some("192.0.2.1:5000".parse().unwrap());
        let c = j.candidates_due(0, &refl, Some("10.0.0.2:5000".parse().unwrap())).unwrap();
        let d = Candidates::decode(&c[1..]).unwrap();
        assert!(d.addrs.is_empty() && d.policy == Policy::Relay);
    }
}
