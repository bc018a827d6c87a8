//! End to end over loopback: the real HTTP API and UDP relay, driven by the SDK and by raw
//! datagrams shaped exactly as Unity Transport's.

mod support;

use std::time::Duration;

use ferry::client::packets;
use ferry::client::{ClientError, RelayClient};
use ferry::control::socket::{ControlClient, Status};
use ferry::wire::ErrorCode;
use support::*;

#[test]
fn host_and_three_joiners_with_utp_datagrams() {
    let srv = Server::start(|_| {});
    let api = srv.api();
    let host_alloc = api.allocate(3, None).unwrap();
    assert_eq!(host_alloc.server_endpoints[0].port, srv.relay_addr().port());
    assert_eq!(host_alloc.relay_server.ip_v4, "127.0.0.1");
    assert_eq!(b64(&host_alloc.key).len(), 64);
    assert_eq!(b64(&host_alloc.connection_data).len(), 255);
    let host = Raw::new(&host_alloc);
    assert_eq!(host.bind(0), BIND_RECEIVED);

    let code = api.join_code(&host_alloc.allocation_id).unwrap();
    assert_eq!(code.len(), 8);
    assert_eq!(api.join_code(&host_alloc.allocation_id).unwrap(), code, "one code per host");

    let mut joiners = Vec::new();
    for i in 0..3 {
        let j = api.join(&code.to_lowercase()).unwrap();
        assert_eq!(j.host_connection_data, host_alloc.connection_data);
        let raw = Raw::new(&j.allocation);
        assert_eq!(raw.bind(0), BIND_RECEIVED);
        let acc = raw.connect(&b64(&j.host_connection_data));
        assert_eq!(acc, pair(6, &host.id, &raw.id), "ACCEPTED(from host, to requester), 36 bytes");
        // Relay: the host learns of the peer from its first RELAY, byte for byte.
        let payload = vec![i as u8; 1200];
        raw.relay_to(&host.id, &payload);
        let got = host.recv();
        assert_eq!(got, packets::relay(&raw.id, &host.id, &payload).unwrap());
        assert_eq!(got.len(), 38 + 1200);
        joiners.push(raw);
    }
    for j in &joiners {
        host.relay_to(&j.id, b"state");
        assert_eq!(j.recv(), packets::relay(&host.id, &j.id, b"state").unwrap());
    }
    // PING is echoed unchanged.
    let ping = packets::ping(&joiners[0].id, 1);
    joiners[0].send(&ping);
    assert_eq!(joiners[0].recv(), ping);
    host.silent(100);
    assert!(srv.metric("ferry_packets_out_total{kind=\"forward\"}") >= 6);
    assert_eq!(srv.metric("ferry_binds_total{result=\"new\"}"), 4);
}

#[test]
fn every_error_path_over_sockets() {
    let srv = Server::start(|c| c.idle_timeout = Duration::from_millis(1000));
    let api = srv.api();
    let host_alloc = api.allocate(2, None).unwrap();
    let host = Raw::new(&host_alloc);
    host.bind(0);
    let code = api.join_code(&host_alloc.allocation_id).unwrap();
    let j = Raw::new(&api.join(&code).unwrap().allocation);
    j.bind(0);
    assert_eq!(j.connect(&host.conn), pair(6, &host.id, &j.id));

    // 0: version.
    let mut d = packets::relay(&j.id, &host.id, b"x").unwrap();
    d[2] = 1;
    j.send(&d);
    assert_eq!(j.recv(), error(&j.id, ErrorCode::InvalidProtocolVersion));
    // 2: target is another session's host.
    let other = Raw::new(&api.allocate(2, None).unwrap());
    other.bind(0);
    assert_eq!(j.connect(&other.conn), error(&j.id, ErrorCode::Unauthorized));
    // 6: self-connect.
    assert_eq!(j.connect(&j.conn), error(&j.id, ErrorCode::SelfConnect));
    // 3: the joiner's ID from another socket.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let stranger = Raw { sock, relay: j.relay, id: j.id, key: j.key.clone(), conn: j.conn.clone() };
    stranger.relay_to(&host.id, b"x");
    assert_eq!(stranger.recv(), error(&j.id, ErrorCode::BoundElsewhere));
    // 5: RELAY to an allocation not linked with the sender.
    j.relay_to(&other.id, b"x");
    assert_eq!(j.recv(), error(&j.id, ErrorCode::NotConnected));
    // 4: unknown allocation.
    let mut ghost = j.id;
    ghost.0[0] ^= 0xFF;
    j.send(&packets::ping(&ghost, 1));
    assert_eq!(j.recv(), error(&ghost, ErrorCode::AllocationNotFound));
    // 1: timed out (the host keeps pinging; the joiner goes quiet past idle_timeout).
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        host.send(&packets::ping(&host.id, 1));
        host.recv();
    }
    j.send(&packets::ping(&j.id, 1));
    assert_eq!(j.recv(), error(&j.id, ErrorCode::AllocationTimedOut));
    // A RELAY to the expired peer is "not connected" for the host, never ERROR 4.
    host.relay_to(&j.id, b"x");
    assert_eq!(host.recv(), error(&host.id, ErrorCode::NotConnected));
    for c in ErrorCode::ALL {
        assert!(srv.metric(&format!("ferry_errors_sent_total{{code=\"{}\"", c as u8)) > 0, "{c:?}");
    }
}

#[test]
fn rejected_at_capacity() {
    let srv = Server::start(|_| {});
    let api = srv.api();
    let host_alloc = api.allocate(1, None).unwrap();
    let host = Raw::new(&host_alloc);
    host.bind(0);
    let code = api.join_code(&host_alloc.allocation_id).unwrap();
    let a = Raw::new(&api.join(&code).unwrap().allocation);
    let b = Raw::new(&api.join(&code).unwrap().allocation);
    a.bind(0);
    b.bind(0);
    assert_eq!(a.connect(&host.conn), pair(6, &host.id, &a.id));
    assert_eq!(b.connect(&host.conn), pair(8, &host.id, &b.id), "REJECTED(from host, to requester)");
    // The SDK reports it as such.
    let mut sdk = RelayClient::new(&api.join(&code).unwrap().allocation).unwrap();
    sdk.bind().unwrap();
    assert!(matches!(sdk.connect(&host.conn), Err(ClientError::Rejected)));
}

#[test]
fn host_close_disconnects_joiners_and_kills_the_join_code() {
    let srv = Server::start(|_| {});
    let api = srv.api();
    let host_alloc = api.allocate(4, None).unwrap();
    let host = Raw::new(&host_alloc);
    host.bind(0);
    let code = api.join_code(&host_alloc.allocation_id).unwrap();
    let joiners: Vec<Raw> = (0..2)
        .map(|_| {
            let j = Raw::new(&api.join(&code).unwrap().allocation);
            j.bind(0);
            assert_eq!(j.connect(&host.conn)[3], 6);
            j
        })
        .collect();
    host.send(&packets::close(&host.id));
    for j in &joiners {
        assert_eq!(j.recv(), pair(9, &host.id, &j.id), "DISCONNECT(from host, to peer)");
        j.send(&packets::ping(&j.id, 1));
        assert_eq!(j.recv(), error(&j.id, ErrorCode::AllocationNotFound), "joiner released with its host");
    }
    // The API learns of it from the shard's event: the code 404s.
    let mut status = 0;
    for _ in 0..50 {
        match api.join(&code) {
            Err(ferry::client::ApiError::Problem(p)) => {
                status = p.status;
                assert_eq!(p.code, 15009);
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    assert_eq!(status, 404);
    match api.join_code(&host_alloc.allocation_id) {
        Err(ferry::client::ApiError::Problem(p)) => assert_eq!((p.status, p.code), (404, 15008)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unbound_allocation_expires_and_its_code_dies() {
    let srv = Server::start(|c| c.unbound_timeout = Duration::from_millis(300));
    let api = srv.api();
    let a = api.allocate(2, None).unwrap();
    let code = api.join_code(&a.allocation_id).unwrap();
    std::thread::sleep(Duration::from_millis(900));
    let raw = Raw::new(&a);
    // A BIND for a timed-out allocation gets ERROR 1, as PING and RELAY do.
    assert_eq!(raw.bind(0), error(&raw.id, ErrorCode::AllocationTimedOut));
    assert!(matches!(api.join(&code), Err(ferry::client::ApiError::Problem(p)) if p.code == 15009));
    assert_eq!(srv.metric("ferry_allocations_released_total{reason=\"timed_out\"}"), 1);
}

#[test]
fn sdk_round_trip_with_keepalive_and_rebind() {
    let srv = Server::start(|c| c.idle_timeout = Duration::from_secs(2));
    let api = srv.api();
    let host_alloc = api.allocate(2, None).unwrap();
    let code = api.join_code(&host_alloc.allocation_id).unwrap();
    let opts = ferry::client::ClientOptions {
        ping_interval: Duration::from_millis(200),
        bind_retry: Duration::from_millis(200),
        ..Default::default()
    };
    let mut host = RelayClient::new(&host_alloc).unwrap().with_options(opts.clone());
    host.bind().unwrap();
    let join = api.join(&code).unwrap();
    let mut peer = RelayClient::new(&join.allocation).unwrap().with_options(opts.clone());
    peer.bind().unwrap();
    let host_id = peer.connect_b64(&join.host_connection_data).unwrap();
    assert_eq!(host_id, host.id());
    // Three seconds of keep-alive only, past the 2 s idle timeout: PINGs keep both alive.
    let t = std::thread::spawn(move || {
        let _ = host.recv_relay(Duration::from_secs(3));
        host
    });
    let _ = peer.recv_relay(Duration::from_secs(3));
    let mut host = t.join().unwrap();
    peer.send(&host_id, b"still here").unwrap();
    let (from, msg) = host.recv_relay(Duration::from_secs(3)).unwrap().unwrap();
    assert_eq!((from, msg.as_slice()), (peer.id(), &b"still here"[..]));

    // NAT rebinding: the peer's traffic now leaves from a new port. The relay answers ERROR 3,
    // the SDK re-BINDs with a higher nonce, and the binding moves; the old port gets nothing.
    let old = peer.local_addr().unwrap();
    peer.migrate_socket().unwrap();
    assert_ne!(peer.local_addr().unwrap().port(), old.port());
    peer.send(&host_id, b"lost: bound elsewhere").unwrap();
    let _ = peer.recv_relay(Duration::from_millis(500));
    peer.send(&host_id, b"moved").unwrap();
    let (_, msg) = host.recv_relay(Duration::from_secs(3)).unwrap().unwrap();
    assert_eq!(msg, b"moved");
    host.send(&peer.id(), b"to new address").unwrap();
    assert_eq!(peer.recv_relay(Duration::from_secs(3)).unwrap().unwrap().1, b"to new address");
    assert_eq!(srv.metric("ferry_binds_total{result=\"moved\"}"), 1);
}

#[test]
fn hundred_concurrent_sessions() {
    let srv = Server::start(|c| c.api_rate_limit = 100_000);
    let url = srv.api_url();
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let api = ferry::client::ApiClient::new(url);
                let h = api.allocate(1, None).map_err(|e| e.to_string())?;
                let code = api.join_code(&h.allocation_id).map_err(|e| e.to_string())?;
                let j = api.join(&code).map_err(|e| e.to_string())?;
                let mut host = RelayClient::new(&h).map_err(|e| e.to_string())?;
                let mut peer = RelayClient::new(&j.allocation).map_err(|e| e.to_string())?;
                host.bind().map_err(|e| e.to_string())?;
                peer.bind().map_err(|e| e.to_string())?;
                let hid = peer.connect_b64(&j.host_connection_data).map_err(|e| e.to_string())?;
                let msg = format!("session {i}");
                peer.send(&hid, msg.as_bytes()).map_err(|e| e.to_string())?;
                let (_, got) =
                    host.recv_relay(Duration::from_secs(5)).map_err(|e| e.to_string())?.ok_or("no relay")?;
                if got != msg.as_bytes() {
                    return Err(format!("session {i} got {got:?}"));
                }
                host.close().map_err(|e| e.to_string())?;
                Ok(())
            })
        })
        .collect();
    let failures: Vec<String> = threads.into_iter().filter_map(|t| t.join().unwrap().err()).collect();
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(srv.metric("ferry_allocations_total"), 200);
}

#[test]
fn control_socket_unix_and_tcp() {
    let dir = std::env::temp_dir().join(format!("ferry-ctl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("control.sock");
    let p2 = path.clone();
    let srv = Server::start(move |c| {
        c.control_socket = Some(p2);
        c.control_listen = Some("127.0.0.1:0".parse().unwrap());
        c.control_secret = Some("a-long-enough-secret".into());
    });
    let mut ctl = ControlClient::connect_unix(&path).unwrap();
    let host = ctl.create_host(2).unwrap();
    assert_eq!(host.port, srv.relay_addr().port());
    let joiner = ctl.create_joiner(&host.id).unwrap();
    // The allocations work on the relay.
    let relay = srv.relay_addr();
    let mut h =
        RelayClient::from_parts(relay, host.id, host.key.clone(), host.connection_data.clone()).unwrap();
    let mut j = RelayClient::from_parts(relay, joiner.id, joiner.key.clone(), joiner.connection_data.clone())
        .unwrap();
    h.bind().unwrap();
    j.bind().unwrap();
    assert_eq!(j.connect(&host.connection_data).unwrap(), host.id);
    j.send(&host.id, b"via control socket").unwrap();
    assert_eq!(h.recv_relay(Duration::from_secs(3)).unwrap().unwrap().1, b"via control socket");
    assert!(ctl.stats().unwrap().contains("ferry_allocations_active{shard=\"0\"} 2"));
    assert!(matches!(
        ctl.create_host(0),
        Err(ferry::control::socket::ClientError::Refused(Status::MaxConnectionsOutOfRange))
    ));
    ctl.release(&host.id).unwrap();
    assert!(matches!(
        ctl.release(&host.id),
        Err(ferry::control::socket::ClientError::Refused(Status::NotFound))
    ));
    assert!(matches!(
        ctl.create_joiner(&host.id),
        Err(ferry::control::socket::ClientError::Refused(Status::HostNotFound))
    ));

    let tcp = srv.running().control_addr.unwrap();
    let mut t = ControlClient::connect_tcp(tcp, "a-long-enough-secret").unwrap();
    assert!(t.create_host(1).is_ok());
    assert!(ControlClient::connect_tcp(tcp, "the-wrong-secret-here").is_err(), "wrong secret refused");
    drop(srv);
    std::fs::remove_dir_all(dir).ok();
}

fn sessions_over_three_shards(kernel_steering: bool) -> u64 {
    let srv = Server::start(|c| {
        c.shards = 3;
        c.kernel_steering = kernel_steering;
        c.api_rate_limit = 100_000;
    });
    let api = srv.api();
    let mut sessions = Vec::new();
    for _ in 0..12 {
        let h = api.allocate(2, None).unwrap();
        let code = api.join_code(&h.allocation_id).unwrap();
        let j = api.join(&code).unwrap();
        let host = Raw::new(&h);
        let peer = Raw::new(&j.allocation);
        assert_eq!(
            ferry::core::owner_shard(&host.id, 3),
            ferry::core::owner_shard(&peer.id, 3),
            "joiner on host's shard"
        );
        assert_eq!(host.bind(0), BIND_RECEIVED);
        assert_eq!(peer.bind(0), BIND_RECEIVED);
        assert_eq!(peer.connect(&host.conn), pair(6, &host.id, &peer.id));
        sessions.push((host, peer));
    }
    let shards: std::collections::HashSet<u32> =
        sessions.iter().map(|(h, _)| ferry::core::owner_shard(&h.id, 3)).collect();
    assert_eq!(shards.len(), 3, "round-robin placement uses every shard");
    for (host, peer) in &sessions {
        peer.relay_to(&host.id, b"ping");
        assert_eq!(host.recv(), packets::relay(&peer.id, &host.id, b"ping").unwrap());
        host.relay_to(&peer.id, b"pong");
        assert_eq!(peer.recv(), packets::relay(&host.id, &peer.id, b"pong").unwrap());
    }
    (0..3).map(|s| srv.metric(&format!("ferry_io_total{{shard=\"{s}\",kind=\"handoff_in\"}}"))).sum()
}

#[test]
fn kernel_steering_delivers_every_datagram_to_its_owner_shard() {
    assert_eq!(sessions_over_three_shards(true), 0, "no datagram needed a hand-off");
}

#[test]
fn datagrams_on_the_wrong_shard_are_handed_to_the_owner() {
    // Without steering the kernel spreads by 4-tuple, so most sessions have datagrams landing on
    // a shard that does not own them; they still arrive.
    assert!(sessions_over_three_shards(false) > 0, "expected hand-offs between shards");
}

#[test]
fn load_generator_measures_a_real_relay() {
    use ferry::load::{engine, setup};
    let srv = Server::start(|c| c.api_rate_limit = 100_000);
    let streams =
        setup::ferry(&srv.api(), None, 3, 100, &setup::Sockets::new("127.0.0.1", 0).unwrap()).unwrap();
    let spec = engine::TrafficSpec {
        payload: 100,
        rate: 2000,
        duration: Duration::from_millis(800),
        warmup: Duration::from_millis(200),
        pin_sender: None,
        pin_receiver: None,
        gso: false,
        shape: ferry::load::Shape::Burst,
    };
    let m = engine::run(streams, &spec, |_| {}).unwrap();
    assert!(m.sent > 300, "sent {}", m.sent);
    assert!(m.received * 100 >= m.sent * 99, "received {} of {}", m.received, m.sent);
    assert_eq!(m.duplicates, 0);
    assert_eq!(m.latency_ns.len(), m.received);
    // The relay counted what the generator saw.
    assert!(srv.metric("ferry_packets_out_total{kind=\"forward\"}") >= m.received);
}

#[test]
fn load_generator_game_shape_interleaves_sessions_of_mixed_sizes() {
    use ferry::load::{engine, setup};
    let srv = Server::start(|c| c.api_rate_limit = 100_000);
    // 200 sessions over 4 shared socket pairs: each send carries datagrams of many sessions.
    let sockets = setup::Sockets::new("127.0.0.1", 4).unwrap();
    let streams = setup::ferry(&srv.api(), None, 200, engine::GAME_MEAN_PAYLOAD, &sockets).unwrap();
    let spec = engine::TrafficSpec {
        payload: engine::GAME_MEAN_PAYLOAD,
        rate: 5000,
        duration: Duration::from_millis(800),
        warmup: Duration::from_millis(200),
        pin_sender: None,
        pin_receiver: None,
        gso: false,
        shape: ferry::load::Shape::Game,
    };
    let before = srv.metric("ferry_bytes_out_total{kind=\"forward\"}");
    let m = engine::run(streams, &spec, |_| {}).unwrap();
    assert!(m.sent > 1000, "sent {}", m.sent);
    assert!(m.received * 100 >= m.sent * 99, "received {} of {}", m.received, m.sent);
    assert_eq!(m.duplicates, 0);
    let packets = srv.metric("ferry_packets_out_total{kind=\"forward\"}");
    let bytes = srv.metric("ferry_bytes_out_total{kind=\"forward\"}") - before;
    let mean = bytes / packets.max(1);
    assert!((100..=150).contains(&mean), "mean RELAY size {mean} B (58–300 B, mostly small)");
    assert!((0..100_000u32).map(engine::game_payload).all(|p| (20..=262).contains(&p)));
}

#[test]
fn io_uring_backend_relays_or_says_why_not() {
    let srv = Server::start(|c| {
        c.io = ferry::config::IoBackend::Uring;
        c.shards = 2;
    });
    let expected = if ferry::shard::uring_available().is_ok() { "io_uring" } else { "epoll" };
    assert_eq!(srv.metric(&format!("ferry_shard_info{{shard=\"0\",io=\"{expected}\"}}")), 1);
    let (host, peer) = raw_session(&srv);
    for size in [0usize, 64, 1200, 1434] {
        let payload = vec![size as u8; size];
        peer.relay_to(&host.id, &payload);
        assert_eq!(host.recv(), packets::relay(&peer.id, &host.id, &payload).unwrap());
    }
    // Oversize and malformed datagrams are dropped and counted, not relayed.
    peer.relay_to(&host.id, &[0u8; 1500]);
    peer.send(&[0xDA, 0x72, 0, 10, 1]);
    host.silent(100);
    assert!(srv.metric("ferry_drops_total{reason=\"oversize\"}") >= 1);
}

#[test]
fn relay_rebinds_its_port_immediately_after_shutdown() {
    // io_uring keeps registered sockets alive until its asynchronous teardown unless the shard
    // releases them first; a restarted relay must always get its port back.
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    for io in
        [ferry::config::IoBackend::Uring, ferry::config::IoBackend::Batch, ferry::config::IoBackend::Uring]
    {
        for _ in 0..3 {
            let srv = Server::start(|c| {
                c.io = io;
                c.shards = 1;
                c.relay_listen = format!("127.0.0.1:{port}").parse().unwrap();
            });
            let a = srv.api().allocate(1, None).unwrap();
            let raw = Raw::new(&a);
            assert_eq!(raw.bind(0), BIND_RECEIVED);
            raw.send(&packets::ping(&raw.id, 1));
            raw.recv();
            drop(srv);
        }
    }
}

#[test]
fn gso_bursts_arrive_as_separate_unchanged_datagrams() {
    for backend in [ferry::config::IoBackend::Batch, ferry::config::IoBackend::Uring] {
        gso_bursts_on(backend);
    }
}

fn gso_bursts_on(backend: ferry::config::IoBackend) {
    let srv = Server::start(|c| {
        c.io = backend;
        c.gso = true;
        c.shards = 1;
    });
    let (host, peer) = raw_session(&srv);
    host.send(&packets::ping(&host.id, 1));
    host.recv();
    // Same-size runs, a shorter last segment, then a size change: every datagram must arrive on
    // its own, byte for byte, in order, however the relay groups its sends.
    let mut sizes: Vec<usize> = vec![500; 40];
    sizes.push(120);
    sizes.extend([700; 30]);
    sizes.extend([64, 64, 1434, 0]);
    for round in 0..5u8 {
        let sent: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| packets::relay(&peer.id, &host.id, &vec![round ^ i as u8; n]).unwrap())
            .collect();
        for d in &sent {
            peer.send(d);
        }
        for d in &sent {
            assert_eq!(&host.recv(), d, "{backend:?}");
        }
    }
    host.silent(100);
    let uring_fell_back =
        backend == ferry::config::IoBackend::Uring && ferry::shard::uring_available().is_err();
    if !uring_fell_back {
        assert!(
            srv.metric("ferry_io_total{shard=\"0\",kind=\"gso_sends\"}") > 0,
            "{backend:?}: runs went out as GSO sends"
        );
    }
    assert_eq!(srv.metric("ferry_io_total{shard=\"0\",kind=\"gso_fallbacks\"}"), 0, "{backend:?}");
}
