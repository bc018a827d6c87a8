//! Which source addresses may bind an allocation (and so ever receive relayed traffic).
//!
//! Addresses are first canonicalised: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
//! (`::a.b.c.d`), 6to4 (`2002:AABB:CCDD::/16`) and NAT64 (`64:ff9b::/96`) forms are judged as the
//! IPv4 address they carry, so no encoding slips past a rule. Always refused: port 0, unspecified,
//! broadcast, multicast, the reserved 240/4 block, and the relay's own socket addresses (nothing is
//! ever relayed to the relay itself). Loopback and private ranges stay allowed: LAN deployments,
//! development and tests use them. Operators add CIDRs to deny.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// An IPv4 or IPv6 prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// A prefix; an IPv6 prefix of an embedding form (e.g. `::ffff:10.0.0.0/104`) becomes the
    /// IPv4 prefix it covers.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return None;
        }
        match (addr, canonical_ip(addr)) {
            (IpAddr::V6(_), v4 @ IpAddr::V4(_)) if len >= 96 => Some(Self { addr: v4, len: len - 96 }),
            (IpAddr::V6(_), IpAddr::V4(_)) => Some(Self { addr, len }),
            (_, canon) => Some(Self { addr: canon, len }),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.len == 0 { 0 } else { u32::MAX << (32 - self.len) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.len == 0 { 0 } else { u128::MAX << (128 - self.len) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    /// `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a /32 or /128).
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s.split_once('/').map_or((s, None), |(a, l)| (a, Some(l)));
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("`{s}` is not an address or CIDR"))?;
        let len = match l {
            Some(l) => l.trim().parse().map_err(|_| format!("`{s}` has a bad prefix length"))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Cidr::new(addr, len).ok_or_else(|| format!("`{s}` has a prefix longer than the address"))
    }
}

/// The IPv4 address an IPv6 address carries, if it is one of the embedding forms.
fn embedded_v4(v6: &Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let o = v6.octets();
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    // IPv4-compatible ::a.b.c.d (deprecated, but still routable on some stacks); not :: or ::1.
    if s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1) {
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    // 6to4: 2002:AABB:CCDD::/16.
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    // NAT64 well-known prefix 64:ff9b::/96.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    None
}

/// The address a rule judges: IPv4 for every IPv6 form that embeds one.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(&v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Source-address policy of one relay.
#[derive(Clone, Debug, Default)]
pub struct AddressPolicy {
    /// The relay's own socket addresses (canonical).
    own: Vec<SocketAddr>,
    /// Extra prefixes the operator denies.
    deny: Vec<Cidr>,
}

impl AddressPolicy {
    pub fn new(own: &[SocketAddr], deny: Vec<Cidr>) -> Self {
        let own = own.iter().map(|a| SocketAddr::new(canonical_ip(a.ip()), a.port())).collect();
        Self { own, deny }
    }

    /// Whether `src` may be answered and bound.
    #[inline]
    pub fn allows(&self, src: &SocketAddr) -> bool {
        if src.port() == 0 {
            return false;
        }
        let ip = canonical_ip(src.ip());
        let fixed_ok = match ip {
            IpAddr::V4(v4) => {
                !(v4.is_unspecified()
                    || v4.is_broadcast()
                    || v4.is_multicast()
                    || v4.octets()[0] >= 240
                    || v4.octets()[0] == 0)
            }
            IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
        };
        fixed_ok
            && !self.own.iter().any(|o| o.port() == src.port() && o.ip() == ip)
            && !self.deny.iter().any(|c| c.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_encoding_of_a_denied_address_is_denied() {
        let relay = sa("203.0.113.7:7777");
        let p = AddressPolicy::new(&[relay, sa("127.0.0.1:7777")], vec!["198.51.100.0/24".parse().unwrap()]);
        for bad in [
            "0.0.0.0:5000",
            "0.1.2.3:5000",
            "255.255.255.255:5000",
            "224.0.0.1:5000",
            "239.1.2.3:5000",
            "240.0.0.1:5000",
            "[::]:5000",
            "[ff02::1]:5000",
            "[::ffff:224.0.0.1]:5000",
            "[::ffff:255.255.255.255]:5000",
            "[2002:e000:0001::1]:5000", // 6to4 of 224.0.0.1
            "[64:ff9b::e000:1]:5000",   // NAT64 of 224.0.0.1
            "[::ffff:0.0.0.0]:5000",
            "127.0.0.1:0",
            "203.0.113.7:7777",          // the relay itself
            "[::ffff:203.0.113.7]:7777", // … mapped
            "[2002:cb00:7107::1]:7777",  // … 6to4
            "[64:ff9b::cb00:7107]:7777", // … NAT64
            "[::cb00:7107]:7777",        // … IPv4-compatible
            "127.0.0.1:7777",
            "[::ffff:127.0.0.1]:7777",
            "198.51.100.9:4000", // operator deny list
            "[::ffff:198.51.100.9]:4000",
            "[2002:c633:6409::]:4000",
            "[64:ff9b::c633:6409]:4000",
        ] {
            assert!(!p.allows(&sa(bad)), "{bad} must be denied");
        }
        for good in [
            "127.0.0.1:40000",
            "[::1]:40000",
            "10.1.2.3:5000",
            "192.168.1.10:5000",
            "203.0.113.7:7778",
            "[2001:db8::1]:5000",
            "[::ffff:10.0.0.1]:5000",
            "8.8.8.8:53",
        ] {
            assert!(p.allows(&sa(good)), "{good} must be allowed");
        }
    }

    #[test]
    fn cidr_parsing() {
        assert!("10.0.0.0/8".parse::<Cidr>().unwrap().contains("10.200.0.1".parse().unwrap()));
        assert!("2001:db8::/32".parse::<Cidr>().unwrap().contains("2001:db8:1::1".parse().unwrap()));
        assert!("::ffff:10.0.0.0/104".parse::<Cidr>().is_ok());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        assert!("1.2.3.4".parse::<Cidr>().unwrap().contains("1.2.3.4".parse().unwrap()));
    }
}
