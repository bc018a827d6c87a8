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
