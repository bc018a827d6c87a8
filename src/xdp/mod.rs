//! The kernel fast path (`docs/fastpath.md`): `bpf/ferry_xdp.c`, attached to the relay's
//! interface, forwards RELAYs between linked allocations from the NIC driver; everything else
//! reaches the relay as before.
//!
//! Userspace owns the program's maps. The core says which links are established
//! ([`crate::core::LinkOp`]); each shard applies its core's ops through a [`LinkMap`] before it
//! sends anything those ops' datagrams produced, so the kernel only ever holds links the core
//! still has, at the addresses the core has. When the core's timer finds a linked allocation
//! past its deadline, the shard reads the link's counters ([`LinkMap::last_seen_ms_ago`]) so idle
//! timeouts count the traffic only the kernel saw.
//!
//! The program's decision is mirrored by [`twin::decide`], which the tests hold against both the
//! loaded program and the core.

pub mod frames;
pub mod layout;
pub mod sys;
pub mod twin;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::core::LinkOp;
use layout::{Endpoint, Link, LinkCounters, L2};
use sys::RawMap;
use twin::Reason;

/// The compiled program (`bpf/build` makes it from `bpf/ferry_xdp.c`; CI checks they match).
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../bpf/ferry_xdp.o");

/// `xdp = off | generic | native`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// No fast path: every datagram goes through userspace.
    #[default]
    Off,
    /// The kernel's generic XDP hook (any driver; slower than native, for trying it out).
    Generic,
    /// In the driver (the point of the fast path; the driver must support XDP).
    Native,
}

impl std::str::FromStr for XdpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" => Ok(Self::Off),
            "generic" | "skb" => Ok(Self::Generic),
            "native" | "driver" => Ok(Self::Native),
            _ => Err(format!("`{s}` is not one of off, generic, native")),
        }
    }
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XdpMode::Off => "off",
            XdpMode::Generic => "generic",
            XdpMode::Native => "native",
        })
    }
}

/// The index of interface `name`, if there is one.
pub fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The program loaded with its maps, attached or not.
pub struct Program {
    ebpf: aya::Ebpf,
    links: Arc<RawMap>,
    config: RawMap,
    stats: RawMap,
    cpus: usize,
}

impl Program {
    /// Loads the program (not attached) with room for `max_links` directed links, relaying to
    /// the clients of a relay listening on `listen`.
    pub fn load(max_links: u32, listen: &[Endpoint], l2: L2) -> io::Result<Self> {
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries("links", max_links.max(1))
            .load(OBJECT)
            .map_err(|e| io::Error::other(format!("loading bpf/ferry_xdp.o: {e}")))?;
        xdp_program_mut(&mut ebpf, "ferry_xdp")?
            .load()
            .map_err(|e| io::Error::other(format!("the verifier refused ferry_xdp: {e}")))?;
        let map = |name: &str, k: usize, v: usize| -> io::Result<RawMap> {
            let m = ebpf.map(name).ok_or_else(|| io::Error::other(format!("no map {name}")))?;
            let fd = match m {
                aya::maps::Map::HashMap(d) | aya::maps::Map::Array(d) | aya::maps::Map::PerCpuArray(d) => {
                    d.fd().as_fd()
                }
                _ => return Err(io::Error::other(format!("map {name} has an unexpected type"))),
            };
            RawMap::new(fd, k, v)
        };
        let links = Arc::new(map("links", layout::KEY_SIZE, layout::LINK_SIZE)?);
        let config = map("config", 4, layout::CONFIG_SIZE)?;
        let stats = map("stats", 4, layout::COUNTER_SIZE)?;
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| io::Error::other(format!("{what}: {e}")))?;
        let p = Self { ebpf, links, config, stats, cpus };
        p.configure(listen, l2)?;
        Ok(p)
    }

    /// Sets where the relay listens and how next hops are found.
    pub fn configure(&self, listen: &[Endpoint], l2: L2) -> io::Result<()> {
        self.config.update(&0u32.to_ne_bytes(), &layout::config(listen, l2))
    }

    /// The program's file descriptor (for `BPF_PROG_TEST_RUN`).
    pub fn fd(&self) -> io::Result<BorrowedFd<'_>> {
        let prog = xdp_program(&self.ebpf, "ferry_xdp")?;
        Ok(prog.fd().map_err(|e| io::Error::other(e.to_string()))?.as_fd())
    }

    /// The links map itself (tests write entries the core would never make).
    pub fn raw_links(&self) -> &RawMap {
        &self.links
    }

    /// A handle on the links map for a shard.
    pub fn links(&self) -> LinkMap {
        LinkMap { map: self.links.clone(), stats: Arc::new(LinkMapStats::default()) }
    }

    /// Kernel memory the program's maps hold (the links map, preallocated at its maximum, is
    /// nearly all of it).
    pub fn map_bytes(&self) -> io::Result<u64> {
        Ok(self.links.kernel_bytes()? + self.config.kernel_bytes()? + self.stats.kernel_bytes()?)
    }

    /// Packets and bytes per [`Reason`], summed over CPUs.
    pub fn counters(&self) -> io::Result<Vec<(Reason, u64, u64)>> {
        read_counters(&self.stats, self.cpus)
    }

    /// Attaches to `interface` in `mode`.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> io::Result<()> {
        let flags = match mode {
            XdpMode::Off => return Ok(()),
            XdpMode::Generic => aya::programs::XdpMode::Skb,
            XdpMode::Native => aya::programs::XdpMode::Driver,
        };
        let prog = xdp_program_mut(&mut self.ebpf, "ferry_xdp")?;
        prog.attach(interface, flags).map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            io::Error::other(msg)
        })?;
        Ok(())
    }
}

/// Attaches the program that passes everything (`ferry_xdp_pass`) to `interface`: the far end
/// of a veth pair only takes XDP_TX frames from its peer when it has an XDP program of its own.
/// Dropping the returned object detaches it.
pub fn attach_pass(interface: &str, mode: XdpMode) -> io::Result<aya::Ebpf> {
    attach_helper("ferry_xdp_pass", interface, mode)
}

/// Loads every program of the object into the kernel (the verifier's verdict on each), attaching
/// none. Returns their names.
pub fn verify_object() -> io::Result<Vec<String>> {
    let mut ebpf =
        aya::Ebpf::load(OBJECT).map_err(|e| io::Error::other(format!("loading bpf/ferry_xdp.o: {e}")))?;
    let mut names = Vec::new();
    for (name, prog) in ebpf.programs_mut() {
        let xdp: &mut aya::programs::Xdp =
            prog.try_into().map_err(|e| io::Error::other(format!("{name}: {e}")))?;
        xdp.load().map_err(|e| io::Error::other(format!("{name}: {e}")))?;
        names.push(name.to_string());
    }
    names.sort();
    Ok(names)
}

/// The benchmark's sink on `interface`: counts and drops RELAY datagrams, passes the rest.
/// [`sink_counts`] reads what it counted.
pub fn attach_sink(interface: &str) -> io::Result<aya::Ebpf> {
    attach_helper("ferry_xdp_sink", interface, XdpMode::Native)
}

/// The benchmark's generator program (`ferry_xdp_gen`), loaded, not attached: see
/// [`sys::test_run_live`].
pub fn load_generator() -> io::Result<aya::Ebpf> {
    load_one("ferry_xdp_gen")
}

/// Sends `count` copies of `frame` (at least 64 bytes) out of `ifindex` with the loaded generator.
pub fn generate(generator: &aya::Ebpf, frame: &[u8], ifindex: u32, count: u32) -> io::Result<()> {
    const HEADER: usize = 64;
    if frame.len() < HEADER {
        return Err(io::Error::other("the generator's frames are at least 64 bytes"));
    }
    let m = generator.map("gen_header").ok_or_else(|| io::Error::other("no gen_header"))?;
    let aya::maps::Map::Array(d) = m else { return Err(io::Error::other("gen_header type")) };
    RawMap::new(d.fd().as_fd(), 4, HEADER)?.update(&0u32.to_ne_bytes(), &frame[..HEADER])?;
    let fd = xdp_program(generator, "ferry_xdp_gen")?.fd().map_err(|e| io::Error::other(e.to_string()))?;
    sys::test_run_live(fd.as_fd(), frame, ifindex, count, count.min(256))
}

/// RELAY datagrams and their payload bytes the sink has dropped.
pub fn sink_counts(ebpf: &aya::Ebpf) -> io::Result<(u64, u64)> {
    let m = ebpf.map("sink_stats").ok_or_else(|| io::Error::other("no sink_stats"))?;
    let aya::maps::Map::PerCpuArray(d) = m else { return Err(io::Error::other("sink_stats type")) };
    let stats = RawMap::new(d.fd().as_fd(), 4, layout::COUNTER_SIZE)?;
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| io::Error::other(format!("{what}: {e}")))?;
    read_counter(&stats, 0, cpus)
}

/// The object with one program (`name`) loaded into the kernel, not attached.
fn load_one(name: &str) -> io::Result<aya::Ebpf> {
    let mut ebpf =
        aya::Ebpf::load(OBJECT).map_err(|e| io::Error::other(format!("loading bpf/ferry_xdp.o: {e}")))?;
    xdp_program_mut(&mut ebpf, name)?.load().map_err(|e| io::Error::other(format!("{name}: {e}")))?;
    Ok(ebpf)
}

fn xdp_program<'a>(ebpf: &'a aya::Ebpf, name: &str) -> io::Result<&'a aya::programs::Xdp> {
    ebpf.program(name)
        .ok_or_else(|| io::Error::other(format!("no {name}")))?
        .try_into()
        .map_err(|e| io::Error::other(format!("{name}: {e}")))
}

fn xdp_program_mut<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> io::Result<&'a mut aya::programs::Xdp> {
    ebpf.program_mut(name)
        .ok_or_else(|| io::Error::other(format!("no {name}")))?
        .try_into()
        .map_err(|e| io::Error::other(format!("{name}: {e}")))
}

fn attach_helper(name: &str, interface: &str, mode: XdpMode) -> io::Result<aya::Ebpf> {
    let mut ebpf = load_one(name)?;
    let prog = xdp_program_mut(&mut ebpf, name)?;
    let flags = match mode {
        XdpMode::Generic => aya::programs::XdpMode::Skb,
        _ => aya::programs::XdpMode::Driver,
    };
    prog.attach(interface, flags).map_err(|e| io::Error::other(format!("{name} on {interface}: {e}")))?;
    Ok(ebpf)
}

/// The fast path of a running relay: the attached program (detached when this is dropped).
pub struct FastPath {
    pub program: Program,
    pub interface: String,
    pub mode: XdpMode,
    links: LinkMap,
    /// Map entries (two per linked pair).
    max_entries: u32,
    /// Kernel memory of the maps (0 where the kernel does not say).
    pub map_bytes: u64,
}

impl FastPath {
    /// Loads and attaches. On error the relay carries on in userspace (the caller logs why).
    pub fn start(interface: &str, mode: XdpMode, listen: SocketAddr, max_links: u32) -> io::Result<Self> {
        let mut program = Program::load(max_links, &Endpoint::for_listen(listen), L2::Fib)?;
        program.attach(interface, mode)?;
        for fam in ["ipv4", "ipv6"] {
            let key = format!("net.{fam}.conf.{interface}.forwarding");
            let path = format!("/proc/sys/net/{fam}/conf/{interface}/forwarding");
            if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "0") {
                tracing::warn!(
                    sysctl = %key,
                    "the kernel looks up next hops for the fast path only on an interface with forwarding \
                     on; {fam} RELAYs stay in userspace until `sysctl -w {key}=1`"
                );
            }
        }
        let links = program.links();
        let map_bytes = program.map_bytes().unwrap_or(0);
        Ok(Self { program, interface: interface.to_string(), mode, links, max_entries: max_links, map_bytes })
    }
}

/// Counters of a shard's map updates.
#[derive(Debug, Default)]
pub struct LinkMapStats {
    pub ups: AtomicU64,
    pub downs: AtomicU64,
    /// Links whose two entries a Down removed (so `ups - removed` are in the map now; a Down
    /// for a link whose Up the kernel refused removes nothing).
    pub removed: AtomicU64,
    /// Links the kernel cannot carry (the two ends in different address families).
    pub mixed_family: AtomicU64,
    /// Updates the kernel refused (the map is full); those links stay in userspace.
    pub errors: AtomicU64,
    /// Links with a DTLS or WebSocket client at one end (the kernel forwards plain UDP only).
    pub not_plain_udp: AtomicU64,
}

/// A shard's handle on the links map.
#[derive(Clone, Debug)]
pub struct LinkMap {
    map: Arc<RawMap>,
    pub stats: Arc<LinkMapStats>,
}

impl LinkMap {
    /// Applies one op of the core: two entries (one per direction) up or down. For a link
    /// going down, returns what its counters held first: each direction's sender and how many
    /// milliseconds ago the kernel last forwarded for it, so the core still counts that traffic.
    pub fn apply(&self, op: &LinkOp) -> [Option<(crate::wire::AllocationId, u64)>; 2] {
        match *op {
            LinkOp::Up { host, host_addr, joiner, joiner_addr } => {
                let (Some(hj), Some(jh)) =
                    (Link::new(host_addr, joiner_addr), Link::new(joiner_addr, host_addr))
                else {
                    self.stats.mixed_family.fetch_add(1, Ordering::Relaxed);
                    return [None, None];
                };
                let a = self.map.update(&layout::link_key(&host, &joiner), &hj.encode());
                let b = self.map.update(&layout::link_key(&joiner, &host), &jh.encode());
                if a.is_err() || b.is_err() {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    // Half a link is no use; the pair stays in userspace.
                    let _ = self.map.delete(&layout::link_key(&host, &joiner));
                    let _ = self.map.delete(&layout::link_key(&joiner, &host));
                    return [None, None];
                }
                self.stats.ups.fetch_add(1, Ordering::Relaxed);
                [None, None]
            }
            LinkOp::Down { host, joiner } => {
                let mut seen = [None, None];
                let mut deleted = 0;
                for (k, (f, t)) in [(host, joiner), (joiner, host)].into_iter().enumerate() {
                    seen[k] = self.last_seen_ms_ago(&f, &t).map(|ago| (f, ago));
                    match self.map.delete(&layout::link_key(&f, &t)) {
                        Ok(true) => deleted += 1,
                        // Never entered (its Up was refused): nothing to remove.
                        Ok(false) => {}
                        Err(_) => {
                            self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                self.stats.downs.fetch_add(1, Ordering::Relaxed);
                if deleted == 2 {
                    self.stats.removed.fetch_add(1, Ordering::Relaxed);
                }
                seen
            }
        }
    }

    /// The counters of the (from, to) entry, if it is in the map.
    pub fn counters(
        &self,
        from: &crate::wire::AllocationId,
        to: &crate::wire::AllocationId,
    ) -> Option<LinkCounters> {
        let mut v = [0u8; layout::LINK_SIZE];
        match self.map.lookup(&layout::link_key(from, to), &mut v) {
            Ok(true) => Some(LinkCounters::decode(&v)),
            _ => None,
        }
    }

    /// How long ago the kernel last forwarded a RELAY for (from, to), in milliseconds; None if
    /// it never did (or the entry is gone).
    pub fn last_seen_ms_ago(
        &self,
        from: &crate::wire::AllocationId,
        to: &crate::wire::AllocationId,
    ) -> Option<u64> {
        let c = self.counters(from, to)?;
        (c.packets > 0).then(|| sys::monotonic_ns().saturating_sub(c.last_ns) / 1_000_000)
    }
}

/// What `/metrics` reads of the fast path: the program's per-CPU counters and the shards' map
/// updates.
pub struct Observer {
    stats: RawMap,
    cpus: usize,
    links: Arc<LinkMapStats>,
    max_entries: u32,
    map_bytes: u64,
    pub mode: XdpMode,
    pub interface: String,
}

impl FastPath {
    /// The shards' handle on the links map (one for all: updates are system calls on a map the
    /// kernel synchronises).
    pub fn links(&self) -> LinkMap {
        self.links.clone()
    }

    pub fn observer(&self) -> io::Result<Observer> {
        Ok(Observer {
            stats: RawMap::new(self.program.stats.fd_borrowed(), 4, layout::COUNTER_SIZE)?,
            cpus: self.program.cpus,
            links: self.links.stats.clone(),
            max_entries: self.max_entries,
            map_bytes: self.map_bytes,
            mode: self.mode,
            interface: self.interface.clone(),
        })
    }
}

impl Observer {
    /// Appends the `ferry_xdp_*` families.
    pub fn render(&self, o: &mut String) {
        use std::fmt::Write;
        let counters = read_counters(&self.stats, self.cpus).unwrap_or_default();
        let _ = writeln!(o, "# HELP ferry_xdp_info The kernel fast path: its mode and interface.");
        let _ = writeln!(o, "# TYPE ferry_xdp_info gauge");
        let _ = writeln!(o, "ferry_xdp_info{{mode=\"{}\",interface=\"{}\"}} 1", self.mode, self.interface);
        for (name, help, pick) in [
            ("ferry_xdp_packets_total", "Datagrams the fast path saw, by what it did (forwarded, redirected, or why it passed one to the stack).", 0),
            ("ferry_xdp_bytes_total", "UDP payload bytes of those datagrams (0 where the lengths were not yet known).", 1),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for (r, p, b) in &counters {
                let v = if pick == 0 { p } else { b };
                let _ = writeln!(o, "{name}{{result=\"{}\"}} {v}", r.as_str());
            }
        }
        let s = &self.links;
        let _ =
            writeln!(o, "# HELP ferry_xdp_link_updates_total Changes to the fast path's links map, by kind.");
        let _ = writeln!(o, "# TYPE ferry_xdp_link_updates_total counter");
        for (k, a) in [
            ("up", &s.ups),
            ("down", &s.downs),
            ("refused", &s.errors),
            ("mixed_family", &s.mixed_family),
            ("not_plain_udp", &s.not_plain_udp),
        ] {
            let _ = writeln!(o, "ferry_xdp_link_updates_total{{kind=\"{k}\"}} {}", a.load(Ordering::Relaxed));
        }
        let now = s.ups.load(Ordering::Relaxed).saturating_sub(s.removed.load(Ordering::Relaxed));
        let _ = writeln!(
            o,
            "# HELP ferry_xdp_links Host-joiner links the kernel carries now (two map entries each).\n\
             # TYPE ferry_xdp_links gauge\nferry_xdp_links {now}"
        );
        let _ = writeln!(
            o,
            "# HELP ferry_xdp_links_max Links the map holds at most (xdp_max_links); more stay in userspace.\n\
             # TYPE ferry_xdp_links_max gauge\nferry_xdp_links_max {}",
            self.max_entries / 2
        );
        let _ = writeln!(
            o,
            "# HELP ferry_xdp_map_bytes Kernel memory the fast path's maps hold (the links map is preallocated at xdp_max_links).\n\
             # TYPE ferry_xdp_map_bytes gauge\nferry_xdp_map_bytes {}",
            self.map_bytes
        );
    }
}

fn read_counters(stats: &RawMap, cpus: usize) -> io::Result<Vec<(Reason, u64, u64)>> {
    Reason::ALL.iter().map(|&r| read_counter(stats, r as u32, cpus).map(|(p, b)| (r, p, b))).collect()
}

/// One entry of a per-CPU array of `struct counter`, summed over CPUs.
fn read_counter(stats: &RawMap, index: u32, cpus: usize) -> io::Result<(u64, u64)> {
    let mut buf = vec![0u8; layout::COUNTER_SIZE * cpus];
    stats.lookup(&index.to_ne_bytes(), &mut buf)?;
    Ok(buf.chunks_exact(layout::COUNTER_SIZE).fold((0, 0), |(p, b), c| {
        (
            p + u64::from_ne_bytes(c[..8].try_into().expect("8 bytes")),
            b + u64::from_ne_bytes(c[8..].try_into().expect("8 bytes")),
        )
    }))
}
