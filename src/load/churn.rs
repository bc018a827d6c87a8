//! `ferry load --mode churn`: the soak workload. Sessions are continuously allocated, joined,
//! bound, connected and relayed through, then closed or abandoned to time out, with a little
//! hostile traffic beside them; every relayed payload names its session, so a datagram that
//! arrives in the wrong session is counted as misdelivered. With `--relay-pid` the relay's RSS,
//! open file descriptors and live allocations are sampled every `SAMPLE_EVERY`.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use super::setup::patiently;
use super::LoadArgs;
use crate::client::{ApiClient, RelayClient};
use crate::clock::Clock;

/// How often the relay is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Relayed datagrams each way per session.
const EXCHANGES: usize = 5;

#[derive(Serialize, Debug, Default)]
pub struct Sample {
    pub secs: f64,
    pub rss_kib: Option<u64>,
    pub open_fds: Option<u64>,
    pub live_allocations: Option<u64>,
    pub sessions_done: u64,
}

#[derive(Serialize, Debug, Default)]
pub struct ChurnReport {
    pub mode: &'static str,
    pub duration_secs: f64,
    pub sessions: u64,
    pub closed: u64,
    pub abandoned: u64,
    pub relayed: u64,
    pub misdelivered: u64,
    pub lost: u64,
    pub errors: u64,
    pub hostile_sent: u64,
    pub samples: Vec<Sample>,
}

fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

fn live_allocations(api: &ApiClient) -> Option<u64> {
    let r = api.raw("GET", "/metrics", None).ok()?;
    let text = String::from_utf8(r.body).ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with("ferry_allocations_active{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum(),
    )
}

struct Live {
    host: RelayClient,
    peer: RelayClient,
}

/// One session's life: allocate, join, bind, connect, relay both ways checking every payload.
fn session(api: &ApiClient, n: u64, r: &mut ChurnReport) -> Result<Live, String> {
    let e = |e: crate::client::ApiError| e.to_string();
    let h = patiently(|| api.allocate(1, None)).map_err(e)?;
    let code = patiently(|| api.join_code(&h.allocation_id)).map_err(e)?;
    let j = patiently(|| api.join(&code)).map_err(e)?;
    let mut host = RelayClient::new(&h).map_err(|e| e.to_string())?;
    let mut peer = RelayClient::new(&j.allocation).map_err(|e| e.to_string())?;
    host.bind().map_err(|e| e.to_string())?;
    peer.bind().map_err(|e| e.to_string())?;
    let hid = peer.connect_b64(&j.host_connection_data).map_err(|e| e.to_string())?;
    for k in 0..EXCHANGES {
        let msg = format!("session {n} message {k}");
        peer.send(&hid, msg.as_bytes()).map_err(|e| e.to_string())?;
        match host.recv_relay(Duration::from_secs(2)).map_err(|e| e.to_string())? {
            Some((from, got)) => {
                r.relayed += 1;
                if got != msg.as_bytes() {
                    r.misdelivered += 1;
                }
                let reply = format!("reply {n} {k}");
                host.send(&from, reply.as_bytes()).map_err(|e| e.to_string())?;
                match peer.recv_relay(Duration::from_secs(2)).map_err(|e| e.to_string())? {
                    Some((_, got)) if got == reply.as_bytes() => r.relayed += 1,
                    Some(_) => r.misdelivered += 1,
                    None => r.lost += 1,
                }
            }
            None => r.lost += 1,
        }
    }
    Ok(Live { host, peer })
}

/// Runs the churn for `a.duration` with at most `a.sessions` sessions alive at once.
pub fn run(a: &LoadArgs, api: &ApiClient) -> Result<ChurnReport, String> {
    let clock = Clock::new();
    let mut r = ChurnReport { mode: "churn", ..Default::default() };
    let end = a.duration.as_millis() as u64;
    let mut live: VecDeque<Live> = VecDeque::new();
    let mut next_sample = 0u64;
    let hostile = std::net::UdpSocket::bind(format!("{}:0", a.bind_ip)).map_err(|e| e.to_string())?;
    let mut relay_addr = None;
    let mut n = 0u64;
    while clock.now() < end {
        if clock.now() >= next_sample {
            next_sample += SAMPLE_EVERY.as_millis() as u64;
            r.samples.push(Sample {
                secs: clock.now() as f64 / 1000.0,
                rss_kib: a.relay_pid.and_then(super::flood::rss_kib),
                open_fds: a.relay_pid.and_then(open_fds),
                live_allocations: live_allocations(api),
                sessions_done: r.sessions,
            });
        }
        n += 1;
        match session(api, n, &mut r) {
            Ok(s) => {
                r.sessions += 1;
                relay_addr = Some(s.host.relay_addr());
                live.push_back(s);
            }
            Err(_) => r.errors += 1,
        }
        // Keep the live set bounded: every other session closes properly, the rest are
        // abandoned to the relay's timeouts.
        while live.len() > a.sessions.max(1) {
            if let Some(mut s) = live.pop_front() {
                if n.is_multiple_of(2) {
                    let _ = s.peer.close();
                    let _ = s.host.close();
                    r.closed += 1;
                } else {
                    r.abandoned += 1;
                }
            }
        }
        // A little hostile traffic: garbage and forged RELAYs at the relay port.
        if let Some(relay) = relay_addr {
            let mut junk = [0u8; 64];
            let _ = getrandom::getrandom(&mut junk);
            junk[0] = 0xDA;
            junk[1] = 0x72;
            junk[2] = 0;
            junk[3] = 10;
            for _ in 0..4 {
                if hostile.send_to(&junk, relay).is_ok() {
                    r.hostile_sent += 1;
                }
            }
        }
    }
    r.duration_secs = clock.now() as f64 / 1000.0;
    r.samples.push(Sample {
        secs: r.duration_secs,
        rss_kib: a.relay_pid.and_then(super::flood::rss_kib),
        open_fds: a.relay_pid.and_then(open_fds),
        live_allocations: live_allocations(api),
        sessions_done: r.sessions,
    });
    Ok(r)
}
