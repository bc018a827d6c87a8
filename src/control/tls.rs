//! HTTPS for the API: a certificate and key from PEM files, served with rustls, reloaded when
//! the files change (checked every [`WATCH_EVERY`]) or on SIGHUP, without dropping connections.
//! A reload that fails (a half-written file, a key that does not match) keeps the old
//! certificate and says so in the log.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How often the certificate files are checked for changes.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// The certificate in force, swapped on reload.
#[derive(Debug)]
pub struct CertStore {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    stamp: RwLock<Option<(SystemTime, SystemTime)>>,
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signer =
        provider.key_provider.load_private_key(key_der).map_err(|e| format!("{}: {e}", key.display()))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| format!("{} does not belong to {}: {e}", key.display(), cert.display()))?;
    Ok(ck)
}

impl CertStore {
    /// Loads the pair; an error names the file (start-up stops on it).
    pub fn open(cert: PathBuf, key: PathBuf) -> Result<Arc<Self>, String> {
        let ck = load(&cert, &key)?;
        let stamp = modified(&cert).zip(modified(&key));
        Ok(Arc::new(Self { current: RwLock::new(Arc::new(ck)), stamp: RwLock::new(stamp), cert, key }))
    }

    /// Loads the files again; on failure the old certificate stays.
    pub fn reload(&self) -> Result<(), String> {
        let ck = load(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
        *self.stamp.write().unwrap_or_else(|p| p.into_inner()) =
            modified(&self.cert).zip(modified(&self.key));
        Ok(())
    }

    /// Reloads when either file changed since the last load.
    pub fn reload_if_changed(&self) {
        let now = modified(&self.cert).zip(modified(&self.key));
        if now.is_none() || now == *self.stamp.read().unwrap_or_else(|p| p.into_inner()) {
            return;
        }
        match self.reload() {
            Ok(()) => tracing::info!(cert = %self.cert.display(), "certificate reloaded"),
            Err(e) => {
                // Remember the stamp so a broken file is not retried every turn; a fixed one is.
                *self.stamp.write().unwrap_or_else(|p| p.into_inner()) = now;
                tracing::warn!(cert = %self.cert.display(), error = %e, "certificate not reloaded; the old one stays");
            }
        }
    }

    /// A task that reloads the files whenever they change (checked every [`WATCH_EVERY`]).
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let watched = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                let w = watched.clone();
                let _ = tokio::task::spawn_blocking(move || w.reload_if_changed()).await;
            }
        })
    }

    /// The rustls configuration that serves whatever certificate is current.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_no_client_auth().with_cert_resolver(self.clone()));
        match cfg {
            Ok(mut c) => {
                c.alpn_protocols = vec![b"http/1.1".to_vec()];
                Arc::new(c)
            }
            Err(e) => unreachable!("ring supports the default protocol versions: {e}"),
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}
