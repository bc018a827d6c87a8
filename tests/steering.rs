//! The steering program on a real SO_REUSEPORT group: every datagram lands on its owner's socket.

use std::net::UdpSocket;
use std::time::Duration;

use ferry::io::{bind_udp, claim_and_bind};

mod netns;
mod support;

fn datagram(ty: u8, owner_word: u32) -> Vec<u8> {
    let mut d = vec![0xDA, 0x72, 0, ty];
    if ty == 0 {
        d.extend_from_slice(&[0, 0, 0, 255]); // BIND: mode, nonce, L; the ID starts at 8
    }
    d.extend_from_slice(&owner_word.to_be_bytes());
    // PING and CLOSE are shorter than 24 bytes: only the ID's first word is needed.
    let rest = match ty {
        2 => 14,
        11 => 12,
        _ => 40,
    };
    d.extend_from_slice(&vec![0u8; rest]);
    d
}

#[test]
fn each_datagram_lands_on_its_owner_socket() {
    const SHARDS: u32 = 4;
    // Port 0 through the claim: a reuseport bind of port 0 could join another group.
    let (_claim, first) = claim_and_bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
    let addr = first.local_addr().unwrap();
    let mut socks = vec![first];
    for _ in 1..SHARDS {
        socks.push(bind_udp(addr, true).unwrap());
    }
    ferry::steer::attach(&socks[0], SHARDS).expect("attach the steering program");

    // One client socket: without steering, the kernel's 4-tuple hash would send all of these to
    // the same member of the group.
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut expected = vec![Vec::new(); SHARDS as usize];
    for word in 0..64u32 {
        for ty in [0u8, 2, 3, 9, 10, 11] {
            let d = datagram(ty, word.wrapping_mul(2_654_435_761));
            client.send_to(&d, addr).unwrap();
            expected[(word.wrapping_mul(2_654_435_761) % SHARDS) as usize].push(d);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    for (i, s) in socks.iter().enumerate() {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        assert_eq!(got, expected[i], "socket {i} received exactly its shard's datagrams, in order");
    }
}

/// Removes the namespace when the test ends, passed or not.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn relays_on_port_zero_never_share_a_reuseport_group() {
    // The kernel's search for a free port passes over ports held by other SO_REUSEPORT sockets of
    // the same user when the searching socket has SO_REUSEPORT too. In a namespace with two
    // ephemeral ports, a relay whose first shard bound port 0 that way landed in the other relay's
    // group half the time, and each then received the other's datagrams.
    let ns = Namespace(format!("fy{}xport", std::process::id()));
    netns::sh(&["ip", "netns", "add", &ns.0]);
    netns::sh(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]);
    netns::sh(&["ip", "netns", "exec", &ns.0, "sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40001"]);
    netns::in_ns(&ns.0, || {
        // The APIs listen outside the two ports, so the relays' UDP sockets are all that use them.
        let a = support::Server::start(|c| {
            c.shards = 2;
            c.api_listen = "127.0.0.1:39000".parse().unwrap();
        });
        let taken = a.relay_addr().port();
        assert!((40000..=40001).contains(&taken), "relay A on {taken}");
        for round in 0..16u16 {
            let b = support::Server::start(|c| {
                c.shards = 2;
                c.api_listen = format!("127.0.0.1:{}", 39001 + round).parse().unwrap();
            });
            assert_ne!(b.relay_addr().port(), taken, "round {round}: relay B joined relay A's group");
        }
    });
}
