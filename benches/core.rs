//! Micro-benchmarks of the packet path: wire parsing, BIND verification, routing lookups, the
//! timer wheel, and `Core::handle_datagram` for RELAY at several table sizes.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use ferry::auth::{verify_bind, AllocationKey, PreKeyedHmac};
use ferry::client::packets;
use ferry::core::{Action, Core, CoreConfig, Created, Entropy};
use ferry::timer::TimerWheel;
use ferry::wire::{self, AllocationId, Bind, Relay};

fn entropy(n: u64) -> Entropy {
    let mut e = Entropy { id: [0; 16] };
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    for b in e.id.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    e
}

fn addr(i: u32) -> SocketAddr {
    SocketAddr::from(([127, (i >> 16) as u8, (i >> 8) as u8, i as u8 | 1], 1024 + (i % 60_000) as u16))
}

/// `sessions` host+joiner pairs, all bound and linked. Returns (host, joiner, joiner address) per pair.
fn build(sessions: u32) -> (Core, Vec<(Created, Created, SocketAddr)>) {
    let mut cfg = CoreConfig::new([7; 64]);
    cfg.max_allocations = sessions * 2 + 16;
    let mut core = Core::new(cfg, 0);
    let mut out = Vec::with_capacity(sessions as usize);
    for s in 0..sessions {
        let h = core.create_host(0, 1, entropy(s as u64 * 2)).expect("host");
        let j = core.create_joiner(0, &h.id, entropy(s as u64 * 2 + 1)).expect("joiner");
        let (ha, ja) = (addr(s * 2), addr(s * 2 + 1));
        for (c, a) in [(&h, ha), (&j, ja)] {
            let mut b = packets::bind(&c.key, 0, &c.connection_data);
            assert!(matches!(core.handle_datagram(0, a, &mut b), Action::Reply(4)));
        }
        let mut c = packets::connect_request(&j.id, &h.connection_data);
        assert!(matches!(core.handle_datagram(0, ja, &mut c), Action::Reply(36)));
        out.push((h, j, ja));
    }
    (core, out)
}

fn wire_benches(c: &mut Criterion) {
    let d = packets::relay(&AllocationId([1; 16]), &AllocationId([2; 16]), &[0; 64]).unwrap();
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_classify_relay", |b| {
        b.iter(|| {
            let d = black_box(&d[..]);
            match wire::parse_header(d) {
                Ok(wire::MessageType::Relay) => Relay::new_checked(d).map(|r| (r.from(), r.to())).ok(),
                _ => None,
            }
        })
    });
    g.finish();
}

fn auth_benches(c: &mut Criterion) {
    let key = AllocationKey([0x5A; 64]);
    let state = PreKeyedHmac::new(&key.0);
    let d = packets::bind(&key, 1, &[0xA0; 255]);
    let mut g = c.benchmark_group("auth");
    g.throughput(Throughput::Elements(1));
    g.bench_function("bind_verify_295B", |b| {
        b.iter(|| {
            let v = Bind::new_checked(black_box(&d[..])).ok()?;
            Some(verify_bind(&state, &v))
        })
    });
    g.bench_function("prekey_from_key", |b| b.iter(|| PreKeyedHmac::new(black_box(&key.0))));
    g.finish();
}

fn routing_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("routing");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    for sessions in [500u32, 50_000, 500_000] {
        let (core, pairs) = build(sessions);
        let ids: Vec<AllocationId> = pairs.iter().map(|p| p.1.id).collect();
        let n = ids.len();
        g.bench_with_input(BenchmarkId::new("lookup", sessions * 2), &ids, |b, ids| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 7919) % n;
                core.bound_addr(black_box(&ids[i]))
            })
        });
    }
    g.finish();
}

fn relay_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("handle_datagram_relay");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    for sessions in [500u32, 50_000, 500_000] {
        let (mut core, pairs) = build(sessions);
        for payload in [64usize, 1200] {
            // Round-robin over every session so lookups are spread over the whole table.
            let mut bufs: Vec<(SocketAddr, Vec<u8>)> = pairs
                .iter()
                .step_by((pairs.len() / 4096).max(1))
                .map(|(h, j, ja)| (*ja, packets::relay(&j.id, &h.id, &vec![0xAB; payload]).unwrap()))
                .collect();
            let n = bufs.len();
            g.bench_function(BenchmarkId::new(format!("{payload}B"), sessions * 2), |b| {
                let mut i = 0usize;
                b.iter(|| {
                    i = (i + 1) % n;
                    let (src, buf) = &mut bufs[i];
                    let a = core.handle_datagram(1, *src, black_box(buf));
                    debug_assert!(matches!(a, Action::Forward(_)));
                    a
                })
            });
        }
    }
    g.finish();
}

fn timer_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("timer");
    g.throughput(Throughput::Elements(1));
    g.bench_function("insert_cancel", |b| {
        let mut w: TimerWheel<u32> = TimerWheel::with_capacity(0, 1024);
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            let h = w.insert(black_box(1 + i % 60_000), i as u32);
            w.cancel(h)
        })
    });
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("insert_then_poll_fire_10k", |b| {
        b.iter_batched(
            || {
                let mut w: TimerWheel<u32> = TimerWheel::with_capacity(0, 10_000);
                for k in 0..10_000u32 {
                    w.insert(1 + (k as u64 * 7919) % 10_000, k);
                }
                w
            },
            |mut w| {
                let mut out = Vec::with_capacity(10_000);
                let mut t = 0;
                while let Some(next) = w.next_expiry() {
                    t = next.max(t);
                    w.poll(t, &mut out);
                }
                out.len()
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, wire_benches, auth_benches, routing_benches, relay_benches, timer_benches);
criterion_main!(benches);
