//! Validated configuration with documented defaults. No sockets here.
//!
//! Precedence: command-line flag > `FERRY_*` environment variable > TOML file (`--config`) >
//! the defaults below. Every error names the key that caused it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Which datagram backend the shards use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoBackend {
    /// recvmmsg/sendmmsg over epoll.
    Batch,
    /// io_uring: multishot recvmsg into provided buffers, batched sendmsg from the same buffers.
    Uring,
}

/// At what level allocation lifecycle events (created, bound, connected, released) are logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum LifecycleLog {
    Info,
    Debug,
    Off,
}

impl std::str::FromStr for LifecycleLog {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "info" => Ok(Self::Info),
            "debug" => Ok(Self::Debug),
            "off" | "none" => Ok(Self::Off),
            _ => Err(format!("`{s}` is not one of info, debug, off")),
        }
    }
}

/// Parses a JWT algorithm name (the ones Ferry accepts).
pub fn parse_jwt_algorithm(s: &str) -> Result<jsonwebtoken::Algorithm, String> {
    use jsonwebtoken::Algorithm as A;
    match s.trim() {
        "HS256" => Ok(A::HS256),
        "HS512" => Ok(A::HS512),
        "RS256" => Ok(A::RS256),
        "ES256" => Ok(A::ES256),
        "EdDSA" => Ok(A::EdDSA),
        other => Err(format!("`{other}` is not one of HS256, HS512, RS256, ES256, EdDSA")),
    }
}

/// Parses a boolean the way operators write them: `true/false`, `1/0`, `yes/no`, `on/off`
/// (any case).
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("`{s}` is not a boolean (true/false, 1/0, yes/no, on/off)")),
    }
}

/// Which part a process plays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// `ferry serve`: API and relay in one process, with an in-process directory.
    #[default]
    Serve,
    /// `ferry relay`: the data plane of a fleet; registers in the directory.
    Relay,
    /// `ferry api`: an allocations API instance of a fleet; holds no state of its own.
    Api,
}

/// The complete, validated configuration of `ferry serve`.
#[derive(Clone, Debug)]
pub struct Config {
    /// What this process is (set by the subcommand, not a key).
    pub role: Role,
    pub api_listen: SocketAddr,
    pub relay_listen: SocketAddr,
    /// Host clients are told to reach the relay at (`serverEndpoints[].host`).
    pub advertise: String,
    pub advertise_port: u16,
    /// The IPv4 literal of the deprecated `relayServer.ipV4` field; filled by `validate`.
    pub advertise_ipv4: Option<Ipv4Addr>,
    pub region: String,
    pub shards: usize,
    /// Pin shard threads to cores (shard i on core i modulo the core count).
    pub pin_shards: bool,
    /// Attach the reuseport steering program (`bpf/steer.bpf`) when there are several shards.
    pub kernel_steering: bool,
    pub io: IoBackend,
    /// Send runs of same-size datagrams to one destination as one UDP GSO send (either backend).
    pub gso: bool,
    /// Answer STUN Binding requests on the relay port.
    pub stun: bool,
    /// Answer Unity QoS pings (0x59) on the relay port.
    pub qos: bool,
    /// Accept DTLS 1.2 (PSK) sessions on the relay port and advertise the `dtls` endpoint.
    pub dtls: bool,
    /// Largest datagram sent to a DTLS client; Relay messages over `dtls_mtu - 37` bytes are
    /// not sent to one.
    pub dtls_mtu: u16,
    /// DTLS handshakes in progress (past the cookie exchange) per source IP, per shard.
    pub dtls_halfopen_per_ip: u16,
    pub unbound_timeout: Duration,
    pub idle_timeout: Duration,
    pub host_alone_timeout: Duration,
    pub rebind_quiet: Duration,
    pub max_connections_cap: u16,
    pub max_allocations: u32,
    pub join_code_length: usize,
    /// Bearer tokens accepted by the API. Empty: anonymous, loopback only.
    pub api_tokens: Vec<String>,
    /// API requests per second per client IP (and per token), with a burst of twice that.
    pub api_rate_limit: u32,
    /// Failed joins per minute per client IP, and per second across all clients.
    pub join_failures_per_ip_per_min: u32,
    pub join_failures_global_per_sec: u32,
    pub control_socket: Option<PathBuf>,
    pub control_listen: Option<SocketAddr>,
    pub control_secret: Option<String>,
    pub log_format: LogFormat,
    /// Relay secret for connection data (64 bytes); random per process unless set, which a
    /// fleet whose relays must recognise each other's blobs would do.
    pub relay_secret: [u8; 64],
    /// How long SIGTERM waits for live sessions before exiting.
    pub drain_timeout: Duration,
    /// Source prefixes that may never bind (on top of the built-in rules).
    pub deny_sources: Vec<crate::core::Cidr>,
    /// Bytes relayed to a freshly bound address before its client sends anything but BINDs.
    pub unconfirmed_budget: u32,
    /// Most API connections open at once; `None`: sized from the file-descriptor limit.
    pub api_max_connections: Option<usize>,
    /// Most API connections open at once from one IPv4 address or one IPv6 /64.
    pub api_max_connections_per_ip: usize,
    /// Proxies whose `X-Forwarded-For` is believed (the client is the last address they name
    /// that is not itself a trusted proxy).
    pub trusted_proxies: Vec<crate::core::Cidr>,
    /// Failed joins per minute for each API token (apart from anonymous sources' budgets).
    pub join_failures_per_token_per_min: u32,
    /// Requests refused with 401 per minute per client IP before further ones get 429.
    pub auth_failures_per_ip_per_min: u32,
    /// Player tokens (JWT): the algorithm accepted (none: JWT off) and where its keys come from.
    pub jwt_algorithm: Option<jsonwebtoken::Algorithm>,
    pub jwt_secret_file: Option<PathBuf>,
    pub jwt_public_key_file: Option<PathBuf>,
    pub jwt_jwks_file: Option<PathBuf>,
    pub jwt_jwks_url: Option<String>,
    /// CA bundle (PEM) for an https JWKS URL (default: the built-in Mozilla roots).
    pub jwt_jwks_ca_file: Option<PathBuf>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub jwt_leeway: Duration,
    pub jwt_project_claim: String,
    pub jwt_environment_claim: String,
    /// Plain WebSocket listener (`ws` endpoints, or behind a TLS-terminating proxy).
    pub ws_listen: Option<SocketAddr>,
    /// WebSocket over TLS listener (`wss` endpoints, what WebGL builds use); needs
    /// `wss_tls_cert` and `wss_tls_key`.
    pub wss_listen: Option<SocketAddr>,
    pub wss_tls_cert: Option<PathBuf>,
    pub wss_tls_key: Option<PathBuf>,
    /// The DNS name WebSocket clients are told to connect to (a `wss` client checks the
    /// certificate against it) [default: `advertise`].
    pub ws_public_host: Option<String>,
    /// `host:port` of a TLS-terminating proxy in front of `ws_listen`: allocations then list a
    /// `wss` endpoint there instead of the plain `ws` one.
    pub wss_public: Option<String>,
    /// Open WebSocket connections, in all, and per client IP.
    pub ws_max_connections: usize,
    pub ws_max_connections_per_ip: usize,
    /// HTTPS for the API: certificate chain and private key (PEM), reloaded when they change.
    pub api_tls_cert: Option<PathBuf>,
    pub api_tls_key: Option<PathBuf>,
    /// Allow anonymous API clients on a non-loopback listener (LAN parties, development).
    pub api_anonymous: bool,
    /// Tenants (`project/environment`) that get their own metric labels; others count as "other".
    pub tenants: Vec<String>,
    /// Live host allocations per tenant (0: no limit).
    pub tenant_max_allocations: u32,
    /// New allocations per second per tenant (0: no limit).
    pub tenant_allocations_per_sec: u32,
    /// Most control-socket connections open at once (Unix and TCP each).
    pub control_max_connections: usize,
    /// Level of allocation lifecycle log events.
    pub log_lifecycle: LifecycleLog,
    /// Log the lifecycle of one allocation in this many (1: every allocation).
    pub log_lifecycle_sample: u32,
    /// An API connection must deliver each request's headers within this long.
    pub api_header_timeout: Duration,
    /// An API request body must arrive within this long.
    pub api_body_timeout: Duration,
    /// A WebSocket connection that receives nothing for this long is closed.
    pub ws_idle_timeout: Duration,
    /// Fleet mode (`ferry relay`, `ferry api`): the directory's URL.
    pub store: Option<String>,
    /// Fleet mode: CA certificates for a `rediss://` directory.
    pub store_ca_file: Option<PathBuf>,
    /// Fleet mode: the fleet key file (`KID BASE64` per line; the first mints).
    pub fleet_key_file: Option<PathBuf>,
    /// Fleet mode: this relay's unique name [default: the advertised host:port].
    pub relay_name: Option<String>,
    /// Fleet mode: the regions an API instance lists and places in [default: `region`].
    pub regions: Vec<String>,
    pub heartbeat_interval: Duration,
    pub heartbeat_expiry: Duration,
    pub relay_warmup: Duration,
    pub store_timeout: Duration,
    /// The kernel fast path (`docs/fastpath.md`): off, or attached in generic or native mode.
    pub xdp: crate::xdp::XdpMode,
    /// The interface the relay's traffic arrives on, which the fast path attaches to.
    pub xdp_interface: Option<String>,
    /// Linked pairs the fast path holds at once (more stay in userspace).
    pub xdp_max_links: u32,
}

/// A configuration error that names its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration `{}`: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

pub(crate) fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_string(), message: message.into() }
}

pub use ferry_proto::units::parse_duration;

impl Config {
    /// The defaults `ferry serve` runs with when nothing is configured.
    pub fn defaults() -> Self {
        Self {
            role: Role::Serve,
            api_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 7880)),
            relay_listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 7777)),
            advertise: String::new(),
            advertise_port: 0,
            advertise_ipv4: None,
            region: "local".into(),
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pin_shards: true,
            kernel_steering: true,
            gso: true,
            stun: true,
            qos: true,
            dtls: true,
            dtls_mtu: 1400,
            dtls_halfopen_per_ip: 16,
            io: IoBackend::Batch,
            unbound_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(10),
            host_alone_timeout: Duration::from_secs(60),
            rebind_quiet: Duration::from_secs(5),
            max_connections_cap: 100,
            max_allocations: 1 << 20,
            join_code_length: 8,
            api_tokens: Vec::new(),
            api_rate_limit: 50,
            join_failures_per_ip_per_min: 20,
            join_failures_global_per_sec: 20,
            control_socket: None,
            control_listen: None,
            control_secret: None,
            log_format: LogFormat::Text,
            relay_secret: [0; 64],
            drain_timeout: Duration::from_secs(30),
            deny_sources: Vec::new(),
            unconfirmed_budget: 32 * 1024,
            api_max_connections: None,
            api_max_connections_per_ip: 256,
            trusted_proxies: Vec::new(),
            join_failures_per_token_per_min: 120,
            auth_failures_per_ip_per_min: 30,
            control_max_connections: 64,
            jwt_algorithm: None,
            jwt_secret_file: None,
            jwt_public_key_file: None,
            jwt_jwks_file: None,
            jwt_jwks_url: None,
            jwt_jwks_ca_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: Duration::from_secs(30),
            jwt_project_claim: "project_id".into(),
            jwt_environment_claim: "environment_id".into(),
            api_anonymous: false,
            ws_listen: None,
            wss_listen: None,
            wss_tls_cert: None,
            wss_tls_key: None,
            ws_public_host: None,
            wss_public: None,
            ws_max_connections: 20_000,
            ws_max_connections_per_ip: 64,
            api_tls_cert: None,
            api_tls_key: None,
            tenants: Vec::new(),
            tenant_max_allocations: 0,
            tenant_allocations_per_sec: 0,
            log_lifecycle: LifecycleLog::Info,
            log_lifecycle_sample: 1,
            api_header_timeout: Duration::from_secs(5),
            api_body_timeout: Duration::from_secs(10),
            ws_idle_timeout: Duration::from_secs(60),
            store: None,
            store_ca_file: None,
            fleet_key_file: None,
            relay_name: None,
            regions: Vec::new(),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_expiry: Duration::from_secs(3),
            relay_warmup: Duration::from_secs(3),
            store_timeout: Duration::from_secs(1),
            xdp: crate::xdp::XdpMode::Off,
            xdp_interface: None,
            xdp_max_links: 131_072,
        }
    }

    /// The configuration of a fleet role: `store` and `fleet_key_file` are required, and the
    /// key file must parse.
    pub fn for_role(mut self, role: Role) -> Result<Self, ConfigError> {
        self.role = role;
        if role == Role::Serve {
            return Ok(self);
        }
        if self.store.is_none() {
            return Err(err(
                "store",
                "is required by `ferry relay` and `ferry api` (e.g. redis://127.0.0.1:6379)",
            ));
        }
        let Some(path) = &self.fleet_key_file else {
            return Err(err(
                "fleet_key_file",
                "is required by `ferry relay` and `ferry api` (`ferry fleet keygen` writes one)",
            ));
        };
        crate::fleet::keys::FleetKeys::load(path).map_err(|m| err("fleet_key_file", m))?;
        Ok(self)
    }

    /// Checks cross-field rules and fills derived values (advertised host and port).
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        if self.shards == 0 || self.shards > 1024 {
            return Err(err("shards", "must be between 1 and 1024"));
        }
        if !(6..=12).contains(&self.join_code_length) {
            return Err(err("join_code_length", "must be between 6 and 12 (what Unity clients accept)"));
        }
        if !(576..=1472).contains(&self.dtls_mtu) {
            return Err(err("dtls_mtu", "must be between 576 and 1472"));
        }
        if self.dtls_halfopen_per_ip == 0 {
            return Err(err("dtls_halfopen_per_ip", "must be at least 1"));
        }
        if self.max_connections_cap == 0 || self.max_connections_cap > 1024 {
            return Err(err("max_connections_cap", "must be between 1 and 1024"));
        }
        if self.max_allocations < 2 {
            return Err(err("max_allocations", "must be at least 2"));
        }
        for (key, d) in [
            ("unbound_timeout", self.unbound_timeout),
            ("idle_timeout", self.idle_timeout),
            ("host_alone_timeout", self.host_alone_timeout),
        ] {
            if d < Duration::from_millis(10) {
                return Err(err(key, "must be at least 10ms"));
            }
        }
        if self.api_max_connections == Some(0) {
            return Err(err("api_max_connections", "must be at least 1"));
        }
        if self.api_max_connections_per_ip == 0 {
            return Err(err("api_max_connections_per_ip", "must be at least 1"));
        }
        if self.control_max_connections == 0 {
            return Err(err("control_max_connections", "must be at least 1"));
        }
        if self.log_lifecycle_sample == 0 {
            return Err(err("log_lifecycle_sample", "must be at least 1 (1 logs every allocation)"));
        }
        if self.api_header_timeout < Duration::from_millis(10) {
            return Err(err("api_header_timeout", "must be at least 10ms"));
        }
        if self.api_rate_limit == 0 {
            return Err(err("api_rate_limit", "must be at least 1"));
        }
        if self.region.is_empty() || self.region.len() > 64 {
            return Err(err("region", "must be 1 to 64 characters"));
        }
        if self.api_tokens.iter().any(|t| crate::control::jwt::split_static_token(t).0.len() < 16) {
            return Err(err("api_tokens", "each token must be at least 16 characters"));
        }
        let authenticated = !self.api_tokens.is_empty() || self.jwt_algorithm.is_some();
        if !authenticated && !self.api_anonymous && !self.api_listen.ip().is_loopback() {
            return Err(err(
                "api_listen",
                format!(
                    "{} is not a loopback address and neither api_tokens nor jwt_algorithm is set; set one, or \
                     api_anonymous = true to allow anonymous clients on purpose",
                    self.api_listen
                ),
            ));
        }
        match (&self.wss_listen, &self.wss_tls_cert, &self.wss_tls_key) {
            (Some(_), None, _) => return Err(err("wss_tls_cert", "required with wss_listen")),
            (Some(_), _, None) => return Err(err("wss_tls_key", "required with wss_listen")),
            (None, Some(_), _) | (None, _, Some(_)) => {
                return Err(err("wss_listen", "required with wss_tls_cert/wss_tls_key"))
            }
            _ => {}
        }
        if let Some(p) = &self.wss_public {
            if self.ws_listen.is_none() {
                return Err(err("wss_public", "names the proxy in front of ws_listen, which is not set"));
            }
            match p.rsplit_once(':').map(|(h, port)| (h, port.parse::<u16>())) {
                Some((h, Ok(port))) if !h.is_empty() && port != 0 => {}
                _ => return Err(err("wss_public", "must be host:port")),
            }
        }
        if self.heartbeat_interval < Duration::from_millis(50)
            || self.heartbeat_interval > Duration::from_secs(60)
        {
            return Err(err("heartbeat_interval", "must be between 50ms and 60s"));
        }
        if self.heartbeat_expiry <= self.heartbeat_interval {
            return Err(err("heartbeat_expiry", "must be longer than heartbeat_interval (a few heartbeats)"));
        }
        if self.store_timeout < Duration::from_millis(10) || self.store_timeout > Duration::from_secs(30) {
            return Err(err("store_timeout", "must be between 10ms and 30s"));
        }
        if self.xdp != crate::xdp::XdpMode::Off {
            let Some(ifname) = &self.xdp_interface else {
                return Err(err(
                    "xdp_interface",
                    format!("required with xdp = {} (the relay's interface)", self.xdp),
                ));
            };
            if crate::xdp::if_index(ifname).is_none() {
                return Err(err("xdp_interface", format!("no interface named `{ifname}` here")));
            }
        }
        if !(1..=16_777_216).contains(&self.xdp_max_links) {
            return Err(err("xdp_max_links", "must be between 1 and 16777216"));
        }
        if let Some(r) = self.regions.iter().find(|r| r.trim().is_empty()) {
            return Err(err("regions", format!("`{r}` is not a region ID")));
        }
        if self.regions.is_empty() {
            self.regions = vec![self.region.clone()];
        }
        if let Some(s) = &self.store {
            let st = crate::fleet::store::Store::open(s, self.store_timeout).map_err(|m| err("store", m))?;
            if let Some(ca) = &self.store_ca_file {
                st.with_ca_file(ca).map_err(|m| err("store_ca_file", m))?;
            }
        }
        if self.ws_idle_timeout < Duration::from_secs(1) {
            return Err(err("ws_idle_timeout", "must be at least 1s"));
        }
        if self.ws_max_connections == 0 || self.ws_max_connections_per_ip == 0 {
            return Err(err("ws_max_connections", "must be at least 1 (also ws_max_connections_per_ip)"));
        }
        match (&self.api_tls_cert, &self.api_tls_key) {
            (Some(_), None) => return Err(err("api_tls_key", "required with api_tls_cert")),
            (None, Some(_)) => return Err(err("api_tls_cert", "required with api_tls_key")),
            _ => {}
        }
        if let Some(u) = &self.jwt_jwks_url {
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                return Err(err("jwt_jwks_url", format!("`{u}` is not an https:// or http:// URL")));
            }
        }
        if self.jwt_algorithm.is_none()
            && (self.jwt_secret_file.is_some()
                || self.jwt_public_key_file.is_some()
                || self.jwt_jwks_file.is_some()
                || self.jwt_jwks_url.is_some())
        {
            return Err(err(
                "jwt_algorithm",
                "required when JWT keys are configured (HS256, HS512, RS256, ES256 or EdDSA)",
            ));
        }
        if let Some(addr) = self.control_listen {
            if !addr.ip().is_loopback() {
                return Err(err(
                    "control_listen",
                    "must be a loopback address (use control_socket for a Unix socket)",
                ));
            }
            if self.control_secret.as_deref().is_none_or(|s| s.len() < 16) {
                return Err(err(
                    "control_secret",
                    "required (at least 16 characters) when control_listen is set",
                ));
            }
        }
        if self.advertise_port == 0 {
            self.advertise_port = self.relay_listen.port();
        }
        if self.advertise.is_empty() {
            self.advertise = derive_advertise(&self.relay_listen, &self.api_listen).to_string();
        } else if self.advertise.parse::<IpAddr>().is_err() && !valid_hostname(&self.advertise) {
            return Err(err(
                "advertise",
                format!("`{}` is neither an IP address nor a host name", self.advertise),
            ));
        }
        if self.advertise_ipv4.is_none() {
            let literal = match self.advertise.parse::<IpAddr>() {
                Ok(IpAddr::V4(v4)) => Some(v4),
                Ok(IpAddr::V6(v6)) => v6.to_ipv4_mapped(),
                Err(_) => None,
            };
            // A DNS name or an IPv6 address: the field must still hold an IPv4 literal.
            self.advertise_ipv4 = Some(literal.unwrap_or_else(|| {
                match derive_advertise(&self.relay_listen, &self.api_listen) {
                    IpAddr::V4(v4) => v4,
                    IpAddr::V6(_) => first_interface_v4().unwrap_or(Ipv4Addr::LOCALHOST),
                }
            }));
        }
        if self.relay_secret == [0; 64] {
            getrandom::getrandom(&mut self.relay_secret).map_err(|e| err("relay_secret", e.to_string()))?;
        }
        Ok(self)
    }
}

fn valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        })
}

/// The relay's own IP if it listens on one; loopback when the API is loopback-only (the clients
/// are local); otherwise the first non-loopback, non-link-local IPv4 address of an interface.
fn derive_advertise(relay: &SocketAddr, api: &SocketAddr) -> IpAddr {
    if !relay.ip().is_unspecified() {
        return relay.ip();
    }
    if api.ip().is_loopback() {
        return IpAddr::V4(Ipv4Addr::LOCALHOST);
    }
    first_interface_v4().map(IpAddr::V4).unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

fn first_interface_v4() -> Option<Ipv4Addr> {
    interface_ips().into_iter().find_map(|ip| match ip {
        IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified() => Some(v4),
        _ => None,
    })
}

/// The addresses of this machine's interfaces that are up (IPv4 and IPv6).
pub fn interface_ips() -> Vec<IpAddr> {
    let mut ifs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifs) } != 0 {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut cur = ifs;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() && ifa.ifa_flags & libc::IFF_UP as u32 != 0 {
            // SAFETY: ifa_addr is non-null and points at a sockaddr of the family it names.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                found.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                found.push(IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `ifs` came from getifaddrs.
    unsafe { libc::freeifaddrs(ifs) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans() {
        for t in ["true", "1", "yes", "on", "ON", " True "] {
            assert_eq!(parse_bool(t), Ok(true), "{t}");
        }
        for f in ["false", "0", "no", "off", "Off"] {
            assert_eq!(parse_bool(f), Ok(false), "{f}");
        }
        assert!(parse_bool("2").is_err());
        assert!(parse_bool("").is_err());
    }

    #[test]
    fn defaults_validate_and_advertise_loopback() {
        let c = Config::defaults().validate().unwrap();
        assert_eq!(c.advertise, "127.0.0.1");
        assert_eq!(c.advertise_port, 7777);
        assert_ne!(c.relay_secret, [0; 64]);
        assert_eq!(c.advertise_ipv4, Some(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn relay_server_ipv4_is_always_an_ipv4_literal() {
        for (advertise, want) in [
            ("relay.example.com", Some(Ipv4Addr::LOCALHOST)),
            ("2001:db8::7", Some(Ipv4Addr::LOCALHOST)),
            ("::ffff:192.0.2.9", Some(Ipv4Addr::new(192, 0, 2, 9))),
            ("198.51.100.4", Some(Ipv4Addr::new(198, 51, 100, 4))),
        ] {
            let mut c = Config::defaults();
            c.advertise = advertise.into();
            let c = c.validate().unwrap();
            assert_eq!(c.advertise_ipv4, want, "{advertise}");
            assert_eq!(c.advertise, advertise);
        }
        let mut c = Config::defaults();
        c.advertise = "relay.example.com".into();
        c.advertise_ipv4 = Some(Ipv4Addr::new(203, 0, 113, 1));
        assert_eq!(c.validate().unwrap().advertise_ipv4, Some(Ipv4Addr::new(203, 0, 113, 1)));
    }

    #[test]
    fn errors_name_their_key() {
        let mut c = Config::defaults();
        c.api_listen = "0.0.0.0:7880".parse().unwrap();
        assert_eq!(c.validate().unwrap_err().key, "api_listen");
        let mut c = Config::defaults();
        c.join_code_length = 5;
        assert_eq!(c.validate().unwrap_err().key, "join_code_length");
        let mut c = Config::defaults();
        c.control_listen = Some("127.0.0.1:7881".parse().unwrap());
        assert_eq!(c.validate().unwrap_err().key, "control_secret");
        let mut c = Config::defaults();
        c.advertise = "bad host!".into();
        assert_eq!(c.validate().unwrap_err().key, "advertise");
    }
}
