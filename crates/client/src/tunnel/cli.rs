//! The command line of `ferry tunnel host|join` (also the `ferry-tunnel` binary's).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::{
    HostConfig, HostTunnel, JoinConfig, JoinExit, JoinTunnel, PathOptions, Timing, TunnelControl, TunnelEvent,
};
use crate::path::{PathConfig, Policy};
use crate::ApiClient;

#[derive(Subcommand, Debug)]
pub enum TunnelCommand {
    /// Next to a game server: allocate, print a join code, forward players to local UDP ports.
    Host(HostArgs),
    /// Next to a game client: join with a code and mirror the host's ports locally.
    Join(JoinArgs),
    /// Every running tunnel on this machine: each peer's path (direct, relay, both), RTTs,
    /// bytes, time to direct, switches.
    Status(StatusArgs),
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// One tunnel's status socket (default: every `ferry-tunnel-*.sock` in the runtime
    /// directory).
    #[arg(long)]
    pub socket: Option<std::path::PathBuf>,
    /// Print the JSON documents as they come.
    #[arg(long)]
    pub json: bool,
}

/// Runs one `ferry tunnel` subcommand; returns the process exit code.
pub fn run(cmd: &TunnelCommand) -> Result<u8, String> {
    match cmd {
        TunnelCommand::Host(a) => host(a),
        TunnelCommand::Join(a) => join(a),
        TunnelCommand::Status(a) => status(a),
    }
}

#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Base URL of the allocations API.
    #[arg(long, env = "FERRY_API", default_value = "http://127.0.0.1:7880")]
    pub api: String,
    /// Bearer token, if the API requires one.
    #[arg(long = "api-token", env = "FERRY_TOKEN")]
    pub api_token: Option<String>,
    /// CA bundle (PEM) to trust for an https:// API instead of the built-in roots.
    #[arg(long = "api-ca-file", env = "FERRY_API_CA_FILE")]
    pub api_ca_file: Option<std::path::PathBuf>,
    /// Print one JSON object per event instead of text.
    #[arg(long)]
    pub json: bool,
    /// Close a flow after this long without a datagram either way.
    #[arg(long, default_value = "120s", value_parser = crate::units::parse_duration)]
    pub flow_idle: Duration,
    /// Send to this relay address instead of the one the API names (a proxy in front of it).
    #[arg(long)]
    pub relay: Option<SocketAddr>,
    /// Path policy: `auto` (relay at once, direct when proven), `direct-first` (Photon: direct
    /// attempts, relay after 2/3 of them), `relay` (never direct; reveals no address), `direct`
    /// (the relay carries signalling only).
    #[arg(long, default_value = "auto", value_parser = clap::builder::ValueParser::new(|s: &str| s.parse::<Policy>()))]
    pub path: Policy,
    /// Between direct attempts.
    #[arg(long, default_value = "500ms", value_parser = crate::units::parse_duration)]
    pub punch_interval: Duration,
    /// Fast direct attempts (`direct-first` falls back to the relay after ⌈2/3⌉ of them).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub punch_attempts: u32,
    /// Where `ferry tunnel status` finds this tunnel (default
    /// `$XDG_RUNTIME_DIR/ferry-tunnel-PID.sock`, or under /tmp).
    #[arg(long)]
    pub status_socket: Option<std::path::PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct HostArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// A game server UDP address to expose; repeat for games with several ports (in order).
    #[arg(long = "forward", required = true)]
    pub forwards: Vec<SocketAddr>,
    /// Players at once.
    #[arg(long, default_value_t = 8)]
    pub players: u16,
}

#[derive(Args, Debug, Clone)]
pub struct JoinArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The host's join code.
    pub code: String,
    /// Local address the mirrored ports listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub listen: IpAddr,
    /// Added to every mirrored port (when the real port is taken on this machine).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub port_offset: i32,
}

/// Exit codes of `ferry tunnel`.
pub const EXIT_HOST_LEFT: u8 = 3;

fn api(c: &CommonArgs) -> ApiClient {
    let mut a = ApiClient::new(c.api.clone());
    if let Some(ca) = &c.api_ca_file {
        a = a.with_ca_file(ca.clone());
    }
    match &c.api_token {
        Some(t) => a.with_token(t.clone()),
        None => a,
    }
}

fn timing(c: &CommonArgs) -> Timing {
    Timing { flow_idle: c.flow_idle, ..Timing::default() }
}

fn path_options(c: &CommonArgs) -> PathOptions {
    let ms = (c.punch_interval.as_millis() as u64).max(1);
    PathOptions { policy: c.path, cfg: PathConfig::photon(ms, c.punch_attempts) }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |m| format!("{m:.1} ms"))
}

/// One line about a peer's path.
pub fn describe_path(s: &super::PeerStatus) -> String {
    let st = &s.stats;
    let route = match st.direct {
        Some(a) if st.route != "relay" => format!("{} {a}", st.route),
        _ => st.route.to_string(),
    };
    let mut ttd = st
        .time_to_direct_ms
        .map_or_else(String::new, |t| format!("; direct after {:.1} s", t as f64 / 1000.0));
    if st.resent > 0 {
        ttd.push_str(&format!("; {} sent again after a direct path lost them", st.resent));
    }
    format!(
        "path to {}: {route} ({}); rtt direct {}, relay {}; bytes direct {}, relay {}; {} switch(es){ttd}",
        s.peer,
        st.last_reason,
        fmt_ms(st.rtt_direct_ms),
        fmt_ms(st.rtt_relay_ms),
        st.bytes_direct,
        st.bytes_relay,
        st.switches
    )
}

fn describe(e: &TunnelEvent) -> (&'static str, String) {
    match e {
        TunnelEvent::PlayerJoined { player } => ("player_joined", format!("player {player} joined")),
        TunnelEvent::PlayerLeft { player, reason } => ("player_left", format!("player {player} left ({reason})")),
        TunnelEvent::FlowOpened { player: Some(p), port, flow, local } => {
            ("flow_opened", format!("player {p}: flow {flow} on port #{port} now speaks from {local}"))
        }
        TunnelEvent::FlowOpened { player: None, port, flow, local } => {
            ("flow_opened", format!("flow {flow} on port #{port} from game client {local}"))
        }
        TunnelEvent::FlowClosed { port, flow, reason, .. } => {
            ("flow_closed", format!("flow {flow} on port #{port} closed ({reason})"))
        }
        TunnelEvent::Oversize { port, flow, len } => (
            "oversize",
            format!(
                "flow {flow} on port #{port}: a {len}-byte datagram is over the {}-byte limit and was dropped (further ones are counted, not logged)",
                super::frame::MAX_GAME_DATAGRAM
            ),
        ),
        TunnelEvent::Rebound { local } => ("rebound", format!("network change: re-bound from {local}")),
        TunnelEvent::Rtt { peer, micros } => ("rtt", format!("round trip to {peer}: {:.1} ms", *micros as f64 / 1000.0)),
        TunnelEvent::Path { status } => ("path", describe_path(status)),
        TunnelEvent::PathFailed { peer, reason } => ("path_failed", format!("no path to {peer}: {reason}")),
    }
}

fn print_event(json: bool, e: &TunnelEvent) {
    let (kind, text) = describe(e);
    if json {
        let mut v = serde_json::json!({"event": kind, "message": text});
        if let TunnelEvent::Path { status } = e {
            v["path"] = serde_json::to_value(status).unwrap_or_default();
        }
        println!("{v}");
    } else if kind != "rtt" {
        println!("{text}");
    }
}

fn stop_on_signals(ctl: &Arc<TunnelControl>) {
    let c = ctl.clone();
    // Best effort: without a handler, Ctrl-C ends the process without a BYE.
    let _ = std::thread::Builder::new().name("ferry-tunnel-signals".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
        if let Ok(rt) = rt {
            rt.block_on(async {
                let _ = tokio::signal::ctrl_c().await;
            });
            c.stop();
        }
    });
}

/// Runs `ferry tunnel host`; returns the process exit code.
pub fn host(a: &HostArgs) -> Result<u8, String> {
    let cfg = HostConfig {
        forwards: a.forwards.clone(),
        players: a.players,
        timing: timing(&a.common),
        relay: a.common.relay,
        path: path_options(&a.common),
    };
    let mut t = HostTunnel::open(&api(&a.common), cfg).map_err(|e| e.to_string())?;
    if a.common.json {
        println!(
            "{}",
            serde_json::json!({"event": "ready", "join_code": t.join_code(), "allocation": t.allocation_id().to_string(), "forwards": a.forwards})
        );
    } else {
        println!("join code: {}", t.join_code());
        println!("players run:  ferry tunnel join {} --api {}", t.join_code(), a.common.api);
        let list: Vec<String> = a.forwards.iter().map(|f| f.to_string()).collect();
        println!("forwarding to {} (Ctrl-C to stop)", list.join(", "));
    }
    let ctl = TunnelControl::new();
    stop_on_signals(&ctl);
    let about = serde_json::json!({"role": "host", "join_code": t.join_code(), "allocation": t.allocation_id().to_string()});
    let sock = status::serve(&a.common, &ctl, about);
    let json = a.common.json;
    let r = t.run(&ctl, &mut |e| print_event(json, &e)).map_err(|e| e.to_string());
    status::remove(sock);
    r?;
    Ok(0)
}

/// Runs `ferry tunnel join`; returns the process exit code (3 when the host left).
pub fn join(a: &JoinArgs) -> Result<u8, String> {
    let cfg = JoinConfig {
        listen: a.listen,
        port_offset: a.port_offset,
        timing: timing(&a.common),
        relay: a.common.relay,
        path: path_options(&a.common),
        ..JoinConfig::default()
    };
    let mut t = JoinTunnel::open(&api(&a.common), &a.code, cfg).map_err(|e| e.to_string())?;
    let local = t.local_addrs();
    if a.common.json {
        println!("{}", serde_json::json!({"event": "ready", "listen": local, "host_ports": t.host_ports()}));
    } else {
        for (i, (l, p)) in local.iter().zip(t.host_ports()).enumerate() {
            println!("port #{i}: point your game at {l} (the host's port {p})");
        }
    }
    let ctl = TunnelControl::new();
    stop_on_signals(&ctl);
    let about =
        serde_json::json!({"role": "join", "allocation": t.allocation_id().to_string(), "listen": local});
    let sock = status::serve(&a.common, &ctl, about);
    let json = a.common.json;
    let r = t.run(&ctl, &mut |e| print_event(json, &e)).map_err(|e| e.to_string());
    status::remove(sock);
    match r? {
        JoinExit::Stopped => Ok(0),
        exit @ (JoinExit::HostLeft | JoinExit::HostSilent) => {
            let why = if exit == JoinExit::HostLeft { "the host left" } else { "the host stopped answering" };
            if json {
                println!("{}", serde_json::json!({"event": "host_left", "message": why}));
            } else {
                eprintln!("ferry tunnel: {why}; stopping");
            }
            Ok(EXIT_HOST_LEFT)
        }
    }
}

/// Runs `ferry tunnel status`.
pub fn status(a: &StatusArgs) -> Result<u8, String> {
    let socks = match &a.socket {
        Some(p) => vec![p.clone()],
        None => status::find(),
    };
    let mut found = 0;
    for p in &socks {
        let Some(doc) = status::query(p) else { continue };
        found += 1;
        if a.json {
            println!("{doc}");
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&doc).map_err(|e| format!("{}: {e}", p.display()))?;
        let code = v["join_code"].as_str().map(|c| format!(", join code {c}")).unwrap_or_default();
        println!("tunnel pid {} ({}{code}):", v["pid"], v["role"].as_str().unwrap_or("?"));
        let paths: Vec<super::PeerStatus> =
            v["paths"].as_array().into_iter().flatten().filter_map(status::peer_from_json).collect();
        if paths.is_empty() {
            println!("  no peer yet");
        }
        for s in &paths {
            println!("  [{}] {}", s.policy, describe_path(s));
        }
    }
    if found == 0 {
        return Err(match &a.socket {
            Some(p) => format!("no tunnel answers on {}", p.display()),
            None => format!("no running ferry tunnel found in {}", status::dir().display()),
        });
    }
    Ok(0)
}

/// The status socket: a running tunnel answers each connection with one JSON document.
mod status {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::CommonArgs;
    use crate::path::PathStats;
    use crate::tunnel::{PeerStatus, TunnelControl};

    pub fn dir() -> PathBuf {
        std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir)
    }

    fn default_path() -> PathBuf {
        dir().join(format!("ferry-tunnel-{}.sock", std::process::id()))
    }

    /// The sockets of tunnels in the runtime directory.
    pub fn find() -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(dir()) else { return Vec::new() };
        let mut v: Vec<PathBuf> = rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("ferry-tunnel-") && n.ends_with(".sock"))
            })
            .collect();
        v.sort();
        v
    }

    /// Rebuilds a peer's status from its JSON (the flattened stats).
    pub fn peer_from_json(v: &serde_json::Value) -> Option<PeerStatus> {
        let leak = |s: &str| -> &'static str {
            // The few route and reason strings of a status query; a one-shot command.
            Box::leak(s.to_string().into_boxed_str())
        };
        let f = |k: &str| v[k].as_f64();
        Some(PeerStatus {
            peer: v["peer"].as_str()?.to_string(),
            policy: leak(v["policy"].as_str()?),
            stats: PathStats {
                route: leak(v["route"].as_str()?),
                direct: v["direct"].as_str().and_then(|s| s.parse().ok()),
                rtt_direct_ms: f("rtt_direct_ms"),
                rtt_relay_ms: f("rtt_relay_ms"),
                bytes_direct: v["bytes_direct"].as_u64().unwrap_or(0),
                bytes_relay: v["bytes_relay"].as_u64().unwrap_or(0),
                time_to_direct_ms: v["time_to_direct_ms"].as_u64(),
                switches: v["switches"].as_u64().unwrap_or(0) as u32,
                last_reason: leak(v["last_reason"].as_str().unwrap_or("")),
                attempts: v["attempts"].as_u64().unwrap_or(0) as u32,
                resent: v["resent"].as_u64().unwrap_or(0),
            },
        })
    }

    #[cfg(unix)]
    pub fn query(p: &std::path::Path) -> Option<String> {
        use std::io::Read;
        let mut s = std::os::unix::net::UnixStream::connect(p).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2))).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    #[cfg(not(unix))]
    pub fn query(_p: &std::path::Path) -> Option<String> {
        None
    }

    /// Starts answering status queries on the tunnel's socket; returns its path (to remove on
    /// the way out). Best effort: a tunnel runs without it when the socket cannot be made.
    #[cfg(unix)]
    pub fn serve(c: &CommonArgs, ctl: &Arc<TunnelControl>, about: serde_json::Value) -> Option<PathBuf> {
        use std::io::Write;
        let path = c.status_socket.clone().unwrap_or_else(default_path);
        let _ = std::fs::remove_file(&path);
        let listener = match std::os::unix::net::UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("ferry tunnel: no status socket at {}: {e}", path.display());
                return None;
            }
        };
        let ctl = ctl.clone();
        let pid = std::process::id();
        let spawned = std::thread::Builder::new().name("ferry-tunnel-status".into()).spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let s = &ctl.stats;
                let get = crate::tunnel::TunnelStats::get;
                let mut doc = about.clone();
                doc["pid"] = pid.into();
                doc["paths"] = serde_json::to_value(ctl.paths()).unwrap_or_default();
                doc["datagrams"] = serde_json::json!({
                    "to_relay": get(&s.to_relay), "to_direct": get(&s.to_direct),
                    "delivered": get(&s.from_relay), "from_direct": get(&s.from_direct),
                    "duplicates": get(&s.duplicates), "unproven": get(&s.unproven),
                    "oversize": get(&s.oversize), "bad_frames": get(&s.bad_frames),
                });
                let _ = conn.write_all(doc.to_string().as_bytes());
            }
        });
        spawned.ok().map(|_| path)
    }

    #[cfg(not(unix))]
    pub fn serve(_c: &CommonArgs, _ctl: &Arc<TunnelControl>, _about: serde_json::Value) -> Option<PathBuf> {
        None
    }

    pub fn remove(p: Option<PathBuf>) {
        if let Some(p) = p {
            let _ = std::fs::remove_file(p);
        }
    }
}
