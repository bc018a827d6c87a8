//! Fleet mode's control plane, measured: allocations per second and join round trips per second
//! through two `ferry api` instances on a real `redis-server`, with p50/p99 latency, and the
//! directory operations one whole session costs; the single-box `ferry serve` (in-process
//! directory) measured the same way in the same run.
//!
//! Everything runs on this machine: Redis, one relay, two API instances (or one `ferry serve`)
//! and the client threads share its cores, so the figures are a floor, not a ceiling.
//!
//! `cargo bench --bench fleet [-- ROUNDS SECONDS THREADS]` (default 3 rounds of 3 s, 8 threads)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ferry::auth::AllocationKey;
use ferry::client::api::Allocation;
use ferry::client::{packets, ApiClient};
use ferry::clock::Clock;
use ferry::wire::AllocationId;

const BIN: &str = env!("CARGO_BIN_EXE_ferry");

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Spawns `ferry ARGS` and returns it with the HTTP address from its "ferry serving" line.
fn ferry(args: &[&str]) -> (Kill, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .args(["--log-format", "json", "--log-lifecycle", "off", "--api-rate-limit", "1000000"])
        .env("RUST_LOG", "warn,ferry::serve=info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok);
    let f = lines
        .find_map(|l| {
            serde_json::from_str::<serde_json::Value>(&l)
                .ok()
                .filter(|v| v["fields"]["message"] == "ferry serving")
        })
        .expect("ferry serving");
    std::thread::spawn(move || for _ in lines {});
    (Kill(child), format!("http://{}", f["fields"]["api"].as_str().unwrap()))
}

fn redis_cmd(port: u16, cmd: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.ends_with(b"\r\n") && (out[0] != b'$' || out.len() > 8) {
            // A bulk reply is complete once its announced length has arrived.
            if let Some(p) = out.iter().position(|&b| b == b'\r') {
                let want: usize =
                    std::str::from_utf8(&out[1..p]).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
                if out[0] != b'$' || out.len() >= p + 2 + want + 2 {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Commands Redis has executed so far.
fn redis_calls(port: u16) -> u64 {
    redis_cmd(port, "INFO commandstats")
        .lines()
        .filter_map(|l| l.split("calls=").nth(1))
        .filter_map(|v| v.split(',').next()?.parse::<u64>().ok())
        .sum()
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// `threads` clients doing `op` for `secs` seconds, API instances taken in turn; returns
/// operations per second and every latency in nanoseconds.
fn drive(
    apis: &[String],
    threads: usize,
    secs: f64,
    op: &(dyn Fn(&ApiClient, usize) + Sync),
) -> (f64, Vec<u64>) {
    let clock = Clock::new();
    let end = (secs * 1e9) as u64;
    let lat: Vec<Vec<u64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let c = ApiClient::new(apis[t % apis.len()].clone());
                let clock = &clock;
                s.spawn(move || {
                    let mut v = Vec::new();
                    let mut i = 0;
                    while clock.nanos() < end {
                        let t0 = clock.nanos();
                        op(&c, t * 1_000_000 + i);
                        v.push(clock.nanos() - t0);
                        i += 1;
                    }
                    v
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all: Vec<u64> = lat.into_iter().flatten().collect();
    (all.len() as f64 / (clock.nanos() as f64 / 1e9), all)
}

struct Figures {
    alloc: (f64, f64, f64),
    join: (f64, f64, f64),
}

fn measure(apis: &[String], rounds: usize, secs: f64, threads: usize) -> Figures {
    let (mut a_rate, mut a50, mut a99) = (vec![], vec![], vec![]);
    let (mut j_rate, mut j50, mut j99) = (vec![], vec![], vec![]);
    for _ in 0..rounds {
        let (rate, mut l) = drive(apis, threads, secs, &|c, _| {
            c.allocate(2, None).unwrap();
        });
        a_rate.push(rate);
        a50.push(pct(&mut l, 0.5));
        a99.push(pct(&mut l, 0.99));
        // Hosts with codes to join (made outside the measured window); a session takes a bounded
        // number of joiners, so the joins are spread over many.
        let c = ApiClient::new(apis[0].clone());
        let codes: Vec<String> =
            (0..400).map(|_| c.join_code(&c.allocate(100, None).unwrap().allocation_id).unwrap()).collect();
        let (rate, mut l) = drive(apis, threads, secs, &|c, i| {
            c.join(&codes[i % codes.len()]).unwrap();
        });
        j_rate.push(rate);
        j50.push(pct(&mut l, 0.5));
        j99.push(pct(&mut l, 0.99));
    }
    Figures {
        alloc: (median(a_rate), median(a50), median(a99)),
        join: (median(j_rate), median(j50), median(j99)),
    }
}

/// One whole session, as a game plays it: allocate, join code, join, both BIND, both CLOSE.
fn session(c: &ApiClient) {
    let host = c.allocate(2, None).unwrap();
    let code = c.join_code(&host.allocation_id).unwrap();
    let join = c.join(&code).unwrap();
    let mut bound = Vec::new();
    for a in [&host, &join.allocation] {
        let ep = &a.server_endpoints[0];
        let relay: SocketAddr = format!("{}:{}", ep.host, ep.port).parse().unwrap();
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (id, key, conn) = decode(a);
        s.send_to(&packets::bind(&key, 1, &conn), relay).unwrap();
        let mut b = [0u8; 64];
        s.recv_from(&mut b).unwrap();
        bound.push((s, id, relay));
    }
    for (s, id, relay) in bound.iter().rev() {
        s.send_to(&packets::close(id), relay).unwrap();
    }
}

fn decode(a: &Allocation) -> (AllocationId, AllocationKey, Vec<u8>) {
    (
        AllocationId(B64.decode(&a.allocation_id_bytes).unwrap().try_into().unwrap()),
        AllocationKey(B64.decode(&a.key).unwrap().try_into().unwrap()),
        B64.decode(&a.connection_data).unwrap(),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let rounds = args.first().and_then(|v| v.parse().ok()).unwrap_or(3);
    let secs: f64 = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(3.0);
    let threads: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(8);
    let dir = std::env::temp_dir().join(format!("ferry-bench-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("fleet.keys");
    let line = Command::new(BIN).args(["fleet", "keygen"]).output().unwrap().stdout;
    std::fs::write(&keys, line).unwrap();
    let port = free_port();
    let _redis = Kill(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let version = redis_cmd(port, "INFO server")
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:").map(str::to_string))
        .unwrap_or_default();
    let store = format!("redis://127.0.0.1:{port}");
    let k = keys.to_str().unwrap();
    let fleet_args = ["--store", &store, "--fleet-key-file", k, "--region", "eu", "--relay-warmup", "0s"];
    let (_relay, _) = ferry(
        &[
            &[
                "relay",
                "--relay-name",
                "r0",
                "--relay-listen",
                "127.0.0.2:0",
                "--api-listen",
                "127.0.0.1:0",
                "--shards",
                "1",
            ][..],
            &fleet_args[..],
        ]
        .concat(),
    );
    let (_a1, api1) = ferry(&[&["api", "--api-listen", "127.0.0.1:0"][..], &fleet_args[..]].concat());
    let (_a2, api2) = ferry(&[&["api", "--api-listen", "127.0.0.1:0"][..], &fleet_args[..]].concat());
    std::thread::sleep(Duration::from_millis(1500));
    let fleet_apis = [api1.clone(), api2];

    // Directory operations per session: a quiet window gives the background rate (heartbeats,
    // relay-list refreshes), then 200 whole sessions.
    let clock = Clock::new();
    let c0 = redis_calls(port);
    std::thread::sleep(Duration::from_secs(2));
    let bg = (redis_calls(port) - c0) as f64 / (clock.nanos() as f64 / 1e9);
    let c = ApiClient::new(api1.clone());
    let (t0, r0) = (clock.nanos(), redis_calls(port));
    let sessions = 200;
    for _ in 0..sessions {
        session(&c);
    }
    std::thread::sleep(Duration::from_millis(500));
    let spent = (clock.nanos() - t0) as f64 / 1e9;
    // INFO itself counts as one call each time.
    let per_session = ((redis_calls(port) - r0) as f64 - 1.0 - bg * spent) / sessions as f64;

    let fleet = measure(&fleet_apis, rounds, secs, threads);
    let (_serve, single) =
        ferry(&["serve", "--api-listen", "127.0.0.1:0", "--relay-listen", "127.0.0.1:0", "--shards", "1"]);
    let local = measure(&[single], rounds, secs, threads);
    std::fs::remove_dir_all(&dir).ok();

    println!("fleet control plane: redis-server {version}, 1 relay, 2 API instances; {threads} client threads, median of {rounds} rounds of {secs} s");
    println!("{:<38} {:>10} {:>9} {:>9}", "", "ops/s", "p50 ms", "p99 ms");
    let row = |name: &str, f: (f64, f64, f64)| println!("{name:<38} {:>10.0} {:>9.2} {:>9.2}", f.0, f.1, f.2);
    row("allocate, fleet (2 APIs + Redis)", fleet.alloc);
    row("allocate, single box (in-process)", local.alloc);
    row("join, fleet (2 APIs + Redis)", fleet.join);
    row("join, single box (in-process)", local.join);
    println!(
        "fleet/single-box ratio: allocate {:.2}, join {:.2}",
        fleet.alloc.0 / local.alloc.0,
        fleet.join.0 / local.join.0
    );
    println!(
        "Redis commands per whole session (allocate, join code, join, 2 BINDs, 2 CLOSEs): {per_session:.1} \
         (background {bg:.1} commands/s: heartbeats and relay-list refreshes)"
    );
}
