//! A virtual-time harness over the sans-IO core: UTP-shaped clients, no sockets, no sleeps.
#![allow(dead_code)]

use std::net::SocketAddr;

use ferry::auth::AllocationKey;
use ferry::client::packets;
use ferry::core::{Action, Control, ControlReply, Core, CoreConfig, Created, Entropy, Event, Transmit};
use ferry::wire::{AllocationId, ErrorCode, ErrorMsg};

pub const SECRET: [u8; 64] = [0x33; 64];

pub struct Sim {
    pub core: Core,
    pub now: u64,
    seed: u8,
}

#[derive(Clone)]
pub struct Client {
    pub id: AllocationId,
    pub key: AllocationKey,
    pub conn: Vec<u8>,
    pub addr: SocketAddr,
    pub nonce: u16,
}

/// What one datagram produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    Forward(SocketAddr, Vec<u8>),
    Reply(Vec<u8>),
    Consumed,
    Drop(ferry::core::DropReason),
}

pub fn addr(n: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, (n % 200 + 1) as u8], 40_000 + n % 20_000))
}

impl Sim {
    pub fn new() -> Self {
        Self::with(|_| {})
    }

    pub fn with(tweak: impl FnOnce(&mut CoreConfig)) -> Self {
        let mut cfg = CoreConfig::new(SECRET);
        tweak(&mut cfg);
        Self { core: Core::new(cfg, 0), now: 0, seed: 0 }
    }

    fn entropy(&mut self) -> Entropy {
        self.seed = self.seed.wrapping_add(1);
        let mut e = Entropy { id: [self.seed; 16] };
        e.id[1] = self.seed.wrapping_mul(31);
        e
    }

    fn client(c: Created, addr: SocketAddr) -> Client {
        Client { id: c.id, key: c.key, conn: c.connection_data.to_vec(), addr, nonce: 0 }
    }

    pub fn host(&mut self, max: u16, at: SocketAddr) -> Client {
        let e = self.entropy();
        match self.core.handle_control(self.now, Control::CreateHost { max_connections: max, entropy: e }) {
            Ok(ControlReply::Created(c)) => Self::client(*c, at),
            other => panic!("create host: {other:?}"),
        }
    }

    pub fn joiner(&mut self, host: &Client, at: SocketAddr) -> Client {
        let e = self.entropy();
        match self.core.handle_control(self.now, Control::CreateJoiner { host: host.id, entropy: e }) {
            Ok(ControlReply::Created(c)) => Self::client(*c, at),
            other => panic!("create joiner: {other:?}"),
        }
    }

    pub fn send(&mut self, src: SocketAddr, datagram: &[u8]) -> Out {
        let mut buf = datagram.to_vec();
        let action = self.core.handle_datagram(self.now, src, &mut buf);
        let out = match action {
            Action::Forward(to) => Out::Forward(to, buf.clone()),
            Action::Reply(n) => Out::Reply(buf[..n].to_vec()),
            Action::Consumed => Out::Consumed,
            Action::Drop(r) => Out::Drop(r),
        };
        if let Out::Reply(r) | Out::Forward(_, r) = &out {
            assert!(r.len() <= datagram.len(), "reply larger than its trigger");
        }
        if let Out::Forward(_, r) = &out {
            assert_eq!(r, datagram, "forwarded datagrams are unchanged");
        }
        out
    }

    pub fn bind(&mut self, c: &Client) -> Out {
        self.bind_from(c, c.addr, c.nonce)
    }

    pub fn bind_from(&mut self, c: &Client, src: SocketAddr, nonce: u16) -> Out {
        let d = packets::bind(&c.key, nonce, &c.conn);
        self.send(src, &d)
    }

    pub fn connect(&mut self, joiner: &Client, host: &Client) -> Out {
        let d = packets::connect_request(&joiner.id, &host.conn);
        self.send(joiner.addr, &d)
    }

    pub fn relay(&mut self, from: &Client, to: &Client, payload: &[u8]) -> Out {
        let d = packets::relay(&from.id, &to.id, payload).unwrap();
        self.send(from.addr, &d)
    }

    pub fn ping(&mut self, c: &Client) -> Out {
        self.send(c.addr, &packets::ping(&c.id, 1))
    }

    /// A host with `n` joiners, all bound and connected.
    pub fn session(&mut self, max: u16, n: usize) -> (Client, Vec<Client>) {
        let host = self.host(max, addr(1000));
        assert_eq!(self.bind(&host), Out::Reply(BIND_RECEIVED.to_vec()));
        let joiners: Vec<Client> = (0..n)
            .map(|i| {
                let j = self.joiner(&host, addr(2000 + i as u16));
                assert_eq!(self.bind(&j), Out::Reply(BIND_RECEIVED.to_vec()));
                assert_eq!(self.connect(&j, &host), Out::Reply(accepted(&host, &j)));
                j
            })
            .collect();
        (host, joiners)
    }

    pub fn advance_to(&mut self, t: u64) {
        assert!(t >= self.now);
        self.now = t;
        self.core.handle_timeout(t);
    }

    /// Runs timers the way a shard does: only at the times `poll_timeout` asks for.
    pub fn run_until(&mut self, t: u64) {
        while let Some(next) = self.core.poll_timeout() {
            if next > t {
                break;
            }
            self.now = self.now.max(next);
            self.core.handle_timeout(self.now);
        }
        self.now = t;
    }

    pub fn transmits(&mut self) -> Vec<Transmit> {
        std::iter::from_fn(|| self.core.poll_transmit()).collect()
    }

    pub fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.core.poll_event()).collect()
    }
}

pub const BIND_RECEIVED: [u8; 4] = [0xDA, 0x72, 0, 1];

pub fn error(id: &AllocationId, code: ErrorCode) -> Vec<u8> {
    let mut out = [0u8; 21];
    ErrorMsg::emit(&mut out, id, code);
    out.to_vec()
}

pub fn accepted(host: &Client, joiner: &Client) -> Vec<u8> {
    let mut out = [0u8; 36];
    ferry::wire::Accepted::emit(&mut out, &host.id, &joiner.id);
    out.to_vec()
}

pub fn rejected(host: &Client, joiner: &Client) -> Vec<u8> {
    let mut out = [0u8; 36];
    ferry::wire::Rejected::emit(&mut out, &host.id, &joiner.id);
    out.to_vec()
}

pub fn disconnect(from: &Client, to: &Client) -> Vec<u8> {
    packets::disconnect(&from.id, &to.id)
}
