//! Ethernet frames carrying UDP, built the way a NIC would deliver them (for the twin's tests
//! and `BPF_PROG_TEST_RUN`).

use std::net::{IpAddr, SocketAddr};

/// MAC addresses the frames carry (any unicast pair will do).
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

fn sum(b: &[u8]) -> u32 {
    b.chunks(2).map(|w| u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32).sum()
}

fn finish(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// A frame from `src` to `dst` (one family) with `payload` as the UDP payload and correct
/// checksums.
pub fn udp_frame(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let ulen = 8 + payload.len();
    let mut udp = Vec::with_capacity(ulen);
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&(ulen as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut f = Vec::with_capacity(14 + 40 + ulen);
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&[0x08, 0x00]);
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + ulen) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 63;
            ip[9] = 17;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = finish(sum(&ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&ip[12..20]);
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&(ulen as u16).to_be_bytes());
            let c = finish(sum(&pseudo) + sum(&udp));
            udp[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&[0x86, 0xdd]);
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(ulen as u16).to_be_bytes());
            ip[6] = 17;
            ip[7] = 63;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&ip[8..40]);
            pseudo.extend_from_slice(&(ulen as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
            let c = finish(sum(&pseudo) + sum(&udp));
            udp[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
            f.extend_from_slice(&ip);
        }
        _ => panic!("udp_frame: {src} and {dst} are of different families"),
    }
    f.extend_from_slice(&udp);
    f
}

/// A RELAY message from allocation `from` to `to`.
pub fn relay(from: &[u8; 16], to: &[u8; 16], payload: &[u8]) -> Vec<u8> {
    let mut m = vec![0xDA, 0x72, 0, 10];
    m.extend_from_slice(from);
    m.extend_from_slice(to);
    m.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// A frame carrying a RELAY from allocation `from` to `to`, sent by `src` to the relay at `dst`.
pub fn relay_frame(
    src: SocketAddr,
    dst: SocketAddr,
    from: &[u8; 16],
    to: &[u8; 16],
    payload: &[u8],
) -> Vec<u8> {
    udp_frame(src, dst, &relay(from, to, payload))
}
