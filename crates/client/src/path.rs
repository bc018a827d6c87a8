//! Which path a peer's game datagrams take: direct (hole-punched) or through the relay — a pure,
//! sans-IO state machine driven with an explicit `now`, so the NAT simulation can run it in
//! virtual time and the tunnel and SDK can run it on real sockets.
//!
//! Both peers learn their reflexive address (STUN to the relay port, from the socket they use for
//! everything), add their local addresses, and send the list — with their policy and a random
//! per-session probe key — to the other inside the relay session ([`Candidates`]). Then each
//! side sends authenticated probes to the other's candidates on a schedule; an authenticated probe
//! is answered from wherever it came (a peer-reflexive address counts), and an answer proves the
//! path both ways. Data is accepted on the direct path only from an address that has proven
//! itself.
//!
//! Policies ([`Policy`]):
//! - `auto` (default): data goes through the relay from the first datagram and moves to the
//!   direct path once a probe proves it;
//! - `direct-first` (Photon's flow): data waits while direct attempts run every `interval`;
//!   after `fallback_after` unanswered attempts (⌈2/3 × attempts⌉) it goes through the relay;
//!   after `attempts` the fast attempts stop and an upgrade probe runs every `upgrade_interval`;
//! - `relay`: never direct, and no address is revealed to the peer;
//! - `direct`: the relay carries signalling only; data waits for a direct path.
//!
//! A proven direct path is kept alive with a probe every `heartbeat`; when no answer has come
//! for `trust`, data goes on *both* paths (the receiver drops duplicates with [`ReplayWindow`]),
//! and after two more heartbeats without one the peer is demoted to the relay and fast attempts
//! start again (the NAT mapping may have expired: re-punching).

use std::net::{IpAddr, SocketAddr};

use crate::auth::PreKeyedHmac;
use crate::clock::Millis;

/// Where a peer's game datagrams may go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    #[default]
    Auto,
    DirectFirst,
    Relay,
    Direct,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::DirectFirst => "direct-first",
            Self::Relay => "relay",
            Self::Direct => "direct",
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::Auto => 0,
            Self::DirectFirst => 1,
            Self::Relay => 2,
            Self::Direct => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        [Self::Auto, Self::DirectFirst, Self::Relay, Self::Direct].into_iter().find(|p| p.code() == c)
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "direct-first" => Ok(Self::DirectFirst),
            "relay" => Ok(Self::Relay),
            "direct" => Ok(Self::Direct),
            _ => Err(format!("`{s}` is not one of auto, direct-first, relay, direct")),
        }
    }
}

/// Timings of the path policy, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathConfig {
    /// Between fast direct attempts (Photon: 500 ms).
    pub interval: Millis,
    /// Fast attempts before they stop (Photon: 10).
    pub attempts: u32,
    /// `direct-first`: unanswered attempts after which data goes through the relay (⌈2/3 ×
    /// attempts⌉ = 7).
    pub fallback_after: u32,
    /// Between upgrade probes once the fast attempts are over and the peer is on the relay.
    pub upgrade_interval: Millis,
    /// Between keep-alive probes on a proven direct path.
    pub heartbeat: Millis,
    /// A direct path with no answer for this long is doubted: data goes on both paths.
    pub trust: Millis,
}

impl Default for PathConfig {
    fn default() -> Self {
        Self::photon(500, 10)
    }
}

impl PathConfig {
    /// Photon's schedule with this interval and attempt count.
    pub fn photon(interval: Millis, attempts: u32) -> Self {
        Self {
            interval,
            attempts,
            fallback_after: (2 * attempts).div_ceil(3),
            upgrade_interval: 5_000,
            heartbeat: 2_500,
            trust: 5_500,
        }
    }
}

/// The route for a game datagram right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Through the relay session.
    Relay,
    /// Straight to the peer at this address.
    Direct(SocketAddr),
    /// On both (a direct path is in doubt); the receiver drops the duplicate.
    Both(SocketAddr),
    /// Not yet: the policy waits for a path (`direct-first` before its fallback, `direct`).
    Hold,
}

impl Route {
    /// `direct`, `relay`, `both` or `waiting`, as status shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Relay => "relay",
            Self::Direct(_) => "direct",
            Self::Both(_) => "both",
            Self::Hold => "waiting",
        }
    }
}

/// What one side tells the other through the relay: its policy, its probe key and its candidate
/// addresses (none under the `relay` policy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidates {
    pub policy: Policy,
    pub key: [u8; 16],
    pub addrs: Vec<SocketAddr>,
}

const CAND_MAGIC: &[u8; 4] = b"FRC1";
const PROBE_MAGIC: &[u8; 4] = b"FRP1";
const KIND_PROBE: u8 = 1;
const KIND_ACK: u8 = 2;
const TAG_LEN: usize = 16;
/// Most candidates carried.
pub const MAX_CANDIDATES: usize = 8;
/// Bytes of game frames sent straight to the peer and not yet proven delivered that a path keeps
/// to send again through the relay if the direct path turns out to have lost them.
pub const MAX_UNPROVEN_BYTES: usize = 256 * 1024;

fn put_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> Option<(SocketAddr, usize)> {
    let ip_len = match *b.first()? {
        4 => 4,
        6 => 16,
        _ => return None,
    };
    let body = b.get(1..1 + ip_len + 2)?;
    let ip = if ip_len == 4 {
        IpAddr::from(<[u8; 4]>::try_from(&body[..4]).ok()?)
    } else {
        IpAddr::from(<[u8; 16]>::try_from(&body[..16]).ok()?)
    };
    let port = u16::from_be_bytes([body[ip_len], body[ip_len + 1]]);
    Some((SocketAddr::new(ip, port), 1 + ip_len + 2))
}

impl Candidates {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = CAND_MAGIC.to_vec();
        out.push(self.policy.code());
        out.extend_from_slice(&self.key);
        let addrs = if self.policy == Policy::Relay { &[][..] } else { &self.addrs[..] };
        let n = addrs.len().min(MAX_CANDIDATES);
        out.push(n as u8);
        for a in &addrs[..n] {
            put_addr(&mut out, a);
        }
        out
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.get(..4)? != CAND_MAGIC {
            return None;
        }
        let policy = Policy::from_code(*b.get(4)?)?;
        let key: [u8; 16] = b.get(5..21)?.try_into().ok()?;
        let n = *b.get(21)? as usize;
        if n > MAX_CANDIDATES {
            return None;
        }
        let mut at = 22;
        let mut addrs = Vec::with_capacity(n);
        for _ in 0..n {
            let (a, used) = get_addr(b.get(at..)?)?;
            addrs.push(a);
            at += used;
        }
        (at == b.len()).then_some(Self { policy, key, addrs })
    }
}

/// Drops duplicated and replayed sequence numbers (a sliding window of [`REPLAY_WINDOW`]): the
/// sender may put a datagram on both paths, or send it again through the relay, and the receiver
/// must deliver it once.
#[derive(Clone, Debug, Default)]
pub struct ReplayWindow {
    top: u64,
    /// Bit `s % REPLAY_WINDOW` says whether `s` was seen, for `s` in `top - REPLAY_WINDOW + 1 ..= top`.
    seen: [u64; REPLAY_WINDOW as usize / 64],
    started: bool,
}

/// Sequence numbers a receiver remembers behind the newest: a frame sent again through the relay
/// after a direct path lost it may arrive this far behind (a few seconds of a 60 Hz game).
pub const REPLAY_WINDOW: u64 = 1024;

impl ReplayWindow {
    /// [`accept`](Self::accept) for a 32-bit sequence number that wraps (the tunnel's per-flow
    /// numbers): it is read as the nearest 64-bit number to the highest seen.
    pub fn accept_wrapping(&mut self, seq: u32) -> bool {
        let full = if self.started {
            let delta = i64::from(seq.wrapping_sub(self.top as u32) as i32);
            match self.top.checked_add_signed(delta) {
                Some(f) => f,
                None => return false,
            }
        } else {
            // Room below the first number, so that earlier ones still compare.
            (1u64 << 32) + u64::from(seq)
        };
        self.accept(full)
    }

    /// Whether `seq` is new (and records it).
    pub fn accept(&mut self, seq: u64) -> bool {
        let bit = |s: u64| ((s % REPLAY_WINDOW / 64) as usize, 1u64 << (s % 64));
        if !self.started || seq > self.top {
            // Forget the numbers that fall out of the window (all of them after a long jump).
            if !self.started || seq - self.top >= REPLAY_WINDOW {
                self.seen = Default::default();
            } else {
                for s in self.top + 1..seq {
                    let (w, m) = bit(s);
                    self.seen[w] &= !m;
                }
            }
            self.started = true;
            self.top = seq;
            let (w, m) = bit(seq);
            self.seen[w] |= m;
            return true;
        }
        if self.top - seq >= REPLAY_WINDOW {
            return false;
        }
        let (w, m) = bit(seq);
        if self.seen[w] & m != 0 {
            return false;
        }
        self.seen[w] |= m;
        true
    }
}

/// What a peer link reports about itself (serializable, for `--json` status lines).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct PathStats {
    /// `direct`, `relay`, `both` or `waiting`.
    pub route: &'static str,
    /// The proven direct address, if any.
    pub direct: Option<SocketAddr>,
    /// Smoothed round-trip times (ms): direct (from probes) and relay (as reported to it).
    pub rtt_direct_ms: Option<f64>,
    pub rtt_relay_ms: Option<f64>,
    pub bytes_direct: u64,
    pub bytes_relay: u64,
    /// From the start until the first proven direct path.
    pub time_to_direct_ms: Option<Millis>,
    pub switches: u32,
    pub last_reason: &'static str,
    /// Direct attempts sent (fast and upgrade).
    pub attempts: u32,
    /// Game frames sent again through the relay because the direct path may have lost them.
    pub resent: u64,
}

/// A datagram the path machine wants sent straight to `to` (a probe or an answer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub data: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the peer's candidates.
    Idle,
    /// Fast attempts (`sent` so far).
    Punching { sent: u32 },
    /// Fast attempts over, on the relay: an upgrade probe now and then.
    Upgrading,
    /// A proven direct path.
    Direct,
    /// The two policies cannot work together.
    Failed,
}

/// One peer's path state.
#[derive(Clone, Debug)]
pub struct PeerPath {
    policy: Policy,
    cfg: PathConfig,
    my_key: [u8; 16],
    peer_key: Option<[u8; 16]>,
    peer_addrs: Vec<SocketAddr>,
    phase: Phase,
    started: Millis,
    punch_started: Millis,
    next: Millis,
    seq: u32,
    /// Probes in flight: (seq, sent at).
    inflight: Vec<(u32, Millis)>,
    direct: Option<SocketAddr>,
    /// Addresses the peer has proven to speak from (an authenticated probe or answer came from
    /// them): direct data is accepted from these only.
    verified: Vec<SocketAddr>,
    /// The last unproven address probed because data came from it, and when.
    challenged: Option<(SocketAddr, Millis)>,
    last_ack: Millis,
    fell_back: bool,
    failure: Option<String>,
    out: std::collections::VecDeque<Transmit>,
    stats: PathStats,
    /// Frames sent straight to the peer since the last proof, oldest first: (sent at, frame).
    unproven: std::collections::VecDeque<(Millis, Vec<u8>)>,
    unproven_bytes: usize,
    /// Buffers of proven frames, reused.
    spare: Vec<Vec<u8>>,
    /// A round trip before the newest answered probe was sent: frames sent before it have arrived.
    proof: Millis,
    /// This side's address as the peer saw it in the last answer.
    observed: Option<SocketAddr>,
    /// Whether the frames of the current doubt were handed back already.
    doubt_replayed: bool,
    /// Frames to send again through the relay, in order.
    resend: std::collections::VecDeque<Vec<u8>>,
}

impl PeerPath {
    /// A path machine for one peer, with this side's policy and its random probe key.
    pub fn new(now: Millis, policy: Policy, cfg: PathConfig, my_key: [u8; 16]) -> Self {
        Self {
            policy,
            cfg,
            my_key,
            peer_key: None,
            peer_addrs: Vec::new(),
            phase: Phase::Idle,
            started: now,
            punch_started: now,
            next: Millis::MAX,
            seq: 0,
            inflight: Vec::new(),
            direct: None,
            verified: Vec::new(),
            challenged: None,
            last_ack: now,
            fell_back: false,
            failure: None,
            out: Default::default(),
            stats: PathStats { route: "waiting", last_reason: "starting", ..Default::default() },
            unproven: Default::default(),
            unproven_bytes: 0,
            spare: Vec::new(),
            proof: now,
            observed: None,
            doubt_replayed: false,
            resend: Default::default(),
        }
    }

    /// Keeps a copy of a game frame just sent on [`Route::Direct`], until a probe answer proves
    /// it arrived. If the direct path turns out to have lost it (no answer for `trust`, the
    /// peer's address moved, or this side's did and the peer refused it), it comes back from
    /// [`poll_resend`](Self::poll_resend) to be sent again; the peer's replay window drops what
    /// did arrive. At most [`MAX_UNPROVEN_BYTES`] are kept (the oldest go first).
    pub fn remember(&mut self, now: Millis, frame: &[u8]) {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(frame);
        self.unproven_bytes += buf.len();
        self.unproven.push_back((now, buf));
        while self.unproven_bytes > MAX_UNPROVEN_BYTES {
            let Some((_, old)) = self.unproven.pop_front() else { break };
            self.unproven_bytes -= old.len();
            self.recycle(old);
        }
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < 64 {
            self.spare.push(buf);
        }
    }

    /// The next frame the direct path may have lost, to send again on the current route (like
    /// any game frame: counted with [`on_sent`](Self::on_sent), and remembered again when it goes
    /// direct). After a move to a peer's new address, or to this side's own new one, the route
    /// is the new, just-proven direct path; in doubt it includes the relay.
    pub fn poll_resend(&mut self) -> Option<Vec<u8>> {
        self.resend.pop_front()
    }

    /// Hands back every kept frame sent after `after` for the relay, and forgets the rest.
    fn replay(&mut self, after: Millis) {
        while let Some((t, f)) = self.unproven.pop_front() {
            self.unproven_bytes -= f.len();
            if t >= after {
                self.stats.resent += 1;
                self.resend.push_back(f);
            } else {
                self.recycle(f);
            }
        }
    }

    /// A probe sent at `sent` was answered: what was sent before it has arrived.
    fn proven(&mut self, sent: Millis) {
        self.proof = self.proof.max(sent);
        while self.unproven.front().is_some_and(|(t, _)| *t < self.proof) {
            if let Some((_, f)) = self.unproven.pop_front() {
                self.unproven_bytes -= f.len();
                self.recycle(f);
            }
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// What to send the peer through the relay: this side's policy, key and `addrs` (its
    /// reflexive address from STUN and its local addresses; dropped under `relay`).
    pub fn candidates(&self, addrs: Vec<SocketAddr>) -> Candidates {
        Candidates { policy: self.policy, key: self.my_key, addrs }
    }

    /// Why this pair cannot connect, when the two policies exclude each other.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// The peer's candidates arrived (through the relay): direct attempts start now.
    pub fn on_candidates(&mut self, now: Millis, c: &Candidates) {
        let clash = match (self.policy, c.policy) {
            (Policy::Direct, Policy::Relay) => {
                Some("this side requires a direct path and the peer allows only the relay")
            }
            (Policy::Relay, Policy::Direct) => {
                Some("the peer requires a direct path and this side allows only the relay")
            }
            _ => None,
        };
        if let Some(m) = clash {
            self.failure = Some(m.to_string());
            self.phase = Phase::Failed;
            self.stats.last_reason = "incompatible policies";
            return;
        }
        self.peer_key = Some(c.key);
        // Addresses the peer already probed us from (peer-reflexive) stay, after its list.
        let learned: Vec<SocketAddr> = std::mem::take(&mut self.peer_addrs);
        self.peer_addrs = c.addrs.iter().copied().take(MAX_CANDIDATES).collect();
        for a in learned {
            if !self.peer_addrs.contains(&a) && self.peer_addrs.len() < MAX_CANDIDATES {
                self.peer_addrs.push(a);
            }
        }
        if self.policy == Policy::Relay || c.policy == Policy::Relay {
            self.set_route_reason("relay policy");
            return;
        }
        if self.phase == Phase::Idle {
            self.phase = Phase::Punching { sent: 0 };
            self.punch_started = now;
            self.next = now;
        }
    }

    fn set_route_reason(&mut self, why: &'static str) {
        self.stats.last_reason = why;
    }

    /// Where a game datagram goes now.
    pub fn route(&self, now: Millis) -> Route {
        if self.phase == Phase::Failed {
            return Route::Hold;
        }
        if let (Phase::Direct, Some(a)) = (self.phase, self.direct) {
            return if now.saturating_sub(self.last_ack) > self.cfg.trust {
                Route::Both(a)
            } else {
                Route::Direct(a)
            };
        }
        match self.policy {
            Policy::Relay | Policy::Auto => Route::Relay,
            Policy::Direct => Route::Hold,
            Policy::DirectFirst
                if self.fell_back || self.peer_key.is_some() && self.peer_addrs.is_empty() =>
            {
                Route::Relay
            }
            Policy::DirectFirst => Route::Hold,
        }
    }

    /// Counts a game datagram sent on `route` (for the stats).
    pub fn on_sent(&mut self, route: Route, bytes: usize) {
        match route {
            Route::Relay => self.stats.bytes_relay += bytes as u64,
            Route::Direct(_) => self.stats.bytes_direct += bytes as u64,
            Route::Both(_) => {
                self.stats.bytes_relay += bytes as u64;
                self.stats.bytes_direct += bytes as u64;
            }
            Route::Hold => {}
        }
    }

    /// The relay path's round-trip time, measured by whoever pings through the relay.
    pub fn observe_relay_rtt(&mut self, rtt_ms: f64) {
        self.stats.rtt_relay_ms = Some(ewma(self.stats.rtt_relay_ms, rtt_ms));
    }

    /// Whether a direct datagram from `from` may be accepted as the peer's data: only from an
    /// address an authenticated probe or answer came from.
    pub fn accepts(&self, from: SocketAddr) -> bool {
        self.direct == Some(from) || self.verified.contains(&from)
    }

    /// Direct data came from `from`, an address the peer has not proven yet (its NAT may have
    /// given it a new mapping): probe it, at most once per `interval`, so the next datagrams from
    /// there are accepted once the peer answers.
    pub fn on_unverified(&mut self, now: Millis, from: SocketAddr) {
        if self.peer_key.is_none() || self.policy == Policy::Relay || self.phase == Phase::Failed {
            return;
        }
        if self.challenged.is_some_and(|(a, t)| a == from && now < t + self.cfg.interval) {
            return;
        }
        self.challenged = Some((from, now));
        self.probe_all(now, &[from]);
    }

    fn verify(&mut self, from: SocketAddr) {
        if !self.verified.contains(&from) {
            if self.verified.len() >= MAX_CANDIDATES {
                self.verified.remove(0);
            }
            self.verified.push(from);
        }
    }

    /// The next time [`handle_timeout`](Self::handle_timeout) has work.
    pub fn poll_timeout(&self) -> Option<Millis> {
        (self.next != Millis::MAX).then_some(self.next)
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    fn probe_all(&mut self, now: Millis, to: &[SocketAddr]) {
        let Some(_) = self.peer_key else { return };
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.inflight.push((seq, now));
        if self.inflight.len() > 32 {
            self.inflight.remove(0);
        }
        let data = self.probe(seq);
        for &a in to {
            self.out.push_back(Transmit { to: a, data: data.clone() });
        }
        self.stats.attempts += 1;
    }

    /// A probe is tagged with the *receiver's* key, and its answer with the answerer's own key
    /// (the same key: the prober's peer key): only the two peers know it, through the relay
    /// session, so a third party can neither forge nor reflect either. The answer carries the
    /// address the probe came from (what the prober's NAT maps it to, as seen by the peer).
    fn probe(&self, seq: u32) -> Vec<u8> {
        let mut m = PROBE_MAGIC.to_vec();
        m.push(KIND_PROBE);
        m.extend_from_slice(&seq.to_be_bytes());
        let t = tag(&self.peer_key.unwrap_or_default(), &m);
        m.extend_from_slice(&t);
        m
    }

    /// Runs the schedule: fast attempts, the fallback, upgrade probes, heartbeats, demotion.
    pub fn handle_timeout(&mut self, now: Millis) {
        if now < self.next {
            return;
        }
        let cands = self.peer_addrs.clone();
        match self.phase {
            Phase::Idle | Phase::Failed => self.next = Millis::MAX,
            Phase::Punching { sent } => {
                if self.policy == Policy::DirectFirst
                    && !self.fell_back
                    && now >= self.punch_started + self.cfg.fallback_after as Millis * self.cfg.interval
                {
                    self.fell_back = true;
                    self.stats.switches += 1;
                    self.set_route_reason("no direct answer: relay fallback");
                }
                if sent < self.cfg.attempts {
                    self.probe_all(now, &cands);
                    self.phase = Phase::Punching { sent: sent + 1 };
                    self.next = now + self.cfg.interval;
                    if self.policy == Policy::DirectFirst && !self.fell_back {
                        let fb = self.punch_started + self.cfg.fallback_after as Millis * self.cfg.interval;
                        self.next = self.next.min(fb);
                    }
                } else {
                    self.phase = Phase::Upgrading;
                    if self.policy == Policy::DirectFirst && !self.fell_back {
                        self.fell_back = true;
                        self.stats.switches += 1;
                        self.set_route_reason("no direct answer: relay fallback");
                    }
                    self.next = now + self.cfg.upgrade_interval;
                }
            }
            Phase::Upgrading => {
                self.probe_all(now, &cands);
                self.next = now + self.cfg.upgrade_interval;
            }
            Phase::Direct => {
                let silent = now.saturating_sub(self.last_ack);
                if silent > self.cfg.trust && !self.doubt_replayed {
                    // In doubt: what went only the direct way since the last proof may be lost.
                    self.doubt_replayed = true;
                    self.replay(self.proof);
                }
                if silent > self.cfg.trust + 2 * self.cfg.heartbeat {
                    // The mapping is gone (or the path broke): relay, and punch again.
                    self.direct = None;
                    self.fell_back = true;
                    self.stats.switches += 1;
                    self.set_route_reason("direct path lost: relay, re-punching");
                    self.phase = Phase::Punching { sent: 0 };
                    self.punch_started = now;
                    self.next = now;
                    self.handle_timeout(now);
                    return;
                }
                if let Some(a) = self.direct {
                    // Keep-alive to the proven address, and to the candidates while in doubt.
                    let mut to = vec![a];
                    if silent > self.cfg.trust {
                        to.extend(cands.iter().copied().filter(|c| *c != a));
                    }
                    self.probe_all(now, &to);
                }
                // Wake when the doubt begins, too, so lost frames go again at once.
                self.next = if silent > self.cfg.trust {
                    now + self.cfg.heartbeat.min(self.cfg.interval)
                } else {
                    (now + self.cfg.heartbeat).min(self.last_ack + self.cfg.trust + 1)
                };
            }
        }
    }

    /// A datagram that came straight from `from` and looks like a probe or an answer (see
    /// [`is_path_message`]). Returns whether it was one of ours (authenticated).
    pub fn handle_direct(&mut self, now: Millis, from: SocketAddr, b: &[u8]) -> bool {
        if !is_path_message(b) || b.len() < 9 + TAG_LEN {
            return false;
        }
        let (body, t) = b.split_at(b.len() - TAG_LEN);
        let kind = b[4];
        let seq = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
        match kind {
            KIND_PROBE if body.len() == 9 => {
                // Tagged with our key by the peer.
                if !tag_ok(&self.my_key, body, t)
                    || self.phase == Phase::Failed
                    || self.policy == Policy::Relay
                {
                    return false;
                }
                let mut ack = PROBE_MAGIC.to_vec();
                ack.push(KIND_ACK);
                ack.extend_from_slice(&seq.to_be_bytes());
                put_addr(&mut ack, &from);
                let tg = tag(&self.my_key, &ack);
                ack.extend_from_slice(&tg);
                self.out.push_back(Transmit { to: from, data: ack });
                self.verify(from);
                // The peer reaches us from `from`; probe it too (peer-reflexive, or its mapping
                // moved), so a path that works one way is tried the other way at once.
                if self.direct != Some(from) && !self.peer_addrs.contains(&from) {
                    if self.peer_addrs.len() >= MAX_CANDIDATES {
                        self.peer_addrs.remove(0);
                    }
                    self.peer_addrs.push(from);
                    if self.phase != Phase::Idle {
                        self.probe_all(now, &[from]);
                    }
                }
                true
            }
            KIND_ACK => {
                let Some(pk) = self.peer_key else { return false };
                if !tag_ok(&pk, body, t) || get_addr(&body[9..]).map(|(_, n)| 9 + n) != Some(body.len()) {
                    return false;
                }
                self.verify(from);
                let Some(pos) = self.inflight.iter().position(|(s, _)| *s == seq) else { return true };
                let (_, sent) = self.inflight[pos];
                self.stats.rtt_direct_ms =
                    Some(ewma(self.stats.rtt_direct_ms, now.saturating_sub(sent) as f64));
                self.last_ack = now;
                self.doubt_replayed = false;
                // The peer now sees us at a new address (our NAT moved us): what we sent from
                // there before it proved itself was refused. Or our direct route moves to a new
                // address of the peer's: what went to the old one since its last proof is lost.
                // (Only answers on the route itself count: another candidate of the peer's may
                // see us at another address.)
                let seen_as = get_addr(&body[9..]).map(|(a, _)| a);
                let on_route = self.direct == Some(from);
                let moved =
                    on_route && self.observed.is_some() && seen_as.is_some() && self.observed != seen_as;
                let rerouted = self.direct.is_some_and(|d| d != from);
                if moved || rerouted {
                    self.replay(self.proof);
                }
                if on_route || rerouted || self.direct.is_none() {
                    self.observed = seen_as;
                }
                // A frame sent shortly before the probe may still be in flight behind it (the
                // network reorders): only what was sent a round trip before it counts as proven.
                let rtt = now.saturating_sub(sent).max(20);
                self.proven(sent.saturating_sub(rtt));
                if self.phase != Phase::Direct || self.direct != Some(from) {
                    if self.stats.time_to_direct_ms.is_none() {
                        self.stats.time_to_direct_ms = Some(now - self.started);
                    }
                    // A move from a route data was taking (not the first route after waiting).
                    if self.route(now) != Route::Hold {
                        self.stats.switches += 1;
                    }
                    self.direct = Some(from);
                    self.phase = Phase::Direct;
                    self.set_route_reason("direct path proven");
                    self.next = now + self.cfg.heartbeat;
                }
                true
            }
            _ => false,
        }
    }

    pub fn stats(&self, now: Millis) -> PathStats {
        let mut s = self.stats.clone();
        s.route = self.route(now).as_str();
        s.direct = self.direct;
        s
    }
}

fn ewma(prev: Option<f64>, x: f64) -> f64 {
    match prev {
        Some(p) => p * 0.875 + x * 0.125,
        None => x,
    }
}

fn tag(key: &[u8; 16], m: &[u8]) -> [u8; TAG_LEN] {
    let mut k = [0u8; 64];
    k[..16].copy_from_slice(key);
    let t = PreKeyedHmac::new(&k).mac(m);
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&t[..TAG_LEN]);
    out
}

fn tag_ok(key: &[u8; 16], m: &[u8], t: &[u8]) -> bool {
    let want = tag(key, m);
    want.iter().zip(t).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0 && t.len() == TAG_LEN
}

/// Whether a datagram that arrived straight from somewhere is a path probe or answer (as
/// opposed to direct game data, which the tunnel frames differently).
pub fn is_path_message(b: &[u8]) -> bool {
    b.len() >= 4 && &b[..4] == PROBE_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn candidates_round_trip_and_relay_policy_reveals_nothing() {
        let c = Candidates { policy: Policy::Auto, key: [7; 16], addrs: vec![a("1.2.3.4:5"), a("[::1]:9")] };
        assert_eq!(Candidates::decode(&c.encode()), Some(c.clone()));
        let r = Candidates { policy: Policy::Relay, ..c };
        assert!(Candidates::decode(&r.encode()).unwrap().addrs.is_empty());
        assert_eq!(Candidates::decode(b"FRC1"), None);
        let mut long = r.encode();
        long.push(0);
        assert_eq!(Candidates::decode(&long), None);
    }

    #[test]
    fn replay_window_drops_duplicates_and_old() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(10));
        assert!(!w.accept(10));
        assert!(w.accept(12));
        assert!(w.accept(11));
        assert!(!w.accept(11));
        assert!(w.accept(2000));
        assert!(!w.accept(2000 - REPLAY_WINDOW), "older than the window");
        assert!(w.accept(1999));
        assert!(w.accept(2000 - REPLAY_WINDOW + 1), "the oldest still inside");
        assert!(w.accept(2005) && !w.accept(2005) && w.accept(2001));
        // A jump past the whole window forgets it all.
        assert!(w.accept(10_000) && w.accept(9_000) && !w.accept(9_000));
    }

    #[test]
    fn replay_window_follows_32_bit_sequences_across_the_wrap() {
        let mut w = ReplayWindow::default();
        assert!(w.accept_wrapping(u32::MAX - 1));
        assert!(w.accept_wrapping(u32::MAX));
        assert!(w.accept_wrapping(0), "wrapped: newer");
        assert!(w.accept_wrapping(1));
        assert!(!w.accept_wrapping(u32::MAX), "a duplicate from before the wrap");
        assert!(!w.accept_wrapping(1));
        assert!(w.accept_wrapping(3));
        assert!(w.accept_wrapping(2), "late but inside the window");
        let mut fresh = ReplayWindow::default();
        assert!(fresh.accept_wrapping(5) && fresh.accept_wrapping(4) && !fresh.accept_wrapping(4));
    }

    /// Two machines that can reach each other directly.
    fn pair(p1: Policy, p2: Policy) -> (PeerPath, PeerPath) {
        let cfg = PathConfig::default();
        let (mut x, mut y) = (PeerPath::new(0, p1, cfg, [1; 16]), PeerPath::new(0, p2, cfg, [2; 16]));
        let cx = x.candidates(vec![a("10.0.0.1:1000")]);
        let cy = y.candidates(vec![a("10.0.0.2:2000")]);
        x.on_candidates(0, &cy);
        y.on_candidates(0, &cx);
        (x, y)
    }

    fn deliver(now: Millis, from: &mut PeerPath, from_addr: SocketAddr, to: &mut PeerPath) {
        while let Some(t) = from.poll_transmit() {
            to.handle_direct(now, from_addr, &t.data);
        }
    }

    #[test]
    fn auto_starts_on_the_relay_and_moves_to_a_proven_direct_path() {
        let (mut x, mut y) = pair(Policy::Auto, Policy::Auto);
        assert_eq!(x.route(0), Route::Relay);
        x.handle_timeout(0);
        y.handle_timeout(0);
        deliver(10, &mut x, a("10.0.0.1:1000"), &mut y);
        deliver(20, &mut y, a("10.0.0.2:2000"), &mut x);
        assert_eq!(x.route(20), Route::Direct(a("10.0.0.2:2000")));
        assert_eq!(x.stats(20).time_to_direct_ms, Some(20));
        assert_eq!(x.stats(20).rtt_direct_ms, Some(20.0));
        assert!(x.accepts(a("10.0.0.2:2000")) && !x.accepts(a("10.0.0.9:2000")));
    }

    #[test]
    fn direct_first_falls_back_at_attempt_seven_and_stops_fast_attempts_after_ten() {
        let (mut x, _) = pair(Policy::DirectFirst, Policy::Auto);
        let mut t = 0;
        let mut fallback = None;
        while t <= 8_000 {
            x.handle_timeout(t);
            while x.poll_transmit().is_some() {}
            if fallback.is_none() && x.route(t) == Route::Relay {
                fallback = Some(t);
            }
            t += 10;
        }
        assert_eq!(fallback, Some(3_500));
        assert_eq!(x.stats(t).attempts, 10, "10 fast attempts; the first upgrade probe comes at 10 s");
    }

    #[test]
    fn a_forged_probe_or_answer_is_ignored_and_incompatible_policies_fail_fast() {
        let (mut x, _) = pair(Policy::Auto, Policy::Auto);
        let mut fake = PROBE_MAGIC.to_vec();
        fake.extend_from_slice(&[KIND_PROBE, 0, 0, 0, 1]);
        fake.extend_from_slice(&[0; 16]);
        assert!(!x.handle_direct(0, a("6.6.6.6:6"), &fake));
        assert!(x.poll_transmit().is_none());
        let (x, _) = pair(Policy::Direct, Policy::Relay);
        assert!(x.failure().unwrap().contains("direct"));
        assert_eq!(x.route(0), Route::Hold);
    }
}
