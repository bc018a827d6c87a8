//! Bytes of memory per bound, idle allocation at 10k, 100k and 1M allocations.
//!
//! Each size runs in a fresh child process: RSS is read before and after creating the sessions
//! (host + joiner pairs, every allocation bound with a real BIND and every pair connected), so the
//! figure covers the table, the HMAC states, the timer wheel and allocator overhead.
//!
//! `cargo bench --bench memory`

use std::net::SocketAddr;
use std::process::Command;

use ferry::client::packets;
use ferry::core::{Action, Core, CoreConfig, Entropy};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn entropy(n: u64) -> Entropy {
    let mut e = Entropy { id: [0; 16] };
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in e.id.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    e
}

fn one(allocations: u32) {
    let sessions = allocations / 2;
    let mut cfg = CoreConfig::new([3; 64]);
    cfg.max_allocations = allocations;
    let before = rss_bytes();
    let mut core = Core::new(cfg, 0);
    let mut buf = Vec::with_capacity(300);
    for s in 0..sessions {
        let h = core.create_host(0, 1, entropy(2 * s as u64)).expect("host");
        let j = core.create_joiner(0, &h.id, entropy(2 * s as u64 + 1)).expect("joiner");
        for (i, c) in [(2 * s, &h), (2 * s + 1, &j)] {
            let src = SocketAddr::from((
                [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
                1000 + (i % 50_000) as u16,
            ));
            buf.clear();
            buf.extend_from_slice(&packets::bind(&c.key, 0, &c.connection_data));
            assert!(matches!(core.handle_datagram(0, src, &mut buf), Action::Reply(4)));
            if i % 2 == 1 {
                buf.clear();
                buf.extend_from_slice(&packets::connect_request(&j.id, &h.connection_data));
                assert!(matches!(core.handle_datagram(0, src, &mut buf), Action::Reply(36)));
            }
        }
        while core.poll_event().is_some() {}
    }
    let after = rss_bytes();
    assert_eq!(core.allocations(), allocations as usize);
    println!(
        "{allocations} allocations: {} bytes RSS growth, {:.1} bytes per bound idle allocation",
        after - before,
        (after - before) as f64 / allocations as f64
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--one") {
        one(args[i + 1].parse().expect("a count"));
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    for n in [10_000u32, 100_000, 1_000_000] {
        let out = Command::new(&exe).args(["--one", &n.to_string()]).output().expect("child");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            std::process::exit(1);
        }
    }
}
