//! Secure transports, measured.
//!
//! 1. DTLS 1.2 PSK handshakes per second per core: the server side only (the time spent in the
//!    shard's DTLS layer, cookie exchange included), clients driven in memory on the same thread.
//! 2. Memory per established, idle DTLS session at 10k sessions (RSS of a fresh child process
//!    before and after; each client is dropped once its handshake is done).
//! 3. Memory per idle WSS connection at 10k connections: RSS of a `ferry serve` process before
//!    and after 10k TLS WebSocket connections from this process.
//! 4. Forwarding through a `ferry serve` process with one shard pinned to core 0 (this process
//!    on core 1): joiner → host over UDP→UDP, DTLS→DTLS, WSS→UDP and UDP→WSS, 64 B and 1200 B
//!    payloads, windows of 32 messages; delivered messages per second and the relay's CPU time
//!    per message (utime + stime from /proc).
//!
//! `cargo bench --bench secure [-- handshakes|dtls-memory|wss-memory|forward]`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ferry::client::{ApiClient, RelayClient, Transport};
use ferry::clock::Clock;
use ferry::secure::dtls::{server_context, DtlsConfig, DtlsLayer, Received};
use ferry::wire::AllocationId;
use openssl::ssl::{Ssl, SslContext, SslMethod, SslOptions, SslStream};

const SECRET: [u8; 64] = [7; 64];

/// An in-memory datagram pipe for the client side.
#[derive(Default)]
struct Pipe {
    rx: Option<Vec<u8>>,
    tx: Vec<Vec<u8>>,
}

impl Read for Pipe {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self.rx.take() {
            Some(d) => {
                b[..d.len()].copy_from_slice(&d);
                Ok(d.len())
            }
            None => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for Pipe {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.tx.push(b.to_vec());
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn client_ctx() -> SslContext {
    let mut b = SslContext::builder(SslMethod::dtls_client()).unwrap();
    b.set_cipher_list("PSK-AES128-GCM-SHA256").unwrap();
    b.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
    b.set_psk_client_callback(|ssl, _, id, psk| {
        let i = *ssl.ex_data(id_index()).unwrap();
        let aid = AllocationId(i);
        id[..36].copy_from_slice(aid.to_string().as_bytes());
        id[36] = 0;
        psk[..64].copy_from_slice(&ferry::core::allocation_key(&SECRET, &aid));
        Ok(64)
    });
    b.build()
}

fn id_index() -> openssl::ex_data::Index<Ssl, [u8; 16]> {
    static IDX: std::sync::OnceLock<openssl::ex_data::Index<Ssl, [u8; 16]>> = std::sync::OnceLock::new();
    *IDX.get_or_init(|| Ssl::new_ex_index().unwrap())
}

fn src(i: u32) -> SocketAddr {
    SocketAddr::from((
        [198, 18 + (i >> 24) as u8 % 2, (i >> 16) as u8, (i >> 8) as u8],
        1024 + (i & 0xFF) as u16,
    ))
}

/// This thread's CPU time in nanoseconds (steal and preemption on a shared machine excluded).
fn cpu_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// One handshake in memory; returns the CPU nanoseconds spent in the server's layer.
fn handshake(layer: &mut DtlsLayer, ctx: &SslContext, i: u32, now: u64) -> u64 {
    let mut ssl = Ssl::new(ctx).unwrap();
    let mut id = [0x5Au8; 16];
    id[..4].copy_from_slice(&i.to_be_bytes());
    ssl.set_ex_data(id_index(), id);
    ssl.set_connect_state();
    ssl.set_mtu(1400).unwrap();
    let mut c = SslStream::new(ssl, Pipe::default()).unwrap();
    let mut plain = vec![0u8; 2048];
    let mut server_ns = 0;
    let mut established = false;
    for _ in 0..10 {
        let done = c.do_handshake().is_ok();
        let sent = std::mem::take(&mut c.get_mut().tx);
        for d in sent {
            let t = cpu_ns();
            let r = layer.receive(now, src(i), &d, &mut plain);
            server_ns += cpu_ns() - t;
            established |= matches!(r, Received::Established(_));
        }
        if done && established {
            while layer.poll_transmit().is_some() {}
            return server_ns;
        }
        let t = cpu_ns();
        let mut answers = Vec::new();
        while let Some((_, d)) = layer.poll_transmit() {
            answers.push(d);
        }
        server_ns += cpu_ns() - t;
        for d in answers {
            c.get_mut().rx = Some(d);
            let _ = c.do_handshake();
        }
    }
    panic!("handshake {i} did not complete");
}

fn layer() -> DtlsLayer {
    let cfg = DtlsConfig { max_halfopen_per_ip: u16::MAX, ..Default::default() };
    DtlsLayer::new(server_context(&SECRET).unwrap(), SECRET, cfg)
}

fn handshakes() {
    let ctx = client_ctx();
    let mut runs = Vec::new();
    for round in 0..5u32 {
        let mut l = layer();
        let n = 2000u32;
        let mut server_ns = 0;
        let all = cpu_ns();
        for i in 0..n {
            server_ns += handshake(&mut l, &ctx, round * n + i, 1000);
        }
        let all = cpu_ns() - all;
        runs.push((n as f64 / (server_ns as f64 / 1e9), n as f64 / (all as f64 / 1e9)));
    }
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (server, both) = runs[runs.len() / 2];
    println!(
        "handshakes: {server:.0} per CPU-second on the server side (median of 5 × 2000; {both:.0} with the clients on the same core)"
    );
}

fn rss_bytes(pid: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn dtls_memory() {
    let ctx = client_ctx();
    let mut l = layer();
    // Warm the allocator with a few sessions first, so the baseline holds the client's working set.
    for i in 0..50 {
        handshake(&mut l, &ctx, 1_000_000 + i, 1000);
    }
    let before = rss_bytes("self");
    let n = 10_000u32;
    for i in 0..n {
        handshake(&mut l, &ctx, i, 1000);
    }
    let after = rss_bytes("self");
    assert_eq!(l.stats().sessions as u32, n + 50);
    println!(
        "dtls-memory: {:.0} bytes per established idle DTLS session at 10k (RSS {} → {} MiB)",
        (after - before) as f64 / n as f64,
        before >> 20,
        after >> 20
    );
}

struct Relay {
    child: Child,
    api: String,
    dir: std::path::PathBuf,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn relay() -> Relay {
    let dir = std::env::temp_dir().join(format!("ferry-secure-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), c.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), c.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.pem"), c.cert.pem()).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--api-listen", "127.0.0.1:17880", "--relay-listen", "127.0.0.1:17777"])
        .args(["--shards", "1", "--pin-shards", "true", "--wss-listen", "127.0.0.1:17781"])
        .args(["--ws-public-host", "localhost", "--ws-max-connections", "50000"])
        .args(["--idle-timeout", "120s", "--log-lifecycle", "off"])
        .env("RUST_LOG", "warn")
        .arg("--wss-tls-cert")
        .arg(dir.join("cert.pem"))
        .arg("--wss-tls-key")
        .arg(dir.join("key.pem"))
        .stdout(Stdio::null())
        .spawn()
        .expect("start ferry serve");
    let r = Relay { child, api: "http://127.0.0.1:17880".into(), dir };
    for _ in 0..100 {
        if ApiClient::new(r.api.clone()).allocate(1, None).is_ok() {
            return r;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the relay did not come up");
}

fn raise_nofile() {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
}

fn wss_memory() {
    raise_nofile();
    let r = relay();
    let pid = r.child.id().to_string();
    let ca = std::fs::read(r.dir.join("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let open = |i: u32| {
        // 250 source addresses, 40 connections each: within the per-IP caps.
        let src: SocketAddr = format!("127.0.{}.{}:0", 1 + i / 40 / 250, 1 + (i / 40) % 250).parse().unwrap();
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&src.into()).unwrap();
        sock.connect(&SocketAddr::from(([127, 0, 0, 1], 17781)).into()).unwrap();
        let tcp: TcpStream = sock.into();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(cfg.clone(), name).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let key = [i as u8; 16];
        s.write_all(ferry::secure::ws::upgrade_request("127.0.0.1:17781", "/", &key).as_bytes()).unwrap();
        let mut buf = Vec::new();
        let mut b = [0u8; 512];
        loop {
            let n = s.read(&mut b).unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&b[..n]);
            if ferry::secure::ws::check_upgrade_response(&buf, &key).unwrap().is_some() {
                break;
            }
        }
        s
    };
    let warm: Vec<_> = (0..50).map(|i| open(10_000 + i)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_bytes(&pid);
    let n = 10_000u32;
    let clock = Clock::new();
    let t = clock.now();
    let conns: Vec<_> = (0..n).map(open).collect();
    let secs = (clock.now() - t) as f64 / 1000.0;
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_bytes(&pid);
    println!(
        "wss-memory: {:.0} bytes per idle WSS connection at 10k (relay RSS {} → {} MiB; opened in {secs:.1} s)",
        (after - before) as f64 / n as f64,
        before >> 20,
        after >> 20
    );
    drop((warm, conns));
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn forward() {
    let r = relay();
    let api = ApiClient::new(r.api.clone());
    let ca = r.dir.join("ca.pem");
    if let Some(core) = core_affinity::get_core_ids().and_then(|c| c.get(1).copied()) {
        core_affinity::set_for_current(core);
    }
    let ticks_per_s = 100.0;
    println!("forward: joiner → host, windows of 32, 5 rounds of 3 s each; median rate and relay CPU");
    for size in [64usize, 1200] {
        let mut base = 0.0;
        for (name, joiner_t, host_t) in [
            ("UDP→UDP", Transport::Udp, Transport::Udp),
            ("DTLS→DTLS", Transport::Dtls, Transport::Dtls),
            ("WSS→UDP", Transport::Wss { ca_file: Some(ca.clone()) }, Transport::Udp),
            ("UDP→WSS", Transport::Udp, Transport::Wss { ca_file: Some(ca.clone()) }),
        ] {
            let h = api.allocate(2, None).unwrap();
            let j = api.join(&api.join_code(&h.allocation_id).unwrap()).unwrap();
            let mut host = RelayClient::with_transport(&h, host_t).unwrap();
            host.bind().unwrap();
            let mut peer = RelayClient::with_transport(&j.allocation, joiner_t).unwrap();
            peer.bind().unwrap();
            peer.connect_b64(&j.host_connection_data).unwrap();
            let payload = vec![0xA5; size];
            let clock = Clock::new();
            let mut rounds = Vec::new();
            for _ in 0..5 {
                let (t0, c0) = (clock.now(), cpu_ticks(r.child.id()));
                let mut delivered = 0u64;
                while clock.now() - t0 < 3000 {
                    for _ in 0..32 {
                        peer.send(&host.id(), &payload).unwrap();
                    }
                    for _ in 0..32 {
                        match host.recv_relay(Duration::from_millis(50)).unwrap() {
                            Some(_) => delivered += 1,
                            None => break,
                        }
                    }
                }
                let secs = (clock.now() - t0) as f64 / 1000.0;
                let cpu = (cpu_ticks(r.child.id()) - c0) as f64 / ticks_per_s;
                rounds.push((delivered as f64 / secs, cpu * 1e6 / delivered.max(1) as f64));
            }
            rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (rate, us) = rounds[2];
            if name == "UDP→UDP" {
                base = rate;
            }
            println!(
                "  {size:>4} B {name:<10} {rate:>9.0} msg/s delivered ({:.2}× UDP→UDP), relay {us:.2} CPU-µs/msg",
                rate / base
            );
        }
    }
}

fn main() {
    let which: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let all = which.is_empty();
    let on = |n: &str| all || which.iter().any(|w| w == n);
    if on("handshakes") {
        handshakes();
    }
    if on("dtls-memory") {
        // In a fresh process, so RSS reflects only the sessions.
        if all {
            let st = Command::new(std::env::current_exe().unwrap()).arg("dtls-memory").status().unwrap();
            assert!(st.success());
        } else {
            dtls_memory();
        }
    }
    if which.iter().any(|w| w == "probe") {
        let ctx = server_context(&SECRET).unwrap();
        let before = rss_bytes("self");
        let v: Vec<_> =
            (0..10_000).map(|_| SslStream::new(Ssl::new(&ctx).unwrap(), Pipe::default()).unwrap()).collect();
        println!("probe: {} bytes per fresh SSL", (rss_bytes("self") - before) / 10_000);
        drop(v);
    }
    if on("wss-memory") {
        wss_memory();
    }
    if on("forward") {
        forward();
    }
}
