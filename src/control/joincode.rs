//! Join codes: Unity's alphabet, case-insensitive, drawn from the OS CSPRNG.

use std::collections::HashMap;

use super::jwt::Tenant;

use crate::wire::AllocationId;

/// Unity's join-code alphabet (no vowels, no look-alikes).
pub const ALPHABET: &[u8; 20] = b"6789BCDFGHJKLMNPQRTW";

/// Normalises user input (upper case, trimmed) and checks length and alphabet.
pub fn normalize(code: &str) -> Option<String> {
    let c = code.trim().to_ascii_uppercase();
    ((6..=12).contains(&c.len()) && c.bytes().all(|b| ALPHABET.contains(&b))).then_some(c)
}

/// A fresh code of `len` characters, unbiased (rejection sampling over random bytes).
pub fn generate(len: usize) -> Result<String, getrandom::Error> {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 32];
    while out.len() < len {
        getrandom::getrandom(&mut buf)?;
        for &b in &buf {
            // 240 = 12 × 20: bytes above it would favour the first letters.
            if b < 240 && out.len() < len {
                out.push(ALPHABET[(b % 20) as usize] as char);
            }
        }
    }
    Ok(out)
}

/// Live host allocations and their join codes, both ways.
#[derive(Debug)]
struct HostEntry {
    code: Option<String>,
    /// The host's connection data, base64, for `hostConnectionData` in join answers.
    connection_data: String,
    /// The game and environment it belongs to: its code is unknown to every other tenant.
    tenant: Tenant,
}

#[derive(Default, Debug)]
pub struct JoinCodes {
    by_code: HashMap<String, AllocationId>,
    by_host: HashMap<AllocationId, HostEntry>,
    /// Live hosts per tenant.
    per_tenant: HashMap<Tenant, u32>,
}

impl JoinCodes {
    pub fn add_host(&mut self, id: AllocationId, connection_data: String, tenant: Tenant) {
        *self.per_tenant.entry(tenant.clone()).or_insert(0) += 1;
        self.by_host.insert(id, HostEntry { code: None, connection_data, tenant });
    }

    /// The tenant a live host belongs to.
    pub fn tenant_of(&self, id: &AllocationId) -> Option<&Tenant> {
        self.by_host.get(id).map(|h| &h.tenant)
    }

    /// Live hosts of `tenant`.
    pub fn hosts_of(&self, tenant: &Tenant) -> u32 {
        self.per_tenant.get(tenant).copied().unwrap_or(0)
    }

    /// Live hosts by tenant.
    pub fn tenants(&self) -> impl Iterator<Item = (&Tenant, u32)> {
        self.per_tenant.iter().map(|(t, n)| (t, *n))
    }

    pub fn host_connection_data(&self, id: &AllocationId) -> Option<&str> {
        self.by_host.get(id).map(|h| h.connection_data.as_str())
    }

    pub fn is_host(&self, id: &AllocationId) -> bool {
        self.by_host.contains_key(id)
    }

    pub fn hosts(&self) -> usize {
        self.by_host.len()
    }

    /// The host's code, creating one if needed: `(code, created)`. `None` if not a live host.
    pub fn code_for(
        &mut self,
        id: &AllocationId,
        len: usize,
    ) -> Option<Result<(String, bool), getrandom::Error>> {
        if let Some(c) = &self.by_host.get(id)?.code {
            return Some(Ok((c.clone(), false)));
        }
        loop {
            let code = match generate(len) {
                Ok(c) => c,
                Err(e) => return Some(Err(e)),
            };
            if !self.by_code.contains_key(&code) {
                self.by_code.insert(code.clone(), *id);
                if let Some(h) = self.by_host.get_mut(id) {
                    h.code = Some(code.clone());
                }
                return Some(Ok((code, true)));
            }
        }
    }

    pub fn resolve(&self, normalized: &str) -> Option<AllocationId> {
        self.by_code.get(normalized).copied()
    }

    /// Forgets a host and its code (it closed or timed out).
    pub fn remove_host(&mut self, id: &AllocationId) {
        let Some(h) = self.by_host.remove(id) else { return };
        if let Some(code) = h.code {
            self.by_code.remove(&code);
        }
        if let Some(n) = self.per_tenant.get_mut(&h.tenant) {
            *n -= 1;
            if *n == 0 {
                self.per_tenant.remove(&h.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_use_the_alphabet_and_normalise() {
        for len in 6..=12 {
            let c = generate(len).unwrap();
            assert_eq!(c.len(), len);
            assert_eq!(normalize(&c.to_lowercase()), Some(c.clone()));
        }
        assert_eq!(normalize(" 6789bc "), Some("6789BC".into()));
        assert_eq!(normalize("6789A0"), None, "vowels and zero are not in the alphabet");
        assert_eq!(normalize("6789B"), None);
        assert_eq!(normalize("6789BCDFGHJKL"), None);
    }

    #[test]
    fn one_code_per_host_gone_with_it() {
        let mut j = JoinCodes::default();
        let id = AllocationId([1; 16]);
        assert!(j.code_for(&id, 8).is_none());
        j.add_host(id, "cd".into(), Default::default());
        let (c, created) = j.code_for(&id, 8).unwrap().unwrap();
        assert!(created);
        assert_eq!(j.code_for(&id, 8).unwrap().unwrap(), (c.clone(), false));
        assert_eq!(j.resolve(&c), Some(id));
        j.remove_host(&id);
        assert_eq!(j.resolve(&c), None);
        assert!(!j.is_host(&id));
    }

    #[test]
    fn letters_are_roughly_uniform() {
        let mut counts = [0u32; 20];
        for _ in 0..2000 {
            for b in generate(10).unwrap().bytes() {
                counts[ALPHABET.iter().position(|&a| a == b).unwrap()] += 1;
            }
        }
        // 20 000 letters, 1000 expected each; a biased generator would be far outside this.
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "{counts:?}");
    }
}
