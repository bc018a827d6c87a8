//! A blocking GET for the control plane's own needs (a JWKS), through the SDK's HTTP(S) client:
//! `https://` trusts Mozilla's roots or a CA bundle the operator names. Anything but a 200, or a
//! body over [`MAX_BODY`], is an error.

use std::path::Path;
use std::time::Duration;

/// Largest body accepted.
pub const MAX_BODY: usize = 1 << 20;

/// GETs `url` (http or https) and returns the body of a 200 answer.
pub fn get(url: &str, ca_file: Option<&Path>) -> Result<Vec<u8>, String> {
    let scheme_end = url.find("://").map(|i| i + 3).ok_or_else(|| format!("{url}: not a URL"))?;
    let (base, path) = match url[scheme_end..].find('/') {
        Some(i) => (&url[..scheme_end + i], &url[scheme_end + i..]),
        None => (url, "/"),
    };
    let r = crate::client::http::request_with(base, "GET", path, None, None, Duration::from_secs(5), ca_file)
        .map_err(|e| format!("{url}: {e}"))?;
    if r.status != 200 {
        return Err(format!("{url}: HTTP {}", r.status));
    }
    if r.body.len() > MAX_BODY {
        return Err(format!("{url}: answer larger than {MAX_BODY} bytes"));
    }
    Ok(r.body)
}
