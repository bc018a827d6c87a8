//! Fleet mode (`docs/fleet.md`): stateless API instances and relays that register and heartbeat
//! in a shared directory (Redis or Valkey).
//!
//! - [`store`]: the connection, with a deadline on every operation;
//! - [`directory`]: the keyspace and its operations;
//! - [`placement`]: which relay gets a new host (pure);
//! - [`api`]: what an API instance does (placement, minting, join codes);
//! - [`agent`]: what a relay does (heartbeats, lifecycle events, drain);
//! - [`keys`]: the fleet key file;
//! - [`status`]: `ferry fleet status`.
//!
//! The relay side of tokens lives in the core ([`crate::core::FleetRelay`]): the data plane
//! checks them itself and never waits on the directory.

pub mod agent;
pub mod api;
pub mod directory;
pub mod keys;
pub mod limits;
pub mod placement;
pub mod records;
pub mod status;
pub mod store;
