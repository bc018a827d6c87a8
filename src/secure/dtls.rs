//! DTLS 1.2 with pre-shared keys on the relay port: one [`DtlsLayer`] per shard.
//!
//! OpenSSL does the cryptography and the handshake state machine; it never touches a socket.
//! Each session's BIO is a [`Pipe`]: one `read` is one received datagram, one `write` is one
//! datagram to send. The shard lends the pipe its buffers for the duration of a call (a swap of
//! three `Vec`s), so an idle session holds no I/O buffers at all.
//!
//! Rules (`docs/protocol.md`, "DTLS"):
//! - A ClientHello from an unknown address gets a stateless HelloVerifyRequest (`DTLSv1_listen`
//!   with an HMAC cookie over the address and a 30-second time bucket). Only a ClientHello
//!   carrying a valid cookie creates a session, within caps on half-open sessions per shard and
//!   per source IP.
//! - The PSK is the allocation's 64-byte key, found from the identity: the 16 raw ID bytes or the
//!   UUID text. The identity is read from the ClientKeyExchange before OpenSSL sees it (OpenSSL
//!   would cut a binary identity at a zero byte), and the key is derived from the ID
//!   ([`crate::core::allocation_key`]), so any shard can complete any handshake.
//! - DTLS 1.2 only, AEAD PSK suites only, no session cache, no tickets, no renegotiation.
//! - Nothing is ever answered to garbage, to a record from an unknown address other than a
//!   ClientHello, or to a ClientHello on an established session (Unity Transport 2.x probes with
//!   one after 2 s of silence, and disconnects if it gets an alert back).
//!
//! OpenSSL keeps its own retransmission timer (1 s doubling to 60 s); [`DtlsLayer::poll`] drives
//! it from the shard's loop, and every other deadline (handshake and idle expiry, cookie buckets)
//! comes from the shard's clock.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};

use foreign_types::ForeignTypeRef;
use openssl::error::ErrorStack;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslSessionCacheMode, SslStream, SslVersion,
};

use super::record;
use super::records::{Records, Suite};
use crate::clock::Millis;
use crate::wire::AllocationId;

/// Record overhead of the AEAD suites Ferry offers (header 13, explicit nonce 8, tag 16): what
/// Unity Transport reserves per record when it talks to a relay.
pub const RECORD_OVERHEAD: usize = 37;
/// The smallest ClientHello that is answered: a HelloVerifyRequest (13 + 12 + 3 + cookie) must
/// never be larger than what caused it.
const MIN_HELLO: usize = 13 + 12 + 3 + COOKIE_LEN;
const COOKIE_LEN: usize = 20;
/// The cookie's time bucket: a cookie is good for one to two buckets.
const COOKIE_BUCKET_MS: u64 = 30_000;
const CIPHERS: &str =
    "PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-AES128-CCM:PSK-AES256-CCM:PSK-CHACHA20-POLY1305";

/// Tunables of the DTLS layer of one shard.
#[derive(Clone, Debug)]
pub struct DtlsConfig {
    /// Largest datagram sent to a DTLS client (Unity Transport's default receive size).
    pub mtu: u16,
    /// Sessions past the cookie exchange but not yet established, per shard.
    pub max_halfopen: usize,
    /// The same, per source IP.
    pub max_halfopen_per_ip: u16,
    /// Established sessions per shard.
    pub max_sessions: usize,
    /// A handshake not finished in this long is dropped.
    pub handshake_timeout: Millis,
    /// An established session that has received nothing for this long is dropped.
    pub idle_timeout: Millis,
}

impl Default for DtlsConfig {
    fn default() -> Self {
        Self {
            mtu: 1400,
            max_halfopen: 4096,
            max_halfopen_per_ip: 16,
            max_sessions: 1 << 20,
            handshake_timeout: 15_000,
            idle_timeout: 60_000,
        }
    }
}

impl DtlsConfig {
    /// Largest Relay message that fits one record for a DTLS client.
    pub fn max_plaintext(&self) -> usize {
        self.mtu as usize - RECORD_OVERHEAD
    }
}

/// Counters of one shard's DTLS layer (`ferry_dtls_*` metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DtlsStats {
    pub hello_verify_sent: u64,
    pub handshakes_started: u64,
    pub handshakes_completed: u64,
    /// Handshakes that failed (wrong PSK, unknown identity, bad messages).
    pub handshakes_failed: u64,
    pub handshakes_timed_out: u64,
    /// ClientHellos with a valid cookie refused by the half-open or session caps.
    pub refused_capacity: u64,
    /// ClientHellos dropped without an answer because the address has an established session.
    pub stray_hellos: u64,
    /// Datagrams that are not well-formed DTLS records.
    pub bad_records: u64,
    /// Records from an address with no session that are not a ClientHello.
    pub no_session: u64,
    /// ClientHellos that OpenSSL's listener refused (bad cookie, bad version, too small).
    pub hellos_refused: u64,
    /// Application records that did not decrypt or were not accepted.
    pub records_refused: u64,
    /// Plain Relay messages from an address that has a DTLS session (never accepted).
    pub plaintext_on_secure: u64,
    /// Relay messages not sent to a DTLS client because they would not fit its MTU.
    pub oversize: u64,
    pub closed_by_peer: u64,
    /// Established sessions whose records Ferry protects itself (OpenSSL's session freed).
    pub offloaded: u64,
    /// Final flights sent again after the handshake (the client had not got them).
    pub final_flight_resent: u64,
    pub idle_expired: u64,
    pub migrated_out: u64,
    pub migrated_in: u64,
    pub sessions: u64,
    pub halfopen: u64,
}

thread_local! {
    /// What OpenSSL's callbacks need to know about the call in progress on this thread.
    static CALL: Cell<CallContext> = const { Cell::new(CallContext { now: 0, peer: None, psk: None }) };
}

#[derive(Clone, Copy)]
struct CallContext {
    now: Millis,
    peer: Option<SocketAddr>,
    psk: Option<[u8; 64]>,
}

/// A datagram-preserving BIO: one read is one datagram, one write is one datagram.
#[derive(Default, Debug)]
pub struct Pipe {
    rx: Vec<u8>,
    rx_full: bool,
    tx: Vec<u8>,
    tx_ends: Vec<usize>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.rx_full {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.rx_full = false;
        let n = self.rx.len().min(buf.len());
        buf[..n].copy_from_slice(&self.rx[..n]);
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx.extend_from_slice(buf);
        self.tx_ends.push(self.tx.len());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Handshaking { since: Millis },
    Established,
}

/// One client's DTLS session. `Send`, so a shard can hand it to the shard that owns its
/// allocation.
pub struct Session {
    /// OpenSSL's session: through the handshake, and after it for a suite Ferry does not take
    /// over.
    stream: Option<SslStream<Pipe>>,
    /// The record layer Ferry runs itself once the handshake is done (AEAD suites).
    records: Option<Box<Records>>,
    /// The server's final flight (ChangeCipherSpec, Finished), sent again if the client repeats
    /// its own (it did not get ours) until its first application record arrives.
    last_flight: Option<Box<[u8]>>,
    resent_at: Millis,
    phase: Phase,
    last_rx: Millis,
    /// The allocation named by the PSK identity, once the handshake has read it.
    id: Option<AllocationId>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("phase", &self.phase).field("id", &self.id).finish()
    }
}

/// What a received DTLS datagram came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// Application records decrypted into the caller's buffer; [`DtlsLayer::records`] gives
    /// their bounds.
    Records,
    /// The handshake moved on (answers, if any, are queued in [`DtlsLayer::poll_transmit`]).
    Handshake,
    /// The handshake just finished for this allocation.
    Established(Option<AllocationId>),
    /// Nothing to do; counted.
    Dropped,
}

/// What sealing a message for a destination came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sealed {
    /// The destination has no DTLS session: send the message as it is.
    Plain,
    /// The record is `out[..n]`.
    Record(usize),
    /// Too large for the destination's MTU, or the session failed; not sent, counted.
    Refused,
}

/// The DTLS sessions of one shard.
pub struct DtlsLayer {
    ctx: SslContext,
    secret: [u8; 64],
    /// In a fleet, allocation keys derive from the fleet's relay keys instead of `secret`.
    fleet: Option<crate::core::FleetRelay>,
    cfg: DtlsConfig,
    sessions: HashMap<SocketAddr, Session>,
    halfopen_per_ip: HashMap<IpAddr, u16>,
    listener: Option<SslStream<Pipe>>,
    cookie_key: crate::auth::PreKeyedHmac,
    lent: Pipe,
    ends: Vec<(usize, usize)>,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    next_poll: Millis,
    next_sweep: Millis,
    stats: DtlsStats,
}

impl std::fmt::Debug for DtlsLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtlsLayer").field("sessions", &self.sessions.len()).finish()
    }
}

/// The server context every shard shares: DTLS 1.2, AEAD PSK suites, cookies, PSK from the
/// call context.
pub fn server_context(secret: &[u8; 64]) -> Result<SslContext, ErrorStack> {
    let mut b = SslContext::builder(SslMethod::dtls_server())?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_cipher_list(CIPHERS)?;
    b.set_options(
        SslOptions::CIPHER_SERVER_PREFERENCE
            | SslOptions::NO_TICKET
            | SslOptions::NO_RENEGOTIATION
            | SslOptions::NO_QUERY_MTU
            | SslOptions::COOKIE_EXCHANGE,
    );
    // No RELEASE_BUFFERS: sessions on the suites Ferry protects itself free OpenSSL's session
    // right after the handshake, and releasing buffers mid-handshake only costs allocations.
    // Records never exceed a datagram: size the write buffer for one (OpenSSL's default is 16 KiB
    // per session).
    // SAFETY: a live context; SSL_CTRL_SET_MAX_SEND_FRAGMENT takes a length and no pointer.
    unsafe {
        openssl_sys::SSL_CTX_ctrl(b.as_ptr(), SSL_CTRL_SET_MAX_SEND_FRAGMENT, 1472, std::ptr::null_mut());
    }
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    let cookie_key = cookie_key(secret);
    let verify_key = cookie_key;
    b.set_cookie_generate_cb(move |_, out| {
        let c = CALL.with(|c| c.get());
        let cookie = cookie(&cookie_key, c.peer, c.now / COOKIE_BUCKET_MS);
        out[..COOKIE_LEN].copy_from_slice(&cookie);
        Ok(COOKIE_LEN)
    });
    b.set_cookie_verify_cb(move |_, got| {
        let c = CALL.with(|c| c.get());
        let bucket = c.now / COOKIE_BUCKET_MS;
        [bucket, bucket.saturating_sub(1)]
            .iter()
            .any(|&t| subtle::ConstantTimeEq::ct_eq(&cookie(&verify_key, c.peer, t)[..], got).into())
    });
    b.set_psk_server_callback(|_, _identity, out| match CALL.with(|c| c.get()).psk {
        Some(k) if out.len() >= k.len() => {
            out[..k.len()].copy_from_slice(&k);
            Ok(k.len())
        }
        // An unknown identity: OpenSSL answers with an unknown_psk_identity alert.
        _ => Ok(0),
    });
    Ok(b.build())
}

fn cookie_key(secret: &[u8; 64]) -> crate::auth::PreKeyedHmac {
    crate::auth::PreKeyedHmac::new(&derive(secret, b"ferry dtls cookie"))
}

fn derive(secret: &[u8; 64], label: &[u8]) -> [u8; 64] {
    let m = crate::auth::PreKeyedHmac::new(secret).mac(label);
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(&m);
    k
}

fn cookie(key: &crate::auth::PreKeyedHmac, peer: Option<SocketAddr>, bucket: u64) -> [u8; COOKIE_LEN] {
    let mut msg = [0u8; 8 + 16 + 2];
    msg[..8].copy_from_slice(&bucket.to_be_bytes());
    if let Some(p) = peer {
        let ip = match crate::core::canonical_ip(p.ip()) {
            IpAddr::V4(a) => a.to_ipv6_mapped(),
            IpAddr::V6(a) => a,
        };
        msg[8..24].copy_from_slice(&ip.octets());
        msg[24..].copy_from_slice(&p.port().to_be_bytes());
    }
    let mac = key.mac(&msg);
    let mut c = [0u8; COOKIE_LEN];
    c.copy_from_slice(&mac[..COOKIE_LEN]);
    c
}

/// The record layer of a finished handshake, when its suite is one Ferry protects itself.
fn offload(stream: &SslStream<Pipe>) -> Option<Records> {
    let ssl = stream.ssl();
    let suite = Suite::from_openssl(ssl.current_cipher()?.name())?;
    let mut master = [0u8; 48];
    let n = ssl.session()?.master_key(&mut master);
    let (mut cr, mut sr) = ([0u8; 32], [0u8; 32]);
    if n != 48 || ssl.client_random(&mut cr) != 32 || ssl.server_random(&mut sr) != 32 {
        return None;
    }
    Records::server(suite, &master, &cr, &sr)
}

extern "C" {
    fn DTLSv1_listen(s: *mut openssl_sys::SSL, client: *mut std::ffi::c_void) -> std::ffi::c_int;
    fn BIO_ADDR_new() -> *mut std::ffi::c_void;
    fn BIO_ADDR_free(a: *mut std::ffi::c_void);
}

const DTLS_CTRL_HANDLE_TIMEOUT: std::ffi::c_int = 74;
const SSL_CTRL_SET_MAX_SEND_FRAGMENT: std::ffi::c_int = 52;

impl DtlsLayer {
    /// Keys sessions' PSKs by a fleet's relay keys (and takes their rotations).
    pub fn set_fleet(&mut self, fleet: Option<crate::core::FleetRelay>) {
        self.fleet = fleet;
    }

    pub fn new(ctx: SslContext, secret: [u8; 64], cfg: DtlsConfig) -> Self {
        Self {
            ctx,
            secret,
            fleet: None,
            cfg,
            sessions: HashMap::new(),
            halfopen_per_ip: HashMap::new(),
            listener: None,
            cookie_key: cookie_key(&secret),
            lent: Pipe::default(),
            ends: Vec::new(),
            transmits: VecDeque::new(),
            next_poll: 0,
            next_sweep: 0,
            stats: DtlsStats::default(),
        }
    }

    pub fn config(&self) -> &DtlsConfig {
        &self.cfg
    }

    /// Whether no session exists (the plain path then skips every DTLS check).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Whether `addr` has a session (established or not).
    #[inline]
    pub fn has(&self, addr: &SocketAddr) -> bool {
        !self.sessions.is_empty() && self.sessions.contains_key(addr)
    }

    pub fn stats(&self) -> DtlsStats {
        let mut s = self.stats.clone();
        s.sessions = self.sessions.len() as u64;
        s.halfopen = self.halfopen_per_ip.values().map(|&n| n as u64).sum();
        s
    }

    pub fn count_plaintext_on_secure(&mut self) {
        self.stats.plaintext_on_secure += 1;
    }

    /// Bounds of the application records the last [`receive`](Self::receive) decrypted.
    pub fn records(&self) -> &[(usize, usize)] {
        &self.ends
    }

    /// The next handshake datagram to send.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// Takes a DTLS datagram from `src`. Decrypted application records land in `plain` (see
    /// [`records`](Self::records)).
    pub fn receive(&mut self, now: Millis, src: SocketAddr, d: &[u8], plain: &mut [u8]) -> Received {
        self.ends.clear();
        if !record::well_formed(d) {
            self.stats.bad_records += 1;
            return Received::Dropped;
        }
        let Some(mut s) = self.sessions.remove(&src) else {
            return self.listen(now, src, d);
        };
        let (out, keep) = self.feed(now, src, &mut s, d, plain);
        if keep {
            self.sessions.insert(src, s);
        }
        out
    }

    /// Feeds `d` to `s`; the flag says whether the session lives on.
    fn feed(
        &mut self,
        now: Millis,
        src: SocketAddr,
        s: &mut Session,
        d: &[u8],
        plain: &mut [u8],
    ) -> (Received, bool) {
        if s.phase == Phase::Established && record::is_client_hello(d) {
            self.stats.stray_hellos += 1;
            return (Received::Dropped, true);
        }
        if s.records.is_some() {
            return self.feed_offloaded(now, src, s, d, plain);
        }
        let Some(mut stream) = s.stream.take() else { return (Received::Dropped, false) };
        let mut psk = None;
        if let Some(identity) = record::psk_identity(d) {
            let id = record::identity_id(identity);
            s.id = id;
            psk = match &self.fleet {
                Some(f) => id.and_then(|id| f.allocation_key(&id)),
                None => id.map(|id| crate::core::allocation_key(&self.secret, &id)),
            };
        }
        CALL.with(|c| c.set(CallContext { now, peer: Some(src), psk }));
        self.lend(&mut stream, d);
        let mut finished = false;
        let out = match s.phase {
            Phase::Handshaking { .. } => match stream.do_handshake() {
                Ok(()) => {
                    s.phase = Phase::Established;
                    s.last_rx = now;
                    self.halfopen_done(src.ip());
                    self.stats.handshakes_completed += 1;
                    finished = true;
                    // Application data may ride in the same datagram as the Finished message.
                    let open = self.read_records(&mut stream, plain);
                    (Received::Established(s.id), open)
                }
                Err(e) if e.code() == ErrorCode::WANT_READ => (Received::Handshake, true),
                Err(_) => {
                    // Its alert (if any) is queued; the session is forgotten.
                    self.stats.handshakes_failed += 1;
                    self.halfopen_done(src.ip());
                    (Received::Dropped, false)
                }
            },
            Phase::Established => {
                s.last_rx = now;
                let open = self.read_records(&mut stream, plain);
                (if self.ends.is_empty() { Received::Dropped } else { Received::Records }, open)
            }
        };
        let queued = self.transmits.len();
        self.take_back(src, &mut stream);
        if finished {
            if let Some(r) = offload(&stream) {
                // What take_back just queued is the final flight; OpenSSL's session is freed.
                let flight: Vec<u8> =
                    self.transmits.range(queued..).flat_map(|(_, d)| d.iter().copied()).collect();
                s.records = Some(Box::new(r));
                s.last_flight = Some(flight.into_boxed_slice());
                self.stats.offloaded += 1;
                return out;
            }
        }
        s.stream = Some(stream);
        out
    }

    /// An established session on a suite Ferry protects itself.
    fn feed_offloaded(
        &mut self,
        now: Millis,
        src: SocketAddr,
        s: &mut Session,
        d: &[u8],
        plain: &mut [u8],
    ) -> (Received, bool) {
        let Some(rec) = s.records.as_mut() else { return (Received::Dropped, false) };
        let (mut at, mut resend, mut open) = (0, false, true);
        for r in record::Records::new(d) {
            match r.content_type {
                // The client repeats its final flight: ours was lost.
                record::HANDSHAKE | record::CHANGE_CIPHER_SPEC => resend = s.last_flight.is_some(),
                _ => match rec.open(&r, &mut plain[at..]) {
                    Ok(o) if o.content_type == record::APPLICATION_DATA => {
                        self.ends.push((at, at + o.len));
                        at += o.len;
                        s.last_flight = None;
                        s.last_rx = now;
                    }
                    Ok(o) => {
                        // An alert: a close_notify or any fatal alert ends the session.
                        let (level, desc) = (plain.get(at).copied(), plain.get(at + 1).copied());
                        if o.len == 2 && (level == Some(2) || desc == Some(0)) {
                            self.stats.closed_by_peer += 1;
                            open = false;
                        }
                    }
                    Err(_) => self.stats.records_refused += 1,
                },
            }
        }
        // The address is proven (cookie exchange); resends are still paced, so a spoofed
        // record cannot turn into a stream of them.
        if let (true, Some(f)) = (resend, &s.last_flight) {
            if now >= s.resent_at + 500 {
                s.resent_at = now;
                self.stats.final_flight_resent += 1;
                self.transmits.push_back((src, f.to_vec()));
            }
        }
        (if self.ends.is_empty() { Received::Dropped } else { Received::Records }, open)
    }

    /// Reads every application record OpenSSL has into `plain` (bounds in `self.ends`). False
    /// once the peer has closed the session.
    fn read_records(&mut self, stream: &mut SslStream<Pipe>, plain: &mut [u8]) -> bool {
        let mut at = 0;
        loop {
            match stream.ssl_read(&mut plain[at..]) {
                Ok(n) => {
                    self.ends.push((at, at + n));
                    at += n;
                    if at >= plain.len() {
                        break;
                    }
                }
                Err(e) if e.code() == ErrorCode::WANT_READ => break,
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                    self.stats.closed_by_peer += 1;
                    return false;
                }
                Err(_) => {
                    self.stats.records_refused += 1;
                    break;
                }
            }
        }
        true
    }

    fn listen(&mut self, now: Millis, src: SocketAddr, d: &[u8]) -> Received {
        if !record::is_client_hello(d) {
            self.stats.no_session += 1;
            return Received::Dropped;
        }
        if d.len() < MIN_HELLO {
            self.stats.hellos_refused += 1;
            return Received::Dropped;
        }
        // A first ClientHello (no cookie yet) is answered here, statelessly, with the cookie
        // OpenSSL's listener will verify: cheaper than running the listener for it.
        if let Some((seq, c)) = record::client_hello_cookie(d).filter(|(_, c)| c.is_empty()) {
            debug_assert!(c.is_empty());
            let cookie = cookie(&self.cookie_key, Some(src), now / COOKIE_BUCKET_MS);
            let mut hvr = Vec::with_capacity(MIN_HELLO);
            record::hello_verify_request(&seq, &cookie, &mut hvr);
            self.transmits.push_back((src, hvr));
            self.stats.hello_verify_sent += 1;
            return Received::Dropped;
        }
        let mut l = match self.listener.take() {
            Some(l) => l,
            None => match Ssl::new(&self.ctx).and_then(|mut ssl| {
                ssl.set_mtu(self.cfg.mtu as u32)?;
                SslStream::new(ssl, Pipe::default())
            }) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "could not create a DTLS session");
                    return Received::Dropped;
                }
            },
        };
        CALL.with(|c| c.set(CallContext { now, peer: Some(src), psk: None }));
        self.lend(&mut l, d);
        // SAFETY: `l` owns a live SSL; the BIO_ADDR is freshly allocated and freed below.
        let r = unsafe {
            let addr = BIO_ADDR_new();
            let r = DTLSv1_listen(l.ssl().as_ptr(), addr);
            BIO_ADDR_free(addr);
            r
        };
        if r <= 0 {
            let answered = !l.get_mut().tx_ends.is_empty();
            self.take_back(src, &mut l);
            self.listener = Some(l);
            if answered {
                self.stats.hello_verify_sent += 1;
            } else {
                self.stats.hellos_refused += 1;
            }
            return Received::Dropped;
        }
        let ip = crate::core::canonical_ip(src.ip());
        let per_ip = self.halfopen_per_ip.get(&ip).copied().unwrap_or(0);
        let halfopen: usize = self.halfopen_per_ip.values().map(|&n| n as usize).sum();
        if per_ip >= self.cfg.max_halfopen_per_ip
            || halfopen >= self.cfg.max_halfopen
            || self.sessions.len() >= self.cfg.max_sessions
        {
            self.stats.refused_capacity += 1;
            self.lent.tx.clear();
            self.lent.tx_ends.clear();
            self.take_back(src, &mut l);
            // The listener is not reusable once it accepted a hello; a fresh one is made next time.
            return Received::Dropped;
        }
        *self.halfopen_per_ip.entry(ip).or_insert(0) += 1;
        self.stats.handshakes_started += 1;
        let r = l.do_handshake();
        self.take_back(src, &mut l);
        match r {
            Err(e) if e.code() == ErrorCode::WANT_READ => {
                let s = Session {
                    stream: Some(l),
                    records: None,
                    last_flight: None,
                    resent_at: 0,
                    phase: Phase::Handshaking { since: now },
                    last_rx: now,
                    id: None,
                };
                self.sessions.insert(src, s);
                self.next_poll = self.next_poll.min(now + 100);
                Received::Handshake
            }
            _ => {
                self.stats.handshakes_failed += 1;
                self.halfopen_done(src.ip());
                Received::Dropped
            }
        }
    }

    fn halfopen_done(&mut self, ip: IpAddr) {
        let ip = crate::core::canonical_ip(ip);
        if let Some(n) = self.halfopen_per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.halfopen_per_ip.remove(&ip);
            }
        }
    }

    /// Gives `stream`'s pipe the shard's buffers, holding `d` as the next datagram to read.
    fn lend(&mut self, stream: &mut SslStream<Pipe>, d: &[u8]) {
        self.lent.rx.clear();
        self.lent.rx.extend_from_slice(d);
        self.lent.rx_full = true;
        std::mem::swap(stream.get_mut(), &mut self.lent);
    }

    /// Takes the buffers back, queueing what OpenSSL wrote as datagrams to `to`.
    fn take_back(&mut self, to: SocketAddr, stream: &mut SslStream<Pipe>) {
        std::mem::swap(stream.get_mut(), &mut self.lent);
        let p = &mut self.lent;
        let mut from = 0;
        for &end in &p.tx_ends {
            self.transmits.push_back((to, p.tx[from..end].to_vec()));
            from = end;
        }
        p.tx.clear();
        p.tx_ends.clear();
        p.rx_full = false;
    }

    /// Encrypts `msg` for `dst` into `out` when `dst` has an established session.
    pub fn seal(&mut self, dst: &SocketAddr, msg: &[u8], out: &mut [u8]) -> Sealed {
        let Some(s) = self.sessions.get_mut(dst) else { return Sealed::Plain };
        if s.phase != Phase::Established || msg.len() > self.cfg.max_plaintext() {
            self.stats.oversize += 1;
            return Sealed::Refused;
        }
        if let Some(r) = &mut s.records {
            return match r.seal(msg, out) {
                Some(n) => Sealed::Record(n),
                None => {
                    self.stats.oversize += 1;
                    Sealed::Refused
                }
            };
        }
        let Some(stream) = s.stream.as_mut() else { return Sealed::Refused };
        std::mem::swap(stream.get_mut(), &mut self.lent);
        let r = stream.ssl_write(msg);
        std::mem::swap(stream.get_mut(), &mut self.lent);
        let p = &mut self.lent;
        let n = p.tx.len();
        let sealed = match r {
            Ok(_) if p.tx_ends.len() == 1 && n <= out.len() => {
                out[..n].copy_from_slice(&p.tx);
                Sealed::Record(n)
            }
            _ => {
                self.stats.oversize += 1;
                Sealed::Refused
            }
        };
        p.tx.clear();
        p.tx_ends.clear();
        sealed
    }

    /// Retransmits handshake flights whose timer ran out and drops expired sessions. Cheap to
    /// call every loop turn: it does its work at most every 100 ms.
    /// Returns whether this call was a sweep (once a second), when the shard sweeps what it
    /// keeps for the layer too.
    pub fn poll(&mut self, now: Millis) -> bool {
        if now < self.next_poll {
            return false;
        }
        // While handshakes are in progress, every 100 ms (retransmissions); otherwise only the
        // once-a-second sweep for idle sessions, so thousands of quiet sessions cost little.
        let halfopen = !self.halfopen_per_ip.is_empty();
        self.next_poll = now + if halfopen { 100 } else { 1000 };
        let sweep = now >= self.next_sweep;
        if sweep {
            self.next_sweep = now + 1000;
        }
        if self.sessions.is_empty() || !(halfopen || sweep) {
            return sweep;
        }
        let (hs_timeout, idle) = (self.cfg.handshake_timeout, self.cfg.idle_timeout);
        let mut expired = Vec::new();
        let mut retransmit = Vec::new();
        for (addr, s) in &self.sessions {
            match s.phase {
                Phase::Handshaking { since } if now.saturating_sub(since) >= hs_timeout => {
                    expired.push((*addr, true))
                }
                Phase::Handshaking { .. } => retransmit.push(*addr),
                Phase::Established if now.saturating_sub(s.last_rx) >= idle => expired.push((*addr, false)),
                Phase::Established => {}
            }
        }
        for (addr, handshaking) in expired {
            self.sessions.remove(&addr);
            if handshaking {
                self.stats.handshakes_timed_out += 1;
                self.halfopen_done(addr.ip());
            } else {
                self.stats.idle_expired += 1;
            }
        }
        for addr in retransmit {
            let Some(mut s) = self.sessions.remove(&addr) else { continue };
            if let Some(stream) = s.stream.as_mut() {
                std::mem::swap(stream.get_mut(), &mut self.lent);
                // SAFETY: the SSL is live; DTLS_CTRL_HANDLE_TIMEOUT takes no argument.
                unsafe {
                    openssl_sys::SSL_ctrl(
                        stream.ssl().as_ptr(),
                        DTLS_CTRL_HANDLE_TIMEOUT,
                        0,
                        std::ptr::null_mut(),
                    );
                }
                self.take_back(addr, stream);
            }
            self.sessions.insert(addr, s);
        }
        sweep
    }

    /// When [`poll`](Self::poll) next has work, if any session exists.
    pub fn poll_timeout(&self) -> Option<Millis> {
        (!self.sessions.is_empty()).then_some(self.next_poll)
    }

    /// Hands an established session over (to the shard that owns its allocation).
    pub fn take(&mut self, addr: &SocketAddr) -> Option<Box<Session>> {
        let s = self.sessions.remove(addr)?;
        self.stats.migrated_out += 1;
        Some(Box::new(s))
    }

    /// Takes a session another shard established.
    pub fn adopt(&mut self, addr: SocketAddr, s: Session) {
        self.stats.migrated_in += 1;
        self.sessions.insert(addr, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::ssl::SslContextBuilder;

    const SECRET: [u8; 64] = [5; 64];
    const ID: [u8; 16] = [0x11; 16];

    fn client(id: &'static [u8], key: [u8; 64]) -> SslStream<Pipe> {
        let mut b: SslContextBuilder = SslContext::builder(SslMethod::dtls_client()).unwrap();
        b.set_cipher_list("PSK-AES128-GCM-SHA256").unwrap();
        b.set_options(SslOptions::NO_QUERY_MTU);
        b.set_psk_client_callback(move |_, _, identity, psk| {
            identity[..id.len()].copy_from_slice(id);
            identity[id.len()] = 0;
            psk[..64].copy_from_slice(&key);
            Ok(64)
        });
        let mut ssl = Ssl::new(&b.build()).unwrap();
        ssl.set_connect_state();
        ssl.set_mtu(1400).unwrap();
        SslStream::new(ssl, Pipe::default()).unwrap()
    }

    fn sent(c: &mut SslStream<Pipe>) -> Vec<Vec<u8>> {
        let p = c.get_mut();
        let mut out = Vec::new();
        let mut from = 0;
        for &e in &p.tx_ends {
            out.push(p.tx[from..e].to_vec());
            from = e;
        }
        p.tx.clear();
        p.tx_ends.clear();
        out
    }

    /// Runs the handshake to completion over the layer; returns what the layer said on the way.
    fn handshake(layer: &mut DtlsLayer, c: &mut SslStream<Pipe>, src: SocketAddr) -> Vec<Received> {
        let mut said = Vec::new();
        let mut plain = [0u8; 2048];
        for _ in 0..20 {
            let done = c.do_handshake().is_ok();
            for d in sent(c) {
                said.push(layer.receive(1000, src, &d, &mut plain));
            }
            if done && matches!(said.last(), Some(Received::Established(_)) | Some(Received::Records)) {
                break;
            }
            while let Some((to, d)) = layer.poll_transmit() {
                assert_eq!(to, src);
                let p = c.get_mut();
                p.rx = d;
                p.rx_full = true;
                let _ = c.do_handshake();
            }
        }
        said
    }

    #[test]
    fn cookie_then_psk_handshake_then_records_both_ways() {
        let mut layer = DtlsLayer::new(server_context(&SECRET).unwrap(), SECRET, DtlsConfig::default());
        let src: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let mut c = client(&ID, crate::core::allocation_key(&SECRET, &AllocationId(ID)));
        let said = handshake(&mut layer, &mut c, src);
        assert!(said.contains(&Received::Established(Some(AllocationId(ID)))), "{said:?}");
        let st = layer.stats();
        assert_eq!((st.hello_verify_sent, st.handshakes_completed, st.sessions, st.halfopen), (1, 1, 1, 0));

        c.ssl_write(b"relay message").unwrap();
        let d = sent(&mut c).remove(0);
        assert_eq!(d.len(), 13 + RECORD_OVERHEAD);
        let mut plain = [0u8; 2048];
        assert_eq!(layer.receive(2000, src, &d, &mut plain), Received::Records);
        let (a, b) = layer.records()[0];
        assert_eq!(&plain[a..b], b"relay message");

        let mut out = [0u8; 1500];
        let Sealed::Record(n) = layer.seal(&src, b"answer", &mut out) else { panic!() };
        let p = c.get_mut();
        p.rx = out[..n].to_vec();
        p.rx_full = true;
        let mut got = [0u8; 64];
        let m = c.ssl_read(&mut got).unwrap();
        assert_eq!(&got[..m], b"answer");

        // The largest message that fits is sealed into exactly one MTU; one byte more is refused.
        let max = layer.config().max_plaintext();
        assert_eq!(layer.seal(&src, &vec![1; max], &mut out), Sealed::Record(1400));
        assert_eq!(layer.seal(&src, &vec![1; max + 1], &mut out), Sealed::Refused);
        assert_eq!(layer.seal(&"192.0.2.8:1".parse().unwrap(), b"x", &mut out), Sealed::Plain);
    }

    #[test]
    fn a_hello_on_an_established_session_and_garbage_get_no_answer() {
        let mut layer = DtlsLayer::new(server_context(&SECRET).unwrap(), SECRET, DtlsConfig::default());
        let src: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let mut c = client(&ID, crate::core::allocation_key(&SECRET, &AllocationId(ID)));
        handshake(&mut layer, &mut c, src);
        let mut probe = client(&ID, [0; 64]);
        let _ = probe.do_handshake();
        let hello = sent(&mut probe).remove(0);
        let mut plain = [0u8; 2048];
        assert_eq!(layer.receive(3000, src, &hello, &mut plain), Received::Dropped);
        assert_eq!(layer.receive(3000, src, &[22, 0xFE, 0xFD, 0, 0], &mut plain), Received::Dropped);
        assert_eq!(
            layer.receive(3000, "192.0.2.9:1".parse().unwrap(), &[23; 40], &mut plain),
            Received::Dropped
        );
        assert!(layer.poll_transmit().is_none());
        let st = layer.stats();
        assert_eq!((st.stray_hellos, st.bad_records, st.sessions), (1, 2, 1));
    }

    #[test]
    fn a_wrong_key_fails_the_handshake_and_frees_the_slot() {
        let mut layer = DtlsLayer::new(server_context(&SECRET).unwrap(), SECRET, DtlsConfig::default());
        let src: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let mut c = client(&ID, [9; 64]);
        let said = handshake(&mut layer, &mut c, src);
        assert!(!said.iter().any(|r| matches!(r, Received::Established(_))));
        // DTLS drops records that do not decrypt without a word (RFC 6347 §4.1.2.7): the
        // half-open session waits for its deadline, then goes.
        assert_eq!((layer.stats().sessions, layer.stats().halfopen), (1, 1));
        layer.poll(1000 + DtlsConfig::default().handshake_timeout);
        let st = layer.stats();
        assert_eq!((st.handshakes_timed_out, st.sessions, st.halfopen), (1, 0, 0));
    }
}
