//! UDP socket set-up shared by the backends.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// Receive/send buffer size asked of the kernel (it may grant less).
const SOCKET_BUFFER: usize = 8 << 20;

/// A non-blocking UDP socket on `addr`. With `reuse_port`, several shards can bind the same
/// address and the kernel spreads (or, with a steering program, steers) datagrams among them.
pub fn bind_udp(addr: SocketAddr, reuse_port: bool) -> io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual stack when bound to [::].
        let _ = sock.set_only_v6(false);
    }
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// Proof that this process owns a relay address: held for as long as the relay runs.
#[derive(Debug)]
pub struct PortClaim {
    _lock: Option<std::os::unix::net::UnixDatagram>,
    /// The address to bind the relay's sockets to: the one asked for, or for port 0 a port no
    /// other socket held when it was claimed.
    pub addr: SocketAddr,
}

/// Fails when another process already uses `addr`'s UDP port. Without this check a second relay
/// started on the same port would join this one's `SO_REUSEPORT` group and each would receive
/// about half of the other's datagrams. Two checks: an abstract Unix socket named after the
/// address (held until the process exits, so two relays starting at the same moment cannot both
/// pass), then a plain bind of the address without `SO_REUSEPORT`, which the kernel refuses while
/// any other socket holds the port.
///
/// Port 0 needs the same care: when the binding socket has `SO_REUSEPORT`, the kernel's search for
/// a free port passes over ports held by other `SO_REUSEPORT` sockets of the same user, so a relay
/// bound that way can land in another relay's group. The port is therefore found by a plain
/// socket, which only free ports satisfy, and claimed before the shards bind it.
pub fn claim_udp_port(addr: SocketAddr) -> io::Result<PortClaim> {
    if addr.port() != 0 {
        let lock = lock_address(addr)?;
        drop(probe(addr)?);
        return Ok(PortClaim { _lock: Some(lock), addr });
    }
    for _ in 0..16 {
        let found = probe(addr)?;
        let addr = found.local_addr()?.as_socket().ok_or_else(|| io::Error::other("no socket address"))?;
        match lock_address(addr) {
            // The port is free again once the probe closes, and claimed by this relay's lock.
            Ok(lock) => return Ok(PortClaim { _lock: Some(lock), addr }),
            // Another relay found the same port between its probe and its bind: look again.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(io::ErrorKind::AddrInUse, format!("no free UDP port for {addr}")))
}

/// Claims `addr` (see [`claim_udp_port`]) and binds the relay's first socket to the claimed
/// address. The probe found the port free, but a child process forked by another thread at that
/// moment holds the probe's descriptor until it execs, and for port 0 another socket may take the
/// port found: a bind refused so is tried again with a new claim.
pub fn claim_and_bind(addr: SocketAddr, reuse_port: bool) -> io::Result<(PortClaim, UdpSocket)> {
    let mut refused = None;
    for _ in 0..16 {
        let claim = claim_udp_port(addr)?;
        match bind_udp(claim.addr, reuse_port) {
            Ok(s) => return Ok((claim, s)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => refused = Some(e),
            Err(e) => return Err(e),
        }
        drop(claim);
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    Err(refused.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
}

/// The abstract Unix socket that marks `addr` as this process's relay address.
fn lock_address(addr: SocketAddr) -> io::Result<std::os::unix::net::UnixDatagram> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("ferry-relay-udp-{addr}");
    let sa = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    std::os::unix::net::UnixDatagram::bind_addr(&sa).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another ferry relay is already serving UDP {addr} on this host"),
            )
        } else {
            e
        }
    })
}

/// A plain bind of `addr` (no `SO_REUSEPORT`), which the kernel refuses while any other socket
/// holds the port.
fn probe(addr: SocketAddr) -> io::Result<Socket> {
    let probe = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = probe.set_only_v6(false);
    }
    probe.bind(&addr.into()).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("UDP port {} is already in use by another process ({e})", addr.port()),
            )
        } else {
            e
        }
    })?;
    Ok(probe)
}
