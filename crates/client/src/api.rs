//! Allocations API client: allocate, join code, join, regions.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::http;
use crate::model::{
    AllocateData, AllocateRequest, Envelope, JoinCodeData, JoinCodeRequest, JoinData, JoinRequest,
    RegionsData,
};
pub use crate::model::{Allocation, JoinAllocation, Problem, Region};

#[derive(Debug)]
pub enum ApiError {
    Io(std::io::Error),
    /// The API answered with a problem body.
    Problem(Problem),
    /// The API answered 429: this client is rate limited and may try again after this long.
    RateLimited {
        retry_after: Duration,
        problem: Problem,
    },
    /// The answer was not what the API promises.
    Decode(String),
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "API request failed: {e}"),
            Self::Problem(p) => write!(f, "API error {} ({}): {}", p.status, p.code, p.detail),
            Self::RateLimited { retry_after, problem } => write!(
                f,
                "API rate limited this client ({}); retry after {} s",
                problem.detail,
                retry_after.as_secs()
            ),
            Self::Decode(m) => write!(f, "unexpected API answer: {m}"),
        }
    }
}

impl std::error::Error for ApiError {}

/// A client of one allocations API.
#[derive(Clone, Debug)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    timeout: Duration,
    ca_file: Option<std::path::PathBuf>,
}

impl ApiClient {
    /// `base` like `http://127.0.0.1:7880`.
    pub fn new(base: impl Into<String>) -> Self {
        Self { base: base.into(), token: None, timeout: Duration::from_secs(10), ca_file: None }
    }

    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Trusts the certificates in this PEM file for an `https://` API instead of the built-in
    /// roots (a private CA, or a self-signed certificate in development).
    pub fn with_ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Sends a raw request (for callers testing the API itself).
    pub fn raw(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<http::HttpResponse, ApiError> {
        http::request_with(
            &self.base,
            method,
            path,
            body,
            self.token.as_deref(),
            self.timeout,
            self.ca_file.as_deref(),
        )
        .map_err(ApiError::Io)
    }

    fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<(u16, T), ApiError> {
        let body =
            body.map(|b| serde_json::to_vec(b)).transpose().map_err(|e| ApiError::Decode(e.to_string()))?;
        let r = self.raw(method, path, body.as_deref())?;
        let (status, bytes) = (r.status, r.body.clone());
        if (200..300).contains(&status) {
            let env: Envelope<T> =
                serde_json::from_slice(&bytes).map_err(|e| ApiError::Decode(e.to_string()))?;
            Ok((status, env.data))
        } else {
            let p: Problem = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::Decode(format!("status {status}, body not a problem: {e}")))?;
            if status == 429 {
                let secs = r.header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(1);
                return Err(ApiError::RateLimited {
                    retry_after: Duration::from_secs(secs.max(1)),
                    problem: p,
                });
            }
            Err(ApiError::Problem(p))
        }
    }

    /// A host allocation for up to `max_connections` peers.
    pub fn allocate(&self, max_connections: u32, region: Option<&str>) -> Result<Allocation, ApiError> {
        let req =
            AllocateRequest { max_connections: max_connections as i64, region: region.map(str::to_string) };
        self.call::<_, AllocateData>("POST", "/v1/allocate", Some(&req)).map(|(_, d)| d.allocation)
    }

    /// The host allocation's join code (created on first call).
    pub fn join_code(&self, allocation_id: &str) -> Result<String, ApiError> {
        let req = JoinCodeRequest { allocation_id: allocation_id.to_string() };
        self.call::<_, JoinCodeData>("POST", "/v1/joincode", Some(&req)).map(|(_, d)| d.join_code)
    }

    /// A joiner allocation in the session of the join code's host.
    pub fn join(&self, join_code: &str) -> Result<JoinAllocation, ApiError> {
        let req = JoinRequest { join_code: join_code.to_string() };
        self.call::<_, JoinData>("POST", "/v1/join", Some(&req)).map(|(_, d)| d.allocation)
    }

    pub fn regions(&self) -> Result<Vec<Region>, ApiError> {
        self.call::<(), RegionsData>("GET", "/v1/regions", None).map(|(_, d)| d.regions)
    }
}
