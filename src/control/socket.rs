//! The relay's control socket: how an allocations service that runs apart from the relays
//! creates and releases allocations and reads counters. Served on a Unix socket (mode 0600) or on
//! loopback TCP with a challenge–response under a shared secret.
//!
//! Framing: every message is a u32 big-endian length, then that many bytes (at most 64 KiB).
//!
//! ```text
//! server hello   [version=1][auth required: 0|1][nonce: 32]
//! client auth    [HMAC-SHA256(SHA-256(secret), nonce): 32]      (only when required)
//! server         [0] accepted                                   (or the connection closes)
//! request        [op][args]   1 create host [max u16] · 2 create joiner [host id 16]
//!                             3 release [id 16] · 4 stats · 5 list allocations (JSON)
//!                             6 drain · 7 undrain · 8 status (JSON) · 9 reload
//! response       [status][body]   0 ok, else an error code (see `Status`)
//! create ok      [shard u16][id 16][key 64][connection data 255][port u16][host len u8][host]
//! stats ok       Prometheus text
//! ```

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::relay::{RelayError, RelayHandle};
use crate::auth::{AllocationKey, PreKeyedHmac, CONNECTION_DATA_LEN};
use crate::core::ControlError;
use crate::wire::AllocationId;

const VERSION: u8 = 1;
const MAX_FRAME: usize = 64 * 1024;
const OP_CREATE_HOST: u8 = 1;
const OP_CREATE_JOINER: u8 = 2;
const OP_RELEASE: u8 = 3;
const OP_STATS: u8 = 4;
const OP_LIST: u8 = 5;
const OP_DRAIN: u8 = 6;
const OP_UNDRAIN: u8 = 7;
const OP_STATUS: u8 = 8;
const OP_RELOAD: u8 = 9;

/// Response status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    Full = 1,
    MaxConnectionsOutOfRange = 2,
    HostNotFound = 3,
    SessionFull = 4,
    NotFound = 5,
    Unavailable = 6,
    BadRequest = 7,
}

impl Status {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Ok,
            1 => Self::Full,
            2 => Self::MaxConnectionsOutOfRange,
            3 => Self::HostNotFound,
            4 => Self::SessionFull,
            5 => Self::NotFound,
            6 => Self::Unavailable,
            _ => Self::BadRequest,
        }
    }

    fn from_relay(e: RelayError) -> Self {
        match e {
            RelayError::Control(ControlError::Full) => Self::Full,
            RelayError::Control(ControlError::MaxConnectionsOutOfRange) => Self::MaxConnectionsOutOfRange,
            RelayError::Control(ControlError::HostNotFound) => Self::HostNotFound,
            RelayError::Control(ControlError::SessionFull) => Self::SessionFull,
            RelayError::Control(ControlError::NotFound) => Self::NotFound,
            RelayError::Control(ControlError::WrongKey) => Self::BadRequest,
            RelayError::Unavailable | RelayError::Entropy => Self::Unavailable,
        }
    }
}

fn auth_key(secret: &str) -> PreKeyedHmac {
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(&Sha256::digest(secret.as_bytes()));
    PreKeyedHmac::new(&k)
}

/// What the server needs besides the relay.
#[derive(Clone)]
pub struct ControlServer {
    pub relay: RelayHandle,
    pub advertise: String,
    pub port: u16,
    /// `Some` on TCP: clients must prove they know it.
    pub secret: Option<Arc<str>>,
    /// Most connections open at once on one listener; more are closed on accept.
    pub max_connections: usize,
    /// The allocation service, for drain, undrain and status (absent: those answer Unavailable).
    pub service: Option<Arc<crate::control::service::AllocationService>>,
    pub clock: crate::clock::Clock,
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
    let len = r.read_u32().await? as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame too large"));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> io::Result<()> {
    w.write_u32(data.len() as u32).await?;
    w.write_all(data).await?;
    w.flush().await
}

impl ControlServer {
    /// Serves one connection until it closes.
    pub async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin>(&self, mut s: S) -> io::Result<()> {
        let mut nonce = [0u8; 32];
        getrandom::getrandom(&mut nonce).map_err(io::Error::other)?;
        let mut hello = vec![VERSION, self.secret.is_some() as u8];
        hello.extend_from_slice(&nonce);
        write_frame(&mut s, &hello).await?;
        if let Some(secret) = &self.secret {
            let proof = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut s))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no auth"))??;
            let want = auth_key(secret).mac(&nonce);
            if proof.len() != 32 || !bool::from(want.ct_eq(&proof)) {
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, "bad control secret"));
            }
            write_frame(&mut s, &[Status::Ok as u8]).await?;
        }
        loop {
            let req = match read_frame(&mut s).await {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            };
            let resp = self.handle(&req).await;
            write_frame(&mut s, &resp).await?;
        }
    }

    async fn handle(&self, req: &[u8]) -> Vec<u8> {
        let id_arg = |r: &[u8]| -> Option<AllocationId> {
            let mut id = AllocationId::default();
            id.0.copy_from_slice(r.get(1..17).filter(|_| r.len() == 17)?);
            Some(id)
        };
        let created = |res: Result<(usize, crate::core::Created), RelayError>| match res {
            Ok((shard, c)) => {
                let mut out = vec![Status::Ok as u8];
                out.extend_from_slice(&(shard as u16).to_be_bytes());
                out.extend_from_slice(&c.id.0);
                out.extend_from_slice(&c.key.0);
                out.extend_from_slice(&c.connection_data);
                out.extend_from_slice(&self.port.to_be_bytes());
                let host = self.advertise.as_bytes();
                out.push(host.len().min(255) as u8);
                out.extend_from_slice(&host[..host.len().min(255)]);
                out
            }
            Err(e) => vec![Status::from_relay(e) as u8],
        };
        match req.first().copied() {
            Some(OP_CREATE_HOST) if req.len() == 3 => {
                let max = u16::from_be_bytes([req[1], req[2]]);
                created(self.relay.create_host(max).await)
            }
            Some(OP_CREATE_JOINER) => match id_arg(req) {
                Some(host) => {
                    let shard = crate::core::owner_shard(&host, self.relay.shard_count() as u32) as usize;
                    created(self.relay.create_joiner(host).await.map(|c| (shard, c)))
                }
                None => vec![Status::BadRequest as u8],
            },
            Some(OP_RELEASE) => match id_arg(req) {
                Some(id) => match self.relay.release(id).await {
                    Ok(()) => vec![Status::Ok as u8],
                    Err(e) => vec![Status::from_relay(e) as u8],
                },
                None => vec![Status::BadRequest as u8],
            },
            Some(OP_LIST) if req.len() == 1 => {
                let mut out = vec![Status::Ok as u8];
                out.extend_from_slice(&serde_json::to_vec(&self.relay.list().await).unwrap_or_default());
                out
            }
            Some(op @ (OP_DRAIN | OP_UNDRAIN)) if req.len() == 1 => match &self.service {
                Some(s) => {
                    if op == OP_DRAIN {
                        s.start_draining();
                        tracing::info!("draining by control request: no new allocations");
                    } else {
                        s.stop_draining();
                        tracing::info!("undrained by control request: taking allocations again");
                    }
                    vec![Status::Ok as u8]
                }
                None => vec![Status::Unavailable as u8],
            },
            Some(OP_STATUS) if req.len() == 1 => {
                let stats = self.relay.stats().await;
                let mut total = crate::core::Stats::default();
                for s in &stats {
                    total.merge(&s.core);
                }
                let status = serde_json::json!({
                    "draining": self.service.as_ref().is_some_and(|s| s.is_draining()),
                    "shards": self.relay.shard_count(),
                    "shards_answering": stats.len(),
                    "allocations": stats.iter().map(|s| s.allocations).sum::<usize>(),
                    "allocations_per_shard": stats.iter().map(|s| s.allocations).collect::<Vec<_>>(),
                    "hosts": self.service.as_ref().map(|s| s.hosts()),
                    "packets_in": total.rx_packets,
                    "packets_forwarded": total.forwarded_packets,
                    "packets_dropped": total.drops.iter().sum::<u64>(),
                    "allocations_created": total.allocations_created,
                });
                let mut out = vec![Status::Ok as u8];
                out.extend_from_slice(status.to_string().as_bytes());
                out
            }
            // The same path as SIGHUP: the signal handler re-reads the configuration.
            Some(OP_RELOAD) if req.len() == 1 => {
                // SAFETY: raising a signal this process handles.
                if unsafe { libc::kill(libc::getpid(), libc::SIGHUP) } == 0 {
                    vec![Status::Ok as u8]
                } else {
                    vec![Status::Unavailable as u8]
                }
            }
            Some(OP_STATS) if req.len() == 1 => {
                let stats = self.relay.stats().await;
                let mut out = vec![Status::Ok as u8];
                out.extend_from_slice(crate::metrics::render(&stats, &Default::default(), 0).as_bytes());
                out
            }
            _ => vec![Status::BadRequest as u8],
        }
    }

    /// Binds a Unix socket at `path` (replacing a stale file) with mode 0600.
    pub fn bind_unix(path: &Path) -> io::Result<tokio::net::UnixListener> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "the path exists and is not a socket",
                ));
            }
            // A socket file that still accepts connections belongs to a live relay: never take it
            // over. One that refuses them was left behind by a relay that exited.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another running relay is serving this control socket",
                ));
            }
            std::fs::remove_file(path)?;
        }
        let l = std::os::unix::net::UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        l.set_nonblocking(true)?;
        tokio::net::UnixListener::from_std(l)
    }

    /// Accepts on a Unix listener from [`bind_unix`](Self::bind_unix). Never returns on an accept
    /// error (out of file descriptors, say): it backs off and accepts again.
    pub async fn run_unix(self, listener: tokio::net::UnixListener) -> io::Result<()> {
        let me = Arc::new(self);
        let mut gate = AcceptGate::new("control socket", me.max_connections, me.clock);
        loop {
            let r = listener.accept().await;
            let Some((s, permit)) = gate.admit(r.map(|(s, _)| s)).await else { continue };
            let me = me.clone();
            tokio::spawn(async move {
                if let Err(e) = me.serve_conn(s).await {
                    tracing::debug!(error = %e, "control connection ended");
                }
                drop(permit);
            });
        }
    }

    /// Accepts on a (loopback) TCP listener, like [`run_unix`](Self::run_unix). Failed
    /// authentications are logged at most once per ten seconds, with a count.
    pub async fn run_tcp(self, listener: tokio::net::TcpListener) -> io::Result<()> {
        let me = Arc::new(self);
        let mut gate = AcceptGate::new("control listener", me.max_connections, me.clock);
        let auth_log = Arc::new(std::sync::Mutex::new(AuthFailLog::default()));
        loop {
            let r = listener.accept().await;
            let Some(((s, peer), permit)) = gate.admit(r).await else { continue };
            let (me, auth_log) = (me.clone(), auth_log.clone());
            tokio::spawn(async move {
                match me.serve_conn(s).await {
                    Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                        let now = me.clock.now();
                        auth_log.lock().unwrap_or_else(|p| p.into_inner()).note(peer, now);
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "control connection ended"),
                    Ok(()) => {}
                }
                drop(permit);
            });
        }
    }
}

/// Failed control authentications, summarised in one warning per ten seconds.
#[derive(Default)]
struct AuthFailLog {
    last: Option<crate::clock::Millis>,
    count: u64,
}

impl AuthFailLog {
    fn note(&mut self, peer: SocketAddr, now: crate::clock::Millis) {
        self.count += 1;
        if self.last.is_some_and(|l| now.saturating_sub(l) < crate::control::http::LOG_EVERY_MS) {
            return;
        }
        self.last = Some(now);
        let failures = std::mem::take(&mut self.count);
        tracing::warn!(%peer, failures, "control connections refused: bad control secret (count since the last such line)");
    }
}

/// The connection cap and error handling of a control accept loop.
struct AcceptGate {
    what: &'static str,
    slots: Arc<tokio::sync::Semaphore>,
    log: crate::control::http::RefusalLog,
    clock: crate::clock::Clock,
    backoff: Duration,
}

impl AcceptGate {
    fn new(what: &'static str, max: usize, clock: crate::clock::Clock) -> Self {
        Self {
            what,
            slots: Arc::new(tokio::sync::Semaphore::new(max.max(1))),
            log: Default::default(),
            clock,
            backoff: Duration::from_millis(5),
        }
    }

    /// The accepted connection with its slot, or `None` after an error (backed off) or when
    /// every slot is taken (the connection is closed).
    async fn admit<T>(&mut self, r: io::Result<T>) -> Option<(T, tokio::sync::OwnedSemaphorePermit)> {
        use crate::control::http::RefusalLog;
        match r {
            Err(_) => {
                self.log.note(self.what, RefusalLog::ACCEPT_ERROR, self.clock.now());
                tokio::time::sleep(self.backoff).await;
                self.backoff = (self.backoff * 2).min(Duration::from_millis(500));
                None
            }
            Ok(c) => {
                self.backoff = Duration::from_millis(5);
                match self.slots.clone().try_acquire_owned() {
                    Ok(p) => Some((c, p)),
                    Err(_) => {
                        self.log.note(self.what, RefusalLog::FULL, self.clock.now());
                        None
                    }
                }
            }
        }
    }
}

/// An allocation created over the control socket.
#[derive(Clone, Debug)]
pub struct RemoteAllocation {
    pub shard: u16,
    pub id: AllocationId,
    pub key: AllocationKey,
    pub connection_data: Vec<u8>,
    pub host: String,
    pub port: u16,
}

/// Errors of [`ControlClient`].
#[derive(Debug)]
pub enum ClientError {
    Io(io::Error),
    /// The relay answered with this status.
    Refused(Status),
    Protocol(&'static str),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "control socket: {e}"),
            Self::Refused(s) => write!(f, "relay refused: {s:?}"),
            Self::Protocol(m) => write!(f, "control protocol: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A blocking client of the control socket.
pub struct ControlClient {
    s: Box<dyn Stream>,
}

fn read_frame_sync(s: &mut dyn Stream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame too large"));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

fn write_frame_sync(s: &mut dyn Stream, data: &[u8]) -> io::Result<()> {
    s.write_all(&(data.len() as u32).to_be_bytes())?;
    s.write_all(data)?;
    s.flush()
}

impl ControlClient {
    fn handshake(mut s: Box<dyn Stream>, secret: Option<&str>) -> Result<Self, ClientError> {
        let hello = read_frame_sync(&mut *s)?;
        if hello.len() != 34 || hello[0] != VERSION {
            return Err(ClientError::Protocol("unexpected hello"));
        }
        if hello[1] == 1 {
            let secret = secret.ok_or(ClientError::Protocol("relay requires a control secret"))?;
            write_frame_sync(&mut *s, &auth_key(secret).mac(&hello[2..34]))?;
            let ok = read_frame_sync(&mut *s).map_err(|_| ClientError::Refused(Status::BadRequest))?;
            if ok != [Status::Ok as u8] {
                return Err(ClientError::Protocol("auth not accepted"));
            }
        }
        Ok(Self { s })
    }

    pub fn connect_unix(path: &Path) -> Result<Self, ClientError> {
        let s = std::os::unix::net::UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Self::handshake(Box::new(s), None)
    }

    pub fn connect_tcp(addr: SocketAddr, secret: &str) -> Result<Self, ClientError> {
        let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        Self::handshake(Box::new(s), Some(secret))
    }

    fn call(&mut self, req: &[u8]) -> Result<Vec<u8>, ClientError> {
        write_frame_sync(&mut *self.s, req)?;
        let mut resp = read_frame_sync(&mut *self.s)?;
        match resp.first().copied().map(Status::from_u8) {
            Some(Status::Ok) => {
                resp.remove(0);
                Ok(resp)
            }
            Some(s) => Err(ClientError::Refused(s)),
            None => Err(ClientError::Protocol("empty response")),
        }
    }

    fn parse_created(b: &[u8]) -> Result<RemoteAllocation, ClientError> {
        const FIXED: usize = 2 + 16 + 64 + CONNECTION_DATA_LEN + 2 + 1;
        if b.len() < FIXED || b.len() != FIXED + b[FIXED - 1] as usize {
            return Err(ClientError::Protocol("bad create response"));
        }
        let mut id = AllocationId::default();
        id.0.copy_from_slice(&b[2..18]);
        let mut key = [0u8; 64];
        key.copy_from_slice(&b[18..82]);
        let conn_end = 82 + CONNECTION_DATA_LEN;
        Ok(RemoteAllocation {
            shard: u16::from_be_bytes([b[0], b[1]]),
            id,
            key: AllocationKey(key),
            connection_data: b[82..conn_end].to_vec(),
            port: u16::from_be_bytes([b[conn_end], b[conn_end + 1]]),
            host: String::from_utf8_lossy(&b[FIXED..]).into_owned(),
        })
    }

    pub fn create_host(&mut self, max_connections: u16) -> Result<RemoteAllocation, ClientError> {
        let m = max_connections.to_be_bytes();
        let b = self.call(&[OP_CREATE_HOST, m[0], m[1]])?;
        Self::parse_created(&b)
    }

    pub fn create_joiner(&mut self, host: &AllocationId) -> Result<RemoteAllocation, ClientError> {
        let mut req = vec![OP_CREATE_JOINER];
        req.extend_from_slice(&host.0);
        let b = self.call(&req)?;
        Self::parse_created(&b)
    }

    pub fn release(&mut self, id: &AllocationId) -> Result<(), ClientError> {
        let mut req = vec![OP_RELEASE];
        req.extend_from_slice(&id.0);
        self.call(&req).map(|_| ())
    }

    /// The relay's counters in Prometheus text format.
    pub fn stats(&mut self) -> Result<String, ClientError> {
        let b = self.call(&[OP_STATS])?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// Every live allocation, as JSON (`[{"id", "role", "host", "age_ms", "idle_ms", "bound",
    /// "peers", "bytes_relayed"}]`).
    pub fn allocations(&mut self) -> Result<String, ClientError> {
        let b = self.call(&[OP_LIST])?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// The relay's state as JSON (draining, shards, allocations, packet totals).
    pub fn status(&mut self) -> Result<String, ClientError> {
        let b = self.call(&[OP_STATUS])?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// Stops taking new allocations (live sessions keep working; `/readyz` turns 503).
    pub fn drain(&mut self) -> Result<(), ClientError> {
        self.call(&[OP_DRAIN]).map(|_| ())
    }

    /// Takes new allocations again.
    pub fn undrain(&mut self) -> Result<(), ClientError> {
        self.call(&[OP_UNDRAIN]).map(|_| ())
    }

    /// Re-reads the relay's configuration, as SIGHUP does (the outcome is in the relay's log).
    pub fn reload(&mut self) -> Result<(), ClientError> {
        self.call(&[OP_RELOAD]).map(|_| ())
    }
}
