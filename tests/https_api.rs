//! The API over HTTPS: served with the configured certificate, plain HTTP refused on that port,
//! and a new certificate picked up when its files change, without a restart.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use support::Server;

fn cert() -> (String, String, rustls::pki_types::CertificateDer<'static>) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    (c.cert.pem(), c.signing_key.serialize_pem(), c.cert.der().clone())
}

/// One request over TLS to `port`, trusting only `root`; the response text, or `None` when the
/// handshake fails.
fn https(port: u16, root: &rustls::pki_types::CertificateDer<'static>, req: &str) -> Option<String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) if !out.is_empty() => break,
            Err(_) => return None,
        }
    }
    Some(String::from_utf8_lossy(&out).to_string())
}

#[test]
fn api_over_https_and_certificate_reload() {
    let dir = std::env::temp_dir().join(format!("ferry-https-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_pem, key_pem, root) = cert();
    std::fs::write(dir.join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &key_pem).unwrap();
    let srv = Server::start(|c| {
        c.api_tls_cert = Some(dir.join("cert.pem"));
        c.api_tls_key = Some(dir.join("key.pem"));
    });
    let port = srv.running().api_addr.port();
    let get = "GET /v1/regions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let r = https(port, &root, get).expect("TLS handshake");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let body = r#"{"maxConnections": 2}"#;
    let post = format!(
        "POST /v1/allocate HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert!(https(port, &root, &post).unwrap().starts_with("HTTP/1.1 201"));
    // Plain HTTP on the HTTPS port gets no HTTP answer.
    let mut plain = TcpStream::connect(("127.0.0.1", port)).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    plain.write_all(get.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = plain.read_to_end(&mut out);
    assert!(!String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));

    // A new certificate replaces the files: the relay serves it within a few seconds.
    let (cert2, key2, root2) = cert();
    std::fs::write(dir.join("key.pem"), &key2).unwrap();
    std::fs::write(dir.join("cert.pem"), &cert2).unwrap();
    let mut switched = false;
    for _ in 0..50 {
        if https(port, &root2, get).is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            switched = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(switched, "the new certificate is served without a restart");
    assert!(https(port, &root, get).is_none(), "the old one is gone");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_sdk_and_tunnels_speak_https_to_the_api() {
    let dir = std::env::temp_dir().join(format!("ferry-https-sdk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_pem, key_pem, _) = cert();
    std::fs::write(dir.join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &key_pem).unwrap();
    let srv = Server::start(|c| {
        c.api_tls_cert = Some(dir.join("cert.pem"));
        c.api_tls_key = Some(dir.join("key.pem"));
    });
    let base = format!("https://localhost:{}", srv.running().api_addr.port());
    let api = ferry::client::ApiClient::new(base.clone()).with_ca_file(dir.join("cert.pem"));
    let host = api.allocate(2, None).expect("allocate over https");
    let code = api.join_code(&host.allocation_id).unwrap();
    assert!(api.join(&code).is_ok());
    // Without the CA the certificate is not trusted.
    assert!(ferry::client::ApiClient::new(base).allocate(1, None).is_err());
    std::fs::remove_dir_all(&dir).ok();
}
