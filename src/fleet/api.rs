//! An API instance in a fleet: places and mints allocations without calling any relay, and keeps
//! every piece of state in the directory, so any instance answers any request.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use super::directory::{Directory, Event};
use super::keys::FleetKeys;
use super::placement::{self, RelayState, Seen};
use super::records::AllocRecord;
use crate::auth::token::{relay_key, relay_tag, Token, TokenRole};
use crate::control::jwt::Tenant;
use crate::control::model::{Allocation, JoinAllocation, RelayServer};
use crate::control::service::ServiceError;
use crate::wire::AllocationId;

#[derive(Clone, Debug)]
pub struct FleetApiConfig {
    /// This instance's region: where a request that names none is placed.
    pub region: String,
    /// Every region `/v1/regions` lists and requests may name.
    pub regions: Vec<String>,
    /// A relay whose last heartbeat is older than this gets no placement.
    pub expiry: Duration,
    /// A relay gets hosts once it has been up this long.
    pub warmup: Duration,
    /// How often the relay snapshot is refreshed.
    pub refresh: Duration,
    /// A token's first BIND must come within this long (the relays' `unbound_timeout`).
    pub bind_window: Duration,
    pub join_code_length: usize,
}

/// The relays as last read from the directory.
#[derive(Default)]
struct Snapshot {
    relays: Vec<Seen>,
    /// Our clock when it was read; `None` before the first successful read.
    at: Option<crate::clock::Millis>,
}

pub struct FleetApi {
    dir: Directory,
    keys: RwLock<Arc<FleetKeys>>,
    cfg: FleetApiConfig,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Placements by (region, result).
    placements: Mutex<BTreeMap<(String, &'static str), u64>>,
    clock: crate::clock::Clock,
}

fn random<const N: usize>() -> Result<[u8; N], ServiceError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|_| ServiceError::Unavailable)?;
    Ok(b)
}

fn unavailable(e: super::store::StoreError) -> ServiceError {
    ServiceError::StoreUnavailable(e.to_string())
}

impl FleetApi {
    pub fn new(dir: Directory, keys: FleetKeys, cfg: FleetApiConfig) -> Arc<Self> {
        Arc::new(Self {
            dir,
            keys: RwLock::new(Arc::new(keys)),
            cfg,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            placements: Mutex::new(BTreeMap::new()),
            clock: crate::clock::Clock::new(),
        })
    }

    pub fn config(&self) -> &FleetApiConfig {
        &self.cfg
    }

    pub fn directory(&self) -> &Directory {
        &self.dir
    }

    /// Replaces the fleet keys (a reload).
    pub fn set_keys(&self, k: FleetKeys) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(k);
    }

    fn keys(&self) -> Arc<FleetKeys> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the relays from the directory into the shared snapshot.
    pub async fn refresh(&self) -> Result<(), super::store::StoreError> {
        let relays = self.dir.relays().await?;
        let s = Snapshot { relays, at: Some(self.clock.now()) };
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(s);
        Ok(())
    }

    /// Refreshes the snapshot every `refresh` until the task is dropped.
    pub async fn run_refresh(self: Arc<Self>) {
        let mut failing = false;
        loop {
            match self.refresh().await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("fleet directory reachable again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot read the relays from the fleet directory");
                }
                Err(_) => {}
            }
            tokio::time::sleep(self.cfg.refresh).await;
        }
    }

    /// The relays now, their heartbeat ages brought up to date; `None` when the directory has
    /// not been read successfully within the expiry (placing from older data would be a guess).
    fn relays(&self) -> Option<Vec<Seen>> {
        let s = self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone();
        let since = self.clock.now().saturating_sub(s.at?);
        if since > self.cfg.expiry.as_millis() as u64 + self.cfg.refresh.as_millis() as u64 {
            return None;
        }
        Some(s.relays.iter().map(|r| Seen { record: r.record.clone(), age_ms: r.age_ms + since }).collect())
    }

    /// Whether the relay list was read recently enough to place allocations.
    pub fn ready(&self) -> bool {
        self.relays().is_some()
    }

    /// Relays by state, per region (for metrics).
    pub fn relay_states(&self) -> BTreeMap<(String, &'static str), u64> {
        let mut m = BTreeMap::new();
        for r in self.relays().unwrap_or_default() {
            let st =
                placement::state(&r, self.cfg.expiry.as_millis() as u64, self.cfg.warmup.as_millis() as u64);
            *m.entry((r.record.region.clone(), st.as_str())).or_insert(0) += 1;
        }
        m
    }

    pub fn placements(&self) -> BTreeMap<(String, &'static str), u64> {
        self.placements.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn count(&self, region: &str, result: &'static str) {
        if let Ok(mut m) = self.placements.lock() {
            *m.entry((region.to_string(), result)).or_insert(0) += 1;
        }
    }

    /// Mints a token for `relay` and the allocation the client gets.
    fn mint(&self, relay: &Seen, id: AllocationId, role: TokenRole) -> (Allocation, String) {
        let keys = self.keys();
        let (_, fleet_key) = keys.current();
        let r = &relay.record;
        let rk = relay_key(fleet_key, &r.name, r.epoch);
        let token = Token {
            id,
            role,
            relay: relay_tag(&r.name),
            epoch: r.epoch,
            not_after_ms: crate::clock::Clock::unix_millis() + self.cfg.bind_window.as_millis() as u64,
        };
        let conn = B64.encode(token.emit(&rk));
        let key = crate::core::allocation_key(&rk, &id);
        let a = Allocation {
            allocation_id: id.to_string(),
            allocation_id_bytes: B64.encode(id.0),
            server_endpoints: r.endpoints.clone(),
            relay_server: RelayServer { ip_v4: r.ipv4.clone(), port: r.port },
            key: B64.encode(key),
            connection_data: conn.clone(),
            region: r.region.clone(),
        };
        (a, conn)
    }

    /// A fresh allocation ID: UUID v4 bits, the minting key's ID in byte 15, and (for a joiner)
    /// its host's first four bytes, so both are owned by the same shard of the relay.
    fn new_id(&self, host: Option<&AllocationId>) -> Result<AllocationId, ServiceError> {
        let mut b: [u8; 16] = random()?;
        if let Some(h) = host {
            b[..4].copy_from_slice(&h.0[..4]);
        }
        b[6] = (b[6] & 0x0F) | 0x40;
        b[8] = (b[8] & 0x3F) | 0x80;
        b[15] = self.keys().current().0;
        Ok(AllocationId(b))
    }

    fn record_ttl(&self) -> u64 {
        // Until bound (the relay extends it then), plus clock-skew slack.
        self.cfg.bind_window.as_millis() as u64 + 10_000
    }

    pub async fn allocate(
        &self,
        max_connections: u16,
        region: Option<&str>,
        tenant: &Tenant,
    ) -> Result<Allocation, ServiceError> {
        let region = region.unwrap_or(&self.cfg.region).to_string();
        if !self.cfg.regions.contains(&region) {
            self.count(&region, "region_not_found");
            return Err(ServiceError::RegionNotFound(region));
        }
        let Some(relays) = self.relays() else {
            self.count(&region, "store_unavailable");
            return Err(ServiceError::StoreUnavailable("the relay list could not be read recently".into()));
        };
        let rnd: [u8; 16] = random()?;
        let draws = [
            u64::from_le_bytes(rnd[..8].try_into().unwrap_or_default()),
            u64::from_le_bytes(rnd[8..].try_into().unwrap_or_default()),
        ];
        let expiry = self.cfg.expiry.as_millis() as u64;
        let Some(i) = placement::pick(&relays, &region, expiry, self.cfg.warmup.as_millis() as u64, draws)
        else {
            self.count(&region, "no_relay");
            return Err(ServiceError::NoRelay(region));
        };
        let relay = &relays[i];
        let id = self.new_id(None)?;
        let (a, conn) = self.mint(relay, id, TokenRole::Host { max_connections });
        let now = crate::clock::Clock::unix_millis();
        let rec = AllocRecord {
            relay: relay.record.name.clone(),
            epoch: relay.record.epoch,
            region: region.clone(),
            role: "host".into(),
            host: None,
            connection_data: conn,
            max_connections,
            tenant: tenant.to_string(),
            created_ms: now,
        };
        let ev = Event {
            kind: "created",
            id: a.allocation_id.clone(),
            relay: rec.relay.clone(),
            role: "host",
            reason: None,
            bytes: None,
            unix_ms: now,
        };
        if let Err(e) = self.dir.put_alloc(&a.allocation_id, &rec, self.record_ttl(), &ev).await {
            self.count(&region, "store_unavailable");
            return Err(unavailable(e));
        }
        self.count(&region, "ok");
        tracing::debug!(allocation = %a.allocation_id, relay = %rec.relay, region = %region, "host allocation minted");
        Ok(a)
    }

    /// The host allocation `id` of `tenant`, or not found.
    async fn host_record(&self, id: &AllocationId, tenant: &Tenant) -> Result<AllocRecord, ServiceError> {
        match self.dir.alloc(&id.to_string()).await.map_err(unavailable)? {
            Some(r) if r.role == "host" && r.tenant == tenant.to_string() => Ok(r),
            _ => Err(ServiceError::AllocationNotFound),
        }
    }

    pub async fn join_code(
        &self,
        id: &AllocationId,
        tenant: &Tenant,
    ) -> Result<(String, bool), ServiceError> {
        self.host_record(id, tenant).await?;
        let len = self.cfg.join_code_length;
        let fresh = || crate::control::joincode::generate(len).unwrap_or_default();
        match self.dir.join_code(&id.to_string(), fresh).await.map_err(unavailable)? {
            Some(r) => Ok(r),
            None => Err(ServiceError::AllocationNotFound),
        }
    }

    /// A joiner allocation on the host's relay (allowed while that relay drains).
    pub async fn join(&self, code: &str, tenant: &Tenant) -> Result<JoinAllocation, ServiceError> {
        let Some(host) = self.dir.resolve(code).await.map_err(unavailable)? else {
            return Err(ServiceError::JoinCodeNotFound);
        };
        let Some(host_id) = AllocationId::parse(&host) else { return Err(ServiceError::JoinCodeNotFound) };
        let rec = match self.host_record(&host_id, tenant).await {
            Ok(r) => r,
            Err(ServiceError::AllocationNotFound) => return Err(ServiceError::JoinCodeNotFound),
            Err(e) => return Err(e),
        };
        let relays = self.relays().ok_or_else(|| {
            ServiceError::StoreUnavailable("the relay list could not be read recently".into())
        })?;
        let expiry = self.cfg.expiry.as_millis() as u64;
        let relay = relays.iter().find(|r| {
            r.record.name == rec.relay
                && r.record.epoch == rec.epoch
                && placement::state(r, expiry, 0) != RelayState::Stale
        });
        let Some(relay) = relay else {
            // Its relay died or restarted: the session is gone, and so is its code.
            let _ = self.dir.forget_code(code, &host).await;
            return Err(ServiceError::JoinCodeNotFound);
        };
        let id = self.new_id(Some(&host_id))?;
        let (a, conn) = self.mint(relay, id, TokenRole::Joiner { host: host_id });
        let now = crate::clock::Clock::unix_millis();
        let jr = AllocRecord {
            relay: rec.relay.clone(),
            epoch: rec.epoch,
            region: rec.region.clone(),
            role: "joiner".into(),
            host: Some(host.clone()),
            connection_data: conn,
            max_connections: 0,
            tenant: rec.tenant.clone(),
            created_ms: now,
        };
        let ev = Event {
            kind: "created",
            id: a.allocation_id.clone(),
            relay: rec.relay.clone(),
            role: "joiner",
            reason: None,
            bytes: None,
            unix_ms: now,
        };
        self.dir.put_alloc(&a.allocation_id, &jr, self.record_ttl(), &ev).await.map_err(unavailable)?;
        Ok(JoinAllocation { allocation: a, host_connection_data: rec.connection_data })
    }

    /// The QoS endpoints of the fresh relays of `region` (or of every region).
    pub fn qos_servers(&self, region: Option<&str>) -> Vec<crate::control::model::QosServer> {
        let expiry = self.cfg.expiry.as_millis() as u64;
        let mut by_region: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in self.relays().unwrap_or_default() {
            let st = placement::state(&r, expiry, 0);
            if st == RelayState::Stale
                || st == RelayState::Draining
                || region.is_some_and(|g| g != r.record.region)
            {
                continue;
            }
            by_region.entry(r.record.region.clone()).or_default().push(r.record.qos.clone());
        }
        by_region
            .into_iter()
            .flat_map(|(region, eps)| {
                eps.into_iter().map(move |e| crate::control::model::QosServer {
                    region: region.clone(),
                    endpoints: vec![e],
                    services: vec!["relay".into()],
                })
            })
            .collect()
    }

    /// Renders `ferry_fleet_*` and `ferry_api_placements_total` for this instance.
    pub fn render(&self, o: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(o, "# HELP ferry_fleet_relays Relays in the directory, by region and state.");
        let _ = writeln!(o, "# TYPE ferry_fleet_relays gauge");
        for ((region, state), n) in self.relay_states() {
            let _ = writeln!(o, "ferry_fleet_relays{{region=\"{region}\",state=\"{state}\"}} {n}");
        }
        let _ = writeln!(
            o,
            "# HELP ferry_api_placements_total Host allocation placements, by region and result."
        );
        let _ = writeln!(o, "# TYPE ferry_api_placements_total counter");
        for ((region, result), n) in self.placements() {
            let region = if self.cfg.regions.contains(&region) { region.as_str() } else { "unknown" };
            let _ = writeln!(o, "ferry_api_placements_total{{region=\"{region}\",result=\"{result}\"}} {n}");
        }
        super::store::render(o, &self.dir.store().stats());
    }
}
