//! The traffic engine: an open-loop sender and a receiver on their own threads, batched syscalls
//! on both sides. Every payload carries `[seq u64][send time ns u64][stream u32]`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};

use super::setup::Stream;
use crate::clock::Clock;
use crate::io::{BatchIo, PacketBatch, SendItem, BATCH};

/// Smallest payload that holds the measurement fields.
pub const MIN_PAYLOAD: usize = 20;
const SERIES_BUCKET_NS: u64 = 100_000_000;
const REORDER_WINDOW: u64 = 1 << 16;

#[derive(Clone, Debug)]
pub struct TrafficSpec {
    pub payload: usize,
    /// Datagrams per second over all streams; 0 = as fast as possible.
    pub rate: u64,
    pub duration: Duration,
    /// Traffic before this is sent but not measured.
    pub warmup: Duration,
    pub pin_sender: Option<usize>,
    pub pin_receiver: Option<usize>,
    /// Send each batch as UDP GSO sends (fair only against relays that do not enable UDP_GRO,
    /// which would otherwise receive the bursts coalesced).
    pub gso: bool,
    /// Bursts per session, or sessions interleaved with mixed sizes.
    pub shape: super::Shape,
}

/// The game shape's payload sizes: RELAYs of 58–300 bytes, most of them small (inputs and
/// acknowledgements), some mid-sized (state deltas), a few large (snapshots).
pub fn game_payload(r: u32) -> usize {
    let x = (r >> 8) as usize;
    match r % 10 {
        0..=5 => MIN_PAYLOAD + x % 61, // 58–118-byte RELAYs
        6..=8 => 81 + x % 80,          // 119–198
        _ => 161 + x % 102,            // 199–300
    }
}

/// The mean of [`game_payload`] (reported as the run's payload size).
pub const GAME_MEAN_PAYLOAD: usize = 90;

/// xorshift32: the game shape's sizes, the same sequence every run.
fn next(s: &mut u32) -> u32 {
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    *s
}

/// What the receiver measured (only datagrams sent after the warm-up count).
pub struct Measured {
    pub sent: u64,
    pub send_blocked: u64,
    pub received: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub latency_ns: Histogram<u64>,
    /// Datagrams received per 100 ms since the end of the warm-up.
    pub series_pps: Vec<u64>,
    /// p50 and p99 one-way latency (µs) per second since the end of the warm-up.
    pub series_latency: Vec<(f64, f64)>,
    pub measured_secs: f64,
}

struct Seen {
    highest: u64,
    bits: Vec<u64>,
    any: bool,
}

impl Seen {
    fn new() -> Self {
        Self { highest: 0, bits: vec![0; (REORDER_WINDOW / 64) as usize], any: false }
    }

    /// Returns (duplicate, reordered).
    fn mark(&mut self, seq: u64) -> (bool, bool) {
        if self.any && seq + REORDER_WINDOW <= self.highest {
            return (false, true); // too old to tell: count it as late, not as new
        }
        let reordered = self.any && seq < self.highest;
        if !self.any || seq > self.highest {
            // Clear the bits that scroll out of the window.
            let start = if self.any { self.highest + 1 } else { seq };
            for s in start.max(seq.saturating_sub(REORDER_WINDOW - 1))..=seq {
                let i = (s % REORDER_WINDOW) as usize;
                self.bits[i / 64] &= !(1 << (i % 64));
            }
            self.highest = seq;
            self.any = true;
        }
        let i = (seq % REORDER_WINDOW) as usize;
        let dup = self.bits[i / 64] & (1 << (i % 64)) != 0;
        self.bits[i / 64] |= 1 << (i % 64);
        (dup, reordered && !dup)
    }
}

fn pin(core: Option<usize>) {
    if let Some(id) = core {
        core_affinity::set_for_current(core_affinity::CoreId { id });
    }
}

/// Runs the traffic described by `spec` over `streams` and returns the measurements.
pub fn run(
    streams: Vec<Stream>,
    spec: &TrafficSpec,
    progress: impl Fn(f64) + Send,
) -> std::io::Result<Measured> {
    let payload = spec.payload.max(MIN_PAYLOAD);
    let clock = Clock::new();
    let start = clock.nanos() + 50_000_000;
    let measure_from = start + spec.warmup.as_nanos() as u64;
    let end = measure_from + spec.duration.as_nanos() as u64;
    let done = Arc::new(AtomicBool::new(false));

    let mut txs = Vec::new();
    let mut rxs = Vec::new();
    let mut keepalives = Vec::new();
    for s in streams {
        if let Some(k) = s.keepalive {
            keepalives.push((s.rx.try_clone()?, s.dst, k));
        }
        txs.push((s.tx, s.dst, s.header));
        // Sessions that share a receiver socket share one registration (the payload names
        // the stream).
        let local = s.rx.local_addr()?;
        if !rxs.iter().any(|r: &std::net::UdpSocket| r.local_addr().ok() == Some(local)) {
            rxs.push(s.rx);
        }
    }
    let streams = txs.len();
    let header_len = txs.first().map_or(0, |t| t.2.len());

    let receiver = {
        let done = done.clone();
        let spec = spec.clone();
        std::thread::spawn(move || -> std::io::Result<Measured> {
            pin(spec.pin_receiver);
            let mut poll = Poll::new()?;
            let mut socks: Vec<mio::net::UdpSocket> = rxs
                .into_iter()
                .map(|s| {
                    let _ = s.set_nonblocking(true);
                    mio::net::UdpSocket::from_std(s)
                })
                .collect();
            for (i, s) in socks.iter_mut().enumerate() {
                poll.registry().register(s, Token(i), Interest::READABLE)?;
            }
            let mut ios: Vec<BatchIo> = socks.iter().map(BatchIo::new).collect();
            let mut batch = PacketBatch::new();
            let mut events = Events::with_capacity(1024);
            let mut seen: Vec<Seen> = (0..streams).map(|_| Seen::new()).collect();
            let mut m = Measured {
                sent: 0,
                send_blocked: 0,
                received: 0,
                duplicates: 0,
                reordered: 0,
                latency_ns: Histogram::new_with_bounds(1, 60_000_000_000, 3)
                    .map_err(std::io::Error::other)?,
                series_pps: Vec::new(),
                series_latency: Vec::new(),
                measured_secs: spec.duration.as_secs_f64(),
            };
            let mut per_sec =
                Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 2).map_err(std::io::Error::other)?;
            let mut cur_sec = 0usize;
            let mut ready: Vec<usize> = (0..socks.len()).collect();
            let mut last_keepalive = clock.nanos();
            loop {
                if clock.nanos() - last_keepalive > 2_000_000_000 {
                    last_keepalive = clock.nanos();
                    for (sock, dst, ping) in &keepalives {
                        let _ = sock.send_to(ping, *dst);
                    }
                }
                let finished = done.load(Ordering::Acquire);
                // Sockets still known to hold datagrams are drained without waiting: epoll is
                // edge-triggered, so no event may come for what is already queued.
                let wait = if !ready.is_empty() {
                    Duration::ZERO
                } else if finished {
                    Duration::from_millis(200)
                } else {
                    Duration::from_millis(20)
                };
                poll.poll(&mut events, Some(wait))?;
                ready.extend(events.iter().map(|e| e.token().0));
                if ready.is_empty() && finished {
                    break;
                }
                ready.sort_unstable();
                ready.dedup();
                let mut still = Vec::new();
                for &i in &ready {
                    let n = ios[i].recv(&mut batch)?;
                    if n == 0 {
                        continue;
                    }
                    still.push(i);
                    let now = clock.nanos();
                    for k in 0..n {
                        let len = batch.meta[k].len;
                        if len < header_len + MIN_PAYLOAD {
                            continue;
                        }
                        let p = &batch.bufs[k][header_len..len];
                        let seq = u64::from_le_bytes(p[0..8].try_into().unwrap_or_default());
                        let ts = u64::from_le_bytes(p[8..16].try_into().unwrap_or_default());
                        let stream = u32::from_le_bytes(p[16..20].try_into().unwrap_or_default()) as usize;
                        if ts < measure_from || ts >= end || stream >= seen.len() {
                            continue;
                        }
                        let (dup, reordered) = seen[stream].mark(seq);
                        if dup {
                            m.duplicates += 1;
                            continue;
                        }
                        m.reordered += reordered as u64;
                        m.received += 1;
                        let lat = now.saturating_sub(ts).max(1);
                        let _ = m.latency_ns.record(lat);
                        let at = now.saturating_sub(measure_from);
                        let bucket = (at / SERIES_BUCKET_NS) as usize;
                        if bucket >= m.series_pps.len() {
                            m.series_pps.resize(bucket + 1, 0);
                        }
                        m.series_pps[bucket] += 1;
                        let sec = (at / 1_000_000_000) as usize;
                        if sec != cur_sec && !per_sec.is_empty() {
                            while m.series_latency.len() < cur_sec {
                                m.series_latency.push((f64::NAN, f64::NAN));
                            }
                            m.series_latency.push((
                                per_sec.value_at_quantile(0.5) as f64 / 1000.0,
                                per_sec.value_at_quantile(0.99) as f64 / 1000.0,
                            ));
                            per_sec.reset();
                        }
                        cur_sec = sec;
                        let _ = per_sec.record(lat);
                    }
                }
                ready = still;
            }
            if !per_sec.is_empty() {
                m.series_latency.push((
                    per_sec.value_at_quantile(0.5) as f64 / 1000.0,
                    per_sec.value_at_quantile(0.99) as f64 / 1000.0,
                ));
            }
            Ok(m)
        })
    };

    // The sender runs on this thread.
    pin(spec.pin_sender);
    let mut pacer = Pacer::new(&clock, spec.rate, (start, measure_from, end), &progress);
    let sent = match spec.shape {
        super::Shape::Game => send_game(&txs, &mut pacer),
        super::Shape::Burst => send_bursts(&txs, header_len + payload, header_len, spec.gso, &mut pacer),
    };
    progress(1.0);
    done.store(true, Ordering::Release);
    let mut m = receiver.join().map_err(|_| std::io::Error::other("receiver panicked"))??;
    sent?;
    m.sent = pacer.measured;
    m.send_blocked = pacer.blocked;
    Ok(m)
}

/// The burst shape's sender: sessions take turns, each send a batch of one session's
/// datagrams of one size (UDP GSO's best case when `spec.gso`).
fn send_bursts(
    txs: &[(std::net::UdpSocket, SocketAddr, Vec<u8>)],
    len: usize,
    header_len: usize,
    gso: bool,
    pacer: &mut Pacer,
) -> std::io::Result<()> {
    let mut ios: Vec<BatchIo> = txs.iter().map(|t| BatchIo::new(&t.0)).collect();
    for io in &mut ios {
        io.set_gso(gso);
    }
    for t in txs {
        t.0.set_nonblocking(true)?;
    }
    let mut batch = PacketBatch::new();
    let mut items: Vec<SendItem> = Vec::with_capacity(BATCH);
    let mut seqs = vec![0u64; txs.len()];
    let mut stamps = [0u64; BATCH];
    for b in batch.bufs.iter_mut() {
        b[..len].fill(0x5A);
    }
    let mut k = 0usize;
    while let Some(n) = pacer.due() {
        let (_, dst, header) = &txs[k];
        let dst: SocketAddr = *dst;
        items.clear();
        let first = seqs[k];
        for (i, b) in batch.bufs.iter_mut().take(n).enumerate() {
            b[..header_len].copy_from_slice(header);
            let p = &mut b[header_len..len];
            p[0..8].copy_from_slice(&(first + i as u64).to_le_bytes());
            stamps[i] = pacer.clock.nanos();
            p[8..16].copy_from_slice(&stamps[i].to_le_bytes());
            p[16..20].copy_from_slice(&(k as u32).to_le_bytes());
            items.push(SendItem { slot: i, len, dst });
        }
        let r = ios[k].send(&batch, &items);
        let went = r.sent + r.errors;
        seqs[k] = first + went as u64;
        pacer.went(&stamps[..went], r.would_block);
        k = (k + 1) % txs.len();
    }
    Ok(())
}

/// The pacing both senders share: start on time, report progress every 100 ms, say how many
/// datagrams are due, and count what went (only datagrams stamped inside the measured window
/// count as sent).
struct Pacer<'a> {
    clock: &'a Clock,
    rate: u64,
    start: u64,
    measure_from: u64,
    end: u64,
    progress: &'a dyn Fn(f64),
    last_progress: u64,
    sent: u64,
    measured: u64,
    blocked: u64,
}

impl<'a> Pacer<'a> {
    fn new(
        clock: &'a Clock,
        rate: u64,
        (start, measure_from, end): (u64, u64, u64),
        progress: &'a dyn Fn(f64),
    ) -> Self {
        Pacer {
            clock,
            rate,
            start,
            measure_from,
            end,
            progress,
            last_progress: 0,
            sent: 0,
            measured: 0,
            blocked: 0,
        }
    }

    /// Datagrams due now (at least one), waiting until some are and until the start; None once
    /// the run is over.
    fn due(&mut self) -> Option<usize> {
        while self.clock.nanos() < self.start {
            std::hint::spin_loop();
        }
        loop {
            let now = self.clock.nanos();
            if now >= self.end {
                return None;
            }
            if now - self.last_progress > 100_000_000 {
                self.last_progress = now;
                (self.progress)((now - self.start) as f64 / (self.end - self.start) as f64);
            }
            if let Some(n) = due(now, self.start, self.rate, self.sent) {
                return Some(n);
            }
        }
    }

    /// A send left with these datagrams' send times; `would_block` were refused by a full buffer.
    fn went(&mut self, stamps: &[u64], would_block: usize) {
        self.sent += stamps.len() as u64;
        self.blocked += would_block as u64;
        self.measured += stamps.iter().filter(|&&t| t >= self.measure_from && t < self.end).count() as u64;
    }
}

/// How many datagrams are due at `now` under `rate` (a full batch when unpaced), or None after
/// waiting briefly when none is.
fn due(now: u64, start: u64, rate: u64, sent: u64) -> Option<usize> {
    if rate == 0 {
        return Some(BATCH);
    }
    let due = ((now - start) as u128 * rate as u128 / 1_000_000_000) as u64;
    let d = due.saturating_sub(sent);
    if d == 0 {
        // Never spin: the receiver shares this core and must not wait for our time slice.
        let next_due = start + ((sent + 1) as u128 * 1_000_000_000 / rate as u128) as u64;
        let wait = next_due.saturating_sub(now);
        if wait > 20_000 {
            std::thread::sleep(Duration::from_nanos(wait));
        } else {
            std::thread::yield_now();
        }
        return None;
    }
    Some((d as usize).min(BATCH))
}

/// The game shape's sender: each send carries up to a batch of datagrams of *different*
/// sessions that share a sender socket (one per session where sockets are not shared), with
/// sizes drawn from [`game_payload`]; socket groups take turns.
fn send_game(txs: &[(std::net::UdpSocket, SocketAddr, Vec<u8>)], pacer: &mut Pacer) -> std::io::Result<()> {
    // Streams grouped by the socket they send from.
    let mut groups: Vec<(SocketAddr, Vec<usize>)> = Vec::new();
    for (i, t) in txs.iter().enumerate() {
        let local = t.0.local_addr()?;
        match groups.iter_mut().find(|g| g.0 == local) {
            Some(g) => g.1.push(i),
            None => groups.push((local, vec![i])),
        }
    }
    let mut ios: Vec<BatchIo> = groups.iter().map(|g| BatchIo::new(&txs[g.1[0]].0)).collect();
    for t in txs {
        t.0.set_nonblocking(true)?;
    }
    let mut cursor = vec![0usize; groups.len()];
    let mut seqs = vec![0u64; txs.len()];
    let mut batch = PacketBatch::new();
    let mut items: Vec<SendItem> = Vec::with_capacity(BATCH);
    let mut which = [0usize; BATCH];
    let mut stamps = [0u64; BATCH];
    let mut rng = 0x9e37_79b9u32;
    let mut g = 0usize;
    while let Some(n) = pacer.due() {
        let members = &groups[g].1;
        let n = n.min(members.len());
        items.clear();
        for (i, b) in batch.bufs.iter_mut().take(n).enumerate() {
            let s = members[(cursor[g] + i) % members.len()];
            which[i] = s;
            let (_, dst, header) = &txs[s];
            let len = header.len() + game_payload(next(&mut rng));
            b[..header.len()].copy_from_slice(header);
            if header.len() >= 38 {
                // A RELAY's length field follows the payload's size.
                let plen = (len - header.len()) as u16;
                b[36..38].copy_from_slice(&plen.to_be_bytes());
            } else if header.len() == 4 {
                // TURN ChannelData: its length field likewise.
                let plen = (len - 4) as u16;
                b[2..4].copy_from_slice(&plen.to_be_bytes());
            }
            let p = &mut b[header.len()..len];
            p[0..8].copy_from_slice(&seqs[s].to_le_bytes());
            seqs[s] += 1;
            stamps[i] = pacer.clock.nanos();
            p[8..16].copy_from_slice(&stamps[i].to_le_bytes());
            p[16..20].copy_from_slice(&(s as u32).to_le_bytes());
            p[20..].fill(0x5A);
            items.push(SendItem { slot: i, len, dst: *dst });
        }
        let r = ios[g].send(&batch, &items);
        let went = (r.sent + r.errors).min(n);
        for &s in which[went..n].iter().rev() {
            seqs[s] -= 1;
        }
        cursor[g] = (cursor[g] + went) % members.len();
        pacer.went(&stamps[..went], r.would_block);
        g = (g + 1) % groups.len();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Seen;

    #[test]
    fn duplicates_and_reordering() {
        let mut s = Seen::new();
        assert_eq!(s.mark(0), (false, false));
        assert_eq!(s.mark(2), (false, false));
        assert_eq!(s.mark(1), (false, true));
        assert_eq!(s.mark(2), (true, false));
        assert_eq!(s.mark(1_000_000), (false, false));
        assert_eq!(s.mark(2), (false, true), "outside the window: late, not new");
        assert_eq!(s.mark(1_000_000), (true, false));
    }
}
