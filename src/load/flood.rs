//! Hostile flood: datagrams an attacker would send — random bytes, wrong lengths, BINDs with bad
//! HMACs, RELAYs naming unknown IDs, oversize datagrams — from many source addresses, while honest
//! sessions run. Measures what comes back to the flood sources.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::client::packets;
use crate::io::{BatchIo, PacketBatch, SendItem, BATCH};
use crate::wire::AllocationId;

#[derive(Serialize, Debug, Clone, Default)]
pub struct FloodReport {
    pub datagrams_sent: u64,
    pub bytes_sent: u64,
    pub datagrams_back: u64,
    pub bytes_back: u64,
    /// Bytes the relay sent to flood sources per byte they sent (must stay ≤ 1).
    pub bytes_out_per_byte_in: f64,
    pub relay_rss_before_kib: Option<u64>,
    pub relay_rss_after_kib: Option<u64>,
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The `i`-th hostile datagram (a mix of five kinds), written into `out`; returns its length.
fn hostile(i: u64, rng: &mut XorShift, known: &[AllocationId], out: &mut [u8]) -> usize {
    let r = rng.next();
    match i % 5 {
        0 => {
            let n = (r % 600) as usize;
            for b in out[..n].iter_mut() {
                *b = rng.next() as u8;
            }
            if n >= 2 && r & 1 == 0 {
                out[..2].copy_from_slice(&[0xDA, 0x72]);
            }
            n
        }
        1 => {
            // A RELAY whose length field disagrees with its size.
            let d = packets::relay(&AllocationId([r as u8; 16]), &AllocationId([7; 16]), &[0; 40])
                .unwrap_or_default();
            let n = d.len() - 1 - (r % 10) as usize;
            out[..n].copy_from_slice(&d[..n]);
            n
        }
        2 => {
            // A UTP-sized BIND for a real allocation, with a forged MAC.
            let mut conn = [0u8; 255];
            if let Some(id) = known.get((r as usize) % known.len().max(1)) {
                conn[..16].copy_from_slice(&id.0);
                conn[16] = 1;
            }
            let d = packets::bind(&crate::auth::AllocationKey([r as u8; 64]), r as u16, &conn);
            out[..d.len()].copy_from_slice(&d);
            d.len()
        }
        3 => {
            // Unknown IDs, or a real sender ID from the wrong address.
            let from = match known.get((r as usize) % known.len().max(1)) {
                Some(id) if r & 2 == 0 => *id,
                _ => AllocationId(((r as u128) << 64 | rng.next() as u128).to_be_bytes()),
            };
            let d = packets::relay(&from, &AllocationId([9; 16]), &[0xEE; 64]).unwrap_or_default();
            out[..d.len()].copy_from_slice(&d);
            d.len()
        }
        _ => {
            // Oversize.
            let n = 1473 + (r % 500) as usize;
            out[..n].fill(0xDA);
            n
        }
    }
}

/// Sends `count` hostile datagrams to `relay` from `sources` sockets on 127.0.0.2…, counting what
/// comes back. Runs until done or `stop` is set.
pub fn run(
    relay: SocketAddr,
    count: u64,
    known: Vec<AllocationId>,
    sources: usize,
    stop: Arc<AtomicBool>,
) -> std::io::Result<FloodReport> {
    let socks: Vec<UdpSocket> = (0..sources)
        .map(|i| {
            let s = UdpSocket::bind(format!("127.0.{}.{}:0", 1 + i / 200, 2 + i % 200))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<std::io::Result<_>>()?;
    let mut ios: Vec<BatchIo> = socks.iter().map(BatchIo::new).collect();
    let mut out = PacketBatch::new();
    let mut inb = PacketBatch::new();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut rep = FloodReport::default();
    let mut items = Vec::with_capacity(BATCH);
    let mut i = 0u64;
    let mut k = 0usize;
    while i < count && !stop.load(Ordering::Relaxed) {
        items.clear();
        for slot in 0..BATCH.min((count - i) as usize) {
            let len = hostile(i, &mut rng, &known, &mut out.bufs[slot]);
            items.push(SendItem { slot, len, dst: relay });
            i += 1;
        }
        let r = ios[k].send(&out, &items);
        for it in &items[..r.sent + r.errors] {
            rep.datagrams_sent += 1;
            rep.bytes_sent += it.len as u64;
        }
        if r.would_block > 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
        k = (k + 1) % ios.len();
        if k == 0 {
            drain(&mut ios, &mut inb, &mut rep)?;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    drain(&mut ios, &mut inb, &mut rep)?;
    rep.bytes_out_per_byte_in =
        if rep.bytes_sent == 0 { 0.0 } else { rep.bytes_back as f64 / rep.bytes_sent as f64 };
    Ok(rep)
}

fn drain(ios: &mut [BatchIo], inb: &mut PacketBatch, rep: &mut FloodReport) -> std::io::Result<()> {
    for io in ios.iter_mut() {
        loop {
            let n = io.recv(inb)?;
            if n == 0 {
                break;
            }
            rep.datagrams_back += n as u64;
            rep.bytes_back += inb.meta[..n].iter().map(|m| m.len as u64).sum::<u64>();
        }
    }
    Ok(())
}
