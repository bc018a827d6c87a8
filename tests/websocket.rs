//! Relay over WebSocket (`ws`) and WebSocket over TLS (`wss`), judged the way Unity Transport's
//! native client judges a relay: its exact upgrade request, a strict check of the 101, binary
//! unmasked frames only, pongs for pings, nothing over 1386 bytes; mixed with UDP peers.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use ferry::client::packets;
use support::{pair, test_pki, Raw, Server, BIND_RECEIVED};

/// A Unity-Transport-shaped WebSocket client over any byte stream.
struct Ws<S: Read + Write> {
    io: S,
    buf: Vec<u8>,
}

/// UTP's request (`Runtime/WebSocket/WebSocket.cs`): Host is the IP:port, no subprotocol, no
/// extensions.
fn utp_upgrade(host: &str) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

impl<S: Read + Write> Ws<S> {
    fn open(mut io: S, host: &str) -> Self {
        io.write_all(utp_upgrade(host).as_bytes()).unwrap();
        let mut buf = Vec::new();
        let mut b = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = io.read(&mut b).unwrap();
            assert!(n > 0, "connection closed during the upgrade");
            buf.extend_from_slice(&b[..n]);
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8(buf[..end].to_vec()).unwrap();
        // The checks UTP makes before it accepts the connection.
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("\r\nupgrade: websocket\r\n"), "{head}");
        assert!(lower.contains("\r\nconnection: upgrade\r\n"), "{head}");
        assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{head}");
        assert!(!lower.contains("sec-websocket-protocol") && !lower.contains("sec-websocket-extensions"));
        Self { io, buf: buf[end..].to_vec() }
    }

    fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        self.io.write_all(&f).unwrap();
        self.io.flush().unwrap();
    }

    fn send(&mut self, m: &[u8]) {
        self.send_frame(0x2, m);
    }

    /// The next frame: (opcode, payload). Asserts what UTP requires of a server frame.
    fn frame(&mut self) -> (u8, Vec<u8>) {
        loop {
            if self.buf.len() >= 2 {
                let (b0, b1) = (self.buf[0], self.buf[1]);
                assert_eq!(b0 & 0x70, 0, "no reserved bits");
                assert_eq!(b1 & 0x80, 0, "server frames are unmasked");
                let (len, at) = match b1 & 0x7F {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    126 => (usize::MAX, 0),
                    127 => panic!("no 64-bit lengths for Relay messages"),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    assert_eq!(b0 & 0x80, 0x80, "final frames");
                    return (b0 & 0x0F, payload);
                }
            }
            let mut b = [0u8; 4096];
            let n = self.io.read(&mut b).expect("a frame from the relay");
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&b[..n]);
        }
    }

    fn recv(&mut self) -> Vec<u8> {
        let (op, p) = self.frame();
        assert_eq!(op, 0x2, "Relay messages come as binary frames");
        assert!(p.len() <= 1386, "UTP aborts on messages over 1386 bytes");
        p
    }
}

fn session(srv: &Server) -> (Raw, Raw) {
    let api = srv.api();
    let h = api.allocate(4, None).unwrap();
    let code = api.join_code(&h.allocation_id).unwrap();
    let j = api.join(&code).unwrap();
    let host = Raw::new(&h);
    assert_eq!(host.bind(0), BIND_RECEIVED);
    (host, Raw::new(&j.allocation))
}

fn join<S: Read + Write>(ws: &mut Ws<S>, j: &Raw, host: &Raw) {
    ws.send(&packets::bind(&j.key, 0, &j.conn));
    assert_eq!(ws.recv(), BIND_RECEIVED);
    ws.send(&packets::connect_request(&j.id, &host.conn));
    assert_eq!(ws.recv(), pair(6, &host.id, &j.id), "ACCEPTED");
}

#[test]
fn utps_exact_upgrade_then_a_whole_session_with_a_udp_host() {
    let srv = Server::start(|c| c.ws_listen = Some("127.0.0.1:0".parse().unwrap()));
    let ws_addr = srv.running().ws_addr.unwrap();
    let (host, j) = session(&srv);
    let eps = srv.api().allocate(1, None).unwrap().server_endpoints;
    let ws_ep = eps.iter().find(|e| e.connection_type == "ws").expect("a ws endpoint");
    assert_eq!(
        (ws_ep.network.as_str(), ws_ep.secure, ws_ep.reliable, ws_ep.port),
        ("tcp", false, true, ws_addr.port())
    );

    let tcp = TcpStream::connect(ws_addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut ws = Ws::open(tcp, &ws_addr.to_string());
    join(&mut ws, &j, &host);
    ws.send(&packets::relay(&j.id, &host.id, b"from a websocket").unwrap());
    assert_eq!(host.recv(), packets::relay(&j.id, &host.id, b"from a websocket").unwrap());
    host.relay_to(&j.id, b"from udp");
    assert_eq!(ws.recv(), packets::relay(&host.id, &j.id, b"from udp").unwrap());
    ws.send(&packets::ping(&j.id, 3));
    assert_eq!(ws.recv(), packets::ping(&j.id, 3));

    // A WebSocket ping gets a pong with the same payload.
    ws.send_frame(0x9, b"hb");
    assert_eq!(ws.frame(), (0xA, b"hb".to_vec()));

    // 1386 bytes reach the WebSocket client; 1387 would abort UTP's connection: not sent,
    // counted, and the connection lives on.
    host.relay_to(&j.id, &vec![1; 1386 - 38]);
    assert_eq!(ws.recv().len(), 1386);
    host.relay_to(&j.id, &vec![2; 1387 - 38]);
    host.relay_to(&j.id, b"after");
    assert_eq!(ws.recv(), packets::relay(&host.id, &j.id, b"after").unwrap());
    assert_eq!(srv.metric("ferry_ws_drops_total{reason=\"oversize\"}"), 1);

    // The close handshake.
    ws.send_frame(0x8, &1000u16.to_be_bytes());
    assert_eq!(ws.frame(), (0x8, 1000u16.to_be_bytes().to_vec()));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(srv.metric("ferry_ws_connections"), 0);
    assert_eq!(srv.metric("ferry_ws_messages_total{direction=\"in\"}"), 4, "BIND, CONNECT, RELAY, PING");
}

#[test]
fn text_frames_and_bad_upgrades_are_refused_with_a_reason() {
    let srv = Server::start(|c| c.ws_listen = Some("127.0.0.1:0".parse().unwrap()));
    let ws_addr = srv.running().ws_addr.unwrap();
    // A plain GET is no upgrade: 400 with the reason.
    let mut tcp = TcpStream::connect(ws_addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = tcp.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 400 ") && out.contains("Upgrade: websocket"), "{out}");
    // A text frame ends the connection with 1003.
    let tcp = TcpStream::connect(ws_addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut ws = Ws::open(tcp, &ws_addr.to_string());
    ws.send_frame(0x1, b"hello");
    assert_eq!(ws.frame(), (0x8, 1003u16.to_be_bytes().to_vec()));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(srv.metric("ferry_ws_connections_total{result=\"bad_upgrade\"}"), 1);
    assert_eq!(srv.metric("ferry_ws_connections_total{result=\"violation\"}"), 1);
}

#[test]
fn wss_with_a_certificate_for_the_advertised_name_and_tls_12() {
    let dir = std::env::temp_dir().join(format!("ferry-wss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = test_pki(&dir);
    let srv = Server::start(|c| {
        c.wss_listen = Some("127.0.0.1:0".parse().unwrap());
        c.wss_tls_cert = Some(dir.join("cert.pem"));
        c.wss_tls_key = Some(dir.join("key.pem"));
        c.ws_public_host = Some("relay.test".into());
    });
    let wss_addr = srv.running().wss_addr.unwrap();
    let (host, j) = session(&srv);
    let eps = srv.api().allocate(1, None).unwrap().server_endpoints;
    let ep = eps.iter().find(|e| e.connection_type == "wss").expect("a wss endpoint");
    assert_eq!((ep.host.as_str(), ep.secure, ep.port), ("relay.test", true, wss_addr.port()));

    // TLS 1.2 only, as an mbedTLS-2-class client speaks, verifying the name.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("relay.test").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let tcp = TcpStream::connect(wss_addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut ws = Ws::open(rustls::StreamOwned::new(conn, tcp), &wss_addr.to_string());
    join(&mut ws, &j, &host);
    ws.send(&packets::relay(&j.id, &host.id, b"over tls").unwrap());
    assert_eq!(host.recv(), packets::relay(&j.id, &host.id, b"over tls").unwrap());
    host.relay_to(&j.id, b"back");
    assert_eq!(ws.recv(), packets::relay(&host.id, &j.id, b"back").unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_proxy_in_front_of_ws_is_advertised_as_wss() {
    let srv = Server::start(|c| {
        c.ws_listen = Some("127.0.0.1:0".parse().unwrap());
        c.wss_public = Some("relay.example.com:443".into());
    });
    let eps = srv.api().allocate(1, None).unwrap().server_endpoints;
    let kinds: Vec<_> = eps.iter().map(|e| (e.connection_type.as_str(), e.host.as_str(), e.port)).collect();
    assert!(kinds.contains(&("wss", "relay.example.com", 443)), "{kinds:?}");
    assert!(!kinds.iter().any(|k| k.0 == "ws"), "{kinds:?}");
}

#[test]
fn the_sdk_relays_over_wss_trusting_a_given_ca() {
    use ferry::client::{RelayClient, Transport};
    let dir = std::env::temp_dir().join(format!("ferry-wss-sdk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    test_pki(&dir);
    let srv = Server::start(|c| {
        c.wss_listen = Some("127.0.0.1:0".parse().unwrap());
        c.wss_tls_cert = Some(dir.join("cert.pem"));
        c.wss_tls_key = Some(dir.join("key.pem"));
        c.ws_public_host = Some("localhost".into());
    });
    let api = srv.api();
    let h = api.allocate(2, None).unwrap();
    let j = api.join(&api.join_code(&h.allocation_id).unwrap()).unwrap();
    let mut host = RelayClient::new(&h).unwrap();
    host.bind().unwrap();
    let wss = Transport::Wss { ca_file: Some(dir.join("ca.pem")) };
    let mut peer = RelayClient::with_transport(&j.allocation, wss).unwrap();
    peer.bind().unwrap();
    assert_eq!(peer.connect_b64(&j.host_connection_data).unwrap(), host.id());
    peer.send(&host.id(), b"sdk over wss").unwrap();
    assert_eq!(
        host.recv_relay(Duration::from_secs(5)).unwrap().unwrap(),
        (peer.id(), b"sdk over wss".to_vec())
    );
    host.send(&peer.id(), b"and back").unwrap();
    assert_eq!(peer.recv_relay(Duration::from_secs(5)).unwrap().unwrap(), (host.id(), b"and back".to_vec()));
    // Without the CA the certificate is refused.
    assert!(RelayClient::with_transport(&j.allocation, Transport::Wss { ca_file: None }).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_silent_connection_is_closed_after_the_idle_timeout() {
    let srv = Server::start(|c| {
        c.ws_listen = Some("127.0.0.1:0".parse().unwrap());
        c.ws_idle_timeout = Duration::from_secs(1);
    });
    let ws_addr = srv.running().ws_addr.unwrap();
    let tcp = TcpStream::connect(ws_addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut ws = Ws::open(tcp, &ws_addr.to_string());
    assert_eq!(ws.frame(), (0x8, 1001u16.to_be_bytes().to_vec()), "going away");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(srv.metric("ferry_ws_connections_total{result=\"idle\"}"), 1);
    assert_eq!(srv.metric("ferry_ws_connections"), 0);
}
