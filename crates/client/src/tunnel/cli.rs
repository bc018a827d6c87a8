//! The command line of `ferry tunnel host|join` (also the `ferry-tunnel` binary's).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::{HostConfig, HostTunnel, JoinConfig, JoinExit, JoinTunnel, Timing, TunnelControl, TunnelEvent};
use crate::ApiClient;

#[derive(Subcommand, Debug)]
pub enum TunnelCommand {
    /// Next to a game server: allocate, print a join code, forward players to local UDP ports.
    Host(HostArgs),
    /// Next to a game client: join with a code and mirror the host's ports locally.
    Join(JoinArgs),
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
    }
}

fn print_event(json: bool, e: &TunnelEvent) {
    let (kind, text) = describe(e);
    if json {
        println!("{}", serde_json::json!({"event": kind, "message": text}));
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
    let json = a.common.json;
    t.run(&ctl, &mut |e| print_event(json, &e)).map_err(|e| e.to_string())?;
    Ok(0)
}

/// Runs `ferry tunnel join`; returns the process exit code (3 when the host left).
pub fn join(a: &JoinArgs) -> Result<u8, String> {
    let cfg = JoinConfig {
        listen: a.listen,
        port_offset: a.port_offset,
        timing: timing(&a.common),
        relay: a.common.relay,
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
    let json = a.common.json;
    match t.run(&ctl, &mut |e| print_event(json, &e)).map_err(|e| e.to_string())? {
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
