//! A peer link: a Rust game's datagrams to one peer over whichever path is current — direct
//! (hole-punched) or through the relay — under a [`Policy`], without `ferry tunnel`.
//!
//! Build one from a bound [`RelayClient`] (a joiner that has connected to its host, or a host
//! once its joiner has spoken) and the peer's allocation ID, then call [`PeerLink::send`] and
//! [`PeerLink::recv`]; `recv` also drives everything else (STUN to the relay from the same
//! socket, the candidate exchange through the relay, probes, keep-alives). Game datagrams are
//! framed with a sequence number so that, while a direct path is in doubt and a datagram goes
//! both ways, it is delivered once.
//!
//! One link per relay client: a host with several peers uses one link per peer, each on its own
//! allocation's socket only when each peer has its own allocation (as joiners do).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use crate::clock::{Clock, Millis};
use crate::conn::{ClientError, Incoming, Received, RelayClient};
use crate::path::{
    is_path_message, Candidates, PathConfig, PathStats, PeerPath, Policy, ReplayWindow, Route,
};
use crate::tunnel::direct::{local_candidates, Reflexive};
use crate::wire::AllocationId;

/// Frame prefix of a peer link's own messages (inside RELAY payloads and on the direct path).
const MAGIC: &[u8; 2] = b"FL";
const CANDIDATES: u8 = b'C';
const DATA: u8 = b'D';
/// Game datagrams kept while the policy waits for a path (`direct-first`, `direct`).
pub const MAX_HELD: usize = 256;

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(3 + body.len());
    v.extend_from_slice(MAGIC);
    v.push(kind);
    v.extend_from_slice(body);
    v
}

/// A game datagram link to one peer, direct when possible.
pub struct PeerLink {
    relay: RelayClient,
    peer: AllocationId,
    path: PeerPath,
    clock: Clock,
    reflexive: Reflexive,
    next_candidates: Millis,
    got_candidates: bool,
    seq: u64,
    window: ReplayWindow,
    held: VecDeque<Vec<u8>>,
    inbox: VecDeque<Vec<u8>>,
    buf: Vec<u8>,
}

impl PeerLink {
    /// A link to `peer` over `relay` (already bound; a joiner already connected) under `policy`.
    pub fn new(
        mut relay: RelayClient,
        peer: AllocationId,
        policy: Policy,
        cfg: PathConfig,
    ) -> Result<Self, ClientError> {
        let mut key = [0u8; 16];
        getrandom::getrandom(&mut key).map_err(|e| ClientError::Io(std::io::Error::other(e)))?;
        relay.set_nonblocking(true)?;
        let clock = Clock::new();
        Ok(Self {
            path: PeerPath::new(clock.now(), policy, cfg, key),
            relay,
            peer,
            clock,
            reflexive: Reflexive::new(clock.now()),
            next_candidates: 0,
            got_candidates: false,
            seq: 0,
            window: ReplayWindow::default(),
            held: VecDeque::new(),
            inbox: VecDeque::new(),
            buf: vec![0; 2048],
        })
    }

    pub fn peer(&self) -> AllocationId {
        self.peer
    }

    /// The current path and its figures.
    pub fn stats(&self) -> PathStats {
        self.path.stats(self.clock.now())
    }

    /// Why the link cannot work (the two sides' policies exclude each other).
    pub fn failure(&self) -> Option<&str> {
        self.path.failure()
    }

    /// Sends a game datagram on the current path (held, up to [`MAX_HELD`], while the policy
    /// waits for one).
    pub fn send(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        self.seq += 1;
        let mut body = self.seq.to_be_bytes().to_vec();
        body.extend_from_slice(payload);
        let f = frame(DATA, &body);
        if self.path.route(self.clock.now()) == Route::Hold || !self.held.is_empty() {
            if self.held.len() >= MAX_HELD {
                self.held.pop_front();
            }
            self.held.push_back(f);
            return self.flush();
        }
        self.put(&f)
    }

    fn put(&mut self, f: &[u8]) -> Result<(), ClientError> {
        let route = self.path.route(self.clock.now());
        match route {
            Route::Hold => return Ok(()),
            Route::Relay => self.relay.send(&self.peer, f)?,
            Route::Direct(a) => {
                self.relay.socket().send_to(f, a)?;
                // Kept until proven, to go again through the relay if the path lost it.
                self.path.remember(self.clock.now(), f);
            }
            Route::Both(a) => {
                self.relay.socket().send_to(f, a)?;
                self.relay.send(&self.peer, f)?;
            }
        }
        self.path.on_sent(route, f.len());
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ClientError> {
        while self.path.route(self.clock.now()) != Route::Hold {
            let Some(f) = self.held.pop_front() else { break };
            self.put(&f)?;
        }
        Ok(())
    }

    /// The next game datagram from the peer, waiting up to `timeout`; drives the link meanwhile.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, ClientError> {
        let deadline = self.clock.now() + timeout.as_millis() as u64;
        loop {
            self.drive()?;
            if let Some(d) = self.inbox.pop_front() {
                return Ok(Some(d));
            }
            let now = self.clock.now();
            if now >= deadline {
                return Ok(None);
            }
            let wake = self.path.poll_timeout().unwrap_or(Millis::MAX).min(deadline).min(now + 50);
            self.wait(Duration::from_millis(wake.saturating_sub(now).max(1)))?;
        }
    }

    /// Waits for the socket to be readable, at most `d`.
    fn wait(&mut self, d: Duration) -> Result<(), ClientError> {
        let s = self.relay.socket();
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(d))?;
        let r = s.peek_from(&mut self.buf[..1]);
        s.set_nonblocking(true)?;
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                Ok(())
            }
            // An ICMP error from an earlier send (a candidate nobody listens on).
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// One turn: keep-alive, STUN, candidates, path timers and probes, everything waiting on the
    /// socket.
    pub fn drive(&mut self) -> Result<(), ClientError> {
        let now = self.clock.now();
        self.relay.maintain()?;
        let relay_addr = self.relay.relay_addr();
        if let Some(req) = self.reflexive.due(now) {
            let _ = self.relay.socket().send_to(&req, relay_addr);
        }
        // Once STUN answered (or gave up: a relay with STUN off), with the local addresses too.
        if self.reflexive.settled(now) && now >= self.next_candidates {
            self.next_candidates = if self.got_candidates { Millis::MAX } else { now + 1_000 };
            let addrs = local_candidates(self.relay.local_addr().ok(), self.reflexive.addr);
            // [have yours u8][candidates]: a peer that has ours does not answer.
            let mut body = vec![u8::from(self.got_candidates)];
            body.extend_from_slice(&self.path.candidates(addrs).encode());
            self.relay.send(&self.peer, &frame(CANDIDATES, &body))?;
        }
        if self.path.poll_timeout().is_some_and(|t| t <= now) {
            self.path.handle_timeout(now);
        }
        while let Some(t) = self.path.poll_transmit() {
            let _ = self.relay.socket().send_to(&t.data, t.to);
        }
        // What the direct path may have lost goes again on the current route.
        while let Some(f) = self.path.poll_resend() {
            if self.path.route(self.clock.now()) == Route::Hold {
                if self.held.len() >= MAX_HELD {
                    self.held.pop_front();
                }
                self.held.push_back(f);
            } else {
                self.put(&f)?;
            }
        }
        loop {
            let (n, from) = match self.relay.socket().recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e.into()),
            };
            let d = self.buf[..n].to_vec();
            self.on_datagram(from, &d)?;
        }
        self.flush()
    }

    fn on_datagram(&mut self, from: SocketAddr, d: &[u8]) -> Result<(), ClientError> {
        let now = self.clock.now();
        if from == self.relay.relay_addr() {
            if self.reflexive.on_datagram(d) {
                return Ok(());
            }
            let payload = match self.relay.accept(from, d) {
                Some(Received::Relay { from: who, payload }) if who == self.peer => payload.to_vec(),
                Some(Received::Other(Incoming::Pong)) | Some(_) | None => return Ok(()),
            };
            return self.on_frame(now, None, &payload);
        }
        if is_path_message(d) {
            self.path.handle_direct(now, from, d);
            while let Some(t) = self.path.poll_transmit() {
                let _ = self.relay.socket().send_to(&t.data, t.to);
            }
            return Ok(());
        }
        if d.starts_with(MAGIC) && d.get(2) == Some(&DATA) {
            if self.path.accepts(from) {
                return self.on_frame(now, Some(from), d);
            }
            self.path.on_unverified(now, from);
        }
        Ok(())
    }

    fn on_frame(&mut self, now: Millis, _direct: Option<SocketAddr>, f: &[u8]) -> Result<(), ClientError> {
        if f.len() < 3 || &f[..2] != MAGIC {
            return Ok(());
        }
        match f[2] {
            CANDIDATES if f.len() > 4 => {
                if let Some(c) = Candidates::decode(&f[4..]) {
                    if !self.got_candidates {
                        self.got_candidates = true;
                        self.path.on_candidates(now, &c);
                    }
                    // Answer a copy from a peer that lacks ours (its first, or ours was lost);
                    // one that has ours needs nothing, so the exchange ends.
                    self.next_candidates = if f[3] == 0 { now } else { Millis::MAX };
                }
            }
            DATA if f.len() >= 11 => {
                let seq = u64::from_be_bytes(f[3..11].try_into().unwrap_or_default());
                if self.window.accept(seq) {
                    self.inbox.push_back(f[11..].to_vec());
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The relay client back (e.g. to close it).
    pub fn into_relay(self) -> RelayClient {
        self.relay
    }
}
