//! The fast path's program alone: nanoseconds per run over one frame, in the kernel's own test
//! harness (`BPF_PROG_TEST_RUN`, repeated a million times), for a forwarded RELAY of each size
//! and for frames it passes. Root only. What a NIC driver adds around it is measured end to end
//! by `benches/xdp.sh`.
//!
//!     sudo cargo bench --bench xdp_prog

use std::net::SocketAddr;

use ferry::wire::AllocationId;
use ferry::xdp::layout::{self, Endpoint, Link, L2};
use ferry::xdp::{frames, sys, Program};

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("xdp_prog: loading XDP programs needs root");
        std::process::exit(1);
    }
    let relay: SocketAddr = "10.9.0.1:7777".parse().unwrap();
    let (a, b): (SocketAddr, SocketAddr) =
        ("10.9.0.2:4000".parse().unwrap(), "10.9.0.3:5000".parse().unwrap());
    let p = Program::load(1024, &Endpoint::for_listen(relay), L2::Reflect).expect("load");
    let (h, j) = (AllocationId([1; 16]), AllocationId([2; 16]));
    p.raw_links().update(&layout::link_key(&h, &j), &Link::new(a, b).unwrap().encode()).unwrap();
    let fd = p.fd().unwrap();
    println!("| frame | verdict | ns per run (median of 5 × 1,000,000) |");
    println!("|---|---|---:|");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("RELAY, 64 B payload", frames::relay_frame(a, relay, &h.0, &j.0, &[7; 64])),
        ("RELAY, 1200 B payload", frames::relay_frame(a, relay, &h.0, &j.0, &[7; 1200])),
        ("RELAY of an unlinked pair", frames::relay_frame(a, relay, &j.0, &j.0, &[7; 64])),
        ("PING", frames::udp_frame(a, relay, &ferry::client::packets::ping(&h, 1))),
        ("UDP to another port", frames::udp_frame(a, "10.9.0.1:9".parse().unwrap(), &[0; 64])),
    ];
    for (name, frame) in cases {
        let mut runs: Vec<u32> = (0..5)
            .map(|_| sys::test_run_repeat(fd, &frame, 1_000_000).expect("BPF_PROG_TEST_RUN").2)
            .collect();
        runs.sort_unstable();
        let verdict = match sys::test_run(fd, &frame).unwrap().0 {
            2 => "pass",
            3 => "XDP_TX",
            other => return eprintln!("unexpected verdict {other}"),
        };
        println!("| {name} | {verdict} | {} |", runs[2]);
    }
}
