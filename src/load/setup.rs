//! Builds the generator's streams against each kind of target: Ferry (through its API), B1 (the
//! ideal forwarder), or direct (the generator's own sockets, B0).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use crate::auth::AllocationKey;
use crate::client::{packets, ApiClient};
use crate::wire::{AllocationId, Relay};

/// One sender socket and one receiver socket, and how the sender's datagrams are framed.
pub struct Stream {
    pub tx: UdpSocket,
    pub rx: UdpSocket,
    /// Where the sender sends (the relay, or `rx` itself for B0).
    pub dst: SocketAddr,
    /// Bytes before the payload (a RELAY header, or a TURN ChannelData header).
    pub header: Vec<u8>,
    /// What the receiver sends to `dst` every few seconds to stay alive (Ferry: a PING, as Unity
    /// Transport sends after 3 s of silence; its allocation would otherwise idle out).
    pub keepalive: Option<Vec<u8>>,
}

/// Where sessions' sockets come from: a fresh pair each (one client per session, as players
/// are), or a few shared sockets that carry many sessions each (the game-like shape, so one
/// `sendmmsg` can carry datagrams of many sessions; a relay sees the same interleaving from a
/// crowd of players).
pub struct Sockets {
    bind_ip: String,
    shared: Vec<(UdpSocket, UdpSocket)>,
}

impl Sockets {
    /// `shared`: how many (sender, receiver) socket pairs all sessions share; 0 for one pair per
    /// session.
    pub fn new(bind_ip: &str, shared: usize) -> io::Result<Self> {
        let shared = (0..shared)
            .map(|_| Ok((udp(&format!("{bind_ip}:0"))?, udp(&format!("{bind_ip}:0"))?)))
            .collect::<io::Result<_>>()?;
        Ok(Self { bind_ip: bind_ip.to_string(), shared })
    }

    /// Session `i`'s (sender, receiver) sockets. Sessions that send from one socket receive on
    /// different ones, so the relay's consecutive datagrams go to different destinations.
    pub fn pair(&self, i: usize) -> io::Result<(UdpSocket, UdpSocket)> {
        let n = self.shared.len();
        if n == 0 {
            return Ok((udp(&format!("{}:0", self.bind_ip))?, udp(&format!("{}:0", self.bind_ip))?));
        }
        let tx = self.shared[i % n].0.try_clone()?;
        let rx = self.shared[(i / n + i) % n].1.try_clone()?;
        Ok((tx, rx))
    }
}

fn udp(local: &str) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.bind(&local.parse::<SocketAddr>().map_err(io::Error::other)?.into())?;
    Ok(s.into())
}

/// Sends `d` until a reply whose type byte is `want` arrives (5 tries, 1 s apart).
fn handshake(sock: &UdpSocket, to: SocketAddr, d: &[u8], want: u8) -> io::Result<()> {
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 2048];
    for _ in 0..5 {
        sock.send_to(d, to)?;
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if from == to && n >= 4 && buf[3] == want {
                return Ok(());
            }
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer of type {want} from {to}")))
}

/// The allocation IDs the streams' RELAY headers name (for a flood to forge).
pub fn known_ids(streams: &[Stream]) -> Vec<AllocationId> {
    streams
        .iter()
        .filter(|s| s.header.len() >= 36)
        .flat_map(|s| [AllocationId::read(&s.header, 4), AllocationId::read(&s.header, 20)])
        .collect()
}

pub(crate) fn relay_header(from: &AllocationId, to: &AllocationId, payload: usize) -> Vec<u8> {
    let mut h = vec![0u8; Relay::<&[u8]>::HEADER_LEN + payload];
    let _ = Relay::emit(&mut h, from, to, &vec![0u8; payload]);
    h.truncate(Relay::<&[u8]>::HEADER_LEN);
    h
}

/// Runs an API call, waiting as long as an answer of 429 asks (at most 10 minutes in all), and
/// says once, plainly, that the API is rate limiting the generator.
pub fn patiently<T>(
    mut call: impl FnMut() -> Result<T, crate::client::ApiError>,
) -> Result<T, crate::client::ApiError> {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let mut waited = Duration::ZERO;
    loop {
        match call() {
            Err(crate::client::ApiError::RateLimited { retry_after, .. })
                if waited < Duration::from_secs(600) =>
            {
                if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    eprintln!(
                        "ferry load: the API is rate limiting this generator (429); waiting as it asks. Start the relay \
                         with a higher --api-rate-limit to set up faster."
                    );
                }
                std::thread::sleep(retry_after);
                waited += retry_after;
            }
            r => return r,
        }
    }
}

/// Streams through a Ferry deployment: one host and one joiner per stream, via the API.
pub fn ferry(
    api: &ApiClient,
    relay_override: Option<SocketAddr>,
    sessions: usize,
    payload: usize,
    sockets: &Sockets,
) -> io::Result<Vec<Stream>> {
    let e = |e: crate::client::ApiError| io::Error::other(e.to_string());
    let mut out = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let h = patiently(|| api.allocate(1, None)).map_err(e)?;
        let code = patiently(|| api.join_code(&h.allocation_id)).map_err(e)?;
        let j = patiently(|| api.join(&code)).map_err(e)?;
        let ep = &h.server_endpoints[0];
        let relay = match relay_override {
            Some(r) => r,
            None => format!("{}:{}", ep.host, ep.port).parse().map_err(io::Error::other)?,
        };
        let parts =
            |a: &crate::client::api::Allocation| -> io::Result<(AllocationId, AllocationKey, Vec<u8>)> {
                let dec = |s: &str| B64.decode(s).map_err(io::Error::other);
                let id: [u8; 16] =
                    dec(&a.allocation_id_bytes)?.try_into().map_err(|_| io::Error::other("id"))?;
                let key: [u8; 64] = dec(&a.key)?.try_into().map_err(|_| io::Error::other("key"))?;
                Ok((AllocationId(id), AllocationKey(key), dec(&a.connection_data)?))
            };
        let (hid, hkey, hconn) = parts(&h)?;
        let (jid, jkey, jconn) = parts(&j.allocation)?;
        let (tx, rx) = sockets.pair(i)?;
        handshake(&rx, relay, &packets::bind(&hkey, 1, &hconn), 1)?;
        handshake(&tx, relay, &packets::bind(&jkey, 1, &jconn), 1)?;
        handshake(&tx, relay, &packets::connect_request(&jid, &hconn), 6)?;
        // The host speaks once, so its address is confirmed for relayed traffic.
        rx.send_to(&packets::ping(&hid, 1), relay)?;
        let keepalive = Some(packets::ping(&hid, 1));
        out.push(Stream { tx, rx, dst: relay, header: relay_header(&jid, &hid, payload), keepalive });
    }
    Ok(out)
}

fn random_id(n: usize, salt: u8) -> AllocationId {
    let mut id = [salt; 16];
    id[..8].copy_from_slice(&(n as u64 + 1).to_be_bytes());
    let _ = getrandom::getrandom(&mut id[8..]);
    AllocationId(id)
}

/// Streams through B1: routes registered with BIND-shaped datagrams, no API.
pub fn b1(relay: SocketAddr, sessions: usize, payload: usize, sockets: &Sockets) -> io::Result<Vec<Stream>> {
    let mut out = Vec::with_capacity(sessions);
    for n in 0..sessions {
        let (hid, jid) = (random_id(n, 1), random_id(n, 2));
        let (tx, rx) = sockets.pair(n)?;
        let key = AllocationKey([0; 64]);
        handshake(&rx, relay, &packets::bind(&key, 1, &hid.0), 1)?;
        handshake(&tx, relay, &packets::bind(&key, 1, &jid.0), 1)?;
        out.push(Stream { tx, rx, dst: relay, header: relay_header(&jid, &hid, payload), keepalive: None });
    }
    Ok(out)
}

/// Through a pair of tunnels: plain game datagrams (no relay header) into the join tunnel's
/// local port; the receiver stands where the host tunnel forwards. One flow.
pub fn tunnel(listen: SocketAddr, server: SocketAddr, bind_ip: &str) -> io::Result<Vec<Stream>> {
    let rx = udp(&server.to_string())?;
    let tx = udp(&format!("{bind_ip}:0"))?;
    Ok(vec![Stream { tx, rx, dst: listen, header: Vec::new(), keepalive: None }])
}

/// B0: the generator's sockets talking to each other, same datagrams, no relay.
pub fn direct(sessions: usize, payload: usize, sockets: &Sockets) -> io::Result<Vec<Stream>> {
    (0..sessions)
        .map(|n| {
            let (tx, rx) = sockets.pair(n)?;
            let dst = rx.local_addr()?;
            Ok(Stream {
                tx,
                rx,
                dst,
                header: relay_header(&random_id(n, 2), &random_id(n, 1), payload),
                keepalive: None,
            })
        })
        .collect()
}
