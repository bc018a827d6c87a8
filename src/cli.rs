//! Command line: every `serve` flag is also a `FERRY_*` environment variable and a key of the
//! optional TOML file given with `--config`. Precedence: flag > env > file > defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::config::{
    err, parse_bool, parse_duration, Config, ConfigError, IoBackend, LifecycleLog, LogFormat,
};

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "A self-hostable UDP relay for online games, speaking Unity Relay's protocol"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the allocations API and the relay.
    Serve(Box<ServeArgs>),
    /// Run a fleet relay: the data plane, registered in the directory (`--store`, `--fleet-key-file`).
    Relay(Box<ServeArgs>),
    /// Run a fleet API instance: stateless, on the directory (`--store`, `--fleet-key-file`).
    Api(Box<ServeArgs>),
    /// Look after a fleet: its relays, its event stream, fleet keys.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Run a full allocate → join code → join → bind → connect → relay round trip against an API.
    Demo(DemoArgs),
    /// Carry any UDP game through Ferry: `tunnel host` next to a game server, `tunnel join CODE`
    /// next to a game client.
    #[command(subcommand)]
    Tunnel(crate::client::tunnel::cli::TunnelCommand),
    /// Operate a running relay through its control socket: counters, releasing an allocation.
    Ctl(CtlArgs),
    /// Generate load against a Ferry deployment (or a baseline) and measure it.
    Load(Box<crate::load::LoadArgs>),
    /// The B1 ideal forwarder used as a benchmark baseline (recvmmsg → lookup → sendmmsg).
    #[command(hide = true)]
    BenchB1(B1Args),
    /// Holds an XDP program that passes everything on an interface (the far end of a veth pair
    /// in the fast-path benchmark) until killed.
    #[command(hide = true)]
    BenchXdpPass(XdpPassArgs),
    /// Sets up sessions, then sends their RELAYs as raw frames from the kernel's page pool (the
    /// fast-path benchmark's NIC-like source).
    #[command(hide = true)]
    BenchXdpGen(crate::load::live::LiveArgs),
}

#[derive(Args, Debug)]
pub struct XdpPassArgs {
    #[arg(long)]
    pub interface: String,
    /// Count and drop RELAY datagrams instead, writing "packets bytes" to this file every 100 ms.
    #[arg(long)]
    pub sink: Option<std::path::PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
pub enum FleetCommand {
    /// Regions and their relays: state, epoch, uptime, load against capacity, heartbeat age.
    Status(FleetStatusArgs),
    /// The allocation lifecycle event stream (created, bound, closed), oldest first.
    Events(FleetEventsArgs),
    /// Print a new fleet key line (`KID BASE64`) for the fleet key file.
    Keygen {
        /// The key ID (0-255); use a new one for each rotation.
        #[arg(long, default_value_t = 1)]
        kid: u8,
    },
}

#[derive(Args, Debug)]
pub struct FleetStatusArgs {
    /// The fleet directory URL.
    #[arg(long, env = "FERRY_STORE")]
    pub store: String,
    /// CA certificates (PEM) for a rediss:// directory.
    #[arg(long, env = "FERRY_STORE_CA_FILE")]
    pub store_ca_file: Option<PathBuf>,
    /// A relay whose heartbeat is older than this shows as stale [default: 3s].
    #[arg(long, env = "FERRY_HEARTBEAT_EXPIRY", value_parser = duration_arg, default_value = "3s")]
    pub heartbeat_expiry: Duration,
    /// A relay up for less than this shows as warming [default: 3s].
    #[arg(long, env = "FERRY_RELAY_WARMUP", value_parser = duration_arg, default_value = "3s")]
    pub relay_warmup: Duration,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct FleetEventsArgs {
    #[arg(long, env = "FERRY_STORE")]
    pub store: String,
    /// CA certificates (PEM) for a rediss:// directory.
    #[arg(long, env = "FERRY_STORE_CA_FILE")]
    pub store_ca_file: Option<PathBuf>,
    /// Start after this stream ID (`0`: from the oldest kept).
    #[arg(long, default_value = "0")]
    pub after: String,
    /// Keep waiting for new events.
    #[arg(long)]
    pub follow: bool,
    /// Stop after this many events (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub count: usize,
}

#[derive(Args, Debug)]
pub struct B1Args {
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
    /// Pin the forwarder to this core.
    #[arg(long)]
    pub pin: Option<usize>,
}

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The relay's control socket (`control_socket`).
    #[arg(long, env = "FERRY_CONTROL_SOCKET", conflicts_with = "tcp")]
    pub socket: Option<PathBuf>,
    /// The relay's loopback control listener (`control_listen`), with --secret.
    #[arg(long)]
    pub tcp: Option<SocketAddr>,
    /// The control secret for --tcp.
    #[arg(long, env = "FERRY_CONTROL_SECRET")]
    pub secret: Option<String>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// The relay's state: draining, shards, allocations, packet totals.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Live allocations: ID, role, age, bound address, peers, bytes relayed.
    Allocations {
        #[arg(long)]
        json: bool,
        /// Only hosts or only joiners.
        #[arg(long)]
        role: Option<String>,
        /// Only the joiners of this host (and the host).
        #[arg(long)]
        host: Option<String>,
        /// Only allocations that never bound.
        #[arg(long)]
        unbound: bool,
    },
    /// Print the relay's counters (Prometheus text).
    Stats,
    /// Release an allocation at once: a joiner frees its host's slot, a host ends its session.
    #[command(alias = "release")]
    Kick {
        /// The allocation ID (UUID).
        id: String,
    },
    /// Stop taking new allocations; live sessions keep working (`/readyz` turns 503).
    Drain,
    /// Take new allocations again.
    Undrain,
    /// Re-read the configuration and apply what can change live (as SIGHUP does).
    Reload,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Base URL of the allocations API.
    #[arg(long, env = "FERRY_API", default_value = "http://127.0.0.1:7880")]
    pub api: String,
    /// Bearer token, if the API requires one.
    #[arg(long, env = "FERRY_TOKEN")]
    pub token: Option<String>,
    /// Message the joiner sends to the host.
    #[arg(long, default_value = "hello through ferry")]
    pub message: String,
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

fn bool_arg(s: &str) -> Result<bool, String> {
    parse_bool(s)
}

fn jwt_alg_arg(s: &str) -> Result<jsonwebtoken::Algorithm, String> {
    crate::config::parse_jwt_algorithm(s)
}

fn log_format_arg(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected `text` or `json`".into()),
    }
}

fn io_arg(s: &str) -> Result<IoBackend, String> {
    match s {
        "batch" | "epoll" => Ok(IoBackend::Batch),
        "uring" | "io_uring" => Ok(IoBackend::Uring),
        _ => Err("expected `batch` (epoll) or `uring`".into()),
    }
}

#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML file with any of the keys below (underscores instead of dashes).
    #[arg(long, env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Allocations API listen address [default: 127.0.0.1:7880].
    #[arg(long, env = "FERRY_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// Relay UDP listen address [default: 0.0.0.0:7777].
    #[arg(long, env = "FERRY_RELAY_LISTEN")]
    pub relay_listen: Option<SocketAddr>,
    /// Host (IP or DNS name) clients are told to reach the relay at [default: derived].
    #[arg(long, env = "FERRY_ADVERTISE")]
    pub advertise: Option<String>,
    /// Port clients are told to reach the relay at [default: the relay's port].
    #[arg(long, env = "FERRY_ADVERTISE_PORT")]
    pub advertise_port: Option<u16>,
    /// IPv4 literal for the deprecated relayServer.ipV4 field [default: advertise if it is an
    /// IPv4 address, else derived like advertise].
    #[arg(long, env = "FERRY_ADVERTISE_IPV4")]
    pub advertise_ipv4: Option<std::net::Ipv4Addr>,
    /// Region ID reported by /v1/regions and in allocations [default: local].
    #[arg(long, env = "FERRY_REGION")]
    pub region: Option<String>,
    /// Number of relay shards (threads) [default: one per available core].
    #[arg(long, env = "FERRY_SHARDS")]
    pub shards: Option<usize>,
    /// Pin each shard thread to a core [default: true].
    #[arg(long, env = "FERRY_PIN_SHARDS", value_parser = bool_arg)]
    pub pin_shards: Option<bool>,
    /// Steer datagrams to their owner shard in the kernel (classic BPF) [default: true].
    #[arg(long, env = "FERRY_KERNEL_STEERING", value_parser = bool_arg)]
    pub kernel_steering: Option<bool>,
    /// Send runs of same-size datagrams to one destination as one UDP GSO send; turned off by
    /// itself where the kernel cannot do GSO [default: true].
    #[arg(long, env = "FERRY_GSO", value_parser = bool_arg)]
    pub gso: Option<bool>,
    /// Answer STUN Binding requests on the relay port [default: true].
    #[arg(long, env = "FERRY_STUN", value_parser = bool_arg)]
    pub stun: Option<bool>,
    /// Answer Unity QoS pings on the relay port, for clients choosing a region [default: true].
    #[arg(long, env = "FERRY_QOS", value_parser = bool_arg)]
    pub qos: Option<bool>,
    /// Accept DTLS 1.2 (PSK) sessions on the relay port and advertise the `dtls` endpoint
    /// [default: true].
    #[arg(long, env = "FERRY_DTLS", value_parser = bool_arg)]
    pub dtls: Option<bool>,
    /// Largest datagram sent to a DTLS client [default: 1400, Unity Transport's].
    #[arg(long, env = "FERRY_DTLS_MTU")]
    pub dtls_mtu: Option<u16>,
    /// DTLS handshakes in progress per source IP, per shard [default: 16].
    #[arg(long, env = "FERRY_DTLS_HALFOPEN_PER_IP")]
    pub dtls_halfopen_per_ip: Option<u16>,
    /// Datagram backend: batch (recvmmsg/sendmmsg on epoll) or uring [default: batch].
    #[arg(long, env = "FERRY_IO", value_parser = io_arg)]
    pub io: Option<IoBackend>,
    /// Expiry of an allocation never bound [default: 60s].
    #[arg(long, env = "FERRY_UNBOUND_TIMEOUT", value_parser = duration_arg)]
    pub unbound_timeout: Option<Duration>,
    /// Expiry of a bound allocation with no traffic [default: 10s].
    #[arg(long, env = "FERRY_IDLE_TIMEOUT", value_parser = duration_arg)]
    pub idle_timeout: Option<Duration>,
    /// Expiry of a bound host with no peer [default: 60s].
    #[arg(long, env = "FERRY_HOST_ALONE_TIMEOUT", value_parser = duration_arg)]
    pub host_alone_timeout: Option<Duration>,
    /// Silence after which a valid BIND from a new address moves the binding [default: 5s].
    #[arg(long, env = "FERRY_REBIND_QUIET", value_parser = duration_arg)]
    pub rebind_quiet: Option<Duration>,
    /// Largest maxConnections a host may ask for [default: 100].
    #[arg(long, env = "FERRY_MAX_CONNECTIONS_CAP")]
    pub max_connections_cap: Option<u16>,
    /// Most allocations per shard [default: 1048576].
    #[arg(long, env = "FERRY_MAX_ALLOCATIONS")]
    pub max_allocations: Option<u32>,
    /// Join code length, 6 to 12 [default: 8].
    #[arg(long, env = "FERRY_JOIN_CODE_LENGTH")]
    pub join_code_length: Option<usize>,
    /// Accepted bearer tokens, comma separated (env) or repeated (flag).
    #[arg(long = "api-token", env = "FERRY_API_TOKENS", value_delimiter = ',')]
    pub api_tokens: Option<Vec<String>>,
    /// API requests per second per client IP and per token [default: 50].
    #[arg(long, env = "FERRY_API_RATE_LIMIT")]
    pub api_rate_limit: Option<u32>,
    /// Failed joins per minute per client IP [default: 20].
    #[arg(long, env = "FERRY_JOIN_FAILURES_PER_IP_PER_MIN")]
    pub join_failures_per_ip_per_min: Option<u32>,
    /// Failed joins per second over all clients [default: 20].
    #[arg(long, env = "FERRY_JOIN_FAILURES_GLOBAL_PER_SEC")]
    pub join_failures_global_per_sec: Option<u32>,
    /// Unix socket path of the control interface.
    #[arg(long, env = "FERRY_CONTROL_SOCKET")]
    pub control_socket: Option<PathBuf>,
    /// Loopback TCP address of the control interface (needs --control-secret).
    #[arg(long, env = "FERRY_CONTROL_LISTEN")]
    pub control_listen: Option<SocketAddr>,
    /// Shared secret for the TCP control interface.
    #[arg(long, env = "FERRY_CONTROL_SECRET")]
    pub control_secret: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "FERRY_LOG_FORMAT", value_parser = log_format_arg)]
    pub log_format: Option<LogFormat>,
    /// Relay secret (base64 of 64 bytes) for connection data [default: random per process].
    #[arg(long, env = "FERRY_RELAY_SECRET")]
    pub relay_secret: Option<String>,
    /// How long SIGTERM lets live sessions run before exiting [default: 30s].
    #[arg(long, env = "FERRY_DRAIN_TIMEOUT", value_parser = duration_arg)]
    pub drain_timeout: Option<Duration>,
    /// Source prefixes that may never bind, comma separated (env) or repeated (flag).
    #[arg(long = "deny-source", env = "FERRY_DENY_SOURCES", value_delimiter = ',')]
    pub deny_sources: Option<Vec<crate::core::Cidr>>,
    /// Bytes relayed to a new binding before its client sends anything but BINDs [default: 32768].
    #[arg(long, env = "FERRY_UNCONFIRMED_BUDGET")]
    pub unconfirmed_budget: Option<u32>,
    /// Most API connections open at once [default: sized from the file-descriptor limit].
    #[arg(long, env = "FERRY_API_MAX_CONNECTIONS")]
    pub api_max_connections: Option<usize>,
    /// Most API connections open at once from one IPv4 address or IPv6 /64 [default: 256].
    #[arg(long, env = "FERRY_API_MAX_CONNECTIONS_PER_IP")]
    pub api_max_connections_per_ip: Option<usize>,
    /// Proxies whose X-Forwarded-For is believed, comma separated (env) or repeated (flag).
    #[arg(long = "trusted-proxy", env = "FERRY_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<crate::core::Cidr>>,
    /// Failed joins per minute for each API token [default: 120].
    #[arg(long, env = "FERRY_JOIN_FAILURES_PER_TOKEN_PER_MIN")]
    pub join_failures_per_token_per_min: Option<u32>,
    /// Requests refused with 401 per minute per client IP before 429 [default: 30].
    #[arg(long, env = "FERRY_AUTH_FAILURES_PER_IP_PER_MIN")]
    pub auth_failures_per_ip_per_min: Option<u32>,
    /// JWT algorithm for player tokens: HS256, HS512, RS256, ES256 or EdDSA [default: JWT off].
    #[arg(long, env = "FERRY_JWT_ALGORITHM", value_parser = jwt_alg_arg)]
    pub jwt_algorithm: Option<jsonwebtoken::Algorithm>,
    /// File holding the HS256/HS512 shared secret (32+ bytes).
    #[arg(long, env = "FERRY_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key for RS256/ES256/EdDSA.
    #[arg(long, env = "FERRY_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// JWKS file with the verification keys.
    #[arg(long, env = "FERRY_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,
    /// JWKS URL (https:// or http://), fetched at start-up, every 5 minutes and on an unknown kid.
    #[arg(long, env = "FERRY_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,
    /// CA bundle (PEM) trusted for an https JWKS URL [default: the built-in Mozilla roots].
    #[arg(long, env = "FERRY_JWT_JWKS_CA_FILE")]
    pub jwt_jwks_ca_file: Option<PathBuf>,
    /// Required `iss` claim.
    #[arg(long, env = "FERRY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "FERRY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock leeway for `exp`/`nbf` [default: 30s].
    #[arg(long, env = "FERRY_JWT_LEEWAY", value_parser = duration_arg)]
    pub jwt_leeway: Option<Duration>,
    /// Claim naming the caller's project [default: project_id].
    #[arg(long, env = "FERRY_JWT_PROJECT_CLAIM")]
    pub jwt_project_claim: Option<String>,
    /// Claim naming the caller's environment [default: environment_id].
    #[arg(long, env = "FERRY_JWT_ENVIRONMENT_CLAIM")]
    pub jwt_environment_claim: Option<String>,
    /// Plain WebSocket listener, e.g. 0.0.0.0:7780 (`ws` endpoints, or behind a TLS proxy).
    #[arg(long, env = "FERRY_WS_LISTEN")]
    pub ws_listen: Option<SocketAddr>,
    /// WebSocket-over-TLS listener, e.g. 0.0.0.0:7781 (`wss` endpoints, for WebGL builds).
    #[arg(long, env = "FERRY_WSS_LISTEN")]
    pub wss_listen: Option<SocketAddr>,
    /// Certificate chain (PEM) of the `wss` listener, reloaded when it changes or on SIGHUP.
    #[arg(long, env = "FERRY_WSS_TLS_CERT")]
    pub wss_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the `wss` listener.
    #[arg(long, env = "FERRY_WSS_TLS_KEY")]
    pub wss_tls_key: Option<PathBuf>,
    /// DNS name WebSocket clients are told to use [default: the advertise host].
    #[arg(long, env = "FERRY_WS_PUBLIC_HOST")]
    pub ws_public_host: Option<String>,
    /// host:port of a TLS-terminating proxy in front of the ws listener, listed as `wss`.
    #[arg(long, env = "FERRY_WSS_PUBLIC")]
    pub wss_public: Option<String>,
    /// Open WebSocket connections in all [default: 20000].
    #[arg(long, env = "FERRY_WS_MAX_CONNECTIONS")]
    pub ws_max_connections: Option<usize>,
    /// Open WebSocket connections per client IP [default: 64].
    #[arg(long, env = "FERRY_WS_MAX_CONNECTIONS_PER_IP")]
    pub ws_max_connections_per_ip: Option<usize>,
    /// HTTPS for the API: certificate chain (PEM), reloaded when it changes or on SIGHUP.
    #[arg(long, env = "FERRY_API_TLS_CERT")]
    pub api_tls_cert: Option<PathBuf>,
    /// HTTPS for the API: private key (PEM).
    #[arg(long, env = "FERRY_API_TLS_KEY")]
    pub api_tls_key: Option<PathBuf>,
    /// Allow anonymous API clients on a non-loopback listener [default: false].
    #[arg(long, env = "FERRY_API_ANONYMOUS", value_parser = bool_arg)]
    pub api_anonymous: Option<bool>,
    /// Tenants (project/environment) with their own metric labels, comma separated or repeated.
    #[arg(long = "tenant", env = "FERRY_TENANTS", value_delimiter = ',')]
    pub tenants: Option<Vec<String>>,
    /// Live host allocations per tenant, 0 for no limit [default: 0].
    #[arg(long, env = "FERRY_TENANT_MAX_ALLOCATIONS")]
    pub tenant_max_allocations: Option<u32>,
    /// New allocations per second per tenant, 0 for no limit [default: 0].
    #[arg(long, env = "FERRY_TENANT_ALLOCATIONS_PER_SEC")]
    pub tenant_allocations_per_sec: Option<u32>,
    /// Most control-socket connections open at once [default: 64].
    #[arg(long, env = "FERRY_CONTROL_MAX_CONNECTIONS")]
    pub control_max_connections: Option<usize>,
    /// Level of allocation lifecycle log events: info, debug or off [default: info].
    #[arg(long, env = "FERRY_LOG_LIFECYCLE")]
    pub log_lifecycle: Option<LifecycleLog>,
    /// Log the lifecycle of one allocation in N [default: 1, every allocation].
    #[arg(long, env = "FERRY_LOG_LIFECYCLE_SAMPLE")]
    pub log_lifecycle_sample: Option<u32>,
    /// Time an API client has to send each request's headers [default: 5s].
    #[arg(long, env = "FERRY_API_HEADER_TIMEOUT", value_parser = duration_arg)]
    pub api_header_timeout: Option<Duration>,
    /// Time an API client has to send a request body [default: 10s].
    #[arg(long, env = "FERRY_API_BODY_TIMEOUT", value_parser = duration_arg)]
    pub api_body_timeout: Option<Duration>,
    /// A WebSocket connection that receives nothing for this long is closed [default: 60s].
    #[arg(long, env = "FERRY_WS_IDLE_TIMEOUT", value_parser = duration_arg)]
    pub ws_idle_timeout: Option<Duration>,
    /// Fleet directory URL: redis://, rediss:// (TLS) or redis+sentinel://h:p[,h:p]/MASTER
    /// (`ferry relay` and `ferry api`).
    #[arg(long, env = "FERRY_STORE")]
    pub store: Option<String>,
    /// File of fleet keys, `KID BASE64` per line, the first one minting (`ferry fleet keygen`).
    #[arg(long, env = "FERRY_FLEET_KEY_FILE")]
    pub fleet_key_file: Option<PathBuf>,
    /// This relay's name in the fleet, unique [default: the advertised host:port].
    #[arg(long, env = "FERRY_RELAY_NAME")]
    pub relay_name: Option<String>,
    /// Regions an API instance lists and places in, comma separated [default: its region].
    #[arg(long = "regions", env = "FERRY_REGIONS", value_delimiter = ',')]
    pub regions: Option<Vec<String>>,
    /// How often a relay heartbeats [default: 1s].
    #[arg(long, env = "FERRY_HEARTBEAT_INTERVAL", value_parser = duration_arg)]
    pub heartbeat_interval: Option<Duration>,
    /// A relay whose last heartbeat is older than this gets no placement [default: 3s].
    #[arg(long, env = "FERRY_HEARTBEAT_EXPIRY", value_parser = duration_arg)]
    pub heartbeat_expiry: Option<Duration>,
    /// A relay gets new hosts once it has been up this long [default: 3s].
    #[arg(long, env = "FERRY_RELAY_WARMUP", value_parser = duration_arg)]
    pub relay_warmup: Option<Duration>,
    /// CA certificates (PEM) a rediss:// directory is verified against [default: system roots].
    #[arg(long, env = "FERRY_STORE_CA_FILE")]
    pub store_ca_file: Option<PathBuf>,
    /// Deadline of each fleet directory operation [default: 1s].
    #[arg(long, env = "FERRY_STORE_TIMEOUT", value_parser = duration_arg)]
    pub store_timeout: Option<Duration>,
    /// The kernel fast path: off, generic or native XDP on `--xdp-interface` [default: off].
    #[arg(long, env = "FERRY_XDP")]
    pub xdp: Option<crate::xdp::XdpMode>,
    /// The interface the relay's traffic arrives on (for `--xdp`).
    #[arg(long, env = "FERRY_XDP_INTERFACE")]
    pub xdp_interface: Option<String>,
    /// Linked pairs the fast path holds at once; more stay in userspace [default: 131072].
    #[arg(long, env = "FERRY_XDP_MAX_LINKS")]
    pub xdp_max_links: Option<u32>,
}

/// A boolean in the TOML file: `true`, `1`, `"yes"`, `"on"`, …
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum FileBool {
    Bool(bool),
    Int(i64),
    Text(String),
}

fn file_bool(key: &str, b: Option<FileBool>) -> Result<Option<bool>, ConfigError> {
    match b {
        None => Ok(None),
        Some(FileBool::Bool(v)) => Ok(Some(v)),
        Some(FileBool::Int(i)) => parse_bool(&i.to_string()).map(Some).map_err(|m| err(key, m)),
        Some(FileBool::Text(t)) => parse_bool(&t).map(Some).map_err(|m| err(key, m)),
    }
}

/// A duration in the TOML file: `"10s"`, `"250ms"`, or a number of seconds.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum FileDuration {
    Secs(f64),
    Text(String),
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    api_listen: Option<SocketAddr>,
    relay_listen: Option<SocketAddr>,
    advertise: Option<String>,
    advertise_port: Option<u16>,
    advertise_ipv4: Option<std::net::Ipv4Addr>,
    region: Option<String>,
    shards: Option<usize>,
    pin_shards: Option<FileBool>,
    kernel_steering: Option<FileBool>,
    gso: Option<FileBool>,
    stun: Option<FileBool>,
    qos: Option<FileBool>,
    dtls: Option<FileBool>,
    dtls_mtu: Option<u16>,
    dtls_halfopen_per_ip: Option<u16>,
    io: Option<IoBackend>,
    unbound_timeout: Option<FileDuration>,
    idle_timeout: Option<FileDuration>,
    host_alone_timeout: Option<FileDuration>,
    rebind_quiet: Option<FileDuration>,
    max_connections_cap: Option<u16>,
    max_allocations: Option<u32>,
    join_code_length: Option<usize>,
    api_tokens: Option<Vec<String>>,
    api_rate_limit: Option<u32>,
    join_failures_per_ip_per_min: Option<u32>,
    join_failures_global_per_sec: Option<u32>,
    control_socket: Option<PathBuf>,
    control_listen: Option<SocketAddr>,
    control_secret: Option<String>,
    log_format: Option<LogFormat>,
    relay_secret: Option<String>,
    drain_timeout: Option<FileDuration>,
    deny_sources: Option<Vec<String>>,
    unconfirmed_budget: Option<u32>,
    api_max_connections: Option<usize>,
    api_max_connections_per_ip: Option<usize>,
    trusted_proxies: Option<Vec<String>>,
    join_failures_per_token_per_min: Option<u32>,
    auth_failures_per_ip_per_min: Option<u32>,
    control_max_connections: Option<usize>,
    jwt_algorithm: Option<String>,
    jwt_secret_file: Option<PathBuf>,
    jwt_public_key_file: Option<PathBuf>,
    jwt_jwks_file: Option<PathBuf>,
    jwt_jwks_url: Option<String>,
    jwt_jwks_ca_file: Option<PathBuf>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    jwt_leeway: Option<FileDuration>,
    jwt_project_claim: Option<String>,
    jwt_environment_claim: Option<String>,
    api_anonymous: Option<FileBool>,
    ws_listen: Option<SocketAddr>,
    wss_listen: Option<SocketAddr>,
    wss_tls_cert: Option<PathBuf>,
    wss_tls_key: Option<PathBuf>,
    ws_public_host: Option<String>,
    wss_public: Option<String>,
    ws_max_connections: Option<usize>,
    ws_max_connections_per_ip: Option<usize>,
    api_tls_cert: Option<PathBuf>,
    api_tls_key: Option<PathBuf>,
    tenants: Option<Vec<String>>,
    tenant_max_allocations: Option<u32>,
    tenant_allocations_per_sec: Option<u32>,
    log_lifecycle: Option<LifecycleLog>,
    log_lifecycle_sample: Option<u32>,
    api_header_timeout: Option<FileDuration>,
    api_body_timeout: Option<FileDuration>,
    ws_idle_timeout: Option<FileDuration>,
    store: Option<String>,
    store_ca_file: Option<PathBuf>,
    fleet_key_file: Option<PathBuf>,
    relay_name: Option<String>,
    regions: Option<Vec<String>>,
    heartbeat_interval: Option<FileDuration>,
    heartbeat_expiry: Option<FileDuration>,
    relay_warmup: Option<FileDuration>,
    store_timeout: Option<FileDuration>,
    xdp: Option<String>,
    xdp_interface: Option<String>,
    xdp_max_links: Option<u32>,
}

fn file_duration(key: &str, d: Option<FileDuration>) -> Result<Option<Duration>, ConfigError> {
    match d {
        None => Ok(None),
        Some(FileDuration::Secs(s)) => parse_duration(&s.to_string()).map(Some).map_err(|m| err(key, m)),
        Some(FileDuration::Text(t)) => parse_duration(&t).map(Some).map_err(|m| err(key, m)),
    }
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| err("config", format!("{}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.message().to_string();
        let key = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.starts_with("unknown field"))
            .map(str::to_string)
            .or_else(|| {
                e.span().and_then(|s| {
                    text[..s.start]
                        .lines()
                        .last()
                        .map(|l| l.split('=').next().unwrap_or("").trim().to_string())
                })
            })
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| "config".into());
        err(&key, format!("{} ({})", msg.trim(), path.display()))
    })
}

impl ServeArgs {
    /// Merges flags/env over the file over the defaults, then validates.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(p) => load_file(p)?,
            None => FileConfig::default(),
        };
        let mut c = Config::defaults();
        macro_rules! merge {
            ($($f:ident),*) => { $( if let Some(v) = self.$f.or(file.$f) { c.$f = v; } )* };
        }
        merge!(
            api_listen,
            relay_listen,
            advertise,
            advertise_port,
            region,
            shards,
            io,
            max_connections_cap,
            dtls_mtu,
            dtls_halfopen_per_ip,
            ws_max_connections,
            ws_max_connections_per_ip,
            max_allocations,
            join_code_length,
            api_tokens,
            api_rate_limit,
            join_failures_per_ip_per_min,
            join_failures_global_per_sec,
            log_format,
            unconfirmed_budget,
            api_max_connections_per_ip,
            join_failures_per_token_per_min,
            auth_failures_per_ip_per_min,
            control_max_connections,
            log_lifecycle,
            log_lifecycle_sample,
            jwt_project_claim,
            jwt_environment_claim,
            tenants,
            tenant_max_allocations,
            tenant_allocations_per_sec
        );
        c.jwt_secret_file = self.jwt_secret_file.or(file.jwt_secret_file);
        c.api_tls_cert = self.api_tls_cert.or(file.api_tls_cert);
        c.ws_listen = self.ws_listen.or(file.ws_listen);
        c.wss_listen = self.wss_listen.or(file.wss_listen);
        c.wss_tls_cert = self.wss_tls_cert.or(file.wss_tls_cert);
        c.wss_tls_key = self.wss_tls_key.or(file.wss_tls_key);
        c.ws_public_host = self.ws_public_host.or(file.ws_public_host);
        c.wss_public = self.wss_public.or(file.wss_public);
        c.api_tls_key = self.api_tls_key.or(file.api_tls_key);
        c.jwt_public_key_file = self.jwt_public_key_file.or(file.jwt_public_key_file);
        c.jwt_jwks_file = self.jwt_jwks_file.or(file.jwt_jwks_file);
        c.jwt_jwks_url = self.jwt_jwks_url.or(file.jwt_jwks_url);
        c.jwt_jwks_ca_file = self.jwt_jwks_ca_file.or(file.jwt_jwks_ca_file);
        c.jwt_issuer = self.jwt_issuer.or(file.jwt_issuer);
        c.jwt_audience = self.jwt_audience.or(file.jwt_audience);
        c.jwt_algorithm = match (self.jwt_algorithm, file.jwt_algorithm) {
            (Some(a), _) => Some(a),
            (None, Some(s)) => {
                Some(crate::config::parse_jwt_algorithm(&s).map_err(|m| err("jwt_algorithm", m))?)
            }
            (None, None) => None,
        };
        macro_rules! merge_bool {
            ($($f:ident),*) => { $(
                if let Some(v) = self.$f.or(file_bool(stringify!($f), file.$f)?) { c.$f = v; }
            )* };
        }
        merge_bool!(pin_shards, kernel_steering, gso, stun, qos, dtls, api_anonymous);
        c.api_max_connections = self.api_max_connections.or(file.api_max_connections);
        c.advertise_ipv4 = self.advertise_ipv4.or(file.advertise_ipv4);
        if let Some(v) = self.trusted_proxies {
            c.trusted_proxies = v;
        } else if let Some(v) = file.trusted_proxies {
            c.trusted_proxies = v
                .iter()
                .map(|s| s.parse())
                .collect::<Result<_, _>>()
                .map_err(|m: String| err("trusted_proxies", m))?;
        }
        if let Some(v) = self.deny_sources {
            c.deny_sources = v;
        } else if let Some(v) = file.deny_sources {
            c.deny_sources = v
                .iter()
                .map(|s| s.parse())
                .collect::<Result<_, _>>()
                .map_err(|m: String| err("deny_sources", m))?;
        }
        macro_rules! merge_dur {
            ($($f:ident),*) => { $(
                if let Some(v) = self.$f.or(file_duration(stringify!($f), file.$f)?) { c.$f = v; }
            )* };
        }
        merge_dur!(
            unbound_timeout,
            idle_timeout,
            host_alone_timeout,
            rebind_quiet,
            drain_timeout,
            api_header_timeout,
            api_body_timeout,
            ws_idle_timeout,
            jwt_leeway,
            heartbeat_interval,
            heartbeat_expiry,
            relay_warmup,
            store_timeout
        );
        c.store = self.store.or(file.store);
        c.store_ca_file = self.store_ca_file.or(file.store_ca_file);
        c.fleet_key_file = self.fleet_key_file.or(file.fleet_key_file);
        c.relay_name = self.relay_name.or(file.relay_name);
        if let Some(r) = self.regions.or(file.regions) {
            c.regions = r;
        }
        c.control_socket = self.control_socket.or(file.control_socket);
        c.control_listen = self.control_listen.or(file.control_listen);
        c.control_secret = self.control_secret.or(file.control_secret);
        if let Some(s) = self.relay_secret.or(file.relay_secret) {
            let key = crate::auth::AllocationKey::from_base64(s.trim())
                .ok_or_else(|| err("relay_secret", "must be the base64 of exactly 64 bytes"))?;
            c.relay_secret = key.0;
        }
        c.xdp = match (self.xdp, file.xdp) {
            (Some(m), _) => m,
            (None, Some(s)) => s.parse().map_err(|m: String| err("xdp", m))?,
            (None, None) => c.xdp,
        };
        c.xdp_interface = self.xdp_interface.or(file.xdp_interface);
        if let Some(n) = self.xdp_max_links.or(file.xdp_max_links) {
            c.xdp_max_links = n;
        }
        c.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ferry-cfg-{}-{}.toml", std::process::id(), text.len()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn file_then_flags_override() {
        let p = file("region = \"eu-west\"\nidle_timeout = \"3s\"\nshards = 2\n");
        let args = ServeArgs { config: Some(p.clone()), shards: Some(3), ..Default::default() };
        let c = args.into_config().unwrap();
        assert_eq!((c.region.as_str(), c.idle_timeout, c.shards), ("eu-west", Duration::from_secs(3), 3));
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn bad_file_keys_are_named() {
        let p = file("regoin = \"x\"\n");
        let e = ServeArgs { config: Some(p.clone()), ..Default::default() }.into_config().unwrap_err();
        assert_eq!(e.key, "regoin", "{e}");
        std::fs::remove_file(p).ok();
        let p = file("idle_timeout = \"soon\"\n\n");
        let e = ServeArgs { config: Some(p.clone()), ..Default::default() }.into_config().unwrap_err();
        assert_eq!(e.key, "idle_timeout", "{e}");
        std::fs::remove_file(p).ok();
        let p = file("shards = \"many\"\n\n\n");
        let e = ServeArgs { config: Some(p.clone()), ..Default::default() }.into_config().unwrap_err();
        assert_eq!(e.key, "shards", "{e}");
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn booleans_in_the_file_accept_every_spelling() {
        let p = file("gso = \"off\"\npin_shards = 0\nkernel_steering = \"yes\"\n");
        let c = ServeArgs { config: Some(p.clone()), ..Default::default() }.into_config().unwrap();
        assert_eq!((c.gso, c.pin_shards, c.kernel_steering), (false, false, true));
        std::fs::remove_file(p).ok();
        let p = file("gso = \"maybe\"\n\n\n\n");
        let e = ServeArgs { config: Some(p.clone()), ..Default::default() }.into_config().unwrap_err();
        assert_eq!(e.key, "gso", "{e}");
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn relay_secret_must_be_64_bytes() {
        let e =
            ServeArgs { relay_secret: Some("AAAA".into()), ..Default::default() }.into_config().unwrap_err();
        assert_eq!(e.key, "relay_secret");
    }
}
