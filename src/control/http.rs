//! The API's HTTP server: hyper HTTP/1.1 with the limits a public endpoint needs.
//!
//! - A connection that does not deliver a request's headers within `header_timeout` (slow or
//!   idle clients, on the first request and between keep-alive requests) is closed.
//! - At most `per_source` connections are open from one IPv4 address or one IPv6 /64; more are
//!   closed on accept.
//! - At most `max_connections` are open at once. When the table is full, a new connection takes
//!   the place of the one that has waited longest without a complete request (idle, slow headers,
//!   slow body): honest clients send their request at once, so holding connections open costs an
//!   attacker them instead of costing honest clients theirs. Connections whose request is being
//!   served are never shed; if every connection is busy the new one is refused.
//! - Refusals and sheds are counted and logged at most once per [`LOG_EVERY_MS`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tower::ServiceExt;

use crate::clock::{Clock, Millis};
use crate::core::canonical_ip;

/// Summary log lines about refused connections are written at most this often.
pub const LOG_EVERY_MS: Millis = 10_000;

/// Connection limits of the API server.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub per_source: usize,
    pub header_timeout: Duration,
}

/// Connection counters, read by `/metrics`.
#[derive(Default, Debug)]
pub struct HttpStats {
    pub accepted: AtomicU64,
    /// Closed on accept: the source already had `per_source` connections.
    pub refused_per_source: AtomicU64,
    /// Closed on accept: the table was full of connections being served.
    pub refused_full: AtomicU64,
    /// Cut to make room for a new connection (idle or slow ones, oldest first).
    pub shed: AtomicU64,
    /// `accept` itself failed (e.g. out of file descriptors).
    pub accept_errors: AtomicU64,
    /// The connection cap in force.
    pub max_connections: AtomicU64,
}

/// The source a connection is counted under: an IPv4 address or an IPv6 /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceKey {
    V4(u32),
    V6(u64),
}

impl SourceKey {
    pub fn of(ip: IpAddr) -> Self {
        match canonical_ip(ip) {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => Self::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

/// What the server knows of one connection's progress; handlers mark it busy once they hold a
/// complete request (see [`Progress`]).
#[derive(Debug)]
struct Conn {
    busy: AtomicBool,
    /// When the connection last started waiting for a client (accept, or a response sent).
    since: AtomicU64,
    shed: Notify,
}

/// A handle a request carries (as an extension) so the handler can say when the request is
/// complete: from then on the connection is being served and is never shed.
#[derive(Clone, Debug)]
pub struct Progress(Arc<Conn>);

impl Progress {
    pub fn request_complete(&self) {
        self.0.busy.store(true, Ordering::Relaxed);
    }
}

struct Entry {
    source: SourceKey,
    conn: Arc<Conn>,
}

#[derive(Default)]
struct Table {
    next: u64,
    conns: HashMap<u64, Entry>,
    per_source: HashMap<SourceKey, usize>,
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.conns.remove(&id)?;
        if let Some(n) = self.per_source.get_mut(&e.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&e.source);
            }
        }
        Some(e)
    }

    /// The connection that has waited longest without a complete request.
    fn oldest_waiting(&self) -> Option<u64> {
        self.conns
            .iter()
            .filter(|(_, e)| !e.conn.busy.load(Ordering::Relaxed))
            .min_by_key(|(id, e)| (e.conn.since.load(Ordering::Relaxed), **id))
            .map(|(id, _)| *id)
    }
}

enum Admit {
    Yes(u64, Arc<Conn>),
    PerSource,
    Full,
}

/// The live connection table.
struct Conns {
    table: Mutex<Table>,
    limits: HttpLimits,
}

impl Conns {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit(&self, source: SourceKey, now: Millis, stats: &HttpStats) -> Admit {
        let mut t = self.table();
        if t.per_source.get(&source).copied().unwrap_or(0) >= self.limits.per_source {
            return Admit::PerSource;
        }
        if t.conns.len() >= self.limits.max_connections {
            let Some(victim) = t.oldest_waiting() else { return Admit::Full };
            if let Some(e) = t.remove(victim) {
                e.conn.shed.notify_one();
                stats.shed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let conn =
            Arc::new(Conn { busy: AtomicBool::new(false), since: AtomicU64::new(now), shed: Notify::new() });
        t.next += 1;
        let id = t.next;
        t.conns.insert(id, Entry { source, conn: conn.clone() });
        *t.per_source.entry(source).or_insert(0) += 1;
        Admit::Yes(id, conn)
    }
}

/// Writes one summary line per [`LOG_EVERY_MS`] about what was refused, instead of a line per
/// refusal (a flood must not become a flood of logs).
#[derive(Default)]
pub struct RefusalLog {
    last: Option<Millis>,
    counts: [u64; 4],
}

impl RefusalLog {
    pub const PER_SOURCE: usize = 0;
    pub const FULL: usize = 1;
    pub const SHED: usize = 2;
    pub const ACCEPT_ERROR: usize = 3;

    pub fn note(&mut self, what: &str, kind: usize, now: Millis) {
        self.counts[kind] += 1;
        if self.last.is_some_and(|l| now.saturating_sub(l) < LOG_EVERY_MS) {
            return;
        }
        self.last = Some(now);
        let [per_source, full, shed, accept_errors] = std::mem::take(&mut self.counts);
        tracing::warn!(
            per_source,
            full,
            shed,
            accept_errors,
            window_secs = LOG_EVERY_MS / 1000,
            "{what}: connections refused or shed (counts since the last such line)"
        );
    }
}

/// Resolves once the flag is true (or its sender is gone).
async fn until_set(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Serves `router` until `stop` turns true, then lets open requests finish. Accept errors (out
/// of file descriptors and the like) never end the loop: it backs off and tries again.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    stats: Arc<HttpStats>,
    clock: Clock,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let conns = Arc::new(Conns { table: Mutex::new(Table::default()), limits });
    stats.max_connections.store(limits.max_connections as u64, Ordering::Relaxed);
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut log = RefusalLog::default();
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => { backoff = Duration::from_millis(5); c }
                Err(_) => {
                    stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    log.note("API", RefusalLog::ACCEPT_ERROR, clock.now());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                    continue;
                }
            },
            _ = until_set(&mut stop) => break,
        };
        let shed_before = stats.shed.load(Ordering::Relaxed);
        let (id, conn) = match conns.admit(SourceKey::of(peer.ip()), clock.now(), &stats) {
            Admit::Yes(id, conn) => (id, conn),
            Admit::PerSource => {
                stats.refused_per_source.fetch_add(1, Ordering::Relaxed);
                log.note("API", RefusalLog::PER_SOURCE, clock.now());
                continue;
            }
            Admit::Full => {
                stats.refused_full.fetch_add(1, Ordering::Relaxed);
                log.note("API", RefusalLog::FULL, clock.now());
                continue;
            }
        };
        if stats.shed.load(Ordering::Relaxed) != shed_before {
            log.note("API", RefusalLog::SHED, clock.now());
        }
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let mut closing = closing_rx.clone();
        let conns = conns.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_conn(stream, peer, router, conn.clone(), limits, clock, &mut closing).await,
                Some(acceptor) => {
                    // The TLS handshake counts against the header deadline, like a slow request.
                    let accepted = tokio::select! {
                        r = tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)) => r.ok().and_then(Result::ok),
                        _ = conn.shed.notified() => None,
                    };
                    if let Some(tls_stream) = accepted {
                        serve_conn(tls_stream, peer, router, conn.clone(), limits, clock, &mut closing).await;
                    }
                }
            }
            conns.table().remove(id);
        });
    }
    let _ = closing_tx.send(true);
    Ok(())
}

/// Serves HTTP/1.1 on one connection (plain or TLS) until it ends, is shed, or the server stops.
async fn serve_conn<S>(
    stream: S,
    peer: SocketAddr,
    router: Router,
    conn: Arc<Conn>,
    limits: HttpLimits,
    clock: Clock,
    closing: &mut watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc_conn = conn.clone();
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let c = svc_conn.clone();
        let has_body = req.headers().get(hyper::header::CONTENT_LENGTH).is_some_and(|v| v != "0")
            || req.headers().contains_key(hyper::header::TRANSFER_ENCODING);
        // A request without a body is complete once its headers are in; one with a body
        // is complete when its handler has read it.
        c.busy.store(!has_body, Ordering::Relaxed);
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(Progress(c.clone()));
        let fut = router.clone().oneshot(req.map(axum::body::Body::new));
        async move {
            let r = fut.await;
            c.since.store(clock.now(), Ordering::Relaxed);
            c.busy.store(false, Ordering::Relaxed);
            r
        }
    });
    let http = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(http);
    tokio::select! {
        _ = http.as_mut() => {}
        _ = conn.shed.notified() => {}
        _ = until_set(closing) => {
            http.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
        }
    }
}

/// The peer address, for handlers (`ConnectInfo` is inserted per request by [`serve`]).
pub type Peer = ConnectInfo<SocketAddr>;

#[cfg(test)]
mod tests {
    use super::*;

    fn conns(max: usize, per_source: usize) -> Conns {
        Conns {
            table: Mutex::new(Table::default()),
            limits: HttpLimits { max_connections: max, per_source, header_timeout: Duration::from_secs(1) },
        }
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        let a = SourceKey::of("2001:db8:1:2::1".parse().unwrap());
        let b = SourceKey::of("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = SourceKey::of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            SourceKey::of("::ffff:192.0.2.1".parse().unwrap()),
            SourceKey::of("192.0.2.1".parse().unwrap())
        );
    }

    #[test]
    fn per_source_cap_then_shed_oldest_waiting_never_busy() {
        let stats = HttpStats::default();
        let c = conns(3, 2);
        let a = SourceKey::of("192.0.2.1".parse().unwrap());
        let b = SourceKey::of("192.0.2.2".parse().unwrap());
        let Admit::Yes(first, first_conn) = c.admit(a, 0, &stats) else { panic!() };
        assert!(matches!(c.admit(a, 1, &stats), Admit::Yes(..)));
        assert!(matches!(c.admit(a, 2, &stats), Admit::PerSource));
        let Admit::Yes(_, busy) = c.admit(b, 3, &stats) else { panic!() };
        busy.busy.store(true, Ordering::Relaxed);
        // Full: the oldest waiting connection (the first) makes room.
        assert!(matches!(c.admit(b, 4, &stats), Admit::Yes(..)));
        assert!(!c.table().conns.contains_key(&first));
        assert_eq!(stats.shed.load(Ordering::Relaxed), 1);
        drop(first_conn);
        // Mark everything busy: nothing may be shed, the newcomer is refused.
        for e in c.table().conns.values() {
            e.conn.busy.store(true, Ordering::Relaxed);
        }
        assert!(matches!(c.admit(SourceKey::of("192.0.2.3".parse().unwrap()), 5, &stats), Admit::Full));
    }
}
