//! The tunnels' event loop: one poller over the relay socket and every local socket. Sockets
//! are mio's (portable: epoll, kqueue, IOCP); readiness is edge-triggered, so every readable
//! socket is drained until it would block.

use std::io;
use std::net::UdpSocket;
use std::time::Duration;

use mio::{Events, Interest, Poll, Token};

/// The token of the relay socket; local sockets get `LOCAL_BASE + index`.
pub const RELAY: Token = Token(0);
pub const LOCAL_BASE: usize = 1;

pub struct Poller {
    poll: Poll,
    events: Events,
    /// A registered duplicate of the relay client's socket (same socket, own handle).
    relay: Option<mio::net::UdpSocket>,
}

impl Poller {
    pub fn new() -> io::Result<Self> {
        Ok(Self { poll: Poll::new()?, events: Events::with_capacity(256), relay: None })
    }

    /// (Re-)registers the relay client's socket, e.g. after it moved to a new local port.
    pub fn watch_relay(&mut self, sock: &UdpSocket) -> io::Result<()> {
        if let Some(mut old) = self.relay.take() {
            let _ = self.poll.registry().deregister(&mut old);
        }
        let dup = sock.try_clone()?;
        dup.set_nonblocking(true)?;
        let mut m = mio::net::UdpSocket::from_std(dup);
        self.poll.registry().register(&mut m, RELAY, Interest::READABLE)?;
        self.relay = Some(m);
        Ok(())
    }

    /// The relay socket's registered handle (the same socket as the relay client's).
    pub fn relay_socket(&self) -> Option<&mio::net::UdpSocket> {
        self.relay.as_ref()
    }

    pub fn register(&self, sock: &mut mio::net::UdpSocket, index: usize) -> io::Result<()> {
        self.poll.registry().register(sock, Token(LOCAL_BASE + index), Interest::READABLE)
    }

    pub fn deregister(&self, sock: &mut mio::net::UdpSocket) {
        let _ = self.poll.registry().deregister(sock);
    }

    /// Waits up to `timeout`; returns the tokens that became readable.
    pub fn wait(&mut self, timeout: Duration, ready: &mut Vec<Token>) -> io::Result<()> {
        ready.clear();
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        ready.extend(self.events.iter().map(|e| e.token()));
        Ok(())
    }
}
