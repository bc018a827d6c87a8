//! `ferry tunnel`'s direct paths on loopback (where every pair can reach each other): `auto`
//! moves game traffic off the relay once a probe proves the direct path, and the relay then
//! carries keep-alives only; policies that exclude each other fail at once with a message; the
//! command line prints path events and answers `ferry tunnel status`. Behind real NATs:
//! `tests/nat_netns.rs`; the NAT matrix in virtual time: `tests/nat_sim.rs`.

mod support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferry::client::path::Policy;
use ferry::client::tunnel::{
    HostConfig, HostTunnel, JoinConfig, JoinTunnel, PathOptions, Timing, TunnelControl, TunnelError,
    TunnelEvent,
};
use ferry::clock::Clock;
use support::{Server, Tunnels};

/// A UDP echo server on a thread, for at most `secs` seconds; it stops when dropped.
struct Echo {
    sock: UdpSocket,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.sock.local_addr()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn echo_server(secs: u64) -> Echo {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let e = s.try_clone().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let t = std::thread::spawn(move || {
        e.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let clock = Clock::new();
        let mut buf = [0u8; 2048];
        while clock.now() < secs * 1000 && !st.load(Ordering::Relaxed) {
            if let Ok((n, from)) = e.recv_from(&mut buf) {
                let _ = e.send_to(&buf[..n], from);
            }
        }
    });
    Echo { sock: s, stop, thread: Some(t) }
}

/// Sends `ids` through the tunnel, 25 at a time (a game's pace, not a flood that overruns the
/// client's own receive buffer), and collects the echoes, waiting up to `wait` at the end.
fn round(
    client: &UdpSocket,
    to: std::net::SocketAddr,
    ids: std::ops::Range<u32>,
    wait: Duration,
) -> Vec<u32> {
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    let ids: Vec<u32> = ids.collect();
    for (k, chunk) in ids.chunks(25).enumerate() {
        for i in chunk {
            client.send_to(&i.to_be_bytes(), to).unwrap();
        }
        let last = k == ids.len().div_ceil(25) - 1;
        client.set_read_timeout(Some(if last { wait } else { Duration::from_millis(100) })).unwrap();
        let want = (k * 25 + chunk.len()).min(ids.len());
        while got.len() < want {
            match client.recv_from(&mut buf) {
                Ok((4, _)) => got.push(u32::from_be_bytes(buf[..4].try_into().unwrap())),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    got
}

#[test]
fn auto_goes_direct_and_then_the_relay_carries_keepalives_only() {
    let srv = Server::start(|_| {});
    let echo = echo_server(20);
    let t = Tunnels::start(&srv, vec![echo.local_addr().unwrap()], srv.relay_addr(), srv.relay_addr());
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let clock = Clock::new();
    // Traffic from the first datagram (through the relay until the direct path is proven).
    let mut seen = round(&client, t.local[0], 0..50, Duration::from_secs(3));
    let direct = |c: &TunnelControl| c.paths().first().is_some_and(|p| p.stats.route == "direct");
    while !(direct(&t.join_ctl) && direct(&t.host_ctl)) {
        assert!(clock.now() < 10_000, "no direct path: {:?} / {:?}", t.join_ctl.paths(), t.host_ctl.paths());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the status settle past one refresh, then count what goes where.
    std::thread::sleep(Duration::from_millis(300));
    let relay_before = (
        t.join_ctl.stats.to_relay.load(Ordering::Relaxed),
        t.host_ctl.stats.to_relay.load(Ordering::Relaxed),
    );
    let direct_before = t.join_ctl.stats.to_direct.load(Ordering::Relaxed);
    seen.extend(round(&client, t.local[0], 50..550, Duration::from_secs(3)));
    let relay_after = (
        t.join_ctl.stats.to_relay.load(Ordering::Relaxed),
        t.host_ctl.stats.to_relay.load(Ordering::Relaxed),
    );
    assert_eq!(relay_after, relay_before, "no game datagram through the relay once direct");
    assert_eq!(t.join_ctl.stats.to_direct.load(Ordering::Relaxed) - direct_before, 500);
    let unique: HashSet<u32> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "nothing delivered twice");
    let dump = |c: &TunnelControl| {
        let s = &c.stats;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "to_relay {} to_direct {} delivered {} from_direct {} dup {} unproven {} bad {}",
            g(&s.to_relay),
            g(&s.to_direct),
            g(&s.from_relay),
            g(&s.from_direct),
            g(&s.duplicates),
            g(&s.unproven),
            g(&s.bad_frames)
        )
    };
    assert_eq!(
        unique.len(),
        550,
        "nothing lost on loopback: joiner {} / host {}",
        dump(&t.join_ctl),
        dump(&t.host_ctl)
    );
    std::thread::sleep(Duration::from_millis(300));
    for (who, ctl) in [("joiner", &t.join_ctl), ("host", &t.host_ctl)] {
        let p = &ctl.paths()[0];
        assert_eq!(p.policy, "auto");
        let s = &p.stats;
        assert!(s.time_to_direct_ms.is_some_and(|ms| ms < 5_000), "{who}: {s:?}");
        assert!(s.rtt_direct_ms.is_some() && s.bytes_direct > 0, "{who}: {s:?}");
        assert!(s.direct.is_some() && s.switches >= 1, "{who}: {s:?}");
        assert_eq!(ctl.stats.unproven.load(Ordering::Relaxed), 0, "{who}");
    }
    let events = t.events.lock().unwrap().clone();
    assert!(
        events.iter().any(|e| matches!(e, TunnelEvent::Path { status } if status.stats.route == "direct")),
        "a path event announces the direct path"
    );
    drop(t);
}

#[test]
fn direct_first_holds_nothing_back_once_direct() {
    let srv = Server::start(|_| {});
    let echo = echo_server(15);
    let policy = PathOptions { policy: Policy::DirectFirst, ..Default::default() };
    let t = Tunnels::start_with(
        &srv,
        vec![echo.local_addr().unwrap()],
        srv.relay_addr(),
        srv.relay_addr(),
        policy,
    );
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Sent at once: held until the first probe is answered (loopback: within one interval),
    // then all delivered, once, on the direct path.
    let got = round(&client, t.local[0], 0..100, Duration::from_secs(5));
    let unique: HashSet<u32> = got.iter().copied().collect();
    assert_eq!((unique.len(), got.len()), (100, 100));
    assert_eq!(t.join_ctl.stats.to_relay.load(Ordering::Relaxed), 0, "direct-first never needed the relay");
    drop(t);
}

#[test]
fn policies_that_exclude_each_other_fail_at_once_with_a_message() {
    let srv = Server::start(|_| {});
    let api = srv.api();
    let echo = echo_server(8);
    let only = |policy| PathOptions { policy, ..Default::default() };
    let cfg = HostConfig {
        forwards: vec![echo.local_addr().unwrap()],
        players: 2,
        timing: Timing::default(),
        relay: None,
        path: only(Policy::Relay),
    };
    let mut host = HostTunnel::open(&api, cfg).unwrap();
    let code = host.join_code().to_string();
    let host_ctl = TunnelControl::new();
    let hc = host_ctl.clone();
    let host_events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let he = host_events.clone();
    let h = std::thread::spawn(move || {
        host.run(&hc, &mut |e| he.lock().unwrap().push(e)).map_err(|e| e.to_string())
    });
    let jcfg = JoinConfig { path: only(Policy::Direct), port_offset: 1, ..JoinConfig::default() };
    let mut join = JoinTunnel::open(&api, &code, jcfg).unwrap();
    let clock = Clock::new();
    let r = join.run(&TunnelControl::new(), &mut |_| {});
    let took = clock.now();
    match r {
        Err(TunnelError::Path(m)) => assert!(m.contains("direct") && m.contains("relay"), "{m}"),
        other => panic!("expected a path error, got {other:?}"),
    }
    assert!(took < 5_000, "failed fast ({took} ms)");
    let mut told = false;
    for _ in 0..40 {
        if host_events.lock().unwrap().iter().any(|e| matches!(e, TunnelEvent::PathFailed { .. })) {
            told = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(told, "the host reports it too");
    host_ctl.stop();
    h.join().unwrap().unwrap();
}

/// Reads JSON event lines from a child's stdout on a thread.
fn json_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<serde_json::Value> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_command_line_prints_path_events_and_answers_status() {
    let srv = Server::start(|_| {});
    let echo = echo_server(20);
    let bin = env!("CARGO_BIN_EXE_ferry");
    let dir = std::env::temp_dir().join(format!("ferry-tunnel-paths-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("host.sock");
    let mut host = Kill(
        Command::new(bin)
            .args(["tunnel", "host", "--json", "--api", &srv.api_url(), "--forward"])
            .arg(echo.local_addr().unwrap().to_string())
            .arg("--status-socket")
            .arg(&sock)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let host_rx = json_lines(&mut host.0);
    let ready = host_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ready["event"], "ready", "{ready}");
    let code = ready["join_code"].as_str().unwrap().to_string();
    let port = echo.local_addr().unwrap().port();
    let offset = (20_000 + port % 5_000) as i32 - port as i32;
    let mut join = Kill(
        Command::new(bin)
            .args(["tunnel", "join", &code, "--json", "--path", "direct-first", "--api", &srv.api_url()])
            .arg(format!("--port-offset={offset}"))
            .env("XDG_RUNTIME_DIR", &dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let join_rx = json_lines(&mut join.0);
    let ready = join_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let local: std::net::SocketAddr = ready["listen"][0].as_str().unwrap().parse().unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let got = round(&client, local, 0..20, Duration::from_secs(5));
    assert_eq!(got.len(), 20);
    // The host announces the player's direct path as a JSON event with the path's figures.
    let clock = Clock::new();
    let path = loop {
        let v = host_rx.recv_timeout(Duration::from_secs(10)).expect("a path event");
        if v["event"] == "path" && v["path"]["route"] == "direct" {
            break v;
        }
        assert!(clock.now() < 10_000);
    };
    assert_eq!(path["path"]["policy"], "auto");
    assert!(path["path"]["time_to_direct_ms"].is_u64(), "{path}");
    // `ferry tunnel status`: one tunnel by its socket, and every tunnel in the runtime directory.
    std::thread::sleep(Duration::from_millis(400));
    let out = Command::new(bin).args(["tunnel", "status", "--json", "--socket"]).arg(&sock).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["role"], "host");
    assert_eq!(doc["join_code"], code.as_str());
    assert_eq!(doc["paths"][0]["route"], "direct", "{doc}");
    let out = Command::new(bin).args(["tunnel", "status"]).env("XDG_RUNTIME_DIR", &dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("(join") && text.contains("[direct-first] path to"),
        "{text}"
    );
    assert!(text.contains(": direct 127.0.0.1:") || text.contains(": direct "), "{text}");
    let none = Command::new(bin)
        .args(["tunnel", "status"])
        .env("XDG_RUNTIME_DIR", dir.join("nowhere"))
        .output()
        .unwrap();
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("no running ferry tunnel"));
    drop(join);
    drop(host);
    let _ = std::fs::remove_dir_all(&dir);
}
