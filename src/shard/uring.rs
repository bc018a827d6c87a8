//! The io_uring event loop of a shard.
//!
//! - One multishot `recvmsg` draws datagrams into a ring of provided buffers (2048 × 2 KiB),
//!   so receiving costs no syscall per datagram and no buffer bookkeeping per receive.
//! - A forward or reply is a `sendmsg` from the very buffer the datagram arrived in (zero copy);
//!   the buffer returns to the ring when that send completes. With GSO on, a run of same-size
//!   datagrams to one destination is one `sendmsg` with a `UDP_SEGMENT` control message, one iovec
//!   per receive buffer; a run the kernel refuses is resent one datagram per `sendmsg`.
//! - The socket is a registered (fixed) file; all sends of a turn go to the kernel in one
//!   `io_uring_enter`, which also waits for the next completion or timer deadline.
//! - Mailbox wake-ups arrive as completions of a multishot poll on the shard's eventfd.
//!
//! Relay-originated datagrams and hand-offs (rare) are sent with a plain `sendto`.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use crossbeam_channel::Receiver;
use io_uring::{cqueue, opcode, types, IoUring};

use super::{ShardHandle, ShardMsg, ShardSetup, State, Verdict};
use crate::io::batch::{to_socket_addr, write_sockaddr};
use crate::io::{gso_run_end, gso_unsupported, set_udp_segment, SendReport, GSO_MAX_SEGS};
use crate::wire::MAX_DATAGRAM;

const BUFS: u16 = 2048;
const BUF: usize = 2048;
const BGID: u16 = 0;
/// `io_uring_recvmsg_out` precedes the source address and the payload in each buffer.
const OUT_HDR: usize = 16;
/// Room for the source address: a `sockaddr_in6` (also fits a `sockaddr_in`).
const NAME_LEN: usize = std::mem::size_of::<libc::sockaddr_in6>();
const PAYLOAD: usize = OUT_HDR + NAME_LEN;
const TAG: u64 = 0xFFFF_FFFF << 32;
const RECV: u64 = 1 << 32;
const SEND: u64 = 2 << 32;
const WAKE: u64 = 3 << 32;
const CANCEL: u64 = 4 << 32;
const GSO_SEND: u64 = 5 << 32;

/// The provided-buffer ring and the memory behind it.
struct BufRing {
    ring: *mut types::BufRingEntry,
    ring_bytes: usize,
    tail: u16,
    slab: Box<[u8]>,
}

impl BufRing {
    fn new(ring: &IoUring) -> io::Result<Self> {
        let ring_bytes = BUFS as usize * std::mem::size_of::<types::BufRingEntry>();
        // SAFETY: a fresh anonymous private mapping; checked for MAP_FAILED below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut me = Self {
            ring: addr.cast(),
            ring_bytes,
            tail: 0,
            slab: vec![0u8; BUFS as usize * BUF].into_boxed_slice(),
        };
        // SAFETY: the mapping is page aligned, sized for BUFS entries, and lives as long as `me`,
        // which the shard keeps until after the ring is dropped.
        unsafe { ring.submitter().register_buf_ring_with_flags(addr as u64, BUFS, BGID, 0)? };
        for bid in 0..BUFS {
            me.push(bid);
        }
        me.commit();
        Ok(me)
    }

    /// Hands buffer `bid` back to the kernel (visible after [`commit`](Self::commit)).
    fn push(&mut self, bid: u16) {
        let i = (self.tail & (BUFS - 1)) as usize;
        // SAFETY: `i` < BUFS, inside the mapping.
        let e = unsafe { &mut *self.ring.add(i) };
        e.set_addr(self.slab[bid as usize * BUF..].as_ptr() as u64);
        e.set_len(BUF as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn commit(&self) {
        // SAFETY: the tail field overlays entry 0's reserved field; the kernel reads it atomically.
        let tail = unsafe { &*(types::BufRingEntry::tail(self.ring) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }

    fn buf(&mut self, bid: u16) -> &mut [u8] {
        &mut self.slab[bid as usize * BUF..][..BUF]
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: unmapping the region mapped in `new`.
        unsafe { libc::munmap(self.ring.cast(), self.ring_bytes) };
    }
}

/// Per-buffer send state, stable in memory while its `sendmsg` is in flight.
struct SendSlot {
    hdr: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
}

/// One GSO send in flight: a run of same-size datagrams to one destination, each payload still in
/// its own receive buffer (one iovec each), sent with a `UDP_SEGMENT` control message.
struct GsoSlot {
    hdr: libc::msghdr,
    iovs: [libc::iovec; GSO_MAX_SEGS],
    addr: libc::sockaddr_storage,
    /// Room for one `cmsghdr` carrying a u16, 8-byte aligned.
    cmsg: [u64; 4],
    bids: Vec<u16>,
}

impl GsoSlot {
    fn new() -> Box<Self> {
        Box::new(Self {
            // SAFETY: all-zero is valid for these C structs.
            hdr: unsafe { std::mem::zeroed() },
            // SAFETY: as above.
            iovs: unsafe { std::mem::zeroed() },
            // SAFETY: as above.
            addr: unsafe { std::mem::zeroed() },
            cmsg: [0; 4],
            bids: Vec::with_capacity(GSO_MAX_SEGS),
        })
    }
}

/// A datagram the shard decided to send this turn.
#[derive(Clone, Copy)]
struct Pending {
    bid: u16,
    dst: SocketAddr,
    len: usize,
}

/// Whether this kernel offers what the loop needs (multishot recvmsg, provided-buffer rings).
pub fn probe() -> Result<(), String> {
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut p = io_uring::Probe::new();
    ring.submitter().register_probe(&mut p).map_err(|e| format!("probe: {e}"))?;
    for (code, name) in [
        (opcode::RecvMsgMulti::CODE, "recvmsg"),
        (opcode::SendMsg::CODE, "sendmsg"),
        (opcode::PollAdd::CODE, "poll"),
    ] {
        if !p.is_supported(code) {
            return Err(format!("{name} not supported"));
        }
    }
    BufRing::new(&ring).map(|_| ()).map_err(|e| format!("provided-buffer ring: {e}"))
}

fn sendto(fd: i32, to: &SocketAddr, data: &[u8]) -> SendReport {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = write_sockaddr(to, &mut addr);
    // SAFETY: `data` and `addr` are live for the call.
    let n = unsafe {
        libc::sendto(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT,
            (&addr as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    let mut r = SendReport::default();
    if n >= 0 {
        r.sent = 1;
    } else if io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
        r.would_block = 1;
    } else {
        r.errors = 1;
    }
    r
}

fn parse_name(name: &[u8]) -> Option<SocketAddr> {
    // SAFETY: all-zero is a valid sockaddr_storage; `name` is at most its size.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let n = name.len().min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: copying `n` bytes into a sockaddr_storage of at least that size.
    unsafe {
        std::ptr::copy_nonoverlapping(name.as_ptr(), (&mut ss as *mut libc::sockaddr_storage).cast(), n)
    };
    to_socket_addr(&ss)
}

/// Cancels the multishot requests and releases the registered socket before the ring is
/// dropped. The kernel tears a ring down asynchronously after close; without this, the socket
/// (and its port) could outlive the process by a moment and a restarted relay fail to bind.
fn teardown(ring: &mut IoUring) {
    for target in [RECV, WAKE] {
        let sqe = opcode::AsyncCancel::new(target).build().user_data(CANCEL);
        // SAFETY: a cancel request refers to no memory.
        let _ = unsafe { ring.submission().push(&sqe) };
    }
    // Wait (bounded) until both multishot requests have reported their final completion and
    // every in-flight send has completed.
    let (mut recv_done, mut wake_done) = (false, false);
    for _ in 0..100 {
        let ts = types::Timespec::new().nsec(10_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = ring.submitter().submit_with_args(1, &args);
        for cqe in ring.completion() {
            let last = !cqueue::more(cqe.flags());
            match cqe.user_data() & TAG {
                RECV if last => recv_done = true,
                WAKE if last => wake_done = true,
                _ => {}
            }
        }
        if recv_done && wake_done {
            break;
        }
    }
    let _ = ring.submitter().unregister_files();
}

pub(super) fn run(
    setup: ShardSetup,
    efd: Arc<OwnedFd>,
    rx: Receiver<ShardMsg>,
    peers: Vec<ShardHandle>,
) -> io::Result<()> {
    let clock = setup.clock;
    let sock = setup.socket;
    let sock_fd = sock.as_raw_fd();
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .build(4096)
        .or_else(|_| IoUring::new(4096))?;
    ring.submitter().register_files(&[sock_fd])?;
    let fd = types::Fixed(0);
    let mut bufs = BufRing::new(&ring)?;
    let mut slots: Box<[SendSlot]> = (0..BUFS)
        .map(|_| {
            // SAFETY: all-zero is valid for these C structs.
            unsafe { SendSlot { hdr: std::mem::zeroed(), iov: std::mem::zeroed(), addr: std::mem::zeroed() } }
        })
        .collect();
    // SAFETY: all-zero is a valid msghdr; it only tells the kernel how much room the name gets.
    let mut recv_hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
    recv_hdr.msg_namelen = NAME_LEN as libc::socklen_t;
    let recv_sqe = opcode::RecvMsgMulti::new(fd, &*recv_hdr, BGID).build().user_data(RECV);
    let wake_sqe = opcode::PollAdd::new(types::Fd(efd.as_raw_fd()), libc::POLLIN as u32)
        .multi(true)
        .build()
        .user_data(WAKE);
    // SAFETY: the SQEs point at `recv_hdr` and the eventfd, which outlive the ring's use of them.
    unsafe {
        ring.submission().push(&recv_sqe).map_err(io::Error::other)?;
        ring.submission().push(&wake_sqe).map_err(io::Error::other)?;
    }
    let mut st = State::new(
        setup.index,
        "io_uring",
        setup.core,
        clock.now(),
        peers,
        setup.events,
        setup.dtls,
        setup.links,
    );
    let mut send_one = |to: &SocketAddr, d: &[u8]| sendto(sock_fd, to, d);
    let mut gso = setup.gso;
    let mut gso_slots: Vec<Box<GsoSlot>> = Vec::new();
    let mut gso_free: Vec<usize> = Vec::new();
    let mut pending: Vec<Pending> = Vec::with_capacity(BUFS as usize);
    let mut retry: Vec<Pending> = Vec::new();
    tracing::debug!(shard = st.index, "io_uring event loop");
    // Re-bound after everything the kernel may read or write through it (buffers, headers,
    // slots), so that on every way out the ring is dropped, and torn down, before that memory.
    let mut ring = ring;

    // Every way out of the loop goes through `teardown`: in-flight sends and the multishot
    // requests are cancelled and completed before the ring and the memory they use are dropped.
    let result = 'turn: loop {
        let (submitter, mut sq, mut cq) = ring.split();
        cq.sync();
        if cq.is_empty() {
            sq.sync();
            let now = clock.now();
            let wait = st.poll_timeout().map_or(1000, |t| t.saturating_sub(now).min(1000));
            let ts = types::Timespec::new().sec(wait / 1000).nsec(((wait % 1000) * 1_000_000) as u32);
            let args = types::SubmitArgs::new().timespec(&ts);
            let idle_from = clock.nanos();
            let waited = submitter.submit_with_args(1, &args);
            st.stats.idle_ns += clock.nanos() - idle_from;
            match waited {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => break 'turn Err(e),
            }
            cq.sync();
        } else if !sq.is_empty() {
            // Completions are already waiting (they can be posted between turns): still hand
            // last turn's sends to the kernel now, without waiting, so their buffers come back
            // to the ring instead of piling up behind a receive side that never goes idle.
            match submitter.submit() {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
                Err(e) => break 'turn Err(e),
            }
            cq.sync();
        }
        let now = clock.now();
        let (mut rearm_recv, mut rearm_wake, mut woke, mut recycled, mut got) =
            (false, false, false, false, false);
        for cqe in &mut cq {
            let (ud, res, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
            match ud & TAG {
                RECV => {
                    rearm_recv |= !cqueue::more(flags);
                    let Some(bid) = cqueue::buffer_select(flags) else {
                        if res < 0 && res != -libc::ENOBUFS {
                            st.stats.recv_errors += 1;
                        }
                        continue;
                    };
                    got = true;
                    let buf = bufs.buf(bid);
                    let word =
                        |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]) as usize;
                    let (payload_len, msg_flags) = (word(8), word(12) as i32);
                    let src = parse_name(&buf[OUT_HDR..PAYLOAD]);
                    let room = BUF - PAYLOAD;
                    let truncated = payload_len > room || msg_flags & libc::MSG_TRUNC != 0;
                    let len = if truncated { (MAX_DATAGRAM + 1).min(room) } else { payload_len };
                    let verdict = match src {
                        Some(src) => st.classify(now, src, &mut buf[PAYLOAD..], len),
                        None => Verdict::Done,
                    };
                    match verdict {
                        Verdict::Send(dst, len) => pending.push(Pending { bid, dst, len }),
                        Verdict::Done => {
                            bufs.push(bid);
                            recycled = true;
                        }
                    }
                }
                SEND => {
                    if res < 0 {
                        if res == -libc::EAGAIN {
                            st.stats.send_dropped_full += 1;
                        } else {
                            st.stats.send_errors += 1;
                        }
                    }
                    bufs.push(ud as u16);
                    recycled = true;
                }
                GSO_SEND => {
                    let i = (ud & 0xFFFF_FFFF) as usize;
                    let slot = &mut gso_slots[i];
                    if res >= 0 {
                        st.stats.gso_sends += 1;
                    } else if res == -libc::EAGAIN {
                        st.stats.send_dropped_full += slot.bids.len() as u64;
                    } else {
                        // The kernel refused the run as GSO: its datagrams are still in their
                        // buffers, so send them one by one; stop grouping if GSO cannot work here.
                        st.stats.gso_fallbacks += 1;
                        if gso && gso_unsupported(-res) {
                            gso = false;
                            tracing::warn!(shard = st.index, error = %io::Error::from_raw_os_error(-res), "UDP GSO refused by the kernel; sending datagrams one by one");
                        }
                        if let Some(dst) = to_socket_addr(&slot.addr) {
                            for (k, &bid) in slot.bids.iter().enumerate() {
                                retry.push(Pending { bid, dst, len: slot.iovs[k].iov_len });
                            }
                            slot.bids.clear();
                        }
                    }
                    for &bid in &slot.bids {
                        bufs.push(bid);
                    }
                    slot.bids.clear();
                    gso_free.push(i);
                    recycled = true;
                }
                WAKE => {
                    woke = true;
                    rearm_wake |= !cqueue::more(flags);
                }
                _ => {}
            }
        }
        // Send this turn's datagrams: runs of same-size datagrams to one destination as one GSO
        // send where enabled, everything else (and refused runs) one sendmsg each.
        // Refused runs go first: their datagrams arrived before anything received this turn.
        let singles = retry.len();
        if singles > 0 {
            pending.splice(0..0, retry.drain(..));
        }
        let mut i = 0;
        while i < pending.len() {
            let first = pending[i];
            let end = if gso && i >= singles {
                gso_run_end(pending.len(), i, |k| (pending[k].dst, pending[k].len))
            } else {
                i + 1
            };
            let sqe = if end - i == 1 {
                let slot = &mut slots[first.bid as usize];
                let alen = write_sockaddr(&first.dst, &mut slot.addr);
                slot.iov = libc::iovec {
                    iov_base: bufs.buf(first.bid)[PAYLOAD..].as_mut_ptr().cast(),
                    iov_len: first.len,
                };
                slot.hdr.msg_name = (&mut slot.addr as *mut libc::sockaddr_storage).cast();
                slot.hdr.msg_namelen = alen;
                slot.hdr.msg_iov = &mut slot.iov;
                slot.hdr.msg_iovlen = 1;
                opcode::SendMsg::new(fd, &slot.hdr).build().user_data(SEND | first.bid as u64)
            } else {
                let gi = gso_free.pop().unwrap_or_else(|| {
                    gso_slots.push(GsoSlot::new());
                    gso_slots.len() - 1
                });
                let slot = &mut gso_slots[gi];
                slot.bids.clear();
                for (k, p) in pending[i..end].iter().enumerate() {
                    slot.iovs[k] = libc::iovec {
                        iov_base: bufs.buf(p.bid)[PAYLOAD..].as_mut_ptr().cast(),
                        iov_len: p.len,
                    };
                    slot.bids.push(p.bid);
                }
                let alen = write_sockaddr(&first.dst, &mut slot.addr);
                slot.hdr.msg_name = (&mut slot.addr as *mut libc::sockaddr_storage).cast();
                slot.hdr.msg_namelen = alen;
                slot.hdr.msg_iov = slot.iovs.as_mut_ptr();
                slot.hdr.msg_iovlen = end - i;
                set_udp_segment(&mut slot.hdr, &mut slot.cmsg, first.len);
                opcode::SendMsg::new(fd, &slot.hdr).build().user_data(GSO_SEND | gi as u64)
            };
            // SAFETY: the slot and the buffers stay untouched until this send completes.
            while unsafe { sq.push(&sqe) }.is_err() {
                sq.sync();
                match submitter.submit() {
                    Ok(_) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
                    Err(e) => break 'turn Err(e),
                }
                sq.sync();
            }
            i = end;
        }
        pending.clear();
        if got {
            st.stats.recv_batches += 1;
        }
        if recycled {
            bufs.commit();
        }
        // SAFETY: as above, the re-armed SQEs point at state that outlives the ring.
        unsafe {
            if rearm_recv {
                let _ = sq.push(&recv_sqe);
            }
            if rearm_wake {
                let _ = sq.push(&wake_sqe);
            }
        }
        sq.sync();
        drop((submitter, sq, cq));
        if woke {
            let mut v = 0u64;
            // SAFETY: reading 8 bytes into a live u64 from our non-blocking eventfd.
            let _ = unsafe { libc::read(efd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
        if st.mailbox(&rx, clock.now(), &mut send_one) {
            break Ok(());
        }
        st.core.handle_timeout(clock.now());
        st.flush_core(clock.now(), &mut send_one);
    };
    teardown(&mut ring);
    result
}
