//! B1, the ideal forwarder: recvmmsg → table lookup → sendmmsg, with no checks at all. It is the
//! speed of light for "one receive and one send per datagram" on this kernel, and the baseline
//! Ferry is measured against. It learns routes from BIND-shaped datagrams (the ID at offset 8)
//! and answers them with BIND_RECEIVED, so the load generator drives it exactly like Ferry.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use mio::{Events, Interest, Poll, Token};

use crate::io::{bind_udp, BatchIo, PacketBatch, SendItem, BATCH};

/// FNV-1a over the ID: the cheapest reasonable hash (B1 trusts its input).
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        self.0 = h;
    }
}

/// Runs the forwarder on `listen` until the process ends.
pub fn run(listen: SocketAddr, pin: Option<usize>) -> io::Result<()> {
    if let Some(c) = pin {
        core_affinity::set_for_current(core_affinity::CoreId { id: c });
    }
    let sock = bind_udp(listen, false)?;
    eprintln!("b1 forwarding on {}", sock.local_addr()?);
    let mut sock = mio::net::UdpSocket::from_std(sock);
    let mut poll = Poll::new()?;
    poll.registry().register(&mut sock, Token(0), Interest::READABLE)?;
    let mut events = Events::with_capacity(8);
    let mut io = BatchIo::new(&sock);
    let mut batch = PacketBatch::new();
    let mut table: HashMap<[u8; 16], SocketAddr, BuildHasherDefault<Fnv>> = HashMap::default();
    let mut sends = Vec::with_capacity(BATCH);
    loop {
        poll.poll(&mut events, Some(Duration::from_secs(1)))?;
        loop {
            let n = io.recv(&mut batch)?;
            if n == 0 {
                break;
            }
            sends.clear();
            for i in 0..n {
                let m = batch.meta[i];
                let d = &mut batch.bufs[i][..m.len];
                if m.len >= 24 && d[3] == 0 {
                    let mut id = [0u8; 16];
                    id.copy_from_slice(&d[8..24]);
                    table.insert(id, m.src);
                    d[3] = 1;
                    sends.push(SendItem { slot: i, len: 4, dst: m.src });
                } else if m.len >= 36 {
                    let mut id = [0u8; 16];
                    id.copy_from_slice(&d[20..36]);
                    if let Some(&dst) = table.get(&id) {
                        sends.push(SendItem { slot: i, len: m.len, dst });
                    }
                }
            }
            io.send(&batch, &sends);
        }
    }
}
