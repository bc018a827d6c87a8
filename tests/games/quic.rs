//! The QUIC game of the tunnel tests: quinn with ALPN `hytale/1`, a 60 s idle timeout, a login
//! exchange (Connect → AuthGrant, AuthToken → ServerAuthToken) and PLAY traffic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

pub const ALPN: &[u8] = b"hytale/1";

/// The client's states, in the order a session goes through them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Connecting,
    Handshaking,
    Authenticating,
    Play,
    Disconnecting,
    Disconnected,
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(Duration::from_millis(60_000).try_into().unwrap()));
    Arc::new(t)
}

pub fn server(addr: SocketAddr) -> (quinn::Endpoint, rustls::pki_types::CertificateDer<'static>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).unwrap()));
    cfg.transport_config(transport());
    (quinn::Endpoint::server(cfg, addr).unwrap(), der)
}

pub fn client(ca: rustls::pki_types::CertificateDer<'static>) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    cfg.transport_config(transport());
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    ep
}

pub async fn exchange(conn: &quinn::Connection, msg: &str) -> String {
    let (mut tx, mut rx) = conn.open_bi().await.unwrap();
    tx.write_all(msg.as_bytes()).await.unwrap();
    tx.finish().unwrap();
    String::from_utf8(rx.read_to_end(4096).await.unwrap()).unwrap()
}

/// Answers the login exchange and PLAY traffic on every stream of every connection.
pub async fn serve(ep: quinn::Endpoint) {
    while let Some(incoming) = ep.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            assert_eq!(
                conn.handshake_data()
                    .unwrap()
                    .downcast::<quinn::crypto::rustls::HandshakeData>()
                    .unwrap()
                    .protocol
                    .as_deref(),
                Some(ALPN)
            );
            while let Ok((mut tx, mut rx)) = conn.accept_bi().await {
                let req = rx.read_to_end(4096).await.unwrap_or_default();
                let reply: &[u8] = match req.as_slice() {
                    b"Connect" => b"AuthGrant",
                    b"AuthToken" => b"ServerAuthToken",
                    b"Play" => b"PlayOk",
                    b"Ping" => b"Pong",
                    _ => b"?",
                };
                let _ = tx.write_all(reply).await;
                let _ = tx.finish();
            }
        });
    }
}
