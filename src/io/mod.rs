//! Datagram I/O backends behind one interface. The shard receives a batch into fixed buffers,
//! decides per datagram, and sends from the same buffers: no copy, no allocation per packet.

pub(crate) mod batch;
mod socket;

pub use batch::BatchIo;
pub use socket::{bind_udp, claim_and_bind, claim_udp_port, PortClaim};

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
    /// Runs sent as one UDP GSO `sendmsg`.
    pub gso_sends: usize,
    /// Runs the kernel refused as GSO; their datagrams were sent one by one instead.
    pub gso_fallbacks: usize,
}

/// Most segments in one UDP GSO send (the kernel's `UDP_MAX_SEGMENTS` is at least 64).
pub const GSO_MAX_SEGS: usize = 64;
/// Most payload bytes in one GSO send: one IP datagram's 64 KiB, less room for headers.
pub const GSO_MAX_BYTES: usize = 63 * 1024;

/// Where the GSO run that starts at datagram `start` of `n` ends (exclusive). A run is datagrams
/// that follow each other to the same destination, each as long as the first except the last,
/// which may be shorter — the shape `UDP_SEGMENT` sends as one buffer cut into equal segments.
/// `at(i)` gives datagram `i`'s destination and length. A run of one is an ordinary send.
#[inline]
pub fn gso_run_end(n: usize, start: usize, at: impl Fn(usize) -> (SocketAddr, usize)) -> usize {
    let (dst, seg) = at(start);
    let mut bytes = seg;
    let mut end = start + 1;
    while end < n && end - start < GSO_MAX_SEGS {
        let (d, len) = at(end);
        if d != dst || len > seg || bytes + len > GSO_MAX_BYTES {
            break;
        }
        bytes += len;
        end += 1;
        if len < seg {
            break;
        }
    }
    end
}

/// Whether a refused GSO send means this kernel or device cannot do UDP GSO at all (rather than
/// a limit of one route, which the next run may not hit).
pub fn gso_unsupported(errno: i32) -> bool {
    matches!(errno, libc::EIO | libc::EOPNOTSUPP | libc::ENOPROTOOPT)
}

/// Writes a `UDP_SEGMENT` control message for segments of `seg` bytes into `buf` and points the
/// header at it.
pub(crate) fn set_udp_segment(hdr: &mut libc::msghdr, buf: &mut [u64; 4], seg: usize) {
    hdr.msg_control = buf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    hdr.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
    // SAFETY: msg_control points at 32 aligned bytes, room for one cmsghdr and a u16.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(hdr);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(items: &[(u16, usize)]) -> Vec<usize> {
        let at = |i: usize| (SocketAddr::from(([127, 0, 0, 1], items[i].0)), items[i].1);
        let (mut out, mut i) = (Vec::new(), 0);
        while i < items.len() {
            let end = gso_run_end(items.len(), i, at);
            out.push(end - i);
            i = end;
        }
        out
    }

    #[test]
    fn runs_group_same_destination_and_size() {
        // Same destination, same size: one run; a shorter last datagram ends it.
        assert_eq!(runs(&[(1, 100), (1, 100), (1, 100), (1, 60), (1, 100)]), vec![4, 1]);
        // A longer datagram or another destination starts a new run.
        assert_eq!(runs(&[(1, 100), (1, 200), (2, 200), (2, 200)]), vec![1, 1, 2]);
        // Interleaved destinations get no runs.
        assert_eq!(runs(&[(1, 100), (2, 100), (1, 100), (2, 100)]), vec![1, 1, 1, 1]);
    }

    #[test]
    fn runs_respect_segment_and_byte_limits() {
        assert_eq!(runs(&vec![(1, 10); 150]), vec![64, 64, 22]);
        // 1400-byte segments: 46 fit in 63 KiB.
        let r = runs(&vec![(1, 1400); 100]);
        assert_eq!(r, vec![46, 46, 8]);
        assert!(r.iter().all(|&n| n * 1400 <= GSO_MAX_BYTES));
    }
}
