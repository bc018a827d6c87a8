//! The allocations HTTP API (`docs/api.md`) plus `/healthz`, `/readyz`, `/metrics`.
//!
//! Every failure is a problem body (`application/problem+json`) with a readable `detail`;
//! malformed input is a 4xx, never a 500.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::{to_bytes, Body};
use axum::extract::{Extension, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use super::guard::ApiLimits;
use super::guard::{guard, Caller, Limiters};
use super::http::Progress;
use super::model::*;
use super::service::{AllocationService, ServiceError};
use crate::clock::Clock;

/// Largest request body accepted.
pub const MAX_BODY: usize = 16 * 1024;

/// Requests served, by route and status.
#[derive(Default, Debug)]
pub struct ApiMetrics {
    pub requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Request durations by route.
    pub latency: Mutex<BTreeMap<String, crate::metrics::Histogram>>,
}

impl ApiMetrics {
    pub fn snapshot(&self) -> BTreeMap<(String, u16), u64> {
        self.requests.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

#[derive(Clone)]
pub struct ApiState {
    pub service: Arc<AllocationService>,
    pub metrics: Arc<ApiMetrics>,
    pub http: Arc<super::http::HttpStats>,
    limits: Arc<std::sync::RwLock<Arc<ApiLimits>>>,
    limiters: Arc<Mutex<Limiters>>,
    pub(crate) clock: Clock,
    /// The WebSocket listeners' counters.
    pub ws: Arc<crate::secure::stream::WsStats>,
    /// A fleet relay serves no allocations API, only health and metrics.
    pub relay_role: bool,
    /// A fleet relay's directory agent (for its metrics).
    pub agent: Arc<std::sync::OnceLock<Arc<crate::fleet::agent::Agent>>>,
    /// The kernel fast path's counters, when it is attached.
    pub xdp: Option<Arc<crate::xdp::Observer>>,
}

impl ApiState {
    pub fn new(service: Arc<AllocationService>, limits: ApiLimits, clock: Clock) -> Self {
        Self {
            service,
            metrics: Arc::new(ApiMetrics::default()),
            http: Arc::new(super::http::HttpStats::default()),
            limiters: Arc::new(Mutex::new(Limiters::new(&limits))),
            limits: Arc::new(std::sync::RwLock::new(Arc::new(limits))),
            clock,
            ws: Arc::new(Default::default()),
            agent: Default::default(),
            xdp: None,
            relay_role: false,
        }
    }

    /// The limits in force.
    pub(crate) fn limits(&self) -> Arc<ApiLimits> {
        self.limits.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the limits (a configuration reload). Budgets restart when their rates change.
    pub fn set_limits(&self, new: ApiLimits) {
        let old = self.limits();
        let rates_changed =
            (old.requests_per_sec, old.join_failures_per_ip_per_min, old.join_failures_global_per_sec)
                != (new.requests_per_sec, new.join_failures_per_ip_per_min, new.join_failures_global_per_sec)
                || (old.join_failures_per_token_per_min, old.auth_failures_per_ip_per_min)
                    != (new.join_failures_per_token_per_min, new.auth_failures_per_ip_per_min);
        if rates_changed {
            *self.limiters() = Limiters::new(&new);
        }
        *self.limits.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
    }

    pub(crate) fn limiters(&self) -> std::sync::MutexGuard<'_, Limiters> {
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
        ServiceError::SessionFull => problem(StatusCode::CONFLICT, 15011, "Session Full", detail),
        ServiceError::WrongKey => problem(StatusCode::FORBIDDEN, 15403, "Forbidden", detail),
        ServiceError::TenantLimit(_) => too_many(&detail, 1),
        ServiceError::Capacity
        | ServiceError::Unavailable
        | ServiceError::Draining
        | ServiceError::NoRelay(_) => {
            retry_after(problem(StatusCode::SERVICE_UNAVAILABLE, 15010, "No Suitable Relay", detail), 1)
        }
        ServiceError::StoreUnavailable(_) => {
            retry_after(problem(StatusCode::SERVICE_UNAVAILABLE, 15503, "Service Unavailable", detail), 1)
        }
        ServiceError::NotSupported(_) => {
            problem(StatusCode::NOT_IMPLEMENTED, 15501, "Not Implemented", detail)
        }
    }
}

fn retry_after(mut r: Response, secs: u64) -> Response {
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

fn ok<T: Serialize>(status: StatusCode, data: T) -> Response {
    let env = Envelope { meta: Meta { request_id: request_id(), status: status.as_u16() }, data };
    let mut r = (status, serde_json::to_string(&env).unwrap_or_default()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn too_large() -> Response {
    problem(
        StatusCode::PAYLOAD_TOO_LARGE,
        15001,
        "Payload Too Large",
        format!("request body is larger than {MAX_BODY} bytes"),
    )
}

/// 429 with `Retry-After`.
pub(crate) fn too_many(detail: &str, retry_after_secs: u64) -> Response {
    let mut r = problem(StatusCode::TOO_MANY_REQUESTS, 15429, "Too Many Requests", detail);
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs.max(1)));
    r
}

/// Reads and parses a JSON object body with a size cap and a deadline, answering every failure
/// with a 4xx problem.
async fn json_body<T: DeserializeOwned>(
    st: &ApiState,
    progress: Option<Extension<Progress>>,
    body: Body,
) -> Result<T, Response> {
    let bytes = match tokio::time::timeout(st.limits().body_timeout, to_bytes(body, MAX_BODY)).await {
        Ok(Ok(b)) => {
            if let Some(Extension(p)) = progress {
                p.request_complete();
            }
            b
        }
        Ok(Err(e)) => {
            let over =
                std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return Err(if over { too_large() } else { invalid("request body could not be read") });
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
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        let kind = match value {
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::Bool(_) => "a boolean",
            _ => "null",
        };
        return Err(invalid(format!("request body must be a JSON object, got {kind}")));
    }
    serde_json::from_value(value).map_err(|e| invalid(format!("request body is not valid: {e}")))
}

async fn allocate(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    progress: Option<Extension<Progress>>,
    body: Body,
) -> Response {
    let req: AllocateRequest = match json_body(&st, progress, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    match st.service.allocate(req.max_connections, req.region.as_deref(), &caller.tenant).await {
        Ok(a) => ok(StatusCode::CREATED, AllocateData { allocation: a }),
        Err(e) => service_problem(e),
    }
}

async fn joincode(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    progress: Option<Extension<Progress>>,
    body: Body,
) -> Response {
    let req: JoinCodeRequest = match json_body(&st, progress, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    match st.service.join_code(&req.allocation_id, &caller.tenant).await {
        Ok((code, created)) => {
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            ok(status, JoinCodeData { join_code: code })
        }
        Err(e) => service_problem(e),
    }
}

async fn join(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    progress: Option<Extension<Progress>>,
    body: Body,
) -> Response {
    let req: JoinRequest = match json_body(&st, progress, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let now = st.clock.now();
    let limits = st.limits();
    let fleet = st.service.fleet_api();
    let shared = match fleet {
        Some(f) => crate::fleet::limits::join_blocked(f, &caller, &limits).await.ok(),
        None => None,
    };
    let blocked = match shared {
        Some(b) => b,
        None => st.limiters().join_blocked(&caller, now),
    };
    if let Some(secs) = blocked {
        return too_many("too many failed joins; wait before trying again", secs);
    }
    let failed = |st: &ApiState| {
        let (st, caller, limits) = (st.clone(), caller.clone(), limits.clone());
        async move {
            let shared = match st.service.fleet_api() {
                Some(f) => crate::fleet::limits::join_failed(f, &caller, &limits).await.is_ok(),
                None => false,
            };
            if !shared {
                st.limiters().join_failed(&caller, st.clock.now());
            }
        }
    };
    if super::joincode::normalize(&req.join_code).is_none() {
        failed(&st).await;
        return invalid(format!(
            "joinCode must be 6 to 12 characters of {}",
            std::str::from_utf8(super::joincode::ALPHABET).unwrap_or_default()
        ));
    }
    match st.service.join(&req.join_code, &caller.tenant).await {
        Ok(a) => ok(StatusCode::OK, JoinData { allocation: a }),
        Err(e) => {
            if e == ServiceError::JoinCodeNotFound {
                failed(&st).await;
            }
            service_problem(e)
        }
    }
}

async fn remove_joiners(
    State(st): State<ApiState>,
    Extension(caller): Extension<Caller>,
    progress: Option<Extension<Progress>>,
    body: Body,
) -> Response {
    let req: RemoveJoinersRequest = match json_body(&st, progress, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    match st
        .service
        .remove_joiners(&req.allocation_id, &req.key, req.joiner_allocation_id.as_deref(), &caller.tenant)
        .await
    {
        Ok(removed) => ok(StatusCode::OK, RemoveJoinersData { removed }),
        Err(e) => service_problem(e),
    }
}

async fn regions(State(st): State<ApiState>) -> Response {
    let c = st.service.config();
    if let Some(f) = st.service.fleet_api() {
        let regions = f
            .config()
            .regions
            .iter()
            .map(|r| Region { id: r.clone(), description: format!("Ferry relays ({r})") })
            .collect();
        return ok(StatusCode::OK, RegionsData { regions });
    }
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

/// QoS discovery in Unity's shape: the relays (here, this one) a client can ping to choose a
/// region. `service` must be `relay` when given; a `region` other than this relay's lists none.
async fn qos_servers(
    State(st): State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let c = st.service.config();
    if let Some(s) = q.get("service").filter(|s| s.as_str() != "relay") {
        return problem(
            StatusCode::BAD_REQUEST,
            15001,
            "Invalid Request",
            format!("service must be `relay`, got `{s}`"),
        );
    }
    if let Some(f) = st.service.fleet_api() {
        return ok(
            StatusCode::OK,
            QosServersData { servers: f.qos_servers(q.get("region").map(|s| s.as_str())) },
        );
    }
    let endpoint = match c.advertise.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, c.port).to_string(),
        Err(_) => format!("{}:{}", c.advertise_ipv4, c.port),
    };
    let servers = if q.get("region").is_none_or(|r| *r == c.region) {
        vec![QosServer {
            region: c.region.clone(),
            endpoints: vec![endpoint],
            services: vec!["relay".into()],
        }]
    } else {
        Vec::new()
    };
    ok(StatusCode::OK, QosServersData { servers })
}

/// Liveness of the control plane itself: the service's state can be locked and every shard
/// answers, each within a deadline. A control plane stuck behind a blocked lock or dead shards
/// answers 503 (or not at all) instead of a cheerful 200.
async fn healthz(State(st): State<ApiState>) -> Response {
    let svc = st.service.clone();
    let lock = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        tokio::task::spawn_blocking(move || svc.hosts()),
    )
    .await;
    if !matches!(lock, Ok(Ok(_))) {
        return (StatusCode::SERVICE_UNAVAILABLE, "control plane stalled: allocation state is locked\n")
            .into_response();
    }
    let n = st.service.relay().shard_count();
    match tokio::time::timeout(std::time::Duration::from_secs(2), st.service.relay().stats()).await {
        Ok(s) if s.len() == n => (StatusCode::OK, "ok\n").into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "relay shards not answering\n").into_response(),
    }
}

async fn readyz(State(st): State<ApiState>) -> Response {
    if st.service.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    if let Some(f) = st.service.fleet_api() {
        return match f.ready() {
            true => (StatusCode::OK, "ready\n").into_response(),
            false => (StatusCode::SERVICE_UNAVAILABLE, "fleet directory not read recently\n").into_response(),
        };
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
    let mut text = crate::metrics::render(&shards, &st.metrics.snapshot(), st.service.hosts());
    let h = &st.http;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    text.push_str(&crate::metrics::render_control(&crate::metrics::ControlPlane {
        api_connections_accepted: get(&h.accepted),
        api_connections_refused_per_ip: get(&h.refused_per_source),
        api_connections_refused_full: get(&h.refused_full),
        api_connections_shed: get(&h.shed),
        api_accept_errors: get(&h.accept_errors),
        api_max_connections: get(&h.max_connections),
        log_lines_dropped: crate::logging::dropped_lines(),
        log_output_stalled: crate::logging::output_stalled(),
    }));
    text.push_str(&crate::metrics::render_ws(&st.ws, &shards));
    text.push_str(&crate::metrics::render_tenants(&st.service.tenant_counts()));
    let latency = st.metrics.latency.lock().map(|m| m.clone()).unwrap_or_default();
    text.push_str(&crate::metrics::render_latency("ferry_api_request_duration_seconds", "route", &latency));
    if let Some(f) = st.service.fleet_api() {
        f.render(&mut text);
    }
    if let Some(x) = &st.xdp {
        x.render(&mut text);
    }
    if let Some(a) = st.agent.get() {
        a.render(&mut text);
        crate::fleet::store::render(&mut text, &a.store_stats());
    }
    let mut r = (StatusCode::OK, text).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}

async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    problem(StatusCode::NOT_FOUND, 15001, "Not Found", format!("no route for {method} {}", uri.path()))
}

/// Refuses a declared body over the cap before reading any of it.
async fn refuse_oversize(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        let mut r = too_large();
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    next.run(req).await
}

/// Counts every request by matched route and status.
async fn count(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map_or_else(|| "other".to_string(), |m| m.as_str().to_string());
    let started = st.clock.nanos();
    let r = next.run(req).await;
    let secs = (st.clock.nanos() - started) as f64 / 1e9;
    if let Ok(mut m) = st.metrics.latency.lock() {
        m.entry(route.clone()).or_default().observe(secs);
    }
    if let Ok(mut m) = st.metrics.requests.lock() {
        *m.entry((route, r.status().as_u16())).or_insert(0) += 1;
    }
    r
}

/// The whole API router.
pub fn router(st: ApiState) -> Router {
    let v1 = if st.relay_role {
        Router::new().route(
            "/v1/*rest",
            axum::routing::any(|| async {
                problem(
                    StatusCode::NOT_FOUND,
                    15001,
                    "Not Found",
                    "this is a fleet relay: the allocations API is served by `ferry api` instances",
                )
            }),
        )
    } else {
        Router::new()
            .route("/v1/allocate", post(allocate))
            .route("/v1/joincode", post(joincode))
            .route("/v1/join", post(join))
            .route("/v1/removejoiners", post(remove_joiners))
            .route("/v1/regions", get(regions))
            .route("/v1/servers", get(qos_servers))
            .route_layer(middleware::from_fn_with_state(st.clone(), guard))
    };
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
        .layer(middleware::from_fn(refuse_oversize))
        .layer(middleware::from_fn_with_state(st.clone(), count))
        .with_state(st)
}
