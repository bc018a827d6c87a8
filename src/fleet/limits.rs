//! API rate limits shared by every API instance of a fleet (window counters in the directory, read
//! as a sliding window), so
//! a client spreading requests over instances behind a load balancer gets no more than from one.
//! When the directory cannot answer, each instance falls back to its own limiters.

use super::api::FleetApi;
use super::store::StoreError;
use crate::control::guard::{ApiLimits, Caller};

/// The key a caller's budgets are kept under: its player, else its token (hashed: a token never
/// appears in the directory), else its address.
fn who(c: &Caller) -> String {
    use sha2::Digest;
    let h = |s: &str| {
        let d = sha2::Sha256::digest(s.as_bytes());
        d[..10].iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    match (&c.subject, &c.token) {
        (Some(s), _) => format!("s{}", h(s)),
        (None, Some(t)) => format!("t{}", h(t)),
        (None, None) => format!("i{}", c.ip),
    }
}

fn now() -> u64 {
    crate::clock::Clock::unix_millis()
}

/// Spends one request from the caller's per-second budget (a burst of twice the rate, like a
/// single instance's). `Some(secs)`: refused, retry after `secs`.
pub async fn request(f: &FleetApi, c: &Caller, l: &ApiLimits) -> Result<Option<u64>, StoreError> {
    f.directory().take("req", &who(c), l.requests_per_sec.saturating_mul(2), 1000, now()).await
}

/// Whether the caller has no failed joins left (per minute), or the fleet none (per second).
pub async fn join_blocked(f: &FleetApi, c: &Caller, l: &ApiLimits) -> Result<Option<u64>, StoreError> {
    let own = match c.token.is_some() && c.subject.is_none() {
        true => l.join_failures_per_token_per_min,
        false => l.join_failures_per_ip_per_min,
    };
    let me = who(c);
    let mut budgets = vec![("joinfail", me.as_str(), own, 60_000)];
    if !(c.token.is_some() && c.subject.is_none()) {
        budgets.push(("joinfail", "all", l.join_failures_global_per_sec, 1000));
    }
    f.directory().spent(&budgets, now()).await
}

/// Spends a failed join from the caller's (and, for anonymous and player callers, the fleet's)
/// budget.
pub async fn join_failed(f: &FleetApi, c: &Caller, _l: &ApiLimits) -> Result<(), StoreError> {
    let d = f.directory();
    d.take("joinfail", &who(c), u32::MAX, 60_000, now()).await?;
    if !(c.token.is_some() && c.subject.is_none()) {
        d.take("joinfail", "all", u32::MAX, 1000, now()).await?;
    }
    Ok(())
}
