//! The allocation service: what the HTTP API and the control socket do, independent of transport.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use super::joincode::{self, JoinCodes};
use super::jwt::Tenant;
use super::model::{Allocation, JoinAllocation, RelayServer, ServerEndpoint};
use super::ratelimit::KeyedLimiter;
use super::relay::{RelayError, RelayHandle};
use crate::core::{ControlError, Created, Event, ReleaseReason};
use crate::wire::AllocationId;

/// What the service needs to know about where and how the relay is reached.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub advertise: String,
    /// The endpoints every allocation lists (`udp`, then `dtls`, `ws`, `wss` where enabled).
    pub endpoints: Vec<ServerEndpoint>,
    /// The IPv4 literal for the deprecated `relayServer.ipV4` (Unity parses it as one).
    pub advertise_ipv4: String,
    pub port: u16,
    pub region: String,
    pub join_code_length: usize,
    pub max_connections_cap: u16,
    /// Level of lifecycle events (created, bound, connected, released).
    pub log_lifecycle: crate::config::LifecycleLog,
    /// Lifecycle events are logged for one allocation in this many.
    pub log_lifecycle_sample: u32,
    /// Live host allocations per tenant (0: no limit).
    pub tenant_max_allocations: u32,
    /// New allocations per second per tenant (0: no limit).
    pub tenant_allocations_per_sec: u32,
    /// Tenants with their own metric labels.
    pub tenants: Vec<Tenant>,
}

/// Logs a lifecycle event about allocation `$id` at the configured level, if it is sampled.
macro_rules! lifecycle {
    ($svc:expr, $id:expr, $($arg:tt)+) => {
        if $svc.sampled(&$id) {
            match $svc.live.lifecycle() {
                crate::config::LifecycleLog::Info => tracing::info!($($arg)+),
                crate::config::LifecycleLog::Debug => tracing::debug!($($arg)+),
                crate::config::LifecycleLog::Off => {}
            }
        }
    };
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceError {
    Invalid(String),
    RegionNotFound(String),
    AllocationNotFound,
    JoinCodeNotFound,
    Capacity,
    /// The host's session has no free joiner slot.
    SessionFull,
    /// The key presented is not the host allocation's.
    WrongKey,
    /// The caller's tenant is at its allocation limit.
    TenantLimit(String),
    Draining,
    Unavailable,
    /// Fleet mode: no fresh, non-draining relay with room in the region.
    NoRelay(String),
    /// Fleet mode: the directory could not be reached in time.
    StoreUnavailable(String),
    /// Not offered by this kind of instance.
    NotSupported(&'static str),
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(m) => f.write_str(m),
            Self::RegionNotFound(r) => write!(f, "region `{r}` not found"),
            Self::AllocationNotFound => f.write_str("allocation not found"),
            Self::JoinCodeNotFound => f.write_str("join code not found"),
            Self::Capacity => f.write_str("no relay has room for this allocation"),
            Self::SessionFull => f.write_str(
                "the host's session is full: every joiner slot is taken (the host can remove joiners that never \
                 connected with POST /v1/removejoiners)",
            ),
            Self::WrongKey => f.write_str("key does not belong to this host allocation"),
            Self::TenantLimit(m) => f.write_str(m),
            Self::Draining => f.write_str("this relay is draining and takes no new allocations"),
            Self::Unavailable => f.write_str("relay unavailable"),
            Self::NoRelay(r) => write!(
                f,
                "no suitable relay in region `{r}`: none is ready, not draining and below capacity; try again later"
            ),
            Self::StoreUnavailable(m) => write!(f, "{m}; try again later"),
            Self::NotSupported(m) => f.write_str(m),
        }
    }
}

impl From<RelayError> for ServiceError {
    fn from(e: RelayError) -> Self {
        match e {
            RelayError::Control(ControlError::Full) => Self::Capacity,
            RelayError::Control(ControlError::SessionFull) => Self::SessionFull,
            RelayError::Control(ControlError::WrongKey) => Self::WrongKey,
            RelayError::Control(ControlError::MaxConnectionsOutOfRange) => {
                Self::Invalid("maxConnections out of range".into())
            }
            RelayError::Control(ControlError::HostNotFound | ControlError::NotFound) => {
                Self::AllocationNotFound
            }
            RelayError::Unavailable | RelayError::Entropy => Self::Unavailable,
        }
    }
}

/// Settings of the service that a configuration reload changes while it runs.
#[derive(Debug, Default)]
pub struct LiveSettings {
    lifecycle: std::sync::atomic::AtomicU8,
    sample: std::sync::atomic::AtomicU32,
    tenant_max_allocations: std::sync::atomic::AtomicU32,
}

impl LiveSettings {
    pub fn set(&self, lifecycle: crate::config::LifecycleLog, sample: u32, tenant_max: u32) {
        self.lifecycle.store(lifecycle as u8, Ordering::Relaxed);
        self.sample.store(sample, Ordering::Relaxed);
        self.tenant_max_allocations.store(tenant_max, Ordering::Relaxed);
    }

    fn lifecycle(&self) -> crate::config::LifecycleLog {
        use crate::config::LifecycleLog as L;
        match self.lifecycle.load(Ordering::Relaxed) {
            x if x == L::Info as u8 => L::Info,
            x if x == L::Debug as u8 => L::Debug,
            _ => L::Off,
        }
    }
}

pub struct AllocationService {
    relay: RelayHandle,
    /// Fleet mode (`ferry api`): allocations are placed and minted through the directory.
    fleet: Option<Arc<crate::fleet::api::FleetApi>>,
    codes: Mutex<JoinCodes>,
    cfg: ServiceConfig,
    draining: AtomicBool,
    tenant_rate: Mutex<KeyedLimiter<Tenant>>,
    /// What a reload can change while running.
    pub live: LiveSettings,
    /// Allocations created, by metric label (configured tenants, "default", "other").
    created: Mutex<std::collections::BTreeMap<String, u64>>,
    clock: crate::clock::Clock,
}

impl AllocationService {
    pub fn new(relay: RelayHandle, cfg: ServiceConfig) -> Arc<Self> {
        Self::build(relay, None, cfg)
    }

    /// An API instance of a fleet: no relay of its own.
    pub fn fleet(api: Arc<crate::fleet::api::FleetApi>, cfg: ServiceConfig) -> Arc<Self> {
        Self::build(RelayHandle::new(Vec::new()), Some(api), cfg)
    }

    pub fn fleet_api(&self) -> Option<&Arc<crate::fleet::api::FleetApi>> {
        self.fleet.as_ref()
    }

    fn build(
        relay: RelayHandle,
        fleet: Option<Arc<crate::fleet::api::FleetApi>>,
        cfg: ServiceConfig,
    ) -> Arc<Self> {
        let rate = cfg.tenant_allocations_per_sec as f64;
        let live = LiveSettings::default();
        live.set(cfg.log_lifecycle, cfg.log_lifecycle_sample, cfg.tenant_max_allocations);
        Arc::new(Self {
            live,
            relay,
            fleet,
            codes: Mutex::new(JoinCodes::default()),
            tenant_rate: Mutex::new(KeyedLimiter::new(rate, 1000.0, rate.max(1.0), 100_000)),
            created: Mutex::new(Default::default()),
            clock: crate::clock::Clock::new(),
            cfg,
            draining: AtomicBool::new(false),
        })
    }

    pub fn relay(&self) -> &RelayHandle {
        &self.relay
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.cfg
    }

    fn codes(&self) -> MutexGuard<'_, JoinCodes> {
        // A panic while holding this lock cannot leave the maps inconsistent (each operation is
        // a single insert/remove pair), so a poisoned lock is still usable.
        self.codes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Live host allocations known to the API.
    pub fn hosts(&self) -> usize {
        self.codes().hosts()
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Takes new allocations again after [`start_draining`](Self::start_draining).
    pub fn stop_draining(&self) {
        self.draining.store(false, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Whether `id`'s lifecycle is logged: one allocation in `log_lifecycle_sample`, chosen by
    /// random ID bytes, so a sampled allocation's whole story is in the log.
    fn sampled(&self, id: &AllocationId) -> bool {
        let n = self.live.sample.load(Ordering::Relaxed).max(1);
        n == 1 || u32::from_be_bytes([id.0[4], id.0[5], id.0[7], id.0[9]]).is_multiple_of(n)
    }

    fn allocation(&self, c: &Created) -> Allocation {
        Allocation {
            allocation_id: c.id.to_string(),
            allocation_id_bytes: B64.encode(c.id.0),
            server_endpoints: self.cfg.endpoints.clone(),
            relay_server: RelayServer { ip_v4: self.cfg.advertise_ipv4.clone(), port: self.cfg.port },
            key: c.key.to_base64(),
            connection_data: B64.encode(c.connection_data),
            region: self.cfg.region.clone(),
        }
    }

    /// The metric label of a tenant: its name if configured, `default`, or `other` (so label
    /// cardinality stays bounded whatever tokens claim).
    pub fn tenant_label(&self, t: &Tenant) -> String {
        if t.is_default() {
            "default".into()
        } else if self.cfg.tenants.contains(t) {
            t.to_string()
        } else {
            "other".into()
        }
    }

    /// Live hosts and allocations created, by tenant label.
    pub fn tenant_counts(&self) -> Vec<(String, u64, u64)> {
        let mut live: std::collections::BTreeMap<String, u64> = Default::default();
        for (t, n) in self.codes().tenants() {
            *live.entry(self.tenant_label(t)).or_insert(0) += n as u64;
        }
        let created = self.created.lock().map(|m| m.clone()).unwrap_or_default();
        let mut labels: std::collections::BTreeSet<String> = live.keys().cloned().collect();
        labels.extend(created.keys().cloned());
        labels
            .into_iter()
            .map(|l| (l.clone(), live.get(&l).copied().unwrap_or(0), created.get(&l).copied().unwrap_or(0)))
            .collect()
    }

    fn check_tenant_limits(&self, tenant: &Tenant) -> Result<(), ServiceError> {
        let max = self.live.tenant_max_allocations.load(Ordering::Relaxed);
        if max > 0 && self.codes().hosts_of(tenant) >= max {
            return Err(ServiceError::TenantLimit(format!(
                "this project and environment already has {max} live host allocations (tenant_max_allocations)"
            )));
        }
        if self.cfg.tenant_allocations_per_sec > 0 {
            let now = self.clock.now();
            let mut l = self.tenant_rate.lock().unwrap_or_else(|p| p.into_inner());
            if !l.take(tenant, now) {
                return Err(ServiceError::TenantLimit(format!(
                    "this project and environment is creating allocations faster than {}/s (tenant_allocations_per_sec)",
                    self.cfg.tenant_allocations_per_sec
                )));
            }
        }
        Ok(())
    }

    pub async fn allocate(
        &self,
        max_connections: i64,
        region: Option<&str>,
        tenant: &Tenant,
    ) -> Result<Allocation, ServiceError> {
        if self.is_draining() {
            return Err(ServiceError::Draining);
        }
        let cap = self.cfg.max_connections_cap as i64;
        if !(1..=cap).contains(&max_connections) {
            return Err(ServiceError::Invalid(format!(
                "maxConnections must be between 1 and {cap}, got {max_connections}"
            )));
        }
        if let Some(f) = &self.fleet {
            self.check_tenant_limits(tenant)?;
            let a = f.allocate(max_connections as u16, region, tenant).await?;
            if let Ok(mut m) = self.created.lock() {
                *m.entry(self.tenant_label(tenant)).or_insert(0) += 1;
            }
            return Ok(a);
        }
        if let Some(r) = region.filter(|r| *r != self.cfg.region) {
            return Err(ServiceError::RegionNotFound(r.to_string()));
        }
        self.check_tenant_limits(tenant)?;
        let (shard, created) = self.relay.create_host(max_connections as u16).await?;
        self.codes().add_host(created.id, B64.encode(created.connection_data), tenant.clone());
        if let Ok(mut m) = self.created.lock() {
            *m.entry(self.tenant_label(tenant)).or_insert(0) += 1;
        }
        lifecycle!(self, created.id, allocation = %created.id, shard, max_connections, "host allocation created");
        Ok(self.allocation(&created))
    }

    /// The host's join code and whether it was created by this call.
    pub async fn join_code(
        &self,
        allocation_id: &str,
        tenant: &Tenant,
    ) -> Result<(String, bool), ServiceError> {
        let id = AllocationId::parse(allocation_id)
            .ok_or_else(|| ServiceError::Invalid(format!("allocationId `{allocation_id}` is not a UUID")))?;
        if let Some(f) = &self.fleet {
            return f.join_code(&id, tenant).await;
        }
        let len = self.cfg.join_code_length;
        let mut codes = self.codes();
        // Another tenant's allocation does not exist for this caller.
        if codes.tenant_of(&id).is_some_and(|t| t != tenant) {
            return Err(ServiceError::AllocationNotFound);
        }
        match codes.code_for(&id, len) {
            Some(Ok(r)) => Ok(r),
            Some(Err(_)) => Err(ServiceError::Unavailable),
            None => Err(ServiceError::AllocationNotFound),
        }
    }

    /// Resolves a join code (any case) to its live host and the host's connection data.
    pub fn resolve(&self, code: &str, tenant: &Tenant) -> Option<(AllocationId, String)> {
        let code = joincode::normalize(code)?;
        let codes = self.codes();
        let host = codes.resolve(&code)?;
        // Another tenant's code is not found.
        if codes.tenant_of(&host)? != tenant {
            return None;
        }
        Some((host, codes.host_connection_data(&host)?.to_string()))
    }

    pub async fn join(&self, code: &str, tenant: &Tenant) -> Result<JoinAllocation, ServiceError> {
        if self.is_draining() {
            return Err(ServiceError::Draining);
        }
        if let Some(f) = &self.fleet {
            let code = joincode::normalize(code).ok_or(ServiceError::JoinCodeNotFound)?;
            return f.join(&code, tenant).await;
        }
        let (host, host_connection_data) =
            self.resolve(code, tenant).ok_or(ServiceError::JoinCodeNotFound)?;
        let created = self.relay.create_joiner(host).await.map_err(|e| match ServiceError::from(e) {
            ServiceError::AllocationNotFound => ServiceError::JoinCodeNotFound,
            other => other,
        })?;
        lifecycle!(self, created.id, allocation = %created.id, host = %host, "joiner allocation created");
        Ok(JoinAllocation { allocation: self.allocation(&created), host_connection_data })
    }

    /// The host removes one joiner, or every joiner that has not connected.
    pub async fn remove_joiners(
        &self,
        host: &str,
        key: &str,
        joiner: Option<&str>,
        tenant: &Tenant,
    ) -> Result<u32, ServiceError> {
        let parse = |field: &str, v: &str| {
            AllocationId::parse(v)
                .ok_or_else(|| ServiceError::Invalid(format!("{field} `{v}` is not a UUID")))
        };
        let host = parse("allocationId", host)?;
        if self.fleet.is_some() {
            return Err(ServiceError::NotSupported(
                "removejoiners is not offered by fleet API instances yet: joiners that never connect expire after the relay's unbound_timeout",
            ));
        }
        if self.codes().tenant_of(&host).is_some_and(|t| t != tenant) {
            return Err(ServiceError::AllocationNotFound);
        }
        let joiner = joiner.map(|j| parse("joinerAllocationId", j)).transpose()?;
        let key = crate::auth::AllocationKey::from_base64(key.trim()).ok_or_else(|| {
            ServiceError::Invalid("key must be the base64 of the host's 64-byte key".into())
        })?;
        let n = self.relay.remove_joiners(host, key.0, joiner).await?;
        lifecycle!(self, host, allocation = %host, removed = n, "host removed joiners");
        Ok(n)
    }

    /// Applies a shard's lifecycle event (join-code invalidation, logs).
    pub fn on_event(&self, shard: usize, ev: Event) {
        match ev {
            Event::Bound { id, addr, moved } => {
                lifecycle!(self, id, allocation = %id, shard, %addr, moved, "allocation bound")
            }
            Event::Connected { host, joiner } => {
                lifecycle!(self, joiner, allocation = %joiner, host = %host, shard, "peer connected")
            }
            Event::Released { id, is_host, reason, .. } => {
                if is_host {
                    self.codes().remove_host(&id);
                }
                let role = if is_host { "host" } else { "joiner" };
                match reason {
                    ReleaseReason::HostGone => {
                        tracing::debug!(allocation = %id, shard, role, reason = reason.as_str(), "allocation released")
                    }
                    _ => {
                        lifecycle!(self, id, allocation = %id, shard, role, reason = reason.as_str(), "allocation released")
                    }
                }
            }
        }
    }
}
