//! A GSO run the kernel refuses is resent datagram by datagram, on both backends, and nothing is
//! lost. Linux refuses UDP GSO (EINVAL) on a socket with `SO_NO_CHECK`, so the shard here runs on
//! such a socket — the same answer a route whose MTU is below the segment size gives.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use ferry::client::packets;
use ferry::clock::Clock;
use ferry::control::relay::RelayHandle;
use ferry::core::CoreConfig;
use ferry::io::bind_udp;
use ferry::shard::{spawn_all, ShardSetup};

const BIND_RECEIVED: [u8; 4] = [0xDA, 0x72, 0x00, 0x01];

fn client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

fn recv(s: &UdpSocket) -> Vec<u8> {
    let mut buf = [0u8; 2048];
    loop {
        match s.recv(&mut buf) {
            Ok(n) => return buf[..n].to_vec(),
            // An in-process io_uring shard can interrupt blocking calls of other threads.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("no datagram: {e}"),
        }
    }
}

fn refused_runs_arrive_one_by_one(uring: bool) {
    let sock = bind_udp("127.0.0.1:0".parse().unwrap(), false).unwrap();
    let one: libc::c_int = 1;
    // SAFETY: setting an int socket option from a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let relay: SocketAddr = sock.local_addr().unwrap();
    let (events, _events_rx) = tokio::sync::mpsc::unbounded_channel();
    let setup = ShardSetup {
        index: 0,
        socket: sock,
        core: CoreConfig::new([7; 64]),
        clock: Clock::new(),
        events,
        pin: None,
        uring,
        gso: true,
        dtls: None,
        links: None,
    };
    let (handles, threads) = spawn_all(vec![setup]).unwrap();
    let shards = RelayHandle::new(handles);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (_, host) = rt.block_on(shards.create_host(2)).unwrap();
    let joiner = rt.block_on(shards.create_joiner(host.id)).unwrap();

    let (h, j) = (client(), client());
    h.send_to(&packets::bind(&host.key, 1, &host.connection_data), relay).unwrap();
    assert_eq!(recv(&h), BIND_RECEIVED);
    j.send_to(&packets::bind(&joiner.key, 1, &joiner.connection_data), relay).unwrap();
    assert_eq!(recv(&j), BIND_RECEIVED);
    j.send_to(&packets::connect_request(&joiner.id, &host.connection_data), relay).unwrap();
    assert_eq!(recv(&j)[3], 6, "ACCEPTED");
    // The host shows it is alive, so traffic to it is not held to the unconfirmed budget.
    h.send_to(&packets::ping(&host.id, 1), relay).unwrap();
    recv(&h);

    // Bursts of same-size datagrams to one destination: the shard groups them into GSO runs,
    // the kernel refuses each, and every datagram must still arrive, unchanged and in order.
    for round in 0..4u8 {
        let sent: Vec<Vec<u8>> =
            (0..48u8).map(|i| packets::relay(&joiner.id, &host.id, &[round ^ i; 400]).unwrap()).collect();
        for d in &sent {
            j.send_to(d, relay).unwrap();
        }
        for d in &sent {
            assert_eq!(&recv(&h), d, "uring: {uring}");
        }
    }

    let stats = rt.block_on(shards.stats());
    let io = &stats[0].io;
    let backend = stats[0].backend;
    // Without io_uring on this kernel the shard ran on epoll; the check is the same.
    assert!(io.gso_fallbacks > 0, "{backend}: the refused runs were counted ({io:?})");
    assert_eq!(io.gso_sends, 0, "{backend}: no run went out as GSO");
    assert_eq!((io.send_errors, io.send_dropped_full), (0, 0), "{backend}: nothing lost");
    shards.stop();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn refused_gso_runs_are_resent_one_by_one_on_epoll() {
    refused_runs_arrive_one_by_one(false);
}

#[test]
fn refused_gso_runs_are_resent_one_by_one_on_io_uring() {
    refused_runs_arrive_one_by_one(true);
}
