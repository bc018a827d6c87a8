//! Direct paths behind real NATs, in the kernel: network namespaces for the relay, two NAT
//! routers (nftables: full cone, port-restricted cone, symmetric, and one that lets UDP reach
//! only the relay) and two LANs, built and removed by the test. `ferry serve` runs in the relay's
//! namespace, `ferry tunnel host` and `ferry tunnel join` run as processes in the LANs, and
//! netcode.io, the QUIC `hytale/1` flow and the main/feed game run through them.
//!
//! Before asserting anything, each NAT's behaviour is measured from inside its LAN (STUN to two
//! addresses from one socket for the mapping, an unsolicited datagram for the filtering), so a
//! wrong router set-up fails loudly instead of passing by accident.
//!
//! Needs root (network namespaces) and `nft`; `dev/install-test-deps` installs nftables. Without
//! them the tests fail: they are part of the suite, not optional. Run with `--nocapture` to see
//! the figures (time to first byte, time to direct, RTT direct and relay, relay bytes).
//!
//! ```text
//!   lan-a 192.168.1.2 ── 192.168.1.1 nat-a 100.64.1.2 ── 100.64.1.1 relay 100.64.2.1 ── 100.64.2.2 nat-b 192.168.2.1 ── 192.168.2.2 lan-b
//!   game servers, tunnel host                  ferry serve (and a second STUN address)                 tunnel join, game clients
//! ```

mod games;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use ferry::clock::Clock;
use ferry::wire::stun;

const BIN: &str = env!("CARGO_BIN_EXE_ferry");
const RELAY_IP: &str = "100.64.1.1";
/// The relay namespace's other address: a second STUN responder there tells mappings apart.
const ALT_IP: &str = "100.64.2.1";
const RELAY_PORT: u16 = 7777;
const API_PORT: u16 = 7880;
const ALT_STUN_PORT: u16 = 3478;
const API_TOKEN: &str = "nat-test-token-0123456789";

/// NAT behaviours, by RFC 4787 mapping and filtering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Nat {
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    PortRestricted,
    /// Address-and-port-dependent mapping (a random port per destination) and filtering.
    Symmetric,
    /// UDP reaches the relay's address only.
    Blocked,
}

impl Nat {
    fn name(self) -> &'static str {
        match self {
            Nat::FullCone => "full cone",
            Nat::PortRestricted => "port-restricted",
            Nat::Symmetric => "symmetric",
            Nat::Blocked => "UDP blocked",
        }
    }

    /// The router's nftables ruleset (`lan_host` behind it).
    fn ruleset(self, lan_host: &str, loss: u32) -> String {
        let dnat = if self == Nat::FullCone {
            format!("iifname \"wan\" udp dport 1024-65535 dnat to {lan_host}")
        } else {
            String::new()
        };
        let random = if self == Nat::Symmetric { "random" } else { "" };
        let block = if self == Nat::Blocked {
            format!("iifname \"lan\" oifname \"wan\" meta l4proto udp ip daddr != {RELAY_IP} drop")
        } else {
            String::new()
        };
        let lossy = if loss > 0 {
            format!("meta l4proto udp numgen random mod 100 < {loss} drop")
        } else {
            String::new()
        };
        let cone = if self == Nat::FullCone { "iifname \"wan\" ct status dnat accept" } else { "" };
        format!(
            "table ip nat {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    {dnat}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"wan\" masquerade {random}
  }}
}}
table inet filter {{
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname \"wan\" ct state new drop
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    {lossy}
    {block}
    iifname \"wan\" ct state established,related accept
    {cone}
    iifname \"wan\" drop
  }}
}}
"
        )
    }
}

mod netns;
use netns::{in_ns, sh};

/// Kills a child process when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The namespaces, the routers, the relay and a second STUN responder.
struct Lab {
    tag: String,
    relay: Option<Proc>,
    control: std::path::PathBuf,
    stop: Arc<AtomicBool>,
}

const NAMESPACES: [&str; 5] = ["relay", "nata", "natb", "lana", "lanb"];

impl Lab {
    fn ns(&self, n: &str) -> String {
        format!("{}{n}", self.tag)
    }

    fn new(a: Nat, b: Nat, loss_a: u32) -> Self {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tag = format!("fy{}x{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed));
        let mut lab = Lab {
            control: std::env::temp_dir().join(format!("{tag}.ctl")),
            tag,
            relay: None,
            stop: Arc::new(AtomicBool::new(false)),
        };
        for n in NAMESPACES {
            sh(&["ip", "netns", "add", &lab.ns(n)]);
            sh(&["ip", "-n", &lab.ns(n), "link", "set", "lo", "up"]);
        }
        let (relay, nata, natb, lana, lanb) =
            (lab.ns("relay"), lab.ns("nata"), lab.ns("natb"), lab.ns("lana"), lab.ns("lanb"));
        for (nat, lan, side, wan_net, lan_net) in
            [(&nata, &lana, "ra", "100.64.1", "192.168.1"), (&natb, &lanb, "rb", "100.64.2", "192.168.2")]
        {
            sh(&[
                "ip", "link", "add", side, "netns", &relay, "type", "veth", "peer", "name", "wan", "netns",
                nat,
            ]);
            sh(&[
                "ip", "link", "add", "lan", "netns", nat, "type", "veth", "peer", "name", "eth0", "netns",
                lan,
            ]);
            sh(&["ip", "-n", &relay, "addr", "add", &format!("{wan_net}.1/24"), "dev", side]);
            sh(&["ip", "-n", nat, "addr", "add", &format!("{wan_net}.2/24"), "dev", "wan"]);
            sh(&["ip", "-n", nat, "addr", "add", &format!("{lan_net}.1/24"), "dev", "lan"]);
            sh(&["ip", "-n", lan, "addr", "add", &format!("{lan_net}.2/24"), "dev", "eth0"]);
            sh(&["ip", "-n", &relay, "link", "set", side, "up"]);
            for dev in ["wan", "lan"] {
                sh(&["ip", "-n", nat, "link", "set", dev, "up"]);
            }
            sh(&["ip", "-n", lan, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", nat, "route", "add", "default", "via", &format!("{wan_net}.1")]);
            sh(&["ip", "-n", lan, "route", "add", "default", "via", &format!("{lan_net}.1")]);
            sh(&["ip", "netns", "exec", nat, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        }
        sh(&["ip", "netns", "exec", &relay, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        for (nat, kind, host, loss) in [(&nata, a, "192.168.1.2", loss_a), (&natb, b, "192.168.2.2", 0)] {
            let mut nft = Command::new("ip")
                .args(["netns", "exec", nat, "nft", "-f", "-"])
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("nft (dev/install-test-deps installs nftables)");
            nft.stdin.take().unwrap().write_all(kind.ruleset(host, loss).as_bytes()).unwrap();
            let out = nft.wait_with_output().unwrap();
            assert!(out.status.success(), "nft for {kind:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let child = Command::new("ip")
            .args(["netns", "exec", &relay, BIN, "serve", "--shards", "1", "--log-lifecycle", "off"])
            .args(["--api-listen", &format!("0.0.0.0:{API_PORT}")])
            // Bound to its address: a relay on 0.0.0.0 in a namespace with two addresses would
            // answer lan-b from the other one, which lan-b's NAT rightly drops.
            .args(["--relay-listen", &format!("{RELAY_IP}:{RELAY_PORT}")])
            .args(["--advertise", RELAY_IP, "--api-token", API_TOKEN])
            .arg("--control-socket")
            .arg(&lab.control)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        lab.relay = Some(Proc(child));
        // A STUN responder on the relay's other address, for the mapping measurement.
        let stop = lab.stop.clone();
        let alt = in_ns(&relay, move || UdpSocket::bind((ALT_IP, ALT_STUN_PORT)).unwrap());
        std::thread::spawn(move || {
            alt.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            let mut buf = [0u8; 600];
            let mut out = [0u8; stun::MAX_RESPONSE];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = alt.recv_from(&mut buf) else { continue };
                if let Ok(req) = stun::BindingRequest::parse(&buf[..n]) {
                    if let Some(len) = req.emit_response(&from, &mut out) {
                        let _ = alt.send_to(&out[..len], from);
                    }
                }
            }
        });
        lab.wait_for_api();
        lab
    }

    fn api_url(&self) -> String {
        format!("http://{RELAY_IP}:{API_PORT}")
    }

    fn wait_for_api(&mut self) {
        let clock = Clock::new();
        let lan = self.ns("lana");
        loop {
            let up = in_ns(&lan, || std::net::TcpStream::connect((RELAY_IP, API_PORT)).is_ok());
            if up {
                return;
            }
            if let Some(Ok(Some(st))) = self.relay.as_mut().map(|p| p.0.try_wait()) {
                panic!("ferry serve exited: {st}");
            }
            assert!(clock.now() < 15_000, "the relay's API did not come up in its namespace");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The relay's datagram and byte counters (in, all kinds).
    fn relay_bytes_in(&self) -> u64 {
        let out =
            Command::new(BIN).args(["ctl", "--socket"]).arg(&self.control).arg("stats").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("ferry_bytes_in_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ferry_bytes_in_total in: {text}"))
    }

    /// Measures the NAT in front of `lan` from inside it.
    fn measure(&self, lan: &str) -> Nat {
        let s = in_ns(&self.ns(lan), || UdpSocket::bind("0.0.0.0:0").unwrap());
        let relay: SocketAddr = format!("{RELAY_IP}:{RELAY_PORT}").parse().unwrap();
        let alt: SocketAddr = format!("{ALT_IP}:{ALT_STUN_PORT}").parse().unwrap();
        let m1 = stun_mapped(&s, relay).unwrap_or_else(|| panic!("{lan}: the relay answers no STUN"));
        let Some(m2) = stun_mapped(&s, alt) else { return Nat::Blocked };
        // An unsolicited datagram from an endpoint this socket never sent to.
        let other = in_ns(&self.ns("relay"), || UdpSocket::bind((RELAY_IP, 0)).unwrap());
        for _ in 0..3 {
            other.send_to(b"filter-check", m1).unwrap();
        }
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut buf = [0u8; 64];
        let open = matches!(s.recv_from(&mut buf), Ok((12, _)));
        match (m1 == m2, open) {
            (true, true) => Nat::FullCone,
            (true, false) => Nat::PortRestricted,
            (false, false) => Nat::Symmetric,
            (false, true) => panic!("{lan}: a NAT with varying mappings and open filtering ({m1} / {m2})"),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.relay.take();
        for n in NAMESPACES {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(n)]).output();
        }
        let _ = std::fs::remove_file(&self.control);
    }
}

/// The mapped address a STUN Binding to `to` reports for `s` (5 tries).
fn stun_mapped(s: &UdpSocket, to: SocketAddr) -> Option<SocketAddr> {
    let tx: [u8; 12] = *b"ferry-nattst";
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = [0u8; 600];
    for _ in 0..5 {
        s.send_to(&stun::binding_request(tx), to).unwrap();
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            if from == to {
                if let Some(a) = stun::mapped_address(&buf[..n], &tx) {
                    return Some(a);
                }
            }
        }
    }
    None
}

/// A `ferry tunnel` process in a LAN namespace, its JSON events on a channel.
struct Tunnel {
    _proc: Proc,
    events: Receiver<serde_json::Value>,
    status: std::path::PathBuf,
}

impl Tunnel {
    fn start(lab: &Lab, lan: &str, args: &[String]) -> Self {
        let status = std::env::temp_dir().join(format!("{}-{lan}.sock", lab.tag));
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(lan), BIN, "tunnel"])
            .args(args)
            .args(["--json", "--api", &lab.api_url(), "--api-token", API_TOKEN, "--punch-interval", "200ms"])
            .arg("--status-socket")
            .arg(&status)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, events) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Tunnel { _proc: Proc(child), events, status }
    }

    fn next(&self, what: &str) -> serde_json::Value {
        self.events.recv_timeout(Duration::from_secs(15)).unwrap_or_else(|_| panic!("no {what} event"))
    }

    /// `ferry tunnel status --json` for this tunnel.
    fn status(&self) -> serde_json::Value {
        let out = Command::new(BIN)
            .args(["tunnel", "status", "--json", "--socket"])
            .arg(&self.status)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn path(&self) -> serde_json::Value {
        self.status()["paths"][0].clone()
    }
}

/// What one NAT pair measured.
#[derive(Debug)]
struct Figures {
    pair: String,
    route: String,
    first_byte_ms: u64,
    time_to_direct_ms: Option<u64>,
    rtt_direct_ms: Option<f64>,
    rtt_relay_ms: Option<f64>,
    relay_bytes_per_s_after: Option<f64>,
}

/// Game servers in lan-a: a UDP echo (port #0), netcode.io (#1), main/feed (#2, #3), QUIC (#4).
struct Servers {
    echo: SocketAddr,
    netcode: netcode::Server<netcode::NetcodeSocket>,
    netcode_key: [u8; 32],
    main_feed: (SocketAddr, SocketAddr),
    quic: SocketAddr,
    quic_cert: rustls::pki_types::CertificateDer<'static>,
    stop: Arc<AtomicBool>,
}

const NETCODE_PROTOCOL: u64 = 0x4645_5252_5900_0002;

fn start_servers(lab: &Lab) -> Servers {
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let lan = lab.ns("lana");
    let echo = in_ns(&lan, move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = s.local_addr().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        });
        a
    });
    let key = netcode::generate_key();
    let netcode = in_ns(&lan, move || netcode::Server::new("127.0.0.1:0", NETCODE_PROTOCOL, key).unwrap());
    let (st, seen) = (stop.clone(), Arc::new(Mutex::new(games::main_feed::Seen::default())));
    let main_feed = in_ns(&lan, move || {
        let (m, f, _t) = games::main_feed::game_server(st, seen);
        (m, f)
    });
    let st = stop.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let lan2 = lan.clone();
    std::thread::spawn(move || {
        in_ns(&lan2, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let _g = rt.enter();
            let (ep, cert) = games::quic::server("127.0.0.1:0".parse().unwrap());
            tx.send((ep.local_addr().unwrap(), cert)).unwrap();
            rt.block_on(async move {
                tokio::spawn(games::quic::serve(ep));
                while !st.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        })
    });
    let (quic, quic_cert) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    Servers { echo, netcode, netcode_key: key, main_feed, quic, quic_cert, stop }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// netcode.io from lan-b through the join tunnel's port #1 to the server in lan-a.
fn run_netcode(lab: &Lab, srv: &mut Servers, local: SocketAddr) {
    let server_addr = srv.netcode.addr();
    let token = netcode::ConnectToken::build(local, NETCODE_PROTOCOL, 7, srv.netcode_key)
        .internal_addresses(server_addr)
        .unwrap()
        .timeout_seconds(15)
        .generate()
        .unwrap()
        .try_into_bytes()
        .unwrap();
    let mut client = in_ns(&lab.ns("lanb"), move || netcode::Client::new(&token).unwrap());
    client.connect();
    let clock = Clock::new();
    let (mut to_server, mut to_client) = (0, 0);
    while to_client < 20 {
        assert!(clock.now() < 15_000, "netcode did not connect and talk: {:?}", client.state());
        let now = clock.nanos() as f64 / 1e9;
        let server = &mut srv.netcode;
        server.update(now);
        client.update(now);
        while let Some((p, idx)) = server.recv() {
            assert_eq!(p, b"c2s");
            to_server += 1;
            server.send(b"s2c", idx).unwrap();
        }
        while let Some(p) = client.recv() {
            assert_eq!(p, b"s2c");
            to_client += 1;
        }
        if client.is_connected() {
            client.send(b"c2s").unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(to_server >= 20);
    client.disconnect().unwrap();
}

/// The main/feed handshake and a few rounds of play, from lan-b.
fn run_main_feed(lab: &Lab, local: [SocketAddr; 2]) {
    in_ns(&lab.ns("lanb"), move || {
        let main = UdpSocket::bind("127.0.0.1:0").unwrap();
        let feed = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(games::main_feed::handshake(&main, &feed, &local, false), games::main_feed::CONN_OK);
        for i in 0..3 {
            games::main_feed::play(&main, &feed, &local, &format!("round {i}"));
        }
    });
}

/// The QUIC login and play exchange, from lan-b.
fn run_quic(lab: &Lab, cert: rustls::pki_types::CertificateDer<'static>, target: SocketAddr) {
    in_ns(&lab.ns("lanb"), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _g = rt.enter();
        rt.block_on(async move {
            let ep = games::quic::client(cert);
            let conn =
                tokio::time::timeout(Duration::from_secs(20), ep.connect(target, "localhost").unwrap())
                    .await
                    .expect("QUIC handshake in time")
                    .expect("QUIC handshake");
            assert_eq!(games::quic::exchange(&conn, "Connect").await, "AuthGrant");
            assert_eq!(games::quic::exchange(&conn, "AuthToken").await, "ServerAuthToken");
            assert_eq!(games::quic::exchange(&conn, "Play").await, "PlayOk");
            for _ in 0..5 {
                assert_eq!(games::quic::exchange(&conn, "Ping").await, "Pong");
            }
            conn.close(0u32.into(), b"bye");
            ep.wait_idle().await;
        });
    });
}

/// One NAT pair: measure both NATs, start the tunnels, check the path, run the games.
fn pair(a: Nat, b: Nat, loss: u32, want_direct: bool) -> Figures {
    let lab = Lab::new(a, b, loss);
    assert_eq!(lab.measure("lana"), a, "the NAT in front of lan-a is not what was built");
    assert_eq!(lab.measure("lanb"), b, "the NAT in front of lan-b is not what was built");
    let mut srv = start_servers(&lab);
    let mut forwards = vec![srv.echo, srv.netcode.addr(), srv.main_feed.0, srv.main_feed.1, srv.quic];
    let mut host_args = vec!["host".to_string()];
    for f in forwards.drain(..) {
        host_args.push("--forward".into());
        host_args.push(f.to_string());
    }
    let host = Tunnel::start(&lab, "lana", &host_args);
    let ready = host.next("ready");
    let code = ready["join_code"].as_str().expect("a join code").to_string();
    // Time to first byte counts from the join tunnel's start (join, bind, HELLO, first echo).
    let clock = Clock::new();
    let join = Tunnel::start(&lab, "lanb", &["join".into(), code]);
    let ready = join.next("ready");
    let local: Vec<SocketAddr> =
        ready["listen"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().parse().unwrap()).collect();
    assert_eq!(local.len(), 5);
    let echo_to = local[0];
    in_ns(&lab.ns("lanb"), move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..100 {
            s.send_to(b"first", echo_to).unwrap();
            if s.recv_from(&mut buf).is_ok() {
                return;
            }
        }
        panic!("no echo through the tunnels in 10 s");
    });
    let first_byte_ms = clock.now();
    // The path: direct when the pair allows it, else the relay once the fast attempts are over.
    let start = clock.now();
    let path = loop {
        let p = join.path();
        let attempts = p["attempts"].as_u64().unwrap_or(0);
        if p["route"] == "direct" && want_direct {
            break p;
        }
        if !want_direct && attempts >= 10 {
            break p;
        }
        assert!(clock.now() - start < 15_000, "{}: no outcome yet: {p}", lab.tag);
        std::thread::sleep(Duration::from_millis(100));
    };
    let route = path["route"].as_str().unwrap().to_string();
    assert_eq!(route, if want_direct { "direct" } else { "relay" }, "{} × {}: {path}", a.name(), b.name());
    if want_direct {
        // The host proves its own direct path once the joiner's NAT lets its probes in (at
        // most one probe interval later).
        while host.path()["route"] != "direct" {
            assert!(clock.now() - start < 15_000, "the host sees no direct path: {}", host.path());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    run_netcode(&lab, &mut srv, local[1]);
    run_main_feed(&lab, [local[2], local[3]]);
    run_quic(&lab, srv.quic_cert.clone(), local[4]);
    // Relay bytes while game traffic flows on an established path.
    let before =
        (lab.relay_bytes_in(), join.status()["datagrams"]["to_relay"].as_u64().unwrap(), clock.now());
    let echo_to = local[0];
    in_ns(&lab.ns("lanb"), move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(2))).unwrap();
        let mut buf = [0u8; 256];
        for i in 0..300u32 {
            s.send_to(&[i as u8; 200], echo_to).unwrap();
            let _ = s.recv_from(&mut buf);
            std::thread::sleep(Duration::from_millis(8));
        }
    });
    let after = (lab.relay_bytes_in(), join.status()["datagrams"]["to_relay"].as_u64().unwrap(), clock.now());
    let game_via_relay = after.1 - before.1;
    let final_path = join.path();
    if want_direct && final_path["route"] == "direct" {
        assert_eq!(game_via_relay, 0, "no game datagram through the relay while direct: {final_path}");
        // 300 game datagrams of 200 bytes went direct; the relay saw keep-alives only.
        assert!(after.0 - before.0 < 20_000, "relay bytes while direct: {}", after.0 - before.0);
    } else if !want_direct {
        assert!(game_via_relay >= 250, "game traffic on the relay: {game_via_relay}");
    }
    let secs = (after.2 - before.2) as f64 / 1000.0;
    let f = Figures {
        pair: format!(
            "{} × {}{}",
            a.name(),
            b.name(),
            if loss > 0 { format!(", {loss} % loss") } else { String::new() }
        ),
        route,
        first_byte_ms,
        time_to_direct_ms: final_path["time_to_direct_ms"].as_u64(),
        rtt_direct_ms: final_path["rtt_direct_ms"].as_f64(),
        rtt_relay_ms: final_path["rtt_relay_ms"].as_f64(),
        relay_bytes_per_s_after: want_direct.then(|| (after.0 - before.0) as f64 / secs),
    };
    println!("FIGURES {f:?}");
    f
}

fn require_root_and_nft() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the NAT tests build network namespaces: run them as root");
    assert!(
        Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success()),
        "nft is missing: run dev/install-test-deps"
    );
}

/// Every pair, one at a time (they share nothing, but each holds fixed ports in its own
/// namespaces and the machine has few cores).
#[test]
fn nat_matrix_direct_where_possible_relay_where_not() {
    require_root_and_nft();
    use Nat::*;
    let cases = [
        (FullCone, FullCone, 0, true),
        (FullCone, PortRestricted, 0, true),
        (FullCone, Symmetric, 0, true),
        (PortRestricted, PortRestricted, 0, true),
        (PortRestricted, Symmetric, 0, false),
        (Symmetric, Symmetric, 0, false),
        (Blocked, PortRestricted, 0, false),
        (PortRestricted, PortRestricted, 5, true),
        (PortRestricted, Symmetric, 5, false),
    ];
    let mut figures = Vec::new();
    for (a, b, loss, direct) in cases {
        figures.push(pair(a, b, loss, direct));
    }
    println!("\n| NAT pair | path | first byte | time to direct | RTT direct | RTT relay | relay bytes/s while direct |");
    println!("|---|---|---|---|---|---|---|");
    let ms = |v: Option<f64>| v.map_or("–".to_string(), |m| format!("{m:.1} ms"));
    for f in &figures {
        println!(
            "| {} | {} | {} ms | {} | {} | {} | {} |",
            f.pair,
            f.route,
            f.first_byte_ms,
            f.time_to_direct_ms.map_or("–".to_string(), |t| format!("{t} ms")),
            ms(f.rtt_direct_ms),
            ms(f.rtt_relay_ms),
            f.relay_bytes_per_s_after.map_or("–".to_string(), |b| format!("{b:.0}")),
        );
    }
}
