//! The WebSocket listener (`ws` plain, `wss` over TLS), bridged to the shards.
//!
//! Each connection is one tokio task. After the upgrade, every binary message is a Relay message:
//! the task sends it to the shard that owns the allocation it names (the same rule as datagram
//! steering), and registers its outbox with that shard the first time. The shard's core sees the
//! connection as a source address ([`stream_addr`]: the peer's IP as IPv6, its TCP port, and a
//! nonzero flowinfo that numbers the connection; datagram sources never carry one), so every
//! protocol rule holds unchanged; what the core sends to such an address goes to the outbox and
//! is written as one unmasked binary frame, flushed at once (one small TLS record per message).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use super::ws::{self, Frame};
use crate::clock::Clock;
use crate::shard::{datagram_owner, ShardHandle, ShardMsg};

/// Messages waiting for one connection's socket before more are dropped.
pub const OUTBOX: usize = 64;

/// Where a shard sends what the core addresses to a WebSocket peer.
pub type Outbox = mpsc::Sender<Vec<u8>>;

/// The source address a WebSocket connection has in the core.
pub fn stream_addr(peer: SocketAddr, conn: u32) -> SocketAddr {
    let ip = match peer.ip() {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    SocketAddr::V6(SocketAddrV6::new(ip, peer.port(), conn.max(1), 0))
}

/// Whether `a` names a WebSocket connection rather than a datagram source.
#[inline]
pub fn is_stream(a: &SocketAddr) -> bool {
    matches!(a, SocketAddr::V6(v) if v.flowinfo() != 0)
}

/// Limits of the listener.
#[derive(Clone, Debug)]
pub struct StreamLimits {
    pub max_connections: usize,
    pub max_per_ip: usize,
    /// New connections per second per IP (burst twice that).
    pub accepts_per_ip_per_sec: u32,
    /// Time allowed for the TLS handshake and the upgrade request.
    pub handshake_timeout: Duration,
    /// A connection that receives nothing for this long is closed (Unity pings after its
    /// heartbeat timeout; browsers' sessions send Relay PINGs).
    pub idle_timeout: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_connections: 20_000,
            max_per_ip: 64,
            accepts_per_ip_per_sec: 20,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Counters of the WebSocket listeners (`ferry_ws_*` metrics).
#[derive(Debug, Default)]
pub struct WsStats {
    pub active: AtomicU64,
    pub accepted: AtomicU64,
    pub refused_capacity: AtomicU64,
    pub refused_per_ip: AtomicU64,
    pub refused_rate: AtomicU64,
    pub tls_failed: AtomicU64,
    pub bad_upgrade: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    /// Binary messages that are not Relay messages (no allocation to route by).
    pub not_relay: AtomicU64,
    /// Messages not handed to a shard because its mailbox was full.
    pub mailbox_full: AtomicU64,
    /// Connections ended for a protocol violation (text frame, unmasked frame, oversize …).
    pub violations: AtomicU64,
    pub idle_closed: AtomicU64,
}

struct Shared {
    shards: Arc<[ShardHandle]>,
    limits: StreamLimits,
    stats: Arc<WsStats>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    rate: Mutex<crate::control::ratelimit::KeyedLimiter<IpAddr>>,
    next_conn: AtomicU32,
    clock: Clock,
}

/// Serves WebSocket connections on `listener` until `stop` turns true. With `tls`, each
/// connection first completes a TLS handshake (the acceptor's certificate store reloads itself).
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shards: Arc<[ShardHandle]>,
    limits: StreamLimits,
    stats: Arc<WsStats>,
    clock: Clock,
    mut stop: watch::Receiver<bool>,
) {
    let rate = limits.accepts_per_ip_per_sec as f64;
    let shared = Arc::new(Shared {
        shards,
        stats,
        per_ip: Mutex::new(HashMap::new()),
        rate: Mutex::new(crate::control::ratelimit::KeyedLimiter::new(rate, 1000.0, 2.0 * rate, 65_536)),
        next_conn: AtomicU32::new(1),
        clock,
        limits,
    });
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "WebSocket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let s = &shared;
        let ip = crate::core::canonical_ip(peer.ip());
        if s.stats.active.load(Relaxed) as usize >= s.limits.max_connections {
            s.stats.refused_capacity.fetch_add(1, Relaxed);
            continue;
        }
        if !s.rate.lock().unwrap_or_else(|p| p.into_inner()).take(&ip, s.clock.now()) {
            s.stats.refused_rate.fetch_add(1, Relaxed);
            continue;
        }
        {
            let mut m = s.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(ip).or_insert(0);
            if *n >= s.limits.max_per_ip {
                s.stats.refused_per_ip.fetch_add(1, Relaxed);
                continue;
            }
            *n += 1;
        }
        s.stats.active.fetch_add(1, Relaxed);
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let timeout = shared.limits.handshake_timeout;
            match tls {
                Some(acceptor) => match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => connection(stream, peer, &shared).await,
                    _ => {
                        shared.stats.tls_failed.fetch_add(1, Relaxed);
                    }
                },
                None => connection(tcp, peer, &shared).await,
            }
            shared.stats.active.fetch_sub(1, Relaxed);
            let mut m = shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = m.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        });
    }
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, peer: SocketAddr, s: &Shared) {
    let mut inbuf: Vec<u8> = Vec::new();
    let upgrade = tokio::time::timeout(s.limits.handshake_timeout, async {
        let mut chunk = [0u8; 1024];
        loop {
            match ws::accept_upgrade(&inbuf) {
                Err(ws::UpgradeError::Incomplete) => {}
                other => return other,
            }
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return Err(ws::UpgradeError::Incomplete),
                Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let used = match upgrade {
        Ok(Ok((used, answer))) => {
            if io.write_all(answer.as_bytes()).await.is_err() || io.flush().await.is_err() {
                return;
            }
            used
        }
        Ok(Err(e)) => {
            s.stats.bad_upgrade.fetch_add(1, Relaxed);
            if e != ws::UpgradeError::Incomplete {
                let _ = io.write_all(ws::refuse_upgrade(e).as_bytes()).await;
                let _ = io.shutdown().await;
            }
            return;
        }
        Err(_) => {
            s.stats.bad_upgrade.fetch_add(1, Relaxed);
            return;
        }
    };
    s.stats.accepted.fetch_add(1, Relaxed);
    inbuf.drain(..used);
    let conn = s.next_conn.fetch_add(1, Relaxed).max(1);
    let addr = stream_addr(peer, conn);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(OUTBOX);
    let mut registered = vec![false; s.shards.len()];
    let mut decoder = ws::Decoder::default();
    let mut out = Vec::new();
    let mut chunk = [0u8; 2048];
    let idle = s.limits.idle_timeout;
    'conn: loop {
        // Whole frames already buffered first.
        loop {
            let (used, reply) = match decoder.decode(&inbuf) {
                Ok(None) => break,
                Ok(Some((used, frame))) => {
                    let reply = match frame {
                        Some(Frame::Binary(m)) => {
                            s.stats.messages_in.fetch_add(1, Relaxed);
                            route(s, addr, &tx, &mut registered, m);
                            None
                        }
                        Some(Frame::Ping(p)) => Some((0xA, p.to_vec(), false)),
                        Some(Frame::Close(_)) => Some((0x8, 1000u16.to_be_bytes().to_vec(), true)),
                        Some(Frame::Pong) | None => None,
                    };
                    (used, reply)
                }
                Err(v) => {
                    s.stats.violations.fetch_add(1, Relaxed);
                    out.clear();
                    ws::encode_close(&mut out, v.code());
                    let _ = io.write_all(&out).await;
                    let _ = io.shutdown().await;
                    break 'conn;
                }
            };
            inbuf.drain(..used);
            if let Some((opcode, payload, last)) = reply {
                out.clear();
                ws::encode(&mut out, opcode, &payload);
                if io.write_all(&out).await.is_err() || io.flush().await.is_err() || last {
                    let _ = io.shutdown().await;
                    break 'conn;
                }
            }
        }
        if inbuf.is_empty() {
            inbuf = Vec::new();
            decoder.shrink();
        }
        out = Vec::new();
        tokio::select! {
            r = tokio::time::timeout(idle, io.read(&mut chunk)) => match r {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => inbuf.extend_from_slice(&chunk[..n]),
                Err(_) => {
                    s.stats.idle_closed.fetch_add(1, Relaxed);
                    let mut close = Vec::new();
                    ws::encode_close(&mut close, 1001);
                    let _ = io.write_all(&close).await;
                    break;
                }
            },
            Some(m) = rx.recv() => {
                let mut frame = Vec::with_capacity(m.len() + 4);
                ws::encode(&mut frame, 0x2, &m);
                if io.write_all(&frame).await.is_err() || io.flush().await.is_err() {
                    break;
                }
                s.stats.messages_out.fetch_add(1, Relaxed);
            }
        }
    }
    for (i, r) in registered.iter().enumerate() {
        if *r {
            let _ = s.shards[i].send(ShardMsg::StreamClosed(addr));
        }
    }
}

/// Hands a Relay message to the shard owning the allocation it names.
fn route(s: &Shared, addr: SocketAddr, tx: &Outbox, registered: &mut [bool], m: &[u8]) {
    let Some(owner) = datagram_owner(m, s.shards.len() as u32) else {
        s.stats.not_relay.fetch_add(1, Relaxed);
        return;
    };
    let shard = &s.shards[owner];
    if !registered[owner] {
        if shard.send(ShardMsg::StreamOpen(addr, tx.clone())).is_err() {
            s.stats.mailbox_full.fetch_add(1, Relaxed);
            return;
        }
        registered[owner] = true;
    }
    if shard.send(ShardMsg::Stream(addr, m.to_vec())).is_err() {
        s.stats.mailbox_full.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_addresses_never_collide_with_datagram_sources() {
        let udp: SocketAddr = "[::ffff:192.0.2.1]:5000".parse().unwrap();
        let tcp = stream_addr("192.0.2.1:5000".parse().unwrap(), 7);
        assert_ne!(udp, tcp);
        assert!(is_stream(&tcp) && !is_stream(&udp));
        assert!(!is_stream(&"192.0.2.1:5000".parse().unwrap()));
        assert_eq!(crate::core::canonical_ip(tcp.ip()), "192.0.2.1".parse::<IpAddr>().unwrap());
        assert!(is_stream(&stream_addr("[2001:db8::1]:1".parse().unwrap(), 0)), "connection 0 is never used");
    }
}
