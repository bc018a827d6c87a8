//! The few `bpf(2)` commands the fast path issues itself: element updates, deletes and lookups
//! on a map file descriptor (from any thread, with `&self`), and `BPF_PROG_TEST_RUN` for the
//! tests that hold the program to its twin. Loading and attaching is aya's.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_TEST_RUN: libc::c_long = 10;

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a live, initialised `repr(C)` prefix of `union bpf_attr` for `cmd`, and
    // the pointers inside it point at buffers the caller keeps alive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A BPF map by file descriptor, with fixed key and value sizes.
#[derive(Debug)]
pub struct RawMap {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl RawMap {
    pub fn new(fd: BorrowedFd<'_>, key_size: usize, value_size: usize) -> io::Result<Self> {
        Ok(Self { fd: fd.try_clone_to_owned()?, key_size, value_size })
    }

    fn attr(&self, key: &[u8], value: u64, flags: u64) -> ElemAttr {
        assert_eq!(key.len(), self.key_size, "key size");
        ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key.as_ptr() as u64,
            value,
            flags,
            ..Default::default()
        }
    }

    /// Kernel memory the map holds, as the kernel charges it (`memlock` in the fd's fdinfo).
    pub fn kernel_bytes(&self) -> io::Result<u64> {
        use std::os::fd::AsRawFd;
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", self.fd.as_raw_fd()))?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| io::Error::other("no memlock line in the map's fdinfo"))
    }

    pub fn fd_borrowed(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Inserts or replaces (`BPF_ANY`).
    pub fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        assert_eq!(value.len(), self.value_size, "value size");
        bpf(BPF_MAP_UPDATE_ELEM, &mut self.attr(key, value.as_ptr() as u64, 0))
    }

    /// Removes `key`; true if it was there.
    pub fn delete(&self, key: &[u8]) -> io::Result<bool> {
        match bpf(BPF_MAP_DELETE_ELEM, &mut self.attr(key, 0, 0)) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reads `key` into `out` (`value_size` bytes, or that times the CPU count for a per-CPU
    /// map); false if absent.
    pub fn lookup(&self, key: &[u8], out: &mut [u8]) -> io::Result<bool> {
        assert!(out.len() >= self.value_size, "value buffer");
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut self.attr(key, out.as_mut_ptr() as u64, 0)) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Runs an XDP program once over `frame` (`BPF_PROG_TEST_RUN`): its return code and the frame
/// as it left the program.
pub fn test_run(prog: BorrowedFd<'_>, frame: &[u8]) -> io::Result<(u32, Vec<u8>)> {
    test_run_repeat(prog, frame, 1).map(|(r, out, _)| (r, out))
}

/// Runs an XDP program `repeat` times over `frame`: its return code, the frame as the last run
/// left it, and the kernel's average nanoseconds per run.
pub fn test_run_repeat(prog: BorrowedFd<'_>, frame: &[u8], repeat: u32) -> io::Result<(u32, Vec<u8>, u32)> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval, out, attr.duration))
}

/// `struct xdp_md` as a test run's context.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// Runs an XDP program `repeat` times over copies of `frame` in live-frames mode, as if each
/// had arrived on `ifindex`: what the program returns happens (XDP_TX sends the copy out of
/// `ifindex`). The kernel builds the copies in batches of `batch` (at most 256).
pub fn test_run_live(
    prog: BorrowedFd<'_>,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
    batch: u32,
) -> io::Result<()> {
    let mut ctx = XdpMd { data_end: frame.len() as u32, ingress_ifindex: ifindex, ..Default::default() };
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
        ctx_in: &mut ctx as *mut XdpMd as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        batch_size: batch,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
