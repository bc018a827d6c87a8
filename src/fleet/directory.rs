//! The fleet directory's keyspace and operations (`docs/fleet.md`, "Directory").
//!
//! Keys (prefix `ferry:v1:`):
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `relays` | set of relay names | kept; names whose record expired are removed on read |
//! | `relay:{name}` | [`RelayRecord`] JSON | `keep` after each heartbeat |
//! | `alloc:{id}` | [`AllocRecord`] JSON | the bind window until bound, then the session limit |
//! | `alloc:{id}:jc` | the host's join code | as `alloc:{id}` |
//! | `jc:{CODE}` | the host's allocation ID | as `alloc:{id}` |
//! | `rl:{scope}:{subject}:{window}` | counter | one window |
//! | `events` | stream of lifecycle events | capped at `events_max` entries |
//!
//! Join codes are created with `SET NX` (a code is never handed to two allocations) and the
//! allocation's code with a second `SET NX` (two API instances asked at once agree on one
//! code). Every command touches one key or keys with the same hash tag, so none needs Lua.

use std::sync::Arc;

use super::placement::Seen;
use super::records::{AllocRecord, RelayRecord};
use super::store::{Store, StoreError};

pub const PREFIX: &str = "ferry:v1:";

/// An event stream entry: its stream ID and its fields.
pub type StreamEntry = (String, Vec<(String, String)>);

/// A lifecycle event for the `events` stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `created`, `bound` or `closed`.
    pub kind: &'static str,
    pub id: String,
    pub relay: String,
    pub role: &'static str,
    /// `closed`: why, and the bytes its client sent through the relay.
    pub reason: Option<&'static str>,
    pub bytes: Option<u64>,
    pub unix_ms: u64,
}

#[derive(Clone)]
pub struct Directory {
    store: Arc<Store>,
    /// Most entries the event stream keeps (approximately).
    pub events_max: u64,
}

fn k(parts: &[&str]) -> String {
    let mut s = String::from(PREFIX);
    s.push_str(&parts.join(":"));
    s
}

impl Directory {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store, events_max: 1_000_000 }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn xadd(&self, p: &mut redis::Pipeline, e: &Event) {
        let mut c = redis::cmd("XADD");
        c.arg(k(&["events"])).arg("MAXLEN").arg("~").arg(self.events_max).arg("*");
        c.arg("type").arg(e.kind).arg("id").arg(&e.id).arg("relay").arg(&e.relay);
        if !e.role.is_empty() {
            c.arg("role").arg(e.role);
        }
        if let Some(r) = e.reason {
            c.arg("reason").arg(r);
        }
        if let Some(b) = e.bytes {
            c.arg("bytes").arg(b);
        }
        c.arg("ts").arg(e.unix_ms);
        p.add_command(c).ignore();
    }

    /// Publishes a relay's record, kept `keep_ms`.
    pub async fn heartbeat(&self, r: &RelayRecord, keep_ms: u64) -> Result<(), StoreError> {
        let json = serde_json::to_string(r).map_err(|e| StoreError(e.to_string()))?;
        let mut p = redis::pipe();
        p.cmd("SADD").arg(k(&["relays"])).arg(&r.name).ignore();
        p.cmd("SET").arg(k(&["relay", &r.name])).arg(json).arg("PX").arg(keep_ms).ignore();
        self.store.query::<()>("heartbeat", p).await
    }

    /// Every relay with a record, with the age of its last heartbeat (the record's `keep_ms`
    /// minus what is left of its lifetime: the directory's own clock, whatever the relays' and
    /// ours say).
    pub async fn relays(&self) -> Result<Vec<Seen>, StoreError> {
        let names: Vec<String> =
            self.store.query("relays", redis::cmd("SMEMBERS").arg(k(&["relays"])).clone()).await?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        for n in &names {
            p.cmd("GET").arg(k(&["relay", n]));
            p.cmd("PTTL").arg(k(&["relay", n]));
        }
        let v: Vec<redis::Value> = self.store.query("relays", p).await?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let json: Option<String> = redis::from_redis_value(v[2 * i].clone()).ok().flatten();
            let pttl: i64 = redis::from_redis_value(v[2 * i + 1].clone()).unwrap_or(-2);
            match json.and_then(|j| serde_json::from_str::<RelayRecord>(&j).ok()) {
                Some(record) if pttl >= 0 => {
                    let age_ms = record.keep_ms.saturating_sub(pttl as u64);
                    out.push(Seen { record, age_ms })
                }
                _ => gone.push(n.clone()),
            }
        }
        if !gone.is_empty() {
            let mut c = redis::cmd("SREM");
            c.arg(k(&["relays"])).arg(gone);
            let _ = self.store.query::<()>("relays", c).await;
        }
        out.sort_by(|a, b| (&a.record.region, &a.record.name).cmp(&(&b.record.region, &b.record.name)));
        Ok(out)
    }

    /// Records a new allocation (with its `created` event), kept `ttl_ms`.
    pub async fn put_alloc(
        &self,
        id: &str,
        r: &AllocRecord,
        ttl_ms: u64,
        ev: &Event,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(r).map_err(|e| StoreError(e.to_string()))?;
        let mut p = redis::pipe();
        p.cmd("SET").arg(k(&["alloc", &tag(id)])).arg(json).arg("PX").arg(ttl_ms).ignore();
        self.xadd(&mut p, ev);
        self.store.query::<()>("put_alloc", p).await
    }

    pub async fn alloc(&self, id: &str) -> Result<Option<AllocRecord>, StoreError> {
        let v: Option<String> =
            self.store.query("get_alloc", redis::cmd("GET").arg(k(&["alloc", &tag(id)])).clone()).await?;
        Ok(v.and_then(|j| serde_json::from_str(&j).ok()))
    }

    /// The host's join code, created if it has none (`true` when this call created it).
    /// `fresh` draws a random code.
    pub async fn join_code(
        &self,
        id: &str,
        mut fresh: impl FnMut() -> String,
    ) -> Result<Option<(String, bool)>, StoreError> {
        let (ak, jk) = (k(&["alloc", &tag(id)]), k(&["alloc", &tag(id), "jc"]));
        for _ in 0..8 {
            let mut p = redis::pipe();
            p.cmd("GET").arg(&jk).cmd("PTTL").arg(&ak);
            let (existing, pttl): (Option<String>, i64) = self.store.query("join_code", p).await?;
            if let Some(c) = existing {
                return Ok(Some((c, false)));
            }
            if pttl <= 0 {
                return Ok(None);
            }
            let code = fresh();
            let taken: Option<String> = self
                .store
                .query(
                    "join_code",
                    redis::cmd("SET").arg(k(&["jc", &code])).arg(id).arg("NX").arg("PX").arg(pttl).clone(),
                )
                .await?;
            if taken.is_none() {
                continue; // the code belongs to another session: draw again
            }
            let mine: Option<String> = self
                .store
                .query(
                    "join_code",
                    redis::cmd("SET").arg(&jk).arg(&code).arg("NX").arg("PX").arg(pttl).clone(),
                )
                .await?;
            if mine.is_some() {
                return Ok(Some((code, true)));
            }
            // Another API instance gave this allocation a code first: use that one.
            let _ =
                self.store.query::<()>("join_code", redis::cmd("DEL").arg(k(&["jc", &code])).clone()).await;
        }
        Err(StoreError("could not settle on a join code".into()))
    }

    /// The host allocation a join code names.
    pub async fn resolve(&self, code: &str) -> Result<Option<String>, StoreError> {
        self.store.query("resolve", redis::cmd("GET").arg(k(&["jc", code])).clone()).await
    }

    /// Forgets a join code whose host is gone (a relay that died without telling anyone).
    pub async fn forget_code(&self, code: &str, id: &str) -> Result<(), StoreError> {
        let mut p = redis::pipe();
        p.cmd("DEL").arg(k(&["jc", code])).ignore();
        p.cmd("DEL").arg(k(&["alloc", &tag(id)])).arg(k(&["alloc", &tag(id), "jc"])).ignore();
        self.store.query::<()>("forget", p).await
    }

    /// Applies a batch of a relay's lifecycle events in two round trips, in order: `bound`
    /// extends the allocation's records (and its join code) to `keep_ms`, as long as a session
    /// may live; `closed` deletes them and the join code (a join code dies with its host). Each
    /// event is added to the stream. Applying a batch again after a failure is harmless (events
    /// are delivered at least once).
    pub async fn lifecycle(&self, events: &[Event], keep_ms: u64) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut p = redis::pipe();
        for e in events {
            let (ak, jk) = (k(&["alloc", &tag(&e.id)]), k(&["alloc", &tag(&e.id), "jc"]));
            // One value per event: its host's join code, read before anything changes.
            p.cmd("GET").arg(&jk);
            if e.kind == "bound" {
                p.cmd("PEXPIRE").arg(&ak).arg(keep_ms).ignore();
                p.cmd("PEXPIRE").arg(&jk).arg(keep_ms).ignore();
            } else {
                p.cmd("DEL").arg(&ak).arg(&jk).ignore();
            }
            self.xadd(&mut p, e);
        }
        let codes: Vec<Option<String>> = self.store.query("lifecycle", p).await?;
        let mut p = redis::pipe();
        let mut any = false;
        for (e, code) in events.iter().zip(codes) {
            let Some(code) = code else { continue };
            any = true;
            if e.kind == "bound" {
                p.cmd("PEXPIRE").arg(k(&["jc", &code])).arg(keep_ms).ignore();
            } else {
                p.cmd("DEL").arg(k(&["jc", &code])).ignore();
            }
        }
        if any {
            self.store.query::<()>("lifecycle", p).await?;
        }
        Ok(())
    }

    /// Takes one from a shared budget of `limit` per `window_ms` for `subject`: `None` when it
    /// allows one now, else the seconds until the window turns.
    pub async fn take(
        &self,
        scope: &str,
        subject: &str,
        limit: u32,
        window_ms: u64,
        unix_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let window_ms = window_ms.max(1);
        let w = unix_ms / window_ms;
        let key = k(&["rl", scope, subject, &w.to_string()]);
        let prev = k(&["rl", scope, subject, &w.saturating_sub(1).to_string()]);
        // One round trip; no MULTI needed: the expiry is set after every increment, so a counter
        // never outlives its window by more than one window.
        let mut p = redis::pipe();
        p.cmd("INCR").arg(&key).cmd("PEXPIRE").arg(&key).arg(window_ms * 2).ignore();
        p.cmd("GET").arg(&prev);
        let (n, before): (u64, Option<u64>) = self.store.query("rate_limit", p).await?;
        let est = sliding(before.unwrap_or(0), n, unix_ms, window_ms);
        Ok((est > limit as f64).then(|| ((w + 1) * window_ms - unix_ms).div_ceil(1000).max(1)))
    }

    /// Whether any of these budgets (`scope`, `subject`, `limit`, `window_ms`) is spent, without
    /// spending: the longest wait in seconds, in one round trip.
    pub async fn spent(
        &self,
        budgets: &[(&str, &str, u32, u64)],
        unix_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let mut p = redis::pipe();
        for (scope, subject, _, window_ms) in budgets {
            let w = unix_ms / window_ms.max(&1);
            p.cmd("GET").arg(k(&["rl", scope, subject, &w.to_string()]));
            p.cmd("GET").arg(k(&["rl", scope, subject, &w.saturating_sub(1).to_string()]));
        }
        let counts: Vec<Option<u64>> = self.store.query("rate_limit", p).await?;
        let mut wait = None;
        for ((_, _, limit, window_ms), n) in budgets.iter().zip(counts.chunks(2)) {
            let window_ms = (*window_ms).max(1);
            let (cur, before) = (n.first().copied().flatten(), n.get(1).copied().flatten());
            if sliding(before.unwrap_or(0), cur.unwrap_or(0), unix_ms, window_ms) >= *limit as f64 {
                let w = unix_ms / window_ms;
                let secs = ((w + 1) * window_ms - unix_ms).div_ceil(1000).max(1);
                wait = Some(wait.map_or(secs, |x: u64| x.max(secs)));
            }
        }
        Ok(wait)
    }

    /// Lifecycle events after stream ID `after` (`0` from the start), at most `count`, waiting
    /// up to `block_ms` for one when there is none.
    pub async fn events(
        &self,
        after: &str,
        count: usize,
        block_ms: u64,
    ) -> Result<Vec<StreamEntry>, StoreError> {
        let mut c = redis::cmd("XREAD");
        c.arg("COUNT").arg(count);
        if block_ms > 0 {
            c.arg("BLOCK").arg(block_ms);
        }
        c.arg("STREAMS").arg(k(&["events"])).arg(after);
        let v: Option<Vec<(String, Vec<StreamEntry>)>> = self.store.query("events", c).await?;
        Ok(v.into_iter().flatten().flat_map(|(_, entries)| entries).collect())
    }
}

/// `{id}`: keys of one allocation share a Redis Cluster hash slot.
fn tag(id: &str) -> String {
    format!("{{{id}}}")
}

/// The sliding-window estimate of a count over the last `window_ms`: the current window's count
/// plus the previous window's, weighted by how much of it the sliding window still covers. A fixed
/// window alone would let a caller spend its budget twice around each window boundary.
fn sliding(previous: u64, current: u64, unix_ms: u64, window_ms: u64) -> f64 {
    let into = (unix_ms % window_ms) as f64 / window_ms as f64;
    previous as f64 * (1.0 - into) + current as f64
}

#[cfg(test)]
mod sliding_tests {
    use super::sliding;

    #[test]
    fn the_previous_window_counts_less_as_it_slides_away() {
        assert_eq!(sliding(4, 0, 60_000, 60_000), 4.0, "at the boundary, all of it");
        assert_eq!(sliding(4, 1, 90_000, 60_000), 3.0, "half way, half of it");
        assert_eq!(sliding(0, 3, 119_999, 60_000), 3.0);
        // Four failures just before a boundary and four just after: the estimate sees eight.
        assert!(sliding(4, 4, 120_500, 60_000) > 7.9);
    }
}
