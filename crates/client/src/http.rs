//! A minimal blocking HTTP/1.1 client for the allocations API: one request per connection, JSON
//! bodies, `Content-Length` or chunked responses, `http://` or `https://` (rustls, with Mozilla's
//! roots or a CA bundle the caller names). Enough for the SDK without an HTTP stack.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Status and body of a response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of a header (name in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Splits `http(s)://host:port/prefix` into (TLS?, `host:port`, `/prefix`).
fn split_base(base: &str) -> io::Result<(bool, &str, &str)> {
    let (tls, rest) = match (base.strip_prefix("https://"), base.strip_prefix("http://")) {
        (Some(r), _) => (true, r),
        (None, Some(r)) => (false, r),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "API URLs start with http:// or https://",
            ))
        }
    };
    let (authority, prefix) = rest.find('/').map_or((rest, ""), |i| (&rest[..i], &rest[i..]));
    Ok((tls, authority, prefix.trim_end_matches('/')))
}

/// The host part of `host:port` (brackets of an IPv6 literal removed), for TLS server names.
fn host_of(authority: &str) -> &str {
    match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    }
}

pub(crate) fn tls_config(ca_file: Option<&Path>) -> io::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(p) => {
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(p)
                .map_err(|e| bad(format!("{}: {e}", p.display())))?;
            for c in certs {
                roots
                    .add(c.map_err(|e| bad(format!("{}: {e}", p.display())))?)
                    .map_err(|e| bad(e.to_string()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Reads until the peer closes; a TLS peer that closes without `close_notify` ends the answer too.
fn read_all(s: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(raw),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => return Ok(raw),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn dechunk(mut b: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").ok_or_else(|| bad("bad chunk"))?;
        let size_str = std::str::from_utf8(&b[..nl]).map_err(|_| bad("bad chunk size"))?;
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("bad chunk size"))?;
        b = &b[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err(bad("truncated chunk"));
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Sends one request and reads the whole response (`https://` trusts Mozilla's roots).
pub fn request(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    token: Option<&str>,
    timeout: Duration,
) -> io::Result<HttpResponse> {
    request_with(base, method, path, body, token, timeout, None)
}

/// [`request`], trusting the certificates in `ca_file` (PEM) for `https://` instead of the
/// built-in roots.
pub fn request_with(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    token: Option<&str>,
    timeout: Duration,
    ca_file: Option<&Path>,
) -> io::Result<HttpResponse> {
    let (tls, authority, prefix) = split_base(base)?;
    let default_port = if tls { 443 } else { 80 };
    let target = if authority.starts_with('[') && authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:{default_port}")
    } else {
        authority.to_string()
    };
    let addr = target
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("cannot resolve {authority}")))?;
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = format!("{method} {prefix}{path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let raw = if tls {
        let name = rustls::pki_types::ServerName::try_from(host_of(authority).to_string())
            .map_err(|e| bad(format!("{authority}: {e}")))?;
        let conn =
            rustls::ClientConnection::new(tls_config(ca_file)?, name).map_err(|e| bad(e.to_string()))?;
        let mut t = rustls::StreamOwned::new(conn, s);
        t.write_all(req.as_bytes())?;
        t.write_all(body)?;
        read_all(&mut t)?
    } else {
        let mut s = s;
        s.write_all(req.as_bytes())?;
        s.write_all(body)?;
        read_all(&mut s)?
    };
    parse_response(&raw)
}

/// Parses a whole HTTP/1.1 response (status line, headers, `Content-Length` or chunked body).
pub fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no header end"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("non-UTF-8 header"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body)?;
    } else if let Some(n) =
        headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok())
    {
        body.truncate(n);
    }
    Ok(HttpResponse { status, headers, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_and_chunks() {
        assert_eq!(split_base("http://127.0.0.1:7880").unwrap(), (false, "127.0.0.1:7880", ""));
        assert_eq!(split_base("http://h:1/api/").unwrap(), (false, "h:1", "/api"));
        assert_eq!(split_base("https://relay.example.com/v1").unwrap(), (true, "relay.example.com", "/v1"));
        assert!(split_base("ftp://h").is_err());
        assert_eq!(host_of("[::1]:443"), "::1");
        assert_eq!(host_of("relay.example.com:7880"), "relay.example.com");
        assert_eq!(host_of("relay.example.com"), "relay.example.com");
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(), b"abcde");
        assert!(dechunk(b"5\r\nab").is_err());
    }
}
