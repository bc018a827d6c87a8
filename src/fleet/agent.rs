//! A relay's life in the fleet: it registers and heartbeats its record, and tells the directory
//! when allocations bind and end (so a join code dies with its host). It dials out only; the data
//! plane never waits on it, and keeps forwarding while the directory is away: heartbeats resume
//! with the same epoch (so no session is lost) and the events buffered meanwhile are replayed,
//! up to a bound.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::directory::{Directory, Event};
use super::records::RelayRecord;
use crate::control::relay::RelayHandle;
use crate::core::ReleaseReason;

/// Events kept while the directory is unreachable; older ones are dropped past this.
pub const MAX_BUFFERED: usize = 100_000;
/// Events sent to the directory in one batch.
pub const BATCH: usize = 128;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub heartbeat: Duration,
    /// How long a record outlives its last heartbeat in the directory.
    pub keep: Duration,
    /// How long a bound allocation's records are kept (at most).
    pub session_ttl: Duration,
}

#[derive(Clone, Debug)]
enum Pending {
    Bound { id: String, role: &'static str, unix_ms: u64 },
    Closed { id: String, role: &'static str, reason: &'static str, bytes: u64, unix_ms: u64 },
}

/// Counters of the agent (`ferry_fleet_*` on a relay).
#[derive(Default, Debug)]
pub struct AgentStats {
    pub heartbeats: AtomicU64,
    pub heartbeat_failures: AtomicU64,
    pub events_sent: AtomicU64,
    pub events_dropped: AtomicU64,
    pub registered: AtomicBool,
}

pub struct Agent {
    dir: Directory,
    cfg: AgentConfig,
    record: Mutex<RelayRecord>,
    draining: AtomicBool,
    pending: Mutex<VecDeque<Pending>>,
    wake_heartbeat: tokio::sync::Notify,
    wake_events: tokio::sync::Notify,
    pub stats: AgentStats,
    clock: crate::clock::Clock,
    started: u64,
}

impl Agent {
    pub fn new(dir: Directory, cfg: AgentConfig, record: RelayRecord) -> Arc<Self> {
        let clock = crate::clock::Clock::new();
        Arc::new(Self {
            dir,
            cfg,
            record: Mutex::new(record),
            draining: AtomicBool::new(false),
            pending: Mutex::new(VecDeque::new()),
            wake_heartbeat: tokio::sync::Notify::new(),
            wake_events: tokio::sync::Notify::new(),
            stats: AgentStats::default(),
            started: clock.now(),
            clock,
        })
    }

    pub fn name(&self) -> String {
        self.record.lock().map(|r| r.name.clone()).unwrap_or_default()
    }

    pub fn epoch(&self) -> u32 {
        self.record.lock().map(|r| r.epoch).unwrap_or_default()
    }

    /// Marks the relay draining and heartbeats at once, so API instances stop placing hosts here.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.wake_heartbeat.notify_one();
    }

    /// Takes a shard's lifecycle event.
    pub fn on_event(&self, ev: &crate::core::Event) {
        let now = crate::clock::Clock::unix_millis();
        let p = match *ev {
            crate::core::Event::Bound { id, moved: false, .. } => {
                Pending::Bound { id: id.to_string(), role: "", unix_ms: now }
            }
            crate::core::Event::Released { id, is_host, reason, bytes } => Pending::Closed {
                id: id.to_string(),
                role: if is_host { "host" } else { "joiner" },
                reason: reason_str(reason),
                bytes,
                unix_ms: now,
            },
            _ => return,
        };
        let mut q = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= MAX_BUFFERED {
            q.pop_front();
            self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(p);
        drop(q);
        self.wake_events.notify_one();
    }

    async fn beat(&self, relay: &RelayHandle) -> bool {
        let stats = relay.stats().await;
        let rec = {
            let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
            r.allocations = stats.iter().map(|s| s.allocations as u64).sum();
            r.bound = stats.iter().map(|s| s.core.binds_new).sum::<u64>();
            r.forwarded = stats.iter().map(|s| s.core.forwarded_packets).sum();
            r.draining = self.draining.load(Ordering::SeqCst);
            r.uptime_ms = self.clock.now() - self.started;
            r.keep_ms = self.cfg.keep.as_millis() as u64;
            r.clone()
        };
        let keep = self.cfg.keep.as_millis() as u64;
        match self.dir.heartbeat(&rec, keep).await {
            Ok(()) => {
                self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                if !self.stats.registered.swap(true, Ordering::SeqCst) {
                    tracing::info!(relay = %rec.name, epoch = rec.epoch, region = %rec.region, store = %self.dir.store().url(), "registered in the fleet directory");
                }
                true
            }
            Err(e) => {
                self.stats.heartbeat_failures.fetch_add(1, Ordering::Relaxed);
                if self.stats.registered.swap(false, Ordering::SeqCst) {
                    tracing::warn!(error = %e, "heartbeat failed; forwarding goes on, events are buffered");
                }
                false
            }
        }
    }

    /// Heartbeats every `heartbeat` (and at once when draining starts) until the task is dropped.
    pub async fn run_heartbeats(self: Arc<Self>, relay: RelayHandle) {
        loop {
            if self.beat(&relay).await {
                self.wake_events.notify_one();
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.heartbeat) => {}
                _ = self.wake_heartbeat.notified() => {}
            }
        }
    }

    /// Sends buffered events in order, up to [`BATCH`] per two round trips; on failure keeps
    /// them and retries after a pause.
    pub async fn run_events(self: Arc<Self>) {
        let keep = self.cfg.session_ttl.as_millis() as u64;
        let relay = self.name();
        loop {
            let batch: Vec<Event> = {
                let q = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                q.iter()
                    .take(BATCH)
                    .map(|p| match p {
                        Pending::Bound { id, role, unix_ms } => Event {
                            kind: "bound",
                            id: id.clone(),
                            relay: relay.clone(),
                            role,
                            reason: None,
                            bytes: None,
                            unix_ms: *unix_ms,
                        },
                        Pending::Closed { id, role, reason, bytes, unix_ms } => Event {
                            kind: "closed",
                            id: id.clone(),
                            relay: relay.clone(),
                            role,
                            reason: Some(reason),
                            bytes: Some(*bytes),
                            unix_ms: *unix_ms,
                        },
                    })
                    .collect()
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = self.wake_events.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            let dropped_before = self.stats.events_dropped.load(Ordering::Relaxed);
            match self.dir.lifecycle(&batch, keep).await {
                Ok(()) => {
                    let mut q = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                    // Only what was sent: events that overflowed meanwhile already left the front.
                    let gone = self.stats.events_dropped.load(Ordering::Relaxed) - dropped_before;
                    for _ in 0..batch.len().saturating_sub(gone as usize).min(q.len()) {
                        q.pop_front();
                    }
                    self.stats.events_sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    tokio::select! {
                        _ = tokio::time::sleep(self.cfg.heartbeat) => {}
                        _ = self.wake_events.notified() => {}
                    }
                }
            }
        }
    }

    pub fn store_stats(&self) -> std::collections::BTreeMap<&'static str, super::store::OpStats> {
        self.dir.store().stats()
    }

    /// Events waiting to be sent.
    pub fn buffered(&self) -> usize {
        self.pending.lock().map(|q| q.len()).unwrap_or(0)
    }

    /// Renders `ferry_fleet_*` metrics of this relay.
    pub fn render(&self, o: &mut String) {
        use std::fmt::Write;
        let s = &self.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "# HELP ferry_fleet_heartbeats_total Heartbeats written to the fleet directory, by result."
        );
        let _ = writeln!(o, "# TYPE ferry_fleet_heartbeats_total counter");
        let _ = writeln!(o, "ferry_fleet_heartbeats_total{{result=\"ok\"}} {}", g(&s.heartbeats));
        let _ = writeln!(o, "ferry_fleet_heartbeats_total{{result=\"failed\"}} {}", g(&s.heartbeat_failures));
        let _ =
            writeln!(o, "# HELP ferry_fleet_registered Whether the last heartbeat reached the directory.");
        let _ = writeln!(o, "# TYPE ferry_fleet_registered gauge");
        let _ = writeln!(o, "ferry_fleet_registered {}", s.registered.load(Ordering::Relaxed) as u8);
        let _ = writeln!(o, "# HELP ferry_fleet_events_total Lifecycle events for the directory, by fate.");
        let _ = writeln!(o, "# TYPE ferry_fleet_events_total counter");
        let _ = writeln!(o, "ferry_fleet_events_total{{result=\"sent\"}} {}", g(&s.events_sent));
        let _ = writeln!(o, "ferry_fleet_events_total{{result=\"dropped\"}} {}", g(&s.events_dropped));
        let _ = writeln!(o, "# HELP ferry_fleet_events_buffered Events waiting for the directory.");
        let _ = writeln!(o, "# TYPE ferry_fleet_events_buffered gauge");
        let _ = writeln!(o, "ferry_fleet_events_buffered {}", self.buffered());
        let _ = writeln!(o, "# HELP ferry_fleet_draining Whether this relay is draining.");
        let _ = writeln!(o, "# TYPE ferry_fleet_draining gauge");
        let _ = writeln!(o, "ferry_fleet_draining {}", self.draining.load(Ordering::Relaxed) as u8);
    }
}

fn reason_str(r: ReleaseReason) -> &'static str {
    r.as_str()
}
