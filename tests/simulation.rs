//! Scale and faults in simulation: 100k allocations over four shards, a network that loses,
//! duplicates, reorders and truncates datagrams, clients that rebind, and attackers forging
//! from/to IDs. Every delivery is checked: zero misdelivered datagrams, zero accepted from an
//! address the sender is not bound to.

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;

use ferry::auth::AllocationKey;
use ferry::client::packets;
use ferry::core::{owner_shard, Action, Core, CoreConfig, Created, Entropy};
use ferry::wire::{AllocationId, MessageType, Relay};

const SHARDS: u32 = 4;
const HOSTS: usize = 20_000;
const JOINERS_PER_HOST: usize = 4; // 100 000 allocations in all
const ATTACKERS: usize = 200;

/// xorshift64*: deterministic, seedable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.next() % 1000 < per_mille
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: std::cmp::Reverse<(u64, u64)>,
    src: SocketAddr,
    dst: Dst,
    data: Vec<u8>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
enum Dst {
    Relay,
    Client(SocketAddr),
}

struct Client {
    created: Created,
    addr: SocketAddr,
    nonce: u16,
    host: Option<usize>,
    /// Sequence numbers this client has received, per sender.
    received: u64,
}

struct Net {
    rng: Rng,
    queue: BinaryHeap<InFlight>,
    seq: u64,
    now: u64,
}

impl Net {
    /// Sends with faults: 3% loss, 2% duplication, up to 40 ms of jitter (reordering), 1% truncation.
    fn send(&mut self, src: SocketAddr, dst: Dst, data: Vec<u8>) {
        if self.rng.chance(30) {
            return;
        }
        let copies = if self.rng.chance(20) { 2 } else { 1 };
        for _ in 0..copies {
            let mut d = data.clone();
            if self.rng.chance(10) && !d.is_empty() {
                let cut = self.rng.below(d.len() as u64) as usize;
                d.truncate(cut);
            }
            let at = self.now + 1 + self.rng.below(40);
            self.seq += 1;
            self.queue.push(InFlight { at: std::cmp::Reverse((at, self.seq)), src, dst, data: d });
        }
    }
}

fn addr(i: usize, epoch: u16) -> SocketAddr {
    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 20_000 + epoch))
}

/// Payload: the true sender's client index and a sequence number, so a receiver can tell who
/// really sent what it got.
fn payload(sender: usize, seq: u32) -> Vec<u8> {
    let mut p = (sender as u64).to_le_bytes().to_vec();
    p.extend_from_slice(&seq.to_le_bytes());
    p
}

#[test]
fn hundred_thousand_allocations_under_faults_and_forgery() {
    let mut shards: Vec<Core> = (0..SHARDS)
        .map(|s| {
            let mut cfg = CoreConfig::new([9; 64]);
            cfg.shard = s;
            cfg.shards = SHARDS;
            cfg.idle_timeout = 60_000;
            cfg
        })
        .map(|cfg| Core::new(cfg, 0))
        .collect();
    let mut net = Net { rng: Rng(0x5EED_F00D), queue: BinaryHeap::new(), seq: 0, now: 0 };
    let mut clients: Vec<Client> = Vec::new();
    let mut by_addr: HashMap<SocketAddr, usize> = HashMap::new();
    let mut seed = 0u64;
    let mut entropy = |rng: &mut Rng| {
        seed += 1;
        let mut e = Entropy { id: [0; 16] };
        for c in e.id.chunks_mut(8) {
            c.copy_from_slice(&(rng.next() ^ seed).to_le_bytes());
        }
        e
    };

    for h in 0..HOSTS + ATTACKERS {
        let shard = h % SHARDS as usize;
        let e = entropy(&mut net.rng);
        let created = shards[shard].create_host(0, JOINERS_PER_HOST as u16, e).unwrap();
        let hi = clients.len();
        clients.push(Client { created, addr: addr(hi, 0), nonce: 0, host: None, received: 0 });
        if h >= HOSTS {
            continue; // attackers: a host allocation of their own, nothing else
        }
        for _ in 0..JOINERS_PER_HOST {
            let e = entropy(&mut net.rng);
            let host_id = clients[hi].created.id;
            let created = shards[shard].create_joiner(0, &host_id, e).unwrap();
            assert_eq!(owner_shard(&created.id, SHARDS), shard as u32);
            let ji = clients.len();
            clients.push(Client { created, addr: addr(ji, 0), nonce: 0, host: Some(hi), received: 0 });
        }
    }
    let allocations: usize = shards.iter().map(|s| s.allocations()).sum();
    assert_eq!(allocations, HOSTS * (1 + JOINERS_PER_HOST) + ATTACKERS);
    for (i, c) in clients.iter().enumerate() {
        by_addr.insert(c.addr, i);
    }

    let mut misdelivered = 0u64;
    let mut from_unbound = 0u64;
    let mut delivered = 0u64;
    let mut forged_sent = 0u64;

    // Rounds: BIND, CONNECT, traffic, with every round's datagrams going through the faulty network.
    for round in 0..12u32 {
        let n = clients.len();
        for i in 0..n {
            let c = &mut clients[i];
            let is_attacker = i >= n - ATTACKERS;
            // Rebinding events: 1% of clients per round move to a new port and re-BIND.
            if round > 3 && net.rng.chance(10) && !is_attacker {
                by_addr.remove(&c.addr);
                c.addr = addr(i, round as u16);
                by_addr.insert(c.addr, i);
                c.nonce += 1;
            }
            let (src, bind) = (c.addr, packets::bind(&c.created.key, c.nonce, &c.created.connection_data));
            if round < 3 || round % 4 == 0 {
                net.send(src, Dst::Relay, bind);
            }
            if let Some(h) = c.host {
                let host_conn = clients[h].created.connection_data;
                let (jid, hid) = (clients[i].created.id, clients[h].created.id);
                if round < 6 {
                    net.send(src, Dst::Relay, packets::connect_request(&jid, &host_conn));
                }
                if round >= 2 {
                    net.send(src, Dst::Relay, packets::relay(&jid, &hid, &payload(i, round)).unwrap());
                    net.send(
                        clients[h].addr,
                        Dst::Relay,
                        packets::relay(&hid, &jid, &payload(h, round)).unwrap(),
                    );
                }
            } else if is_attacker && round >= 2 {
                // Forge: a victim's ID as *from* (to reach its peer), and as *to* (to reach the victim).
                let victim = net.rng.below(HOSTS as u64 * 5) as usize;
                let vh = clients[victim].host.unwrap_or(victim);
                let (vid, vpeer) = (clients[victim].created.id, clients[vh].created.id);
                let me = clients[i].created.id;
                let p = payload(i, round);
                net.send(src, Dst::Relay, packets::relay(&vid, &vpeer, &p).unwrap());
                net.send(src, Dst::Relay, packets::relay(&me, &vid, &p).unwrap());
                net.send(
                    src,
                    Dst::Relay,
                    packets::connect_request(&me, &clients[vh].created.connection_data),
                );
                let mut forged_bind =
                    packets::bind(&AllocationKey([7; 64]), 9, &clients[victim].created.connection_data);
                forged_bind[100] ^= 1;
                net.send(src, Dst::Relay, forged_bind);
                forged_sent += 4;
            }
        }
        // Deliver everything of this round.
        while let Some(f) = net.queue.pop() {
            net.now = net.now.max(f.at.0 .0);
            match f.dst {
                Dst::Relay => {
                    let mut d = f.data;
                    let owner = if d.len() >= 24 {
                        let off = if d[3] == MessageType::Bind as u8 { 8 } else { 4 };
                        owner_shard(&AllocationId::read(&d, off), SHARDS) as usize
                    } else {
                        0
                    };
                    let core = &mut shards[owner];
                    let before = d.clone();
                    match core.handle_datagram(net.now, f.src, &mut d) {
                        Action::Forward(to) => {
                            if let Ok(r) = Relay::new_checked(&before[..]) {
                                if core.bound_addr(&r.from()) != Some(f.src) {
                                    from_unbound += 1;
                                }
                            }
                            net.send(f.src, Dst::Client(to), before);
                        }
                        Action::Reply(n) => net.send(f.src, Dst::Client(f.src), d[..n].to_vec()),
                        Action::Consumed | Action::Drop(_) => {}
                    }
                    while let Some(t) = core.poll_transmit() {
                        net.send(f.src, Dst::Client(t.to), t.payload().to_vec());
                    }
                    while core.poll_event().is_some() {}
                }
                Dst::Client(to) => {
                    let Some(&ci) = by_addr.get(&to) else { continue };
                    let Ok(r) = Relay::new_checked(&f.data[..]) else { continue };
                    let me = &clients[ci];
                    let p = r.payload();
                    let true_sender = u64::from_le_bytes(p[..8].try_into().unwrap()) as usize;
                    let legit_peer = match me.host {
                        Some(h) => h == true_sender,
                        None => clients[true_sender].host == Some(ci),
                    };
                    let from_is_sender = clients[true_sender].created.id == r.from();
                    if r.to() != me.created.id || !legit_peer || !from_is_sender {
                        misdelivered += 1;
                    } else {
                        clients[ci].received += 1;
                        delivered += 1;
                    }
                }
            }
        }
        for s in shards.iter_mut() {
            s.handle_timeout(net.now);
        }
    }

    let drops: u64 = shards.iter().map(|s| s.stats().drops.iter().sum::<u64>()).sum();
    let moved: u64 = shards.iter().map(|s| s.stats().binds_moved).sum();
    eprintln!(
        "simulation: {} allocations, {delivered} delivered, {misdelivered} misdelivered, {from_unbound} from unbound, \
         {forged_sent} forged sent, {moved} rebinds, {drops} dropped by the relay",
        clients.len()
    );
    assert_eq!(misdelivered, 0, "datagrams reached a client they were not meant for");
    assert_eq!(from_unbound, 0, "datagrams accepted from an address the sender is not bound to");
    assert!(forged_sent > 0);
    // Despite 3% loss, truncation and rebinding, honest traffic flows for nearly everyone.
    let honest_with_traffic = clients.iter().filter(|c| c.received > 0).count();
    assert!(
        honest_with_traffic > HOSTS * (1 + JOINERS_PER_HOST) * 9 / 10,
        "{honest_with_traffic} clients got traffic"
    );
    assert!(delivered > 1_000_000, "{delivered}");
    let total: u64 = shards.iter().map(|s| s.stats().forwarded_packets).sum();
    assert!(total >= delivered);
}
