//! The `ferry` binary: start-up validation and signal handling.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry::client::{ApiClient, RelayClient};

const BIN: &str = env!("CARGO_BIN_EXE_ferry");

fn serve(args: &[&str]) -> std::process::Output {
    Command::new(BIN).arg("serve").args(args).output().unwrap()
}

#[test]
fn bad_config_fails_at_startup_naming_the_key() {
    let out =
        serve(&["--join-code-length", "3", "--api-listen", "127.0.0.1:0", "--relay-listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("join_code_length"));

    let out = Command::new(BIN).args(["serve", "--api-listen", "0.0.0.0:0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("api_listen"),
        "anonymous API must stay on loopback"
    );

    let out = Command::new(BIN).args(["serve"]).env("FERRY_SHARDS", "0").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("shards"));

    let cfg = std::env::temp_dir().join(format!("ferry-bad-{}.toml", std::process::id()));
    std::fs::write(&cfg, "idle_timout = \"5s\"\n").unwrap();
    let out = serve(&["--config", cfg.to_str().unwrap()]);
    std::fs::remove_file(&cfg).ok();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("idle_timout"));

    let out = Command::new(BIN).args(["serve", "--idle-timeout", "soon"]).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--idle-timeout"));

    // The kernel fast path: an interface is required, and must exist; the mode is one of three.
    let local = ["--api-listen", "127.0.0.1:0", "--relay-listen", "127.0.0.1:0"];
    for (extra, key) in [
        (&["--xdp", "native"][..], "xdp_interface"),
        (&["--xdp", "generic", "--xdp-interface", "nosuch0"][..], "xdp_interface"),
        (&["--xdp", "turbo"][..], "--xdp"),
        (&["--xdp-max-links", "0"][..], "xdp_max_links"),
    ] {
        let out = serve(&[&local[..], extra].concat());
        assert_ne!(out.status.code(), Some(0), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{extra:?}: {err}");
    }
    let cfg = std::env::temp_dir().join(format!("ferry-xdp-{}.toml", std::process::id()));
    std::fs::write(&cfg, "xdp = \"turbo\"\n").unwrap();
    let out = serve(&[&local[..], &["--config", cfg.to_str().unwrap()][..]].concat());
    std::fs::remove_file(&cfg).ok();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`xdp`"));
}

struct Proc {
    child: Child,
    api: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> Proc {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--api-listen",
            "127.0.0.1:0",
            "--relay-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .args(extra)
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
                let _ = tx.send(v["fields"]["api"].as_str().unwrap_or_default().to_string());
            }
        }
    });
    let api = rx.recv_timeout(Duration::from_secs(20)).expect("ferry serving log line");
    Proc { child, api: format!("http://{api}") }
}

/// Reads a JSON-logging `ferry serve` child's stderr up to its "ferry serving" line; returns that
/// line and the rest of the stream.
fn serving_line(child: &mut Child) -> (serde_json::Value, Box<dyn Iterator<Item = String> + Send>) {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok);
    let serving = lines
        .find_map(|l| {
            serde_json::from_str::<serde_json::Value>(&l)
                .ok()
                .filter(|v| v["fields"]["message"] == "ferry serving")
        })
        .unwrap();
    (serving, Box::new(lines))
}

fn signal(p: &Proc, sig: i32) {
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(p.child.id() as i32, sig) };
}

fn wait_exit(p: &mut Proc, secs: u64) -> Option<i32> {
    for _ in 0..secs * 20 {
        if let Some(s) = p.child.try_wait().unwrap() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn sigterm_drains_then_exits_zero() {
    let mut p = start(&["--drain-timeout", "30s"]);
    let api = ApiClient::new(p.api.clone());
    let h = api.allocate(2, None).unwrap();
    let code = api.join_code(&h.allocation_id).unwrap();
    let j = api.join(&code).unwrap();
    let mut host = RelayClient::new(&h).unwrap();
    let mut peer = RelayClient::new(&j.allocation).unwrap();
    host.bind().unwrap();
    peer.bind().unwrap();
    let hid = peer.connect_b64(&j.host_connection_data).unwrap();

    signal(&p, libc::SIGTERM);
    let mut ready = 200;
    for _ in 0..100 {
        ready = api.raw("GET", "/readyz", None).unwrap().status;
        if ready == 503 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ready, 503);
    assert!(api.allocate(2, None).is_err(), "no new allocations while draining");
    // The live session keeps working.
    peer.send(&hid, b"during drain").unwrap();
    assert_eq!(host.recv_relay(Duration::from_secs(3)).unwrap().unwrap().1, b"during drain");
    assert!(p.child.try_wait().unwrap().is_none(), "still running while a session lives");
    // The session ends: the relay exits 0 on its own.
    host.close().unwrap();
    assert_eq!(wait_exit(&mut p, 10), Some(0));
}

#[test]
fn second_signal_exits_at_once() {
    let mut p = start(&["--drain-timeout", "60s"]);
    let api = ApiClient::new(p.api.clone());
    let h = api.allocate(2, None).unwrap();
    let mut host = RelayClient::new(&h).unwrap();
    host.bind().unwrap();
    signal(&p, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let early = p.child.try_wait().unwrap();
    assert!(early.is_none(), "draining, not gone: {early:?}");
    signal(&p, libc::SIGINT);
    assert_eq!(wait_exit(&mut p, 10), Some(0));
}

/// Starts `ferry serve` with exactly these arguments (JSON logs) and waits for "ferry serving".
fn start_with(args: &[&str], env: &[(&str, &str)]) -> Result<(Proc, serde_json::Value), String> {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(["--log-format", "json"])
        .args(args)
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["fields"]["message"] == "ferry serving" {
                let _ = tx.send(Ok(v));
            } else {
                text.push_str(&line);
                text.push('\n');
            }
        }
        let _ = tx.send(Err(text));
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(v)) => {
            let api = format!("http://{}", v["fields"]["api"].as_str().unwrap_or_default());
            Ok((Proc { child, api }, v))
        }
        Ok(Err(text)) => {
            let _ = child.wait();
            Err(text)
        }
        Err(_) => {
            let _ = child.kill();
            Err("no start-up line".into())
        }
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn a_second_relay_on_the_same_port_fails_at_startup() {
    let port = free_udp_port();
    let relay = format!("127.0.0.1:{port}");
    let (first, _) =
        start_with(&["--api-listen", "127.0.0.1:0", "--relay-listen", &relay, "--shards", "2"], &[])
            .expect("first relay starts");
    let err = start_with(&["--api-listen", "127.0.0.1:0", "--relay-listen", &relay, "--shards", "2"], &[])
        .err()
        .expect("the second relay must not start");
    assert!(err.contains("relay_listen") && err.contains("already"), "{err}");
    // The first one still has its whole port: a full round trip works.
    let api = ApiClient::new(first.api.clone());
    let h = api.allocate(1, None).unwrap();
    RelayClient::new(&h).unwrap().bind().unwrap();
    drop(first);

    // Any other process holding the port (even with SO_REUSEPORT) is refused too.
    let port = free_udp_port();
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    s.set_reuse_port(true).unwrap();
    s.bind(&format!("127.0.0.1:{port}").parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    let err = start_with(
        &["--api-listen", "127.0.0.1:0", "--relay-listen", &format!("127.0.0.1:{port}"), "--shards", "2"],
        &[],
    )
    .err()
    .expect("a port held by another process is refused");
    assert!(err.contains("already in use"), "{err}");
}

#[test]
fn a_live_control_socket_is_never_taken_over_and_a_stale_one_is_replaced() {
    let path = std::env::temp_dir().join(format!("ferry-ctl-{}.sock", std::process::id()));
    let p = path.to_str().unwrap();
    let base = ["--api-listen", "127.0.0.1:0", "--relay-listen", "127.0.0.1:0", "--control-socket", p];
    let (mut first, _) = start_with(&base, &[]).expect("first relay");
    let err = start_with(&base, &[]).err().expect("second relay must not take the socket");
    assert!(err.contains("control_socket") && err.contains("another running relay"), "{err}");
    let mut c =
        ferry::control::socket::ControlClient::connect_unix(&path).expect("the first relay still serves it");
    assert!(c.stats().is_ok());
    // `ferry ctl` operates it: counters, and releasing an allocation.
    let h = ApiClient::new(first.api.clone()).allocate(1, None).unwrap();
    let out = Command::new(BIN).args(["ctl", "--socket", p, "release", &h.allocation_id]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(BIN).args(["ctl", "--socket", p, "stats"]).output().unwrap();
    let stats = String::from_utf8_lossy(&out.stdout);
    assert!(stats.contains("ferry_allocations_released_total{reason=\"control\"} 1"), "{stats}");
    let out = Command::new(BIN).args(["ctl", "--socket", p, "release", &h.allocation_id]).output().unwrap();
    assert!(!out.status.success(), "releasing it twice fails");
    // status, allocations (filtered, JSON), drain and undrain, kick.
    let ctl = |args: &[&str]| {
        let out = Command::new(BIN).args(["ctl", "--socket", p]).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let api = ApiClient::new(first.api.clone());
    let host = api.allocate(2, None).unwrap();
    let code = api.join_code(&host.allocation_id).unwrap();
    let joiner = api.join(&code).unwrap();
    let mut hc = RelayClient::new(&host).unwrap();
    hc.bind().unwrap();
    let status: serde_json::Value = serde_json::from_str(&ctl(&["status", "--json"])).unwrap();
    assert!(status["packets_in_per_sec"].is_u64(), "rates over one second: {status}");
    assert_eq!(
        (status["draining"].as_bool(), status["allocations"].as_u64()),
        (Some(false), Some(2)),
        "{status}"
    );
    let list: serde_json::Value = serde_json::from_str(&ctl(&["allocations", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let hosts: serde_json::Value =
        serde_json::from_str(&ctl(&["allocations", "--json", "--role", "host"])).unwrap();
    assert_eq!(hosts[0]["id"], host.allocation_id.as_str());
    assert!(hosts[0]["bound"].is_string(), "the host bound: {hosts}");
    let unbound: serde_json::Value =
        serde_json::from_str(&ctl(&["allocations", "--json", "--unbound"])).unwrap();
    assert_eq!(unbound[0]["id"], joiner.allocation.allocation_id.as_str());
    assert_eq!(unbound[0]["host"], host.allocation_id.as_str());
    assert!(ctl(&["allocations"]).contains(&host.allocation_id), "the table lists it");
    ctl(&["drain"]);
    assert_eq!(api.raw("GET", "/readyz", None).unwrap().status, 503);
    assert!(api.allocate(1, None).is_err(), "no new allocations while drained");
    assert!(ctl(&["status"]).starts_with("draining"));
    ctl(&["undrain"]);
    assert_eq!(api.raw("GET", "/readyz", None).unwrap().status, 200);
    ctl(&["kick", &joiner.allocation.allocation_id]);
    let list: serde_json::Value = serde_json::from_str(&ctl(&["allocations", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    // kill -9 leaves the file behind; the next relay replaces it.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert!(path.exists());
    let (_third, _) = start_with(&base, &[]).expect("a stale socket file is replaced");
    std::fs::remove_file(&path).ok();
}

#[test]
fn booleans_accept_every_spelling_and_env_errors_name_the_variable() {
    let base = ["--api-listen", "127.0.0.1:0", "--relay-listen", "127.0.0.1:0"];
    for (v, want) in [("0", false), ("off", false), ("yes", true), ("1", true)] {
        let (_p, line) =
            start_with(&base, &[("FERRY_GSO", v)]).unwrap_or_else(|e| panic!("FERRY_GSO={v}: {e}"));
        assert_eq!(line["fields"]["gso"], want, "FERRY_GSO={v}");
    }
    let (_p, line) = start_with(&[&base[..], &["--gso", "no"]].concat(), &[]).unwrap();
    assert_eq!(line["fields"]["gso"], false);
    let out = Command::new(BIN).args(["serve"]).args(base).env("FERRY_GSO", "maybe").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FERRY_GSO") && err.contains("`gso`") && !err.contains("--gso"), "{err}");
}

#[test]
fn text_logs_to_a_pipe_carry_no_colour_codes() {
    let mut child = Command::new(BIN)
        .args(["serve", "--api-listen", "127.0.0.1:0", "--relay-listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let lines: Vec<String> = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .take_while(|l| !l.contains("ferry serving"))
        .chain(std::iter::once(String::new()))
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    let text = lines.join("\n");
    assert!(!text.contains('\u{1b}'), "colour codes in piped logs: {text:?}");
    let mut child = Command::new(BIN)
        .args(["serve", "--api-listen", "127.0.0.1:0", "--relay-listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let serving = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("ferry serving"))
        .unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert!(serving.contains("ferry serving") && !serving.contains('\u{1b}'), "{serving:?}");
}

fn load(args: &[&str]) -> std::process::Output {
    Command::new(BIN).arg("load").args(args).output().unwrap()
}

#[test]
fn load_refuses_bad_arguments_with_a_message() {
    for (args, flag) in [
        (&["--sessions", "0"][..], "--sessions"),
        (&["--size", "2020"][..], "--size"),
        (&["--size", "1435"][..], "--size"),
        (&["--size", "5"][..], "--size"),
        (&["--mode", "binds", "--allocations", "0"][..], "--allocations"),
        (&["--mode", "allocations", "--clients", "0"][..], "--clients"),
    ] {
        let out = load(&[&["--api", "http://127.0.0.1:9"], args].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(flag) && !err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn readme_load_examples_work_against_a_default_relay() {
    let (p, _) = start_with(&["--api-listen", "127.0.0.1:0", "--relay-listen", "127.0.0.1:0"], &[]).unwrap();
    // 50 sessions need 150 API calls: more than the default per-IP burst, so the generator waits.
    let out = load(&[
        "--api",
        &p.api,
        "--sessions",
        "50",
        "--rate",
        "5000",
        "--size",
        "200",
        "--duration",
        "1s",
        "--warmup",
        "200ms",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["delivered_pps"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
    let out = load(&[
        "--api",
        &p.api,
        "--mode",
        "binds",
        "--allocations",
        "150",
        "--duration",
        "1s",
        "--warmup",
        "0s",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = load(&["--api", &p.api, "--mode", "allocations", "--clients", "2", "--duration", "1s"]);
    assert!(out.status.success());
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("refused with 429"), "{stdout}");
    assert!(stderr.contains("rate limit"), "the tool says plainly it was rate limited: {stderr}");
}

#[test]
fn descriptor_exhaustion_never_costs_the_control_plane() {
    use std::os::unix::process::CommandExt;
    let path = std::env::temp_dir().join(format!("ferry-fd-{}.sock", std::process::id()));
    let mut cmd = Command::new(BIN);
    cmd.args([
        "serve",
        "--log-format",
        "json",
        "--api-listen",
        "127.0.0.1:0",
        "--relay-listen",
        "127.0.0.1:0",
    ])
    .args(["--control-socket", path.to_str().unwrap(), "--shards", "2"])
    .stderr(Stdio::piped())
    .stdout(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe; the child lowers only its own limit.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 256, rlim_max: 256 };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let (serving, lines) = serving_line(&mut child);
    let cap = serving["fields"]["api_max_connections"].as_u64().unwrap();
    assert!(cap < 256, "the API cap leaves room for the rest of the relay: {cap}");
    let warnings = std::thread::spawn(move || lines.filter(|l| l.contains("\"WARN\"")).count());
    let p = Proc { child, api: format!("http://{}", serving["fields"]["api"].as_str().unwrap()) };
    let api_addr: std::net::SocketAddr = p.api.trim_start_matches("http://").parse().unwrap();
    // Far more idle API connections than the process has descriptors.
    let held: Vec<_> = (0..400).filter_map(|_| std::net::TcpStream::connect(api_addr).ok()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut c =
        ferry::control::socket::ControlClient::connect_unix(&path).expect("control socket still accepts");
    let a = c.create_host(2).expect("and still creates allocations");
    assert_eq!(a.connection_data.len(), 255);
    assert!(ApiClient::new(p.api.clone()).regions().is_ok(), "honest API calls are still served");
    drop(held);
    drop(p);
    std::fs::remove_file(&path).ok();
    let warned = warnings.join().unwrap();
    assert!(warned <= 3, "refusals are summarised, not logged one by one: {warned} warnings");
}

#[test]
fn a_stderr_nobody_reads_never_stalls_the_api() {
    // stderr is a pipe this test never reads: it fills after a few hundred lines.
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--api-listen",
            "127.0.0.1:0",
            "--relay-listen",
            "127.0.0.1:0",
            "--api-rate-limit",
            "100000",
        ])
        .args(["--log-format", "json"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("ferry serving") {
        line.clear();
        stderr.read_line(&mut line).unwrap();
    }
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let p = Proc { child, api: format!("http://{}", v["fields"]["api"].as_str().unwrap()) };
    let api = ApiClient::new(p.api.clone());
    for i in 0..2000 {
        api.allocate(1, None).unwrap_or_else(|e| panic!("allocation {i}: {e}"));
    }
    assert_eq!(api.raw("GET", "/healthz", None).unwrap().status, 200);
    // The writer is stuck on the full pipe, and says so in /metrics.
    let mut stalled = false;
    for _ in 0..100 {
        let m = String::from_utf8(api.raw("GET", "/metrics", None).unwrap().body).unwrap();
        if m.lines().any(|l| l == "ferry_log_output_stalled 1") {
            stalled = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(stalled, "a blocked log output is reported");
    drop(stderr);
}

#[test]
fn lifecycle_logs_can_be_sampled_and_turned_off() {
    let run = |extra: &[&str]| -> usize {
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--api-listen",
                "127.0.0.1:0",
                "--relay-listen",
                "127.0.0.1:0",
                "--api-rate-limit",
                "100000",
            ])
            .args(["--log-format", "json"])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let (serving, lines) = serving_line(&mut child);
        let counter =
            std::thread::spawn(move || lines.filter(|l| l.contains("host allocation created")).count());
        let p = Proc { child, api: format!("http://{}", serving["fields"]["api"].as_str().unwrap()) };
        let api = ApiClient::new(p.api.clone());
        for _ in 0..500 {
            api.allocate(1, None).unwrap();
        }
        signal(&p, libc::SIGINT);
        std::thread::sleep(Duration::from_millis(200));
        signal(&p, libc::SIGINT);
        let mut p = p;
        let _ = wait_exit(&mut p, 10);
        counter.join().unwrap()
    };
    assert_eq!(run(&[]), 500);
    assert_eq!(run(&["--log-lifecycle", "off"]), 0);
    let sampled = run(&["--log-lifecycle-sample", "50"]);
    assert!((1..=40).contains(&sampled), "about one in 50 of 500: {sampled}");
}

#[test]
fn ferry_tunnel_host_and_join_on_the_command_line() {
    let (relay, _) =
        start_with(&["--api-listen", "127.0.0.1:0", "--relay-listen", "127.0.0.1:0"], &[]).unwrap();
    // A UDP echo "game server".
    let game = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let game_addr = game.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        game.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 1500];
        if let Ok((n, from)) = game.recv_from(&mut buf) {
            let _ = game.send_to(&buf[..n], from);
        }
    });
    let spawn = |args: &[&str]| {
        Command::new(BIN)
            .arg("tunnel")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut host = spawn(&["host", "--api", &relay.api, "--forward", &game_addr.to_string(), "--json"]);
    let mut host_out = BufReader::new(host.stdout.take().unwrap()).lines();
    let ready: serde_json::Value = serde_json::from_str(&host_out.next().unwrap().unwrap()).unwrap();
    let code = ready["join_code"].as_str().unwrap().to_string();
    let offset = (2000 + game_addr.port() as i32 % 5000 - game_addr.port() as i32).to_string();
    let mut join = spawn(&["join", &code, "--api", &relay.api, "--port-offset", &offset, "--json"]);
    let mut join_out = BufReader::new(join.stdout.take().unwrap()).lines();
    let ready: serde_json::Value = serde_json::from_str(&join_out.next().unwrap().unwrap()).unwrap();
    let local: std::net::SocketAddr = ready["listen"][0].as_str().unwrap().parse().unwrap();
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.send_to(b"any game datagram", local).unwrap();
    let mut buf = [0u8; 100];
    let (n, _) = client.recv_from(&mut buf).expect("the echo came back through both tunnels");
    assert_eq!(&buf[..n], b"any game datagram");
    echo.join().unwrap();
    // The host stops: the joiner says so and exits with code 3.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(host.id() as i32, libc::SIGINT) };
    assert!(host.wait().unwrap().success());
    let status = join.wait().unwrap();
    assert_eq!(status.code(), Some(3));
    let rest: Vec<String> = join_out.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("host_left")), "{rest:?}");
}

#[test]
fn start_up_says_which_authentication_mode_is_active() {
    let (_p, line) =
        start_with(&["--api-listen", "127.0.0.1:0", "--relay-listen", "127.0.0.1:0"], &[]).unwrap();
    assert_eq!(line["fields"]["api_auth"], "anonymous");
    let secret = std::env::temp_dir().join(format!("ferry-proc-jwt-{}", std::process::id()));
    std::fs::write(&secret, "a-shared-secret-of-at-least-32-bytes!!").unwrap();
    let (_p, line) = start_with(
        &[
            "--api-listen",
            "0.0.0.0:0",
            "--relay-listen",
            "127.0.0.1:0",
            "--jwt-algorithm",
            "HS256",
            "--jwt-secret-file",
            secret.to_str().unwrap(),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(line["fields"]["api_auth"], "JWT HS256");
    let out = Command::new(BIN)
        .args(["serve", "--api-listen", "0.0.0.0:0", "--jwt-algorithm", "RS256"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad JWT configuration stops start-up like any bad configuration"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("jwt_public_key_file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(secret).ok();
}

#[test]
fn service_manager_hears_ready_watchdog_and_stopping_in_order() {
    let path = std::env::temp_dir().join(format!("ferry-notify-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--api-listen", "127.0.0.1:0", "--relay-listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let mut next = || {
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let first = next();
    assert!(first.starts_with("READY=1") && first.contains("STATUS=serving"), "{first}");
    let watchdogs = (0..3).map(|_| next()).filter(|m| m == "WATCHDOG=1").count();
    assert_eq!(watchdogs, 3, "keep-alives every half interval while the shards answer");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stopping = (0..10).map(|_| next()).find(|m| m.starts_with("STOPPING=1"));
    assert!(stopping.is_some_and(|m| m.contains("draining")));
    assert!(child.wait().unwrap().success());
    std::fs::remove_file(&path).ok();
}

#[test]
fn sighup_reloads_what_can_change_live_without_dropping_sessions() {
    let cfg = std::env::temp_dir().join(format!("ferry-reload-{}.toml", std::process::id()));
    let sock = std::env::temp_dir().join(format!("ferry-reload-{}.sock", std::process::id()));
    std::fs::write(&cfg, "api_rate_limit = 1000\n").unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--log-format",
            "json",
            "--api-listen",
            "127.0.0.1:0",
            "--relay-listen",
            "127.0.0.1:0",
        ])
        .args(["--config", cfg.to_str().unwrap(), "--control-socket", sock.to_str().unwrap()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (serving, lines) = serving_line(&mut child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines {
            let _ = tx.send(l);
        }
    });
    let p = Proc { child, api: format!("http://{}", serving["fields"]["api"].as_str().unwrap()) };
    let api = ApiClient::new(p.api.clone());
    let h = api.allocate(2, None).unwrap();
    let code = api.join_code(&h.allocation_id).unwrap();
    let j = api.join(&code).unwrap();
    let (mut host, mut peer) = (RelayClient::new(&h).unwrap(), RelayClient::new(&j.allocation).unwrap());
    host.bind().unwrap();
    peer.bind().unwrap();
    let hid = peer.connect_b64(&j.host_connection_data).unwrap();

    // Tokens become required, a timeout changes, and the region changes (refused live).
    std::fs::write(
        &cfg,
        "api_rate_limit = 1000\napi_tokens = [\"reloaded-token-0123456789\"]\nidle_timeout = \"20s\"\nregion = \"eu-west\"\n",
    )
    .unwrap();
    // `ferry ctl reload` takes the same path as SIGHUP.
    let out = Command::new(BIN).args(["ctl", "--socket", sock.to_str().unwrap(), "reload"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut log = Vec::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
        let done = l.contains("configuration reloaded");
        log.push(l);
        if done {
            break;
        }
    }
    let text = log.join("\n");
    assert!(text.contains("configuration reloaded"), "{text}");
    assert!(text.contains("`region`") && text.contains("restart"), "the refused key is named: {text}");
    assert!(!text.contains("advertise_port"), "derived values are not reported as changes: {text}");
    match api.allocate(1, None) {
        Err(ferry::client::ApiError::Problem(p)) => assert_eq!(p.status, 401, "tokens are required now"),
        other => panic!("{other:?}"),
    }
    assert!(api.clone().with_token("reloaded-token-0123456789").allocate(1, None).is_ok());
    // The live session never noticed.
    peer.send(&hid, b"after the reload").unwrap();
    assert_eq!(host.recv_relay(Duration::from_secs(3)).unwrap().unwrap().1, b"after the reload");
    std::fs::remove_file(&cfg).ok();
    std::fs::remove_file(&sock).ok();
}

#[test]
fn a_short_soak_delivers_every_datagram_to_its_own_session() {
    let (relay, _) = start_with(
        &[
            "--api-listen",
            "127.0.0.1:0",
            "--relay-listen",
            "127.0.0.1:0",
            "--api-rate-limit",
            "100000",
            "--log-lifecycle",
            "off",
        ],
        &[],
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "load",
            "--mode",
            "churn",
            "--api",
            &relay.api,
            "--sessions",
            "20",
            "--duration",
            "8s",
            "--json",
        ])
        .args(["--relay-pid", &relay.child.id().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["sessions"].as_u64().unwrap() >= 20, "{r}");
    assert_eq!(r["misdelivered"], 0, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert!(r["closed"].as_u64().unwrap() > 0 && r["abandoned"].as_u64().unwrap() > 0, "{r}");
    let samples = r["samples"].as_array().unwrap();
    assert!(
        samples.len() >= 2 && samples.iter().all(|s| s["rss_kib"].is_u64() && s["open_fds"].is_u64()),
        "{r}"
    );
}
