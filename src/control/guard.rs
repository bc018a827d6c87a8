//! Who an API request is from, and the limits that apply to it.
//!
//! - **Client IP**: the TCP peer, unless the peer is a configured trusted proxy; then the last
//!   address of `X-Forwarded-For` that is not itself a trusted proxy. A header from anyone else is
//!   ignored, so it cannot be used to spread one client over many budgets.
//! - **Authentication**: with static tokens or JWT configured, a request needs a static token
//!   (compared in constant time) or a player JWT that verifies ([`super::jwt`]); anonymous
//!   requests pass only when the operator allowed them (`api_anonymous`, or no authentication
//!   configured on a loopback listener). Failed authentications are budgeted per client IP; once
//!   spent, further requests from that IP get 429 before their token is even looked at.
//! - **Tenant**: a static token's (`TOKEN#project/environment`), a JWT's claims, or the default
//!   tenant for anonymous callers; allocations and join codes are scoped to it.
//! - **Request rate**: per player (the JWT's subject) when there is one, else per client IP;
//!   and per static token.
//! - **Failed joins** (checked by the join handler): a request that presents a valid static
//!   token spends that token's own budget; a player with a subject spends the subject's budget
//!   and the global one; anonymous requests spend their IP's budget and the global one. A game backend that joins for everyone with its token is therefore
//!   never refused because of someone else's flood of bad codes. A request whose budget is spent
//!   is refused whatever its code, so whether a code exists is never learnable past the limits.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::api::{problem, too_many, ApiState};
use super::ratelimit::KeyedLimiter;
use crate::clock::Millis;
use crate::core::{canonical_ip, Cidr};

/// Rate limit table sizes (keys beyond these evict the least recently used).
const MAX_KEYS: usize = 100_000;

/// API limits, from the configuration.
#[derive(Clone, Debug)]
pub struct ApiLimits {
    /// Static tokens: `TOKEN` or `TOKEN#project/environment`.
    pub tokens: Vec<String>,
    /// Player token verification, when configured.
    pub jwt: Option<super::jwt::JwtVerifier>,
    /// Anonymous callers are served (loopback without authentication, or `api_anonymous`).
    pub anonymous: bool,
    pub requests_per_sec: u32,
    pub join_failures_per_ip_per_min: u32,
    pub join_failures_global_per_sec: u32,
    pub join_failures_per_token_per_min: u32,
    pub auth_failures_per_ip_per_min: u32,
    pub trusted_proxies: Vec<Cidr>,
    /// A request body must arrive completely within this long.
    pub body_timeout: std::time::Duration,
}

/// The budgets of every client, behind one lock of the control plane (never the packet path).
pub(crate) struct Limiters {
    per_ip: KeyedLimiter<IpAddr>,
    per_token: KeyedLimiter<Arc<str>>,
    auth_fail_ip: KeyedLimiter<IpAddr>,
    join_fail_ip: KeyedLimiter<IpAddr>,
    join_fail_global: KeyedLimiter<()>,
    join_fail_token: KeyedLimiter<Arc<str>>,
    join_fail_subject: KeyedLimiter<Arc<str>>,
}

fn per_min<K: std::hash::Hash + Eq + Clone>(n: u32) -> KeyedLimiter<K> {
    KeyedLimiter::new(n as f64, 60_000.0, n as f64, MAX_KEYS)
}

impl Limiters {
    pub fn new(l: &ApiLimits) -> Self {
        let rps = l.requests_per_sec as f64;
        Self {
            per_ip: KeyedLimiter::new(rps, 1000.0, rps * 2.0, MAX_KEYS),
            per_token: KeyedLimiter::new(rps, 1000.0, rps * 2.0, MAX_KEYS),
            auth_fail_ip: per_min(l.auth_failures_per_ip_per_min),
            join_fail_ip: per_min(l.join_failures_per_ip_per_min),
            join_fail_global: KeyedLimiter::new(
                l.join_failures_global_per_sec as f64,
                1000.0,
                l.join_failures_global_per_sec as f64,
                1,
            ),
            join_fail_token: per_min(l.join_failures_per_token_per_min),
            join_fail_subject: per_min(l.join_failures_per_ip_per_min),
        }
    }

    /// Seconds until `caller` may try a join again, or `None` when its failed-join budget allows
    /// one now.
    pub fn join_blocked(&mut self, caller: &Caller, now: Millis) -> Option<u64> {
        if let Some(t) = &caller.token {
            return (!self.join_fail_token.has(t, now))
                .then(|| self.join_fail_token.retry_after_secs(t, now));
        }
        let own = match &caller.subject {
            Some(s) => {
                (!self.join_fail_subject.has(s, now)).then(|| self.join_fail_subject.retry_after_secs(s, now))
            }
            None => (!self.join_fail_ip.has(&caller.ip, now))
                .then(|| self.join_fail_ip.retry_after_secs(&caller.ip, now)),
        };
        let global =
            (!self.join_fail_global.has(&(), now)).then(|| self.join_fail_global.retry_after_secs(&(), now));
        match (own, global) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0).max(b.unwrap_or(0))),
        }
    }

    /// Spends one failed join from `caller`'s budget.
    pub fn join_failed(&mut self, caller: &Caller, now: Millis) {
        match (&caller.token, &caller.subject) {
            (Some(t), _) => {
                self.join_fail_token.take(t, now);
            }
            (None, Some(s)) => {
                self.join_fail_subject.take(s, now);
                self.join_fail_global.take(&(), now);
            }
            (None, None) => {
                self.join_fail_ip.take(&caller.ip, now);
                self.join_fail_global.take(&(), now);
            }
        }
    }
}

/// Who a request is from: the client IP (after trusted proxies) and the valid token it presented.
#[derive(Clone, Debug)]
pub struct Caller {
    pub ip: IpAddr,
    /// The static token presented, when it was one.
    pub token: Option<Arc<str>>,
    /// The player (tenant-qualified JWT subject), when the token named one.
    pub subject: Option<Arc<str>>,
    pub tenant: super::jwt::Tenant,
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the last
/// `X-Forwarded-For` address that is not a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(canonical_ip(ip)));
    let peer = canonical_ip(peer);
    if !is_trusted(peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().parse::<IpAddr>().map(canonical_ip))
        .collect::<Result<_, _>>()
        // A malformed chain cannot be trusted past the proxy that sent it.
        .unwrap_or_default();
    forwarded.into_iter().rev().find(|ip| !is_trusted(*ip)).unwrap_or(peer)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// Auth and rate limits for `/v1/*`; hands the handlers a [`Caller`].
pub async fn guard(
    State(st): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let now = st.clock.now();
    let limits = st.limits();
    let ip = client_ip(peer.ip(), req.headers(), &limits.trusted_proxies);
    let presented = bearer(req.headers()).map(str::to_string);
    let mut caller = Caller { ip, token: None, subject: None, tenant: Default::default() };
    let authenticated = !limits.tokens.is_empty() || limits.jwt.is_some();
    if authenticated && !(presented.is_none() && limits.anonymous) {
        {
            let mut l = st.limiters();
            if !l.auth_fail_ip.has(&ip, now) {
                let secs = l.auth_fail_ip.retry_after_secs(&ip, now);
                return too_many(
                    "too many failed authentications from this address; wait before trying again",
                    secs,
                );
            }
        }
        let fail = |detail: &str| {
            st.limiters().auth_fail_ip.take(&ip, now);
            problem(StatusCode::UNAUTHORIZED, 15401, "Unauthorized", detail)
        };
        let Some(t) = presented.as_deref() else { return fail("missing Authorization: Bearer token") };
        let matched = limits.tokens.iter().fold(None, |acc, entry| {
            let (k, tenant) = super::jwt::split_static_token(entry);
            if bool::from(k.as_bytes().ct_eq(t.as_bytes())) {
                Some((k, tenant))
            } else {
                acc
            }
        });
        match (matched, &limits.jwt) {
            (Some((k, tenant)), _) => {
                caller.token = Some(Arc::from(k));
                caller.tenant = tenant;
            }
            (None, Some(jwt)) => {
                let (jwt, token) = (jwt.clone(), t.to_string());
                // Verification may fetch a rotated JWKS (blocking, rate limited).
                let verified = tokio::task::spawn_blocking(move || jwt.verify(&token)).await;
                match verified {
                    Ok(Ok(player)) => {
                        caller.subject =
                            player.subject.map(|s| Arc::from(format!("{}|{}", player.tenant, s).as_str()));
                        caller.tenant = player.tenant;
                    }
                    Ok(Err(super::jwt::TokenError::NoKeys)) | Err(_) => {
                        return problem(
                            StatusCode::SERVICE_UNAVAILABLE,
                            15503,
                            "Service Unavailable",
                            super::jwt::TokenError::NoKeys.detail(),
                        )
                    }
                    Ok(Err(e)) => return fail(e.detail()),
                }
            }
            (None, None) => return fail("bearer token not accepted"),
        }
    }
    let shared = match st.service.fleet_api() {
        Some(f) => crate::fleet::limits::request(f, &caller, &limits).await.ok(),
        None => None,
    };
    let limited = if let Some(shared) = shared {
        shared
    } else {
        let mut l = st.limiters();
        let own = match &caller.subject {
            Some(s) => (!l.per_token.take(s, now)).then(|| l.per_token.retry_after_secs(s, now)),
            None => (!l.per_ip.take(&ip, now)).then(|| l.per_ip.retry_after_secs(&ip, now)),
        };
        own.or_else(|| {
            let t = caller.token.as_ref()?;
            (!l.per_token.take(t, now)).then(|| l.per_token.retry_after_secs(t, now))
        })
    };
    if let Some(secs) = limited {
        return too_many("rate limit exceeded", secs);
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn xff(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let stranger: IpAddr = "198.51.100.7".parse().unwrap();
        let h = xff("203.0.113.9, 10.0.0.5");
        assert_eq!(client_ip(proxy, &h, &trusted), "203.0.113.9".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(stranger, &h, &trusted), stranger, "an untrusted peer's header is ignored");
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
        // A client cannot hide behind an address it prepends itself: the last untrusted one counts.
        assert_eq!(
            client_ip(proxy, &xff("1.1.1.1, 203.0.113.9"), &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(proxy, &xff("garbage, 203.0.113.9"), &trusted), proxy);
        assert_eq!(client_ip(proxy, &xff("203.0.113.9"), &[]), proxy);
    }
}
