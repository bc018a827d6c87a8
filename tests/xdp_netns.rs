//! The kernel fast path on a real interface: `ferry serve` in one network namespace with native
//! XDP on its veth, Unity-shaped clients in another. Needs root (CI runs as root) and fails
//! without it rather than skipping.
//!
//! What is shown: the full Unity flow rides the kernel path (IPv4 and IPv6), and every datagram
//! of it is counted once, by the kernel or by userspace; a rebind, a DISCONNECT, an expiry and a
//! host leaving each stop kernel forwarding at once; kernel-only traffic keeps a session alive
//! past the idle timeout; forged and unlinked RELAYs are left to userspace, which refuses them.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ferry::auth::AllocationKey;
use ferry::client::api::Allocation;
use ferry::client::{packets, ApiClient};
use ferry::wire::{AllocationId, MessageType};

const BIN: &str = env!("CARGO_BIN_EXE_ferry");
const RELAY4: &str = "10.77.0.1";
const RELAY6: &str = "fd77::1";
const RELAY_PORT: u16 = 7777;
const API_PORT: u16 = 8080;
const TOKEN: &str = "xdp-test-token-0123456789";
const IDLE_MS: u64 = 1500;

mod netns;
use netns::{in_ns, sh};

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the fast-path tests attach XDP in network namespaces: run them as root"
    );
}

/// Two namespaces joined by a veth pair: the relay's (`r0`, native XDP) and the clients' (`c0`).
struct Lab {
    tag: String,
    relay: Option<Child>,
    /// Keeps the pass program on `c0` attached.
    pass: Option<std::sync::mpsc::Sender<()>>,
}

impl Lab {
    fn ns(&self, n: &str) -> String {
        format!("{}{n}", self.tag)
    }

    fn new() -> Self {
        require_root();
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let tag = format!("fy{}x{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed));
        let mut lab = Lab { tag, relay: None, pass: None };
        let (r, c) = (lab.ns("r"), lab.ns("c"));
        for n in [&r, &c] {
            sh(&["ip", "netns", "add", n]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        sh(&["ip", "link", "add", "r0", "netns", &r, "type", "veth", "peer", "name", "c0", "netns", &c]);
        sh(&["ip", "-n", &r, "addr", "add", "10.77.0.1/24", "dev", "r0"]);
        sh(&["ip", "-n", &r, "addr", "add", "fd77::1/64", "dev", "r0", "nodad"]);
        for i in 2..=9 {
            sh(&["ip", "-n", &c, "addr", "add", &format!("10.77.0.{i}/24"), "dev", "c0"]);
            sh(&["ip", "-n", &c, "addr", "add", &format!("fd77::{i}/64"), "dev", "c0", "nodad"]);
        }
        sh(&["ip", "-n", &r, "link", "set", "r0", "up"]);
        // The fast path looks up next hops the way a router does (bpf_fib_lookup), which the
        // kernel allows only on an interface with forwarding on (docs/fastpath.md).
        for fam in ["ipv4", "ipv6"] {
            sh(&["ip", "netns", "exec", &r, "sysctl", "-qw", &format!("net.{fam}.conf.r0.forwarding=1")]);
        }
        sh(&["ip", "-n", &c, "link", "set", "c0", "up"]);
        // A NIC delivers datagrams with finished UDP checksums; a veth peer would hand over
        // the partial sums of checksum offload, which a rewritten frame must not carry.
        sh(&["ip", "netns", "exec", &c, "ethtool", "-K", "c0", "tx", "off"]);
        // veth hands XDP_TX frames only to a peer that runs XDP itself.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = format!("/run/netns/{c}");
        std::thread::spawn(move || {
            netns::enter(&path);
            let held = ferry::xdp::attach_pass("c0", ferry::xdp::XdpMode::Native);
            let ok = held.as_ref().map(|_| ()).map_err(|e| e.to_string());
            ready_tx.send(ok).unwrap();
            let _ = rx.recv();
            drop(held);
        });
        ready_rx.recv().unwrap().expect("XDP pass program on c0");
        lab.pass = Some(tx);
        let child = Command::new("ip")
            // Two shards: each writes its own sessions' links into the one map.
            .args(["netns", "exec", &r, BIN, "serve", "--shards", "2", "--log-lifecycle", "off"])
            .args(["--api-listen", &format!("{RELAY4}:{API_PORT}"), "--api-token", TOKEN])
            .args(["--relay-listen", &format!("[::]:{RELAY_PORT}"), "--advertise", RELAY4])
            .args(["--xdp", "native", "--xdp-interface", "r0"])
            .args([
                "--idle-timeout",
                &format!("{IDLE_MS}ms"),
                "--rebind-quiet",
                "100ms",
                "--drain-timeout",
                "30s",
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        lab.relay = Some(child);
        let clock = ferry::clock::Clock::new();
        let start = clock.now();
        while !in_ns(&c, || std::net::TcpStream::connect((RELAY4, API_PORT)).is_ok()) {
            if let Some(Ok(Some(st))) = lab.relay.as_mut().map(|p| p.try_wait()) {
                panic!("ferry serve exited: {st}");
            }
            assert!(clock.now() - start < 20_000, "the relay's API never came up");
            std::thread::sleep(Duration::from_millis(50));
        }
        let m = lab.metrics();
        assert!(
            m.contains("ferry_xdp_info{mode=\"native\",interface=\"r0\"} 1"),
            "the fast path is not attached:\n{}",
            m.lines().filter(|l| l.starts_with("ferry_xdp")).collect::<Vec<_>>().join("\n")
        );
        lab
    }

    fn api(&self) -> ApiClient {
        ApiClient::new(format!("http://{RELAY4}:{API_PORT}")).with_token(TOKEN)
    }

    fn metrics(&self) -> String {
        let api = self.api();
        in_ns(&self.ns("c"), move || {
            String::from_utf8(api.raw("GET", "/metrics", None).unwrap().body).unwrap()
        })
    }

    /// The value of one sample of /metrics (0 when absent).
    fn metric(&self, sample: &str) -> u64 {
        let prefix = format!("{sample} ");
        self.metrics()
            .lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn kernel_forwarded(&self) -> u64 {
        self.metric("ferry_xdp_packets_total{result=\"forwarded\"}")
    }

    fn user_forwarded(&self) -> u64 {
        self.metric("ferry_packets_out_total{kind=\"forward\"}")
    }

    /// A client socket at `ip` in the clients' namespace.
    fn socket(&self, ip: &str) -> UdpSocket {
        let ip: IpAddr = ip.parse().unwrap();
        let s = in_ns(&self.ns("c"), move || UdpSocket::bind((ip, 0)).unwrap());
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// A host and a joiner, bound, confirmed and connected: their link is in the kernel.
    fn session(&self, v6: bool, host_ip: &str, joiner_ip: &str) -> (Peer, Peer) {
        let api = self.api();
        let (h, j) = in_ns(&self.ns("c"), move || {
            let h = api.allocate(2, None).unwrap();
            let code = api.join_code(&h.allocation_id).unwrap();
            (h, api.join(&code).unwrap().allocation)
        });
        let relay: SocketAddr =
            if v6 { format!("[{RELAY6}]:{RELAY_PORT}") } else { format!("{RELAY4}:{RELAY_PORT}") }
                .parse()
                .unwrap();
        let host = Peer::new(&h, self.socket(host_ip), relay);
        let joiner = Peer::new(&j, self.socket(joiner_ip), relay);
        assert_eq!(host.bind(1), BIND_RECEIVED);
        host.send(&packets::ping(&host.id, 1));
        assert_eq!(host.recv()[3], MessageType::Ping as u8);
        assert_eq!(joiner.bind(1), BIND_RECEIVED);
        joiner.send(&packets::connect_request(&joiner.id, &host.conn));
        assert_eq!(joiner.recv()[3], MessageType::Accepted as u8);
        (host, joiner)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut p) = self.relay.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        self.pass.take();
        for n in ["r", "c"] {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(n)]).output();
        }
    }
}

const BIND_RECEIVED: [u8; 4] = [0xDA, 0x72, 0x00, 0x01];

/// A client that sends what Unity Transport sends.
struct Peer {
    sock: UdpSocket,
    relay: SocketAddr,
    id: AllocationId,
    key: AllocationKey,
    conn: Vec<u8>,
}

impl Peer {
    fn new(a: &Allocation, sock: UdpSocket, relay: SocketAddr) -> Self {
        Self {
            sock,
            relay,
            id: AllocationId(B64.decode(&a.allocation_id_bytes).unwrap().try_into().unwrap()),
            key: AllocationKey(B64.decode(&a.key).unwrap().try_into().unwrap()),
            conn: B64.decode(&a.connection_data).unwrap(),
        }
    }

    fn send(&self, d: &[u8]) {
        self.sock.send_to(d, self.relay).unwrap();
    }

    fn recv(&self) -> Vec<u8> {
        let mut buf = [0u8; 2048];
        let (n, from) = self.sock.recv_from(&mut buf).expect("a datagram from the relay");
        assert_eq!(from, self.relay, "datagrams come from the relay's address");
        buf[..n].to_vec()
    }

    fn bind(&self, nonce: u16) -> Vec<u8> {
        self.send(&packets::bind(&self.key, nonce, &self.conn));
        self.recv()
    }

    fn relay_to(&self, to: &Peer, payload: &[u8]) {
        self.relay_to_id(&to.id, payload);
    }

    fn relay_to_id(&self, to: &AllocationId, payload: &[u8]) {
        self.send(&packets::relay(&self.id, to, payload).unwrap());
    }

    /// Asserts that nothing arrives within `ms`.
    fn silent(&self, ms: u64) {
        self.sock.set_read_timeout(Some(Duration::from_millis(ms))).unwrap();
        let mut buf = [0u8; 2048];
        let got = self.sock.recv_from(&mut buf);
        self.sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(got.is_err(), "unexpected datagram {:02x?}", got.map(|(n, _)| buf[..n].to_vec()));
    }

    /// Asserts that no RELAY arrives within `ms` (a DISCONNECT may: a host that expired first
    /// notifies its joiner).
    fn no_relay(&self, ms: u64) {
        self.sock.set_read_timeout(Some(Duration::from_millis(ms))).unwrap();
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = self.sock.recv_from(&mut buf) {
            assert_ne!(buf[3], MessageType::Relay as u8, "a RELAY arrived: {:02x?}", &buf[..n]);
        }
        self.sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }

    /// Sends `n` RELAYs to `to` in bursts the receiver drains, and checks each arrives intact.
    fn exchange(&self, to: &Peer, n: usize, size: usize) {
        for burst in 0..n.div_ceil(50) {
            let k = 50.min(n - burst * 50);
            for i in 0..k {
                let mut p = vec![(i % 251) as u8; size];
                p[..2].copy_from_slice(&((burst * 50 + i) as u16).to_be_bytes());
                self.relay_to(to, &p);
            }
            for i in 0..k {
                let d = to.recv();
                assert_eq!(d[3], MessageType::Relay as u8);
                assert_eq!(&d[4..20], &self.id.0, "from");
                assert_eq!(&d[20..36], &to.id.0, "to");
                assert_eq!(d.len(), 38 + size);
                assert_eq!(
                    u16::from_be_bytes([d[38], d[39]]) as usize,
                    burst * 50 + i,
                    "in order, none lost"
                );
            }
        }
    }
}

#[test]
fn unity_flow_rides_the_kernel_path_and_every_datagram_is_counted_once() {
    let lab = Lab::new();
    for (v6, h, j) in [(false, "10.77.0.2", "10.77.0.3"), (true, "fd77::2", "fd77::3")] {
        let (host, joiner) = lab.session(v6, h, j);
        let (k0, u0) = (lab.kernel_forwarded(), lab.user_forwarded());
        host.exchange(&joiner, 300, 64);
        joiner.exchange(&host, 300, 1200);
        let (k1, u1) = (lab.kernel_forwarded(), lab.user_forwarded());
        println!("IPv{}: kernel forwarded {}, userspace {}", if v6 { 6 } else { 4 }, k1 - k0, u1 - u0);
        assert_eq!(k1 - k0, 600, "every RELAY of an established link is the kernel's");
        assert_eq!(u1 - u0, 0, "and none of them reached userspace");
    }
    let bytes = lab.metric("ferry_xdp_bytes_total{result=\"forwarded\"}");
    assert_eq!(bytes, 2 * 300 * (38 + 64) + 2 * 300 * (38 + 1200), "forwarded payload bytes");
    assert_eq!(lab.metric("ferry_xdp_links"), 2, "two sessions, one link each");
    assert_eq!(lab.metric("ferry_xdp_links_max"), 131_072);
    // The links map is preallocated: at least key and value of every entry it can hold.
    let map_bytes = lab.metric("ferry_xdp_map_bytes");
    let entries = (ferry::xdp::layout::KEY_SIZE + ferry::xdp::layout::LINK_SIZE) as u64 * 2 * 131_072;
    assert!(map_bytes >= entries, "ferry_xdp_map_bytes {map_bytes} < {entries}");
}

#[test]
fn a_rebind_a_disconnect_an_expiry_and_a_host_leaving_stop_the_kernel_at_once() {
    let lab = Lab::new();

    // Rebind: the joiner's NAT gives it a new address. The first RELAY after BIND_RECEIVED
    // reaches the new address, never the old one.
    let (host, mut joiner) = lab.session(false, "10.77.0.2", "10.77.0.3");
    host.exchange(&joiner, 20, 40);
    let old = std::mem::replace(&mut joiner.sock, lab.socket("10.77.0.4"));
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(joiner.bind(2), BIND_RECEIVED);
    let k = lab.kernel_forwarded();
    host.relay_to(&joiner, b"after the move");
    let d = joiner.recv();
    assert_eq!(&d[38..], b"after the move");
    old.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(old.recv_from(&mut [0u8; 2048]).is_err(), "a RELAY went to the old address");
    assert_eq!(lab.kernel_forwarded(), k, "the kernel forwarded to a moved client");
    // Once the client has spoken from its new address (through userspace: the kernel has no
    // link for it yet), the link is the kernel's again.
    joiner.exchange(&host, 1, 40);
    let k = lab.kernel_forwarded();
    joiner.exchange(&host, 20, 40);
    host.exchange(&joiner, 20, 40);
    assert_eq!(lab.kernel_forwarded(), k + 40, "the link went back to the kernel");

    // DISCONNECT: the host's next RELAY is refused, by userspace.
    joiner.send(&packets::disconnect(&joiner.id, &host.id));
    assert_eq!(host.recv()[3], MessageType::Disconnect as u8);
    let k = lab.kernel_forwarded();
    host.relay_to(&joiner, b"after disconnect");
    assert_eq!(host.recv()[3], MessageType::Error as u8, "userspace answers: not connected");
    joiner.silent(300);
    assert_eq!(lab.kernel_forwarded(), k);

    // Host leaving: CLOSE takes its session with it.
    let (host, joiner) = lab.session(false, "10.77.0.5", "10.77.0.6");
    host.exchange(&joiner, 20, 40);
    host.send(&packets::close(&host.id));
    assert_eq!(joiner.recv()[3], MessageType::Disconnect as u8);
    let k = lab.kernel_forwarded();
    joiner.relay_to(&host, b"after close");
    host.silent(300);
    assert_eq!(lab.kernel_forwarded(), k, "the kernel forwarded to a host that left");

    // Expiry: a quiet session times out and its link goes with it.
    let (host, joiner) = lab.session(false, "10.77.0.7", "10.77.0.8");
    host.exchange(&joiner, 20, 40);
    std::thread::sleep(Duration::from_millis(IDLE_MS + 1200));
    let k = lab.kernel_forwarded();
    host.relay_to(&joiner, b"after expiry");
    joiner.no_relay(300);
    assert_eq!(lab.kernel_forwarded(), k, "the kernel forwarded for an expired session");
    assert!(lab.metric("ferry_xdp_link_updates_total{kind=\"down\"}") >= 4);
}

#[test]
fn kernel_only_traffic_keeps_a_session_alive_past_the_idle_timeout() {
    let lab = Lab::new();
    let (host, joiner) = lab.session(true, "fd77::4", "fd77::5");
    let clock = ferry::clock::Clock::new();
    let start = clock.now();
    // Three idle timeouts of RELAYs both ways and nothing else: userspace sees none of them.
    while clock.now() - start < 3 * IDLE_MS {
        host.exchange(&joiner, 5, 40);
        joiner.exchange(&host, 5, 40);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(lab.user_forwarded(), 0);
    host.exchange(&joiner, 10, 40);
    joiner.exchange(&host, 10, 40);
    host.send(&packets::ping(&host.id, 1));
    assert_eq!(host.recv()[3], MessageType::Ping as u8, "the host's allocation is alive");
    assert_eq!(lab.metric("ferry_allocations_released_total{reason=\"timed_out\"}"), 0);
}

#[test]
fn forged_and_unlinked_relays_are_left_to_userspace() {
    let lab = Lab::new();
    let (host, joiner) = lab.session(false, "10.77.0.2", "10.77.0.3");
    let wrong0 = lab.metric("ferry_xdp_packets_total{result=\"wrong_source\"}");
    // Someone else sends as the joiner.
    let forger = lab.socket("10.77.0.9");
    for _ in 0..5 {
        forger
            .send_to(&packets::relay(&joiner.id, &host.id, b"forged").unwrap(), (RELAY4, RELAY_PORT))
            .unwrap();
    }
    host.silent(300);
    assert_eq!(lab.metric("ferry_xdp_packets_total{result=\"wrong_source\"}") - wrong0, 5);
    // Two hosts that are not linked.
    let (other, _) = lab.session(false, "10.77.0.4", "10.77.0.5");
    let unlinked0 = lab.metric("ferry_xdp_packets_total{result=\"no_link\"}");
    let k = lab.kernel_forwarded();
    for _ in 0..5 {
        other.relay_to(&host, b"not linked");
        assert_eq!(other.recv()[3], MessageType::Error as u8, "userspace answers: not connected");
    }
    host.silent(300);
    assert_eq!(lab.metric("ferry_xdp_packets_total{result=\"no_link\"}") - unlinked0, 5);
    assert_eq!(lab.kernel_forwarded(), k);
    // BIND, PING and STUN pass to userspace and are answered there.
    let passed = lab.metric("ferry_xdp_packets_total{result=\"not_relay\"}");
    host.send(&packets::ping(&host.id, 1));
    assert_eq!(host.recv()[3], MessageType::Ping as u8);
    assert!(lab.metric("ferry_xdp_packets_total{result=\"not_relay\"}") > passed);
}

#[test]
fn a_driver_that_refuses_the_program_leaves_the_relay_in_userspace_with_a_log_line() {
    require_root();
    static SEQ: AtomicU32 = AtomicU32::new(100);
    let ns = format!("fy{}x{}l", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed));
    sh(&["ip", "netns", "add", &ns]);
    sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
    struct Gone(String, Option<Child>);
    impl Drop for Gone {
        fn drop(&mut self) {
            if let Some(mut p) = self.1.take() {
                let _ = p.kill();
                let _ = p.wait();
            }
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }
    let log = std::env::temp_dir().join(format!("{ns}.log"));
    // The loopback device has no driver-mode XDP: native attach fails.
    let child = Command::new("ip")
        .args(["netns", "exec", &ns, BIN, "serve", "--shards", "1", "--log-lifecycle", "off"])
        .args(["--api-listen", "127.0.0.1:8080", "--relay-listen", "127.0.0.1:7777"])
        .args(["--xdp", "native", "--xdp-interface", "lo"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut guard = Gone(ns.clone(), Some(child));
    let clock = ferry::clock::Clock::new();
    let start = clock.now();
    while !in_ns(&ns, || std::net::TcpStream::connect(("127.0.0.1", 8080)).is_ok()) {
        if let Some(Ok(Some(st))) = guard.1.as_mut().map(|p| p.try_wait()) {
            panic!("ferry serve exited: {st}: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        assert!(clock.now() - start < 20_000, "the relay's API never came up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).ok();
    assert!(
        text.contains("the kernel fast path could not be attached; relaying in userspace only"),
        "{text}"
    );
    // The relay works without it: an allocation binds and answers PING.
    in_ns(&ns, || {
        let api = ApiClient::new("http://127.0.0.1:8080");
        let a = api.allocate(1, None).unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let peer = Peer::new(&a, sock, "127.0.0.1:7777".parse().unwrap());
        assert_eq!(peer.bind(1), BIND_RECEIVED);
        peer.send(&packets::ping(&peer.id, 1));
        assert_eq!(peer.recv()[3], MessageType::Ping as u8);
        let m = String::from_utf8(api.raw("GET", "/metrics", None).unwrap().body).unwrap();
        assert!(!m.contains("ferry_xdp_info"), "no fast path is reported");
    });
}

#[test]
fn drain_takes_every_link_out_of_the_kernel_and_sessions_go_on_in_userspace() {
    let lab = Lab::new();
    let (host, joiner) = lab.session(false, "10.77.0.2", "10.77.0.3");
    host.exchange(&joiner, 50, 64);
    let (k, u) = (lab.kernel_forwarded(), lab.user_forwarded());
    let pid = lab.relay.as_ref().unwrap().id() as i32;
    // SAFETY: signalling the relay process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let clock = ferry::clock::Clock::new();
    let start = clock.now();
    while lab.metric("ferry_xdp_link_updates_total{kind=\"down\"}") < 1 {
        assert!(clock.now() - start < 5_000, "no link was withdrawn at drain");
        std::thread::sleep(Duration::from_millis(20));
    }
    host.exchange(&joiner, 50, 64);
    joiner.exchange(&host, 50, 64);
    assert_eq!(lab.kernel_forwarded(), k, "the kernel forwarded during drain");
    assert_eq!(lab.metric("ferry_xdp_links"), 0, "no link is left in the kernel");
    assert_eq!(lab.user_forwarded(), u + 100, "userspace carries the session");
}

#[test]
fn a_link_with_a_dtls_client_stays_in_userspace() {
    let lab = Lab::new();
    let api = lab.api();
    let (h, j) = in_ns(&lab.ns("c"), move || {
        let h = api.allocate(2, None).unwrap();
        let code = api.join_code(&h.allocation_id).unwrap();
        (h, api.join(&code).unwrap().allocation)
    });
    let host = Peer::new(&h, lab.socket("10.77.0.2"), format!("{RELAY4}:{RELAY_PORT}").parse().unwrap());
    assert_eq!(host.bind(1), BIND_RECEIVED);
    host.send(&packets::ping(&host.id, 1));
    assert_eq!(host.recv()[3], MessageType::Ping as u8);
    let k = lab.kernel_forwarded();
    let hid = host.id;
    let hconn = host.conn.clone();
    let mut joiner = in_ns(&lab.ns("c"), move || {
        let mut c = ferry::client::RelayClient::with_transport(&j, ferry::client::Transport::Dtls).unwrap();
        c.bind().unwrap();
        assert_eq!(c.connect(&hconn).unwrap(), hid);
        c
    });
    for i in 0..10u8 {
        joiner.send(&host.id, &[i; 100]).unwrap();
        let d = host.recv();
        assert_eq!(&d[38..], &[i; 100]);
        host.relay_to_id(&joiner.id(), &[i; 60]);
        let (from, p) = joiner.recv_relay(Duration::from_secs(5)).unwrap().expect("a RELAY over DTLS");
        assert_eq!((from, p), (host.id, vec![i; 60]));
    }
    assert_eq!(lab.kernel_forwarded(), k, "the kernel cannot seal for a DTLS client");
    assert!(lab.metric("ferry_xdp_link_updates_total{kind=\"not_plain_udp\"}") >= 1);
}

#[test]
fn a_changed_next_hop_reaches_an_established_link() {
    // The program keeps each link's next hop for a second (docs/fastpath.md). When the
    // recipient's MAC address changes, the link follows the neighbour table, not its cache.
    let lab = Lab::new();
    let (host, joiner) = lab.session(false, "10.77.0.2", "10.77.0.3");
    host.exchange(&joiner, 20, 64);
    let (k, u) = (lab.kernel_forwarded(), lab.user_forwarded());
    let mac = "02:00:00:77:00:03";
    sh(&["ip", "-n", &lab.ns("c"), "link", "set", "c0", "address", mac]);
    for ip in ["10.77.0.2", "10.77.0.3"] {
        sh(&["ip", "-n", &lab.ns("r"), "neigh", "replace", ip, "lladdr", mac, "dev", "r0"]);
    }
    // Frames still addressed to the old MAC are dropped by the clients' interface; send until
    // one arrives (at most 8 s of 100 ms rounds).
    joiner.sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 2048];
    let mut arrived = None;
    for round in 0u16..80 {
        host.relay_to(&joiner, &round.to_be_bytes());
        if let Ok((n, _)) = joiner.sock.recv_from(&mut buf) {
            arrived = Some(buf[..n].to_vec());
            break;
        }
    }
    let d = arrived.expect("no RELAY reached the recipient's new MAC address");
    assert_eq!(d[3], MessageType::Relay as u8);
    // Rounds still in flight.
    joiner.sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    while joiner.sock.recv_from(&mut buf).is_ok() {}
    joiner.sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.exchange(&joiner, 20, 64);
    joiner.exchange(&host, 20, 64);
    assert!(lab.kernel_forwarded() >= k + 41, "the kernel carried the link throughout");
    assert_eq!(lab.user_forwarded(), u, "none of it went through userspace");
}

#[test]
fn relays_arriving_as_driver_frames_are_forwarded_intact() {
    // Frames from the kernel's page pool (`ferry bench-xdp-gen`'s source) reach the relay's
    // interface the way a NIC's driver hands them over, not as socket buffers: the program runs
    // on them in place, and the relay's rewrite must not leak into the next copy the pool makes.
    let lab = Lab::new();
    let (host, joiner) = lab.session(false, "10.77.0.2", "10.77.0.3");
    host.exchange(&joiner, 5, 64);
    let k = lab.kernel_forwarded();
    let from = host.sock.local_addr().unwrap();
    let msg = packets::relay(&host.id, &joiner.id, &[0x5a; 200]).unwrap();
    // (This thread's sysfs is the host's: ask `ip` for the MAC addresses.)
    let mac = |ns: &str, dev: &str| -> [u8; 6] {
        let out = Command::new("ip").args(["-n", ns, "-br", "link", "show", dev]).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let field = text.split_whitespace().nth(2).expect("a MAC address");
        let v: Vec<u8> = field.split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
        v.try_into().unwrap()
    };
    let (rmac, cmac) = (mac(&lab.ns("r"), "r0"), mac(&lab.ns("c"), "c0"));
    // Each arrives in a page of its own: room for all 500 (root may exceed rmem_max).
    let room: libc::c_int = 8 << 20;
    // SAFETY: setsockopt on a socket this test owns, with a c_int value.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&joiner.sock),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &room as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    in_ns(&lab.ns("c"), move || {
        let mut frame =
            ferry::xdp::frames::udp_frame(from, format!("{RELAY4}:{RELAY_PORT}").parse().unwrap(), &msg);
        frame[..6].copy_from_slice(&rmac);
        frame[6..12].copy_from_slice(&cmac);
        let generator = ferry::xdp::load_generator().unwrap();
        let c0 = ferry::xdp::if_index("c0").unwrap();
        for _ in 0..5 {
            ferry::xdp::generate(&generator, &frame, c0, 100).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut got = 0;
    joiner.sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 2048];
    while let Ok((n, src)) = joiner.sock.recv_from(&mut buf) {
        assert_eq!(src, format!("{RELAY4}:{RELAY_PORT}").parse::<SocketAddr>().unwrap());
        assert_eq!(buf[3], MessageType::Relay as u8);
        assert_eq!(&buf[4..20], &host.id.0);
        assert_eq!(&buf[20..36], &joiner.id.0);
        assert_eq!(&buf[38..n], &[0x5a; 200][..]);
        got += 1;
    }
    assert_eq!(got, 500, "every copy arrived, intact");
    assert_eq!(lab.kernel_forwarded(), k + 500, "all of them by the kernel");
}
