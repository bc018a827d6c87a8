//! `ferry bench-xdp-gen`: a traffic source for the fast-path benchmark whose datagrams reach the
//! relay's interface the way a NIC's driver delivers them. It sets up sessions over ordinary
//! sockets (API, BIND, PING, CONNECT), then sends each host's RELAYs to its joiner as raw
//! frames from the kernel's own page pool (`BPF_PROG_TEST_RUN` in live-frames mode, program
//! `ferry_xdp_gen`), so the relay's veth does not first copy a socket buffer into a page for
//! XDP, as it must for datagrams a socket sent (BENCHMARKS.md, "Kernel fast path").

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use crate::auth::AllocationKey;
use crate::client::{packets, ApiClient};
use crate::wire::AllocationId;
use crate::xdp::{frames, sys};

#[derive(clap::Args, Debug)]
pub struct LiveArgs {
    /// The relay's allocations API.
    #[arg(long)]
    pub api: String,
    #[arg(long)]
    pub token: Option<String>,
    /// The relay's UDP address (IPv4).
    #[arg(long)]
    pub relay: SocketAddr,
    /// The local address the sessions' sockets bind to.
    #[arg(long)]
    pub bind_ip: IpAddr,
    /// The interface the frames leave by (toward the relay).
    #[arg(long)]
    pub interface: String,
    #[arg(long, default_value_t = 4)]
    pub sessions: usize,
    /// RELAY payload bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Datagrams per second on average (sent in runs of 65,536); 0 sends as fast as the kernel
    /// takes them.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    #[arg(long, value_parser = super::parse_duration, default_value = "1s")]
    pub warmup: Duration,
    #[arg(long, value_parser = super::parse_duration, default_value = "4s")]
    pub duration: Duration,
}

/// Frames per run of the generator, all to one session. Each run sets up and tears down a page
/// pool, which takes milliseconds: runs must be long.
const BURST: u32 = 1 << 16;

fn err(what: impl std::fmt::Display) -> io::Error {
    io::Error::other(what.to_string())
}

struct Peer {
    sock: UdpSocket,
    id: AllocationId,
}

fn peer(
    a: &crate::client::api::Allocation,
    bind_ip: IpAddr,
    relay: SocketAddr,
) -> io::Result<(Peer, Vec<u8>)> {
    let sock = UdpSocket::bind((bind_ip, 0))?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let id =
        AllocationId(B64.decode(&a.allocation_id_bytes).map_err(err)?.try_into().map_err(|_| err("id"))?);
    let key = AllocationKey(B64.decode(&a.key).map_err(err)?.try_into().map_err(|_| err("key"))?);
    let conn = B64.decode(&a.connection_data).map_err(err)?;
    sock.send_to(&packets::bind(&key, 1, &conn), relay)?;
    let mut buf = [0u8; 2048];
    let (n, _) = sock.recv_from(&mut buf)?;
    if n < 4 || buf[3] != 1 {
        return Err(err("no BIND_RECEIVED"));
    }
    Ok((Peer { sock, id }, conn))
}

fn mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s.trim().split(':').filter_map(|h| u8::from_str_radix(h, 16).ok()).collect();
    v.try_into().ok()
}

/// The relay's MAC address from the neighbour table (the sessions' traffic resolved it).
fn neighbour_mac(ip: IpAddr) -> io::Result<[u8; 6]> {
    let arp = std::fs::read_to_string("/proc/net/arp")?;
    arp.lines()
        .skip(1)
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&ip.to_string().as_str())).then(|| f.get(3).and_then(|m| mac(m))).flatten()
        })
        .ok_or_else(|| err(format!("no neighbour entry for {ip}")))
}

/// Sets up the sessions, sends, and prints `{"sent": N, "duration_secs": S}` (datagrams handed
/// to the interface in the measured window, after the warm-up).
pub fn run(args: &LiveArgs) -> io::Result<()> {
    if args.sessions == 0 {
        return Err(err("--sessions must be at least 1"));
    }
    let mut api = ApiClient::new(args.api.clone());
    if let Some(t) = &args.token {
        api = api.with_token(t.clone());
    }
    let ifindex = crate::xdp::if_index(&args.interface)
        .ok_or_else(|| err(format!("no interface {}", args.interface)))?;
    let src_mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", args.interface))
        .ok()
        .and_then(|s| mac(&s))
        .ok_or_else(|| err("the interface's MAC address"))?;
    let mut held = Vec::new();
    let mut templates = Vec::new();
    let payload = vec![0x5a; args.size];
    for _ in 0..args.sessions {
        let h = api.allocate(2, None).map_err(err)?;
        let code = api.join_code(&h.allocation_id).map_err(err)?;
        let j = api.join(&code).map_err(err)?.allocation;
        let (host, host_conn) = peer(&h, args.bind_ip, args.relay)?;
        host.sock.send_to(&packets::ping(&host.id, 1), args.relay)?;
        let mut buf = [0u8; 2048];
        host.sock.recv_from(&mut buf)?;
        let (joiner, _) = peer(&j, args.bind_ip, args.relay)?;
        joiner.sock.send_to(&packets::connect_request(&joiner.id, &host_conn), args.relay)?;
        let (n, _) = joiner.sock.recv_from(&mut buf)?;
        if n < 4 || buf[3] != 6 {
            return Err(err("CONNECT was not accepted"));
        }
        let relay_msg = packets::relay(&host.id, &joiner.id, &payload).map_err(err)?;
        templates.push(frames::udp_frame(host.sock.local_addr()?, args.relay, &relay_msg));
        held.push((host, joiner));
    }
    let dst_mac = neighbour_mac(args.relay.ip())?;
    for f in &mut templates {
        f[..6].copy_from_slice(&dst_mac);
        f[6..12].copy_from_slice(&src_mac);
    }
    let generator = crate::xdp::load_generator()?;
    let start = sys::monotonic_ns();
    let measure_from = start + args.warmup.as_nanos() as u64;
    let end = measure_from + args.duration.as_nanos() as u64;
    let (mut offered, mut sent) = (0u64, 0u64);
    for i in 0.. {
        let now = sys::monotonic_ns();
        if now >= end {
            break;
        }
        if let Some(per_ns) = (offered * 1_000_000_000).checked_div(args.rate) {
            if now < start + per_ns {
                std::thread::yield_now();
                continue;
            }
        }
        crate::xdp::generate(&generator, &templates[i % templates.len()], ifindex, BURST)?;
        offered += BURST as u64;
        if now >= measure_from {
            sent += BURST as u64;
        }
    }
    println!("{{\"sent\": {sent}, \"duration_secs\": {}}}", args.duration.as_secs_f64());
    drop(held);
    Ok(())
}
