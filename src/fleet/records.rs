//! What the fleet directory holds (JSON values; `docs/fleet.md`, "Directory").

use serde::{Deserialize, Serialize};

use crate::control::model::ServerEndpoint;

/// A relay's heartbeat record (`ferry:v1:relay:{name}`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RelayRecord {
    pub name: String,
    pub region: String,
    /// Random per boot: tokens name it, and a restart (new epoch) voids them.
    pub epoch: u32,
    /// What allocations on this relay list as `serverEndpoints`.
    pub endpoints: Vec<ServerEndpoint>,
    /// `relayServer.ipV4` and the port for allocations on this relay.
    pub ipv4: String,
    pub port: u16,
    /// `host:port` where it answers QoS pings (its relay port).
    pub qos: String,
    /// Allocations it can hold, and holds.
    pub capacity: u64,
    pub allocations: u64,
    /// Bound allocations, and datagrams forwarded since start.
    pub bound: u64,
    pub forwarded: u64,
    pub draining: bool,
    /// How long it had been up at this heartbeat.
    pub uptime_ms: u64,
    pub version: String,
    /// How long the directory keeps this record after the heartbeat that wrote it (readers
    /// compute the heartbeat's age from what is left).
    pub keep_ms: u64,
}

/// An allocation minted by an API instance (`ferry:v1:alloc:{id}`). Never holds the key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AllocRecord {
    pub relay: String,
    pub epoch: u32,
    pub region: String,
    /// `host` or `joiner`.
    pub role: String,
    /// A joiner's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Base64 of the 255-byte connection data (the token).
    pub connection_data: String,
    pub max_connections: u16,
    /// `project/environment` of the caller that created it.
    pub tenant: String,
    /// Unix milliseconds.
    pub created_ms: u64,
}
