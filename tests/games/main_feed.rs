//! The main/feed game of the tunnel tests: two UDP channels, a handshake across both with a
//! dropped first FEED_INIT, echoes on main and pushes on feed.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const CONN_INIT: u8 = 1;
pub const CONN_ID: u8 = 2;
pub const FEED_INIT: u8 = 3;
pub const FEED_OK: u8 = 4;
pub const AUTH: u8 = 5;
pub const CONN_OK: u8 = 6;
pub const CONN_FAILED: u8 = 7;
pub const GAME: u8 = 0x10;
pub const ECHO: u8 = 0x11;
pub const PUSH: u8 = 0x12;

/// What the game server saw.
#[derive(Default)]
pub struct Seen {
    pub feed_inits: u32,
    pub main_sources: Vec<SocketAddr>,
    pub feed_sources: Vec<SocketAddr>,
}

/// The main/feed game server: two UDP ports. CONN_INIT on main → player ID + token A; FEED_INIT
/// (ID, A) on feed → token B (the very first FEED_INIT is ignored, so the client must retry);
/// AUTH (ID, B) on main → CONN_OK, or CONN_FAILED on both channels. GAME on main is echoed on
/// main and pushed on feed.
pub fn game_server(
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
pub fn request(sock: &UdpSocket, to: SocketAddr, msg: &[u8], want: &[u8]) -> Vec<u8> {
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
pub fn handshake(main: &UdpSocket, feed: &UdpSocket, local: &[SocketAddr], wrong_b: bool) -> u8 {
    let r = request(main, local[0], &[CONN_INIT], &[CONN_ID]);
    let (id, a) = (&r[1..5], &r[5..13]);
    let r = request(feed, local[1], &[&[FEED_INIT][..], id, a].concat(), &[FEED_OK]);
    let mut b = r[1..9].to_vec();
    if wrong_b {
        b[7] ^= 1;
    }
    request(main, local[0], &[&[AUTH][..], id, &b].concat(), &[CONN_OK, CONN_FAILED])[0]
}

pub fn play(main: &UdpSocket, feed: &UdpSocket, local: &[SocketAddr], text: &str) {
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
