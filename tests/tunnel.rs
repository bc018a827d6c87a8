//! Games that do not speak Unity Transport, through two `ferry tunnel`s and a real relay on
//! loopback, unmodified: a two-channel main/feed handshake (here), netcode.io and QUIC
//! (`tests/tunnel_games.rs`). Each runs once on a clean link and once with 5 % loss injected
//! between the tunnels and the relay.

mod support;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry::client::tunnel::{JoinExit, TunnelEvent};
use support::{LossyLink, Server, Tunnels};

const CONN_INIT: u8 = 1;
const CONN_ID: u8 = 2;
const FEED_INIT: u8 = 3;
const FEED_OK: u8 = 4;
const AUTH: u8 = 5;
const CONN_OK: u8 = 6;
const CONN_FAILED: u8 = 7;
const GAME: u8 = 0x10;
const ECHO: u8 = 0x11;
const PUSH: u8 = 0x12;

/// What the game server saw.
#[derive(Default)]
struct Seen {
    feed_inits: u32,
    main_sources: Vec<SocketAddr>,
    feed_sources: Vec<SocketAddr>,
}

/// The main/feed game server: two UDP ports. CONN_INIT on main → player ID + token A; FEED_INIT
/// (ID, A) on feed → token B (the very first FEED_INIT is ignored, so the client must retry);
/// AUTH (ID, B) on main → CONN_OK, or CONN_FAILED on both channels. GAME on main is echoed on
/// main and pushed on feed.
fn game_server(
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) -> (SocketAddr, SocketAddr, std::thread::JoinHandle<()>) {
    let main = UdpSocket::bind("127.0.0.1:0").unwrap();
    let feed = UdpSocket::bind("127.0.0.1:0").unwrap();
    main.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
    feed.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
    let (ma, fa) = (main.local_addr().unwrap(), feed.local_addr().unwrap());
    let t = std::thread::spawn(move || {
        struct Player {
            a: u64,
            b: u64,
            feed: Option<SocketAddr>,
        }
        let next = AtomicU32::new(1);
        let mut players: HashMap<u32, Player> = HashMap::new();
        let mut by_main: HashMap<SocketAddr, u32> = HashMap::new();
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = main.recv_from(&mut buf) {
                let m = &buf[..n];
                {
                    let mut s = seen.lock().unwrap();
                    if !s.main_sources.contains(&from) {
                        s.main_sources.push(from);
                    }
                }
                match m[0] {
                    CONN_INIT => {
                        let id = *by_main.entry(from).or_insert_with(|| next.fetch_add(1, Ordering::Relaxed));
                        let p = players.entry(id).or_insert(Player {
                            a: 0xA000 + id as u64,
                            b: 0xB000 + id as u64,
                            feed: None,
                        });
                        let mut r = vec![CONN_ID];
                        r.extend_from_slice(&id.to_be_bytes());
                        r.extend_from_slice(&p.a.to_be_bytes());
                        let _ = main.send_to(&r, from);
                    }
                    AUTH if n == 13 => {
                        let id = u32::from_be_bytes(m[1..5].try_into().unwrap());
                        let b = u64::from_be_bytes(m[5..13].try_into().unwrap());
                        match players.get(&id) {
                            Some(p) if p.b == b && p.feed.is_some() => {
                                let _ = main.send_to(&[CONN_OK], from);
                            }
                            p => {
                                let _ = main.send_to(&[CONN_FAILED], from);
                                if let Some(f) = p.and_then(|p| p.feed) {
                                    let _ = feed.send_to(&[CONN_FAILED], f);
                                }
                            }
                        }
                    }
                    GAME => {
                        let mut r = m.to_vec();
                        r[0] = ECHO;
                        let _ = main.send_to(&r, from);
                        if let Some(f) =
                            by_main.get(&from).and_then(|id| players.get(id)).and_then(|p| p.feed)
                        {
                            r[0] = PUSH;
                            let _ = feed.send_to(&r, f);
                        }
                    }
                    _ => {}
                }
            }
            if let Ok((n, from)) = feed.recv_from(&mut buf) {
                let m = &buf[..n];
                if m[0] == FEED_INIT && n == 13 {
                    let first = {
                        let mut s = seen.lock().unwrap();
                        s.feed_inits += 1;
                        if !s.feed_sources.contains(&from) {
                            s.feed_sources.push(from);
                        }
                        s.feed_inits == 1
                    };
                    if first {
                        continue; // dropped on purpose: the client must retry
                    }
                    let id = u32::from_be_bytes(m[1..5].try_into().unwrap());
                    let a = u64::from_be_bytes(m[5..13].try_into().unwrap());
                    if let Some(p) = players.get_mut(&id).filter(|p| p.a == a) {
                        p.feed = Some(from);
                        let mut r = vec![FEED_OK];
                        r.extend_from_slice(&p.b.to_be_bytes());
                        let _ = feed.send_to(&r, from);
                    }
                }
            }
        }
    });
    (ma, fa, t)
}

/// Sends `msg` every 200 ms until a reply starting with one of `want` arrives (40 tries).
fn request(sock: &UdpSocket, to: SocketAddr, msg: &[u8], want: &[u8]) -> Vec<u8> {
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = [0u8; 2048];
    for _ in 0..40 {
        sock.send_to(msg, to).unwrap();
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            if want.contains(&buf[0]) {
                return buf[..n].to_vec();
            }
        }
    }
    panic!("no answer of type {want:?} to {:?}", msg[0]);
}

/// The client's handshake: CONN_INIT on main, FEED_INIT on feed (retried), AUTH on main.
fn handshake(main: &UdpSocket, feed: &UdpSocket, local: &[SocketAddr], wrong_b: bool) -> u8 {
    let r = request(main, local[0], &[CONN_INIT], &[CONN_ID]);
    let (id, a) = (&r[1..5], &r[5..13]);
    let r = request(feed, local[1], &[&[FEED_INIT][..], id, a].concat(), &[FEED_OK]);
    let mut b = r[1..9].to_vec();
    if wrong_b {
        b[7] ^= 1;
    }
    request(main, local[0], &[&[AUTH][..], id, &b].concat(), &[CONN_OK, CONN_FAILED])[0]
}

fn play(main: &UdpSocket, feed: &UdpSocket, local: &[SocketAddr], text: &str) {
    let msg = [&[GAME][..], text.as_bytes()].concat();
    let mut buf = [0u8; 2048];
    // Each GAME message makes the server echo on main and push on feed; with 5 % loss either
    // may be lost, so the client plays again until both came.
    let mut pushed = None;
    for _ in 0..20 {
        let echo = request(main, local[0], &msg, &[ECHO]);
        assert_eq!(&echo[1..], text.as_bytes());
        feed.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        if let Ok((n, _)) = feed.recv_from(&mut buf) {
            pushed = Some(n);
            break;
        }
    }
    let n = pushed.expect("a push on the feed channel");
    assert_eq!(buf[0], PUSH);
    assert_eq!(&buf[1..n], text.as_bytes());
    while feed.recv_from(&mut buf).is_ok_and(|(_, _)| true) {
        feed.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    }
}

fn main_feed(loss: u32) {
    let srv = Server::start(|_| {});
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (ma, fa, server) = game_server(stop.clone(), seen.clone());
    let (hl, jl) = (LossyLink::new(srv.relay_addr(), loss, 7), LossyLink::new(srv.relay_addr(), loss, 11));
    let t = Tunnels::start_with(&srv, vec![ma, fa], hl.addr, jl.addr, support::path_for(loss));
    let local = t.local.clone();
    assert_eq!(local.len(), 2);

    let main = UdpSocket::bind("127.0.0.1:0").unwrap();
    let feed = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(handshake(&main, &feed, &local, false), CONN_OK);
    assert!(seen.lock().unwrap().feed_inits >= 2, "the first FEED_INIT was dropped and retried");
    play(&main, &feed, &local, "first words");

    // A network change under the join tunnel: its relay socket moves to a new port, it
    // re-BINDs, and the game notices nothing.
    t.join_ctl.migrate();
    play(&main, &feed, &local, "after the move");
    assert!(t.events.lock().unwrap().iter().any(|e| matches!(e, TunnelEvent::Rebound { .. })));

    // The game client reconnects on main from a new local port: a new flow, a new handshake.
    let main2 = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(handshake(&main2, &feed, &local, false), CONN_OK);
    play(&main2, &feed, &local, "reconnected");
    {
        let s = seen.lock().unwrap();
        // One stable source per player and channel on the server side: two main flows, one feed.
        assert_eq!(s.main_sources.len(), 2, "{:?}", s.main_sources);
        assert_eq!(s.feed_sources.len(), 1, "{:?}", s.feed_sources);
        assert!(!s.main_sources.contains(&s.feed_sources[0]));
    }

    // A failed authentication closes both channels.
    let main3 = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert_eq!(handshake(&main3, &feed, &local, true), CONN_FAILED);
    feed.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 64];
    let mut failed_on_feed = false;
    while let Ok((n, _)) = feed.recv_from(&mut buf) {
        if n == 1 && buf[0] == CONN_FAILED {
            failed_on_feed = true;
            break;
        }
    }
    assert!(failed_on_feed || loss > 0, "CONN_FAILED also arrives on feed");
    drop(main3);

    // The host leaves: the join tunnel reports it and stops on its own.
    let mut t = t;
    t.host_ctl.stop();
    let exit = t.join.take().unwrap().join().unwrap();
    assert_eq!(exit, Ok(JoinExit::HostLeft));
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}

#[test]
fn main_feed_handshake_through_tunnels() {
    main_feed(0);
}

#[test]
fn main_feed_handshake_through_tunnels_with_5_percent_loss() {
    main_feed(5);
}

#[test]
fn oversize_game_datagrams_are_dropped_counted_and_reported_once() {
    let srv = Server::start(|_| {});
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let ea = echo.local_addr().unwrap();
    let t = Tunnels::start(&srv, vec![ea], srv.relay_addr(), srv.relay_addr());
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let max = ferry::client::tunnel::frame::MAX_GAME_DATAGRAM;
    for _ in 0..3 {
        client.send_to(&vec![1u8; max + 1], t.local[0]).unwrap();
    }
    client.send_to(&vec![2u8; max], t.local[0]).unwrap();
    echo.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = echo.recv_from(&mut buf).unwrap();
    assert_eq!((n, buf[0]), (max, 2), "the largest datagram crosses unchanged; the larger ones do not");
    assert_eq!(t.join_ctl.stats.oversize.load(Ordering::Relaxed), 3);
    let reports =
        t.events.lock().unwrap().iter().filter(|e| matches!(e, TunnelEvent::Oversize { .. })).count();
    assert_eq!(reports, 1);
}

#[test]
fn a_joiner_that_leaves_frees_its_sockets_on_the_host() {
    let srv = Server::start(|_| {});
    let game = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut t = Tunnels::start(&srv, vec![game.local_addr().unwrap()], srv.relay_addr(), srv.relay_addr());
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.send_to(b"hello", t.local[0]).unwrap();
    game.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 64];
    let (_, host_side) = game.recv_from(&mut buf).unwrap();
    t.join_ctl.stop();
    assert_eq!(t.join.take().unwrap().join().unwrap(), Ok(JoinExit::Stopped));
    let mut freed = false;
    for _ in 0..50 {
        let ev = t.events.lock().unwrap().clone();
        if ev.iter().any(|e| matches!(e, TunnelEvent::PlayerLeft { reason: "left", .. }))
            && ev.iter().any(|e| matches!(e, TunnelEvent::FlowClosed { player: Some(_), .. }))
        {
            freed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(freed, "the host saw the BYE and closed the player's flow");
    assert_eq!(t.host_ctl.stats.flows_closed.load(Ordering::Relaxed), 1);
    // The flow's socket is gone: the game server's reply to it is refused by the host's kernel.
    game.send_to(b"anyone?", host_side).unwrap();
}
