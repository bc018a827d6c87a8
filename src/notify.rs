//! Service-manager readiness (the systemd `sd_notify` protocol, no library): `READY=1` once every
//! shard and the API answer, `STOPPING=1` when a drain begins, and `WATCHDOG=1` keep-alives that
//! are sent only while the shards really answer (a wedged relay stops them and gets restarted).
//! Does nothing when `NOTIFY_SOCKET` is not set.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where to notify, from the environment the service manager set.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    path: String,
}

impl Notifier {
    /// `None` when not run under a notifying service manager.
    pub fn from_env() -> Option<Self> {
        let path = std::env::var("NOTIFY_SOCKET").ok().filter(|p| !p.is_empty())?;
        let sock = UnixDatagram::unbound().ok()?;
        Some(Self { sock, path })
    }

    /// Sends one notification (`KEY=value` lines). Failures are logged, never fatal.
    pub fn send(&self, msg: &str) {
        let r = if let Some(name) = self.path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|a| self.sock.send_to_addr(msg.as_bytes(), &a))
        } else {
            self.sock.send_to(msg.as_bytes(), &self.path)
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "service manager notification failed");
        }
    }
}

/// The watchdog interval the service manager asked for (`WATCHDOG_USEC`), if any, for this process.
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok()) {
        if pid != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}
