//! The allocations API's JSON shapes (`docs/api.md`), shared by server and SDK.
//! Field names and casing follow Unity's models so its deserializers read them unchanged.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServerEndpoint {
    pub connection_type: String,
    pub network: String,
    pub reliable: bool,
    pub secure: bool,
    pub host: String,
    pub port: u16,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RelayServer {
    #[serde(rename = "ipV4")]
    pub ip_v4: String,
    pub port: u16,
}

/// A host's allocation (`POST /v1/allocate`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    pub allocation_id: String,
    pub allocation_id_bytes: String,
    pub server_endpoints: Vec<ServerEndpoint>,
    pub relay_server: RelayServer,
    pub key: String,
    pub connection_data: String,
    pub region: String,
}

/// A joiner's allocation (`POST /v1/join`): an [`Allocation`] plus the host's connection data.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct JoinAllocation {
    #[serde(flatten)]
    pub allocation: Allocation,
    pub host_connection_data: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    pub request_id: String,
    pub status: u16,
}

/// `{"meta": …, "data": …}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub meta: Meta,
    pub data: T,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AllocateData {
    pub allocation: Allocation,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinData {
    pub allocation: JoinAllocation,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinCodeData {
    pub join_code: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Region {
    pub id: String,
    pub description: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegionsData {
    pub regions: Vec<Region>,
}

/// One QoS server in Unity's discovery shape (`GET /v1/servers?service=relay`): clients ping
/// `endpoints[0]` (an `ip:port`) with Unity's QoS request to measure the region.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QosServer {
    pub region: String,
    pub endpoints: Vec<String>,
    pub services: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QosServersData {
    pub servers: Vec<QosServer>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocateRequest {
    pub max_connections: i64,
    #[serde(default)]
    pub region: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinCodeRequest {
    pub allocation_id: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinRequest {
    pub join_code: String,
}

/// `POST /v1/removejoiners`: the host, proving itself with its key, removes one joiner or every
/// joiner that has not connected.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoveJoinersRequest {
    pub allocation_id: String,
    pub key: String,
    #[serde(default)]
    pub joiner_allocation_id: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoveJoinersData {
    pub removed: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProblemDetail {
    pub key: String,
    pub value: String,
}

/// RFC 7807 problem body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Problem {
    pub status: u16,
    pub title: String,
    pub detail: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub code: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<ProblemDetail>,
}
