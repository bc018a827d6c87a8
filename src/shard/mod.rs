//! A shard: one thread that owns one [`Core`], one UDP socket and one event loop.
//!
//! Each turn: control messages first (bounded), then up to [`RECV_BATCHES_PER_TURN`] receive
//! batches, then timers, then relay-originated datagrams and lifecycle events. A flood can use at
//! most one turn's budget before timers and control messages get their go. The control plane
//! reaches a shard only through its mailbox ([`ShardHandle`]); counters are copied out on request.
//!
//! With several shards on one `SO_REUSEPORT` address, a datagram can land on a shard that does not
//! own its session; it is handed to the owner through the owner's mailbox, so correctness never
//! depends on how the kernel spreads datagrams.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::{Events, Interest, Poll, Token, Waker};
use tokio::sync::oneshot;

use crate::clock::{Clock, Millis};
use crate::core::owner_shard;
use crate::core::{Action, Control, ControlError, ControlReply, Core, CoreConfig, Event, Stats};
use crate::io::{BatchIo, PacketBatch, SendItem, SendReport, BATCH, BUF_SIZE};
use crate::secure::dtls::{DtlsConfig, DtlsLayer, Received, Sealed};
use crate::secure::record;
use crate::secure::stream::{is_stream, Outbox};

mod uring;

use crate::wire::{AllocationId, MessageType, MAX_DATAGRAM};
pub use uring::probe as uring_available;

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);
/// Receive batches (of up to 64 datagrams) handled per loop turn before timers and control run.
pub const RECV_BATCHES_PER_TURN: usize = 16;
/// Mailbox messages handled per loop turn.
const CONTROL_PER_TURN: usize = 256;
/// Handed-off datagrams waiting for one shard before more are dropped.
const MAILBOX_CAPACITY: usize = 16 * 1024;

/// Counters of the shard's I/O, next to the core's protocol counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    pub recv_batches: u64,
    pub send_dropped_full: u64,
    pub send_errors: u64,
    pub recv_errors: u64,
    pub handoff_out: u64,
    pub handoff_in: u64,
    pub handoff_dropped: u64,
    /// GSO sends (each a run of same-size datagrams to one destination).
    pub gso_sends: u64,
    /// GSO runs the kernel refused, sent one datagram at a time instead.
    pub gso_fallbacks: u64,
    /// Messages not sent to a WebSocket client because they exceed what Unity's client accepts.
    pub ws_oversize: u64,
    /// Messages dropped because a WebSocket connection's outbox was full (a slow reader).
    pub ws_outbox_full: u64,
    /// Messages for a WebSocket connection that has closed.
    pub ws_gone: u64,
    /// Time spent waiting for work (in epoll or the ring), in nanoseconds.
    pub idle_ns: u64,
    /// Time since the shard started, in milliseconds (set at each snapshot).
    pub uptime_ms: u64,
}

/// A snapshot of one shard.
#[derive(Clone, Debug, Default)]
pub struct ShardStats {
    pub shard: usize,
    /// `epoll` or `io_uring`.
    pub backend: &'static str,
    pub allocations: usize,
    pub core: Stats,
    pub io: IoStats,
    pub dtls: crate::secure::dtls::DtlsStats,
}

/// A datagram handed from the shard that received it to the shard that owns it.
pub struct Handoff {
    pub src: SocketAddr,
    pub data: Vec<u8>,
}

pub enum ShardMsg {
    Control(Control, oneshot::Sender<Result<ControlReply, ControlError>>),
    Stats(oneshot::Sender<ShardStats>),
    Handoff(Handoff),
    /// A DTLS session established on another shard, for the allocation this shard owns.
    AdoptDtls(SocketAddr, Box<crate::secure::dtls::Session>),
    /// A WebSocket connection (named by its stream address) will send Relay messages here;
    /// what the core sends to it goes to this outbox.
    StreamOpen(SocketAddr, Outbox),
    /// A Relay message from a WebSocket connection.
    Stream(SocketAddr, Vec<u8>),
    StreamClosed(SocketAddr),
    /// Take every link out of the kernel fast path (drain): userspace carries all traffic.
    WithdrawLinks,
    Stop,
}

/// How a sleeping shard is woken: mio's waker (epoll) or an eventfd the ring polls (io_uring).
#[derive(Clone)]
enum Wake {
    Mio(Arc<Waker>),
    EventFd(Arc<std::os::fd::OwnedFd>),
}

impl Wake {
    fn wake(&self) {
        match self {
            Wake::Mio(w) => {
                let _ = w.wake();
            }
            Wake::EventFd(fd) => {
                let one = 1u64;
                // SAFETY: writing 8 bytes from a live u64 to an eventfd we own.
                let _ = unsafe {
                    libc::write(std::os::fd::AsRawFd::as_raw_fd(&**fd), (&one as *const u64).cast(), 8)
                };
            }
        }
    }
}

/// How the rest of the process talks to a shard.
#[derive(Clone)]
pub struct ShardHandle {
    pub index: usize,
    tx: Sender<ShardMsg>,
    waker: Wake,
}

impl ShardHandle {
    /// Queues a message and wakes the shard. Fails only when the mailbox is full or the shard is gone.
    pub fn send(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        match self.tx.try_send(msg) {
            Ok(()) => {
                self.waker.wake();
                Ok(())
            }
            Err(TrySendError::Full(m)) | Err(TrySendError::Disconnected(m)) => Err(m),
        }
    }
}

/// Everything a shard thread needs, built on the spawning thread.
pub struct ShardSetup {
    pub index: usize,
    pub socket: UdpSocket,
    pub core: CoreConfig,
    pub clock: Clock,
    pub events: tokio::sync::mpsc::UnboundedSender<(usize, Event)>,
    /// Core to pin the thread to.
    pub pin: Option<core_affinity::CoreId>,
    /// Run the io_uring event loop instead of epoll.
    pub uring: bool,
    /// Send runs of same-size datagrams to one destination with UDP GSO.
    pub gso: bool,
    /// DTLS on the relay port (the context every shard shares, and the layer's tunables).
    pub dtls: Option<(openssl::ssl::SslContext, crate::secure::dtls::DtlsConfig)>,
    /// The kernel fast path's links map, when it is attached.
    pub links: Option<crate::xdp::LinkMap>,
}

enum Driver {
    Epoll(Poll),
    Uring(Arc<std::os::fd::OwnedFd>),
}

/// Builds mailboxes and wakers for `setups.len()` shards, then starts one thread per shard.
pub fn spawn_all(setups: Vec<ShardSetup>) -> io::Result<(Vec<ShardHandle>, Vec<JoinHandle<()>>)> {
    let mut polls = Vec::new();
    let mut handles = Vec::new();
    let mut rxs = Vec::new();
    for s in &setups {
        let (driver, waker) = if s.uring {
            // SAFETY: eventfd has no memory preconditions; a negative result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor nothing else owns.
            let fd = Arc::new(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            (Driver::Uring(fd.clone()), Wake::EventFd(fd))
        } else {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
            (Driver::Epoll(poll), Wake::Mio(waker))
        };
        let (tx, rx) = crossbeam_channel::bounded(MAILBOX_CAPACITY);
        handles.push(ShardHandle { index: s.index, tx, waker });
        polls.push(driver);
        rxs.push(rx);
    }
    let mut threads = Vec::new();
    for ((setup, poll), rx) in setups.into_iter().zip(polls).zip(rxs) {
        let peers = handles.clone();
        let t =
            std::thread::Builder::new().name(format!("ferry-shard-{}", setup.index)).spawn(move || {
                let index = setup.index;
                let result = match poll {
                    Driver::Epoll(poll) => run(setup, poll, rx, peers),
                    Driver::Uring(efd) => uring::run(setup, efd, rx, peers),
                };
                if let Err(e) = result {
                    tracing::error!(shard = index, error = %e, "shard stopped on an I/O error");
                }
            })?;
        threads.push(t);
    }
    Ok((handles, threads))
}

/// The owner shard of a datagram, by the same rule as the kernel program (`bpf/steer.bpf`): the
/// big-endian word at offset 4 (8 for BIND) modulo the shard count. `None` when too short.
#[inline]
pub fn datagram_owner(d: &[u8], shards: u32) -> Option<usize> {
    // Only Unity Relay messages name an allocation; anything else (STUN, garbage) stays where
    // the kernel's hash put it.
    if d.get(..2) != Some(&[crate::wire::SIGNATURE_0, crate::wire::SIGNATURE_1][..]) {
        return None;
    }
    let off = if d.get(3) == Some(&(MessageType::Bind as u8)) { 8 } else { 4 };
    let w = d.get(off..off + 4)?;
    Some((u32::from_be_bytes([w[0], w[1], w[2], w[3]]) % shards.max(1)) as usize)
}

/// What both backends share: the core, the mailboxes of every shard, counters and events.
pub(crate) struct State {
    pub index: usize,
    pub backend: &'static str,
    pub core: Core,
    pub peers: Vec<ShardHandle>,
    pub stats: IoStats,
    pub events: tokio::sync::mpsc::UnboundedSender<(usize, Event)>,
    /// When the shard started (for its uptime and busy time).
    started: Millis,
    dtls: Option<DtlsLayer>,
    /// DTLS clients whose session moved to the shard owning their allocation, and when each
    /// was last heard from.
    redirects: HashMap<SocketAddr, (usize, Millis)>,
    /// Decrypted records, sealed records, and handed-off datagrams are staged here.
    plain: Vec<u8>,
    sealed: Vec<u8>,
    mailroom: Vec<u8>,
    /// Datagrams beyond the one a received datagram's buffer can carry (handshake flights,
    /// the answers to a second record in one datagram), sent at the end of the turn.
    pending: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Outboxes of the WebSocket connections that have sent messages here.
    streams: HashMap<SocketAddr, Outbox>,
    /// The kernel fast path's links map, when it is attached.
    links: Option<crate::xdp::LinkMap>,
    /// The links this shard put in the kernel, with the addresses they join, and by address (so
    /// an address that starts speaking DTLS takes its links out: the kernel forwards plain UDP).
    published: HashMap<(AllocationId, AllocationId), [SocketAddr; 2]>,
    published_at: HashMap<SocketAddr, Vec<(AllocationId, AllocationId)>>,
}

/// Where a received datagram goes.
pub(crate) enum Verdict {
    /// Send `len` bytes of the buffer to this address.
    Send(SocketAddr, usize),
    /// Nothing to send (dropped, consumed, or handed to its owner shard).
    Done,
}

impl State {
    #[allow(clippy::too_many_arguments)] // one per part a backend hands over from its setup
    fn new(
        setup_index: usize,
        backend: &'static str,
        core: CoreConfig,
        now: Millis,
        peers: Vec<ShardHandle>,
        events: tokio::sync::mpsc::UnboundedSender<(usize, Event)>,
        dtls: Option<(openssl::ssl::SslContext, DtlsConfig)>,
        links: Option<crate::xdp::LinkMap>,
    ) -> Self {
        let mut core = core;
        core.kernel_links = links.is_some();
        let secret = core.conn_secret;
        let fleet = core.fleet.clone();
        Self {
            dtls: dtls.map(|(ctx, cfg)| {
                let mut d = DtlsLayer::new(ctx, secret, cfg);
                d.set_fleet(fleet);
                d
            }),
            redirects: HashMap::new(),
            plain: vec![0; BUF_SIZE],
            sealed: vec![0; BUF_SIZE],
            mailroom: vec![0; BUF_SIZE],
            pending: VecDeque::new(),
            streams: HashMap::new(),
            links,
            published: HashMap::new(),
            published_at: HashMap::new(),
            index: setup_index,
            backend,
            core: Core::new(core, now),
            peers,
            stats: IoStats::default(),
            events,
            started: now,
        }
    }

    pub fn count(&mut self, r: SendReport) {
        self.stats.send_dropped_full += r.would_block as u64;
        self.stats.send_errors += r.errors as u64;
        self.stats.gso_sends += r.gso_sends as u64;
        self.stats.gso_fallbacks += r.gso_fallbacks as u64;
    }

    /// Decides one received datagram: hand it to its owner shard, or let the core answer it.
    /// `room` is the whole receive buffer, the datagram its first `len` bytes (a STUN answer is
    /// written in place and may be longer than its request; a DTLS record is unwrapped and
    /// answers are sealed in place).
    #[inline]
    pub fn classify(&mut self, now: Millis, src: SocketAddr, room: &mut [u8], len: usize) -> Verdict {
        if crate::wire::stun::is_stun(&room[..len]) {
            return match self.core.handle_stun(now, src, room, len) {
                Action::Reply(n) => Verdict::Send(src, n),
                _ => Verdict::Done,
            };
        }
        if crate::wire::qos::QosRequest::is_qos(&room[..len]) {
            return match self.core.handle_qos(now, src, room, len) {
                Action::Reply(n) => Verdict::Send(src, n),
                _ => Verdict::Done,
            };
        }
        if let Some(d) = &mut self.dtls {
            if record::is_dtls(&room[..len]) {
                return self.classify_dtls(now, src, room, len);
            }
            if d.has(&src) {
                // Plain Relay messages are never accepted from an address that speaks DTLS:
                // anyone can spoof a source address, nobody can forge a record.
                d.count_plaintext_on_secure();
                return Verdict::Done;
            }
        }
        self.classify_plain(now, src, room, len)
    }

    fn classify_plain(&mut self, now: Millis, src: SocketAddr, room: &mut [u8], len: usize) -> Verdict {
        let buf = &mut room[..len];
        let shards = self.peers.len() as u32;
        if shards > 1 {
            if let Some(owner) = datagram_owner(buf, shards).filter(|&o| o != self.index) {
                self.hand_off(owner, src, buf);
                return Verdict::Done;
            }
        }
        self.decide(now, src, room, len)
    }

    /// Lets the core answer `room[..len]`, a Relay message from `src`, and seals the answer for
    /// its destination.
    fn decide(&mut self, now: Millis, src: SocketAddr, room: &mut [u8], len: usize) -> Verdict {
        let action = self.core.handle_datagram(now, src, &mut room[..len]);
        if self.links.is_some() {
            self.sync_kernel(now);
        }
        match action {
            Action::Forward(dst) => self.seal(dst, room, len),
            Action::Reply(n) => self.seal(src, room, n),
            Action::Consumed | Action::Drop(_) => Verdict::Done,
        }
    }

    /// Wraps `room[..n]` for `dst`'s transport (a WebSocket peer's goes to its outbox here).
    #[inline]
    fn seal(&mut self, dst: SocketAddr, room: &mut [u8], n: usize) -> Verdict {
        if is_stream(&dst) {
            self.send_to_stream(dst, &room[..n]);
            return Verdict::Done;
        }
        let Some(d) = self.dtls.as_mut().filter(|d| !d.is_empty()) else { return Verdict::Send(dst, n) };
        match d.seal(&dst, &room[..n], &mut self.sealed) {
            Sealed::Plain => Verdict::Send(dst, n),
            Sealed::Record(m) if m <= room.len() => {
                room[..m].copy_from_slice(&self.sealed[..m]);
                Verdict::Send(dst, m)
            }
            Sealed::Record(_) | Sealed::Refused => Verdict::Done,
        }
    }

    fn classify_dtls(&mut self, now: Millis, src: SocketAddr, room: &mut [u8], len: usize) -> Verdict {
        if let Some((owner, seen)) = self.redirects.get_mut(&src) {
            *seen = now;
            let owner = *owner;
            self.hand_off(owner, src, &room[..len]);
            return Verdict::Done;
        }
        let Some(layer) = self.dtls.as_mut() else { return Verdict::Done };
        let mut plain = std::mem::take(&mut self.plain);
        let r = layer.receive(now, src, &room[..len], &mut plain);
        let shards = self.peers.len() as u32;
        if let Received::Established(Some(id)) = r {
            let owner = owner_shard(&id, shards) as usize;
            if owner != self.index {
                if let Some(s) = layer.take(&src) {
                    if self.peers[owner].send(ShardMsg::AdoptDtls(src, s)).is_ok() {
                        self.redirects.insert(src, (owner, now));
                    }
                }
                self.plain = plain;
                return Verdict::Done;
            }
        }
        let mut verdict = Verdict::Done;
        if matches!(r, Received::Records | Received::Established(_)) {
            let records = layer.records().to_vec();
            if matches!(r, Received::Established(_)) {
                self.unlink_addr(now, src);
            }
            for (i, &(a, b)) in records.iter().enumerate() {
                let msg = &plain[a..b];
                // A record names its allocation; only this shard's are served from this session.
                if datagram_owner(msg, shards).is_some_and(|o| o != self.index) {
                    continue;
                }
                room[..msg.len()].copy_from_slice(msg);
                let v = self.decide(now, src, room, msg.len());
                if i + 1 < records.len() {
                    if let Verdict::Send(dst, n) = v {
                        self.pending.push_back((dst, room[..n].to_vec()));
                    }
                } else {
                    verdict = v;
                }
            }
        }
        self.plain = plain;
        verdict
    }

    fn send_to_stream(&mut self, dst: SocketAddr, m: &[u8]) {
        if m.len() > crate::secure::ws::MAX_TO_CLIENT {
            self.stats.ws_oversize += 1;
            return;
        }
        let Some(tx) = self.streams.get(&dst) else {
            self.stats.ws_gone += 1;
            return;
        };
        match tx.try_send(m.to_vec()) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => self.stats.ws_outbox_full += 1,
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                self.streams.remove(&dst);
                self.stats.ws_gone += 1;
            }
        }
    }

    fn hand_off(&mut self, owner: usize, src: SocketAddr, d: &[u8]) {
        let msg = ShardMsg::Handoff(Handoff { src, data: d.to_vec() });
        match self.peers[owner].send(msg) {
            Ok(()) => self.stats.handoff_out += 1,
            Err(_) => self.stats.handoff_dropped += 1,
        }
    }

    /// Answers the core's questions about kernel-side traffic and applies its link changes, until
    /// neither is left (an answer may expire an allocation, which takes its links down). Runs
    /// before anything the same step produced is sent.
    pub fn sync_kernel(&mut self, now: Millis) {
        let Some(links) = self.links.clone() else { return };
        loop {
            let mut idle = true;
            while let Some(c) = self.core.poll_kernel_check() {
                idle = false;
                let ago = c.links.iter().filter_map(|(f, t)| links.last_seen_ms_ago(f, t)).min();
                self.core.kernel_seen(now, &c.id, ago.map(|a| now.saturating_sub(a)));
            }
            while let Some(op) = self.core.poll_link_op() {
                idle = false;
                self.apply_link(&links, now, &op);
            }
            if idle {
                return;
            }
        }
    }

    /// One link op of the core, for the kernel. Only links between plain-UDP clients go in: the
    /// kernel cannot seal for a DTLS client or write to a WebSocket.
    fn apply_link(&mut self, links: &crate::xdp::LinkMap, now: Millis, op: &crate::core::LinkOp) {
        use crate::core::LinkOp;
        match *op {
            LinkOp::Up { host, host_addr, joiner, joiner_addr } => {
                let plain = |a: &SocketAddr| !is_stream(a) && !self.dtls.as_ref().is_some_and(|d| d.has(a));
                if !plain(&host_addr) || !plain(&joiner_addr) {
                    links.stats.not_plain_udp.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
                links.apply(op);
                self.published.insert((host, joiner), [host_addr, joiner_addr]);
                for a in [host_addr, joiner_addr] {
                    self.published_at.entry(a).or_default().push((host, joiner));
                }
            }
            LinkOp::Down { host, joiner } => {
                for (id, ago) in links.apply(op).into_iter().flatten() {
                    self.core.kernel_activity(&id, now.saturating_sub(ago));
                }
                if let Some(addrs) = self.published.remove(&(host, joiner)) {
                    for a in addrs {
                        if let Some(v) = self.published_at.get_mut(&a) {
                            v.retain(|&l| l != (host, joiner));
                            if v.is_empty() {
                                self.published_at.remove(&a);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Takes out of the kernel every link that forwards from or to `addr` (it now speaks DTLS).
    fn unlink_addr(&mut self, now: Millis, addr: SocketAddr) {
        let Some(links) = self.links.clone() else { return };
        for (host, joiner) in self.published_at.get(&addr).cloned().unwrap_or_default() {
            self.apply_link(&links, now, &crate::core::LinkOp::Down { host, joiner });
        }
    }

    /// Handles mailbox messages (at most a turn's worth). Returns true on `Stop`.
    pub fn mailbox(
        &mut self,
        rx: &Receiver<ShardMsg>,
        now: Millis,
        send_one: &mut dyn FnMut(&SocketAddr, &[u8]) -> SendReport,
    ) -> bool {
        for _ in 0..CONTROL_PER_TURN {
            match rx.try_recv() {
                Ok(ShardMsg::Control(cmd, reply)) => {
                    let rotated = match &cmd {
                        crate::core::Control::Reconfigure(r) => r.fleet.is_some(),
                        _ => false,
                    };
                    let _ = reply.send(self.core.handle_control(now, cmd));
                    self.sync_kernel(now);
                    if let (true, Some(d)) = (rotated, &mut self.dtls) {
                        d.set_fleet(self.core.config().fleet.clone());
                    }
                }
                Ok(ShardMsg::Stats(reply)) => {
                    self.stats.uptime_ms = now.saturating_sub(self.started);
                    let _ = reply.send(self.snapshot());
                }
                Ok(ShardMsg::Handoff(h)) => {
                    self.stats.handoff_in += 1;
                    let mut room = std::mem::take(&mut self.mailroom);
                    let len = h.data.len().min(room.len());
                    room[..len].copy_from_slice(&h.data[..len]);
                    if let Verdict::Send(dst, n) = self.classify(now, h.src, &mut room, len) {
                        let r = send_one(&dst, &room[..n]);
                        self.count(r);
                    }
                    self.mailroom = room;
                }
                Ok(ShardMsg::StreamOpen(addr, tx)) => {
                    self.streams.insert(addr, tx);
                }
                Ok(ShardMsg::StreamClosed(addr)) => {
                    self.streams.remove(&addr);
                }
                Ok(ShardMsg::Stream(src, data)) => {
                    let mut room = std::mem::take(&mut self.mailroom);
                    let len = data.len().min(room.len());
                    room[..len].copy_from_slice(&data[..len]);
                    if let Verdict::Send(dst, n) = self.decide(now, src, &mut room, len) {
                        let r = send_one(&dst, &room[..n]);
                        self.count(r);
                    }
                    self.mailroom = room;
                }
                Ok(ShardMsg::AdoptDtls(addr, session)) => {
                    if let Some(d) = &mut self.dtls {
                        d.adopt(addr, *session);
                    }
                    self.unlink_addr(now, addr);
                }
                Ok(ShardMsg::WithdrawLinks) => {
                    self.core.withdraw_links();
                    self.sync_kernel(now);
                    self.links = None;
                }
                Ok(ShardMsg::Stop) => {
                    self.core.withdraw_links();
                    self.sync_kernel(now);
                    self.flush_core(now, send_one);
                    return true;
                }
                Err(_) => break,
            }
        }
        false
    }

    /// Sends relay-originated datagrams and forwards lifecycle events.
    pub fn flush_core(&mut self, now: Millis, send_one: &mut dyn FnMut(&SocketAddr, &[u8]) -> SendReport) {
        self.sync_kernel(now);
        while let Some(t) = self.core.poll_transmit() {
            let mut room = std::mem::take(&mut self.mailroom);
            let n = t.payload().len();
            room[..n].copy_from_slice(t.payload());
            if let Verdict::Send(dst, m) = self.seal(t.to, &mut room, n) {
                let r = send_one(&dst, &room[..m]);
                self.count(r);
            }
            self.mailroom = room;
        }
        if let Some(d) = &mut self.dtls {
            let swept = d.poll(now);
            while let Some(t) = d.poll_transmit() {
                self.pending.push_back(t);
            }
            if swept {
                let idle = d.config().idle_timeout;
                self.redirects.retain(|_, (_, seen)| now.saturating_sub(*seen) < idle);
            }
        }
        while let Some((to, d)) = self.pending.pop_front() {
            let r = send_one(&to, &d);
            self.count(r);
        }
        while let Some(e) = self.core.poll_event() {
            let _ = self.events.send((self.index, e));
        }
    }

    /// When the loop next has timed work: the core's timers, or the DTLS layer's.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let dtls = self.dtls.as_ref().and_then(|d| d.poll_timeout());
        match (self.core.poll_timeout(), dtls) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn snapshot(&self) -> ShardStats {
        ShardStats {
            shard: self.index,
            backend: self.backend,
            allocations: self.core.allocations(),
            core: self.core.stats().clone(),
            io: self.stats.clone(),
            dtls: self.dtls.as_ref().map(|d| d.stats()).unwrap_or_default(),
        }
    }
}

fn run(setup: ShardSetup, mut poll: Poll, rx: Receiver<ShardMsg>, peers: Vec<ShardHandle>) -> io::Result<()> {
    let clock = setup.clock;
    let mut sock = mio::net::UdpSocket::from_std(setup.socket);
    poll.registry().register(&mut sock, SOCKET, Interest::READABLE)?;
    let mut st = State::new(
        setup.index,
        "epoll",
        setup.core,
        clock.now(),
        peers,
        setup.events,
        setup.dtls,
        setup.links,
    );
    let mut io = BatchIo::new(&sock);
    io.set_gso(setup.gso);
    let mut batch = PacketBatch::new();
    let mut sends: Vec<SendItem> = Vec::with_capacity(BATCH);
    let mut events = Events::with_capacity(64);
    let mut readable = true;
    loop {
        // While the socket is known to hold datagrams, go straight back to it: the mailbox is
        // checked without blocking every turn, so only an idle shard waits in epoll.
        if !readable {
            let now = clock.now();
            let wait = st.poll_timeout().map_or(1000, |t| t.saturating_sub(now).min(1000));
            let idle_from = clock.nanos();
            if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(wait))) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            st.stats.idle_ns += clock.nanos() - idle_from;
            if events.iter().any(|e| e.token() == SOCKET) {
                readable = true;
            }
        }

        if st.mailbox(&rx, clock.now(), &mut |to, d| io.send_one(to, d)) {
            return Ok(());
        }

        if readable {
            readable = false;
            for _ in 0..RECV_BATCHES_PER_TURN {
                match io.recv(&mut batch) {
                    Ok(0) => break,
                    Ok(n) => {
                        st.stats.recv_batches += 1;
                        let now = clock.now();
                        sends.clear();
                        for i in 0..n {
                            let m = batch.meta[i];
                            // A truncated datagram is oversize by definition; the core counts it.
                            let len = if m.truncated { MAX_DATAGRAM + 1 } else { m.len };
                            if let Verdict::Send(dst, len) =
                                st.classify(now, m.src, &mut batch.bufs[i][..], len)
                            {
                                sends.push(SendItem { slot: i, len, dst });
                            }
                        }
                        if !sends.is_empty() {
                            let r = io.send(&batch, &sends);
                            st.count(r);
                            if r.gso_fallbacks > 0 && !io.gso() {
                                tracing::warn!(
                                    shard = st.index,
                                    "UDP GSO refused by the kernel; sending datagrams one by one"
                                );
                            }
                        }
                        // Budget may run out with datagrams still queued: come back without waiting.
                        readable = true;
                    }
                    Err(e) => {
                        st.stats.recv_errors += 1;
                        tracing::warn!(shard = st.index, error = %e, "receive failed");
                        break;
                    }
                }
            }
        }

        st.core.handle_timeout(clock.now());
        st.flush_core(clock.now(), &mut |to, d| io.send_one(to, d));
    }
}
