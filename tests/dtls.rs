//! Relay over DTLS 1.2 (PSK) on the relay port, judged by clients on other implementations than
//! the server's OpenSSL: mbedTLS (Unity's client library, 64-byte PSK) and GnuTLS.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use ferry::client::packets;
use support::dtls::{gnutls_handshake, Identity, MbedPipe};
use support::{pair, Raw, Server, BIND_RECEIVED};

/// A host on plain UDP and a joiner allocation for a DTLS client.
fn session(srv: &Server) -> (Raw, Raw) {
    let api = srv.api();
    let h = api.allocate(10, None).unwrap();
    let kinds: Vec<_> = h.server_endpoints.iter().map(|e| (e.connection_type.as_str(), e.secure)).collect();
    assert!(kinds.contains(&("udp", false)) && kinds.contains(&("dtls", true)), "{kinds:?}");
    let dtls = h.server_endpoints.iter().find(|e| e.connection_type == "dtls").unwrap();
    assert_eq!((dtls.network.as_str(), dtls.port), ("udp", srv.relay_addr().port()));
    let code = api.join_code(&h.allocation_id).unwrap();
    let j = api.join(&code).unwrap();
    let host = Raw::new(&h);
    assert_eq!(host.bind(0), BIND_RECEIVED);
    (host, Raw::new(&j.allocation))
}

/// Handshake, BIND, CONNECT through `pipe` for the joiner `j`.
fn join(pipe: &mut MbedPipe, j: &Raw, host: &Raw, nonce: u16) {
    pipe.send(&packets::bind(&j.key, nonce, &j.conn));
    assert_eq!(pipe.recv(), BIND_RECEIVED);
    pipe.send(&packets::connect_request(&j.id, &host.conn));
    assert_eq!(pipe.recv(), pair(6, &host.id, &j.id), "ACCEPTED");
}

#[test]
fn an_mbedtls_client_runs_a_whole_session_with_a_udp_host() {
    let srv = Server::start(|_| {});
    let (host, j) = session(&srv);
    let mut pipe = MbedPipe::start(srv.relay_addr(), Identity::Raw(&j.id.0), &j.key.0);
    let suite = pipe.connected();
    assert!(
        suite.contains("PSK") && (suite.contains("GCM") || suite.contains("CCM")),
        "AEAD PSK suite: {suite}"
    );
    join(&mut pipe, &j, &host, 0);

    pipe.send(&packets::relay(&j.id, &host.id, b"from dtls").unwrap());
    assert_eq!(host.recv(), packets::relay(&j.id, &host.id, b"from dtls").unwrap());
    host.relay_to(&j.id, b"from udp");
    assert_eq!(pipe.recv(), packets::relay(&host.id, &j.id, b"from udp").unwrap());
    pipe.send(&packets::ping(&j.id, 7));
    assert_eq!(pipe.recv(), packets::ping(&j.id, 7));

    // The largest message that fits a 1400-byte datagram after 37 bytes of record overhead goes
    // through both ways; one byte more is not sent to the DTLS client, and is counted.
    let max = 1400 - 37 - 38;
    pipe.send(&packets::relay(&j.id, &host.id, &vec![1; max]).unwrap());
    assert_eq!(host.recv().len(), 1363);
    host.relay_to(&j.id, &vec![2; max]);
    assert_eq!(pipe.recv().len(), 1363);
    host.relay_to(&j.id, &vec![3; max + 1]);
    pipe.silent(300);
    assert_eq!(srv.metric("ferry_dtls_drops_total{reason=\"oversize\"}"), 1);

    // Plain Relay messages from the DTLS client's address are never accepted (anyone can spoof
    // an address; nobody can forge a record). CLOSE over DTLS releases the allocation.
    pipe.send(&packets::close(&j.id));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(srv.metric("ferry_allocations_released_total{reason=\"closed\"}"), 1);
    pipe.command("CLOSE");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(srv.metric("ferry_dtls_sessions_ended_total{reason=\"closed\"}"), 1);
    assert_eq!(srv.metric("ferry_dtls_handshakes_total{result=\"completed\"}"), 1);
    assert_eq!(srv.metric("ferry_dtls_hello_verify_total"), 1, "the handshake began with a cookie exchange");
    assert_eq!(srv.metric("ferry_dtls_offloaded_total"), 1, "records protected by Ferry after the handshake");
}

#[test]
fn the_identity_may_be_the_uuid_text_and_a_stray_hello_gets_no_answer() {
    let srv = Server::start(|_| {});
    let (host, j) = session(&srv);
    let text = j.id.to_string();
    let mut pipe = MbedPipe::start(srv.relay_addr(), Identity::Text(&text), &j.key.0);
    pipe.connected();
    join(&mut pipe, &j, &host, 0);
    // Unity Transport 2.x probes with a fresh ClientHello after 2 s of silence, and disconnects
    // if it gets an alert back: the relay must say nothing, and the session goes on.
    pipe.command("HELLO");
    assert_eq!(pipe.line(3000).as_deref(), Some("PROBE-SILENT"));
    assert_eq!(srv.metric("ferry_dtls_drops_total{reason=\"stray_hello\"}"), 1);
    pipe.send(&packets::ping(&j.id, 1));
    assert_eq!(pipe.recv(), packets::ping(&j.id, 1));
}

#[test]
fn a_rehomed_client_handshakes_again_and_moves_its_allocation() {
    let srv = Server::start(|c| c.rebind_quiet = Duration::from_millis(0));
    let (host, j) = session(&srv);
    let mut first = MbedPipe::start(srv.relay_addr(), Identity::Raw(&j.id.0), &j.key.0);
    first.connected();
    join(&mut first, &j, &host, 0);
    drop(first);
    // A new socket (a new NAT mapping): new handshake, BIND with a higher nonce.
    let mut second = MbedPipe::start(srv.relay_addr(), Identity::Raw(&j.id.0), &j.key.0);
    second.connected();
    second.send(&packets::bind(&j.key, 1, &j.conn));
    assert_eq!(second.recv(), BIND_RECEIVED);
    host.relay_to(&j.id, b"to the new address");
    assert_eq!(second.recv(), packets::relay(&host.id, &j.id, b"to the new address").unwrap());
    assert_eq!(srv.metric("ferry_binds_total{result=\"moved\"}"), 1);
}

#[test]
fn a_wrong_key_never_establishes_and_the_handshake_slot_is_freed() {
    let srv = Server::start(|_| {});
    let (_host, j) = session(&srv);
    let pipe = MbedPipe::start(srv.relay_addr(), Identity::Raw(&j.id.0), &[0x55; 64]);
    assert_eq!(pipe.line(2500), None, "no handshake with the wrong key");
    drop(pipe);
    assert_eq!(srv.metric("ferry_dtls_handshakes_total{result=\"completed\"}"), 0);
    assert_eq!(srv.metric("ferry_dtls_sessions{state=\"established\"}"), 0);
}

/// A UDP proxy that drops the relay's datagrams on their way back when `drop(n, datagram)` says
/// so (`n` counts from 1).
fn lossy_proxy(relay: SocketAddr, mut drop: impl FnMut(usize, &[u8]) -> bool + Send + 'static) -> SocketAddr {
    let outer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let inner = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = outer.local_addr().unwrap();
    outer.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    inner.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    std::thread::spawn(move || {
        let mut client = None;
        let mut back = 0;
        let mut buf = [0u8; 2048];
        // 20 ms per turn at most, bounded to about 30 s.
        for _ in 0..1500 {
            if let Ok((n, from)) = outer.recv_from(&mut buf) {
                client = Some(from);
                let _ = inner.send_to(&buf[..n], relay);
            }
            if let (Ok((n, _)), Some(c)) = (inner.recv_from(&mut buf), client) {
                back += 1;
                if !drop(back, &buf[..n]) {
                    let _ = outer.send_to(&buf[..n], c);
                }
            }
        }
    });
    addr
}

#[test]
fn a_lost_server_flight_is_sent_again() {
    let srv = Server::start(|_| {});
    let (host, j) = session(&srv);
    // Datagram 1 is the HelloVerifyRequest; 2 opens the ServerHello flight: lose it.
    let via = lossy_proxy(srv.relay_addr(), |n, _| n == 2);
    let mut pipe = MbedPipe::start(via, Identity::Raw(&j.id.0), &j.key.0);
    pipe.connected();
    join(&mut pipe, &j, &host, 0);
}

#[test]
fn gnutls_completes_a_handshake_with_the_uuid_text_identity() {
    let srv = Server::start(|_| {});
    let (_host, j) = session(&srv);
    let out = gnutls_handshake(srv.relay_addr(), &j.id.to_string(), &j.key.0);
    assert!(out.contains("Handshake was completed"), "gnutls-cli said:\n{out}");
    assert!(out.contains("DTLS1.2"), "gnutls-cli said:\n{out}");
    assert_eq!(srv.metric("ferry_dtls_handshakes_total{result=\"completed\"}"), 1);
    // Its text line is not a Relay message: dropped, never answered.
    assert!(srv.metric("ferry_drops_total{reason=\"bad_signature\"}") >= 1);
}

#[test]
fn garbage_and_records_from_strangers_get_no_answer() {
    let srv = Server::start(|_| {});
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut d = vec![23, 0xFE, 0xFD, 0, 1, 0, 0, 0, 0, 0, 1, 0, 20];
    d.extend_from_slice(&[7; 20]);
    sock.send_to(&d, srv.relay_addr()).unwrap();
    sock.send_to(&[22, 0xFE, 0xFD, 0, 0], srv.relay_addr()).unwrap();
    sock.send_to(&[63; 100], srv.relay_addr()).unwrap();
    let mut buf = [0u8; 100];
    assert!(sock.recv_from(&mut buf).is_err(), "no answer to garbage");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(srv.metric("ferry_dtls_drops_total{reason=\"no_session\"}"), 1);
    assert_eq!(srv.metric("ferry_dtls_drops_total{reason=\"bad_record\"}"), 2);
}

#[test]
fn sessions_on_any_shard_reach_the_shard_that_owns_their_allocation() {
    let srv = Server::start(|c| c.shards = 4);
    let (host, _) = session(&srv);
    let api = srv.api();
    let code = api.join_code(&host.id.to_string()).unwrap();
    let mut pipes = Vec::new();
    for i in 0..8u8 {
        let j = Raw::new(&api.join(&code).unwrap().allocation);
        let mut pipe = MbedPipe::start(srv.relay_addr(), Identity::Raw(&j.id.0), &j.key.0);
        pipe.connected();
        join(&mut pipe, &j, &host, 0);
        pipe.send(&packets::relay(&j.id, &host.id, &[i; 8]).unwrap());
        assert_eq!(host.recv(), packets::relay(&j.id, &host.id, &[i; 8]).unwrap());
        host.relay_to(&j.id, &[i; 9]);
        assert_eq!(pipe.recv(), packets::relay(&host.id, &j.id, &[i; 9]).unwrap());
        pipes.push(pipe);
    }
    // Eight source addresses spread over four shards by the kernel's hash: sessions established
    // away from their allocation's shard moved there.
    assert!(srv.metric("ferry_dtls_migrations_total") >= 1);
}

#[test]
fn the_sdk_speaks_dtls_and_mixes_with_udp_and_websocket_peers() {
    use ferry::client::{RelayClient, Transport};
    let srv = Server::start(|c| c.ws_listen = Some("127.0.0.1:0".parse().unwrap()));
    let api = srv.api();
    let h = api.allocate(4, None).unwrap();
    let code = api.join_code(&h.allocation_id).unwrap();
    // The host on DTLS, one joiner on WebSocket, one on plain UDP.
    let mut host = RelayClient::with_transport(&h, Transport::Dtls).unwrap();
    host.bind().unwrap();
    let mut peers = Vec::new();
    for t in [Transport::Ws, Transport::Udp] {
        let j = api.join(&code).unwrap();
        let mut c = RelayClient::with_transport(&j.allocation, t).unwrap();
        c.bind().unwrap();
        assert_eq!(c.connect_b64(&j.host_connection_data).unwrap(), host.id());
        peers.push(c);
    }
    for (i, p) in peers.iter_mut().enumerate() {
        p.send(&host.id(), format!("to the dtls host from {i}").as_bytes()).unwrap();
        let (from, got) = host.recv_relay(Duration::from_secs(5)).unwrap().expect("a relay at the host");
        assert_eq!((from, got), (p.id(), format!("to the dtls host from {i}").into_bytes()));
        host.send(&p.id(), format!("back to {i}").as_bytes()).unwrap();
        let (from, got) = p.recv_relay(Duration::from_secs(5)).unwrap().expect("a relay at the peer");
        assert_eq!((from, got), (host.id(), format!("back to {i}").into_bytes()));
    }
    // A maximum-size UDP message (1434-byte payload) cannot reach the DTLS host: not sent,
    // counted; the session goes on.
    peers[1].send(&host.id(), &[0; 1434]).unwrap();
    peers[1].send(&host.id(), b"small").unwrap();
    let (_, got) = host.recv_relay(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(got, b"small");
    assert_eq!(srv.metric("ferry_dtls_drops_total{reason=\"oversize\"}"), 1);
}

#[test]
fn a_half_open_flood_from_one_address_is_bounded() {
    use openssl::ssl::{Ssl, SslContext, SslMethod, SslStream};
    /// Sends its first two datagrams (ClientHello, then with the cookie) and nothing after.
    struct Dgram(UdpSocket, usize);
    impl std::io::Read for Dgram {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0.recv(b)
        }
    }
    impl std::io::Write for Dgram {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.1 += 1;
            if self.1 > 2 {
                return Ok(b.len());
            }
            self.0.send(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let srv = Server::start(|c| {
        c.dtls_halfopen_per_ip = 3;
        c.shards = 1;
    });
    let ctx = {
        let mut b = SslContext::builder(SslMethod::dtls_client()).unwrap();
        b.set_cipher_list("PSK-AES128-GCM-SHA256").unwrap();
        b.set_psk_client_callback(|_, _, id, psk| {
            id[..2].copy_from_slice(b"x\0");
            psk[..64].copy_from_slice(&[1; 64]);
            Ok(64)
        });
        b.build()
    };
    // Each client does the cookie exchange, gets the server's flight, then goes quiet.
    let mut held = Vec::new();
    for _ in 0..10 {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect(srv.relay_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut ssl = Ssl::new(&ctx).unwrap();
        ssl.set_connect_state();
        let mut st = SslStream::new(ssl, Dgram(s, 0)).unwrap();
        let _ = st.do_handshake();
        held.push(st);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(srv.metric("ferry_dtls_sessions{state=\"handshaking\"}"), 3, "three half-open at most");
    assert!(srv.metric("ferry_dtls_drops_total{reason=\"capacity\"}") >= 7);
}

#[test]
fn a_lost_final_flight_is_sent_again_after_the_handshake() {
    let srv = Server::start(|_| {});
    let (host, j) = session(&srv);
    // Lose the server's ChangeCipherSpec and its Finished (epoch 1) once: the client repeats its
    // final flight, and the relay, whose handshake is over, answers with its own again.
    let mut lost = 0;
    let via = lossy_proxy(srv.relay_addr(), move |_, d| {
        let final_flight = d[0] == 20 || (d[0] == 22 && d.get(3..5) == Some(&[0, 1]));
        if final_flight && lost < 2 {
            lost += 1;
            return true;
        }
        false
    });
    let mut pipe = MbedPipe::start(via, Identity::Raw(&j.id.0), &j.key.0);
    pipe.connected();
    join(&mut pipe, &j, &host, 0);
    assert_eq!(srv.metric("ferry_dtls_offloaded_total"), 1);
    assert!(srv.metric("ferry_dtls_final_flight_resent_total") >= 1);
}
