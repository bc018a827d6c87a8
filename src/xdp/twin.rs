//! The fast path's decision in Rust: what `bpf/ferry_xdp.c` does with one Ethernet frame, step
//! for step and byte for byte, given the same map contents.
//!
//! Two property tests hold it in place: `tests/xdp_twin.rs` runs the loaded program
//! (`BPF_PROG_TEST_RUN`) and this function over the same frames and maps and compares verdicts,
//! counters and output bytes; and it is run against the relay core over random sessions, where
//! every frame it would forward must be one the core forwards, unchanged, to the same address.
//! So the kernel, its twin and the core cannot disagree about a RELAY.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::layout::{Endpoint, Link, L2};
use crate::wire::MAX_DATAGRAM;

const ETH: usize = 14;
const IPV4: usize = 20;
const IPV6: usize = 40;
const UDP: usize = 8;
const RELAY_HEADER: usize = 38;

/// Why a frame went where it went: `enum reason` of the program, in its order (the index of its
/// per-CPU counter) and the label of `ferry_xdp_packets_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Reason {
    Forwarded,
    Redirected,
    NotIp,
    NotUdp,
    IpOptions,
    Fragment,
    NotRelayPort,
    Malformed,
    NotRelay,
    NoLink,
    WrongSource,
    NoRoute,
}

impl Reason {
    pub const ALL: [Reason; 12] = [
        Reason::Forwarded,
        Reason::Redirected,
        Reason::NotIp,
        Reason::NotUdp,
        Reason::IpOptions,
        Reason::Fragment,
        Reason::NotRelayPort,
        Reason::Malformed,
        Reason::NotRelay,
        Reason::NoLink,
        Reason::WrongSource,
        Reason::NoRoute,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Forwarded => "forwarded",
            Reason::Redirected => "redirected",
            Reason::NotIp => "not_ip",
            Reason::NotUdp => "not_udp",
            Reason::IpOptions => "ip_options",
            Reason::Fragment => "fragment",
            Reason::NotRelayPort => "not_relay_port",
            Reason::Malformed => "malformed",
            Reason::NotRelay => "not_relay",
            Reason::NoLink => "no_link",
            Reason::WrongSource => "wrong_source",
            Reason::NoRoute => "no_route",
        }
    }

    /// Whether the kernel sent the frame itself (the others went to the stack).
    pub fn sent(self) -> bool {
        matches!(self, Reason::Forwarded | Reason::Redirected)
    }
}

/// What the program does with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// To the stack, untouched.
    Pass(Reason),
    /// Rewritten in place and sent to `to` (XDP_TX in [`L2::Reflect`] mode; with [`L2::Fib`]
    /// the next hop is the kernel's to choose and the frame's MAC addresses are left as they are
    /// here).
    Forward { to: SocketAddr },
}

/// The maps as the twin reads them: the links keyed by (sender, recipient) IDs.
pub type Links = HashMap<([u8; 16], [u8; 16]), Link>;

/// The program's decision on `frame`, and the byte count its counter adds (the UDP payload
/// once the lengths are known, else 0). A forwarded frame is rewritten in place exactly as the
/// program rewrites it.
pub fn decide(listen: &[Endpoint], links: &Links, l2: L2, frame: &mut [u8]) -> (Decision, u64) {
    if frame.len() < ETH {
        return (Decision::Pass(Reason::NotIp), 0);
    }
    let r = match [frame[12], frame[13]] {
        [0x08, 0x00] => v4(listen, links, frame),
        [0x86, 0xdd] => v6(listen, links, frame),
        _ => Err((Reason::NotIp, 0)),
    };
    match r {
        Err((reason, bytes)) => (Decision::Pass(reason), bytes),
        Ok((to, bytes)) => {
            if l2 == L2::Reflect {
                let (dst, src) = frame[..12].split_at_mut(6);
                dst.swap_with_slice(src);
            }
            (Decision::Forward { to }, bytes)
        }
    }
}

type Step = Result<(SocketAddr, u64), (Reason, u64)>;

fn listening(listen: &[Endpoint], ip: IpAddr, port: u16) -> bool {
    listen
        .iter()
        .take(super::layout::MAX_LISTEN)
        .any(|e| e.addr.port() == port && e.addr.is_ipv4() == ip.is_ipv4() && (e.any || e.addr.ip() == ip))
}

/// The RELAY checks of the core: signature, version 0, type 10, and a length field that
/// accounts for every byte. `m` runs to the end of the frame; `ulen` is the UDP payload length.
fn relay_ok(m: &[u8], ulen: usize) -> bool {
    if m.len() < RELAY_HEADER || m[..4] != [0xDA, 0x72, 0, 10] {
        return false;
    }
    ulen == RELAY_HEADER + u16::from_be_bytes([m[36], m[37]]) as usize
}

fn link<'a>(links: &'a Links, m: &[u8]) -> Option<&'a Link> {
    let from: [u8; 16] = m[4..20].try_into().ok()?;
    let to: [u8; 16] = m[20..36].try_into().ok()?;
    links.get(&(from, to))
}

/// What both families check once the UDP payload's length is known: its size, the RELAY, the
/// link, and that the sender is where `from` is bound (`relay_link` and the source check in the
/// program).
fn relay_link<'a>(
    links: &'a Links,
    m: &[u8],
    ulen: usize,
    src: SocketAddr,
) -> Result<&'a Link, (Reason, u64)> {
    let b = ulen as u64;
    if ulen > MAX_DATAGRAM {
        return Err((Reason::Malformed, b));
    }
    if !relay_ok(m, ulen) {
        return Err((Reason::NotRelay, b));
    }
    let l = link(links, m).ok_or((Reason::NoLink, b))?;
    // One family per entry: a frame of the other family is not from `from`.
    if l.from != src || l.to.is_ipv4() != src.is_ipv4() {
        return Err((Reason::WrongSource, b));
    }
    Ok(l)
}

/// (peer → relay) becomes (relay → recipient): the UDP ports, and the checksum for those and for
/// the address change `old_addr → new_addr`. An IPv4 datagram sent without a checksum
/// (`optional`, 0) keeps none.
fn rewrite_udp(f: &mut [u8], udp: usize, old_addr: &[u8], new_addr: &[u8], to_port: u16, optional: bool) {
    let old_port: [u8; 4] = f[udp..udp + 4].try_into().expect("4 bytes");
    let mut new_port = [0u8; 4];
    new_port[..2].copy_from_slice(&old_port[2..]);
    new_port[2..].copy_from_slice(&to_port.to_be_bytes());
    let check = u16::from_ne_bytes([f[udp + 6], f[udp + 7]]);
    if !optional || check != 0 {
        let c = csum_replace(check, old_addr, new_addr);
        let c = csum_replace(c, &old_port, &new_port);
        f[udp + 6..udp + 8].copy_from_slice(&(if c != 0 { c } else { 0xffff }).to_ne_bytes());
    }
    f[udp..udp + 4].copy_from_slice(&new_port);
}

fn v4(listen: &[Endpoint], links: &Links, f: &mut [u8]) -> Step {
    if f.len() < ETH + IPV4 {
        return Err((Reason::Malformed, 0));
    }
    let ip = ETH;
    let vihl = f[ip];
    if vihl != 0x45 {
        return Err((if vihl >> 4 == 4 { Reason::IpOptions } else { Reason::Malformed }, 0));
    }
    if u16::from_be_bytes([f[ip + 6], f[ip + 7]]) & 0x3fff != 0 {
        return Err((Reason::Fragment, 0));
    }
    if f[ip + 9] != 17 {
        return Err((Reason::NotUdp, 0));
    }
    let udp = ip + IPV4;
    if f.len() < udp + UDP {
        return Err((Reason::Malformed, 0));
    }
    let saddr = Ipv4Addr::new(f[ip + 12], f[ip + 13], f[ip + 14], f[ip + 15]);
    let daddr = Ipv4Addr::new(f[ip + 16], f[ip + 17], f[ip + 18], f[ip + 19]);
    let sport = u16::from_be_bytes([f[udp], f[udp + 1]]);
    let dport = u16::from_be_bytes([f[udp + 2], f[udp + 3]]);
    if !listening(listen, daddr.into(), dport) {
        return Err((Reason::NotRelayPort, 0));
    }
    let tot = u16::from_be_bytes([f[ip + 2], f[ip + 3]]) as usize;
    let ulen = u16::from_be_bytes([f[udp + 4], f[udp + 5]]) as usize;
    if tot != IPV4 + ulen || ulen < UDP || ip + tot > f.len() {
        return Err((Reason::Malformed, 0));
    }
    let ulen = ulen - UDP;
    let l = relay_link(links, &f[udp + UDP..], ulen, SocketAddr::new(saddr.into(), sport))?;
    let IpAddr::V4(to_ip) = l.to.ip() else { return Err((Reason::WrongSource, ulen as u64)) };
    let old_addr: [u8; 8] = f[ip + 12..ip + 20].try_into().expect("8 bytes");
    let mut new_addr = [0u8; 8];
    new_addr[..4].copy_from_slice(&daddr.octets());
    new_addr[4..].copy_from_slice(&to_ip.octets());
    rewrite_udp(f, udp, &old_addr, &new_addr, l.to.port(), true);
    f[ip + 12..ip + 20].copy_from_slice(&new_addr);
    f[ip + 8] = 64;
    f[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let c = !fold(sum16(&f[ip..ip + IPV4]));
    f[ip + 10..ip + 12].copy_from_slice(&c.to_ne_bytes());
    Ok((l.to, ulen as u64))
}

fn v6(listen: &[Endpoint], links: &Links, f: &mut [u8]) -> Step {
    if f.len() < ETH + IPV6 {
        return Err((Reason::Malformed, 0));
    }
    let ip = ETH;
    if f[ip] >> 4 != 6 {
        return Err((Reason::Malformed, 0));
    }
    if f[ip + 6] != 17 {
        return Err((Reason::NotUdp, 0));
    }
    let udp = ip + IPV6;
    if f.len() < udp + UDP {
        return Err((Reason::Malformed, 0));
    }
    let octets = |o: usize| -> [u8; 16] { f[o..o + 16].try_into().expect("16 bytes") };
    let (saddr, daddr) = (Ipv6Addr::from(octets(ip + 8)), Ipv6Addr::from(octets(ip + 24)));
    let sport = u16::from_be_bytes([f[udp], f[udp + 1]]);
    let dport = u16::from_be_bytes([f[udp + 2], f[udp + 3]]);
    if !listening(listen, daddr.into(), dport) {
        return Err((Reason::NotRelayPort, 0));
    }
    let plen = u16::from_be_bytes([f[ip + 4], f[ip + 5]]) as usize;
    let ulen = u16::from_be_bytes([f[udp + 4], f[udp + 5]]) as usize;
    if plen != ulen || ulen < UDP || udp + ulen > f.len() {
        return Err((Reason::Malformed, 0));
    }
    let ulen = ulen - UDP;
    let l = relay_link(links, &f[udp + UDP..], ulen, SocketAddr::new(saddr.into(), sport))?;
    let IpAddr::V6(to_ip) = l.to.ip() else { return Err((Reason::WrongSource, ulen as u64)) };
    let old_addr: [u8; 32] = f[ip + 8..ip + 40].try_into().expect("32 bytes");
    let mut new_addr = [0u8; 32];
    new_addr[..16].copy_from_slice(&daddr.octets());
    new_addr[16..].copy_from_slice(&to_ip.octets());
    rewrite_udp(f, udp, &old_addr, &new_addr, l.to.port(), false);
    f[ip + 8..ip + 40].copy_from_slice(&new_addr);
    f[ip + 7] = 64;
    Ok((l.to, ulen as u64))
}

/// The one's-complement sum of 16-bit words as the program loads them (host order; the sum is
/// byte-order independent, RFC 1071).
fn sum16(b: &[u8]) -> u64 {
    b.chunks_exact(2).map(|w| u16::from_ne_bytes([w[0], w[1]]) as u64).sum()
}

fn fold(mut s: u64) -> u16 {
    for _ in 0..3 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// RFC 1624 incremental update, as the program computes it.
fn csum_replace(check: u16, old: &[u8], new: &[u8]) -> u16 {
    let n = (old.len() / 2) as u64;
    let s = (!check) as u64 + sum16(new) + (n * 0xffff - sum16(old));
    !fold(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full UDP checksum verification: the one's-complement sum over pseudo-header and
    /// datagram is 0xffff.
    fn udp_checksum_ok(f: &[u8]) -> bool {
        let v6 = f[12] == 0x86;
        let (ip, udp) = if v6 { (ETH, ETH + IPV6) } else { (ETH, ETH + IPV4) };
        let ulen = u16::from_be_bytes([f[udp + 4], f[udp + 5]]) as usize;
        let mut pseudo = Vec::new();
        if v6 {
            pseudo.extend_from_slice(&f[ip + 8..ip + 40]);
            pseudo.extend_from_slice(&(ulen as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
        } else {
            pseudo.extend_from_slice(&f[ip + 12..ip + 20]);
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&(ulen as u16).to_be_bytes());
        }
        pseudo.extend_from_slice(&f[udp..udp + ulen]);
        if pseudo.len() % 2 == 1 {
            pseudo.push(0);
        }
        fold(sum16(&pseudo)) == 0xffff
    }

    fn full_checksum(f: &mut [u8]) {
        let v6 = f[12] == 0x86;
        let udp = if v6 { ETH + IPV6 } else { ETH + IPV4 };
        f[udp + 6..udp + 8].copy_from_slice(&[0, 0]);
        let mut c = 0u16;
        for _ in 0..=0xffffu32 {
            if udp_checksum_ok(f) {
                return;
            }
            c = c.wrapping_add(1);
            f[udp + 6..udp + 8].copy_from_slice(&c.to_ne_bytes());
        }
        unreachable!("some checksum verifies");
    }

    #[test]
    fn rewritten_checksums_verify() {
        let from: SocketAddr = "10.0.0.2:4000".parse().unwrap();
        let to: SocketAddr = "10.0.0.3:5000".parse().unwrap();
        let relay: SocketAddr = "10.0.0.1:7777".parse().unwrap();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let mut links = Links::new();
        links.insert((a, b), Link::new(from, to).unwrap());
        let listen = Endpoint::for_listen(relay);
        for n in [0usize, 1, 2, 100, 1200] {
            let mut f = crate::xdp::frames::relay_frame(from, relay, &a, &b, &vec![0x5a; n]);
            full_checksum(&mut f);
            let (d, bytes) = decide(&listen, &links, L2::Reflect, &mut f);
            assert_eq!(d, Decision::Forward { to });
            assert_eq!(bytes, 38 + n as u64);
            assert!(udp_checksum_ok(&f), "UDP checksum after rewrite, {n} bytes");
            assert_eq!(fold(sum16(&f[ETH..ETH + IPV4])), 0xffff, "IPv4 header checksum");
            assert_eq!(&f[ETH + 12..ETH + 20], &[10, 0, 0, 1, 10, 0, 0, 3]);
        }
        let from6: SocketAddr = "[fd00::2]:4000".parse().unwrap();
        let to6: SocketAddr = "[fd00::3]:5000".parse().unwrap();
        let relay6: SocketAddr = "[fd00::1]:7777".parse().unwrap();
        links.insert((a, b), Link::new(from6, to6).unwrap());
        let listen = Endpoint::for_listen(relay6);
        let mut f = crate::xdp::frames::relay_frame(from6, relay6, &a, &b, b"hello");
        full_checksum(&mut f);
        assert_eq!(decide(&listen, &links, L2::Reflect, &mut f).0, Decision::Forward { to: to6 });
        assert!(udp_checksum_ok(&f));
    }
}
