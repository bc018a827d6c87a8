//! Player tokens: JWT bearer verification for the allocations API.
//!
//! The algorithm comes from the configuration, never from the token: a token whose header names
//! another algorithm (`none` included, or HS256 on an RS256 deployment, the classic confusion
//! attack) is refused before any key is used. Keys are a shared secret (HS256/HS512, from a file),
//! a PEM public key, or a JWKS (from a file or an `https://` or `http://` URL — fetched at start-up, refreshed
//! on a schedule and when a token names an unknown `kid`, at most once per
//! [`MIN_REFRESH_MS`]). Checked: the signature, `exp` and `nbf` with a leeway, `iss` and `aud`
//! when configured. What a token says about its player: `sub`, and the tenant (project and
//! environment) from configurable claims.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::clock::{Clock, Millis};

/// A JWKS is fetched again at most this often when tokens name unknown keys.
pub const MIN_REFRESH_MS: Millis = 30_000;

/// Which game (project) and environment a caller belongs to. The default tenant is empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant {
    pub project: String,
    pub environment: String,
}

impl Tenant {
    /// `project/environment`, or `project` alone.
    pub fn parse(s: &str) -> Self {
        match s.split_once('/') {
            Some((p, e)) => Self { project: p.into(), environment: e.into() },
            None => Self { project: s.into(), environment: String::new() },
        }
    }

    pub fn is_default(&self) -> bool {
        self.project.is_empty() && self.environment.is_empty()
    }
}

impl std::fmt::Display for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.environment.is_empty() {
            f.write_str(&self.project)
        } else {
            write!(f, "{}/{}", self.project, self.environment)
        }
    }
}

/// How tokens are verified (from the configuration).
#[derive(Clone, Debug)]
pub struct JwtSettings {
    pub algorithm: Algorithm,
    pub secret_file: Option<PathBuf>,
    pub public_key_file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    /// CA bundle (PEM) trusted for an `https://` JWKS URL instead of the built-in roots.
    pub jwks_ca_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_secs: u64,
    pub project_claim: String,
    pub environment_claim: String,
}

/// Why a token was refused. The message never echoes the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    WrongAlgorithm,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    BadSignature,
    UnknownKey,
    /// No key could be loaded at all (JWKS unreachable from the start): a 503, not the caller's fault.
    NoKeys,
}

impl TokenError {
    pub fn detail(&self) -> &'static str {
        match self {
            Self::Malformed => "bearer token is not a well-formed JWT",
            Self::WrongAlgorithm => "bearer token uses an algorithm this relay does not accept",
            Self::Expired => "bearer token has expired",
            Self::NotYetValid => "bearer token is not valid yet (nbf)",
            Self::WrongIssuer => "bearer token has the wrong issuer",
            Self::WrongAudience => "bearer token has the wrong audience",
            Self::BadSignature => "bearer token signature does not verify",
            Self::UnknownKey => "bearer token names a key (kid) this relay does not know",
            Self::NoKeys => "no verification keys are available (JWKS unreachable)",
        }
    }
}

/// A verified token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Player {
    pub subject: Option<String>,
    pub tenant: Tenant,
}

#[derive(Default)]
struct Keys {
    /// By `kid`; a key without `kid` is stored under `None`.
    by_kid: HashMap<Option<String>, DecodingKey>,
}

/// Verifies player tokens. Cheap to clone.
#[derive(Clone)]
pub struct JwtVerifier {
    settings: Arc<JwtSettings>,
    validation: Arc<Validation>,
    keys: Arc<RwLock<Keys>>,
    last_fetch: Arc<Mutex<Option<Millis>>>,
    clock: Clock,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn parse_jwks(bytes: &[u8], alg: Algorithm) -> Result<Keys, String> {
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Keys::default();
    for jwk in &set.keys {
        // Keys for another algorithm are ignored rather than trusted for this one.
        // (Key and signing algorithms share their names: RS256, ES256, EdDSA, …)
        if let Some(k) = jwk.common.key_algorithm {
            if format!("{k:?}") != format!("{alg:?}") {
                continue;
            }
        }
        if let Ok(k) = DecodingKey::from_jwk(jwk) {
            keys.by_kid.insert(jwk.common.key_id.clone(), k);
        }
    }
    Ok(keys)
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier").field("algorithm", &self.settings.algorithm).finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// Loads the keys; a key that cannot be read or parsed stops start-up (the error names the
    /// key). A JWKS URL that cannot be reached yet is not fatal: tokens get 503 until it is.
    pub fn new(settings: JwtSettings, clock: Clock) -> Result<Self, (String, String)> {
        let alg = settings.algorithm;
        let hmac = matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        let mut keys = Keys::default();
        if let Some(p) = &settings.secret_file {
            if !hmac {
                return Err((
                    "jwt_secret_file".into(),
                    format!("a shared secret is for HS256/HS512, not {alg:?}"),
                ));
            }
            let s = read(p).map_err(|e| ("jwt_secret_file".to_string(), e))?;
            let s = String::from_utf8_lossy(&s).trim().as_bytes().to_vec();
            if s.len() < 32 {
                return Err(("jwt_secret_file".into(), "the secret must be at least 32 bytes".into()));
            }
            let key =
                DecodingKey::from_secret(&s).map_err(|e| ("jwt_secret_file".to_string(), e.to_string()))?;
            keys.by_kid.insert(None, key);
        } else if hmac {
            return Err(("jwt_secret_file".into(), format!("{alg:?} needs jwt_secret_file")));
        }
        if let Some(p) = &settings.public_key_file {
            let pem = read(p).map_err(|e| ("jwt_public_key_file".to_string(), e))?;
            let k = match alg {
                Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256 => {
                    DecodingKey::from_rsa_pem(&pem)
                }
                Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
                Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                _ => return Err(("jwt_public_key_file".into(), format!("not a key for {alg:?}"))),
            }
            .map_err(|e| ("jwt_public_key_file".to_string(), format!("{}: {e}", p.display())))?;
            keys.by_kid.insert(None, k);
        }
        if let Some(p) = &settings.jwks_file {
            let bytes = read(p).map_err(|e| ("jwt_jwks_file".to_string(), e))?;
            let k = parse_jwks(&bytes, alg).map_err(|e| ("jwt_jwks_file".to_string(), e))?;
            keys.by_kid.extend(k.by_kid);
        }
        if !hmac
            && settings.public_key_file.is_none()
            && settings.jwks_file.is_none()
            && settings.jwks_url.is_none()
        {
            return Err((
                "jwt_public_key_file".into(),
                format!("{alg:?} needs jwt_public_key_file, jwt_jwks_file or jwt_jwks_url"),
            ));
        }
        let mut validation = Validation::new(alg);
        validation.leeway = settings.leeway_secs;
        validation.validate_nbf = true;
        validation.required_spec_claims = ["exp".to_string()].into_iter().collect();
        match &settings.issuer {
            Some(i) => validation.set_issuer(&[i]),
            None => validation.iss = None,
        }
        match &settings.audience {
            Some(a) => validation.set_audience(&[a]),
            None => validation.validate_aud = false,
        }
        let v = Self {
            settings: Arc::new(settings),
            validation: Arc::new(validation),
            keys: Arc::new(RwLock::new(keys)),
            last_fetch: Arc::new(Mutex::new(None)),
            clock,
        };
        if v.settings.jwks_url.is_some() {
            if let Err(e) = v.fetch_now() {
                tracing::warn!(error = %e, "JWKS not available yet; tokens are refused with 503 until it is");
            }
        }
        Ok(v)
    }

    pub fn algorithm(&self) -> Algorithm {
        self.settings.algorithm
    }

    /// Fetches the JWKS from its URL for an unknown key, unless such a fetch happened less than
    /// [`MIN_REFRESH_MS`] ago (`force`, for the scheduled refresh, ignores that). Keeps the old
    /// keys on failure.
    pub fn refresh(&self, force: bool) -> Result<(), String> {
        let now = self.clock.now();
        {
            let mut last = self.last_fetch.lock().unwrap_or_else(|p| p.into_inner());
            if !force && last.is_some_and(|l| now.saturating_sub(l) < MIN_REFRESH_MS) {
                return Err("refreshed recently".into());
            }
            *last = Some(now);
        }
        self.fetch_now()
    }

    fn fetch_now(&self) -> Result<(), String> {
        let Some(url) = self.settings.jwks_url.as_deref() else { return Ok(()) };
        let body = super::fetch::get(url, self.settings.jwks_ca_file.as_deref())?;
        let keys = parse_jwks(&body, self.settings.algorithm)?;
        let mut k = self.keys.write().unwrap_or_else(|p| p.into_inner());
        // What the URL serves now replaces every key it served before (rotated keys go away).
        *k = keys;
        Ok(())
    }

    fn key_for(&self, kid: &Option<String>) -> Result<Option<DecodingKey>, TokenError> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        if keys.by_kid.is_empty() {
            return Err(TokenError::NoKeys);
        }
        Ok(keys
            .by_kid
            .get(kid)
            .or_else(|| if kid.is_none() { None } else { keys.by_kid.get(&None) })
            .cloned())
    }

    /// Verifies `token`. May fetch the JWKS once (blocking) when the token names an unknown
    /// key: call from a blocking context.
    pub fn verify(&self, token: &str) -> Result<Player, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != self.settings.algorithm {
            return Err(TokenError::WrongAlgorithm);
        }
        let key = match self.key_for(&header.kid)? {
            Some(k) => k,
            None => {
                // An unknown kid: the keys may have rotated. Fetch once (rate limited), then refuse.
                let _ = self.refresh(false);
                self.key_for(&header.kid)?.ok_or(TokenError::UnknownKey)?
            }
        };
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => TokenError::Expired,
                K::ImmatureSignature => TokenError::NotYetValid,
                K::InvalidIssuer => TokenError::WrongIssuer,
                K::InvalidAudience => TokenError::WrongAudience,
                K::InvalidSignature => TokenError::BadSignature,
                K::InvalidAlgorithm => TokenError::WrongAlgorithm,
                _ => TokenError::Malformed,
            }
        })?;
        let claims = data.claims;
        let text = |name: &str| claims.get(name).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        Ok(Player {
            subject: claims.get("sub").and_then(|v| v.as_str()).map(str::to_string),
            tenant: Tenant {
                project: text(&self.settings.project_claim),
                environment: text(&self.settings.environment_claim),
            },
        })
    }
}

/// A static token entry: `TOKEN` or `TOKEN#project/environment`.
pub fn split_static_token(entry: &str) -> (&str, Tenant) {
    match entry.split_once('#') {
        Some((t, tenant)) => (t, Tenant::parse(tenant)),
        None => (entry, Tenant::default()),
    }
}
