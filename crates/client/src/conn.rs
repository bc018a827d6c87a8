//! The relay connection: BIND with retry, CONNECT with retry, RELAY send/receive, keep-alive
//! PING, re-BIND with a fresh nonce after ERROR 3 or silence, CLOSE. Blocking, one UDP socket.
//! Timing follows Unity Transport (`docs/protocol.md`, "What UTP does as a client").

use crate::transport::Transport;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use super::packets;
use crate::auth::AllocationKey;
use crate::clock::{Clock, Millis};
use crate::model::Allocation;
use crate::wire::{self, AllocationId, ErrorCode, ErrorMsg, MessageType, Pair, Relay};

/// Timing of the client, defaults as Unity Transport.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub bind_retry: Duration,
    pub bind_attempts: u32,
    pub connect_retry: Duration,
    pub connect_attempts: u32,
    /// PING when nothing was sent for this long.
    pub ping_interval: Duration,
    /// Re-BIND when nothing was received for this long.
    pub rebind_after_silence: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            bind_retry: Duration::from_secs(1),
            bind_attempts: 10,
            connect_retry: Duration::from_secs(1),
            connect_attempts: 10,
            ping_interval: Duration::from_secs(3),
            rebind_after_silence: Duration::from_secs(9),
        }
    }
}

/// A datagram from the relay as [`RelayClient::accept`] sees it: a RELAY to this allocation,
/// borrowed, or anything else decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received<'a> {
    Relay { from: AllocationId, payload: &'a [u8] },
    Other(Incoming),
}

/// Something the relay sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    Relay { from: AllocationId, payload: Vec<u8> },
    Disconnect { from: AllocationId },
    Error { code: ErrorCode },
    Accepted { host: AllocationId },
    Rejected { host: AllocationId },
    BindReceived,
    Pong,
}

#[derive(Debug)]
pub enum ClientError {
    Io(io::Error),
    /// The allocation JSON could not be used (bad base64, no UDP endpoint, …).
    BadAllocation(String),
    /// No BIND_RECEIVED after every attempt.
    BindTimeout,
    /// No ACCEPTED after every attempt.
    ConnectTimeout,
    /// The host is full.
    Rejected,
    /// The relay answered with an ERROR.
    Relay(ErrorCode),
    /// The relay disconnected this peer.
    Disconnected,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "relay socket: {e}"),
            Self::BadAllocation(m) => write!(f, "unusable allocation: {m}"),
            Self::BindTimeout => f.write_str("no BIND_RECEIVED from the relay"),
            Self::ConnectTimeout => f.write_str("no ACCEPTED from the relay"),
            Self::Rejected => f.write_str("the host is full (REJECTED)"),
            Self::Relay(c) => write!(f, "relay error {} ({})", *c as u8, c.as_str()),
            Self::Disconnected => f.write_str("disconnected"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Socket buffers for bursts (the OS may grant less).
pub(crate) fn grow_buffers(sock: &UdpSocket) {
    let s = socket2::SockRef::from(sock);
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
}

fn b64(field: &str, s: &str) -> Result<Vec<u8>, ClientError> {
    B64.decode(s).map_err(|e| ClientError::BadAllocation(format!("{field}: {e}")))
}

/// One allocation's connection to its relay.
pub struct RelayClient {
    sock: UdpSocket,
    relay: SocketAddr,
    id: AllocationId,
    key: AllocationKey,
    conn: Vec<u8>,
    nonce: u16,
    clock: Clock,
    last_sent: Millis,
    last_recv: Millis,
    opts: ClientOptions,
    buf: Vec<u8>,
    tx: Vec<u8>,
    nonblocking: bool,
    link: Link,
}

/// A secure transport's session, when the client does not use plain UDP.
enum Link {
    Udp,
    #[cfg(feature = "dtls")]
    Dtls(Box<crate::transport::DtlsLink>),
    Ws(Box<crate::transport::WsLink>),
}

impl RelayClient {
    /// A client for an allocation as the API returns it (host or joiner).
    pub fn new(a: &Allocation) -> Result<Self, ClientError> {
        let ep = a
            .server_endpoints
            .iter()
            .find(|e| e.connection_type == "udp")
            .ok_or_else(|| ClientError::BadAllocation("no udp server endpoint".into()))?;
        let relay = (ep.host.as_str(), ep.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| ClientError::BadAllocation(format!("cannot resolve {}", ep.host)))?;
        let id: [u8; 16] = b64("allocationIdBytes", &a.allocation_id_bytes)?
            .try_into()
            .map_err(|_| ClientError::BadAllocation("allocationIdBytes is not 16 bytes".into()))?;
        let key: [u8; 64] = b64("key", &a.key)?
            .try_into()
            .map_err(|_| ClientError::BadAllocation("key is not 64 bytes".into()))?;
        let conn = b64("connectionData", &a.connection_data)?;
        Self::from_parts(relay, AllocationId(id), AllocationKey(key), conn)
    }

    /// A client that reaches the relay through `transport` (the allocation's endpoint of that
    /// kind): DTLS handshakes, or the WebSocket connects and upgrades, before this returns.
    /// [`socket`](Self::socket), [`accept`](Self::accept), [`send_with`](Self::send_with) and
    /// [`migrate_socket`](Self::migrate_socket) are for plain UDP only.
    pub fn with_transport(a: &Allocation, transport: Transport) -> Result<Self, ClientError> {
        let kind = transport.connection_type();
        let ep = a
            .server_endpoints
            .iter()
            .find(|e| e.connection_type == kind)
            .ok_or_else(|| ClientError::BadAllocation(format!("no {kind} server endpoint")))?;
        let addr = (ep.host.as_str(), ep.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| ClientError::BadAllocation(format!("cannot resolve {}", ep.host)))?;
        let mut c = Self::new(a)?;
        c.relay = addr;
        c.link = match transport {
            Transport::Udp => Link::Udp,
            #[cfg(feature = "dtls")]
            Transport::Dtls => {
                Link::Dtls(Box::new(crate::transport::DtlsLink::open(&c.sock, addr, &c.id.0, &c.key.0)?))
            }
            Transport::Ws => Link::Ws(Box::new(crate::transport::WsLink::open(addr, None)?)),
            Transport::Wss { ca_file } => Link::Ws(Box::new(crate::transport::WsLink::open(
                addr,
                Some((ep.host.as_str(), ca_file.as_deref())),
            )?)),
        };
        Ok(c)
    }

    /// A client from raw parts (e.g. from the control socket).
    pub fn from_parts(
        relay: SocketAddr,
        id: AllocationId,
        key: AllocationKey,
        conn: Vec<u8>,
    ) -> Result<Self, ClientError> {
        let local: SocketAddr = if relay.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
            .parse()
            .map_err(|_| ClientError::BadAllocation("local address".into()))?;
        let sock = UdpSocket::bind(local)?;
        grow_buffers(&sock);
        let clock = Clock::new();
        Ok(Self {
            sock,
            relay,
            id,
            key,
            conn,
            nonce: 0,
            clock,
            last_sent: 0,
            last_recv: 0,
            opts: ClientOptions::default(),
            buf: vec![0u8; 2048],
            tx: vec![0u8; 2048],
            nonblocking: false,
            link: Link::Udp,
        })
    }

    pub fn with_options(mut self, opts: ClientOptions) -> Self {
        self.opts = opts;
        self
    }

    pub fn id(&self) -> AllocationId {
        self.id
    }

    /// Sends to `relay` instead of the endpoint the allocation names (a proxy in front of the
    /// relay, or a test's lossy link).
    pub fn with_relay(mut self, relay: SocketAddr) -> Self {
        self.relay = relay;
        self
    }

    /// The UDP socket toward the relay, for registering with an event loop (with
    /// [`set_nonblocking`](Self::set_nonblocking) on and [`poll_recv`](Self::poll_recv)).
    pub fn socket(&self) -> &UdpSocket {
        &self.sock
    }

    /// Non-blocking mode for event loops: [`poll_recv`](Self::poll_recv) then never waits. It
    /// stays on across [`migrate_socket`](Self::migrate_socket).
    pub fn set_nonblocking(&mut self, on: bool) -> Result<(), ClientError> {
        self.sock.set_nonblocking(on)?;
        self.nonblocking = on;
        Ok(())
    }

    /// The next message already waiting on the socket, without blocking (non-blocking mode).
    /// Datagrams that are not from the relay or not for this allocation are skipped.
    pub fn poll_recv(&mut self) -> Result<Option<Incoming>, ClientError> {
        self.next_message(None)
    }

    /// The next message from the relay: waiting until `deadline` (blocking use) or only taking
    /// what is already there (`None`, non-blocking use). Datagrams that are not from the relay or
    /// not for this allocation are skipped, as UTP does.
    fn next_message(&mut self, deadline: Option<Millis>) -> Result<Option<Incoming>, ClientError> {
        if !matches!(self.link, Link::Udp) {
            return self.next_secure(deadline);
        }
        loop {
            if let Some(d) = deadline {
                let now = self.clock.now();
                if now >= d {
                    return Ok(None);
                }
                self.sock.set_read_timeout(Some(Duration::from_millis((d - now).max(1))))?;
            }
            let (n, from) = match self.sock.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                // A signal (or io_uring task work in the same process) interrupted the wait.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // An event loop skips a previous send's ICMP error (e.g. the relay restarting).
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && deadline.is_none() => continue,
                Err(e) => return Err(e.into()),
            };
            if from != self.relay {
                continue;
            }
            if let Some(m) = self.decode(n) {
                self.last_recv = self.clock.now();
                return Ok(Some(m));
            }
        }
    }

    /// [`next_message`](Self::next_message) over DTLS or WebSocket.
    fn next_secure(&mut self, deadline: Option<Millis>) -> Result<Option<Incoming>, ClientError> {
        loop {
            let wait = match deadline {
                Some(d) => {
                    let now = self.clock.now();
                    if now >= d {
                        return Ok(None);
                    }
                    Some(Duration::from_millis(d - now))
                }
                None => None,
            };
            let got = match &mut self.link {
                Link::Udp => None,
                #[cfg(feature = "dtls")]
                Link::Dtls(l) => l.recv(&mut self.buf, wait)?,
                Link::Ws(l) => l.recv(&mut self.buf, wait)?,
            };
            match got {
                Some(n) => {
                    if let Some(m) = self.decode(n) {
                        self.last_recv = self.clock.now();
                        return Ok(Some(m));
                    }
                }
                None if deadline.is_none() => return Ok(None),
                None => {}
            }
        }
    }

    /// Decodes a datagram an event loop received on [`socket`](Self::socket) itself (e.g. in a
    /// batch): `None` when it is not from the relay or not for this allocation. Counts as
    /// hearing from the relay (for keep-alive).
    pub fn accept<'a>(&mut self, from: SocketAddr, d: &'a [u8]) -> Option<Received<'a>> {
        if from != self.relay {
            return None;
        }
        let r = match wire::parse_header(d).ok()? {
            MessageType::Relay => {
                let r = Relay::new_checked(d).ok()?;
                if r.to() != self.id {
                    return None;
                }
                Received::Relay { from: r.from(), payload: &d[Relay::<&[u8]>::HEADER_LEN..] }
            }
            _ => {
                let n = d.len().min(self.buf.len());
                self.buf[..n].copy_from_slice(&d[..n]);
                Received::Other(self.decode(n)?)
            }
        };
        self.last_recv = self.clock.now();
        Some(r)
    }

    /// Writes a whole RELAY datagram to `to` into `out`, its payload put there by `write`;
    /// returns its length. For event loops that send batches themselves (then call
    /// [`note_sent`](Self::note_sent)).
    pub fn write_relay(
        &self,
        to: &AllocationId,
        out: &mut [u8],
        write: impl FnOnce(&mut [u8]) -> Option<usize>,
    ) -> Option<usize> {
        const HEADER: usize = Relay::<&[u8]>::HEADER_LEN;
        let room = out.len().min(HEADER + 1434);
        let n = write(out.get_mut(HEADER..room)?)?;
        wire::write_header(out, MessageType::Relay);
        out[4..20].copy_from_slice(&self.id.0);
        out[20..36].copy_from_slice(&to.0);
        out[36..38].copy_from_slice(&(n as u16).to_be_bytes());
        Some(HEADER + n)
    }

    /// Records that the event loop sent something to the relay (keep-alive timing).
    pub fn note_sent(&mut self) {
        self.last_sent = self.clock.now();
    }

    /// Sends a RELAY to `to` whose payload `write` puts into the buffer it is given (at most
    /// 1,434 bytes) and whose length it returns; no allocation per datagram. `Ok(false)` when
    /// `write` declined.
    pub fn send_with(
        &mut self,
        to: &AllocationId,
        write: impl FnOnce(&mut [u8]) -> Option<usize>,
    ) -> Result<bool, ClientError> {
        const HEADER: usize = Relay::<&[u8]>::HEADER_LEN;
        let Some(n) = write(&mut self.tx[HEADER..HEADER + 1434]) else { return Ok(false) };
        wire::write_header(&mut self.tx, MessageType::Relay);
        self.tx[4..20].copy_from_slice(&self.id.0);
        self.tx[20..36].copy_from_slice(&to.0);
        self.tx[36..38].copy_from_slice(&(n as u16).to_be_bytes());
        match self.sock.send_to(&self.tx[..HEADER + n], self.relay) {
            Ok(_) => {}
            // A full socket buffer drops the datagram, as the network would.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e.into()),
        }
        self.last_sent = self.clock.now();
        Ok(true)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    pub fn relay_addr(&self) -> SocketAddr {
        self.relay
    }

    /// Moves to a fresh local socket (a new source port), as after a network change or a NAT
    /// rebinding. The relay answers the next message with ERROR 3, and [`recv_relay`]
    /// (Self::recv_relay) re-BINDs with a higher nonce, which moves the binding.
    pub fn migrate_socket(&mut self) -> Result<(), ClientError> {
        let local: SocketAddr = if self.relay.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
            .parse()
            .map_err(|_| ClientError::BadAllocation("local address".into()))?;
        self.sock = UdpSocket::bind(local)?;
        grow_buffers(&self.sock);
        self.sock.set_nonblocking(self.nonblocking)?;
        Ok(())
    }

    fn send_raw(&mut self, d: &[u8]) -> Result<(), ClientError> {
        match &mut self.link {
            Link::Udp => {
                self.sock.send_to(d, self.relay)?;
            }
            #[cfg(feature = "dtls")]
            Link::Dtls(l) => l.send(d)?,
            Link::Ws(l) => l.send(d)?,
        }
        self.last_sent = self.clock.now();
        Ok(())
    }

    /// Sends one BIND with the next nonce (UTP 2.2+ behaviour).
    pub fn send_bind(&mut self) -> Result<(), ClientError> {
        self.nonce = self.nonce.wrapping_add(1);
        let d = packets::bind(&self.key, self.nonce, &self.conn);
        self.send_raw(&d)
    }

    /// Waits up to `timeout` for one datagram from the relay and decodes it. Anything malformed
    /// or not for this allocation is skipped, as UTP does.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Incoming>, ClientError> {
        let deadline = self.clock.now() + timeout.as_millis() as u64;
        self.next_message(Some(deadline))
    }

    fn decode(&self, n: usize) -> Option<Incoming> {
        let d = &self.buf[..n];
        match wire::parse_header(d).ok()? {
            MessageType::Relay => {
                let r = Relay::new_checked(d).ok()?;
                (r.to() == self.id).then(|| Incoming::Relay { from: r.from(), payload: r.payload().to_vec() })
            }
            MessageType::BindReceived => (n == 4).then_some(Incoming::BindReceived),
            MessageType::Ping => (n == 22).then_some(Incoming::Pong),
            MessageType::Accepted => {
                let p = Pair::<wire::pair::AcceptedKind, _>::new_checked(d).ok()?;
                (p.to() == self.id).then(|| Incoming::Accepted { host: p.from() })
            }
            MessageType::Rejected => {
                let p = Pair::<wire::pair::RejectedKind, _>::new_checked(d).ok()?;
                Some(Incoming::Rejected { host: p.from() })
            }
            MessageType::Disconnect => {
                let p = Pair::<wire::pair::DisconnectKind, _>::new_checked(d).ok()?;
                (p.to() == self.id).then(|| Incoming::Disconnect { from: p.from() })
            }
            MessageType::Error => Some(Incoming::Error { code: ErrorMsg::new_checked(d).ok()?.code() }),
            _ => None,
        }
    }

    /// BINDs, resending every `bind_retry` until BIND_RECEIVED.
    pub fn bind(&mut self) -> Result<(), ClientError> {
        for _ in 0..self.opts.bind_attempts {
            self.send_bind()?;
            let until = self.clock.now() + self.opts.bind_retry.as_millis() as u64;
            while let Some(left) = until.checked_sub(self.clock.now()).filter(|&l| l > 0) {
                match self.recv(Duration::from_millis(left))? {
                    Some(Incoming::BindReceived) => return Ok(()),
                    Some(Incoming::Error {
                        code: c @ (ErrorCode::AllocationNotFound | ErrorCode::AllocationTimedOut),
                    }) => return Err(ClientError::Relay(c)),
                    _ => {}
                }
            }
        }
        Err(ClientError::BindTimeout)
    }

    /// Sends CONNECT_REQUEST for the host's connection data every `connect_retry` until
    /// ACCEPTED; returns the host's allocation ID.
    pub fn connect(&mut self, host_connection_data: &[u8]) -> Result<AllocationId, ClientError> {
        let d = packets::connect_request(&self.id, host_connection_data);
        for _ in 0..self.opts.connect_attempts {
            self.send_raw(&d)?;
            let until = self.clock.now() + self.opts.connect_retry.as_millis() as u64;
            while let Some(left) = until.checked_sub(self.clock.now()).filter(|&l| l > 0) {
                match self.recv(Duration::from_millis(left))? {
                    Some(Incoming::Accepted { host }) => return Ok(host),
                    Some(Incoming::Rejected { .. }) => return Err(ClientError::Rejected),
                    Some(Incoming::Error { code: ErrorCode::BoundElsewhere }) => self.send_bind()?,
                    Some(Incoming::Error { code }) => return Err(ClientError::Relay(code)),
                    _ => {}
                }
            }
        }
        Err(ClientError::ConnectTimeout)
    }

    /// [`connect`](Self::connect) with the base64 `hostConnectionData` of a join answer.
    pub fn connect_b64(&mut self, host_connection_data: &str) -> Result<AllocationId, ClientError> {
        let d = b64("hostConnectionData", host_connection_data)?;
        self.connect(&d)
    }

    /// Sends a RELAY with `payload` to `to`.
    pub fn send(&mut self, to: &AllocationId, payload: &[u8]) -> Result<(), ClientError> {
        let d =
            packets::relay(&self.id, to, payload).map_err(|e| ClientError::BadAllocation(e.to_string()))?;
        self.send_raw(&d)
    }

    /// Keep-alive duties: PING after `ping_interval` without sending, re-BIND with a fresh nonce
    /// after `rebind_after_silence` without receiving. Call it regularly (e.g. every loop turn).
    pub fn maintain(&mut self) -> Result<(), ClientError> {
        let now = self.clock.now();
        if now.saturating_sub(self.last_recv) >= self.opts.rebind_after_silence.as_millis() as u64
            && now.saturating_sub(self.last_sent) >= self.opts.bind_retry.as_millis() as u64
        {
            return self.send_bind();
        }
        if now.saturating_sub(self.last_sent) >= self.opts.ping_interval.as_millis() as u64 {
            let d = packets::ping(&self.id, 1);
            self.send_raw(&d)?;
        }
        Ok(())
    }

    /// Receives the next RELAY payload, doing keep-alive and recovery on the way: an ERROR 3
    /// (bound elsewhere, e.g. after a NAT rebinding) triggers a re-BIND with a fresh nonce.
    pub fn recv_relay(&mut self, timeout: Duration) -> Result<Option<(AllocationId, Vec<u8>)>, ClientError> {
        let deadline = self.clock.now() + timeout.as_millis() as u64;
        while let Some(left) = deadline.checked_sub(self.clock.now()).filter(|&l| l > 0) {
            self.maintain()?;
            let slice = left.min(self.opts.ping_interval.as_millis() as u64).max(1);
            match self.recv(Duration::from_millis(slice))? {
                Some(Incoming::Relay { from, payload }) => return Ok(Some((from, payload))),
                Some(Incoming::Error { code: ErrorCode::BoundElsewhere }) => self.send_bind()?,
                Some(Incoming::Error {
                    code: c @ (ErrorCode::AllocationNotFound | ErrorCode::AllocationTimedOut),
                }) => return Err(ClientError::Relay(c)),
                Some(Incoming::Disconnect { .. }) => return Err(ClientError::Disconnected),
                _ => {}
            }
        }
        Ok(None)
    }

    /// Tells a peer we are leaving (DISCONNECT through the relay).
    pub fn disconnect(&mut self, peer: &AllocationId) -> Result<(), ClientError> {
        let d = packets::disconnect(&self.id, peer);
        self.send_raw(&d)
    }

    /// Releases the allocation (CLOSE). The relay does not answer.
    pub fn close(&mut self) -> Result<(), ClientError> {
        let d = packets::close(&self.id);
        self.send_raw(&d)
    }
}
