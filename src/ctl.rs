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

fn print_status(s: &str) -> Result<(), String> {
    let v: Value = serde_json::from_str(s).map_err(|e| e.to_string())?;
    let per_shard: Vec<u64> = v["allocations_per_shard"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    println!(
        "{}: {} of {} shards answering; {} allocations ({} hosts), per shard {per_shard:?}; packets in {}, forwarded {}, dropped {}",
        if v["draining"] == true { "draining" } else { "serving" },
        v["shards_answering"],
        v["shards"],
        v["allocations"],
        v["hosts"],
        v["packets_in"],
        v["packets_forwarded"],
        v["packets_dropped"]
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
        CtlCommand::Status { json: true } => println!("{}", c.status().map_err(e)?),
        CtlCommand::Status { json: false } => print_status(&c.status().map_err(e)?)?,
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
