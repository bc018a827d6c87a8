//! Unity's QoS ping on the relay port and the QoS discovery endpoint: what Unity's QoS runner
//! sends gets the 13-byte echo it checks; what it would not send gets nothing.

mod support;

use std::net::UdpSocket;
use std::time::Duration;

use support::Server;

// The request Unity's QoS runner sends (`QosJob`): title "QoS request", 25 bytes.
use ferry::client::packets::qos_request as unity_request;

fn answer(sock: &UdpSocket, d: &[u8], relay: std::net::SocketAddr) -> Option<Vec<u8>> {
    sock.send_to(d, relay).unwrap();
    let mut buf = [0u8; 64];
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    sock.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
}

#[test]
fn the_relay_port_echoes_unity_qos_pings_and_nothing_else() {
    let srv = Server::start(|_| {});
    let relay = srv.relay_addr();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    // The checks Unity's runner makes: ≥ 13 bytes, magic 0x95, version 0, its sequence and
    // identifier, and the timestamp echoed unchanged.
    for seq in 0..5u8 {
        let r = answer(&sock, &unity_request(seq, 0x1234, 63_870_000_000_000 + seq as u64), relay)
            .expect("a reply");
        assert_eq!(r.len(), 13);
        assert_eq!(&r[..3], &[0x95, 0x00, seq]);
        assert_eq!(u16::from_le_bytes([r[3], r[4]]), 0x1234);
        assert_eq!(u64::from_le_bytes(r[5..13].try_into().unwrap()), 63_870_000_000_000 + seq as u64);
    }
    // Malformed: too short, a version it does not speak, a title past the end.
    let req = unity_request(0, 1, 2);
    assert_eq!(answer(&sock, &req[..13], relay), None);
    let mut v = req.clone();
    v[1] = 0x10;
    assert_eq!(answer(&sock, &v, relay), None);
    let mut v = req.clone();
    v[2] = 40;
    assert_eq!(answer(&sock, &v, relay), None);
    assert_eq!(srv.metric("ferry_qos_requests_total{result=\"answered\"}"), 5);
    assert_eq!(srv.metric("ferry_qos_requests_total{result=\"malformed\"}"), 3);
}

#[test]
fn pings_are_rate_limited_per_source_and_can_be_turned_off() {
    let srv = Server::start(|c| c.shards = 1);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    for i in 0..60u16 {
        sock.send_to(&unity_request(0, i, 0), srv.relay_addr()).unwrap();
    }
    let mut got = 0;
    let mut buf = [0u8; 64];
    while sock.recv_from(&mut buf).is_ok() {
        got += 1;
    }
    assert!((20..60).contains(&got), "a burst of 20 at most, then 10/s: got {got}");
    assert!(srv.metric("ferry_qos_requests_total{result=\"rate_limited\"}") >= 60 - got);

    let off = Server::start(|c| c.qos = false);
    assert_eq!(answer(&sock, &unity_request(0, 1, 2), off.relay_addr()), None);
    assert_eq!(off.metric("ferry_qos_requests_total{result=\"disabled\"}"), 1);
}

#[test]
fn discovery_lists_this_relay_in_unitys_shape() {
    let srv = Server::start(|c| c.region = "eu-west".into());
    let get = |q: &str| {
        let path = format!("/v1/servers{q}");
        let r =
            ferry::client::http::request(&srv.api_url(), "GET", &path, None, None, Duration::from_secs(5))
                .unwrap();
        (r.status, serde_json::from_slice::<serde_json::Value>(&r.body).unwrap())
    };
    let (status, v) = get("?service=relay");
    assert_eq!(status, 200);
    let servers = &v["data"]["servers"];
    assert_eq!(servers[0]["region"], "eu-west");
    assert_eq!(servers[0]["services"][0], "relay");
    assert_eq!(servers[0]["endpoints"][0], srv.relay_addr().to_string());
    let (_, v) = get("?service=relay&region=us-east");
    assert_eq!(v["data"]["servers"].as_array().unwrap().len(), 0);
    let (status, v) = get("?service=multiplay");
    assert_eq!(status, 400);
    assert!(v["detail"].as_str().unwrap().contains("relay"));
}
