//! `ferry load`: a load generator for any Ferry deployment, and the comparison targets
//! (B0 direct, B1 ideal forwarder, TURN relays) driven with the same traffic shape.
//!
//! Modes:
//! - `traffic` (default): S sessions, open-loop RELAY traffic at a rate (or max) for a duration;
//!   delivered packets/s, loss, duplicates, reordering, one-way latency percentiles;
//! - `binds`: BINDs for many allocations as fast as the relay answers them (binds/s);
//! - `allocations`: `/v1/allocate` from several threads (allocations/s through the API).

pub mod b1;
pub mod churn;
pub mod engine;
pub mod flood;
pub mod live;
pub mod report;
pub mod setup;
pub mod turn;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::client::{packets, ApiClient};
use crate::clock::Clock;
use crate::config::parse_duration;
use crate::io::{BatchIo, PacketBatch, SendItem, BATCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// A Ferry deployment, through its API.
    Ferry,
    /// The B1 ideal forwarder (`ferry bench-b1`).
    B1,
    /// B0: the generator's own sockets, no relay.
    Direct,
    /// A TURN server (coturn, turn-rs): Allocate, CreatePermission, ChannelBind, ChannelData.
    Turn,
    /// A pair of `ferry tunnel`s: plain datagrams into the join tunnel's local port
    /// (`--tunnel-listen`), received where the host tunnel forwards (`--tunnel-server`).
    Tunnel,
}

/// How the generator's datagrams are shaped (`--shape`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// Each session in turn sends a batch of 32 same-size datagrams: UDP GSO's best case.
    #[default]
    Burst,
    /// What a relay serving a crowd of players sees: consecutive datagrams belong to different
    /// sessions and sizes are mixed (RELAYs of 58–300 bytes, mostly small).
    Game,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Traffic,
    Binds,
    Allocations,
    /// Soak: sessions continuously created, used and closed or abandoned, plus hostile traffic;
    /// `--sessions` live at most; the relay sampled with `--relay-pid`.
    Churn,
}

#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    #[arg(long, value_enum, default_value = "ferry")]
    pub target: Target,
    #[arg(long, value_enum, default_value = "traffic")]
    pub mode: Mode,
    /// Ferry's API.
    #[arg(long, env = "FERRY_API", default_value = "http://127.0.0.1:7880")]
    pub api: String,
    #[arg(long, env = "FERRY_TOKEN")]
    pub token: Option<String>,
    /// Relay address: B1 or TURN server; for Ferry, overrides the advertised endpoint.
    #[arg(long)]
    pub relay: Option<SocketAddr>,
    /// Sessions (one sender and one receiver each).
    #[arg(long, default_value_t = 1)]
    pub sessions: usize,
    /// Traffic shape: `burst` (a batch per session in turn, one size) or `game` (sessions
    /// interleaved, mixed 58–300-byte RELAYs; `--size` is then ignored).
    #[arg(long, value_enum, default_value = "burst")]
    pub shape: Shape,
    /// With `--shape game`: sender and receiver sockets the sessions share (each carries many
    /// sessions, so one sendmmsg spans sessions); 0 gives every session its own. TURN targets
    /// always use one pair per session (a TURN allocation is its client's address).
    #[arg(long, default_value_t = 8)]
    pub sockets: usize,
    /// Payload bytes per datagram, 20 to 1434 (a RELAY's 38-byte header plus the payload must
    /// fit the relay's 1472-byte datagram limit).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Offered datagrams per second over all sessions; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Allocations to cycle through in `binds` mode.
    #[arg(long, default_value_t = 1000)]
    pub allocations: usize,
    /// HTTP clients in `allocations` mode.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Pin the sender thread to this core.
    #[arg(long)]
    pub pin_sender: Option<usize>,
    /// Pin the receiver thread to this core.
    #[arg(long)]
    pub pin_receiver: Option<usize>,
    /// PID of the relay, to report its CPU time per delivered packet.
    #[arg(long)]
    pub relay_pid: Option<u32>,
    /// Local address for the generator's sockets.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind_ip: String,
    /// TURN long-term credentials.
    #[arg(long, default_value = "ferry")]
    pub turn_user: String,
    #[arg(long, default_value = "ferry")]
    pub turn_pass: String,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write an SVG chart of throughput and latency over time.
    #[arg(long)]
    pub chart: Option<std::path::PathBuf>,
    /// During the measured traffic, also send this many hostile datagrams from many sources
    /// (random bytes, bad lengths, bad-HMAC BINDs, unknown IDs, oversize) and report what came back.
    #[arg(long, default_value_t = 0)]
    pub flood: u64,
    /// Source sockets the flood is spread over (127.0.x.y addresses).
    #[arg(long, default_value_t = 64)]
    pub flood_sources: usize,
    /// Tunnel target: the join tunnel's local port the generator sends to.
    #[arg(long)]
    pub tunnel_listen: Option<SocketAddr>,
    /// Tunnel target: the address the host tunnel forwards to (the generator receives there).
    #[arg(long)]
    pub tunnel_server: Option<SocketAddr>,
    /// Send with UDP GSO (cheaper for the generator). Fair only against relays that do not
    /// enable UDP_GRO — Ferry, B1, coturn and turn-rs do not — since they then receive ordinary
    /// datagrams.
    #[arg(long)]
    pub gso: bool,
}

fn need_relay(a: &LoadArgs) -> Result<SocketAddr, String> {
    a.relay.ok_or_else(|| format!("--relay is required for --target {:?}", a.target))
}

/// Largest payload a RELAY can carry within the relay's datagram limit.
pub const MAX_PAYLOAD: usize = crate::wire::MAX_DATAGRAM - crate::wire::Relay::<&[u8]>::HEADER_LEN;

/// Refuses arguments that cannot describe a meaningful run, with a message naming the flag.
pub fn validate(a: &LoadArgs) -> Result<(), String> {
    if a.mode == Mode::Traffic {
        if a.sessions == 0 {
            return Err("--sessions must be at least 1".into());
        }
        if !(engine::MIN_PAYLOAD..=MAX_PAYLOAD).contains(&a.size) {
            return Err(format!(
                "--size must be between {} and {MAX_PAYLOAD} bytes (a RELAY's {}-byte header plus the payload must fit \
                 the relay's {}-byte datagram limit; larger datagrams are dropped), got {}",
                engine::MIN_PAYLOAD,
                crate::wire::Relay::<&[u8]>::HEADER_LEN,
                crate::wire::MAX_DATAGRAM,
                a.size
            ));
        }
        if a.flood > 0 && a.flood_sources == 0 {
            return Err("--flood-sources must be at least 1".into());
        }
    }
    if a.mode == Mode::Binds && a.allocations == 0 {
        return Err("--allocations must be at least 1".into());
    }
    if a.mode == Mode::Allocations && a.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    if a.duration.is_zero() {
        return Err("--duration must be longer than 0".into());
    }
    Ok(())
}

/// Runs the load described by `a` and prints the result.
pub fn run(a: &LoadArgs) -> Result<(), Box<dyn std::error::Error>> {
    validate(a)?;
    match a.mode {
        Mode::Traffic => traffic(a),
        Mode::Binds => binds(a),
        Mode::Allocations => allocations(a),
        Mode::Churn => {
            let r = churn::run(a, &api(a))?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} sessions in {:.0} s ({} closed, {} abandoned), {} datagrams relayed, {} misdelivered, {} lost, {} errors, {} hostile datagrams",
                    r.sessions, r.duration_secs, r.closed, r.abandoned, r.relayed, r.misdelivered, r.lost, r.errors, r.hostile_sent
                );
                for s in &r.samples {
                    println!(
                        "  {:>6.0} s  rss {:>8} KiB  fds {:>5}  live allocations {:>6}",
                        s.secs,
                        s.rss_kib.map_or("-".into(), |v| v.to_string()),
                        s.open_fds.map_or("-".into(), |v| v.to_string()),
                        s.live_allocations.map_or("-".into(), |v| v.to_string())
                    );
                }
            }
            Ok(())
        }
    }
}

fn api(a: &LoadArgs) -> ApiClient {
    let c = ApiClient::new(a.api.clone());
    match &a.token {
        Some(t) => c.with_token(t.clone()),
        None => c,
    }
}

fn traffic(a: &LoadArgs) -> Result<(), Box<dyn std::error::Error>> {
    let payload = match a.shape {
        Shape::Burst => a.size,
        Shape::Game => engine::GAME_MEAN_PAYLOAD,
    };
    let sockets = setup::Sockets::new(&a.bind_ip, if a.shape == Shape::Game { a.sockets } else { 0 })?;
    let streams = match a.target {
        Target::Ferry => setup::ferry(&api(a), a.relay, a.sessions, payload, &sockets)?,
        Target::B1 => setup::b1(need_relay(a)?, a.sessions, payload, &sockets)?,
        Target::Direct => setup::direct(a.sessions, payload, &sockets)?,
        Target::Turn => {
            turn::streams(need_relay(a)?, &a.turn_user, &a.turn_pass, a.sessions, payload, &a.bind_ip)?
        }
        Target::Tunnel => {
            let listen = a.tunnel_listen.ok_or("--tunnel-listen is required for --target tunnel")?;
            let server = a.tunnel_server.ok_or("--tunnel-server is required for --target tunnel")?;
            setup::tunnel(listen, server, &a.bind_ip)?
        }
    };
    let spec = engine::TrafficSpec {
        payload,
        rate: a.rate,
        duration: a.duration,
        warmup: a.warmup,
        pin_sender: a.pin_sender,
        pin_receiver: a.pin_receiver,
        gso: a.gso,
        shape: a.shape,
    };
    let bar = (!a.json && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let b = indicatif::ProgressBar::new(1000);
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {bar:40} {percent}% {elapsed}/{duration}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let cpu_before = a.relay_pid.and_then(report::cpu_secs);
    let flood = (a.flood > 0).then(|| {
        let relay = streams[0].dst;
        let known = setup::known_ids(&streams);
        let (count, sources, warmup) = (a.flood, a.flood_sources, a.warmup);
        let rss_before = a.relay_pid.and_then(flood::rss_kib);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(warmup + Duration::from_millis(100));
            flood::run(relay, count, known, sources, s2)
        });
        (t, stop, rss_before)
    });
    let m = engine::run(streams, &spec, |f| {
        if let Some(b) = &bar {
            b.set_position((f * 1000.0) as u64);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // The relay's CPU over warm-up + measurement, scaled to the measured window.
    let cpu = match (cpu_before, a.relay_pid.and_then(report::cpu_secs)) {
        (Some(b), Some(e)) => {
            let total = (a.warmup + a.duration).as_secs_f64() + 0.05;
            Some((e - b) * a.duration.as_secs_f64() / total)
        }
        _ => None,
    };
    let name = format!("{:?}", a.target).to_lowercase();
    let mut s = report::Summary::new(&name, a.sessions, payload, a.rate, &m, cpu);
    s.shape = a.shape;
    if let Some((t, stop, rss_before)) = flood {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut r = t.join().map_err(|_| "flood thread panicked")??;
        r.relay_rss_before_kib = rss_before;
        r.relay_rss_after_kib = a.relay_pid.and_then(flood::rss_kib);
        s.flood = Some(r);
    }
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        s.print();
    }
    if let Some(path) = &a.chart {
        s.chart(path)?;
    }
    Ok(())
}

/// BINDs for `allocations` allocations, round robin, as fast as they are answered.
fn binds(a: &LoadArgs) -> Result<(), Box<dyn std::error::Error>> {
    let (relay, datagrams): (SocketAddr, Vec<Vec<u8>>) = match a.target {
        Target::Ferry => {
            let api = api(a);
            let mut relay = a.relay;
            let mut out = Vec::with_capacity(a.allocations);
            for _ in 0..a.allocations {
                let al = setup::patiently(|| api.allocate(1, None)).map_err(|e| e.to_string())?;
                let ep = &al.server_endpoints[0];
                relay.get_or_insert(format!("{}:{}", ep.host, ep.port).parse()?);
                let key = crate::auth::AllocationKey::from_base64(&al.key).ok_or("bad key")?;
                let conn =
                    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &al.connection_data)?;
                out.push(packets::bind(&key, 1, &conn));
            }
            (relay.ok_or("no allocations")?, out)
        }
        Target::B1 => {
            let relay = need_relay(a)?;
            let key = crate::auth::AllocationKey([0; 64]);
            (relay, (0..a.allocations).map(|n| packets::bind(&key, 1, &(n as u128).to_be_bytes())).collect())
        }
        _ => return Err("binds mode supports --target ferry and b1".into()),
    };
    let sock = std::net::UdpSocket::bind(format!("{}:0", a.bind_ip))?;
    sock.set_nonblocking(true)?;
    let mut io = BatchIo::new(&sock);
    let mut rx_io = BatchIo::new(&sock);
    let mut out = PacketBatch::new();
    let mut inb = PacketBatch::new();
    let clock = Clock::new();
    let end = clock.nanos() + (a.warmup + a.duration).as_nanos() as u64;
    let measure_from = clock.nanos() + a.warmup.as_nanos() as u64;
    let (mut answered, mut sent, mut k) = (0u64, 0u64, 0usize);
    let mut items = Vec::with_capacity(BATCH);
    // Keep at most a window of BINDs in flight so the relay, not the socket buffers, sets the pace.
    const WINDOW: u64 = 4096;
    let mut in_flight = 0u64;
    while clock.nanos() < end {
        if in_flight < WINDOW {
            items.clear();
            for i in 0..BATCH {
                let d = &datagrams[k % datagrams.len()];
                k += 1;
                out.bufs[i][..d.len()].copy_from_slice(d);
                items.push(SendItem { slot: i, len: d.len(), dst: relay });
            }
            let r = io.send(&out, &items);
            in_flight += r.sent as u64;
            if clock.nanos() >= measure_from {
                sent += r.sent as u64;
            }
        }
        let n = rx_io.recv(&mut inb)?;
        in_flight = in_flight.saturating_sub(n as u64);
        if clock.nanos() >= measure_from {
            answered += (0..n).filter(|&i| inb.meta[i].len == 4 && inb.bufs[i][3] == 1).count() as u64;
        }
        if n == 0 && in_flight >= WINDOW {
            // Replies lost or still queued: let the window drain a little.
            std::thread::sleep(Duration::from_micros(50));
            in_flight = in_flight.saturating_sub(64);
        }
    }
    let secs = a.duration.as_secs_f64();
    let rate = answered as f64 / secs;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"target": format!("{:?}", a.target).to_lowercase(), "mode": "binds", "allocations": datagrams.len(), "sent": sent, "answered": answered, "binds_per_sec": rate})
        );
    } else {
        println!(
            "{} allocations, {sent} BINDs sent, {answered} answered: {rate:.0} binds/s",
            datagrams.len()
        );
    }
    Ok(())
}

/// `/v1/allocate` from `clients` threads for the duration. Answers of 429 are counted apart:
/// when they dominate, the run measured the API's rate limit, not its throughput, and says so.
fn allocations(a: &LoadArgs) -> Result<(), Box<dyn std::error::Error>> {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let limited = Arc::new(AtomicU64::new(0));
    let clock = Clock::new();
    let end = clock.nanos() + a.duration.as_nanos() as u64;
    let threads: Vec<_> = (0..a.clients)
        .map(|_| {
            let (api, ok, failed, limited) = (api(a), ok.clone(), failed.clone(), limited.clone());
            std::thread::spawn(move || {
                while clock.nanos() < end {
                    match api.allocate(1, None) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(crate::client::ApiError::RateLimited { .. }) => {
                            // Back off a little rather than hammer the limiter.
                            std::thread::sleep(Duration::from_millis(20));
                            limited.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let (ok, failed, limited) =
        (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed), limited.load(Ordering::Relaxed));
    let rate = ok as f64 / a.duration.as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"mode": "allocations", "clients": a.clients, "created": ok, "failed": failed, "rate_limited": limited, "allocations_per_sec": rate, "limited_by_api_rate_limit": limited > 0})
        );
    } else {
        println!(
            "{ok} allocations created ({failed} failed, {limited} refused with 429) by {} clients: {rate:.0} allocations/s",
            a.clients
        );
    }
    if limited > 0 {
        eprintln!(
            "ferry load: the API rate limited this generator ({limited} answers of 429): the figure above is the relay's \
             per-IP rate limit, not its throughput. Start the relay with a higher --api-rate-limit to measure throughput."
        );
    }
    Ok(())
}
