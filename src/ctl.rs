//! `ferry ctl`: operates a running relay through its control socket (or loopback TCP listener):
//! status, allocations, stats, kick, drain, undrain.

use serde_json::Value;

use crate::cli::{CtlArgs, CtlCommand};
use crate::control::socket::{ClientError, ControlClient};

fn connect(a: &CtlArgs) -> Result<ControlClient, String> {
    match (&a.socket, a.tcp) {
        (Some(path), _) => ControlClient::connect_unix(path),
        (None, Some(addr)) => {
            ControlClient::connect_tcp(addr, a.secret.as_deref().ok_or("--tcp needs --secret")?)
        }
        (None, None) => return Err("give --socket PATH or --tcp ADDR --secret S".into()),
    }
    .map_err(|e| format!("cannot reach the relay: {e}"))
}

/// The status, with rates measured over one second (two samples).
fn status_with_rates(c: &mut ControlClient) -> Result<Value, String> {
    let first: Value =
        serde_json::from_str(&c.status().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    std::thread::sleep(std::time::Duration::from_secs(1));
    let mut v: Value =
        serde_json::from_str(&c.status().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    for k in ["packets_in", "packets_forwarded", "packets_dropped", "allocations_created"] {
        let d = v[k].as_u64().unwrap_or(0).saturating_sub(first[k].as_u64().unwrap_or(0));
        v[format!("{k}_per_sec")] = d.into();
    }
    Ok(v)
}

fn print_status(v: &Value) -> Result<(), String> {
    let per_shard: Vec<u64> = v["allocations_per_shard"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    println!(
        "{}: {} of {} shards answering; {} allocations ({} hosts), per shard {per_shard:?}",
        if v["draining"] == true { "draining" } else { "serving" },
        v["shards_answering"],
        v["shards"],
        v["allocations"],
        v["hosts"],
    );
    println!(
        "per second: {} datagrams in, {} forwarded, {} dropped, {} allocations created",
        v["packets_in_per_sec"],
        v["packets_forwarded_per_sec"],
        v["packets_dropped_per_sec"],
        v["allocations_created_per_sec"]
    );
    Ok(())
}

fn print_allocations(rows: &[&Value]) {
    println!(
        "{:<36}  {:<6}  {:>8}  {:>8}  {:<22}  {:>5}  {:>12}",
        "id", "role", "age s", "idle s", "bound", "peers", "bytes"
    );
    for x in rows {
        println!(
            "{:<36}  {:<6}  {:>8.1}  {:>8.1}  {:<22}  {:>5}  {:>12}",
            x["id"].as_str().unwrap_or_default(),
            x["role"].as_str().unwrap_or_default(),
            x["age_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
            x["idle_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
            x["bound"].as_str().unwrap_or("-"),
            x["peers"],
            x["bytes_relayed"]
        );
    }
}

/// Runs one `ferry ctl` command.
pub fn run(a: &CtlArgs) -> Result<(), String> {
    let mut c = connect(a)?;
    let e = |e: ClientError| e.to_string();
    match &a.command {
        CtlCommand::Stats => print!("{}", c.stats().map_err(e)?),
        CtlCommand::Status { json: true } => println!("{}", status_with_rates(&mut c)?),
        CtlCommand::Status { json: false } => print_status(&status_with_rates(&mut c)?)?,
        CtlCommand::Allocations { json, role, host, unbound } => {
            let all: Vec<Value> =
                serde_json::from_str(&c.allocations().map_err(e)?).map_err(|e| e.to_string())?;
            let rows: Vec<&Value> = all
                .iter()
                .filter(|x| role.as_deref().is_none_or(|r| x["role"] == r))
                .filter(|x| host.as_deref().is_none_or(|h| x["host"] == h || x["id"] == h))
                .filter(|x| !*unbound || x["bound"].is_null())
                .collect();
            if *json {
                println!("{}", serde_json::to_string(&rows).map_err(|e| e.to_string())?);
            } else {
                print_allocations(&rows);
            }
        }
        CtlCommand::Kick { id } => {
            let parsed =
                crate::wire::AllocationId::parse(id).ok_or_else(|| format!("`{id}` is not a UUID"))?;
            c.release(&parsed).map_err(|e| format!("kick {id}: {e}"))?;
            println!("released {id}");
        }
        CtlCommand::Drain => {
            c.drain().map_err(e)?;
            println!("draining: no new allocations; live sessions keep working");
        }
        CtlCommand::Reload => {
            c.reload().map_err(e)?;
            println!("reload requested: the relay's log says what changed");
        }
        CtlCommand::Undrain => {
            c.undrain().map_err(e)?;
            println!("taking new allocations again");
        }
    }
    Ok(())
}
