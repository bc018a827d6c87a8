//! Per-message rules of `docs/protocol.md` ("Sessions"). Order everywhere: cheap structural checks,
//! then O(1) lookups, then crypto, and only then state changes.

use std::net::SocketAddr;

use super::table::{Found, Role, CONFIRMED};
use super::BindReject;
use super::{Action, Core, DropReason, Event, ReleaseReason};
use crate::auth::token::{self, Token, TokenRole};
use crate::auth::{self, ConnDataError, ConnectionData, PreKeyedHmac};
use crate::clock::Millis;
use crate::wire::{
    self, emit_bind_received, AllocationId, Bind, Close, ConnectRequest, Disconnect, ErrorCode, ErrorMsg,
    MessageType, Pair, Ping, Relay, WireError, MAX_DATAGRAM,
};

impl Core {
    /// Handles one datagram of `buf.len()` bytes from `src`.
    pub fn handle_datagram(&mut self, now: Millis, src: SocketAddr, buf: &mut [u8]) -> Action {
        self.now = now;
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += buf.len() as u64;
        if buf.len() > MAX_DATAGRAM {
            return self.drop(DropReason::Oversize);
        }
        if wire::stun::is_stun(buf) {
            // Undo the counting above: the STUN path counts for itself.
            self.stats.rx_packets -= 1;
            self.stats.rx_bytes -= buf.len() as u64;
            let len = buf.len();
            return self.handle_stun(now, src, buf, len);
        }
        if !self.cfg.policy.allows(&src) {
            return self.drop(DropReason::BadSource);
        }
        let action = match wire::parse_header(buf) {
            Ok(MessageType::Relay) => self.on_relay(now, src, buf),
            Ok(MessageType::Ping) => self.on_ping(now, src, buf),
            Ok(MessageType::Bind) => self.on_bind(now, src, buf),
            Ok(MessageType::ConnectRequest) => self.on_connect(now, src, buf),
            Ok(MessageType::Disconnect) => self.on_disconnect(now, src, buf),
            Ok(MessageType::Close) => self.on_close(now, src, buf),
            Ok(_) => Action::Drop(DropReason::UnexpectedType),
            Err(WireError::BadVersion) => self.on_bad_version(now, src, buf),
            Err(e) => Action::Drop(e.into()),
        };
        match action {
            Action::Drop(r) => self.stats.drops[r as usize] += 1,
            Action::Reply(n) => {
                self.stats.reply_packets += 1;
                self.stats.reply_bytes += n as u64;
            }
            Action::Forward(_) => {
                self.stats.forwarded_packets += 1;
                self.stats.forwarded_bytes += buf.len() as u64;
            }
            Action::Consumed => {}
        }
        action
    }

    #[inline]
    fn drop(&mut self, r: DropReason) -> Action {
        self.stats.drops[r as usize] += 1;
        Action::Drop(r)
    }

    /// Resolves the sender of a message that names itself: live, not expired, and bound to `src`.
    /// Refreshes its liveness. On failure, the ERROR code to answer with.
    #[inline]
    fn sender(&mut self, now: Millis, src: SocketAddr, id: &AllocationId) -> Result<u32, ErrorCode> {
        let i = match self.table.find(id) {
            Found::Live(i) => i,
            Found::TimedOut => return Err(ErrorCode::AllocationTimedOut),
            Found::Unknown => return Err(ErrorCode::AllocationNotFound),
        };
        if self.lapsed(i, now) {
            self.release(i, ReleaseReason::TimedOut);
            return Err(ErrorCode::AllocationTimedOut);
        }
        let s = &mut self.table.slots[i as usize];
        if s.bound != Some(src) {
            return Err(ErrorCode::BoundElsewhere);
        }
        s.last_seen = now;
        if s.budget != CONFIRMED {
            s.budget = CONFIRMED;
            self.links_changed(i);
        }
        Ok(i)
    }

    /// A live, unexpired peer named by a message (no liveness refresh).
    #[inline]
    fn peer(&mut self, now: Millis, id: &AllocationId) -> Option<u32> {
        match self.table.find(id) {
            Found::Live(i) if self.lapsed(i, now) => {
                self.release(i, ReleaseReason::TimedOut);
                None
            }
            Found::Live(i) => Some(i),
            _ => None,
        }
    }

    #[inline]
    fn linked(&self, a: u32, b: u32) -> bool {
        let slots = &self.table.slots;
        match (slots[a as usize].role, slots[b as usize].role) {
            (Role::Joiner { host, linked, .. }, _) => linked && host == b,
            (_, Role::Joiner { host, linked, .. }) => linked && host == a,
            _ => false,
        }
    }

    /// ERROR `code` about `id` (the recipient's own allocation), if the limiter and the
    /// no-amplification rule allow it.
    fn error(
        &mut self,
        now: Millis,
        src: SocketAddr,
        buf: &mut [u8],
        id: AllocationId,
        code: ErrorCode,
    ) -> Action {
        let Some(out) = buf.get_mut(..ErrorMsg::<&[u8]>::LEN).and_then(|b| <&mut [u8; 21]>::try_from(b).ok())
        else {
            return Action::Drop(DropReason::ReplyTooLarge);
        };
        if !self.limiter.allow(now, src.ip()) {
            return Action::Drop(DropReason::ReplyRateLimited);
        }
        self.stats.errors_sent[code as usize] += 1;
        Action::Reply(ErrorMsg::emit(out, &id, code))
    }

    fn on_bad_version(&mut self, now: Millis, src: SocketAddr, buf: &mut [u8]) -> Action {
        // Replies are never answered, whatever their version: two relays (or a relay and a
        // spoofed source) must not be able to bounce errors between each other.
        let never_answered =
            [MessageType::Error, MessageType::BindReceived, MessageType::Accepted, MessageType::Rejected];
        if never_answered.iter().any(|t| buf[3] == *t as u8) {
            return Action::Drop(DropReason::BadVersion);
        }
        // The ID sits at offset 8 in a BIND (inside its connection data), 4 in everything else.
        let off = if buf[3] == MessageType::Bind as u8 { 8 } else { 4 };
        if buf.len() < off + 16 {
            return Action::Drop(DropReason::BadVersion);
        }
        let id = AllocationId::read(buf, off);
        self.error(now, src, buf, id, ErrorCode::InvalidProtocolVersion)
    }

    fn on_relay(&mut self, now: Millis, src: SocketAddr, buf: &mut [u8]) -> Action {
        let (from, to) = match Relay::new_checked(&*buf) {
            Ok(r) => (r.from(), r.to()),
            Err(e) => return Action::Drop(e.into()),
        };
        let f = match self.sender(now, src, &from) {
            Ok(f) => f,
            Err(code) => return self.error(now, src, buf, from, code),
        };
        self.table.slots[f as usize].rx_bytes += buf.len() as u64;
        match self.peer(now, &to) {
            Some(t) if self.linked(f, t) => {
                let len = buf.len() as u32;
                let ts = &mut self.table.slots[t as usize];
                match ts.bound {
                    Some(_) if ts.budget != CONFIRMED && ts.budget < len => {
                        Action::Drop(DropReason::Unconfirmed)
                    }
                    Some(addr) => {
                        if ts.budget != CONFIRMED {
                            ts.budget -= len;
                        }
                        Action::Forward(addr)
                    }
                    None => self.error(now, src, buf, from, ErrorCode::NotConnected),
                }
            }
            // The peer was a host that just expired and took this joiner with it.
            None if !self.is_live(&from) => self.error(now, src, buf, from, ErrorCode::AllocationNotFound),
            _ => self.error(now, src, buf, from, ErrorCode::NotConnected),
        }
    }

    fn on_ping(&mut self, now: Millis, src: SocketAddr, buf: &mut [u8]) -> Action {
        let from = match Ping::new_checked(&*buf) {
            Ok(p) => p.sender(),
            Err(e) => return Action::Drop(e.into()),
        };
        match self.sender(now, src, &from) {
            Ok(_) => Action::Reply(buf.len()),
            Err(code) => self.error(now, src, buf, from, code),
        }
    }

    fn on_bind(&mut self, now: Millis, src: SocketAddr, buf: &mut [u8]) -> Action {
        let bind = match Bind::new_checked(&*buf) {
            Ok(b) => b,
            Err(e) => return Action::Drop(e.into()),
        };
        let id = if token::is_fleet(bind.connection_data()) {
            match self.admit(now, src, buf) {
                Ok(id) => id,
                Err(a) => return a,
            }
        } else {
            let Ok(id) = ConnectionData::parse(bind.connection_data()) else {
                return Action::Drop(DropReason::BadConnData);
            };
            id
        };
        let bind = Bind::new_checked(&*buf).expect("checked above");
        // A timed-out allocation gets ERROR 1 here as for every other message.
        let i = match self.table.find(&id) {
            Found::Live(i) if self.lapsed(i, now) => {
                self.release(i, ReleaseReason::TimedOut);
                return self.error(now, src, buf, id, ErrorCode::AllocationTimedOut);
            }
            Found::Live(i) => i,
            Found::TimedOut => return self.error(now, src, buf, id, ErrorCode::AllocationTimedOut),
            Found::Unknown => return self.error(now, src, buf, id, ErrorCode::AllocationNotFound),
        };
        if !auth::verify_bind(&self.table.keys[i as usize], &bind) {
            return Action::Drop(DropReason::BadHmac);
        }
        let nonce = bind.nonce();
        let quiet = self.cfg.rebind_quiet;
        let s = &mut self.table.slots[i as usize];
        match s.bound {
            Some(a) if a == src => {
                s.last_seen = now;
                s.nonce = s.nonce.max(nonce);
                self.stats.binds_repeat += 1;
            }
            // A move needs a nonce above the highest this allocation has used, or the same one
            // after `rebind_quiet` of silence (UTP 1.x never changes its nonce). A lower nonce
            // never moves it: an old captured BIND is dead once the client has used a later one.
            Some(_) if nonce < s.nonce || (nonce == s.nonce && now.saturating_sub(s.last_seen) < quiet) => {
                return Action::Drop(DropReason::RebindRefused);
            }
            prev => {
                let moved = prev.is_some();
                s.nonce = if moved { s.nonce.max(nonce) } else { nonce };
                s.bound = Some(src);
                s.last_seen = now;
                s.budget = self.cfg.unconfirmed_budget;
                if moved {
                    self.stats.binds_moved += 1;
                } else {
                    self.stats.binds_new += 1;
                }
                self.events.push_back(Event::Bound { id, addr: src, moved });
                self.rearm(i);
                self.links_changed(i);
            }
        }
        match buf.get_mut(..4).and_then(|b| <&mut [u8; 4]>::try_from(b).ok()) {
            Some(out) => Action::Reply(emit_bind_received(out)),
            None => Action::Drop(DropReason::ReplyTooLarge),
        }
    }

    fn on_connect(&mut self, now: Millis, src: SocketAddr, buf: &mut [u8]) -> Action {
        let (rid, target) = match ConnectRequest::new_checked(&*buf) {
            Ok(c) => (c.requester(), self.verify_target(c.target_connection_data())),
            Err(e) => return Action::Drop(e.into()),
        };
        let r = match self.sender(now, src, &rid) {
            Ok(r) => r,
            Err(code) => return self.error(now, src, buf, rid, code),
        };
        let tid = match target {
            Ok(t) if t == rid => return self.error(now, src, buf, rid, ErrorCode::SelfConnect),
            Ok(t) => t,
            Err(_) => return self.error(now, src, buf, rid, ErrorCode::Unauthorized),
        };
        let (host, linked) = match self.table.slots[r as usize].role {
            Role::Joiner { host, linked, .. } if self.table.slots[host as usize].id == tid => (host, linked),
            _ => return self.error(now, src, buf, rid, ErrorCode::Unauthorized),
        };
        if self.peer(now, &tid).is_none() {
            // The host just expired and took this joiner with it.
            return self.error(now, src, buf, rid, ErrorCode::AllocationNotFound);
        }
        if !linked {
            let Role::Host { max_peers, linked: count, .. } = self.table.slots[host as usize].role else {
                return self.error(now, src, buf, rid, ErrorCode::Unauthorized);
            };
            if count >= max_peers {
                if !self.limiter.allow(now, src.ip()) {
                    return Action::Drop(DropReason::ReplyRateLimited);
                }
                self.stats.connects_rejected += 1;
                return self.reply_pair::<wire::pair::RejectedKind>(buf, &tid, &rid);
            }
            if let Role::Host { linked: count, .. } = &mut self.table.slots[host as usize].role {
                *count += 1;
            }
            if let Role::Joiner { linked, .. } = &mut self.table.slots[r as usize].role {
                *linked = true;
            }
            self.stats.connects_accepted += 1;
            self.events.push_back(Event::Connected { host: tid, joiner: rid });
            self.links_changed(r);
            if count == 0 {
                self.rearm(host);
            }
        }
        self.reply_pair::<wire::pair::AcceptedKind>(buf, &tid, &rid)
    }

    fn reply_pair<K: wire::pair::PairKind>(
        &mut self,
        buf: &mut [u8],
        from: &AllocationId,
        to: &AllocationId,
    ) -> Action {
        match buf.get_mut(..36).and_then(|b| <&mut [u8; 36]>::try_from(b).ok()) {
            Some(out) => Action::Reply(Pair::<K, ()>::emit(out, from, to)),
            None => Action::Drop(DropReason::ReplyTooLarge),
        }
    }

    fn on_disconnect(&mut self, now: Millis, src: SocketAddr, buf: &mut [u8]) -> Action {
        let (from, to) = match Disconnect::new_checked(&*buf) {
            Ok(d) => (d.from(), d.to()),
            Err(e) => return Action::Drop(e.into()),
        };
        let f = match self.sender(now, src, &from) {
            Ok(f) => f,
            Err(code) => return self.error(now, src, buf, from, code),
        };
        let Some(t) = self.peer(now, &to).filter(|&t| self.linked(f, t)) else {
            return Action::Drop(DropReason::NotLinked);
        };
        let (joiner, host) = match self.table.slots[f as usize].role {
            Role::Joiner { .. } => (f, t),
            Role::Host { .. } => (t, f),
        };
        if let Role::Joiner { linked, .. } = &mut self.table.slots[joiner as usize].role {
            *linked = false;
        }
        if let Role::Host { linked, .. } = &mut self.table.slots[host as usize].role {
            *linked -= 1;
        }
        self.links_changed(joiner);
        match self.table.slots[t as usize].bound {
            Some(addr) => Action::Forward(addr),
            None => Action::Consumed,
        }
    }

    fn on_close(&mut self, now: Millis, src: SocketAddr, buf: &mut [u8]) -> Action {
        let id = match Close::new_checked(&*buf) {
            Ok(c) => c.sender(),
            Err(e) => return Action::Drop(e.into()),
        };
        // CLOSE is 20 bytes and an ERROR 21: never answered.
        match self.sender(now, src, &id) {
            Ok(i) => {
                self.release(i, ReleaseReason::Closed);
                Action::Consumed
            }
            Err(_) => Action::Drop(DropReason::NotBound),
        }
    }
}

impl Core {
    /// Who a CONNECT_REQUEST's target connection data names, if this relay minted it (or, in a
    /// fleet, if it is a token for this relay and boot).
    fn verify_target(&self, data: &[u8]) -> Result<AllocationId, ConnDataError> {
        match (&self.cfg.fleet, token::is_fleet(data)) {
            (Some(f), true) => f.verify_target(data).ok_or(ConnDataError::BadTag),
            (None, true) => Err(ConnDataError::Malformed),
            (_, false) => self.conn.verify(data),
        }
    }

    /// A fleet BIND refused for `why`: an ERROR `code` where the client can act on one (its
    /// allocation is gone for good), a silent drop otherwise.
    #[cold]
    #[inline(never)]
    fn reject(
        &mut self,
        now: Millis,
        src: SocketAddr,
        buf: &mut [u8],
        id: AllocationId,
        why: BindReject,
        code: Option<ErrorCode>,
    ) -> Action {
        self.stats.bind_rejects[why as usize] += 1;
        match code {
            Some(c) => self.error(now, src, buf, id, c),
            None => Action::Drop(DropReason::TokenRefused),
        }
    }

    /// Fleet mode: a BIND whose connection data is a token. An allocation new here is admitted
    /// when its token names this relay and boot, is tagged under a fleet key this relay holds,
    /// is inside its bind window, has not ended here before, and the BIND is signed with the key
    /// the token implies. Returns the allocation ID for the usual BIND handling.
    // Out of line: only an allocation's first BIND comes here, and the forwarding path (the same
    // `handle_datagram`) must not pay for its size in inlining decisions.
    #[cold]
    #[inline(never)]
    fn admit(&mut self, now: Millis, src: SocketAddr, buf: &mut [u8]) -> Result<AllocationId, Action> {
        let (t, key) = {
            let Ok(bind) = Bind::new_checked(&*buf) else { return Err(Action::Drop(DropReason::BadLength)) };
            let data = bind.connection_data();
            let Ok(t) = Token::parse(data) else { return Err(Action::Drop(DropReason::BadConnData)) };
            match self.table.find(&t.id) {
                Found::Unknown if !self.table.buried(&t.id) => {}
                Found::Unknown => {
                    let code = Some(ErrorCode::AllocationNotFound);
                    return Err(self.reject(now, src, buf, t.id, BindReject::Closed, code));
                }
                _ => return Ok(t.id),
            }
            let Some(f) = &self.cfg.fleet else {
                return Err(self.reject(now, src, buf, t.id, BindReject::NotFleet, None));
            };
            let gone = Some(ErrorCode::AllocationNotFound);
            let why = if t.relay != f.relay {
                Some((BindReject::WrongRelay, gone))
            } else if t.epoch != f.epoch {
                Some((BindReject::StaleEpoch, gone))
            } else {
                None
            };
            if let Some((why, code)) = why {
                return Err(self.reject(now, src, buf, t.id, why, code));
            }
            let Some((rk, mac)) = f.key(Token::kid(&t.id)) else {
                return Err(self.reject(now, src, buf, t.id, BindReject::Forged, None));
            };
            if !Token::tag_ok(data, mac) {
                return Err(self.reject(now, src, buf, t.id, BindReject::Forged, None));
            }
            if f.unix_at_zero + now > t.not_after_ms + f.skew_ms {
                let code = Some(ErrorCode::AllocationTimedOut);
                return Err(self.reject(now, src, buf, t.id, BindReject::Expired, code));
            }
            let key = PreKeyedHmac::new(&super::allocation_key(rk, &t.id));
            if !auth::verify_bind(&key, &bind) {
                return Err(Action::Drop(DropReason::BadHmac));
            }
            (t, key)
        };
        let admitted = match t.role {
            TokenRole::Host { max_connections } => {
                if max_connections == 0 || max_connections > self.cfg.max_connections_cap {
                    return Err(Action::Drop(DropReason::BadConnData));
                }
                let role = Role::Host {
                    max_peers: max_connections,
                    linked: 0,
                    joiners: 0,
                    first_joiner: super::NIL,
                };
                self.admit_slot(now, t.id, role, key)
            }
            TokenRole::Joiner { host } => match self.joiner_role(now, &host) {
                Ok((h, role)) => {
                    let j = self.admit_slot(now, t.id, role, key);
                    if let Some(j) = j {
                        self.link_joiner(h, j);
                    }
                    j
                }
                Err(super::ControlError::SessionFull) => None,
                Err(_) => return Err(self.reject(now, src, buf, t.id, BindReject::HostAbsent, None)),
            },
        };
        match admitted {
            Some(_) => Ok(t.id),
            None => Err(self.reject(now, src, buf, t.id, BindReject::Full, None)),
        }
    }
}
