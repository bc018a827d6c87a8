//! The host side: one allocation, every player's flows, one local socket per (player, port,
//! flow) toward the game server.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::direct::{is_direct_traffic, PathOptions, PeerDirect, PeerStatus, Reflexive};
use super::frame::{self, Frame};
use super::poller::{Poller, LOCAL_BASE, RELAY};
use super::{
    flush_tx, frame_out, recv_some, FlowOut, GameOut, Io, Out, Timing, TunnelControl, TunnelError,
    TunnelEvent,
};
use crate::clock::{Clock, Millis};
use crate::wire::{AllocationId, ErrorCode};
use crate::{ApiClient, Incoming, Received, RelayClient};

/// What a host tunnel serves.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// The game server's UDP addresses, in order (a player's port index is the position here).
    pub forwards: Vec<SocketAddr>,
    /// Players at once (`maxConnections` of the host allocation; the relay enforces it).
    pub players: u16,
    pub timing: Timing,
    /// Send to this address instead of the relay endpoint the API names.
    pub relay: Option<SocketAddr>,
    /// Direct paths to players (`docs/paths.md`).
    pub path: PathOptions,
}

struct Flow {
    player: AllocationId,
    port: u8,
    flow: u32,
    sock: mio::net::UdpSocket,
    last: Millis,
    out: FlowOut,
}

struct Player {
    last_heard: Millis,
    flows: HashMap<(u8, u32), usize>,
    direct: PeerDirect,
}

/// A running host tunnel. See the [module docs](super).
pub struct HostTunnel {
    relay: RelayClient,
    join_code: String,
    cfg: HostConfig,
    clock: Clock,
    poller: Poller,
    players: HashMap<AllocationId, Player>,
    flows: Vec<Option<Flow>>,
    free: Vec<usize>,
    reflexive: Reflexive,
    /// Which player proved each direct address (probes are tried against it first).
    by_addr: HashMap<SocketAddr, AllocationId>,
    last_status: Millis,
}

impl HostTunnel {
    /// Allocates, binds and gets the join code.
    pub fn open(api: &ApiClient, cfg: HostConfig) -> Result<Self, TunnelError> {
        if cfg.forwards.is_empty() || cfg.forwards.len() > frame::MAX_PORTS {
            return Err(TunnelError::Config(format!("forward 1 to {} ports", frame::MAX_PORTS)));
        }
        let alloc = api.allocate(cfg.players.max(1) as u32, None)?;
        let join_code = api.join_code(&alloc.allocation_id)?;
        let mut relay = RelayClient::new(&alloc)?;
        if let Some(r) = cfg.relay {
            relay = relay.with_relay(r);
        }
        relay.bind()?;
        relay.set_nonblocking(true)?;
        let mut poller = Poller::new()?;
        poller.watch_relay(relay.socket())?;
        let clock = Clock::new();
        let reflexive = Reflexive::new(clock.now());
        Ok(Self {
            relay,
            join_code,
            cfg,
            clock,
            poller,
            players: HashMap::new(),
            flows: Vec::new(),
            free: Vec::new(),
            reflexive,
            by_addr: HashMap::new(),
            last_status: 0,
        })
    }

    pub fn join_code(&self) -> &str {
        &self.join_code
    }

    pub fn allocation_id(&self) -> AllocationId {
        self.relay.id()
    }

    /// Serves until `ctl` says stop; then says BYE to every player and closes the allocation.
    pub fn run(
        &mut self,
        ctl: &Arc<TunnelControl>,
        events: &mut dyn FnMut(TunnelEvent),
    ) -> Result<(), TunnelError> {
        let mut ready = Vec::new();
        let mut io = Io::new();
        let mut last_ping = 0;
        let r = loop {
            if ctl.stopped() {
                break Ok(());
            }
            if ctl.take_migrate() {
                self.relay.migrate_socket()?;
                self.poller.watch_relay(self.relay.socket())?;
                self.relay.send_bind()?;
                self.reflexive.reset(self.clock.now());
                events(TunnelEvent::Rebound { local: self.relay.local_addr()? });
            }
            self.poller.wait(Duration::from_millis(250), &mut ready)?;
            for t in &ready {
                if *t == RELAY {
                    self.drain_relay(&mut io, ctl, events)?;
                } else {
                    self.drain_local(t.0 - LOCAL_BASE, &mut io, ctl, events)?;
                }
            }
            let now = self.clock.now();
            self.relay.maintain()?;
            if now.saturating_sub(last_ping) >= self.cfg.timing.ping_interval.as_millis() as u64 {
                last_ping = now;
                let ping = Frame::Ping { id: 0, sent_us: self.clock.nanos() / 1000 }.to_vec();
                let ids: Vec<AllocationId> = self.players.keys().copied().collect();
                for p in ids {
                    self.relay.send(&p, &ping)?;
                }
            }
            self.expire(now, ctl, events);
            self.drive_paths(now, ctl, events)?;
        };
        let bye = Frame::Bye.to_vec();
        let ids: Vec<AllocationId> = self.players.keys().copied().collect();
        for p in ids {
            let _ = self.relay.send(&p, &bye);
        }
        let _ = self.relay.close();
        r
    }

    fn drain_relay(
        &mut self,
        io: &mut Io,
        ctl: &TunnelControl,
        events: &mut dyn FnMut(TunnelEvent),
    ) -> Result<(), TunnelError> {
        let Io { rx, out, .. } = io;
        loop {
            let Some(sock) = self.poller.relay_socket() else { return Ok(()) };
            let n = recv_some(sock, rx)?;
            if n == 0 {
                break;
            }
            for k in 0..n {
                let (d, from) = rx.get(k);
                let Some(from) = from else { continue };
                if from != self.relay.relay_addr() {
                    self.on_direct(from, d, out, ctl, events)?;
                    continue;
                }
                if self.reflexive.on_datagram(d) {
                    continue;
                }
                match self.relay.accept(from, d) {
                    Some(Received::Relay { from, payload }) => {
                        self.on_frame(from, payload, out, ctl, events)?
                    }
                    Some(Received::Other(m)) => self.on_other(m, ctl, events)?,
                    None => {}
                }
            }
        }
        self.flush_out(out, ctl);
        Ok(())
    }

    fn on_other(
        &mut self,
        m: Incoming,
        ctl: &TunnelControl,
        events: &mut dyn FnMut(TunnelEvent),
    ) -> Result<(), TunnelError> {
        match m {
            Incoming::Error { code: ErrorCode::BoundElsewhere } => self.relay.send_bind()?,
            Incoming::Error { code: c @ (ErrorCode::AllocationNotFound | ErrorCode::AllocationTimedOut) } => {
                return Err(TunnelError::Relay(crate::ClientError::Relay(c)))
            }
            Incoming::Disconnect { from } => self.remove_player(from, "disconnected", ctl, events),
            _ => {}
        }
        Ok(())
    }

    /// Sends the game datagrams gathered for one flow's socket in one batch.
    fn flush_out(&mut self, out: &mut Out, ctl: &TunnelControl) {
        let sock = out.to.and_then(|i| self.flows.get(i)).and_then(Option::as_ref).map(|f| &f.sock);
        out.flush(sock, ctl);
    }

    fn on_frame(
        &mut self,
        from: AllocationId,
        payload: &[u8],
        out: &mut Out,
        ctl: &TunnelControl,
        events: &mut dyn FnMut(TunnelEvent),
    ) -> Result<(), TunnelError> {
        let now = self.clock.now();
        let Ok(f) = Frame::parse(payload) else {
            ctl.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        match self.players.entry(from) {
            std::collections::hash_map::Entry::Occupied(mut p) => p.get_mut().last_heard = now,
            std::collections::hash_map::Entry::Vacant(v) => {
                if !matches!(f, Frame::Join | Frame::Data { .. } | Frame::Ping { .. }) {
                    return Ok(());
                }
                let direct = PeerDirect::new(now, &self.cfg.path, false);
                v.insert(Player { last_heard: now, flows: HashMap::new(), direct });
                events(TunnelEvent::PlayerJoined { player: from });
            }
        }
        match f {
            Frame::Join => {
                let ports = self.cfg.forwards.iter().map(|a| a.port()).collect();
                self.relay.send(&from, &Frame::Hello { ports }.to_vec())?;
            }
            Frame::Data { port, flow, seq, payload: data } => {
                let Some(&target) = self.cfg.forwards.get(port as usize) else {
                    ctl.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                };
                let i = match self.players.get(&from).and_then(|p| p.flows.get(&(port, flow))) {
                    Some(&i) => i,
                    None => self.open_flow(from, port, flow, target, ctl, events)?,
                };
                if out.must_flush_before(i) {
                    self.flush_out(out, ctl);
                }
                if let Some(fl) = self.flows[i].as_mut() {
                    fl.last = now;
                    if !fl.out.window.accept_wrapping(seq) {
                        ctl.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    out.queue(i, None, data);
                }
            }
            Frame::Candidates { body } => {
                if let Some(p) = self.players.get_mut(&from) {
                    p.direct.on_candidates(now, body);
                    if let Some(reason) = p.direct.failure_once() {
                        events(TunnelEvent::PathFailed { peer: from, reason });
                    }
                }
            }
            Frame::Close { port, flow } => {
                if let Some(i) = self.players.get_mut(&from).and_then(|p| p.flows.remove(&(port, flow))) {
                    self.close_flow(i, "closed by the player", false, ctl, events);
                }
            }
            Frame::Ping { id, sent_us } => self.relay.send(&from, &Frame::Pong { id, sent_us }.to_vec())?,
            Frame::Pong { sent_us, .. } => {
                let micros = (self.clock.nanos() / 1000).saturating_sub(sent_us);
                if let Some(p) = self.players.get_mut(&from) {
                    p.direct.path.observe_relay_rtt(micros as f64 / 1000.0);
                }
                events(TunnelEvent::Rtt { peer: from, micros });
            }
            Frame::Bye => self.remove_player(from, "left", ctl, events),
            Frame::Hello { .. } => {}
        }
        Ok(())
    }

    fn open_flow(
        &mut self,
        player: AllocationId,
        port: u8,
        flow: u32,
        target: SocketAddr,
        ctl: &TunnelControl,
        events: &mut dyn FnMut(TunnelEvent),
    ) -> Result<usize, TunnelError> {
        // A loopback target gets a loopback source; otherwise the OS picks the interface.
        let local_ip = match (target.ip().is_loopback(), target.is_ipv4()) {
            (true, true) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            (true, false) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            (false, true) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (false, false) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let std_sock = std::net::UdpSocket::bind(SocketAddr::new(local_ip, 0))?;
        std_sock.connect(target)?;
        crate::conn::grow_buffers(&std_sock);
        std_sock.set_nonblocking(true)?;
        let local = std_sock.local_addr()?;
        let mut sock = mio::net::UdpSocket::from_std(std_sock);
        let i = self.free.pop().unwrap_or_else(|| {
            self.flows.push(None);
            self.flows.len() - 1
        });
        self.poller.register(&mut sock, i)?;
        let now = self.clock.now();
        self.flows[i] = Some(Flow { player, port, flow, sock, last: now, out: FlowOut::default() });
        if let Some(p) = self.players.get_mut(&player) {
            p.flows.insert((port, flow), i);
        }
        ctl.stats.flows_opened.fetch_add(1, Ordering::Relaxed);
        events(TunnelEvent::FlowOpened { player: Some(player), port, flow, local });
        Ok(i)
    }

    fn drain_local(
        &mut self,
        i: usize,
        io: &mut Io,
        ctl: &TunnelControl,
        events: &mut dyn FnMut(TunnelEvent),
    ) -> Result<(), TunnelError> {
        let now = self.clock.now();
        while let Some(fl) = self.flows.get_mut(i).and_then(Option::as_mut) {
            let n = recv_some(&fl.sock, &mut io.rx)?;
            if n == 0 {
                break;
            }
            fl.last = now;
            let Some(p) = self.players.get_mut(&fl.player) else { break };
            for k in 0..n {
                let (data, _) = io.rx.get(k);
                let g = GameOut { to: &fl.player, port: fl.port, flow: fl.flow, data };
                let (poller, relay) = (&self.poller, &mut self.relay);
                frame_out(&mut io.tx, poller, relay, &mut p.direct, now, g, &mut fl.out, ctl, events)?;
            }
        }
        flush_tx(&mut io.tx, &self.poller, &mut self.relay)?;
        Ok(())
    }

    /// A datagram straight from `from`, not from the relay: a peer's probe or answer, or game
    /// data on a direct path (accepted only from an address a player has proven).
    fn on_direct(
        &mut self,
        from: SocketAddr,
        d: &[u8],
        out: &mut Out,
        ctl: &TunnelControl,
        events: &mut dyn FnMut(TunnelEvent),
    ) -> Result<(), TunnelError> {
        if !is_direct_traffic(d) {
            ctl.stats.unproven.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let now = self.clock.now();
        let known = self.by_addr.get(&from).copied();
        if crate::path::is_path_message(d) {
            // The player that proved this address first; then the others (each has its own
            // key, so at most one can authenticate it).
            let mut order: Vec<AllocationId> = known.into_iter().collect();
            order.extend(self.players.keys().filter(|id| Some(**id) != known));
            for id in order {
                let Some(p) = self.players.get_mut(&id) else { continue };
                if p.direct.path.handle_direct(now, from, d) {
                    p.direct.send_transmits(&self.relay);
                    self.by_addr.insert(from, id);
                    break;
                }
            }
            return Ok(());
        }
        let accepted = known.filter(|id| self.players.get(id).is_some_and(|p| p.direct.path.accepts(from)));
        match (accepted, Frame::parse(d)) {
            (Some(id), Ok(Frame::Data { .. })) => {
                ctl.stats.from_direct.fetch_add(1, Ordering::Relaxed);
                self.on_frame(id, d, out, ctl, events)?;
            }
            _ => {
                ctl.stats.unproven.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The path work of one turn: STUN, candidates, probes and keep-alives, held frames, reports.
    fn drive_paths(
        &mut self,
        now: Millis,
        ctl: &TunnelControl,
        events: &mut dyn FnMut(TunnelEvent),
    ) -> Result<(), TunnelError> {
        if let Some(req) = self.reflexive.due(now) {
            let _ = self.relay.socket().send_to(&req, self.relay.relay_addr());
        }
        let sock = self.relay.local_addr().ok();
        let report = now.saturating_sub(self.last_status) >= 250;
        let mut status = Vec::new();
        for (id, p) in self.players.iter_mut() {
            if let Some(body) = p.direct.candidates_due(now, &self.reflexive, sock) {
                self.relay.send(id, &Frame::Candidates { body: &body }.to_vec())?;
            }
            p.direct.drive(now, &mut self.relay, id);
            if let Some(stats) = p.direct.changed(now) {
                let policy = p.direct.path.policy().as_str();
                events(TunnelEvent::Path { status: PeerStatus { peer: id.to_string(), policy, stats } });
            }
            if report {
                status.push(PeerStatus::of(id, &p.direct, now));
            }
        }
        if report {
            self.last_status = now;
            ctl.set_paths(status);
        }
        Ok(())
    }

    fn close_flow(
        &mut self,
        i: usize,
        reason: &'static str,
        tell: bool,
        ctl: &TunnelControl,
        events: &mut dyn FnMut(TunnelEvent),
    ) {
        let Some(mut fl) = self.flows.get_mut(i).and_then(Option::take) else { return };
        self.poller.deregister(&mut fl.sock);
        self.free.push(i);
        if tell {
            let _ = self.relay.send(&fl.player, &Frame::Close { port: fl.port, flow: fl.flow }.to_vec());
        }
        ctl.stats.flows_closed.fetch_add(1, Ordering::Relaxed);
        events(TunnelEvent::FlowClosed { player: Some(fl.player), port: fl.port, flow: fl.flow, reason });
    }

    fn remove_player(
        &mut self,
        player: AllocationId,
        reason: &'static str,
        ctl: &TunnelControl,
        events: &mut dyn FnMut(TunnelEvent),
    ) {
        let Some(p) = self.players.remove(&player) else { return };
        self.by_addr.retain(|_, id| *id != player);
        for (_, i) in p.flows {
            self.close_flow(i, "player left", false, ctl, events);
        }
        events(TunnelEvent::PlayerLeft { player, reason });
    }

    fn expire(&mut self, now: Millis, ctl: &TunnelControl, events: &mut dyn FnMut(TunnelEvent)) {
        let idle = self.cfg.timing.flow_idle.as_millis() as u64;
        let stale: Vec<usize> = (0..self.flows.len())
            .filter(|&i| self.flows[i].as_ref().is_some_and(|f| now.saturating_sub(f.last) >= idle))
            .collect();
        for i in stale {
            if let Some(f) = self.flows[i].as_ref() {
                let (player, key) = (f.player, (f.port, f.flow));
                if let Some(p) = self.players.get_mut(&player) {
                    p.flows.remove(&key);
                }
            }
            self.close_flow(i, "idle", true, ctl, events);
        }
        let timeout = self.cfg.timing.peer_timeout.as_millis() as u64;
        let gone: Vec<AllocationId> = self
            .players
            .iter()
            .filter(|(_, p)| now.saturating_sub(p.last_heard) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        for p in gone {
            self.remove_player(p, "silent", ctl, events);
        }
    }
}
