//! `ferry demo`: the whole Unity connection flow against a running API, step by step.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use super::{ApiClient, RelayClient};

/// Allocate → join code → join → BIND both → CONNECT → RELAY both ways → CLOSE.
pub fn run(api: &str, token: Option<&str>, message: &str) -> Result<(), Box<dyn std::error::Error>> {
    let mut client = ApiClient::new(api);
    if let Some(t) = token {
        client = client.with_token(t);
    }
    let host_alloc = client.allocate(4, None)?;
    let ep = &host_alloc.server_endpoints[0];
    println!("1. host allocation {} on relay {}:{}", host_alloc.allocation_id, ep.host, ep.port);
    let code = client.join_code(&host_alloc.allocation_id)?;
    println!("2. join code {code}");
    let join_alloc = client.join(&code)?;
    println!("3. joiner allocation {}", join_alloc.allocation.allocation_id);

    let mut host = RelayClient::new(&host_alloc)?;
    host.bind()?;
    println!("4. host bound (BIND → BIND_RECEIVED) from {}", host.local_addr()?);
    let mut joiner = RelayClient::new(&join_alloc.allocation)?;
    joiner.bind()?;
    println!("5. joiner bound from {}", joiner.local_addr()?);
    let host_conn = B64.decode(&join_alloc.host_connection_data)?;
    let host_id = joiner.connect(&host_conn)?;
    println!("6. joiner connected to host {host_id} (CONNECT_REQUEST → ACCEPTED)");

    joiner.send(&host_id, message.as_bytes())?;
    let (from, payload) =
        host.recv_relay(Duration::from_secs(5))?.ok_or("the host received nothing within 5 s")?;
    println!("7. host received {:?} from {from}", String::from_utf8_lossy(&payload));
    let reply = format!("echo: {}", String::from_utf8_lossy(&payload));
    host.send(&from, reply.as_bytes())?;
    let (_, back) =
        joiner.recv_relay(Duration::from_secs(5))?.ok_or("the joiner received nothing within 5 s")?;
    println!("8. joiner received {:?}", String::from_utf8_lossy(&back));
    joiner.disconnect(&host_id)?;
    joiner.close()?;
    host.close()?;
    println!("9. closed both allocations — round trip complete");
    Ok(())
}
