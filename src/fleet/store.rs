//! The connection to the fleet directory: Redis or Valkey (`redis://`, `rediss://` for TLS, or
//! `redis+sentinel://host:port[,host:port…]/master` through Sentinel).
//!
//! Every operation has a deadline, so a stopped or partitioned directory gives callers an error
//! within `store_timeout`, never a hang. A failed connection is dropped and the next operation
//! connects afresh (through Sentinel, to whichever server is primary then).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};

/// Why a directory operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fleet directory unavailable: {}", self.0)
    }
}

impl std::error::Error for StoreError {}

enum Target {
    Direct(Client),
    Sentinel { nodes: Vec<String>, master: String },
}

/// Counts and latency of directory operations, by operation.
#[derive(Default, Debug, Clone)]
pub struct OpStats {
    pub count: u64,
    pub errors: u64,
    pub seconds: f64,
}

pub struct Store {
    target: Target,
    url: String,
    timeout: Duration,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    stats: Mutex<BTreeMap<&'static str, OpStats>>,
    clock: crate::clock::Clock,
}

impl Store {
    /// Parses the URL (no connection is made until the first operation).
    pub fn open(url: &str, timeout: Duration) -> Result<Self, String> {
        let target = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            let (hosts, master) = rest
                .split_once('/')
                .ok_or("a Sentinel URL is redis+sentinel://host:port[,host:port…]/MASTER_NAME")?;
            if master.is_empty() || hosts.is_empty() {
                return Err("a Sentinel URL is redis+sentinel://host:port[,host:port…]/MASTER_NAME".into());
            }
            Target::Sentinel {
                nodes: hosts.split(',').map(|h| format!("redis://{h}")).collect(),
                master: master.trim_end_matches('/').to_string(),
            }
        } else if url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://") {
            Target::Direct(Client::open(url).map_err(|e| format!("`{url}`: {e}"))?)
        } else {
            return Err(format!("`{url}` is not a redis://, rediss://, unix:// or redis+sentinel:// URL"));
        };
        Ok(Self {
            target,
            url: redact(url),
            timeout,
            conn: tokio::sync::Mutex::new(None),
            stats: Mutex::new(BTreeMap::new()),
            clock: crate::clock::Clock::new(),
        })
    }

    /// Verifies a `rediss://` server against the CA certificates in this PEM file instead of the
    /// system's roots (a private CA).
    pub fn with_ca_file(mut self, path: &std::path::Path) -> Result<Self, String> {
        let Target::Direct(c) = &self.target else {
            return Err("a CA file applies to a rediss:// URL".into());
        };
        let info = c.get_connection_info().clone();
        if !matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            return Err("a CA file applies to a rediss:// URL".into());
        }
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(pem) };
        self.target = Target::Direct(redis::Client::build_with_tls(info, certs).map_err(|e| e.to_string())?);
        Ok(self)
    }

    /// The URL with any password hidden (for logs).
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn connect(&self) -> Result<MultiplexedConnection, StoreError> {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let client = match &self.target {
            Target::Direct(c) => c.clone(),
            Target::Sentinel { nodes, master } => {
                let mut s = redis::sentinel::SentinelClient::build(
                    nodes.clone(),
                    master.clone(),
                    None,
                    redis::sentinel::SentinelServerType::Master,
                )
                .map_err(|e| StoreError(e.to_string()))?;
                tokio::time::timeout(self.timeout, s.async_get_client())
                    .await
                    .map_err(|_| StoreError("Sentinel did not answer in time".into()))?
                    .map_err(|e| StoreError(e.to_string()))?
            }
        };
        tokio::time::timeout(self.timeout, client.get_multiplexed_async_connection_with_config(&cfg))
            .await
            .map_err(|_| StoreError("connect timed out".into()))?
            .map_err(|e| StoreError(e.to_string()))
    }

    /// A connection (shared by concurrent operations; made if there is none).
    async fn conn(&self) -> Result<MultiplexedConnection, StoreError> {
        let mut g = tokio::time::timeout(self.timeout, self.conn.lock())
            .await
            .map_err(|_| StoreError("connect timed out".into()))?;
        if let Some(c) = g.as_ref() {
            return Ok(c.clone());
        }
        let c = self.connect().await?;
        *g = Some(c.clone());
        Ok(c)
    }

    async fn forget(&self) {
        *self.conn.lock().await = None;
    }

    /// Runs `cmd` (a command or a pipeline) within the deadline, counted under `op`.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: impl Query,
    ) -> Result<T, StoreError> {
        let t0 = self.clock.nanos();
        let r = async {
            let mut c = self.conn().await?;
            match tokio::time::timeout(self.timeout, cmd.run::<T>(&mut c)).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => {
                    let io = e.is_io_error() || e.is_connection_dropped() || e.is_timeout();
                    if io {
                        self.forget().await;
                    }
                    Err(StoreError(e.to_string()))
                }
                Err(_) => {
                    self.forget().await;
                    Err(StoreError("no answer in time".into()))
                }
            }
        }
        .await;
        let secs = (self.clock.nanos() - t0) as f64 / 1e9;
        if let Ok(mut m) = self.stats.lock() {
            let s = m.entry(op).or_default();
            s.count += 1;
            s.seconds += secs;
            if r.is_err() {
                s.errors += 1;
            }
        }
        r
    }

    pub fn stats(&self) -> BTreeMap<&'static str, OpStats> {
        self.stats.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// A command or a pipeline.
pub trait Query: Send {
    fn run<T: redis::FromRedisValue>(
        self,
        c: &mut MultiplexedConnection,
    ) -> impl std::future::Future<Output = redis::RedisResult<T>> + Send;
}

impl Query for redis::Cmd {
    async fn run<T: redis::FromRedisValue>(self, c: &mut MultiplexedConnection) -> redis::RedisResult<T> {
        self.query_async(c).await
    }
}

impl Query for redis::Pipeline {
    async fn run<T: redis::FromRedisValue>(self, c: &mut MultiplexedConnection) -> redis::RedisResult<T> {
        self.query_async(c).await
    }
}

/// Opens `url`, with `ca` (PEM) as the roots for a `rediss://` server when given.
pub fn open(url: &str, timeout: Duration, ca: Option<&std::path::Path>) -> Result<Store, String> {
    let s = Store::open(url, timeout).map_err(|m| format!("store: {m}"))?;
    match ca {
        Some(ca) => s.with_ca_file(ca).map_err(|m| format!("store_ca_file: {m}")),
        None => Ok(s),
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// Renders directory operation metrics (`ferry_store_*`).
pub fn render(o: &mut String, stats: &BTreeMap<&'static str, OpStats>) {
    use std::fmt::Write;
    let _ = writeln!(o, "# HELP ferry_store_ops_total Fleet directory operations, by operation.");
    let _ = writeln!(o, "# TYPE ferry_store_ops_total counter");
    for (op, s) in stats {
        let _ = writeln!(o, "ferry_store_ops_total{{op=\"{op}\"}} {}", s.count);
    }
    let _ =
        writeln!(o, "# HELP ferry_store_errors_total Fleet directory operations that failed or timed out.");
    let _ = writeln!(o, "# TYPE ferry_store_errors_total counter");
    for (op, s) in stats {
        let _ = writeln!(o, "ferry_store_errors_total{{op=\"{op}\"}} {}", s.errors);
    }
    let _ = writeln!(o, "# HELP ferry_store_op_seconds_total Time spent in fleet directory operations.");
    let _ = writeln!(o, "# TYPE ferry_store_op_seconds_total counter");
    for (op, s) in stats {
        let _ = writeln!(o, "ferry_store_op_seconds_total{{op=\"{op}\"}} {:.6}", s.seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(Store::open("redis://127.0.0.1:6379", Duration::from_secs(1)).is_ok());
        assert!(Store::open("rediss://h:6380/0", Duration::from_secs(1)).is_ok());
        assert!(Store::open("redis+sentinel://a:26379,b:26379/mymaster", Duration::from_secs(1)).is_ok());
        assert!(Store::open("redis+sentinel://a:26379", Duration::from_secs(1)).is_err());
        assert!(Store::open("http://x", Duration::from_secs(1)).err().unwrap().contains("redis://"));
        assert_eq!(redact("redis://u:pw@h:1/0"), "redis://***@h:1/0");
    }
}
