//! Fleet mode with real processes: a real `redis-server`, relays (`ferry relay`) on different
//! loopback addresses and stateless API instances (`ferry api`). Needs `redis-server` on PATH
//! (`dev/install-test-deps` installs it); without it these tests fail rather than skip.
//!
//! The scenarios share one machine, so they run one at a time.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ferry::auth::token::{relay_key, relay_tag, Token, TokenRole};
use ferry::auth::AllocationKey;
use ferry::client::api::{Allocation, ApiError};
use ferry::client::{packets, ApiClient};
use ferry::wire::{AllocationId, ErrorCode};
use support::{error, Raw, BIND_RECEIVED};

const BIN: &str = env!("CARGO_BIN_EXE_ferry");
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// Polls `f` every 20 ms until it is true or `secs` pass; returns whether it became true.
fn eventually(secs: f64, mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..(secs * 50.0) as usize {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A `redis-server` of this test's own, on a free loopback port, with no persistence.
struct Redis {
    child: Child,
    port: u16,
    /// A Sentinel: the master name it watches.
    master: Option<String>,
}

impl Redis {
    fn start() -> Self {
        Self::start_on(free_port())
    }

    fn start_on(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (dev/install-test-deps installs it)");
        let r = Self { child, port, master: None };
        assert!(eventually(10.0, || r.ping()), "redis-server did not start");
        r
    }

    /// A Sentinel (redis-server in sentinel mode) watching `primary` as `fleetdir`.
    fn sentinel(primary: &Redis, dir: &std::path::Path) -> Self {
        let port = free_port();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nsentinel monitor fleetdir 127.0.0.1 {} 1\nsentinel down-after-milliseconds fleetdir 1000\n",
                primary.port
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let r = Self { child, port, master: Some("fleetdir".into()) };
        assert!(eventually(10.0, || r.ping()), "the Sentinel did not start");
        r
    }

    fn url(&self) -> String {
        match &self.master {
            Some(m) => format!("redis+sentinel://127.0.0.1:{}/{m}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        s.set_read_timeout(Some(Duration::from_millis(300))).ok();
        let mut b = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"+PONG\r\n"
    }

    fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fleet's shared files: the key file.
struct Fleet {
    dir: PathBuf,
    keys: PathBuf,
}

impl Fleet {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ferry-fleet-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let keys = dir.join("fleet.keys");
        let out = Command::new(BIN).args(["fleet", "keygen", "--kid", "1"]).output().unwrap();
        assert!(out.status.success());
        std::fs::write(&keys, &out.stdout).unwrap();
        Self { dir, keys }
    }

    /// The fleet key with ID `kid` from the key file.
    fn key(&self, kid: u8) -> Vec<u8> {
        let text = std::fs::read_to_string(&self.keys).unwrap();
        let line = text.lines().find(|l| l.starts_with(&format!("{kid} "))).unwrap();
        B64.decode(line.split_whitespace().nth(1).unwrap()).unwrap()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `ferry relay` or `ferry api` child, with the addresses from its "ferry serving" line.
struct Proc {
    child: Child,
    /// The HTTP listener (the API, or a relay's health and metrics).
    http: SocketAddr,
    relay: SocketAddr,
    epoch: Option<u64>,
    args: Vec<String>,
}

impl Proc {
    fn spawn(args: Vec<String>) -> Self {
        let mut child = Command::new(BIN)
            .args(&args)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if v["fields"]["message"] == "ferry serving" {
                    let _ = tx.send(v["fields"].clone());
                }
            }
        });
        let f = rx.recv_timeout(Duration::from_secs(30)).expect("a \"ferry serving\" log line");
        Self {
            child,
            http: f["api"].as_str().unwrap().parse().unwrap(),
            relay: f["relay"].as_str().unwrap().parse().unwrap(),
            epoch: f["epoch"].as_u64(),
            args,
        }
    }

    fn http_get(&self, path: &str) -> (u16, String) {
        let r = ApiClient::new(format!("http://{}", self.http)).raw("GET", path, None).unwrap();
        (r.status, String::from_utf8_lossy(&r.body).into_owned())
    }

    /// A counter from the process's `/metrics` (0 when absent).
    fn metric(&self, line: &str) -> u64 {
        let (_, text) = self.http_get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(line).and_then(|v| v.trim().parse::<f64>().ok()))
            .map_or(0, |v| v as u64)
    }

    fn wait_exit(&mut self, secs: f64) -> Option<i32> {
        let mut code = None;
        eventually(secs, || match self.child.try_wait() {
            Ok(Some(s)) => {
                code = s.code();
                true
            }
            _ => false,
        });
        code
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const FAST: [&str; 6] =
    ["--heartbeat-interval", "200ms", "--heartbeat-expiry", "700ms", "--relay-warmup", "300ms"];

fn relay(fleet: &Fleet, redis: &Redis, name: &str, ip: &str, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = [
        "relay",
        "--store",
        &redis.url(),
        "--fleet-key-file",
        fleet.keys.to_str().unwrap(),
        "--relay-name",
        name,
        "--relay-listen",
        &format!("{ip}:0"),
        "--api-listen",
        "127.0.0.1:0",
        "--shards",
        "1",
        "--region",
        "eu",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(FAST.iter().map(|s| s.to_string()));
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn(args)
}

fn api(fleet: &Fleet, redis: &Redis, extra: &[&str]) -> (Proc, ApiClient) {
    let mut args: Vec<String> = [
        "api",
        "--store",
        &redis.url(),
        "--fleet-key-file",
        fleet.keys.to_str().unwrap(),
        "--api-listen",
        "127.0.0.1:0",
        "--region",
        "eu",
        "--regions",
        "eu,us",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(FAST.iter().map(|s| s.to_string()));
    if !extra.contains(&"--api-rate-limit") {
        // The scenarios are one client making hundreds of requests.
        args.extend(["--api-rate-limit".to_string(), "100000".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let p = Proc::spawn(args);
    let c = ApiClient::new(format!("http://{}", p.http));
    (p, c)
}

/// Relays and APIs up, and every relay placeable from every API.
fn fleet_of(tag: &str, relays: usize, apis: usize) -> (Fleet, Redis, Vec<Proc>, Vec<(Proc, ApiClient)>) {
    let fleet = Fleet::new(tag);
    let redis = Redis::start();
    let rs: Vec<Proc> = (0..relays)
        .map(|i| relay(&fleet, &redis, &format!("r{i}"), &format!("127.0.0.{}", i + 2), &[]))
        .collect();
    let apis: Vec<(Proc, ApiClient)> = (0..apis).map(|_| api(&fleet, &redis, &[])).collect();
    for (p, _) in &apis {
        assert!(
            eventually(10.0, || p.metric(r#"ferry_fleet_relays{region="eu",state="ready"}"#)
                == relays as u64),
            "every relay ready as seen from the API"
        );
    }
    (fleet, redis, rs, apis)
}

fn relay_of(a: &Allocation) -> SocketAddr {
    format!("{}:{}", a.server_endpoints[0].host, a.server_endpoints[0].port).parse().unwrap()
}

fn problem_code(e: &ApiError) -> (u16, u32) {
    match e {
        ApiError::Problem(p) => (p.status, p.code),
        ApiError::RateLimited { problem, .. } => (problem.status, problem.code),
        other => panic!("expected a problem answer, got {other}"),
    }
}

/// Host and joiner bound, connected, and relaying both ways; returns them.
fn session(host: &Allocation, join: &ferry::client::api::JoinAllocation) -> (Raw, Raw) {
    let h = Raw::new(host);
    let j = Raw::new(&join.allocation);
    assert_eq!(h.bind(1), BIND_RECEIVED);
    assert_eq!(j.bind(1), BIND_RECEIVED);
    let host_conn = B64.decode(&join.host_connection_data).unwrap();
    assert_eq!(host_conn, h.conn, "the joiner gets the host's connection data");
    assert_eq!(j.connect(&host_conn)[3], 0x06, "ACCEPTED");
    both_ways(&h, &j);
    (h, j)
}

fn both_ways(h: &Raw, j: &Raw) {
    j.relay_to(&h.id, b"ping from joiner");
    assert!(h.recv().ends_with(b"ping from joiner"));
    h.relay_to(&j.id, b"pong from host");
    assert!(j.recv().ends_with(b"pong from host"));
}

#[test]
fn unity_flow_across_two_api_instances_and_a_chosen_relay() {
    let _g = serial();
    let (_fleet, _redis, relays, apis) = fleet_of("flow", 3, 2);
    let (a1, a2) = (&apis[0].1, &apis[1].1);
    let host = a1.allocate(4, None).unwrap();
    assert_eq!(host.region, "eu");
    let code = a2.join_code(&host.allocation_id).unwrap();
    assert_eq!(a1.join_code(&host.allocation_id).unwrap(), code, "the same code again, from any instance");
    let join = a1.join(&code).unwrap();
    assert_eq!(relay_of(&join.allocation), relay_of(&host), "a joiner lands on its host's relay");
    assert!(relays.iter().any(|r| r.relay == relay_of(&host)));
    let (h, j) = session(&host, &join);
    // The chosen relay answers Unity's QoS ping on its relay port: 13 bytes, echoing.
    let q = UdpSocket::bind("127.0.0.1:0").unwrap();
    q.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = packets::qos_request(3, 0xBEEF, 0x0102_0304_0506_0708);
    q.send_to(&req, relay_of(&host)).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = q.recv_from(&mut buf).unwrap();
    assert_eq!(n, 13);
    assert!(n < req.len(), "never larger than the request");
    assert_eq!(buf[0], 0x95);
    assert_eq!(buf[2], 3);
    assert_eq!(&buf[3..5], &0xBEEFu16.to_le_bytes());
    assert_eq!(&buf[5..13], &0x0102_0304_0506_0708u64.to_le_bytes());
    // Discovery lists every relay's QoS endpoint; /v1/regions lists the configured regions.
    let (_, servers) = apis[1].0.http_get("/v1/servers?service=relay&region=eu");
    for r in &relays {
        assert!(servers.contains(&r.relay.to_string()), "{servers}");
    }
    let regions: Vec<String> = a2.regions().unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(regions, ["eu", "us"]);
    match a1.allocate(2, Some("us")) {
        Err(e) => assert_eq!(problem_code(&e), (503, 15010), "a configured region with no relay"),
        Ok(a) => panic!("placed in a region with no relay: {a:?}"),
    }
    match a1.allocate(2, Some("mars")) {
        Err(e) => assert_eq!(problem_code(&e), (404, 15007)),
        Ok(a) => panic!("placed in an unknown region: {a:?}"),
    }
    // A relay serves no allocations API.
    let (status, body) = relays[0].http_get("/v1/regions");
    assert_eq!(status, 404);
    assert!(body.contains("ferry api"), "{body}");
    // Lifecycle events reach the stream: created, bound, and closed after CLOSE.
    h.send(&packets::close(&h.id));
    assert_eq!(j.recv()[3], 0x09, "the joiner hears DISCONNECT when its host closes");
    let out = Command::new(BIN).args(["fleet", "events", "--store", &_redis.url()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(eventually(5.0, || {
        let out = Command::new(BIN).args(["fleet", "events", "--store", &_redis.url()]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains(r#""type":"closed""#)
    }));
    assert!(text.contains(r#""type":"created""#) && text.contains(r#""type":"bound""#), "{text}");
    // `ferry fleet status` shows the three relays ready.
    let out = Command::new(BIN)
        .args(["fleet", "status", "--store", &_redis.url(), "--json", "--relay-warmup", "300ms"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ready = v[0]["relays"].as_array().unwrap().iter().filter(|r| r["state"] == "ready").count();
    assert_eq!(ready, 3, "{v}");
}

#[test]
fn placement_spreads_and_a_killed_relay_is_dropped_and_its_sessions_refused() {
    let _g = serial();
    let (fleet, redis, mut relays, apis) = fleet_of("spread", 3, 2);
    let mut hits = std::collections::HashMap::<SocketAddr, u32>::new();
    for i in 0..300 {
        let a = apis[i % 2].1.allocate(2, None).unwrap();
        *hits.entry(relay_of(&a)).or_insert(0) += 1;
    }
    for r in &relays {
        let n = hits.get(&r.relay).copied().unwrap_or(0);
        assert!((60..=135).contains(&n), "relay {} got {n} of 300 ({hits:?})", r.relay);
    }
    // A session on the relay about to die, and its join code.
    let victim = relays.remove(0);
    let host = loop {
        let a = apis[0].1.allocate(2, None).unwrap();
        if relay_of(&a) == victim.relay {
            break a;
        }
    };
    let h = Raw::new(&host);
    assert_eq!(h.bind(1), BIND_RECEIVED);
    let code = apis[0].1.join_code(&host.allocation_id).unwrap();
    let (name, args) = ("r0", victim.args.clone());
    let mut victim = victim;
    signal(&victim.child, libc::SIGKILL);
    victim.wait_exit(5.0);
    // Within the heartbeat expiry placement stops using it.
    assert!(eventually(5.0, || apis[0].0.metric(r#"ferry_fleet_relays{region="eu",state="stale"}"#) == 1));
    for i in 0..60 {
        let a = apis[i % 2].1.allocate(2, None).unwrap();
        assert_ne!(relay_of(&a), victim.relay, "placed on a dead relay");
    }
    match apis[1].1.join(&code) {
        Err(e) => assert_eq!(problem_code(&e), (404, 15009), "a dead host's join code"),
        Ok(j) => panic!("joined a dead relay's session: {j:?}"),
    }
    // Restarted under the same name: a new epoch, and the old session's tokens are refused.
    let _ = name;
    let restarted = Proc::spawn(
        args.iter()
            .map(|a| {
                if a.ends_with(":0") && a.starts_with("127.0.0.2") {
                    victim.relay.to_string()
                } else {
                    a.clone()
                }
            })
            .collect(),
    );
    assert_ne!(restarted.epoch, victim.epoch, "a restart is a new epoch");
    assert_eq!(restarted.relay, victim.relay);
    assert_eq!(h.bind(2), error(&h.id, ErrorCode::AllocationNotFound), "an old token on the new boot");
    assert_eq!(restarted.metric(r#"ferry_relay_bind_rejects_total{reason="stale_epoch"}"#), 1);
    drop((fleet, redis));
}

#[test]
fn a_draining_relay_keeps_its_sessions_and_joiners_gets_no_hosts_and_exits_when_empty() {
    let _g = serial();
    let (_fleet, _redis, mut relays, apis) = fleet_of("drain", 2, 1);
    let a = &apis[0].1;
    let host = a.allocate(4, None).unwrap();
    let code = a.join_code(&host.allocation_id).unwrap();
    let join = a.join(&code).unwrap();
    let (h, j) = session(&host, &join);
    let i = relays.iter().position(|r| r.relay == relay_of(&host)).unwrap();
    let mut draining = relays.remove(i);
    signal(&draining.child, libc::SIGTERM);
    assert!(eventually(5.0, || apis[0].0.metric(r#"ferry_fleet_relays{region="eu",state="draining"}"#) == 1));
    for _ in 0..40 {
        assert_ne!(relay_of(&a.allocate(2, None).unwrap()), draining.relay, "a new host on a draining relay");
    }
    both_ways(&h, &j);
    // A new joiner of the live session still lands there and connects.
    let late = a.join(&code).unwrap();
    assert_eq!(relay_of(&late.allocation), draining.relay);
    let l = Raw::new(&late.allocation);
    assert_eq!(l.bind(1), BIND_RECEIVED);
    assert_eq!(l.connect(&h.conn)[3], 0x06, "ACCEPTED");
    both_ways(&h, &l);
    assert_eq!(draining.child.try_wait().unwrap(), None, "still up while a session lives");
    h.send(&packets::close(&h.id));
    assert_eq!(draining.wait_exit(10.0), Some(0), "exits once its sessions are gone");
}

#[test]
fn host_close_makes_its_join_code_404() {
    let _g = serial();
    let (_fleet, _redis, _relays, apis) = fleet_of("close", 1, 2);
    let host = apis[0].1.allocate(2, None).unwrap();
    let h = Raw::new(&host);
    assert_eq!(h.bind(1), BIND_RECEIVED);
    let code = apis[0].1.join_code(&host.allocation_id).unwrap();
    assert!(apis[1].1.join(&code).is_ok());
    h.send(&packets::close(&h.id));
    let clock = ferry::clock::Clock::new();
    assert!(eventually(
        10.0,
        || matches!(apis[1].1.join(&code), Err(ApiError::Problem(p)) if p.code == 15009)
    ));
    eprintln!("join code answered 404 {} ms after the host's CLOSE", clock.now());
    match apis[0].1.join_code(&host.allocation_id) {
        Err(e) => assert_eq!(problem_code(&e), (404, 15008)),
        Ok(c) => panic!("a closed host got a join code {c}"),
    }
}

#[test]
fn concurrent_join_codes_are_unique_and_stable() {
    let _g = serial();
    let (_fleet, _redis, _relays, apis) = fleet_of("codes", 1, 2);
    let hosts: Vec<String> =
        (0..120).map(|i| apis[i % 2].1.allocate(2, None).unwrap().allocation_id).collect();
    let clients = [apis[0].1.clone(), apis[1].1.clone()];
    let results: Vec<(String, String, String)> = std::thread::scope(|s| {
        let chunks: Vec<_> = hosts
            .chunks(30)
            .map(|chunk| {
                let clients = clients.clone();
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|id| {
                            // Both instances asked at once for the same host.
                            let (c0, c1) = (clients[0].clone(), clients[1].clone());
                            let id0 = id.clone();
                            let t = std::thread::spawn(move || c0.join_code(&id0).unwrap());
                            let b = c1.join_code(id).unwrap();
                            (id.clone(), t.join().unwrap(), b)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        chunks.into_iter().flat_map(|c| c.join().unwrap()).collect()
    });
    let mut codes = std::collections::HashSet::new();
    for (id, a, b) in &results {
        assert_eq!(a, b, "two instances gave {id} two codes");
        assert!(codes.insert(a.clone()), "code {a} handed to two hosts");
    }
    assert_eq!(codes.len(), 120);
}

#[test]
fn redis_outages_keep_sessions_and_relays_come_back_with_the_same_epoch() {
    let _g = serial();
    let (_fleet, redis, relays, apis) = fleet_of("outage", 1, 1);
    let a = &apis[0].1;
    let host = a.allocate(4, None).unwrap();
    let code = a.join_code(&host.allocation_id).unwrap();
    let (h, j) = session(&host, &a.join(&code).unwrap());
    let host2 = a.allocate(2, None).unwrap();
    let h2 = Raw::new(&host2);
    assert_eq!(h2.bind(1), BIND_RECEIVED);
    let code2 = a.join_code(&host2.allocation_id).unwrap();

    // Redis frozen: forwarding goes on; what needs Redis answers 503 quickly, never hangs.
    signal(&redis.child, libc::SIGSTOP);
    both_ways(&h, &j);
    let clock = ferry::clock::Clock::new();
    match a.join_code(&host.allocation_id) {
        Err(e) => assert_eq!(problem_code(&e), (503, 15503)),
        Ok(c) => panic!("a join code with the directory frozen: {c}"),
    }
    assert!(clock.now() < 8_000, "answered (the store timeout is 1 s), not hung");
    // The second host leaves while the directory is away: the relay keeps the event.
    h2.send(&packets::close(&h2.id));
    assert!(eventually(5.0, || relays[0].metric("ferry_fleet_events_buffered") >= 1));
    assert!(eventually(5.0, || matches!(a.allocate(2, None), Err(ApiError::Problem(p)) if p.status == 503)));
    signal(&redis.child, libc::SIGCONT);
    // Back: the same epoch, the session intact, the buffered close replayed (code 2 is gone).
    assert!(eventually(10.0, || a.allocate(2, None).is_ok()));
    let out =
        Command::new(BIN).args(["fleet", "status", "--store", &redis.url(), "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["relays"][0]["epoch"].as_u64(), relays[0].epoch, "re-registered with the same epoch");
    both_ways(&h, &j);
    assert!(eventually(5.0, || matches!(a.join(&code2), Err(ApiError::Problem(p)) if p.code == 15009)));
    assert!(a.join(&code).is_ok(), "the live host's code survives");

    // Redis restarted empty: the relay registers again, old sessions keep relaying, new ones work.
    let port = redis.stop();
    both_ways(&h, &j);
    let redis = Redis::start_on(port);
    assert!(eventually(10.0, || apis[0].0.metric(r#"ferry_fleet_relays{region="eu",state="ready"}"#) == 1));
    both_ways(&h, &j);
    let fresh = a.allocate(2, None).unwrap();
    let code3 = a.join_code(&fresh.allocation_id).unwrap();
    session(&fresh, &a.join(&code3).unwrap());
    drop(redis);
}

#[test]
fn forged_expired_wrong_relay_and_wrong_epoch_tokens_are_refused_and_keys_rotate() {
    let _g = serial();
    let (fleet, redis, relays, apis) = fleet_of("tokens", 2, 1);
    let key = fleet.key(1);
    let (r0, r1) = (&relays[0], &relays[1]);
    let (name0, epoch0) = ("r0", r0.epoch.unwrap() as u32);
    let now = ferry::clock::Clock::unix_millis();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    // BINDs a host token minted with these parameters at `to`; returns the answer, if any.
    let try_bind = |fleet_key: &[u8], name: &str, epoch: u32, not_after: u64, to: SocketAddr| {
        let mut idb = [0u8; 16];
        getrandom::getrandom(&mut idb).unwrap();
        idb[15] = 1;
        let id = AllocationId(idb);
        let rk = relay_key(fleet_key, name, epoch);
        let t = Token {
            id,
            role: TokenRole::Host { max_connections: 2 },
            relay: relay_tag(name),
            epoch,
            not_after_ms: not_after,
        };
        let conn = t.emit(&rk);
        let k = AllocationKey(ferry::core::allocation_key(&rk, &id));
        sock.send_to(&packets::bind(&k, 1, &conn), to).unwrap();
        let mut buf = [0u8; 64];
        sock.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
    };
    let later = now + 30_000;
    assert_eq!(
        try_bind(&key, name0, epoch0, later, r0.relay),
        Some(BIND_RECEIVED.to_vec()),
        "a good token binds"
    );
    assert_eq!(try_bind(&[9u8; 32], name0, epoch0, later, r0.relay), None, "another fleet key");
    assert!(
        try_bind(&key, name0, epoch0, now - 60_000, r0.relay)
            .is_some_and(|r| r[3] == 12 && r[20] == ErrorCode::AllocationTimedOut as u8),
        "expired"
    );
    assert!(
        try_bind(&key, name0, epoch0, later, r1.relay)
            .is_some_and(|r| r[20] == ErrorCode::AllocationNotFound as u8),
        "another relay's token"
    );
    assert!(
        try_bind(&key, name0, epoch0 ^ 1, later, r0.relay)
            .is_some_and(|r| r[20] == ErrorCode::AllocationNotFound as u8),
        "another boot's token"
    );
    for (r, reason) in [(r0, "forged"), (r0, "expired"), (r1, "wrong_relay"), (r0, "stale_epoch")] {
        assert_eq!(
            r.metric(&format!(r#"ferry_relay_bind_rejects_total{{reason="{reason}"}}"#)),
            1,
            "{reason}"
        );
    }
    // A tampered token (a later deadline written over the minted one) is forged.
    let host = apis[0].1.allocate(2, None).unwrap();
    let raw = Raw::new(&host);
    let mut tampered = raw.conn.clone();
    tampered[35] ^= 1;
    raw.send(&packets::bind(&raw.key, 1, &tampered));
    raw.silent(300);
    // A closed allocation's token does not bind again.
    assert_eq!(raw.bind(1), BIND_RECEIVED);
    raw.send(&packets::close(&raw.id));
    raw.silent(100);
    assert_eq!(raw.bind(2), error(&raw.id, ErrorCode::AllocationNotFound));
    let rr = relays.iter().find(|r| r.relay == raw.relay).unwrap();
    assert_eq!(rr.metric(r#"ferry_relay_bind_rejects_total{reason="closed"}"#), 1);

    // Rotation: a new key first on every process, the old one still accepted.
    let old = apis[0].1.allocate(2, None).unwrap();
    let line = Command::new(BIN).args(["fleet", "keygen", "--kid", "2"]).output().unwrap().stdout;
    let text = std::fs::read_to_string(&fleet.keys).unwrap();
    std::fs::write(&fleet.keys, format!("{}{text}", String::from_utf8(line).unwrap())).unwrap();
    for p in relays.iter().map(|r| &r.child).chain([&apis[0].0.child]) {
        signal(p, libc::SIGHUP);
    }
    let fresh = loop {
        let a = apis[0].1.allocate(2, None).unwrap();
        if B64.decode(&a.allocation_id_bytes).unwrap()[15] == 2 {
            break a;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (o, f) = (Raw::new(&old), Raw::new(&fresh));
    assert_eq!(o.bind(1), BIND_RECEIVED, "minted under the old key, bound after the rotation");
    assert!(
        eventually(5.0, || {
            f.send(&packets::bind(&f.key, 1, &f.conn));
            let mut b = [0u8; 64];
            f.sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            matches!(f.sock.recv_from(&mut b), Ok((4, _)))
        }),
        "minted under the new key"
    );
    drop(redis);
}

#[test]
fn rate_limits_are_shared_across_api_instances() {
    let _g = serial();
    let fleet = Fleet::new("limits");
    let redis = Redis::start();
    let _r = relay(&fleet, &redis, "r0", "127.0.0.2", &[]);
    let limits = ["--api-rate-limit", "3", "--join-failures-per-ip-per-min", "4"];
    let (a1, c1) = api(&fleet, &redis, &limits);
    let (a2, c2) = api(&fleet, &redis, &limits);
    // Failed joins: 4 a minute per client address, however they are spread.
    let mut refused = 0;
    for i in 0..8 {
        let c = if i % 2 == 0 { &c1 } else { &c2 };
        if let Err(ApiError::RateLimited { .. }) = c.join("BCDFGHJK") {
            refused += 1;
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(refused >= 3, "{refused} of 8 failed joins refused after 4 failures across two instances");
    // Requests: a burst of 6 a second per client across both instances, not 6 on each.
    let mut ok = 0;
    for i in 0..24 {
        let c = if i % 2 == 0 { &a1 } else { &a2 };
        if c.http_get("/v1/regions").0 == 200 {
            ok += 1;
        }
    }
    assert!(ok <= 13, "{ok} of 24 quick requests served; two instances alone would serve 24");
    assert!(ok >= 1);
}

#[test]
fn the_directory_through_a_sentinel() {
    let _g = serial();
    let fleet = Fleet::new("sentinel");
    let primary = Redis::start();
    let sentinel = Redis::sentinel(&primary, &fleet.dir);
    let _relay = relay(&fleet, &sentinel, "r0", "127.0.0.2", &[]);
    let (p, a) = api(&fleet, &sentinel, &[]);
    assert!(eventually(10.0, || p.metric(r#"ferry_fleet_relays{region="eu",state="ready"}"#) == 1));
    let host = a.allocate(2, None).unwrap();
    let code = a.join_code(&host.allocation_id).unwrap();
    session(&host, &a.join(&code).unwrap());
    // The records are on the primary the Sentinel named.
    let out =
        Command::new(BIN).args(["fleet", "status", "--store", &primary.url(), "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["relays"][0]["name"], "r0", "{v}");
}

#[test]
fn the_directory_over_tls_with_a_private_ca() {
    let _g = serial();
    let fleet = Fleet::new("tls");
    support::test_pki(&fleet.dir);
    let port = free_port();
    let pem = |f: &str| fleet.dir.join(f).to_str().unwrap().to_string();
    let child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(["--tls-cert-file", &pem("cert.pem"), "--tls-key-file", &pem("key.pem")])
        .args(["--tls-ca-cert-file", &pem("ca.pem"), "--tls-auth-clients", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed");
    let tls = Redis { child, port, master: None };
    assert!(eventually(10.0, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()));
    let url = format!("rediss://localhost:{port}");
    let ca = pem("ca.pem");
    let base = |role: &str| -> Vec<String> {
        [role, "--store", &url, "--store-ca-file", &ca, "--fleet-key-file", fleet.keys.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .chain(FAST.iter().map(|s| s.to_string()))
            .chain(["--region", "eu", "--api-listen", "127.0.0.1:0"].iter().map(|s| s.to_string()))
            .collect()
    };
    let mut r = base("relay");
    r.extend(
        ["--relay-listen", "127.0.0.2:0", "--relay-name", "r0", "--shards", "1"]
            .iter()
            .map(|s| s.to_string()),
    );
    let _relay = Proc::spawn(r);
    let p = Proc::spawn(base("api"));
    let a = ApiClient::new(format!("http://{}", p.http));
    assert!(eventually(10.0, || p.metric(r#"ferry_fleet_relays{region="eu",state="ready"}"#) == 1));
    let host = a.allocate(2, None).unwrap();
    let code = a.join_code(&host.allocation_id).unwrap();
    session(&host, &a.join(&code).unwrap());
    // Without the private CA the server's certificate is not trusted: the API says so (503).
    let mut plain = base("api");
    plain.retain(|x| x != "--store-ca-file" && *x != ca);
    let q = Proc::spawn(plain);
    let b = ApiClient::new(format!("http://{}", q.http));
    match b.join_code(&host.allocation_id) {
        Err(e) => assert_eq!(problem_code(&e), (503, 15503)),
        Ok(c) => panic!("an untrusted directory answered: {c}"),
    }
    drop(tls);
}
