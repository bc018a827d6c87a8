//! Datagram I/O backends behind one interface. The shard receives a batch into fixed buffers,
//! decides per datagram, and sends from the same buffers: no copy, no allocation per packet.

pub(crate) mod batch;
mod socket;

pub use batch::BatchIo;
pub use socket::bind_udp;

use std::net::SocketAddr;

/// Bytes per receive buffer: above the 1472-byte datagram limit, so an oversize datagram is seen
/// as such (and a truncated one is flagged) rather than silently cut to a valid length.
pub const BUF_SIZE: usize = 2048;
/// Datagrams per receive or send call.
pub const BATCH: usize = 64;

/// Where and how long one received datagram is.
#[derive(Clone, Copy, Debug)]
pub struct RecvMeta {
    pub len: usize,
    pub src: SocketAddr,
    /// The datagram was longer than the buffer.
    pub truncated: bool,
}

/// A fixed set of receive buffers, reused for every batch.
pub struct PacketBatch {
    pub bufs: Box<[[u8; BUF_SIZE]]>,
    pub meta: Vec<RecvMeta>,
}

impl PacketBatch {
    pub fn new() -> Self {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        Self {
            bufs: vec![[0u8; BUF_SIZE]; BATCH].into_boxed_slice(),
            meta: vec![RecvMeta { len: 0, src: unspecified, truncated: false }; BATCH],
        }
    }
}

impl Default for PacketBatch {
    fn default() -> Self {
        Self::new()
    }
}

/// One datagram to send: `len` bytes of batch buffer `slot`, to `dst`.
#[derive(Clone, Copy, Debug)]
pub struct SendItem {
    pub slot: usize,
    pub len: usize,
    pub dst: SocketAddr,
}

/// Outcome of a send call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendReport {
    pub sent: usize,
    /// Dropped because the socket buffer was full.
    pub would_block: usize,
    /// Dropped because the kernel refused that datagram (unreachable, no route, …).
    pub errors: usize,
}
