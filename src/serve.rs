//! `ferry serve`: starts the shards, the control plane and the API from a [`Config`], and stops
//! them. Usable in-process (tests) through [`Running`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::Config;
use crate::control::api::{self, ApiLimits, ApiState};
use crate::control::http::HttpLimits;
use crate::control::relay::RelayHandle;
use crate::control::service::{AllocationService, ServiceConfig};
use crate::control::socket::ControlServer;
use crate::core::{AddressPolicy, CoreConfig, Rate};
use crate::io::bind_udp;
use crate::shard::{spawn_all, ShardSetup};

/// A running relay with its API.
pub struct Running {
    pub api_addr: SocketAddr,
    pub relay_addr: SocketAddr,
    pub control_addr: Option<SocketAddr>,
    pub service: Arc<AllocationService>,
    pub state: ApiState,
    /// The API's certificate, when it serves HTTPS (reloaded on SIGHUP or when its files change).
    pub tls: Option<Arc<crate::control::tls::CertStore>>,
    /// The `wss` listener's certificate (reloaded on SIGHUP or when its files change).
    pub wss_certs: Option<Arc<crate::control::tls::CertStore>>,
    /// The WebSocket listeners' bound addresses.
    pub ws_addr: Option<SocketAddr>,
    pub wss_addr: Option<SocketAddr>,
    /// The configuration in force (a reload compares against it).
    config: std::sync::Mutex<Config>,
    relay: RelayHandle,
    stop_api: watch::Sender<bool>,
    api_task: tokio::task::JoinHandle<io::Result<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _port_claim: Option<crate::io::PortClaim>,
    /// A fleet relay's directory agent.
    pub agent: Option<Arc<crate::fleet::agent::Agent>>,
    /// A fleet relay's identity (its name and this boot's epoch).
    fleet_relay: Option<(String, u32)>,
    /// The kernel fast path, while attached (dropping it detaches the program).
    fastpath: Option<crate::xdp::FastPath>,
}

/// The relay's own socket addresses: every local address at the relay's port when it listens on
/// an unspecified address.
fn own_addrs(relay: SocketAddr) -> Vec<SocketAddr> {
    if !relay.ip().is_unspecified() {
        return vec![relay];
    }
    let mut ips = crate::config::interface_ips();
    ips.extend(["127.0.0.1".parse::<std::net::IpAddr>().ok(), "::1".parse().ok()].into_iter().flatten());
    ips.into_iter().map(|ip| SocketAddr::new(ip, relay.port())).collect()
}

/// The relay side of fleet tokens for relay `name` in boot `epoch`.
fn fleet_relay(cfg: &Config, name: &str, epoch: u32, clock: &Clock) -> io::Result<crate::core::FleetRelay> {
    let path = cfg.fleet_key_file.as_deref().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "invalid configuration `fleet_key_file`: required")
    })?;
    let keys = crate::fleet::keys::FleetKeys::load(path).map_err(|m| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("invalid configuration `fleet_key_file`: {m}"))
    })?;
    let unix_at_zero = crate::clock::Clock::unix_millis().saturating_sub(clock.now());
    Ok(crate::core::FleetRelay::new(name, epoch, &keys.keys, unix_at_zero))
}

fn core_config(cfg: &Config, shard: usize, relay: SocketAddr) -> CoreConfig {
    let ms = |d: Duration| d.as_millis() as u64;
    let mut c = CoreConfig::new(cfg.relay_secret);
    c.shard = shard as u32;
    c.shards = cfg.shards as u32;
    c.max_allocations = cfg.max_allocations;
    c.max_connections_cap = cfg.max_connections_cap;
    c.unbound_timeout = ms(cfg.unbound_timeout);
    c.idle_timeout = ms(cfg.idle_timeout);
    c.host_alone_timeout = ms(cfg.host_alone_timeout);
    c.rebind_quiet = ms(cfg.rebind_quiet);
    c.error_rate_per_ip = Rate { per_sec: 20, burst: 40 };
    c.policy = AddressPolicy::new(&own_addrs(relay), cfg.deny_sources.clone());
    c.unconfirmed_budget = cfg.unconfirmed_budget;
    c.stun = cfg.stun;
    c.qos = cfg.qos;
    c
}

/// Raises the soft open-files limit to the hard one and returns it. Every API connection, control
/// connection and socket costs a descriptor; the common default soft limit of 1,024 would let a
/// connection flood starve the control plane.
pub fn raise_nofile_limit() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

/// The API connection cap: what the configuration asks for, or by default as many as the
/// descriptor limit allows after what the rest of the process needs (capped at 4,096).
fn api_connection_cap(cfg: &Config, nofile: usize) -> io::Result<usize> {
    let reserve = 64 + 2 * cfg.control_max_connections + 8 * cfg.shards;
    let fit = nofile.saturating_sub(reserve);
    match cfg.api_max_connections {
        Some(n) if n > fit => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "invalid configuration `api_max_connections`: {n} connections need more file descriptors than the \
                 open-files limit ({nofile}) leaves after {reserve} for the rest of the relay; at most {fit} fit \
                 (raise the hard limit, e.g. LimitNOFILE= in systemd)"
            ),
        )),
        Some(n) => Ok(n),
        None if fit < 16 => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the open-files limit ({nofile}) is too low to serve the API; raise it to at least {}", reserve + 16),
        )),
        None => Ok(fit.min(4096)),
    }
}

fn api_limits(cfg: &Config, jwt: Option<crate::control::jwt::JwtVerifier>, anonymous: bool) -> ApiLimits {
    ApiLimits {
        jwt,
        anonymous,
        tokens: cfg.api_tokens.clone(),
        requests_per_sec: cfg.api_rate_limit,
        join_failures_per_ip_per_min: cfg.join_failures_per_ip_per_min,
        join_failures_global_per_sec: cfg.join_failures_global_per_sec,
        join_failures_per_token_per_min: cfg.join_failures_per_token_per_min,
        auth_failures_per_ip_per_min: cfg.auth_failures_per_ip_per_min,
        trusted_proxies: cfg.trusted_proxies.clone(),
        body_timeout: cfg.api_body_timeout,
    }
}

/// Keys a reload cannot change while the relay runs (sockets, shards, identity, key material):
/// names those that differ in `new` and puts their running values back into it.
/// The endpoints allocations list, in Unity's terms: `udp` always; `dtls` (network udp, secure)
/// on the same host and port when DTLS is on; `ws` and `wss` (network tcp, reliable) on the
/// WebSocket listeners' ports, or `wss` at the TLS proxy named by `wss_public`.
fn endpoints(
    cfg: &Config,
    ws_port: Option<u16>,
    wss_port: Option<u16>,
) -> Vec<crate::client::model::ServerEndpoint> {
    let ep = |kind: &str, network: &str, secure: bool, reliable: bool, host: &str, port: u16| {
        crate::client::model::ServerEndpoint {
            connection_type: kind.into(),
            network: network.into(),
            reliable,
            secure,
            host: host.into(),
            port,
        }
    };
    let mut v = vec![ep("udp", "udp", false, false, &cfg.advertise, cfg.advertise_port)];
    if cfg.dtls {
        v.push(ep("dtls", "udp", true, false, &cfg.advertise, cfg.advertise_port));
    }
    let host = cfg.ws_public_host.as_deref().unwrap_or(&cfg.advertise);
    match (&cfg.wss_public, ws_port) {
        (Some(p), _) => {
            if let Some((h, port)) = p.rsplit_once(':').and_then(|(h, p)| Some((h, p.parse().ok()?))) {
                v.push(ep("wss", "tcp", true, true, h, port));
            }
        }
        (None, Some(port)) => v.push(ep("ws", "tcp", false, true, host, port)),
        (None, None) => {}
    }
    if let Some(port) = wss_port {
        v.push(ep("wss", "tcp", true, true, host, port));
    }
    v
}

fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.role == crate::config::Role::Api {
        // What an API instance turned off at start-up (it has no relay) is not a change.
        (new.shards, new.dtls, new.ws_listen, new.wss_listen) =
            (old.shards, old.dtls, old.ws_listen, old.wss_listen);
    }
    macro_rules! keep {
        ($($k:ident),*) => { $(
            if format!("{:?}", old.$k) != format!("{:?}", new.$k) {
                changed.push(stringify!($k));
                new.$k = old.$k.clone();
            }
        )* };
    }
    keep!(
        api_listen,
        relay_listen,
        dtls,
        dtls_mtu,
        dtls_halfopen_per_ip,
        ws_listen,
        wss_listen,
        ws_public_host,
        wss_public,
        ws_max_connections,
        ws_max_connections_per_ip,
        ws_idle_timeout,
        shards,
        pin_shards,
        kernel_steering,
        io,
        gso,
        xdp,
        xdp_interface,
        xdp_max_links,
        control_socket,
        control_listen,
        control_secret,
        advertise,
        advertise_port,
        advertise_ipv4,
        region,
        max_allocations,
        max_connections_cap,
        join_code_length,
        jwt_algorithm,
        jwt_secret_file,
        jwt_public_key_file,
        jwt_jwks_file,
        jwt_jwks_url,
        jwt_jwks_ca_file,
        jwt_issuer,
        jwt_audience,
        jwt_leeway,
        jwt_project_claim,
        jwt_environment_claim,
        api_max_connections,
        api_max_connections_per_ip,
        api_header_timeout,
        control_max_connections,
        log_format,
        drain_timeout,
        api_tls_cert,
        api_tls_key,
        tenants,
        tenant_allocations_per_sec,
        store,
        relay_name,
        regions,
        heartbeat_interval,
        heartbeat_expiry,
        relay_warmup,
        store_timeout,
        store_ca_file
    );
    // Random unless configured: never compared, always the running one.
    new.relay_secret = old.relay_secret;
    changed
}

/// How long the directory keeps a relay record after its last heartbeat: long enough for
/// `ferry fleet status` to show it as stale before it disappears.
fn keep_for(cfg: &Config) -> Duration {
    (cfg.heartbeat_expiry * 10).max(Duration::from_secs(30))
}

fn with_context(e: io::Error, what: &str, addr: impl std::fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {addr}: {e}"))
}

impl Running {
    /// Binds every socket and starts everything. Must be called inside a tokio runtime.
    pub async fn start(mut cfg: Config) -> io::Result<Self> {
        let clock = Clock::new();
        let nofile = raise_nofile_limit();
        let api_cap = api_connection_cap(&cfg, nofile)?;
        let role = cfg.role;
        if role == crate::config::Role::Api {
            // An API instance of a fleet has no relay: no shards, no UDP or WebSocket listeners.
            cfg.shards = 0;
            cfg.dtls = false;
            cfg.ws_listen = None;
            cfg.wss_listen = None;
        }
        // Shard 0 binds with the claim (port 0, in tests, resolves to a port no other socket
        // holds); the other shards join its port.
        let bind_err = |e| with_context(e, "cannot bind relay_listen", cfg.relay_listen);
        let (port_claim, first) = match role {
            crate::config::Role::Api => (None, None),
            _ if cfg.shards > 0 => {
                let (claim, first) =
                    crate::io::claim_and_bind(cfg.relay_listen, cfg.shards > 1).map_err(bind_err)?;
                (Some(claim), Some(first))
            }
            _ => (Some(crate::io::claim_udp_port(cfg.relay_listen).map_err(bind_err)?), None),
        };
        let mut sockets = Vec::new();
        let relay_addr = match first {
            Some(first) => {
                let a = first.local_addr()?;
                sockets.push(first);
                a
            }
            None => SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        if cfg.advertise_port == 0 {
            cfg.advertise_port = relay_addr.port();
        }
        let fleet = match role {
            crate::config::Role::Relay => {
                let name = cfg
                    .relay_name
                    .clone()
                    .unwrap_or_else(|| format!("{}:{}", cfg.advertise, cfg.advertise_port));
                let epoch = loop {
                    let mut b = [0u8; 4];
                    getrandom::getrandom(&mut b).map_err(io::Error::other)?;
                    let e = u32::from_be_bytes(b);
                    if e != 0 {
                        break e;
                    }
                };
                let f = fleet_relay(&cfg, &name, epoch, &clock)?;
                Some((name, epoch, f))
            }
            _ => None,
        };
        for _ in 1..cfg.shards {
            sockets.push(
                bind_udp(relay_addr, true)
                    .map_err(|e| with_context(e, "cannot bind relay_listen", relay_addr))?,
            );
        }
        let steering = if cfg.shards > 1 && !cfg.kernel_steering {
            "hand-off"
        } else if cfg.shards > 1 {
            match crate::steer::attach(&sockets[0], cfg.shards as u32) {
                Ok(()) => "kernel",
                Err(e) => {
                    tracing::warn!(error = %e, "no kernel steering; shards hand datagrams to their owners instead");
                    "hand-off"
                }
            }
        } else {
            "single shard"
        };
        let uring = match cfg.io {
            crate::config::IoBackend::Batch => false,
            crate::config::IoBackend::Uring => match crate::shard::uring_available() {
                Ok(()) => true,
                Err(reason) => {
                    tracing::warn!(%reason, "io_uring is unavailable here; falling back to the epoll backend");
                    false
                }
            },
        };
        let cores =
            if cfg.pin_shards { core_affinity::get_core_ids().unwrap_or_default() } else { Vec::new() };
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
        let dtls = match cfg.dtls {
            true => Some(
                crate::secure::dtls::server_context(&cfg.relay_secret)
                    .map_err(|e| io::Error::other(format!("DTLS: {e}")))?,
            ),
            false => None,
        };
        let fastpath = match (&cfg.xdp, &cfg.xdp_interface) {
            (crate::xdp::XdpMode::Off, _) | (_, None) => None,
            (&mode, Some(ifname)) if cfg.shards > 0 => {
                match crate::xdp::FastPath::start(
                    ifname,
                    mode,
                    relay_addr,
                    cfg.xdp_max_links.saturating_mul(2),
                ) {
                    Ok(f) => {
                        tracing::info!(
                            interface = %ifname, %mode, max_links = cfg.xdp_max_links, map_bytes = f.map_bytes,
                            "kernel fast path attached"
                        );
                        Some(f)
                    }
                    Err(e) => {
                        tracing::warn!(
                            interface = %ifname, %mode, error = %e,
                            "the kernel fast path could not be attached; relaying in userspace only"
                        );
                        None
                    }
                }
            }
            _ => None,
        };
        let dtls_cfg = crate::secure::dtls::DtlsConfig {
            mtu: cfg.dtls_mtu,
            max_halfopen_per_ip: cfg.dtls_halfopen_per_ip,
            ..Default::default()
        };
        let setups = sockets
            .into_iter()
            .enumerate()
            .map(|(i, socket)| ShardSetup {
                index: i,
                socket,
                core: {
                    let mut c = core_config(&cfg, i, relay_addr);
                    c.fleet = fleet.as_ref().map(|f| f.2.clone());
                    c
                },
                clock,
                events: ev_tx.clone(),
                pin: (!cores.is_empty()).then(|| cores[i % cores.len()]),
                uring,
                gso: cfg.gso,
                dtls: dtls.clone().map(|ctx| (ctx, dtls_cfg.clone())),
                links: fastpath.as_ref().map(|f| f.links()),
            })
            .collect();
        let (handles, threads) = spawn_all(setups)?;
        let relay = RelayHandle::new(handles);
        let ws = match cfg.ws_listen {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| with_context(e, "cannot bind ws_listen", a))?,
            ),
            None => None,
        };
        let wss = match (cfg.wss_listen, &cfg.wss_tls_cert, &cfg.wss_tls_key) {
            (Some(a), Some(cert), Some(key)) => {
                let store = crate::control::tls::CertStore::open(cert.clone(), key.clone()).map_err(|m| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("invalid configuration `wss_tls_cert`: {m}"),
                    )
                })?;
                let l = tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| with_context(e, "cannot bind wss_listen", a))?;
                Some((l, store))
            }
            _ => None,
        };
        let ws_port = ws.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port());
        let wss_port = wss.as_ref().and_then(|(l, _)| l.local_addr().ok()).map(|a| a.port());
        let ws_addr = ws.as_ref().and_then(|l| l.local_addr().ok());
        let wss_addr = wss.as_ref().and_then(|(l, _)| l.local_addr().ok());

        let service_cfg = ServiceConfig {
            endpoints: endpoints(&cfg, ws_port, wss_port),
            advertise: cfg.advertise.clone(),
            advertise_ipv4: cfg.advertise_ipv4.unwrap_or(std::net::Ipv4Addr::LOCALHOST).to_string(),
            port: cfg.advertise_port,
            region: cfg.region.clone(),
            join_code_length: cfg.join_code_length,
            max_connections_cap: cfg.max_connections_cap,
            log_lifecycle: cfg.log_lifecycle,
            log_lifecycle_sample: cfg.log_lifecycle_sample,
            tenant_max_allocations: cfg.tenant_max_allocations,
            tenant_allocations_per_sec: cfg.tenant_allocations_per_sec,
            tenants: cfg.tenants.iter().map(|t| crate::control::jwt::Tenant::parse(t)).collect(),
        };
        let mut tasks = Vec::new();
        let store = match &cfg.store {
            Some(url) if role != crate::config::Role::Serve => Some(Arc::new(
                crate::fleet::store::open(url, cfg.store_timeout, cfg.store_ca_file.as_deref()).map_err(
                    |m| {
                        io::Error::new(io::ErrorKind::InvalidInput, {
                            let (key, msg) = m.split_once(": ").unwrap_or(("store", m.as_str()));
                            format!("invalid configuration `{key}`: {msg}")
                        })
                    },
                )?,
            )),
            _ => None,
        };
        let service = match (role, &store) {
            (crate::config::Role::Api, Some(store)) => {
                let keys = crate::fleet::keys::FleetKeys::load(
                    cfg.fleet_key_file.as_deref().unwrap_or(std::path::Path::new("")),
                )
                .map_err(|m| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("invalid configuration `fleet_key_file`: {m}"),
                    )
                })?;
                let api = crate::fleet::api::FleetApi::new(
                    crate::fleet::directory::Directory::new(store.clone()),
                    keys,
                    crate::fleet::api::FleetApiConfig {
                        region: cfg.region.clone(),
                        regions: cfg.regions.clone(),
                        expiry: cfg.heartbeat_expiry,
                        warmup: cfg.relay_warmup,
                        refresh: (cfg.heartbeat_interval / 2).max(Duration::from_millis(50)),
                        bind_window: cfg.unbound_timeout,
                        join_code_length: cfg.join_code_length,
                    },
                );
                if let Err(e) = api.refresh().await {
                    tracing::warn!(error = %e, "the fleet directory is not reachable yet; allocations answer 503 until it is");
                }
                tasks.push(tokio::spawn(api.clone().run_refresh()));
                AllocationService::fleet(api, service_cfg)
            }
            _ => AllocationService::new(relay.clone(), service_cfg),
        };
        let agent = match (&fleet, &store) {
            (Some((name, epoch, _)), Some(store)) => {
                let record = crate::fleet::records::RelayRecord {
                    name: name.clone(),
                    region: cfg.region.clone(),
                    epoch: *epoch,
                    endpoints: service.config().endpoints.clone(),
                    ipv4: service.config().advertise_ipv4.clone(),
                    port: cfg.advertise_port,
                    qos: match cfg.advertise.parse::<std::net::IpAddr>() {
                        Ok(ip) => SocketAddr::new(ip, cfg.advertise_port).to_string(),
                        Err(_) => format!("{}:{}", cfg.advertise, cfg.advertise_port),
                    },
                    capacity: cfg.max_allocations as u64,
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                };
                let agent = crate::fleet::agent::Agent::new(
                    crate::fleet::directory::Directory::new(store.clone()),
                    crate::fleet::agent::AgentConfig {
                        heartbeat: cfg.heartbeat_interval,
                        keep: keep_for(&cfg),
                        session_ttl: Duration::from_secs(24 * 3600),
                    },
                    record,
                );
                tasks.push(tokio::spawn(agent.clone().run_heartbeats(relay.clone())));
                tasks.push(tokio::spawn(agent.clone().run_events()));
                Some(agent)
            }
            _ => None,
        };
        let svc = service.clone();
        let ag = agent.clone();
        tasks.push(tokio::spawn(async move {
            while let Some((shard, ev)) = ev_rx.recv().await {
                if let Some(a) = &ag {
                    a.on_event(&ev);
                }
                svc.on_event(shard, ev);
            }
        }));

        let control = ControlServer {
            relay: relay.clone(),
            advertise: cfg.advertise.clone(),
            port: cfg.advertise_port,
            secret: None,
            max_connections: cfg.control_max_connections,
            clock,
            service: Some(service.clone()),
        };
        if let Some(path) = cfg.control_socket.clone() {
            let c = control.clone();
            let listener = ControlServer::bind_unix(&path)
                .map_err(|e| with_context(e, "cannot bind control_socket", path.display()))?;
            tasks.push(tokio::spawn(async move {
                if let Err(e) = c.run_unix(listener).await {
                    tracing::error!(error = %e, "control socket stopped");
                }
            }));
        }
        let mut control_addr = None;
        if let Some(addr) = cfg.control_listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| with_context(e, "cannot bind control_listen", addr))?;
            control_addr = Some(l.local_addr()?);
            let c = ControlServer { secret: cfg.control_secret.as_deref().map(Arc::from), ..control };
            tasks.push(tokio::spawn(async move {
                if let Err(e) = c.run_tcp(l).await {
                    tracing::error!(error = %e, "control listener stopped");
                }
            }));
        }

        let jwt = match cfg.jwt_algorithm {
            None => None,
            Some(algorithm) => {
                let settings = crate::control::jwt::JwtSettings {
                    algorithm,
                    secret_file: cfg.jwt_secret_file.clone(),
                    public_key_file: cfg.jwt_public_key_file.clone(),
                    jwks_file: cfg.jwt_jwks_file.clone(),
                    jwks_url: cfg.jwt_jwks_url.clone(),
                    jwks_ca_file: cfg.jwt_jwks_ca_file.clone(),
                    issuer: cfg.jwt_issuer.clone(),
                    audience: cfg.jwt_audience.clone(),
                    leeway_secs: cfg.jwt_leeway.as_secs(),
                    project_claim: cfg.jwt_project_claim.clone(),
                    environment_claim: cfg.jwt_environment_claim.clone(),
                };
                let v = tokio::task::spawn_blocking(move || {
                    crate::control::jwt::JwtVerifier::new(settings, clock)
                })
                .await
                .map_err(io::Error::other)?
                .map_err(|(key, msg)| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("invalid configuration `{key}`: {msg}"),
                    )
                })?;
                if cfg.jwt_jwks_url.is_some() {
                    let r = v.clone();
                    tasks.push(tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(Duration::from_secs(300)).await;
                            let r = r.clone();
                            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || r.refresh(true)).await {
                                tracing::warn!(error = %e, "JWKS refresh failed; keeping the keys already loaded");
                            }
                        }
                    }));
                }
                Some(v)
            }
        };
        let anonymous = cfg.api_anonymous || (cfg.api_tokens.is_empty() && jwt.is_none());
        let auth_mode = match (cfg.api_tokens.is_empty(), &jwt, anonymous) {
            (true, None, _) => "anonymous".to_string(),
            (false, None, a) => format!("static tokens{}", if a { " + anonymous" } else { "" }),
            (t, Some(v), a) => format!(
                "JWT {:?}{}{}",
                v.algorithm(),
                if t { "" } else { " + static tokens" },
                if a { " + anonymous" } else { "" }
            ),
        };
        let limits = api_limits(&cfg, jwt, anonymous);
        let mut state = ApiState::new(service.clone(), limits, clock);
        state.relay_role = role == crate::config::Role::Relay;
        if let Some(a) = &agent {
            let _ = state.agent.set(a.clone());
        }
        state.xdp = match fastpath.as_ref().map(|f| f.observer()) {
            Some(Ok(o)) => Some(Arc::new(o)),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the kernel fast path's counters cannot be read; /metrics leaves them out");
                None
            }
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(cfg.api_listen)
            .await
            .map_err(|e| with_context(e, "cannot bind api_listen", cfg.api_listen))?;
        let api_addr = listener.local_addr()?;
        let (stop_api, stop_rx) = watch::channel(false);
        let app = api::router(state.clone());
        let http_limits = HttpLimits {
            max_connections: api_cap,
            per_source: cfg.api_max_connections_per_ip,
            header_timeout: cfg.api_header_timeout,
        };
        let http_stats = state.http.clone();
        let tls = match (&cfg.api_tls_cert, &cfg.api_tls_key) {
            (Some(cert), Some(key)) => {
                let store = crate::control::tls::CertStore::open(cert.clone(), key.clone()).map_err(|m| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("invalid configuration `api_tls_cert`: {m}"),
                    )
                })?;
                tasks.push(store.watch());
                Some(store)
            }
            _ => None,
        };
        if tls.is_none() && !cfg.api_listen.ip().is_loopback() && !anonymous {
            tracing::warn!(
                "the API is not on loopback and speaks plain HTTP: bearer tokens cross the network in clear text; \
                 set api_tls_cert/api_tls_key or put a TLS-terminating proxy in front"
            );
        }
        let ws_limits = crate::secure::stream::StreamLimits {
            max_connections: cfg.ws_max_connections,
            max_per_ip: cfg.ws_max_connections_per_ip,
            idle_timeout: cfg.ws_idle_timeout,
            ..Default::default()
        };
        if let Some(l) = ws {
            let (shards, stats, stop) = (relay.shards(), state.ws.clone(), stop_rx.clone());
            let limits = ws_limits.clone();
            tasks.push(tokio::spawn(crate::secure::stream::serve(
                l, None, shards, limits, stats, clock, stop,
            )));
        }
        let wss_certs = wss.as_ref().map(|(_, s)| s.clone());
        if let Some((l, store)) = wss {
            tasks.push(store.watch());
            let acceptor = tokio_rustls::TlsAcceptor::from(store.server_config());
            let (shards, stats, stop) = (relay.shards(), state.ws.clone(), stop_rx.clone());
            tasks.push(tokio::spawn(crate::secure::stream::serve(
                l,
                Some(acceptor),
                shards,
                ws_limits,
                stats,
                clock,
                stop,
            )));
        }
        let acceptor = tls.as_ref().map(|s| tokio_rustls::TlsAcceptor::from(s.server_config()));
        let api_task = tokio::spawn(crate::control::http::serve(
            listener,
            app,
            http_limits,
            http_stats,
            clock,
            acceptor,
            stop_rx,
        ));
        tracing::info!(
            api = %api_addr,
            relay = %relay_addr,
            advertise = %format!("{}:{}", cfg.advertise, cfg.advertise_port),
            shards = cfg.shards,
            steering,
            io = if uring { "io_uring" } else { "epoll" },
            gso = cfg.gso,
            stun = cfg.stun,
            qos = cfg.qos,
            dtls = cfg.dtls,
            ws = ?ws_addr,
            wss = ?wss_addr,
            api_auth = %auth_mode,
            api_tls = tls.is_some(),
            api_max_connections = api_cap,
            open_files_limit = nofile,
            region = %cfg.region,
            role = ?role,
            relay_name = fleet.as_ref().map(|f| f.0.as_str()),
            epoch = fleet.as_ref().map(|f| f.1),
            store = store.as_ref().map(|s| s.url()),
            "ferry serving"
        );
        Ok(Self {
            api_addr,
            relay_addr,
            control_addr,
            service,
            state,
            tls,
            wss_certs,
            ws_addr,
            wss_addr,
            config: std::sync::Mutex::new(cfg),
            relay,
            stop_api,
            api_task,
            threads,
            tasks,
            _port_claim: port_claim,
            agent,
            fleet_relay: fleet.map(|f| (f.0, f.1)),
            fastpath,
        })
    }

    /// Applies a new configuration to the running relay: what can change live does (tokens, rate
    /// and join limits, trusted proxies, anonymous access, timeouts, deny list, unconfirmed
    /// budget, STUN, lifecycle logging, tenant limits, the certificate); a changed key that
    /// needs a restart is named in a warning and left as it was. Live sessions keep relaying.
    pub async fn apply_config(&self, mut new: Config) -> Vec<&'static str> {
        let old = self.config.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if new.advertise_port == 0 || new.relay_listen.port() == 0 {
            // Derived from the bound port at start-up, as before.
            new.advertise_port = old.advertise_port;
        }
        let refused = keep_restart_only(&old, &mut new);
        for key in &refused {
            tracing::warn!(key, "reload: `{key}` cannot change while the relay runs; restart to apply it");
        }
        let ms = |d: Duration| d.as_millis() as u64;
        let shards = self
            .relay
            .reconfigure(crate::core::Reconfig {
                policy: AddressPolicy::new(&own_addrs(self.relay_addr), new.deny_sources.clone()),
                unbound_timeout: ms(new.unbound_timeout),
                idle_timeout: ms(new.idle_timeout),
                host_alone_timeout: ms(new.host_alone_timeout),
                rebind_quiet: ms(new.rebind_quiet),
                unconfirmed_budget: new.unconfirmed_budget,
                stun: new.stun,
                qos: new.qos,
                fleet: match &self.fleet_relay {
                    Some((name, epoch)) => match fleet_relay(&new, name, *epoch, &self.state.clock) {
                        Ok(f) => Some(f),
                        Err(e) => {
                            tracing::warn!(error = %e, "reload: fleet keys not reloaded; the old ones stay");
                            None
                        }
                    },
                    None => None,
                },
            })
            .await;
        if let Some(f) = self.service.fleet_api() {
            match crate::fleet::keys::FleetKeys::load(
                new.fleet_key_file.as_deref().unwrap_or(std::path::Path::new("")),
            ) {
                Ok(k) => f.set_keys(k),
                Err(e) => tracing::warn!(error = %e, "reload: fleet keys not reloaded; the old ones stay"),
            }
        }
        let current = self.state.limits();
        let anonymous = new.api_anonymous || (new.api_tokens.is_empty() && current.jwt.is_none());
        self.state.set_limits(api_limits(&new, current.jwt.clone(), anonymous));
        self.service.live.set(new.log_lifecycle, new.log_lifecycle_sample, new.tenant_max_allocations);
        self.reload();
        tracing::info!(shards, refused = refused.len(), "configuration reloaded");
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = new;
        refused
    }

    /// Loads the API's certificate again.
    pub fn reload(&self) {
        if let Some(t) = &self.wss_certs {
            match t.reload() {
                Ok(()) => tracing::info!("SIGHUP: wss certificate reloaded"),
                Err(e) => {
                    tracing::warn!(error = %e, "SIGHUP: wss certificate not reloaded; the old one stays")
                }
            }
        }
        if let Some(t) = &self.tls {
            match t.reload() {
                Ok(()) => tracing::info!("SIGHUP: API certificate reloaded"),
                Err(e) => {
                    tracing::warn!(error = %e, "SIGHUP: API certificate not reloaded; the old one stays")
                }
            }
        }
    }

    /// Whether every shard answers a stats round trip within `within`.
    pub async fn shards_answer(&self, within: Duration) -> bool {
        let n = self.relay.shard_count();
        matches!(tokio::time::timeout(within, self.relay.stats()).await, Ok(s) if s.len() == n)
    }

    /// Live allocations over all shards.
    pub async fn allocations(&self) -> usize {
        self.relay.stats().await.iter().map(|s| s.allocations).sum()
    }

    /// Refuses new allocations and reports not-ready; live sessions keep working.
    pub fn start_draining(&self) {
        if let Some(a) = &self.agent {
            a.start_draining();
        }
        if self.fastpath.is_some() {
            // The last minutes of a relay's sessions go through userspace, so nothing is left
            // in the kernel's hands when the process exits.
            self.relay.withdraw_links();
        }
        self.service.start_draining();
    }

    /// Stops the API, the control sockets and the shards, and waits for them.
    pub async fn shutdown(self) {
        let _ = self.stop_api.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.api_task).await;
        for t in &self.tasks {
            t.abort();
        }
        self.relay.stop();
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        tracing::info!("ferry stopped");
    }
}

/// Runs until SIGINT/SIGTERM. The first signal drains: `/readyz` turns 503 and new allocations
/// are refused while live sessions go on, until none is left or `drain_timeout` passes. A second
/// signal stops at once.
pub async fn serve_until_signal(cfg: Config, reload_from: Option<crate::cli::ServeArgs>) -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let drain = cfg.drain_timeout;
    let role = cfg.role;
    // Handlers first: from the moment "ferry serving" is logged, a signal means "drain", never
    // the default action. A signal that arrives during start-up is kept and handled right after.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let running = Running::start(cfg).await?;
    let notifier = crate::notify::Notifier::from_env().map(Arc::new);
    if let Some(n) = &notifier {
        // Ready means the shards answer, not merely that the sockets are bound.
        if !running.shards_answer(Duration::from_secs(5)).await {
            return Err(io::Error::other("relay shards did not answer at start-up"));
        }
        n.send(&format!("READY=1\nSTATUS=serving: API {}, relay {}", running.api_addr, running.relay_addr));
        if let Some(every) = crate::notify::watchdog_interval() {
            let (n, relay) = (n.clone(), running.relay.clone());
            let half = every / 2;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(half).await;
                    let shards = relay.shard_count();
                    // Keep-alives only while every shard turns over: a wedged relay gets restarted.
                    if matches!(tokio::time::timeout(half, relay.stats()).await, Ok(s) if s.len() == shards) {
                        n.send("WATCHDOG=1");
                    } else {
                        tracing::error!("a shard stopped answering; withholding the watchdog keep-alive");
                    }
                }
            });
        }
    }
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match reload_from.clone().map(|a| a.into_config().and_then(|c| c.for_role(role))) {
                Some(Ok(new)) => {
                    running.apply_config(new).await;
                }
                Some(Err(e)) => tracing::warn!(error = %e, "reload refused: the configuration is not valid; nothing changed"),
                None => running.reload(),
            },
        }
    }
    running.start_draining();
    if let Some(n) = &notifier {
        n.send("STOPPING=1\nSTATUS=draining");
    }
    let left = running.allocations().await;
    tracing::info!(allocations = left, deadline_secs = drain.as_secs_f64(), "draining: no new allocations");
    let deadline = tokio::time::sleep(drain);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => {
                tracing::info!("drain deadline reached");
                break;
            }
            _ = term.recv() => { tracing::info!("second signal: stopping now"); break; }
            _ = int.recv() => { tracing::info!("second signal: stopping now"); break; }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if running.allocations().await == 0 {
                    tracing::info!("drained: no live allocations");
                    break;
                }
            }
        }
    }
    running.shutdown().await;
    Ok(())
}
