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
