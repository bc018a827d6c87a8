//! Real game-networking stacks through two `ferry tunnel`s and a real relay, unmodified:
//! netcode.io (the `netcode-rs` crate) and QUIC (quinn, ALPN `hytale/1`, 60 s idle timeout).
//! Each runs clean and with 5 % loss between the tunnels and the relay, and stays quiet longer
//! than the relay's idle timeout (3 s here) in the middle.

mod games;
mod support;

use std::time::Duration;

use ferry::clock::Clock;
use support::{LossyLink, Server, Tunnels};

const RELAY_IDLE: Duration = Duration::from_secs(3);

fn relay() -> Server {
    Server::start(|c| {
        c.idle_timeout = RELAY_IDLE;
        c.host_alone_timeout = RELAY_IDLE;
    })
}

type NcClient = netcode::Client<netcode::NetcodeSocket>;
type NcServer = netcode::Server<netcode::NetcodeSocket>;

#[derive(Default)]
struct Counts {
    to_server: u32,
    to_client: u32,
}

/// One 10 ms tick of both sides: the server echoes every payload; the client sends one.
fn netcode_tick(client: &mut NcClient, server: &mut NcServer, send: bool, n: &mut Counts, now: f64) {
    server.update(now);
    client.update(now);
    while let Some((p, idx)) = server.recv() {
        assert!(p.starts_with(b"c2s"), "{p:?}");
        n.to_server += 1;
        server.send(b"s2c payload", idx).unwrap();
    }
    while let Some(p) = client.recv() {
        assert_eq!(p, b"s2c payload");
        n.to_client += 1;
    }
    if send && client.is_connected() {
        client.send(b"c2s payload").unwrap();
    }
    std::thread::sleep(Duration::from_millis(10));
}

fn netcode_through_tunnels(loss: u32) {
    let srv = relay();
    let key = netcode::generate_key();
    let pid = 0x4645_5252_5900_0001u64;
    // The server's own address must be in the token's internal list (netcode checks it), so it
    // binds one exact address.
    let mut server = netcode::Server::new("127.0.0.1:0", pid, key).unwrap();
    let server_addr = server.addr();
    let (hl, jl) = (LossyLink::new(srv.relay_addr(), loss, 3), LossyLink::new(srv.relay_addr(), loss, 5));
    let t = Tunnels::start_with(&srv, vec![server_addr], hl.addr, jl.addr, support::path_for(loss));
    // The client is told the join tunnel's local address, the server's real one stays internal.
    let token = netcode::ConnectToken::build(t.local[0], pid, 77, key)
        .internal_addresses(server_addr)
        .unwrap()
        .timeout_seconds(15)
        .generate()
        .unwrap()
        .try_into_bytes()
        .unwrap();
    let mut client = netcode::Client::new(&token).unwrap();
    client.connect();
    let clock = Clock::new();
    let secs = || clock.nanos() as f64 / 1e9;
    let mut n = Counts::default();
    let tick = |client: &mut NcClient, server: &mut NcServer, send: bool, n: &mut Counts| {
        netcode_tick(client, server, send, n, secs());
    };
    // Connect and talk.
    let start = clock.now();
    while !(client.is_connected() && n.to_client >= 20) {
        assert!(clock.now() - start < 15_000, "netcode did not connect and talk: {:?}", client.state());
        tick(&mut client, &mut server, true, &mut n);
    }
    assert_eq!(server.num_connected_clients(), 1);
    // Only netcode's own keep-alives for longer than the relay's idle timeout.
    let quiet = clock.now();
    while clock.now() - quiet < RELAY_IDLE.as_millis() as u64 + 1500 {
        tick(&mut client, &mut server, false, &mut n);
    }
    assert!(client.is_connected(), "still connected after the quiet period: {:?}", client.state());
    let before = n.to_client;
    let resume = clock.now();
    while n.to_client < before + 20 {
        assert!(clock.now() - resume < 10_000, "payloads flow again");
        tick(&mut client, &mut server, true, &mut n);
    }
    assert!(n.to_server >= 40);
    client.disconnect().unwrap();
}

#[test]
fn netcode_through_tunnels_clean() {
    netcode_through_tunnels(0);
}

#[test]
fn netcode_through_tunnels_with_5_percent_loss() {
    netcode_through_tunnels(5);
}

fn quic_through_tunnels(loss: u32) {
    use games::quic::{self, State};
    let srv = relay();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = rt.enter();
    let (server, cert) = quic::server("127.0.0.1:0".parse().unwrap());
    let server_addr = server.local_addr().unwrap();
    let (hl, jl) = (LossyLink::new(srv.relay_addr(), loss, 13), LossyLink::new(srv.relay_addr(), loss, 17));
    let t = Tunnels::start_with(&srv, vec![server_addr], hl.addr, jl.addr, support::path_for(loss));
    let target = t.local[0];
    rt.spawn(quic::serve(server));
    let states = rt.block_on(async move {
        let mut states = vec![State::Connecting];
        let ep = quic::client(cert);
        let connecting = ep.connect(target, "localhost").unwrap();
        states.push(State::Handshaking);
        let conn = tokio::time::timeout(Duration::from_secs(20), connecting)
            .await
            .expect("handshake in time")
            .unwrap();
        states.push(State::Authenticating);
        assert_eq!(quic::exchange(&conn, "Connect").await, "AuthGrant");
        assert_eq!(quic::exchange(&conn, "AuthToken").await, "ServerAuthToken");
        assert_eq!(quic::exchange(&conn, "Play").await, "PlayOk");
        states.push(State::Play);
        // Quiet for longer than the relay's idle timeout: the tunnels keep the session alive.
        tokio::time::sleep(RELAY_IDLE + Duration::from_millis(1500)).await;
        assert_eq!(quic::exchange(&conn, "Ping").await, "Pong");
        states.push(State::Disconnecting);
        conn.close(0u32.into(), b"bye");
        tokio::time::timeout(Duration::from_secs(5), ep.wait_idle()).await.ok();
        states.push(State::Disconnected);
        states
    });
    assert_eq!(
        states,
        [
            State::Connecting,
            State::Handshaking,
            State::Authenticating,
            State::Play,
            State::Disconnecting,
            State::Disconnected
        ]
    );
}

#[test]
fn quic_hytale_alpn_through_tunnels_clean() {
    quic_through_tunnels(0);
}

#[test]
fn quic_hytale_alpn_through_tunnels_with_5_percent_loss() {
    quic_through_tunnels(5);
}
