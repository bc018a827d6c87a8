//! The steering program on a real SO_REUSEPORT group: every datagram lands on its owner's socket.

use std::net::UdpSocket;
use std::time::Duration;

use ferry::io::bind_udp;

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
    let first = bind_udp("127.0.0.1:0".parse().unwrap(), true).unwrap();
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
