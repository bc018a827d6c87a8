//! Just enough TURN (RFC 8656) over UDP to drive coturn and turn-rs client to client with the
//! same traffic as Ferry: Allocate with long-term credentials, CreatePermission, ChannelBind,
//! then ChannelData. Each stream is two TURN clients on the same server relaying to each other's
//! relayed address.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};

use super::setup::Stream;

const COOKIE: u32 = 0x2112_A442;
const ALLOCATE: u16 = 0x0003;
const CREATE_PERMISSION: u16 = 0x0008;
const CHANNEL_BIND: u16 = 0x0009;
const A_USERNAME: u16 = 0x0006;
const A_MESSAGE_INTEGRITY: u16 = 0x0008;
const A_ERROR_CODE: u16 = 0x0009;
const A_CHANNEL_NUMBER: u16 = 0x000C;
const A_LIFETIME: u16 = 0x000D;
const A_XOR_PEER_ADDRESS: u16 = 0x0012;
const A_REALM: u16 = 0x0014;
const A_NONCE: u16 = 0x0015;
const A_XOR_RELAYED_ADDRESS: u16 = 0x0016;
const A_REQUESTED_TRANSPORT: u16 = 0x0019;
/// The channel every stream uses (each client has its own allocation).
pub const CHANNEL: u16 = 0x4000;

fn xor_addr(a: SocketAddr) -> Vec<u8> {
    let ip = match a.ip() {
        IpAddr::V4(v4) => u32::from(v4),
        IpAddr::V6(_) => 0,
    };
    let mut v = vec![0, 1];
    v.extend_from_slice(&(a.port() ^ (COOKIE >> 16) as u16).to_be_bytes());
    v.extend_from_slice(&(ip ^ COOKIE).to_be_bytes());
    v
}

fn parse_xor_addr(v: &[u8]) -> Option<SocketAddr> {
    if v.len() < 8 || v[1] != 1 {
        return None;
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (COOKIE >> 16) as u16;
    let ip = u32::from_be_bytes([v[4], v[5], v[6], v[7]]) ^ COOKIE;
    Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
}

struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(ty: u16) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&ty.to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&COOKIE.to_be_bytes());
        let mut tid = [0u8; 12];
        let _ = getrandom::getrandom(&mut tid);
        buf.extend_from_slice(&tid);
        Self { buf }
    }

    fn attr(mut self, ty: u16, v: &[u8]) -> Self {
        self.buf.extend_from_slice(&ty.to_be_bytes());
        self.buf.extend_from_slice(&(v.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(v);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
        let len = (self.buf.len() - 20) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        self
    }

    /// Appends MESSAGE-INTEGRITY (HMAC-SHA1 under the long-term key).
    fn integrity(mut self, key: &[u8]) -> Vec<u8> {
        let len = (self.buf.len() - 20 + 24) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        let mut mac = <Hmac<sha1::Sha1> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key"));
        mac.update(&self.buf);
        let tag = mac.finalize().into_bytes();
        self.buf.extend_from_slice(&A_MESSAGE_INTEGRITY.to_be_bytes());
        self.buf.extend_from_slice(&20u16.to_be_bytes());
        self.buf.extend_from_slice(&tag);
        self.buf
    }
}

fn attrs(m: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut i = 20;
    while i + 4 <= m.len() {
        let ty = u16::from_be_bytes([m[i], m[i + 1]]);
        let len = u16::from_be_bytes([m[i + 2], m[i + 3]]) as usize;
        if i + 4 + len > m.len() {
            break;
        }
        out.push((ty, &m[i + 4..i + 4 + len]));
        i += 4 + len.div_ceil(4) * 4;
    }
    out
}

fn err(m: impl Into<String>) -> io::Error {
    io::Error::other(m.into())
}

/// One TURN client with a relayed address.
struct TurnClient {
    sock: UdpSocket,
    server: SocketAddr,
    user: String,
    realm: Vec<u8>,
    nonce: Vec<u8>,
    key: Vec<u8>,
    relayed: SocketAddr,
}

fn transact(sock: &UdpSocket, server: SocketAddr, req: &[u8]) -> io::Result<Vec<u8>> {
    let mut buf = [0u8; 1500];
    for _ in 0..5 {
        sock.send_to(req, server)?;
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if from == server && n >= 20 && buf[8..20] == req[8..20] {
                return Ok(buf[..n].to_vec());
            }
        }
    }
    Err(err(format!("no answer from TURN server {server}")))
}

impl TurnClient {
    fn allocate(server: SocketAddr, user: &str, pass: &str, bind_ip: &str) -> io::Result<Self> {
        let sock = UdpSocket::bind(format!("{bind_ip}:0"))?;
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        let transport = [17u8, 0, 0, 0];
        let first = Msg::new(ALLOCATE).attr(A_REQUESTED_TRANSPORT, &transport).buf;
        let resp = transact(&sock, server, &first)?;
        let a = attrs(&resp);
        let realm =
            a.iter().find(|x| x.0 == A_REALM).map(|x| x.1.to_vec()).ok_or_else(|| err("no REALM in 401"))?;
        let nonce =
            a.iter().find(|x| x.0 == A_NONCE).map(|x| x.1.to_vec()).ok_or_else(|| err("no NONCE in 401"))?;
        let key = Md5::digest(format!("{user}:{}:{pass}", String::from_utf8_lossy(&realm))).to_vec();
        let req = Msg::new(ALLOCATE)
            .attr(A_REQUESTED_TRANSPORT, &transport)
            .attr(A_LIFETIME, &600u32.to_be_bytes())
            .attr(A_USERNAME, user.as_bytes())
            .attr(A_REALM, &realm)
            .attr(A_NONCE, &nonce)
            .integrity(&key);
        let resp = transact(&sock, server, &req)?;
        if u16::from_be_bytes([resp[0], resp[1]]) != 0x0103 {
            let code =
                attrs(&resp).iter().find(|x| x.0 == A_ERROR_CODE).map(|x| x.1.to_vec()).unwrap_or_default();
            return Err(err(format!("TURN Allocate failed: {:?}", String::from_utf8_lossy(&code))));
        }
        let relayed = attrs(&resp)
            .iter()
            .find(|x| x.0 == A_XOR_RELAYED_ADDRESS)
            .and_then(|x| parse_xor_addr(x.1))
            .ok_or_else(|| err("no XOR-RELAYED-ADDRESS"))?;
        Ok(Self { sock, server, user: user.to_string(), realm, nonce, key, relayed })
    }

    fn authed(&self, ty: u16, extra: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut m = Msg::new(ty);
        for (t, v) in extra {
            m = m.attr(*t, v);
        }
        m.attr(A_USERNAME, self.user.as_bytes())
            .attr(A_REALM, &self.realm)
            .attr(A_NONCE, &self.nonce)
            .integrity(&self.key)
    }

    /// CreatePermission and ChannelBind towards `peer`.
    fn bind_channel(&self, peer: SocketAddr) -> io::Result<()> {
        let perm = self.authed(CREATE_PERMISSION, &[(A_XOR_PEER_ADDRESS, xor_addr(peer))]);
        let r = transact(&self.sock, self.server, &perm)?;
        if u16::from_be_bytes([r[0], r[1]]) != 0x0108 {
            return Err(err("TURN CreatePermission failed"));
        }
        let mut ch = CHANNEL.to_be_bytes().to_vec();
        ch.extend_from_slice(&[0, 0]);
        let bind = self.authed(CHANNEL_BIND, &[(A_CHANNEL_NUMBER, ch), (A_XOR_PEER_ADDRESS, xor_addr(peer))]);
        let r = transact(&self.sock, self.server, &bind)?;
        if u16::from_be_bytes([r[0], r[1]]) != 0x0109 {
            return Err(err("TURN ChannelBind failed"));
        }
        Ok(())
    }
}

/// Streams through a TURN server: two allocations per stream, each channel-bound to the other's
/// relayed address.
pub fn streams(
    server: SocketAddr,
    user: &str,
    pass: &str,
    sessions: usize,
    payload: usize,
    bind_ip: &str,
) -> io::Result<Vec<Stream>> {
    let mut out = Vec::with_capacity(sessions);
    for _ in 0..sessions {
        let tx = TurnClient::allocate(server, user, pass, bind_ip)?;
        let rx = TurnClient::allocate(server, user, pass, bind_ip)?;
        tx.bind_channel(rx.relayed)?;
        rx.bind_channel(tx.relayed)?;
        let mut header = CHANNEL.to_be_bytes().to_vec();
        header.extend_from_slice(&(payload as u16).to_be_bytes());
        out.push(Stream { tx: tx.sock, rx: rx.sock, dst: server, header, keepalive: None });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xor_address_round_trip_and_integrity_layout() {
        let a: SocketAddr = "192.0.2.1:32853".parse().unwrap();
        assert_eq!(parse_xor_addr(&xor_addr(a)), Some(a));
        let m = Msg::new(ALLOCATE).attr(A_REQUESTED_TRANSPORT, &[17, 0, 0, 0]).integrity(b"key");
        assert_eq!(m.len(), 20 + 8 + 24);
        assert_eq!(u16::from_be_bytes([m[2], m[3]]) as usize, m.len() - 20);
        let parsed = attrs(&m);
        assert_eq!(parsed[0], (A_REQUESTED_TRANSPORT, &[17u8, 0, 0, 0][..]));
        assert_eq!(parsed[1].0, A_MESSAGE_INTEGRITY);
    }
}
