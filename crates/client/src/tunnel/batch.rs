//! Batched datagram I/O for the tunnels: up to [`BATCH`] datagrams per system call with
//! `recvmmsg`/`sendmmsg` on Linux; elsewhere the same interface loops over `recv_from`/`send_to`.

use std::io;
use std::net::SocketAddr;

/// Datagrams per call.
pub const BATCH: usize = 32;
/// Bytes per buffer: above every datagram the relay carries, so an oversize game datagram is
/// seen as one.
pub const BUF: usize = 2048;

/// Fixed receive buffers, reused for every batch.
pub struct RecvBatch {
    pub bufs: Vec<[u8; BUF]>,
    pub lens: [usize; BATCH],
    pub addrs: [Option<SocketAddr>; BATCH],
}

impl RecvBatch {
    pub fn new() -> Self {
        Self { bufs: vec![[0u8; BUF]; BATCH], lens: [0; BATCH], addrs: [None; BATCH] }
    }

    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        (&self.bufs[i][..self.lens[i].min(BUF)], self.addrs[i])
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

/// Datagrams waiting to be sent from one socket, copied into fixed buffers.
pub struct SendBatch {
    bufs: Vec<[u8; BUF]>,
    lens: [usize; BATCH],
    dsts: [Option<SocketAddr>; BATCH],
    n: usize,
}

impl SendBatch {
    pub fn new() -> Self {
        Self { bufs: vec![[0u8; BUF]; BATCH], lens: [0; BATCH], dsts: [None; BATCH], n: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn is_full(&self) -> bool {
        self.n == BATCH
    }

    /// Datagrams that still fit.
    pub fn room(&self) -> usize {
        BATCH - self.n
    }

    /// The datagram pushed last.
    pub fn last(&self) -> Option<&[u8]> {
        let i = self.n.checked_sub(1)?;
        Some(&self.bufs[i][..self.lens[i]])
    }

    /// Appends a datagram that `write` puts into the next buffer; `dst` `None` on a connected
    /// socket. Returns false when full or when `write` declines.
    pub fn push(&mut self, dst: Option<SocketAddr>, write: impl FnOnce(&mut [u8]) -> Option<usize>) -> bool {
        if self.n == BATCH {
            return false;
        }
        let Some(len) = write(&mut self.bufs[self.n]) else { return false };
        self.lens[self.n] = len;
        self.dsts[self.n] = dst;
        self.n += 1;
        true
    }

    pub fn clear(&mut self) {
        self.n = 0;
    }
}

impl Default for SendBatch {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;
    use std::mem::zeroed;
    use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::AsRawFd;

    use super::{RecvBatch, SendBatch, BATCH, BUF};

    fn to_sockaddr(a: &SocketAddr, ss: &mut libc::sockaddr_storage) -> libc::socklen_t {
        match a {
            SocketAddr::V4(v4) => {
                // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
                let sin = unsafe { &mut *(ss as *mut libc::sockaddr_storage as *mut libc::sockaddr_in) };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = v4.port().to_be();
                sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) };
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
            }
            SocketAddr::V6(v6) => {
                // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
                let sin6 = unsafe { &mut *(ss as *mut libc::sockaddr_storage as *mut libc::sockaddr_in6) };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = v6.port().to_be();
                sin6.sin6_addr = libc::in6_addr { s6_addr: v6.ip().octets() };
                sin6.sin6_flowinfo = v6.flowinfo();
                sin6.sin6_scope_id = v6.scope_id();
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
            }
        }
    }

    fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
        match ss.ss_family as i32 {
            libc::AF_INET => {
                // SAFETY: the family says this is a sockaddr_in.
                let sin = unsafe { &*(ss as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
                let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
                Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says this is a sockaddr_in6.
                let sin6 = unsafe { &*(ss as *const libc::sockaddr_storage as *const libc::sockaddr_in6) };
                let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }

    pub fn recv(sock: &impl AsRawFd, b: &mut RecvBatch) -> io::Result<usize> {
        // SAFETY: all-zero is valid for these C structs.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for i in 0..BATCH {
            iovs[i] = libc::iovec { iov_base: b.bufs[i].as_mut_ptr().cast(), iov_len: BUF };
            hdrs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at live buffers of the stated sizes.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            // A datagram larger than the buffer reports its full length with MSG_TRUNC.
            let truncated = hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            b.lens[i] = if truncated { BUF + 1 } else { hdrs[i].msg_len as usize };
            b.addrs[i] = from_sockaddr(&names[i]);
        }
        Ok(n)
    }

    pub fn send(sock: &impl AsRawFd, b: &SendBatch) -> io::Result<usize> {
        // SAFETY: all-zero is valid for these C structs.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for i in 0..b.n {
            iovs[i] = libc::iovec { iov_base: b.bufs[i].as_ptr() as *mut libc::c_void, iov_len: b.lens[i] };
            if let Some(dst) = &b.dsts[i] {
                hdrs[i].msg_hdr.msg_namelen = to_sockaddr(dst, &mut names[i]);
                hdrs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            }
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0;
        while sent < b.n {
            // SAFETY: every header points at live buffers of the stated sizes.
            let r = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    hdrs[sent..].as_mut_ptr(),
                    (b.n - sent) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    // A full buffer drops the rest, as the network would; a refused datagram
                    // (ICMP from an earlier send) skips one.
                    io::ErrorKind::WouldBlock => return Ok(sent),
                    io::ErrorKind::ConnectionRefused => {
                        sent += 1;
                        continue;
                    }
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            sent += r as usize;
        }
        Ok(sent)
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::io;

    use super::{RecvBatch, SendBatch, BATCH};

    pub fn recv(sock: &mio::net::UdpSocket, b: &mut RecvBatch) -> io::Result<usize> {
        let mut n = 0;
        while n < BATCH {
            match sock.recv_from(&mut b.bufs[n]) {
                Ok((len, from)) => {
                    b.lens[n] = len;
                    b.addrs[n] = Some(from);
                    n += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && n > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    pub fn send(sock: &mio::net::UdpSocket, b: &SendBatch) -> io::Result<usize> {
        for i in 0..b.n {
            let d = &b.bufs[i][..b.lens[i]];
            let r = match b.dsts[i] {
                Some(dst) => sock.send_to(d, dst),
                None => sock.send(d),
            };
            match r {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(i),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e),
            }
        }
        Ok(b.n)
    }
}

/// Receives up to [`BATCH`] datagrams without blocking; `WouldBlock` when none is waiting.
pub fn recv(sock: &mio::net::UdpSocket, b: &mut RecvBatch) -> io::Result<usize> {
    imp::recv(sock, b)
}

/// Sends the batch without blocking; returns how many left (the rest are dropped, as by a full
/// network queue).
pub fn send(sock: &mio::net::UdpSocket, b: &SendBatch) -> io::Result<usize> {
    imp::send(sock, b)
}
