//! DTLS clients on other implementations than the server's: mbedTLS (the library Unity's
//! client is built on; `tests/mbedtls/pipe.c`, built with a 64-byte PSK limit) and GnuTLS's
//! `gnutls-cli`.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::Duration;

/// Builds the mbedTLS client once per test binary; a failed build fails the test.
pub fn mbedtls_pipe_binary() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mbedtls/build.sh"))
            .output()
            .expect("run tests/mbedtls/build.sh (needs cc and python3)");
        assert!(
            out.status.success(),
            "building the mbedTLS client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

/// How the client names its allocation in the PSK identity.
pub enum Identity<'a> {
    /// The 16 raw ID bytes, as Unity Transport sends them.
    Raw(&'a [u8; 16]),
    /// The UUID's text form, as Unity's documentation describes.
    Text(&'a str),
}

/// A running mbedTLS DTLS client: Relay messages in, records out.
pub struct MbedPipe {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl MbedPipe {
    pub fn start(relay: SocketAddr, identity: Identity<'_>, key: &[u8; 64]) -> Self {
        let id = match identity {
            Identity::Raw(b) => hex(b),
            Identity::Text(s) => format!("s:{s}"),
        };
        let mut child = Command::new(mbedtls_pipe_binary())
            .args([relay.ip().to_string(), relay.port().to_string(), id, hex(key)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the mbedTLS client");
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Self { child, stdin, lines }
    }

    /// The next line within `ms`, if any.
    pub fn line(&self, ms: u64) -> Option<String> {
        match self.lines.recv_timeout(Duration::from_millis(ms)) {
            Ok(l) => Some(l),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Waits for the handshake; returns the negotiated suite.
    pub fn connected(&self) -> String {
        let l = self.line(15_000).expect("the mbedTLS client to finish its handshake");
        l.strip_prefix("CONNECTED ").unwrap_or_else(|| panic!("handshake failed: {l}")).to_string()
    }

    pub fn send(&mut self, msg: &[u8]) {
        writeln!(self.stdin, "{}", hex(msg)).unwrap();
        self.stdin.flush().unwrap();
    }

    pub fn command(&mut self, c: &str) {
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The next record the client received.
    pub fn recv(&self) -> Vec<u8> {
        let l = self.line(10_000).expect("a record from the relay");
        let h = l.strip_prefix("R ").unwrap_or_else(|| panic!("expected a record, got {l}"));
        (0..h.len() / 2).map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap()).collect()
    }

    /// Asserts that no record arrives within `ms`.
    pub fn silent(&self, ms: u64) {
        if let Some(l) = self.line(ms) {
            panic!("unexpected output from the mbedTLS client: {l}");
        }
    }
}

impl Drop for MbedPipe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `gnutls-cli` as a DTLS 1.2 PSK client with the UUID text as its username, sends one
/// line, and returns everything it printed. Fails the test when gnutls-cli is not installed.
pub fn gnutls_handshake(relay: SocketAddr, uuid: &str, key: &[u8; 64]) -> String {
    let mut child = Command::new("gnutls-cli")
        .args([
            "--udp",
            "--pskusername",
            uuid,
            "--pskkey",
            &hex(key),
            "--priority",
            "NORMAL:+PSK:-VERS-ALL:+VERS-DTLS1.2",
            "--port",
            &relay.port().to_string(),
            &relay.ip().to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gnutls-cli (Debian package gnutls-bin) must be installed");
    let mut stdin = child.stdin.take().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = writeln!(stdin, "hello");
    std::thread::sleep(Duration::from_millis(300));
    drop(stdin);
    for _ in 0..200 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
