//! The allocations HTTP API (`spec/allocations-api.md`) plus `/healthz`, `/readyz`, `/metrics`.
//!
//! Every failure is a problem body (`application/problem+json`) with a readable `detail`;
//! malformed input is a 4xx, never a 500.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::body::{to_bytes, Body};
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;
use subtle::ConstantTimeEq;

use super::model::*;
use super::ratelimit::KeyedLimiter;
use super::service::{AllocationService, ServiceError};
use crate::clock::Clock;

/// Largest request body accepted.
pub const MAX_BODY: usize = 16 * 1024;

/// Requests served, by route and status.
#[derive(Default, Debug)]
pub struct ApiMetrics {
    pub requests: Mutex<BTreeMap<(String, u16), u64>>,
}

impl ApiMetrics {
    pub fn snapshot(&self) -> BTreeMap<(String, u16), u64> {
        self.requests.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// API limits, from the configuration.
#[derive(Clone, Debug)]
pub struct ApiLimits {
    pub tokens: Vec<String>,
    pub requests_per_sec: u32,
    pub join_failures_per_ip_per_min: u32,
    pub join_failures_global_per_sec: u32,
    /// A request body must arrive completely within this long.
    pub body_timeout: std::time::Duration,
}

struct Limiters {
    per_ip: KeyedLimiter<IpAddr>,
    per_token: KeyedLimiter<String>,
    join_fail_ip: KeyedLimiter<IpAddr>,
    join_fail_global: KeyedLimiter<()>,
}

#[derive(Clone)]
pub struct ApiState {
    pub service: Arc<AllocationService>,
    pub metrics: Arc<ApiMetrics>,
    pub http: Arc<super::http::HttpStats>,
    limits: Arc<ApiLimits>,
    limiters: Arc<Mutex<Limiters>>,
    clock: Clock,
}

impl ApiState {
    pub fn new(service: Arc<AllocationService>, limits: ApiLimits, clock: Clock) -> Self {
        let rps = limits.requests_per_sec as f64;
        let limiters = Limiters {
            per_ip: KeyedLimiter::new(rps, 1000.0, rps * 2.0, 100_000),
            per_token: KeyedLimiter::new(rps, 1000.0, rps * 2.0, 100_000),
            join_fail_ip: KeyedLimiter::new(
                limits.join_failures_per_ip_per_min as f64,
                60_000.0,
                limits.join_failures_per_ip_per_min as f64,
                100_000,
            ),
            join_fail_global: KeyedLimiter::new(
                limits.join_failures_global_per_sec as f64,
                1000.0,
                limits.join_failures_global_per_sec as f64,
                1,
            ),
        };
        Self {
            service,
            metrics: Arc::new(ApiMetrics::default()),
            http: Arc::new(super::http::HttpStats::default()),
            limits: Arc::new(limits),
            limiters: Arc::new(Mutex::new(limiters)),
            clock,
        }
    }

    fn limiters(&self) -> std::sync::MutexGuard<'_, Limiters> {
        self.limiters.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A problem response.
pub fn problem(status: StatusCode, code: u32, title: &str, detail: impl Into<String>) -> Response {
    let body = Problem {
        status: status.as_u16(),
        title: title.into(),
        detail: detail.into(),
        kind: format!("https://ferry.dev/problems/{code}"),
        code,
        details: Vec::new(),
    };
    let mut r = (status, serde_json::to_string(&body).unwrap_or_default()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    r
}

fn invalid(detail: impl Into<String>) -> Response {
    problem(StatusCode::BAD_REQUEST, 15001, "Invalid Request", detail)
}

fn service_problem(e: ServiceError) -> Response {
    let detail = e.to_string();
    match e {
        ServiceError::Invalid(_) => invalid(detail),
        ServiceError::RegionNotFound(_) => problem(StatusCode::NOT_FOUND, 15007, "Region Not Found", detail),
        ServiceError::AllocationNotFound => {
            problem(StatusCode::NOT_FOUND, 15008, "Allocation Not Found", detail)
        }
        ServiceError::JoinCodeNotFound => {
            problem(StatusCode::NOT_FOUND, 15009, "Join Code Not Found", detail)
        }
        ServiceError::Capacity | ServiceError::Unavailable | ServiceError::Draining => {
            problem(StatusCode::SERVICE_UNAVAILABLE, 15010, "No Suitable Relay", detail)
        }
    }
}

fn ok<T: Serialize>(status: StatusCode, data: T) -> Response {
    let env = Envelope { meta: Meta { request_id: request_id(), status: status.as_u16() }, data };
    let mut r = (status, serde_json::to_string(&env).unwrap_or_default()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Reads and parses a JSON body with a size cap and a deadline, answering every failure with a
/// 4xx problem.
async fn json_body<T: DeserializeOwned>(st: &ApiState, body: Body) -> Result<T, Response> {
    let bytes = match tokio::time::timeout(st.limits.body_timeout, to_bytes(body, MAX_BODY)).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return Err(invalid(format!("request body is larger than {MAX_BODY} bytes or could not be read")))
        }
        Err(_) => {
            return Err(problem(
                StatusCode::REQUEST_TIMEOUT,
                15001,
                "Request Timeout",
                "request body arrived too slowly",
            ))
        }
    };
    if bytes.is_empty() {
        return Err(invalid("request body is empty; expected a JSON object"));
    }
    serde_json::from_slice(&bytes).map_err(|e| invalid(format!("request body is not valid: {e}")))
}

async fn allocate(State(st): State<ApiState>, body: Body) -> Response {
    let req: AllocateRequest = match json_body(&st, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    match st.service.allocate(req.max_connections, req.region.as_deref()).await {
        Ok(a) => ok(StatusCode::CREATED, AllocateData { allocation: a }),
        Err(e) => service_problem(e),
    }
}

async fn joincode(State(st): State<ApiState>, body: Body) -> Response {
    let req: JoinCodeRequest = match json_body(&st, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    match st.service.join_code(&req.allocation_id) {
        Ok((code, created)) => {
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            ok(status, JoinCodeData { join_code: code })
        }
        Err(e) => service_problem(e),
    }
}

async fn join(
    State(st): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Body,
) -> Response {
    let req: JoinRequest = match json_body(&st, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let now = st.clock.now();
    let ip = peer.ip();
    {
        let mut l = st.limiters();
        if !l.join_fail_ip.has(&ip, now) || !l.join_fail_global.has(&(), now) {
            return problem(
                StatusCode::TOO_MANY_REQUESTS,
                15429,
                "Too Many Requests",
                "too many failed joins; wait before trying again",
            );
        }
    }
    if super::joincode::normalize(&req.join_code).is_none() {
        st.limiters().join_fail_ip.take(&ip, now);
        return invalid(format!(
            "joinCode must be 6 to 12 characters of {}",
            std::str::from_utf8(super::joincode::ALPHABET).unwrap_or_default()
        ));
    }
    match st.service.join(&req.join_code).await {
        Ok(a) => ok(StatusCode::OK, JoinData { allocation: a }),
        Err(e) => {
            if e == ServiceError::JoinCodeNotFound {
                let mut l = st.limiters();
                l.join_fail_ip.take(&ip, now);
                l.join_fail_global.take(&(), now);
            }
            service_problem(e)
        }
    }
}

async fn regions(State(st): State<ApiState>) -> Response {
    let c = st.service.config();
    ok(
        StatusCode::OK,
        RegionsData {
            regions: vec![Region {
                id: c.region.clone(),
                description: format!("Ferry relay ({})", c.region),
            }],
        },
    )
}

async fn healthz() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

async fn readyz(State(st): State<ApiState>) -> Response {
    if st.service.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    let n = st.service.relay().shard_count();
    if st.service.relay().stats().await.len() == n {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "relay shards not answering\n").into_response()
    }
}

async fn metrics(State(st): State<ApiState>) -> Response {
    let shards = st.service.relay().stats().await;
    let text = crate::metrics::render(&shards, &st.metrics.snapshot(), st.service.hosts());
    let mut r = (StatusCode::OK, text).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}

async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    problem(StatusCode::NOT_FOUND, 15001, "Not Found", format!("no route for {method} {}", uri.path()))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// Auth and rate limits for `/v1/*`.
async fn guard(
    State(st): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let now = st.clock.now();
    let token = bearer(req.headers()).map(str::to_string);
    if !st.limits.tokens.is_empty() {
        let valid = token.as_deref().is_some_and(|t| {
            st.limits.tokens.iter().fold(false, |acc, k| acc | bool::from(k.as_bytes().ct_eq(t.as_bytes())))
        });
        if !valid {
            let detail = if token.is_some() {
                "bearer token not accepted"
            } else {
                "missing Authorization: Bearer token"
            };
            return problem(StatusCode::UNAUTHORIZED, 15401, "Unauthorized", detail);
        }
    }
    let limited = {
        let mut l = st.limiters();
        let ip = peer.ip();
        if !l.per_ip.take(&ip, now) {
            Some(l.per_ip.retry_after_secs(&ip, now))
        } else if let Some(t) = token.as_ref().filter(|_| !st.limits.tokens.is_empty()) {
            (!l.per_token.take(t, now)).then(|| l.per_token.retry_after_secs(t, now))
        } else {
            None
        }
    };
    if let Some(secs) = limited {
        let mut r = problem(StatusCode::TOO_MANY_REQUESTS, 15429, "Too Many Requests", "rate limit exceeded");
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return r;
    }
    next.run(req).await
}

/// Counts every request by matched route and status.
async fn count(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map_or_else(|| "other".to_string(), |m| m.as_str().to_string());
    let r = next.run(req).await;
    if let Ok(mut m) = st.metrics.requests.lock() {
        *m.entry((route, r.status().as_u16())).or_insert(0) += 1;
    }
    r
}

/// The whole API router.
pub fn router(st: ApiState) -> Router {
    let v1 = Router::new()
        .route("/v1/allocate", post(allocate))
        .route("/v1/joincode", post(joincode))
        .route("/v1/join", post(join))
        .route("/v1/regions", get(regions))
        .route_layer(middleware::from_fn_with_state(st.clone(), guard));
    Router::new()
        .merge(v1)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(|method: Method, uri: axum::http::Uri| async move {
            problem(
                StatusCode::METHOD_NOT_ALLOWED,
                15001,
                "Method Not Allowed",
                format!("{method} is not allowed on {}", uri.path()),
            )
        })
        .layer(middleware::from_fn_with_state(st.clone(), count))
        .with_state(st)
}
