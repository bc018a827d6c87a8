//! recvmmsg/sendmmsg batches on a non-blocking socket (the epoll backend).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

use super::{
    gso_run_end, gso_unsupported, set_udp_segment, PacketBatch, SendItem, SendReport, BATCH, BUF_SIZE,
};

/// Batched datagram I/O on one socket. Keeps its syscall headers between calls.
pub struct BatchIo {
    fd: RawFd,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    /// One `UDP_SEGMENT` control message per header.
    cmsgs: Vec<[u64; 4]>,
    /// Datagrams carried by each header (more than one: a GSO run).
    segs: Vec<usize>,
    gso: bool,
}

// SAFETY: the raw pointers inside the headers are rebuilt before every syscall and point only at
// memory owned by `self` or borrowed for the duration of that call.
unsafe impl Send for BatchIo {}

pub(crate) fn to_socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a = unsafe { &*(s as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a = unsafe { &*(s as *const _ as *const libc::sockaddr_in6) };
            // No flow label: a nonzero flowinfo names a WebSocket peer (`secure::stream_addr`),
            // never a datagram source.
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                0,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

pub(crate) fn write_sockaddr(addr: &SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(out as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from(*a.ip()).to_be() };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe { &mut *(out as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

impl BatchIo {
    pub fn new(sock: &impl AsRawFd) -> Self {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let (hdr, iov, addr) = unsafe { (zeroed::<libc::mmsghdr>(), zeroed::<libc::iovec>(), zeroed()) };
        Self {
            fd: sock.as_raw_fd(),
            hdrs: vec![hdr; BATCH],
            iovs: vec![iov; BATCH],
            addrs: vec![addr; BATCH],
            cmsgs: vec![[0; 4]; BATCH],
            segs: vec![0; BATCH],
            gso: false,
        }
    }

    /// Receives up to [`BATCH`] datagrams. `Ok(0)`: nothing waiting.
    pub fn recv(&mut self, batch: &mut PacketBatch) -> io::Result<usize> {
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec { iov_base: batch.bufs[i].as_mut_ptr().cast(), iov_len: BUF_SIZE };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at a live buffer of BUF_SIZE bytes and a sockaddr_storage.
        let n = unsafe {
            libc::recvmmsg(
                self.fd,
                self.hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        for i in 0..n as usize {
            let m = &mut batch.meta[i];
            // An unknown family cannot happen on a UDP/IP socket; port 0 makes the core drop it.
            m.src = to_socket_addr(&self.addrs[i]).unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
            m.len = self.hdrs[i].msg_len as usize;
            m.truncated = self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        }
        Ok(n as usize)
    }

    /// Groups this I/O's sends into UDP GSO runs (see [`gso_run_end`]) where `on`.
    pub fn set_gso(&mut self, on: bool) {
        self.gso = on;
    }

    /// Whether sends are still grouped into GSO runs (the kernel may have refused them).
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Sends each item from its batch buffer, in order, in `sendmmsg` calls of up to [`BATCH`]
    /// headers. With GSO on, each run of same-size datagrams to one destination is one header
    /// carrying a `UDP_SEGMENT` control message, its payloads one iovec each (still no copy). A full
    /// socket buffer or a refused destination drops that datagram (UDP semantics) and is counted.
    pub fn send(&mut self, batch: &PacketBatch, items: &[SendItem]) -> SendReport {
        let mut report = SendReport::default();
        for chunk in items.chunks(BATCH) {
            let (mut h, mut i) = (0, 0);
            while i < chunk.len() {
                let end = if self.gso {
                    gso_run_end(chunk.len(), i, |k| (chunk[k].dst, chunk[k].len.min(BUF_SIZE)))
                } else {
                    i + 1
                };
                for (k, it) in chunk[i..end].iter().enumerate() {
                    let buf = &batch.bufs[it.slot][..it.len.min(BUF_SIZE)];
                    self.iovs[i + k] = libc::iovec { iov_base: buf.as_ptr() as *mut _, iov_len: buf.len() };
                }
                let alen = write_sockaddr(&chunk[i].dst, &mut self.addrs[h]);
                let hdr = &mut self.hdrs[h].msg_hdr;
                hdr.msg_name = (&mut self.addrs[h] as *mut libc::sockaddr_storage).cast();
                hdr.msg_namelen = alen;
                hdr.msg_iov = &mut self.iovs[i];
                hdr.msg_iovlen = end - i;
                hdr.msg_flags = 0;
                if end - i > 1 {
                    set_udp_segment(hdr, &mut self.cmsgs[h], self.iovs[i].iov_len);
                } else {
                    hdr.msg_control = std::ptr::null_mut();
                    hdr.msg_controllen = 0;
                }
                self.segs[h] = end - i;
                h += 1;
                i = end;
            }
            self.send_headers(h, &mut report);
        }
        report
    }

    /// Sends one datagram from an arbitrary buffer.
    pub fn send_one(&mut self, dst: &SocketAddr, data: &[u8]) -> SendReport {
        let len = write_sockaddr(dst, &mut self.addrs[0]);
        self.iovs[0] = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
        let h = &mut self.hdrs[0].msg_hdr;
        h.msg_name = (&mut self.addrs[0] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = len;
        h.msg_iov = &mut self.iovs[0];
        h.msg_iovlen = 1;
        h.msg_control = std::ptr::null_mut();
        h.msg_controllen = 0;
        self.segs[0] = 1;
        let mut report = SendReport::default();
        self.send_headers(1, &mut report);
        report
    }

    /// Sends headers `0..total` (header `h` carries `segs[h]` datagrams).
    fn send_headers(&mut self, total: usize, report: &mut SendReport) {
        let mut off = 0;
        while off < total {
            // SAFETY: headers off..total were filled above and point at live buffers.
            let n = unsafe {
                libc::sendmmsg(
                    self.fd,
                    self.hdrs[off..].as_mut_ptr(),
                    (total - off) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                for h in off..off + n as usize {
                    report.sent += self.segs[h];
                    report.gso_sends += (self.segs[h] > 1) as usize;
                }
                off += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    report.would_block += self.segs[off..total].iter().sum::<usize>();
                    return;
                }
                _ if self.segs[off] > 1 => {
                    // The kernel refused this run as GSO: send its datagrams one by one, and stop
                    // grouping if it cannot do GSO at all.
                    report.gso_fallbacks += 1;
                    if e.raw_os_error().is_some_and(gso_unsupported) {
                        self.gso = false;
                    }
                    self.send_run_singly(off, report);
                    off += 1;
                }
                _ => {
                    // This datagram was refused; skip it and carry on with the rest.
                    report.errors += 1;
                    off += 1;
                }
            }
        }
    }

    /// Sends the datagrams of GSO header `h` one `sendmsg` each.
    fn send_run_singly(&mut self, h: usize, report: &mut SendReport) {
        let hdr = self.hdrs[h].msg_hdr;
        for k in 0..hdr.msg_iovlen {
            let mut one = hdr;
            // SAFETY: msg_iov points at `msg_iovlen` iovecs filled by `send`.
            one.msg_iov = unsafe { hdr.msg_iov.add(k) };
            one.msg_iovlen = 1;
            one.msg_control = std::ptr::null_mut();
            one.msg_controllen = 0;
            // SAFETY: the header points at a live address and a live buffer for the call.
            let n = unsafe { libc::sendmsg(self.fd, &one, libc::MSG_DONTWAIT) };
            if n >= 0 {
                report.sent += 1;
            } else if io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
                report.would_block += hdr.msg_iovlen - k;
                return;
            } else {
                report.errors += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::bind_udp;

    #[test]
    fn batch_round_trip_on_loopback() {
        let a = bind_udp("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let a_addr = a.local_addr().unwrap();
        for i in 0..10u8 {
            b.send_to(&vec![i; 10 + i as usize], a_addr).unwrap();
        }
        b.send_to(&[9u8; 3000], a_addr).unwrap();
        let mut io = BatchIo::new(&a);
        let mut batch = PacketBatch::new();
        let mut got = 0;
        for _ in 0..100 {
            got += io.recv(&mut batch).unwrap();
            if got >= 11 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got, 11);
        assert_eq!(batch.meta[3].len, 13);
        assert_eq!(batch.meta[3].src, b.local_addr().unwrap());
        assert!(batch.meta[10].truncated);
        // Echo the first three back from the same buffers.
        let items: Vec<SendItem> =
            (0..3).map(|i| SendItem { slot: i, len: batch.meta[i].len, dst: batch.meta[i].src }).collect();
        assert_eq!(io.send(&batch, &items).sent, 3);
        let mut buf = [0u8; 64];
        b.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let (n, from) = b.recv_from(&mut buf).unwrap();
        assert_eq!((n, from, buf[0]), (10, a_addr, 0));
    }

    fn recv_all(b: &std::net::UdpSocket, n: usize) -> Vec<Vec<u8>> {
        b.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 2048];
        (0..n)
            .map(|_| {
                let len = b.recv(&mut buf).unwrap();
                buf[..len].to_vec()
            })
            .collect()
    }

    fn filled(batch: &mut PacketBatch, lens: &[usize], dst: SocketAddr) -> Vec<SendItem> {
        for (i, &len) in lens.iter().enumerate() {
            batch.bufs[i][..len].fill(i as u8 + 1);
        }
        lens.iter().enumerate().map(|(slot, &len)| SendItem { slot, len, dst }).collect()
    }

    #[test]
    fn gso_runs_arrive_as_separate_datagrams() {
        gso_runs_on("127.0.0.1:0");
        // IPv6 where this machine has a loopback address for it.
        if std::net::UdpSocket::bind("[::1]:0").is_ok() {
            gso_runs_on("[::1]:0");
        }
    }

    fn gso_runs_on(local: &str) {
        let a = bind_udp(local.parse().unwrap(), false).unwrap();
        let b = std::net::UdpSocket::bind(local).unwrap();
        let mut io = BatchIo::new(&a);
        io.set_gso(true);
        let mut batch = PacketBatch::new();
        let lens = [300, 300, 300, 120, 300, 900, 900];
        let items = filled(&mut batch, &lens, b.local_addr().unwrap());
        let r = io.send(&batch, &items);
        assert_eq!((r.sent, r.gso_sends, r.gso_fallbacks), (7, 2, 0), "{r:?}");
        let got = recv_all(&b, 7);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d, &vec![i as u8 + 1; lens[i]]);
        }
    }

    #[test]
    fn refused_gso_run_is_sent_datagram_by_datagram() {
        let a = bind_udp("127.0.0.1:0".parse().unwrap(), false).unwrap();
        // The kernel refuses UDP GSO (EINVAL) on a socket that does not checksum what it sends.
        let one: libc::c_int = 1;
        // SAFETY: setting an int socket option from a live c_int.
        let rc = unsafe {
            libc::setsockopt(
                a.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut io = BatchIo::new(&a);
        io.set_gso(true);
        let mut batch = PacketBatch::new();
        let lens = [200, 200, 200, 200];
        let items = filled(&mut batch, &lens, b.local_addr().unwrap());
        let r = io.send(&batch, &items);
        assert_eq!((r.sent, r.gso_sends, r.gso_fallbacks, r.errors), (4, 0, 1, 0), "{r:?}");
        assert!(io.gso(), "a refusal for one route does not turn GSO off");
        let got = recv_all(&b, 4);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d, &vec![i as u8 + 1; 200]);
        }
    }
}
