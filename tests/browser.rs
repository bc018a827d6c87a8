//! A real browser on `wss`: headless Chromium (the distribution's package) loads a page that
//! opens `wss://relay.test:<port>/` with the browser's own WebSocket, trusting a test CA put in
//! its certificate database, and runs BIND → CONNECT → RELAY with a host on plain UDP, the way a
//! Unity WebGL build does (binary frames, `arraybuffer`).
//!
//! Needs `chromium` and `certutil` (Debian: chromium, libnss3-tools); `.ci/run` installs both,
//! and this test fails when either is missing.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry::client::packets;
use support::{test_pki, Raw, Server, BIND_RECEIVED};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Browser(Child);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const PAGE: &str = r#"<!doctype html><meta charset="utf-8"><title>ferry wss</title><script>
const un = h => new Uint8Array(h.match(/../g).map(x => parseInt(x, 16)));
const BIND = un("{BIND}"), CONNECT = un("{CONNECT}"), ME = un("{ME}"), HOST = un("{HOST}");
function relay(payload) {
  const p = new TextEncoder().encode(payload);
  const m = new Uint8Array(38 + p.length);
  m.set([0xDA, 0x72, 0x00, 10]); m.set(ME, 4); m.set(HOST, 20);
  m[36] = p.length >> 8; m[37] = p.length & 0xFF; m.set(p, 38);
  return m;
}
const ws = new WebSocket("wss://relay.test:{PORT}/");
ws.binaryType = "arraybuffer";
let step = 0;
ws.onopen = () => ws.send(BIND);
ws.onmessage = e => {
  const m = new Uint8Array(e.data);
  if (step === 0 && m[3] === 1) { step = 1; ws.send(CONNECT); }
  else if (step === 1 && m[3] === 6) { step = 2; ws.send(relay("browser ready")); }
  else if (step === 2 && m[3] === 10) {
    const text = new TextDecoder().decode(m.subarray(38));
    ws.send(relay("echo:" + text + ":" + navigator.userAgent.includes("Chrome")));
  }
};
</script>"#;

#[test]
fn headless_chromium_relays_over_wss_with_a_udp_host() {
    let dir = std::env::temp_dir().join(format!("ferry-browser-{}", std::process::id()));
    let home = dir.join("home");
    std::fs::create_dir_all(home.join(".pki/nssdb")).unwrap();
    test_pki(&dir);
    let nssdb = format!("sql:{}", home.join(".pki/nssdb").display());
    let st = Command::new("certutil").args(["-d", &nssdb, "-N", "--empty-password"]).status();
    assert!(st.expect("certutil (Debian package libnss3-tools) must be installed").success());
    let ca = dir.join("ca.pem");
    let st = Command::new("certutil")
        .args(["-d", &nssdb, "-A", "-t", "C,,", "-n", "ferry-test-ca", "-i"])
        .arg(&ca)
        .status()
        .unwrap();
    assert!(st.success(), "the test CA goes into the browser's certificate database");

    let srv = Server::start(|c| {
        c.wss_listen = Some("127.0.0.1:0".parse().unwrap());
        c.wss_tls_cert = Some(dir.join("cert.pem"));
        c.wss_tls_key = Some(dir.join("key.pem"));
        c.ws_public_host = Some("relay.test".into());
    });
    let port = srv.running().wss_addr.unwrap().port();
    let api = srv.api();
    let h = api.allocate(2, None).unwrap();
    let code = api.join_code(&h.allocation_id).unwrap();
    let j = Raw::new(&api.join(&code).unwrap().allocation);
    let host = Raw::new(&h);
    assert_eq!(host.bind(0), BIND_RECEIVED);

    let page = PAGE
        .replace("{BIND}", &hex(&packets::bind(&j.key, 0, &j.conn)))
        .replace("{CONNECT}", &hex(&packets::connect_request(&j.id, &host.conn)))
        .replace("{ME}", &hex(&j.id.0))
        .replace("{HOST}", &hex(&host.id.0))
        .replace("{PORT}", &port.to_string());
    let page_path = dir.join("page.html");
    std::fs::write(&page_path, page).unwrap();

    let _browser = Browser(
        Command::new("chromium")
            .env("HOME", &home)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--host-resolver-rules=MAP relay.test 127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .arg(format!("file://{}", page_path.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium (Debian package chromium) must be installed"),
    );

    // The browser's first RELAY proves BIND and CONNECT went through over wss.
    host.sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let ready = host.recv();
    assert_eq!(ready, packets::relay(&j.id, &host.id, b"browser ready").unwrap());
    host.relay_to(&j.id, b"hello browser");
    let mut echo = host.recv();
    for _ in 0..10 {
        if echo != ready {
            break;
        }
        echo = host.recv();
    }
    assert_eq!(echo, packets::relay(&j.id, &host.id, b"echo:hello browser:true").unwrap());
    assert_eq!(srv.metric("ferry_ws_connections_total{result=\"accepted\"}"), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
