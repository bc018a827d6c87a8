//! Builds and attaches the reuseport steering program whose source is `bpf/steer.bpf`.
//!
//! The assembler understands exactly what that program needs: `ld #len`, `ld [k]`, `ldb [k]`,
//! `jeq`/`jge`/`jgt`/`jlt #k, label[, label]`, `jne #k, label`, `ja label`, `mod #k`, `ret a`, `ret #k`, labels and
//! `;` comments, with the symbol `SHARDS`.

use std::io;
use std::os::fd::AsRawFd;

/// The program's source.
pub const SOURCE: &str = include_str!("../../bpf/steer.bpf");

/// One classic-BPF instruction (`struct sock_filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

const BPF_LD: u16 = 0x00;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_B: u16 = 0x10;
const BPF_ABS: u16 = 0x20;
const BPF_LEN: u16 = 0x80;
const BPF_K: u16 = 0x00;
const BPF_A: u16 = 0x10;
const BPF_JA: u16 = 0x00;
const BPF_JEQ: u16 = 0x10;
const BPF_JGT: u16 = 0x20;
const BPF_JGE: u16 = 0x30;
const BPF_MOD: u16 = 0x90;

fn num(s: &str, shards: u32) -> Result<u32, String> {
    let s = s.trim().trim_start_matches('#');
    if s == "SHARDS" {
        return Ok(shards);
    }
    match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("bad number `{s}`"))
}

fn mem(s: &str) -> Result<u32, String> {
    s.trim()
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .ok_or_else(|| format!("expected [offset], got `{s}`"))?
        .trim()
        .parse()
        .map_err(|_| format!("bad offset `{s}`"))
}

/// Assembles `src` for `shards` shards.
pub fn assemble(src: &str, shards: u32) -> Result<Vec<Insn>, String> {
    // Pass 1: strip comments, collect labels and instruction lines.
    let mut labels = std::collections::HashMap::new();
    let mut lines: Vec<(usize, String)> = Vec::new();
    for (n, raw) in src.lines().enumerate() {
        let mut line = raw.split(';').next().unwrap_or("").trim().to_string();
        if let Some((label, rest)) = line.split_once(':') {
            labels.insert(label.trim().to_string(), lines.len());
            line = rest.trim().to_string();
        }
        if !line.is_empty() {
            lines.push((n + 1, line));
        }
    }
    // Pass 2: encode, resolving labels to forward offsets.
    let target = |label: &str, at: usize, line: usize| -> Result<u32, String> {
        let t = *labels.get(label.trim()).ok_or_else(|| format!("line {line}: unknown label `{label}`"))?;
        if t <= at {
            return Err(format!("line {line}: jumps must go forward"));
        }
        Ok((t - at - 1) as u32)
    };
    let mut out = Vec::with_capacity(lines.len());
    for (at, (line, text)) in lines.iter().enumerate() {
        let (op, args) =
            text.split_once(char::is_whitespace).map_or((text.as_str(), ""), |(o, a)| (o, a.trim()));
        let args: Vec<&str> = args.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
        let e = |m: String| format!("line {line}: {m}");
        let insn = match (op, args.as_slice()) {
            ("ld", ["#len"]) => Insn { code: BPF_LD | BPF_W | BPF_LEN, jt: 0, jf: 0, k: 0 },
            ("ld", [m]) => Insn { code: BPF_LD | BPF_W | BPF_ABS, jt: 0, jf: 0, k: mem(m).map_err(e)? },
            ("ldb", [m]) => Insn { code: BPF_LD | BPF_B | BPF_ABS, jt: 0, jf: 0, k: mem(m).map_err(e)? },
            ("ja", [l]) => Insn { code: BPF_JMP | BPF_JA, jt: 0, jf: 0, k: target(l, at, *line)? },
            ("mod", [k]) => {
                Insn { code: BPF_ALU | BPF_MOD | BPF_K, jt: 0, jf: 0, k: num(k, shards).map_err(e)? }
            }
            ("ret", ["a"]) => Insn { code: BPF_RET | BPF_A, jt: 0, jf: 0, k: 0 },
            ("ret", [k]) => Insn { code: BPF_RET | BPF_K, jt: 0, jf: 0, k: num(k, shards).map_err(e)? },
            ("jne", [k, t]) => {
                let no = target(t, at, *line)?;
                if no > 255 {
                    return Err(format!("line {line}: jump too far"));
                }
                Insn { code: BPF_JMP | BPF_JEQ | BPF_K, jt: 0, jf: no as u8, k: num(k, shards).map_err(e)? }
            }
            (j @ ("jeq" | "jge" | "jgt" | "jlt"), [k, t, rest @ ..]) => {
                let k = num(k, shards).map_err(e)?;
                let yes = target(t, at, *line)?;
                let no = match rest {
                    [f] => target(f, at, *line)?,
                    [] => 0,
                    _ => return Err(format!("line {line}: too many operands")),
                };
                let (code, jt, jf) = match j {
                    "jeq" => (BPF_JEQ, yes, no),
                    "jge" => (BPF_JGE, yes, no),
                    "jgt" => (BPF_JGT, yes, no),
                    _ => (BPF_JGE, no, yes), // jlt k: jump when not (A >= k)
                };
                if jt > 255 || jf > 255 {
                    return Err(format!("line {line}: jump too far"));
                }
                Insn { code: BPF_JMP | code | BPF_K, jt: jt as u8, jf: jf as u8, k }
            }
            _ => return Err(format!("line {line}: cannot assemble `{text}`")),
        };
        out.push(insn);
    }
    Ok(out)
}

/// The steering program for `shards` shards.
pub fn program(shards: u32) -> Vec<Insn> {
    match assemble(SOURCE, shards) {
        Ok(p) => p,
        Err(e) => unreachable!("bpf/steer.bpf does not assemble: {e}"),
    }
}

/// `{ code, jt, jf, k }` lines, as `bpf_asm -c` prints them.
pub fn listing(p: &[Insn]) -> String {
    p.iter().map(|i| format!("{{ {:#06x}, {:>2}, {:>2}, {:#010x} }},\n", i.code, i.jt, i.jf, i.k)).collect()
}

/// Attaches the program for `shards` to the reuseport group `sock` belongs to.
pub fn attach(sock: &impl AsRawFd, shards: u32) -> io::Result<()> {
    let mut filter: Vec<libc::sock_filter> = program(shards)
        .iter()
        .map(|i| libc::sock_filter { code: i.code, jt: i.jt, jf: i.jf, k: i.k })
        .collect();
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_mut_ptr() };
    // SAFETY: `prog` points at `filter`, which outlives the call; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_committed_snapshot() {
        let snapshot = include_str!("../../bpf/steer.snapshot");
        assert_eq!(listing(&program(4)), snapshot, "bpf/steer.bpf changed: update bpf/steer.snapshot");
    }

    #[test]
    fn assembler_rejects_nonsense() {
        assert!(assemble("ld [x]", 1).is_err());
        assert!(assemble("ja nowhere", 1).is_err());
        assert!(assemble("back: ret a\nja back", 1).is_err());
        assert!(assemble("frob #1", 1).is_err());
    }

    /// Interprets the program the way the kernel does, for the cases the kernel test cannot reach.
    fn run(p: &[Insn], pkt: &[u8]) -> u32 {
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = p[pc];
            pc += 1;
            match i.code {
                0x80 => a = pkt.len() as u32,
                0x20 => match pkt.get(i.k as usize..i.k as usize + 4) {
                    Some(w) => a = u32::from_be_bytes([w[0], w[1], w[2], w[3]]),
                    None => return 0,
                },
                0x30 => match pkt.get(i.k as usize) {
                    Some(&b) => a = b as u32,
                    None => return 0,
                },
                0x05 => pc += i.k as usize,
                0x15 => pc += if a == i.k { i.jt } else { i.jf } as usize,
                0x35 => pc += if a >= i.k { i.jt } else { i.jf } as usize,
                0x94 => a %= i.k,
                0x16 => return a,
                0x06 => return i.k,
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn steers_by_owner_id() {
        let p = program(3);
        let mut relay = vec![0xDA, 0x72, 0, 10];
        relay.extend_from_slice(&7u32.to_be_bytes());
        relay.extend_from_slice(&[0; 30]);
        assert_eq!(run(&p, &relay), 1);
        let mut bind = vec![0xDA, 0x72, 0, 0, 0, 0, 0, 255];
        bind.extend_from_slice(&11u32.to_be_bytes());
        bind.extend_from_slice(&[0; 40]);
        assert_eq!(run(&p, &bind), 2);
        let mut ping = vec![0xDA, 0x72, 0, 2];
        ping.extend_from_slice(&5u32.to_be_bytes());
        ping.extend_from_slice(&[0; 14]);
        assert_eq!(run(&p, &ping), 2, "a 22-byte PING is steered");
        assert_eq!(run(&p, &[0xDA, 0x72, 0, 2]), u32::MAX, "too short for an ID: the kernel's hash");
        assert_eq!(run(&p, &[0xDA, 0x72, 0, 0, 0, 0, 0, 0, 1]), u32::MAX, "a BIND too short for its ID");
    }

    #[test]
    fn only_unity_datagrams_are_steered() {
        let p = program(4);
        // A STUN request with attributes carries the cookie where a Unity message has its ID:
        // it must go to the kernel's hash, not all to shard 0x2112A442 % 4.
        let mut stun = vec![0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xA4, 0x42];
        stun.extend_from_slice(&[9; 20]);
        assert_eq!(run(&p, &stun), u32::MAX);
        let mut bare = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
        bare.extend_from_slice(&[9; 12]);
        assert_eq!(run(&p, &bare), u32::MAX, "a zero-length STUN request is not a BIND");
        let mut wrong = vec![0xDA, 0x73, 0, 10];
        wrong.extend_from_slice(&[0; 34]);
        assert_eq!(run(&p, &wrong), u32::MAX);
        assert_eq!(crate::shard::datagram_owner(&stun, 4), None);
        assert_eq!(crate::shard::datagram_owner(&wrong, 4), None);
    }
}
