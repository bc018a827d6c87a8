//! The joiner side: one allocation connected to the host, one listening socket per forwarded
//! port, one flow per local game-client address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::direct::{is_direct_traffic, PathOptions, PeerDirect, PeerStatus, Reflexive};
use super::frame::Frame;
use super::poller::{Poller, LOCAL_BASE, RELAY};
use super::{
    flush_tx, frame_out, recv_some, FlowOut, GameOut, Io, Out, Timing, TunnelControl, TunnelError,
    TunnelEvent,
};
use crate::clock::{Clock, Millis};
use crate::wire::{AllocationId, ErrorCode};
use crate::{ApiClient, ClientError, Incoming, Received, RelayClient};

/// How a join tunnel listens.
#[derive(Clone, Debug)]
pub struct JoinConfig {
    /// Local address the mirrored ports listen on (default 127.0.0.1).
    pub listen: IpAddr,
    /// Added to each forwarded port when the real one is taken locally.
    pub port_offset: i32,
    pub timing: Timing,
    /// Send to this address instead of the relay endpoint the API names.
    pub relay: Option<SocketAddr>,
    /// How long to wait for the host tunnel's HELLO.
    pub hello_timeout: Duration,
    /// Direct path to the host (`docs/paths.md`).
    pub path: PathOptions,
}

impl Default for JoinConfig {
    fn default() -> Self {
        Self {
            listen: IpAddr::from([127, 0, 0, 1]),
            port_offset: 0,
            timing: Timing::default(),
            relay: None,
            hello_timeout: Duration::from_secs(10),
            path: PathOptions::default(),
        }
    }
}

/// Why a join tunnel stopped on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinExit {
    /// Asked to stop.
    Stopped,
    /// The host tunnel left (BYE, the relay's DISCONNECT, or the session ended at the relay).
    HostLeft,
    /// The host tunnel fell silent for the peer timeout.
    HostSilent,
}

/// What happened to the path after a turn.
enum PathTurn {
    Fine,
    /// The policies exclude each other.
    Failed(String),
}

struct Flow {
    port: u8,
    client: SocketAddr,
    last: Millis,
    out: FlowOut,
}

/// A running join tunnel. See the [module docs](super).
pub struct JoinTunnel {
    relay: RelayClient,
    host: AllocationId,
    ports: Vec<u16>,
    listeners: Vec<mio::net::UdpSocket>,
    cfg: JoinConfig,
    clock: Clock,
    poller: Poller,
    flows: HashMap<u32, Flow>,
    by_client: HashMap<(u8, SocketAddr), u32>,
    next_flow: u32,
    last_heard: Millis,
    direct: PeerDirect,
    reflexive: Reflexive,
    last_status: Millis,
}

impl JoinTunnel {
    /// Joins with `code`, binds, connects to the host, learns its ports and listens on mirrors
    /// of them.
    pub fn open(api: &ApiClient, code: &str, cfg: JoinConfig) -> Result<Self, TunnelError> {
        let j = api.join(code)?;
        let mut relay = RelayClient::new(&j.allocation)?;
        if let Some(r) = cfg.relay {
            relay = relay.with_relay(r);
        }
        relay.bind()?;
        let host = relay.connect_b64(&j.host_connection_data)?;
        let clock = Clock::new();
        // JOIN every 500 ms until the host tunnel answers with its forward list.
        let deadline = clock.now() + cfg.hello_timeout.as_millis() as u64;
        let ports = 'hello: loop {
            if clock.now() >= deadline {
                return Err(TunnelError::NoHello);
            }
            relay.send(&host, &Frame::Join.to_vec())?;
            let until = clock.now() + 500;
            while clock.now() < until {
                match relay.recv(Duration::from_millis(until.saturating_sub(clock.now()).max(1)))? {
                    Some(Incoming::Relay { from, payload }) if from == host => {
                        if let Ok(Frame::Hello { ports }) = Frame::parse(&payload) {
                            break 'hello ports;
                        }
                    }
                    Some(Incoming::Error { code: ErrorCode::BoundElsewhere }) => relay.send_bind()?,
                    Some(Incoming::Disconnect { .. }) => {
                        return Err(TunnelError::Relay(ClientError::Disconnected))
                    }
                    _ => {}
                }
            }
        };
        let mut poller = Poller::new()?;
        let mut listeners = Vec::with_capacity(ports.len());
        for (i, p) in ports.iter().enumerate() {
            let port = (*p as i32 + cfg.port_offset).try_into().map_err(|_| {
                TunnelError::Config(format!("port {p} + offset {} is out of range", cfg.port_offset))
            })?;
            let addr = SocketAddr::new(cfg.listen, port);
            let std_sock = std::net::UdpSocket::bind(addr).map_err(|e| {
                TunnelError::Config(format!(
                    "cannot listen on {addr}: {e} (use --port-offset to move the local ports)"
                ))
            })?;
            crate::conn::grow_buffers(&std_sock);
            std_sock.set_nonblocking(true)?;
            let mut sock = mio::net::UdpSocket::from_std(std_sock);
            poller.register(&mut sock, i)?;
            listeners.push(sock);
        }
        relay.set_nonblocking(true)?;
        poller.watch_relay(relay.socket())?;
        let last_heard = clock.now();
        let direct = PeerDirect::new(last_heard, &cfg.path, true);
        let reflexive = Reflexive::new(last_heard);
        Ok(Self {
            direct,
            reflexive,
            last_status: 0,
            relay,
            host,
            ports,
            listeners,
            cfg,
            clock,
            poller,
            flows: HashMap::new(),
            by_client: HashMap::new(),
            next_flow: 1,
            last_heard,
        })
    }

    /// The host's forwarded ports, in order.
    pub fn host_ports(&self) -> &[u16] {
        &self.ports
    }

    /// Where the game client should send: one local address per forwarded port.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    pub fn allocation_id(&self) -> AllocationId {
        self.relay.id()
    }

    /// The relay socket's local address (it changes on migration).
    pub fn relay_local_addr(&self) -> std::io::Result<SocketAddr> {
        self.relay.local_addr()
    }

    /// Carries traffic until stopped or until the host leaves; says BYE and closes on the way
    /// out.
    pub fn run(
        &mut self,
        ctl: &Arc<TunnelControl>,
        events: &mut dyn FnMut(TunnelEvent),
    ) -> Result<JoinExit, TunnelError> {
        let mut ready = Vec::new();
        let mut io = Io::new();
        let mut last_ping = 0;
        let exit = loop {
            if ctl.stopped() {
                break JoinExit::Stopped;
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
                    if let Some(exit) = self.drain_relay(&mut io, ctl, events)? {
                        return self.finish(exit);
                    }
                } else {
                    self.drain_local(t.0 - LOCAL_BASE, &mut io, ctl, events)?;
                }
            }
            let now = self.clock.now();
            self.relay.maintain()?;
            if now.saturating_sub(last_ping) >= self.cfg.timing.ping_interval.as_millis() as u64 {
                last_ping = now;
                let ping = Frame::Ping { id: 0, sent_us: self.clock.nanos() / 1000 }.to_vec();
                self.relay.send(&self.host, &ping)?;
            }
            if now.saturating_sub(self.last_heard) >= self.cfg.timing.peer_timeout.as_millis() as u64 {
                break JoinExit::HostSilent;
            }
            self.expire(now, ctl, events);
            if let PathTurn::Failed(why) = self.drive_path(now, ctl, events)? {
                let _ = self.finish(JoinExit::Stopped);
                return Err(TunnelError::Path(why));
            }
        };
        self.finish(exit)
    }

    fn finish(&mut self, exit: JoinExit) -> Result<JoinExit, TunnelError> {
        if exit != JoinExit::HostLeft {
            let _ = self.relay.send(&self.host, &Frame::Bye.to_vec());
        }
        let _ = self.relay.close();
        Ok(exit)
    }

    fn drain_relay(
        &mut self,
        io: &mut Io,
        ctl: &TunnelControl,
        events: &mut dyn FnMut(TunnelEvent),
    ) -> Result<Option<JoinExit>, TunnelError> {
        let Io { rx, out, .. } = io;
        let mut exit = None;
        'batches: while let Some(sock) = self.poller.relay_socket() {
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
                exit = match self.relay.accept(from, d) {
                    Some(Received::Relay { from, payload }) if from == self.host => {
                        self.on_frame(payload, out, ctl, events)?
                    }
                    Some(Received::Other(m)) => self.on_other(m)?,
                    _ => None,
                };
                if exit.is_some() {
                    break 'batches;
                }
            }
        }
        self.flush_out(out, ctl);
        Ok(exit)
    }

    fn on_other(&mut self, m: Incoming) -> Result<Option<JoinExit>, TunnelError> {
        match m {
            Incoming::Disconnect { from } if from == self.host => return Ok(Some(JoinExit::HostLeft)),
            Incoming::Error { code: ErrorCode::BoundElsewhere } => self.relay.send_bind()?,
            // The session is gone at the relay (the host closed or timed out, and took this
            // joiner's allocation with it).
            Incoming::Error { code: ErrorCode::AllocationNotFound | ErrorCode::AllocationTimedOut } => {
                return Ok(Some(JoinExit::HostLeft))
            }
            _ => {}
        }
        Ok(None)
    }

    fn on_frame(
        &mut self,
        payload: &[u8],
        out: &mut Out,
        ctl: &TunnelControl,
        events: &mut dyn FnMut(TunnelEvent),
    ) -> Result<Option<JoinExit>, TunnelError> {
        self.last_heard = self.clock.now();
        match Frame::parse(payload) {
            Ok(Frame::Data { port, flow, seq, payload: data }) => {
                self.deliver(port, flow, seq, data, out, ctl)
            }
            Ok(Frame::Candidates { body }) => {
                let now = self.clock.now();
                self.direct.on_candidates(now, body);
            }
            Ok(Frame::Close { flow, port }) => {
                if let Some(f) = self.flows.remove(&flow) {
                    self.by_client.remove(&(f.port, f.client));
                    ctl.stats.flows_closed.fetch_add(1, Ordering::Relaxed);
                    events(TunnelEvent::FlowClosed {
                        player: None,
                        port,
                        flow,
                        reason: "closed by the host",
                    });
                }
            }
            Ok(Frame::Ping { id, sent_us }) => {
                self.relay.send(&self.host, &Frame::Pong { id, sent_us }.to_vec())?;
            }
            Ok(Frame::Pong { sent_us, .. }) => {
                let micros = (self.clock.nanos() / 1000).saturating_sub(sent_us);
                self.direct.path.observe_relay_rtt(micros as f64 / 1000.0);
                events(TunnelEvent::Rtt { peer: self.host, micros });
            }
            Ok(Frame::Bye) => return Ok(Some(JoinExit::HostLeft)),
            Ok(Frame::Hello { .. } | Frame::Join) => {}
            Err(_) => {
                ctl.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(None)
    }

    fn deliver(&mut self, port: u8, flow: u32, seq: u32, data: &[u8], out: &mut Out, ctl: &TunnelControl) {
        let Some(f) = self.flows.get_mut(&flow).filter(|f| f.port == port) else {
            ctl.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            return;
        };
        f.last = self.clock.now();
        if !f.out.window.accept_wrapping(seq) {
            ctl.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let client = f.client;
        if out.must_flush_before(port as usize) {
            self.flush_out(out, ctl);
        }
        out.queue(port as usize, Some(client), data);
    }

    /// Sends the game datagrams gathered for one listening socket in one batch.
    fn flush_out(&mut self, out: &mut Out, ctl: &TunnelControl) {
        let sock = out.to.and_then(|p| self.listeners.get(p));
        out.flush(sock, ctl);
    }

    fn drain_local(
        &mut self,
        port: usize,
        io: &mut Io,
        ctl: &TunnelControl,
        events: &mut dyn FnMut(TunnelEvent),
    ) -> Result<(), TunnelError> {
        let now = self.clock.now();
        let port8 = port as u8;
        while let Some(l) = self.listeners.get(port) {
            let n = recv_some(l, &mut io.rx)?;
            if n == 0 {
                break;
            }
            for k in 0..n {
                let (data, client) = io.rx.get(k);
                let Some(client) = client else { continue };
                let flow = match self.by_client.get(&(port8, client)) {
                    Some(&f) => f,
                    None => {
                        let f = self.next_flow;
                        self.next_flow = self.next_flow.wrapping_add(1).max(1);
                        self.by_client.insert((port8, client), f);
                        self.flows
                            .insert(f, Flow { port: port8, client, last: now, out: FlowOut::default() });
                        ctl.stats.flows_opened.fetch_add(1, Ordering::Relaxed);
                        events(TunnelEvent::FlowOpened { player: None, port: port8, flow: f, local: client });
                        f
                    }
                };
                let Some(fl) = self.flows.get_mut(&flow) else { continue };
                fl.last = now;
                let g = GameOut { to: &self.host, port: port8, flow, data };
                let (poller, relay) = (&self.poller, &mut self.relay);
                frame_out(&mut io.tx, poller, relay, &mut self.direct, now, g, &mut fl.out, ctl, events)?;
            }
        }
        flush_tx(&mut io.tx, &self.poller, &mut self.relay)?;
        Ok(())
    }

    /// A datagram straight from `from`, not from the relay: the host's probe or answer, or game
    /// data on the direct path (accepted only from an address the host has proven).
    fn on_direct(
        &mut self,
        from: SocketAddr,
        d: &[u8],
        out: &mut Out,
        ctl: &TunnelControl,
        events: &mut dyn FnMut(TunnelEvent),
    ) -> Result<(), TunnelError> {
        let now = self.clock.now();
        if crate::path::is_path_message(d) {
            if self.direct.path.handle_direct(now, from, d) {
                self.direct.send_transmits(&self.relay);
            }
            return Ok(());
        }
        if !is_direct_traffic(d) || !matches!(Frame::parse(d), Ok(Frame::Data { .. })) {
            ctl.stats.unproven.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if !self.direct.path.accepts(from) {
            // Maybe the host's NAT moved it: ask that address to prove itself.
            ctl.stats.unproven.fetch_add(1, Ordering::Relaxed);
            self.direct.path.on_unverified(now, from);
            self.direct.send_transmits(&self.relay);
            return Ok(());
        }
        ctl.stats.from_direct.fetch_add(1, Ordering::Relaxed);
        self.on_frame(d, out, ctl, events)?;
        Ok(())
    }

    /// The path work of one turn: STUN, candidates, probes and keep-alives, held frames, reports.
    fn drive_path(
        &mut self,
        now: Millis,
        ctl: &TunnelControl,
        events: &mut dyn FnMut(TunnelEvent),
    ) -> Result<PathTurn, TunnelError> {
        if let Some(req) = self.reflexive.due(now) {
            let _ = self.relay.socket().send_to(&req, self.relay.relay_addr());
        }
        let sock = self.relay.local_addr().ok();
        if let Some(body) = self.direct.candidates_due(now, &self.reflexive, sock) {
            self.relay.send(&self.host, &Frame::Candidates { body: &body }.to_vec())?;
        }
        if let Some(reason) = self.direct.failure_once() {
            events(TunnelEvent::PathFailed { peer: self.host, reason: reason.clone() });
            return Ok(PathTurn::Failed(reason));
        }
        self.direct.drive(now, &mut self.relay, &self.host);
        if let Some(stats) = self.direct.changed(now) {
            let policy = self.direct.path.policy().as_str();
            events(TunnelEvent::Path { status: PeerStatus { peer: self.host.to_string(), policy, stats } });
        }
        if now.saturating_sub(self.last_status) >= 250 {
            self.last_status = now;
            ctl.set_paths(vec![PeerStatus::of(&self.host, &self.direct, now)]);
        }
        Ok(PathTurn::Fine)
    }

    fn expire(&mut self, now: Millis, ctl: &TunnelControl, events: &mut dyn FnMut(TunnelEvent)) {
        let idle = self.cfg.timing.flow_idle.as_millis() as u64;
        let stale: Vec<u32> = self
            .flows
            .iter()
            .filter(|(_, f)| now.saturating_sub(f.last) >= idle)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(f) = self.flows.remove(&id) {
                self.by_client.remove(&(f.port, f.client));
                let _ = self.relay.send(&self.host, &Frame::Close { port: f.port, flow: id }.to_vec());
                ctl.stats.flows_closed.fetch_add(1, Ordering::Relaxed);
                events(TunnelEvent::FlowClosed { player: None, port: f.port, flow: id, reason: "idle" });
            }
        }
    }
}
