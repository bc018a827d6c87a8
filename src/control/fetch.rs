//! A small blocking HTTP(S) GET for the control plane's own needs (a JWKS): `http://` through the
//! SDK's client, `https://` over rustls with Mozilla's roots (webpki-roots) or a CA bundle the
//! operator names. Bodies are capped; anything but a 200 is an error.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Largest body accepted.
pub const MAX_BODY: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);

fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(p) => {
            use rustls::pki_types::pem::PemObject;
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(p)
                .map_err(|e| format!("{}: {e}", p.display()))?;
            for c in certs {
                roots.add(c.map_err(|e| format!("{}: {e}", p.display()))?).map_err(|e| e.to_string())?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// GETs `url` (http or https) and returns the body of a 200 answer.
pub fn get(url: &str, ca_file: Option<&Path>) -> Result<Vec<u8>, String> {
    if let Some(rest) = url.strip_prefix("http://") {
        let (base, path) = match rest.find('/') {
            Some(i) => (format!("http://{}", &rest[..i]), rest[i..].to_string()),
            None => (url.to_string(), "/".to_string()),
        };
        let r = crate::client::http::request(&base, "GET", &path, None, None, TIMEOUT)
            .map_err(|e| format!("{url}: {e}"))?;
        return if r.status == 200 { Ok(r.body) } else { Err(format!("{url}: HTTP {}", r.status)) };
    }
    let rest =
        url.strip_prefix("https://").ok_or_else(|| format!("{url}: only http:// and https:// URLs"))?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
    let bad_port = || format!("{url}: bad port");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| format!("{url}: bad address"))?;
        match after.strip_prefix(':') {
            Some(p) => (h, p.parse::<u16>().map_err(|_| bad_port())?),
            None => (h, 443),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad_port())?),
            None => (authority, 443),
        }
    };
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: cannot resolve {host}"))?;
    let name =
        rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| format!("{url}: {e}"))?;
    let conn =
        rustls::ClientConnection::new(tls_config(ca_file)?, name).map_err(|e| format!("{url}: {e}"))?;
    let tcp = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("{url}: {e}"))?;
    tcp.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nAccept: application/json\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).map_err(|e| format!("{url}: {e}"))?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match tls.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&chunk[..n]);
                if raw.len() > MAX_BODY + 16 * 1024 {
                    return Err(format!("{url}: answer larger than {MAX_BODY} bytes"));
                }
            }
            // Servers that close without close_notify: what arrived is the answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(format!("{url}: {e}")),
        }
    }
    let r = crate::client::http::parse_response(&raw).map_err(|e| format!("{url}: {e}"))?;
    if r.status == 200 {
        Ok(r.body)
    } else {
        Err(format!("{url}: HTTP {}", r.status))
    }
}
