//! Embeds both ends of a tunnel in one program: a host tunnel in front of a local UDP echo
//! server and a join tunnel, then sends one datagram through them.
//!
//! Run a relay first (`cargo run --release -- serve`), then
//! `cargo run -p ferry-client --example embed_tunnel`.

use std::net::UdpSocket;
use std::time::Duration;

use ferry_client::tunnel::{HostConfig, HostTunnel, JoinConfig, JoinTunnel, Timing, TunnelControl};
use ferry_client::ApiClient;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let api = ApiClient::new(std::env::var("FERRY_API").unwrap_or_else(|_| "http://127.0.0.1:7880".into()));
    // The "game server": echoes one datagram.
    let game = UdpSocket::bind("127.0.0.1:0")?;
    let game_addr = game.local_addr()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        if let Ok((n, from)) = game.recv_from(&mut buf) {
            let _ = game.send_to(&buf[..n], from);
        }
    });

    let mut host = HostTunnel::open(
        &api,
        HostConfig {
            forwards: vec![game_addr],
            players: 4,
            timing: Timing::default(),
            relay: None,
            path: Default::default(),
        },
    )?;
    let code = host.join_code().to_string();
    println!("join code {code}");
    let host_ctl = TunnelControl::new();
    let c = host_ctl.clone();
    let host_thread = std::thread::spawn(move || host.run(&c, &mut |e| println!("host: {e:?}")));

    // The joiner mirrors the game's port; shift it, since the game server holds it here.
    let offset = 2000 - game_addr.port() as i32 + (game_addr.port() % 5000) as i32;
    let mut join =
        JoinTunnel::open(&api, &code, JoinConfig { port_offset: offset, ..JoinConfig::default() })?;
    let local = join.local_addrs()[0];
    let join_ctl = TunnelControl::new();
    let c = join_ctl.clone();
    let join_thread = std::thread::spawn(move || join.run(&c, &mut |e| println!("join: {e:?}")));

    let client = UdpSocket::bind("127.0.0.1:0")?;
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    client.send_to(b"hello through two tunnels", local)?;
    let mut buf = [0u8; 1500];
    let (n, _) = client.recv_from(&mut buf)?;
    println!("echo: {}", String::from_utf8_lossy(&buf[..n]));

    join_ctl.stop();
    host_ctl.stop();
    join_thread.join().ok();
    host_thread.join().ok();
    Ok(())
}
