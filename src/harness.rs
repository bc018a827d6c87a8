//! Bodies shared by the fuzz targets (`fuzz/`) and the property tests: each takes arbitrary
//! bytes, drives a parser or the core, and panics if an invariant breaks.

mod fastpath;

pub use fastpath::{fastpath_sequence, Exercised};

use std::collections::HashSet;
use std::net::SocketAddr;

use crate::client::packets;
use crate::control::{joincode, model};
use crate::core::{Action, Control, ControlReply, Core, CoreConfig, Created, Entropy, Event};
use crate::wire::{self, AllocationId, Bind, Close, ConnectRequest, ErrorMsg, MessageType, Ping, Relay};

/// The key every fuzzed allocation uses, so mutated BINDs can still verify.
pub const TEST_KEY: [u8; 64] = [0x42; 64];
const SECRET: [u8; 64] = [0x24; 64];

/// STUN on the relay port over arbitrary bytes (the first bytes are forced to look like STUN
/// half the time, so the parser gets past its header check): no panic, and every answer, from an
/// IPv4 or an IPv6 source, is at most [`crate::core::MAX_AMPLIFICATION`] times its request,
/// is a Binding success response with the request's transaction ID, and names the source.
pub fn stun_view(data: &[u8]) {
    let mut d = data.to_vec();
    if d.first().is_some_and(|b| b & 1 == 1) && d.len() >= 20 {
        d[0] &= 0x3F;
        d[4..8].copy_from_slice(&wire::stun::MAGIC_COOKIE);
        let body = (d.len() - 20) as u16;
        if d[1] & 2 == 0 {
            d[2..4].copy_from_slice(&body.to_be_bytes());
        }
    }
    let mut cfg = CoreConfig::new(SECRET);
    cfg.stun_rate_per_ip = crate::core::Rate { per_sec: 1_000_000, burst: 1_000_000 };
    cfg.stun_rate_global = crate::core::Rate { per_sec: 1_000_000, burst: 1_000_000 };
    let mut core = Core::new(cfg, 0);
    for src in ["192.0.2.7:4000", "[2001:db8::9]:5000"] {
        let src: SocketAddr = src.parse().expect("address");
        let mut room = vec![0u8; 2048];
        let len = d.len().min(room.len());
        room[..len].copy_from_slice(&d[..len]);
        let parsed = wire::stun::BindingRequest::parse(&d);
        match core.handle_stun(0, src, &mut room, len) {
            Action::Reply(n) => {
                let req = parsed.expect("only a parsed request is answered");
                assert!(n as f64 <= crate::core::MAX_AMPLIFICATION * len as f64, "{n} bytes for {len}");
                assert_eq!(&room[..2], &[0x01, 0x01]);
                assert_eq!(&room[8..20], &req.transaction_id);
                assert_eq!(n, req.response_len(&src));
            }
            _ => assert!(
                parsed.is_err() || req_too_small(&parsed, &src, len),
                "a well-formed request within bounds is answered"
            ),
        }
    }
}

fn req_too_small(
    parsed: &Result<wire::stun::BindingRequest, wire::stun::StunError>,
    src: &SocketAddr,
    len: usize,
) -> bool {
    parsed.as_ref().is_ok_and(|r| r.response_len(src) as f64 > crate::core::MAX_AMPLIFICATION * len as f64)
}

/// Player-token verification over arbitrary strings (as a bearer token would arrive): never a
/// panic, and nothing verifies without the key.
pub fn jwt_verify(data: &[u8]) {
    use std::sync::OnceLock;
    static V: OnceLock<crate::control::jwt::JwtVerifier> = OnceLock::new();
    let v = V.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ferry-fuzz-jwt-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let secret = dir.join("secret");
        let _ = std::fs::write(&secret, "fuzzing-secret-fuzzing-secret-fuzzing!");
        let settings = crate::control::jwt::JwtSettings {
            algorithm: jsonwebtoken::Algorithm::HS256,
            secret_file: Some(secret),
            public_key_file: None,
            jwks_file: None,
            jwks_url: None,
            jwks_ca_file: None,
            issuer: None,
            audience: None,
            leeway_secs: 30,
            project_claim: "project_id".into(),
            environment_claim: "environment_id".into(),
        };
        match crate::control::jwt::JwtVerifier::new(settings, crate::clock::Clock::new()) {
            Ok(v) => v,
            Err((k, m)) => panic!("{k}: {m}"),
        }
    });
    let token = String::from_utf8_lossy(data);
    assert!(v.verify(&token).is_err(), "a token the fuzzer made up verified");
}

/// The tunnel's frames over arbitrary bytes: no panic, and what parses re-writes to the same
/// bytes (DATA too, through `write_data`).
pub fn tunnel_frame(data: &[u8]) {
    use crate::client::tunnel::frame::{self, Frame};
    if let Ok(f) = Frame::parse(data) {
        let mut out = vec![0u8; frame::MAX_RELAY_PAYLOAD + 64];
        let n = f.write(&mut out).expect("a parsed frame re-writes");
        assert_eq!(&out[..n], data);
    }
}

/// Every view over arbitrary bytes: no panic, and what parses re-emits to the same bytes.
pub fn wire_views(data: &[u8]) {
    let _ = wire::parse_header(data);
    if let Ok(q) = wire::qos::QosRequest::parse(data) {
        let mut out = [0u8; wire::qos::REPLY_LEN];
        let n = q.emit_reply(&mut out).expect("a reply fits");
        assert!(n < data.len(), "a QoS reply is smaller than its request");
    }
    if let Ok(r) = Relay::new_checked(data) {
        let mut out = vec![0u8; data.len()];
        let n = Relay::emit(&mut out, &r.from(), &r.to(), r.payload()).expect("relay re-emits");
        assert_eq!(&out[..n], data);
    }
    if let Ok(b) = Bind::new_checked(data) {
        let mut out = vec![0u8; data.len()];
        let n = Bind::emit_unsigned(&mut out, b.nonce(), b.connection_data()).expect("bind re-emits");
        assert_eq!(&out[..n], b.signed_part());
        assert_eq!(b.mac().len(), 32);
    }
    if let Ok(p) = Ping::new_checked(data) {
        let mut out = [0u8; 22];
        Ping::emit(&mut out, &p.sender(), p.sequence());
        assert_eq!(&out[..], data);
    }
    if let Ok(c) = ConnectRequest::new_checked(data) {
        let mut out = vec![0u8; data.len()];
        ConnectRequest::emit(&mut out, &c.requester(), c.target_connection_data()).expect("re-emits");
        assert_eq!(out, data);
    }
    if let Ok(c) = Close::new_checked(data) {
        let mut out = [0u8; 20];
        Close::emit(&mut out, &c.sender());
        assert_eq!(&out[..], data);
    }
    if let Ok(e) = ErrorMsg::new_checked(data) {
        let mut out = [0u8; 21];
        ErrorMsg::emit(&mut out, &e.allocation_id(), e.code());
        assert_eq!(&out[..], data);
    }
    for ok in [
        wire::Accepted::new_checked(data).map(|p| (p.from(), p.to())).ok(),
        wire::Rejected::new_checked(data).map(|p| (p.from(), p.to())).ok(),
        wire::Disconnect::new_checked(data).map(|p| (p.from(), p.to())).ok(),
    ]
    .into_iter()
    .flatten()
    {
        assert_eq!(&data[4..20], &ok.0 .0);
    }
    let _ = crate::auth::ConnectionData::parse(data);
}

/// API request bodies and join-code normalisation: no panic; normalised codes are canonical.
pub fn api_bodies(data: &[u8]) {
    let _ = serde_json::from_slice::<model::AllocateRequest>(data);
    let _ = serde_json::from_slice::<model::JoinCodeRequest>(data);
    let _ = serde_json::from_slice::<model::JoinRequest>(data);
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(c) = joincode::normalize(s) {
            assert_eq!(joincode::normalize(&c).as_deref(), Some(c.as_str()));
            assert!(c.bytes().all(|b| joincode::ALPHABET.contains(&b)));
        }
        if let Some(id) = AllocationId::parse(s) {
            assert_eq!(AllocationId::parse(&id.to_string()), Some(id));
        }
    }
}

/// A tiny cursor over fuzz bytes.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fn src(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, (n >> 4) & 3, 1 + (n & 15)], 10_000 + (n & 7) as u16))
}

/// A BIND signed with the test key from fuzz-chosen nonce, connection-data edits and trailing
/// corruption: exercises everything after authentication.
pub fn bind_with_test_key(data: &[u8]) {
    let mut cfg = CoreConfig::new(SECRET);
    cfg.max_allocations = 8;
    cfg.limiter_buckets = 16;
    let mut core = Core::new(cfg, 0);
    let Ok(host) = core.create_host(0, 2, Entropy { id: [7; 16] }) else { return };
    let mut b = Bytes(data);
    let mut now = 0u64;
    while let (Some(nonce), Some(edit), Some(from)) = (b.u16(), b.u8(), b.u8()) {
        let mut conn = host.connection_data;
        if edit & 1 == 1 {
            let at = b.u8().unwrap_or(0) as usize % conn.len();
            conn[at] ^= b.u8().unwrap_or(1);
        }
        let mut d = packets::bind(&host.key, nonce, &conn);
        if edit & 2 == 2 {
            let cut = b.u8().unwrap_or(0) as usize;
            d.truncate(d.len().saturating_sub(cut % 8));
        }
        now += (edit >> 4) as u64 * 700;
        let len = d.len();
        match core.handle_datagram(now, src(from), &mut d) {
            Action::Reply(n) => assert!(n <= len),
            Action::Forward(_) => panic!("a BIND is never forwarded"),
            Action::Consumed | Action::Drop(_) => {}
        }
        if let Some(a) = core.bound_addr(&host.id) {
            assert!(a.port() >= 10_000);
        }
    }
}

/// Arbitrary sequences of datagrams, time steps and control commands against one core, with the
/// relay's safety invariants checked after every step against a model built from its events.
pub fn core_sequence(data: &[u8]) {
    const CAP: u32 = 24;
    let mut cfg = CoreConfig::new(SECRET);
    cfg.max_allocations = CAP;
    cfg.max_connections_cap = 3;
    cfg.unbound_timeout = 3_000;
    cfg.idle_timeout = 1_000;
    cfg.host_alone_timeout = 3_000;
    cfg.rebind_quiet = 500;
    cfg.limiter_buckets = 16;
    let mut core = Core::new(cfg, 0);
    let mut allocs: Vec<Created> = Vec::new();
    let mut links: HashSet<(AllocationId, AllocationId)> = HashSet::new();
    let mut ever_bound: HashSet<SocketAddr> = HashSet::new();
    let mut now = 0u64;
    let mut seed = 0u8;
    let mut b = Bytes(data);
    let pick = |allocs: &[Created], i: u8| allocs.get(i as usize % allocs.len().max(1)).cloned();

    while let Some(op) = b.u8() {
        let arg = b.u8().unwrap_or(0);
        let from = src(b.u8().unwrap_or(0));
        seed = seed.wrapping_add(1);
        let entropy = Entropy { id: [seed; 16] };
        let mut datagram: Option<Vec<u8>> = None;
        match op % 12 {
            0 => {
                if let Ok(c) = core.create_host(now, (arg % 4) as u16, entropy) {
                    allocs.push(c);
                }
            }
            1 => {
                if let Some(h) = pick(&allocs, arg) {
                    if let Ok(c) = core.create_joiner(now, &h.id, entropy) {
                        allocs.push(c);
                    }
                }
            }
            2 => {
                if let Some(a) = pick(&allocs, arg) {
                    let _ = core.handle_control(now, Control::Release { id: a.id });
                }
            }
            3 => {
                if let Some(a) = pick(&allocs, arg) {
                    datagram = Some(packets::bind(&a.key, b.u16().unwrap_or(0), &a.connection_data));
                }
            }
            4 => {
                if let (Some(a), Some(t)) = (pick(&allocs, arg), pick(&allocs, arg / 7)) {
                    datagram = Some(packets::connect_request(&a.id, &t.connection_data));
                }
            }
            5 => {
                if let (Some(a), Some(t)) = (pick(&allocs, arg), pick(&allocs, arg / 5)) {
                    let n = b.u8().unwrap_or(0) as usize * 4;
                    datagram = packets::relay(&a.id, &t.id, &vec![0xAB; n]).ok();
                }
            }
            6 => datagram = pick(&allocs, arg).map(|a| packets::ping(&a.id, 1)),
            7 => {
                if let (Some(a), Some(t)) = (pick(&allocs, arg), pick(&allocs, arg / 3)) {
                    datagram = Some(packets::disconnect(&a.id, &t.id));
                }
            }
            8 => datagram = pick(&allocs, arg).map(|a| packets::close(&a.id)),
            9 => datagram = Some(b.take(arg as usize * 6).to_vec()),
            10 => {
                now += arg as u64 * 20;
                core.handle_timeout(now);
            }
            _ => {
                // A valid datagram with a few bytes flipped.
                if let (Some(a), Some(t)) = (pick(&allocs, arg), pick(&allocs, arg / 11)) {
                    let mut d = packets::relay(&a.id, &t.id, b"payload").unwrap_or_default();
                    for _ in 0..(arg % 4) {
                        let at = b.u8().unwrap_or(0) as usize % d.len().max(1);
                        if let Some(x) = d.get_mut(at) {
                            *x ^= b.u8().unwrap_or(0xFF);
                        }
                    }
                    datagram = Some(d);
                }
            }
        }

        let mut forwarded_to = None;
        if let Some(mut d) = datagram {
            let len = d.len();
            let snapshot = d.clone();
            match core.handle_datagram(now, from, &mut d) {
                Action::Reply(n) => assert!(n <= len, "reply of {n} bytes to a {len}-byte datagram"),
                Action::Forward(to) => {
                    assert_eq!(d, snapshot, "forwarded datagrams are unchanged");
                    forwarded_to = Some((to, snapshot));
                }
                Action::Consumed | Action::Drop(_) => {}
            }
        }
        // Fold this step's events into the model before judging a forward.
        let mut unlinked_now = Vec::new();
        while let Some(ev) = core.poll_event() {
            match ev {
                Event::Bound { addr, .. } => {
                    ever_bound.insert(addr);
                }
                Event::Connected { host, joiner } => {
                    links.insert((host, joiner));
                }
                Event::Released { id, .. } => links.retain(|&(h, j)| h != id && j != id),
            }
        }
        if let Some((to, d)) = forwarded_to {
            assert!(ever_bound.contains(&to), "sent to {to}, which never bound");
            let ty = MessageType::from_u8(d[3]);
            let from_id = AllocationId::read(&d, 4);
            let to_id = AllocationId::read(&d, 20);
            let pair_linked = links.contains(&(from_id, to_id)) || links.contains(&(to_id, from_id));
            match ty {
                Some(MessageType::Relay) => {
                    assert!(pair_linked, "RELAY between unlinked {from_id} and {to_id}");
                    assert_eq!(core.bound_addr(&to_id), Some(to), "RELAY to a stale address");
                }
                Some(MessageType::Disconnect) => {
                    assert!(pair_linked, "DISCONNECT between unlinked allocations");
                    unlinked_now.push((from_id, to_id));
                }
                other => panic!("forwarded a {other:?}"),
            }
        }
        for (a, b) in unlinked_now {
            links.remove(&(a, b));
            links.remove(&(b, a));
        }
        while let Some(t) = core.poll_transmit() {
            assert!(ever_bound.contains(&t.to), "notification to an address that never bound");
            assert_eq!(t.len, 36);
        }
        assert!(core.allocations() <= CAP as usize, "table over its cap");
        let _ = core.poll_timeout();
    }
    // Releasing everything leaves nothing behind.
    for a in &allocs {
        let _ = core.handle_control(now, Control::Release { id: a.id });
    }
    assert_eq!(core.allocations(), 0);
    let _ = ControlReply::Released;
}

/// DTLS demultiplexing and the layer's handling of whatever arrives: never a panic, and nothing
/// sent in answer is larger than the datagram that caused it (nothing here can forge a cookie,
/// so no handshake gets past the stateless exchange).
pub fn dtls_records(data: &[u8]) {
    use crate::secure::{dtls, record};
    thread_local! {
        static CTX: openssl::ssl::SslContext =
            dtls::server_context(&[3; 64]).expect("a DTLS context");
    }
    let mut layer = CTX.with(|c| dtls::DtlsLayer::new(c.clone(), [3; 64], dtls::DtlsConfig::default()));
    let mut plain = vec![0u8; 2048];
    let srcs: [SocketAddr; 2] =
        ["192.0.2.1:1000".parse().expect("addr"), "[2001:db8::1]:9".parse().expect("addr")];
    let mut now = 0;
    for (i, d) in data.split(|&b| b == 0xFF).enumerate().take(16) {
        let _ = record::well_formed(d);
        let _ = record::psk_identity(d).map(record::identity_id);
        let _ = record::is_client_hello(d);
        let src = srcs[i % 2];
        let _ = layer.receive(now, src, d, &mut plain);
        while let Some((to, out)) = layer.poll_transmit() {
            assert_eq!(to, src);
            assert!(out.len() <= d.len(), "answered {} bytes to {}", out.len(), d.len());
        }
        let _ = layer.seal(&src, d, &mut plain);
        now += 700;
        layer.poll(now);
    }
}

/// WebSocket upgrades and frames from a client, fed in arbitrary chunks: never a panic, binary
/// messages never over the limit.
pub fn ws_frames(data: &[u8]) {
    use crate::secure::ws;
    let _ = ws::accept_upgrade(data);
    let _ = ws::check_upgrade_response(data, &[1; 16]);
    for mut dec in [ws::Decoder::default(), ws::Decoder::client()] {
        let mut buf = Vec::new();
        for chunk in data.chunks(7) {
            buf.extend_from_slice(chunk);
            loop {
                match dec.decode(&buf) {
                    Ok(Some((used, frame))) => {
                        if let Some(ws::Frame::Binary(m)) = frame {
                            assert!(m.len() <= ws::MAX_MESSAGE);
                        }
                        assert!(used > 0 && used <= buf.len());
                        buf.drain(..used);
                    }
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        }
    }
}

/// A fleet relay's core fed tokens: valid ones minted under the test fleet key (hosts and
/// joiners, for this relay and boot or not, expired or not), then mutated, bound, connected,
/// relayed and closed in fuzz-chosen orders. Replies never exceed their trigger, BINDs are never
/// forwarded, and nothing panics.
pub fn fleet_sequence(data: &[u8]) {
    use crate::auth::token::{relay_key, Token, TokenRole};
    use crate::core::FleetRelay;
    const FLEET_KEY: [u8; 32] = [5; 32];
    let mut cfg = CoreConfig::new(SECRET);
    cfg.max_allocations = 16;
    cfg.max_connections_cap = 3;
    cfg.unbound_timeout = 3_000;
    cfg.idle_timeout = 1_000;
    cfg.limiter_buckets = 16;
    cfg.fleet = Some(FleetRelay::new("r", 7, &[(1, FLEET_KEY.to_vec())], 1_000_000));
    let mut core = Core::new(cfg, 0);
    let mut minted: Vec<(AllocationId, crate::auth::AllocationKey, [u8; 255])> = Vec::new();
    let mut now = 0u64;
    let mut b = Bytes(data);
    while let (Some(op), Some(arg)) = (b.u8(), b.u8()) {
        let from = src(b.u8().unwrap_or(0));
        let mut datagram = None;
        match op % 8 {
            0 | 1 => {
                let mut id = [0u8; 16];
                id[0] = arg;
                id[1] = minted.len() as u8;
                id[15] = if op & 0x80 == 0 { 1 } else { 2 };
                let role = match (op % 8, minted.get(arg as usize % minted.len().max(1))) {
                    (1, Some(h)) => {
                        id[..4].copy_from_slice(&h.0 .0[..4]);
                        TokenRole::Joiner { host: h.0 }
                    }
                    _ => TokenRole::Host { max_connections: (arg % 4) as u16 },
                };
                let epoch = if op & 0x40 == 0 { 7 } else { 8 };
                let rk = relay_key(&FLEET_KEY, "r", epoch);
                let id = AllocationId(id);
                let t = Token {
                    id,
                    role,
                    relay: crate::auth::token::relay_tag(if op & 0x20 == 0 { "r" } else { "s" }),
                    epoch,
                    not_after_ms: 1_000_000 + now + if op & 0x10 == 0 { 3_000 } else { 0 },
                };
                let key = crate::auth::AllocationKey(crate::core::allocation_key(&rk, &id));
                minted.push((id, key, t.emit(&rk)));
            }
            2 => {
                if let Some((_, key, conn)) = minted.get(arg as usize % minted.len().max(1)) {
                    let mut conn = *conn;
                    if let (Some(at), Some(x)) = (b.u8(), b.u8()) {
                        if at & 1 == 1 {
                            conn[at as usize % 255] ^= x;
                        }
                    }
                    datagram = Some(packets::bind(key, b.u16().unwrap_or(0), &conn));
                }
            }
            3 => {
                if let (Some(a), Some(t)) = (
                    minted.get(arg as usize % minted.len().max(1)),
                    minted.get((arg / 7) as usize % minted.len().max(1)),
                ) {
                    datagram = Some(packets::connect_request(&a.0, &t.2));
                }
            }
            4 => {
                if let (Some(a), Some(t)) = (
                    minted.get(arg as usize % minted.len().max(1)),
                    minted.get((arg / 5) as usize % minted.len().max(1)),
                ) {
                    datagram = packets::relay(&a.0, &t.0, &[0xAB; 40]).ok();
                }
            }
            5 => datagram = minted.get(arg as usize % minted.len().max(1)).map(|a| packets::close(&a.0)),
            6 => {
                now += arg as u64 * 37;
                core.handle_timeout(now);
            }
            _ => {
                let n = (arg as usize).min(b.0.len());
                let (head, rest) = b.0.split_at(n);
                datagram = Some(head.to_vec());
                b.0 = rest;
            }
        }
        if let Some(mut d) = datagram {
            let len = d.len();
            let is_bind = d.len() > 3 && d[..3] == [0xDA, 0x72, 0x00] && d[3] == 0;
            match core.handle_datagram(now, from, &mut d) {
                Action::Reply(n) => assert!(n <= len, "reply of {n} to {len} bytes"),
                Action::Forward(_) => assert!(!is_bind, "a BIND is never forwarded"),
                Action::Consumed | Action::Drop(_) => {}
            }
        }
        while core.poll_event().is_some() {}
        while core.poll_transmit().is_some() {}
    }
}
