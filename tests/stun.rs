//! STUN Binding on the relay port, judged by a client the project did not write (`stunclient`,
//! built on `stun_codec`), over IPv4 and IPv6, plus what is never answered.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use support::Server;

fn reflexive(relay: SocketAddr, local: &str) -> (SocketAddr, SocketAddr) {
    let sock = UdpSocket::bind(local).unwrap();
    let mut c = stunclient::StunClient::new(relay);
    c.set_timeout(Duration::from_secs(3));
    let mapped = c.query_external_address(&sock).expect("a reflexive address from the relay port");
    (mapped, sock.local_addr().unwrap())
}

#[test]
fn a_third_party_client_learns_its_address_over_ipv4_and_ipv6() {
    let v4 = Server::start(|_| {});
    let (mapped, local) = reflexive(v4.relay_addr(), "127.0.0.1:0");
    assert_eq!(mapped, local);
    let v6 = Server::start(|c| c.relay_listen = "[::1]:0".parse().unwrap());
    let (mapped, local) = reflexive(v6.relay_addr(), "[::1]:0");
    assert_eq!(mapped, local);
    assert!(v6.metric("ferry_stun_requests_total{result=\"answered\"}") >= 1);
    // The relay itself still works beside it.
    let api = v4.api();
    let h = api.allocate(1, None).unwrap();
    ferry::client::RelayClient::new(&h).unwrap().bind().unwrap();
}

fn binding(attrs: &[u8]) -> Vec<u8> {
    let mut m = vec![0x00, 0x01];
    m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    m.extend_from_slice(&ferry::wire::stun::MAGIC_COOKIE);
    m.extend_from_slice(&[7; 12]);
    m.extend_from_slice(attrs);
    m
}

fn answer(sock: &UdpSocket, relay: SocketAddr, d: &[u8]) -> Option<Vec<u8>> {
    sock.send_to(d, relay).unwrap();
    let mut buf = [0u8; 1500];
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    sock.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
}

#[test]
fn only_binding_requests_within_the_amplification_bound_are_answered() {
    let srv = Server::start(|c| c.relay_listen = "[::1]:0".parse().unwrap());
    let relay = srv.relay_addr();
    let sock = UdpSocket::bind("[::1]:0").unwrap();
    // A bare 20-byte request from IPv6 would get 44 bytes (2.2×): not answered.
    assert_eq!(answer(&sock, relay, &binding(&[])), None);
    // With 8 more bytes of attributes (28 bytes) the 44-byte answer is 1.57×: answered.
    let r = answer(&sock, relay, &binding(&[0xC0, 0x01, 0, 4, 1, 2, 3, 4])).expect("answered");
    assert_eq!((r.len(), &r[..2]), (44, &[0x01, 0x01][..]));
    // Indications, responses, unknown comprehension-required attributes: silence.
    let mut indication = binding(&[0xC0, 0x01, 0, 4, 1, 2, 3, 4]);
    indication[1] = 0x11;
    assert_eq!(answer(&sock, relay, &indication), None);
    assert_eq!(answer(&sock, relay, &binding(&[0x77, 0x77, 0, 4, 1, 2, 3, 4])), None);
    let m = srv.metrics();
    for (result, n) in
        [("amplification", 1), ("not_binding_request", 1), ("unknown_attribute", 1), ("answered", 1)]
    {
        assert!(
            m.contains(&format!("ferry_stun_requests_total{{result=\"{result}\"}} {n}")),
            "{result}: {m}"
        );
    }
}

#[test]
fn stun_can_be_turned_off() {
    let srv = Server::start(|c| c.stun = false);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(answer(&sock, srv.relay_addr(), &binding(&[0xC0, 0x01, 0, 4, 1, 2, 3, 4])), None);
    assert!(srv.metric("ferry_stun_requests_total{result=\"disabled\"}") >= 1);
}

#[test]
fn a_stun_flood_from_one_source_is_rate_limited() {
    let srv = Server::start(|_| {});
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let d = binding(&[0xC0, 0x01, 0, 4, 1, 2, 3, 4]);
    for _ in 0..200 {
        sock.send_to(&d, srv.relay_addr()).unwrap();
    }
    let mut buf = [0u8; 100];
    let mut got = 0;
    while sock.recv_from(&mut buf).is_ok() {
        got += 1;
    }
    assert!((20..=40).contains(&got), "a burst of 20 per source, then 10/s per shard's bucket: {got}");
    assert!(srv.metric("ferry_stun_requests_total{result=\"rate_limited\"}") >= 150);
}

#[test]
fn the_third_party_client_retries_through_5_percent_loss() {
    let srv = Server::start(|_| {});
    let link = support::LossyLink::new(srv.relay_addr(), 5, 23);
    for _ in 0..10 {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut c = stunclient::StunClient::new(link.addr);
        c.set_timeout(Duration::from_secs(5));
        let mapped = c.query_external_address(&sock).expect("answered despite loss");
        // Through the link the relay sees the link's own socket: a loopback source.
        assert!(mapped.ip().is_loopback() && mapped.port() != 0, "{mapped}");
    }
}
