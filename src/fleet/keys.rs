//! The fleet key file: the secret API instances and relays share (never stored in the directory).
//!
//! ```text
//! # KID BASE64-KEY — the first line mints; every line is accepted (rotation overlap)
//! 2 8Jq0…=
//! 1 Yf3k…=
//! ```
//!
//! Rotation: add the new key as a second line everywhere (relays first: `SIGHUP` reloads it),
//! move it to the first line on the API instances, and remove the old line once the longest
//! session minted under it has ended.

use base64::Engine as _;

/// The keys of a fleet, the minting one first.
#[derive(Clone, PartialEq, Eq)]
pub struct FleetKeys {
    pub keys: Vec<(u8, Vec<u8>)>,
}

impl std::fmt::Debug for FleetKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FleetKeys(kids {:?})", self.keys.iter().map(|k| k.0).collect::<Vec<_>>())
    }
}

impl FleetKeys {
    /// Parses the file's text; errors say which line is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys: Vec<(u8, Vec<u8>)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (kid, key) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| format!("line {}: expected `KID BASE64-KEY`", n + 1))?;
            let kid: u8 =
                kid.parse().map_err(|_| format!("line {}: key ID `{kid}` is not a number 0-255", n + 1))?;
            let key = base64::engine::general_purpose::STANDARD
                .decode(key.trim())
                .map_err(|e| format!("line {}: key is not base64: {e}", n + 1))?;
            if key.len() < 32 {
                return Err(format!("line {}: key has {} bytes; at least 32 are needed", n + 1, key.len()));
            }
            if keys.iter().any(|k| k.0 == kid) {
                return Err(format!("line {}: key ID {kid} appears twice", n + 1));
            }
            keys.push((kid, key));
        }
        if keys.is_empty() {
            return Err("no key in the file (lines are `KID BASE64-KEY`)".into());
        }
        Ok(Self { keys })
    }

    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text)
    }

    /// The key new allocations are minted under.
    pub fn current(&self) -> (u8, &[u8]) {
        (self.keys[0].0, &self.keys[0].1)
    }

    pub fn get(&self, kid: u8) -> Option<&[u8]> {
        self.keys.iter().find(|k| k.0 == kid).map(|k| k.1.as_slice())
    }

    /// A fresh key line (`ferry fleet keygen`).
    pub fn generate_line(kid: u8) -> Result<String, String> {
        let mut k = [0u8; 32];
        getrandom::getrandom(&mut k).map_err(|e| e.to_string())?;
        Ok(format!("{kid} {}", base64::engine::general_purpose::STANDARD.encode(k)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let a = FleetKeys::generate_line(2).unwrap();
        let b = FleetKeys::generate_line(1).unwrap();
        let k = FleetKeys::parse(&format!("# comment\n{a}\n\n{b}\n")).unwrap();
        assert_eq!(k.current().0, 2);
        assert!(k.get(1).is_some() && k.get(3).is_none());
        assert!(FleetKeys::parse("").unwrap_err().contains("no key"));
        assert!(FleetKeys::parse("300 AAAA").unwrap_err().contains("0-255"));
        assert!(FleetKeys::parse("1 AAAA").unwrap_err().contains("at least 32"));
        assert!(FleetKeys::parse(&format!("{a}\n{a}")).unwrap_err().contains("twice"));
    }
}
