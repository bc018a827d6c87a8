//! `ferry fleet status | events | keygen`: what an operator sees of a fleet, read straight from
//! the directory.

use std::collections::BTreeMap;
use std::time::Duration;

use super::directory::Directory;
use super::placement::{state, RelayState};
use crate::cli::{FleetCommand, FleetEventsArgs, FleetStatusArgs};

pub fn run(cmd: FleetCommand) -> Result<(), String> {
    match cmd {
        FleetCommand::Keygen { kid } => {
            println!("{}", super::keys::FleetKeys::generate_line(kid)?);
            Ok(())
        }
        FleetCommand::Status(a) => runtime()?.block_on(status(a)),
        FleetCommand::Events(a) => runtime()?.block_on(events(a)),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())
}

#[derive(serde::Serialize)]
struct RelayRow {
    name: String,
    state: &'static str,
    epoch: u32,
    uptime_ms: u64,
    allocations: u64,
    capacity: u64,
    heartbeat_age_ms: u64,
    endpoint: String,
}

#[derive(serde::Serialize)]
struct RegionRow {
    region: String,
    relays: Vec<RelayRow>,
    allocations: u64,
    /// Room for new hosts on ready relays.
    headroom: u64,
}

async fn status(a: FleetStatusArgs) -> Result<(), String> {
    let store = super::store::open(&a.store, Duration::from_secs(2), a.store_ca_file.as_deref())?;
    let dir = Directory::new(std::sync::Arc::new(store));
    let relays = dir.relays().await.map_err(|e| e.to_string())?;
    let (expiry, warmup) = (a.heartbeat_expiry.as_millis() as u64, a.relay_warmup.as_millis() as u64);
    let mut regions: BTreeMap<String, RegionRow> = BTreeMap::new();
    for r in &relays {
        let st = state(r, expiry, warmup);
        let row = regions.entry(r.record.region.clone()).or_insert_with(|| RegionRow {
            region: r.record.region.clone(),
            relays: Vec::new(),
            allocations: 0,
            headroom: 0,
        });
        if st != RelayState::Stale {
            row.allocations += r.record.allocations;
        }
        if st == RelayState::Ready {
            row.headroom += r.record.capacity.saturating_sub(r.record.allocations);
        }
        row.relays.push(RelayRow {
            name: r.record.name.clone(),
            state: st.as_str(),
            epoch: r.record.epoch,
            uptime_ms: r.record.uptime_ms + r.age_ms,
            allocations: r.record.allocations,
            capacity: r.record.capacity,
            heartbeat_age_ms: r.age_ms,
            endpoint: r.record.qos.clone(),
        });
    }
    let rows: Vec<RegionRow> = regions.into_values().collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?);
        return Ok(());
    }
    let mut total = (0u64, 0u64, 0usize, 0usize);
    for g in &rows {
        println!(
            "{}  ({} relays, {} allocations, headroom {})",
            g.region,
            g.relays.len(),
            g.allocations,
            g.headroom
        );
        println!(
            "  {:<24} {:<9} {:>10} {:>10} {:>21} {:>9}  endpoint",
            "relay", "state", "epoch", "uptime", "load/capacity", "heartbeat"
        );
        for r in &g.relays {
            println!(
                "  {:<24} {:<9} {:>10} {:>10} {:>21} {:>9}  {}",
                r.name,
                r.state,
                r.epoch,
                human(r.uptime_ms),
                format!("{}/{}", r.allocations, r.capacity),
                human(r.heartbeat_age_ms),
                r.endpoint
            );
            total.2 += 1;
            total.3 += (r.state == "ready") as usize;
        }
        total.0 += g.allocations;
        total.1 += g.headroom;
    }
    println!(
        "total: {} regions, {} relays ({} ready), {} allocations, headroom {}",
        rows.len(),
        total.2,
        total.3,
        total.0,
        total.1
    );
    Ok(())
}

fn human(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..120_000 => format!("{:.1}s", ms as f64 / 1000.0),
        120_000..7_200_000 => format!("{}m", ms / 60_000),
        _ => format!("{}h", ms / 3_600_000),
    }
}

async fn events(a: FleetEventsArgs) -> Result<(), String> {
    let store = super::store::open(&a.store, Duration::from_secs(10), a.store_ca_file.as_deref())?;
    let dir = Directory::new(std::sync::Arc::new(store));
    let mut after = a.after.clone();
    let mut printed = 0usize;
    loop {
        let batch =
            dir.events(&after, 100, if a.follow { 5_000 } else { 0 }).await.map_err(|e| e.to_string())?;
        if batch.is_empty() && !a.follow {
            return Ok(());
        }
        for (id, fields) in batch {
            let mut obj = serde_json::Map::new();
            obj.insert("stream_id".into(), id.clone().into());
            for (k, v) in fields {
                obj.insert(k, v.into());
            }
            println!("{}", serde_json::Value::Object(obj));
            after = id;
            printed += 1;
            if a.count > 0 && printed >= a.count {
                return Ok(());
            }
        }
    }
}
