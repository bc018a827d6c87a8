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
}

/// Fails when another process already uses `addr`'s UDP port. Without this check a second relay
/// started on the same port would join this one's `SO_REUSEPORT` group and each would receive
/// about half of the other's datagrams. Two checks: an abstract Unix socket named after the
/// address (held until the process exits, so two relays starting at the same moment cannot both
/// pass), then a plain bind of the address without `SO_REUSEPORT`, which the kernel refuses while
/// any other socket holds the port. Port 0 asks the kernel for a fresh port and needs neither.
pub fn claim_udp_port(addr: SocketAddr) -> io::Result<PortClaim> {
    if addr.port() == 0 {
        return Ok(PortClaim { _lock: None });
    }
    let lock = {
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
        })?
    };
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
    Ok(PortClaim { _lock: Some(lock) })
}
