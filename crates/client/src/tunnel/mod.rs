//! `ferry tunnel`: any UDP game through Ferry, unchanged.
//!
//! A **host tunnel** runs next to a game server. It allocates a host slot, binds, gets a join
//! code, and forwards one or more local UDP ports ([`HostConfig::forwards`]). For every remote
//! player and every flow of that player it opens its own local UDP socket toward the game
//! server, so the server sees one stable, distinct source address per player and channel, as if
//! the player were on its LAN.
//!
//! A **join tunnel** runs next to a game client. It joins with the code, binds, connects to the
//! host, learns the host's forwarded ports (HELLO) and listens on local ports that mirror them.
//! Each local client address that sends to one of them is a flow.
//!
//! Everything crosses the relay as RELAY payloads in the small, versioned protocol of
//! [`frame`] (`docs/tunnel-protocol.md`). Game datagrams are carried unchanged, up to
//! [`frame::MAX_GAME_DATAGRAM`] bytes; a larger one is dropped, counted and reported once per
//! flow. Tunnels keep their allocations alive (PING when quiet, as Unity Transport does), re-BIND
//! after a network change, keep flows open for a configurable idle time (default 120 s, longer
//! than QUIC's 60 s), and tell each other when they leave.
//!
//! Both tunnels are objects other Rust programs can embed: build one with `open`, then call
//! `run` on a thread with a [`TunnelControl`] to stop it or to move it to a new local port.

mod batch;
pub mod cli;
pub(crate) mod direct;
pub mod frame;
mod host;
mod join;
mod poller;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use direct::{PathOptions, PeerStatus};
pub use host::{HostConfig, HostTunnel};
pub use join::{JoinConfig, JoinExit, JoinTunnel};

use crate::wire::AllocationId;

/// What a tunnel reports while it runs (printed by `ferry tunnel`, `--json` as event lines).
#[derive(Clone, Debug, PartialEq)]
pub enum TunnelEvent {
    /// A player's join tunnel said hello (host side).
    PlayerJoined {
        player: AllocationId,
    },
    /// A player left (BYE) or fell silent for the peer timeout (host side).
    PlayerLeft {
        player: AllocationId,
        reason: &'static str,
    },
    /// A new flow: host side, the local socket that now speaks for it; joiner side, the game
    /// client's address.
    FlowOpened {
        player: Option<AllocationId>,
        port: u8,
        flow: u32,
        local: SocketAddr,
    },
    FlowClosed {
        player: Option<AllocationId>,
        port: u8,
        flow: u32,
        reason: &'static str,
    },
    /// A game datagram over [`frame::MAX_GAME_DATAGRAM`] was dropped (reported once per flow).
    Oversize {
        port: u8,
        flow: u32,
        len: usize,
    },
    /// The tunnel moved to a new local socket and re-bound.
    Rebound {
        local: SocketAddr,
    },
    /// Round-trip time through the relay to a peer tunnel.
    Rtt {
        peer: AllocationId,
        micros: u64,
    },
    /// A peer's path changed (route, its reason, or the direct address).
    Path {
        status: PeerStatus,
    },
    /// The two sides' path policies exclude each other (`relay` against `direct`).
    PathFailed {
        peer: AllocationId,
        reason: String,
    },
}

/// Errors that end a tunnel.
#[derive(Debug)]
pub enum TunnelError {
    Api(crate::ApiError),
    Relay(crate::ClientError),
    Io(std::io::Error),
    /// The host never answered JOIN with its forward list.
    NoHello,
    Config(String),
    /// The two sides' path policies exclude each other.
    Path(String),
}

impl std::fmt::Display for TunnelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Api(e) => write!(f, "{e}"),
            Self::Relay(e) => write!(f, "relay: {e}"),
            Self::Io(e) => write!(f, "{e}"),
            Self::NoHello => f.write_str("the host tunnel did not answer (is it running?)"),
            Self::Config(m) => f.write_str(m),
            Self::Path(m) => write!(f, "path policy: {m}"),
        }
    }
}

impl std::error::Error for TunnelError {}

impl From<std::io::Error> for TunnelError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<crate::ClientError> for TunnelError {
    fn from(e: crate::ClientError) -> Self {
        Self::Relay(e)
    }
}

impl From<crate::ApiError> for TunnelError {
    fn from(e: crate::ApiError) -> Self {
        Self::Api(e)
    }
}

/// Counters of one tunnel, readable while it runs.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Game datagrams from local sockets sent through the relay.
    pub to_relay: AtomicU64,
    /// Game datagrams from local sockets sent straight to the peer tunnel.
    pub to_direct: AtomicU64,
    /// Game datagrams delivered to local sockets (from either path).
    pub from_relay: AtomicU64,
    /// Game datagrams that came straight from a peer tunnel (before duplicates are dropped).
    pub from_direct: AtomicU64,
    /// Game datagrams seen twice (sent on both paths, or duplicated by the network), dropped.
    pub duplicates: AtomicU64,
    /// Datagrams straight from an address no peer has proven (probed, not delivered).
    pub unproven: AtomicU64,
    /// Game datagrams over the size limit, dropped.
    pub oversize: AtomicU64,
    /// Relay payloads that were not tunnel frames, or named an unknown port.
    pub bad_frames: AtomicU64,
    pub flows_opened: AtomicU64,
    pub flows_closed: AtomicU64,
}

impl TunnelStats {
    pub fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }
}

/// Shared with a running tunnel: stop it, or ask it to move to a fresh local socket (what a
/// network change does) and re-BIND.
#[derive(Debug, Default)]
pub struct TunnelControl {
    stop: AtomicBool,
    migrate: AtomicBool,
    pub stats: TunnelStats,
    /// Every peer's path, refreshed by the tunnel a few times a second (never per datagram).
    paths: Mutex<Vec<PeerStatus>>,
}

impl TunnelControl {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Moves the tunnel's relay socket to a new local port on its next turn.
    pub fn migrate(&self) {
        self.migrate.store(true, Ordering::Relaxed);
    }

    fn take_migrate(&self) -> bool {
        self.migrate.swap(false, Ordering::Relaxed)
    }

    /// Every peer's current path (what `ferry tunnel status` prints).
    pub fn paths(&self) -> Vec<PeerStatus> {
        self.paths.lock().map(|p| p.clone()).unwrap_or_default()
    }

    fn set_paths(&self, p: Vec<PeerStatus>) {
        if let Ok(mut g) = self.paths.lock() {
            *g = p;
        }
    }
}

/// Game datagrams gathered for one local destination (a host flow's socket, or a joiner's
/// listening socket), sent in one batch.
struct Out {
    batch: batch::SendBatch,
    to: Option<usize>,
}

/// The batches an event loop turn works with, kept apart from the tunnel's state so that a
/// received batch can be read while the tunnel changes.
struct Io {
    rx: batch::RecvBatch,
    /// Frames toward the relay.
    tx: batch::SendBatch,
    out: Out,
}

impl Out {
    /// Whether a datagram for destination `to` must wait until the gathered ones are sent.
    fn must_flush_before(&self, to: usize) -> bool {
        self.to != Some(to) || self.batch.is_full()
    }

    /// Gathers a game datagram for destination `to` (`dst` for an unconnected socket).
    fn queue(&mut self, to: usize, dst: Option<std::net::SocketAddr>, data: &[u8]) {
        self.to = Some(to);
        self.batch.push(dst, |b| {
            b.get_mut(..data.len())?.copy_from_slice(data);
            Some(data.len())
        });
    }

    /// Sends what was gathered from `sock` in one batch, and starts over.
    fn flush(&mut self, sock: Option<&mio::net::UdpSocket>, ctl: &TunnelControl) {
        if let Some(sock) = sock {
            if let Ok(sent) = batch::send(sock, &self.batch) {
                ctl.stats.from_relay.fetch_add(sent as u64, Ordering::Relaxed);
            }
        }
        self.batch.clear();
        self.to = None;
    }
}

impl Io {
    fn new() -> Self {
        Self {
            rx: batch::RecvBatch::new(),
            tx: batch::SendBatch::new(),
            out: Out { batch: batch::SendBatch::new(), to: None },
        }
    }
}

/// Receives one batch from `sock`: `Ok(0)` when nothing is waiting (transient errors included).
fn recv_some(sock: &mio::net::UdpSocket, rx: &mut batch::RecvBatch) -> std::io::Result<usize> {
    // An ICMP error from an earlier send (a probe to a candidate nobody listens on) is reported
    // once and says nothing about what is queued: read on. Bounded, in case errors keep coming.
    for _ in 0..64 {
        match batch::recv(sock, rx) {
            Ok(n) => return Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        }
    }
    Ok(0)
}

/// The outbound side of one flow, in either tunnel.
#[derive(Debug, Default)]
struct FlowOut {
    seq: u32,
    oversize_reported: bool,
    /// The inbound side: datagrams seen, so one sent on both paths is delivered once.
    window: crate::path::ReplayWindow,
}

/// One game datagram of a flow, on its way to a peer tunnel.
struct GameOut<'a> {
    to: &'a crate::wire::AllocationId,
    port: u8,
    flow: u32,
    data: &'a [u8],
}

/// Frames one game datagram of a flow into `tx` on the peer's current route (relay, direct or
/// both), holds it while the policy waits for a path, or drops it when it is over
/// [`frame::MAX_GAME_DATAGRAM`] (counted, and reported once per flow); sends the batch when
/// it is nearly full.
#[allow(clippy::too_many_arguments)]
fn frame_out(
    tx: &mut batch::SendBatch,
    poller: &poller::Poller,
    relay: &mut crate::RelayClient,
    peer: &mut direct::PeerDirect,
    now: crate::clock::Millis,
    g: GameOut<'_>,
    out: &mut FlowOut,
    ctl: &TunnelControl,
    events: &mut dyn FnMut(TunnelEvent),
) -> std::io::Result<()> {
    let GameOut { to, port, flow, data } = g;
    if data.len() > frame::MAX_GAME_DATAGRAM {
        ctl.stats.oversize.fetch_add(1, Ordering::Relaxed);
        if !out.oversize_reported {
            out.oversize_reported = true;
            events(TunnelEvent::Oversize { port, flow, len: data.len() });
        }
        return Ok(());
    }
    out.seq = out.seq.wrapping_add(1);
    let seq = out.seq;
    let (r, d) = peer.route_data(now, tx, relay, to, |p| frame::write_data(p, port, flow, seq, data));
    ctl.stats.to_relay.fetch_add(r, Ordering::Relaxed);
    ctl.stats.to_direct.fetch_add(d, Ordering::Relaxed);
    // Room for the next frame on both paths, or send what is gathered now.
    if tx.room() < 2 {
        flush_tx(tx, poller, relay)?;
    }
    Ok(())
}

/// Sends the frames gathered for the relay in one batch.
fn flush_tx(
    tx: &mut batch::SendBatch,
    poller: &poller::Poller,
    relay: &mut crate::RelayClient,
) -> std::io::Result<()> {
    if tx.is_empty() {
        return Ok(());
    }
    if let Some(s) = poller.relay_socket() {
        batch::send(s, tx)?;
        relay.note_sent();
    }
    tx.clear();
    Ok(())
}

/// Timings shared by both tunnels.
#[derive(Clone, Debug)]
pub struct Timing {
    /// A flow with no datagram either way for this long is closed (sockets freed).
    pub flow_idle: Duration,
    /// A peer tunnel silent for this long is gone.
    pub peer_timeout: Duration,
    /// Tunnel-level PING through the relay (RTT, and liveness of the peer tunnel).
    pub ping_interval: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            flow_idle: Duration::from_secs(120),
            peer_timeout: Duration::from_secs(20),
            ping_interval: Duration::from_secs(2),
        }
    }
}
