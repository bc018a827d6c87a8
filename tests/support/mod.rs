//! A real `ferry serve` on loopback ports, in-process, plus a raw UTP-shaped UDP client.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ferry::auth::AllocationKey;
use ferry::client::api::Allocation;
use ferry::client::packets;
use ferry::config::Config;
use ferry::serve::Running;
use ferry::wire::{AllocationId, ErrorCode, ErrorMsg};

pub mod dtls;

pub struct Server {
    pub rt: tokio::runtime::Runtime,
    pub running: Option<Running>,
}

impl Server {
    pub fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut cfg = Config::defaults();
        cfg.api_listen = "127.0.0.1:0".parse().unwrap();
        cfg.relay_listen = "127.0.0.1:0".parse().unwrap();
        // CI runs the suite with one shard and with several (FERRY_TEST_SHARDS).
        cfg.shards =
            std::env::var("FERRY_TEST_SHARDS").ok().and_then(|s| s.parse().ok()).unwrap_or(cfg.shards);
        cfg.pin_shards = false;
        if std::env::var("FERRY_TEST_IO").as_deref() == Ok("uring") {
            cfg.io = ferry::config::IoBackend::Uring;
        }
        tweak(&mut cfg);
        let cfg = cfg.validate().unwrap();
        let running = rt.block_on(Running::start(cfg)).unwrap();
        Self { rt, running: Some(running) }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    pub fn api_url(&self) -> String {
        format!("http://{}", self.running().api_addr)
    }

    pub fn api(&self) -> ferry::client::ApiClient {
        ferry::client::ApiClient::new(self.api_url())
    }

    pub fn relay_addr(&self) -> SocketAddr {
        self.running().relay_addr
    }

    pub fn metrics(&self) -> String {
        let r = self.api().raw("GET", "/metrics", None).unwrap();
        String::from_utf8(r.body).unwrap()
    }

    /// The value of one sample line of /metrics (0 when absent).
    pub fn metric(&self, line_prefix: &str) -> u64 {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            self.rt.block_on(r.shutdown());
        }
    }
}

/// A client that sends datagrams exactly as Unity Transport builds them.
pub struct Raw {
    pub sock: UdpSocket,
    pub relay: SocketAddr,
    pub id: AllocationId,
    pub key: AllocationKey,
    pub conn: Vec<u8>,
}

impl Raw {
    pub fn new(a: &Allocation) -> Self {
        let ep = &a.server_endpoints[0];
        let relay: SocketAddr = format!("{}:{}", ep.host, ep.port).parse().unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Generous: only a failing test ever waits this long, and CI machines can be loaded.
        sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self {
            sock,
            relay,
            id: AllocationId(B64.decode(&a.allocation_id_bytes).unwrap().try_into().unwrap()),
            key: AllocationKey(B64.decode(&a.key).unwrap().try_into().unwrap()),
            conn: B64.decode(&a.connection_data).unwrap(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    pub fn send(&self, d: &[u8]) {
        self.sock.send_to(d, self.relay).unwrap();
    }

    pub fn recv(&self) -> Vec<u8> {
        let mut buf = [0u8; 2048];
        loop {
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    assert_eq!(from, self.relay);
                    return buf[..n].to_vec();
                }
                // An in-process io_uring relay can interrupt blocking calls of other threads.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("a datagram from the relay: {e:?}"),
            }
        }
    }

    /// Asserts that nothing arrives within `ms`.
    pub fn silent(&self, ms: u64) {
        self.sock.set_read_timeout(Some(Duration::from_millis(ms))).unwrap();
        let mut buf = [0u8; 2048];
        let got = loop {
            match self.sock.recv_from(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        self.sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert!(got.is_err(), "unexpected datagram {:02x?}", got.map(|(n, _)| buf[..n].to_vec()));
    }

    pub fn bind(&self, nonce: u16) -> Vec<u8> {
        let d = packets::bind(&self.key, nonce, &self.conn);
        assert_eq!(d.len(), 295, "UTP's BIND is 295 bytes");
        self.send(&d);
        self.recv()
    }

    pub fn connect(&self, host_conn: &[u8]) -> Vec<u8> {
        let d = packets::connect_request(&self.id, host_conn);
        assert_eq!(d.len(), 276, "UTP's CONNECT_REQUEST is 276 bytes");
        self.send(&d);
        self.recv()
    }

    pub fn relay_to(&self, to: &AllocationId, payload: &[u8]) {
        self.send(&packets::relay(&self.id, to, payload).unwrap());
    }
}

pub const BIND_RECEIVED: [u8; 4] = [0xDA, 0x72, 0x00, 0x01];

pub fn error(id: &AllocationId, code: ErrorCode) -> Vec<u8> {
    let mut out = [0u8; 21];
    ErrorMsg::emit(&mut out, id, code);
    out.to_vec()
}

pub fn pair(ty: u8, from: &AllocationId, to: &AllocationId) -> Vec<u8> {
    let mut v = vec![0xDA, 0x72, 0, ty];
    v.extend_from_slice(&from.0);
    v.extend_from_slice(&to.0);
    v
}

pub fn b64(s: &str) -> Vec<u8> {
    B64.decode(s).unwrap()
}

/// A host and a joiner through the API, both bound and connected, as raw UTP-shaped clients.
pub fn raw_session(srv: &Server) -> (Raw, Raw) {
    let api = srv.api();
    let h = api.allocate(2, None).unwrap();
    let code = api.join_code(&h.allocation_id).unwrap();
    let j = api.join(&code).unwrap();
    let host = Raw::new(&h);
    let peer = Raw::new(&j.allocation);
    assert_eq!(host.bind(0), BIND_RECEIVED);
    assert_eq!(peer.bind(0), BIND_RECEIVED);
    assert_eq!(peer.connect(&host.conn), pair(6, &host.id, &peer.id));
    (host, peer)
}

/// A TCP connection to the API from a chosen loopback source address.
pub fn tcp_from(src: &str, api: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&format!("{src}:0").parse::<SocketAddr>().expect("a source IP").into())?;
    s.connect_timeout(&api.into(), Duration::from_secs(3))?;
    let s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// The status of one raw request sent on a fresh connection from `src` (0 when it failed).
pub fn status_from(src: &str, api: SocketAddr, req: &str) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = tcp_from(src, api) else { return 0 };
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// A raw `POST` with a JSON body and an optional bearer token.
pub fn post_request(path: &str, body: &str, token: Option<&str>) -> String {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A UDP link in front of the relay that drops `loss_percent` of datagrams each way (seeded,
/// so a run is repeatable). Each client source gets its own upstream socket, so the relay sees
/// one address per client, as through a NAT. Stops when dropped.
pub struct LossyLink {
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LossyLink {
    pub fn new(relay: SocketAddr, loss_percent: u32, seed: u64) -> Self {
        use std::collections::HashMap;
        use std::sync::atomic::{AtomicBool, Ordering};
        let front = UdpSocket::bind(if relay.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" }).unwrap();
        front.set_nonblocking(true).unwrap();
        let addr = front.local_addr().unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rng = seed | 1;
            let mut keep = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % 100 >= loss_percent as u64
            };
            let mut up: HashMap<SocketAddr, UdpSocket> = HashMap::new();
            let mut buf = [0u8; 2048];
            while !s2.load(Ordering::Relaxed) {
                let mut idle = true;
                while let Ok((n, client)) = front.recv_from(&mut buf) {
                    idle = false;
                    let u = up.entry(client).or_insert_with(|| {
                        let u =
                            UdpSocket::bind(if relay.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" }).unwrap();
                        u.set_nonblocking(true).unwrap();
                        u
                    });
                    if keep() {
                        let _ = u.send_to(&buf[..n], relay);
                    }
                }
                for (client, u) in &up {
                    while let Ok((n, _)) = u.recv_from(&mut buf) {
                        idle = false;
                        if keep() {
                            let _ = front.send_to(&buf[..n], client);
                        }
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        Self { addr, stop, thread: Some(thread) }
    }
}

impl Drop for LossyLink {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A host tunnel and a join tunnel on threads, in front of `srv`, each through `relay` (the
/// relay itself, or a lossy link in front of it).
pub struct Tunnels {
    pub host_ctl: std::sync::Arc<ferry::client::tunnel::TunnelControl>,
    pub join_ctl: std::sync::Arc<ferry::client::tunnel::TunnelControl>,
    /// Where the game client sends, one address per forwarded port.
    pub local: Vec<SocketAddr>,
    pub host: Option<std::thread::JoinHandle<Result<(), String>>>,
    pub join: Option<std::thread::JoinHandle<Result<ferry::client::tunnel::JoinExit, String>>>,
    pub events: std::sync::Arc<std::sync::Mutex<Vec<ferry::client::tunnel::TunnelEvent>>>,
}

/// The path policy for a test over a lossy link to the relay: with loss, `relay` (the loss on
/// the way to the relay is what is tested); without, the default (`auto`: direct once proven).
pub fn path_for(loss: u32) -> ferry::client::tunnel::PathOptions {
    let mut o = ferry::client::tunnel::PathOptions::default();
    if loss > 0 {
        o.policy = ferry::client::path::Policy::Relay;
    }
    o
}

impl Tunnels {
    /// Both tunnels on the default path policy (`auto`: direct once proven).
    pub fn start(
        srv: &Server,
        forwards: Vec<SocketAddr>,
        host_relay: SocketAddr,
        join_relay: SocketAddr,
    ) -> Self {
        Self::start_with(srv, forwards, host_relay, join_relay, Default::default())
    }

    /// Both tunnels under `path` (e.g. `relay`, to keep traffic on a lossy link to the relay).
    pub fn start_with(
        srv: &Server,
        forwards: Vec<SocketAddr>,
        host_relay: SocketAddr,
        join_relay: SocketAddr,
        path: ferry::client::tunnel::PathOptions,
    ) -> Self {
        use ferry::client::tunnel::*;
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let api = srv.api();
        // The joiner mirrors the host's port numbers, which its own game server holds here:
        // shift them below the ephemeral range.
        let min = forwards.iter().map(|a| a.port() as i32).min().unwrap_or(0);
        let port_offset = 2000 + min % 5000 - min;
        let cfg =
            HostConfig { forwards, players: 4, timing: Timing::default(), relay: Some(host_relay), path };
        let mut host = HostTunnel::open(&api, cfg).unwrap();
        let code = host.join_code().to_string();
        let host_ctl = TunnelControl::new();
        let (c, ev) = (host_ctl.clone(), events.clone());
        let host = std::thread::spawn(move || {
            host.run(&c, &mut |e| ev.lock().unwrap().push(e)).map_err(|e| e.to_string())
        });
        let jcfg = JoinConfig {
            listen: "127.0.0.1".parse().unwrap(),
            port_offset,
            relay: Some(join_relay),
            path,
            ..JoinConfig::default()
        };
        let mut join = JoinTunnel::open(&api, &code, jcfg).unwrap();
        let local = join.local_addrs();
        let join_ctl = TunnelControl::new();
        let (c, ev) = (join_ctl.clone(), events.clone());
        let join = std::thread::spawn(move || {
            join.run(&c, &mut |e| ev.lock().unwrap().push(e)).map_err(|e| e.to_string())
        });
        Self { host_ctl, join_ctl, local, host: Some(host), join: Some(join), events }
    }
}

impl Drop for Tunnels {
    fn drop(&mut self) {
        self.join_ctl.stop();
        self.host_ctl.stop();
        if let Some(t) = self.join.take() {
            let _ = t.join();
        }
        if let Some(t) = self.host.take() {
            let _ = t.join();
        }
    }
}

/// A CA and a server certificate for `relay.test` and `localhost` signed by it.
pub fn test_pki(dir: &std::path::Path) -> rustls::pki_types::CertificateDer<'static> {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "Ferry test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf =
        rcgen::CertificateParams::new(vec!["relay.test".to_string(), "localhost".to_string()]).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    std::fs::write(dir.join("cert.pem"), leaf_cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    ca_cert.der().clone()
}
