//! Games that do not speak Unity Transport, through two `ferry tunnel`s and a real relay on
//! loopback, unmodified: a two-channel main/feed handshake (here), netcode.io and QUIC
//! (`tests/tunnel_games.rs`). Each runs once on a clean link and once with 5 % loss injected
//! between the tunnels and the relay.

mod games;
mod support;

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry::client::tunnel::{JoinExit, TunnelEvent};
use games::main_feed::{game_server, handshake, play, Seen, CONN_FAILED, CONN_OK};
use support::{LossyLink, Server, Tunnels};

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
