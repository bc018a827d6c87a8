//! Player authentication: JWTs for every accepted algorithm, every bad-token case, JWKS files and
//! URLs, anonymous access by choice, tenants kept apart, per-player limits, and the Unity flow
//! with JWT-authenticated players on a non-loopback listener. Tokens are minted here with
//! `jsonwebtoken`.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry::client::{ApiClient, ApiError, RelayClient};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::Server;

const SECRET: &str = "a-shared-secret-of-at-least-32-bytes!!";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt").join(name)
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn mint(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

fn player(sub: &str, project: &str) -> Value {
    json!({"sub": sub, "project_id": project, "environment_id": "production", "exp": now() + 600, "iss": "studio", "aud": "ferry"})
}

fn secret_file() -> PathBuf {
    let p = std::env::temp_dir().join(format!("ferry-jwt-secret-{}", std::process::id()));
    std::fs::write(&p, SECRET).unwrap();
    p
}

/// A relay on a non-loopback listener (0.0.0.0), reached over 127.0.0.1.
fn public_relay(tweak: impl FnOnce(&mut ferry::config::Config)) -> Server {
    Server::start(|c| {
        c.api_listen = "0.0.0.0:0".parse().unwrap();
        c.jwt_issuer = Some("studio".into());
        c.jwt_audience = Some("ferry".into());
        tweak(c);
    })
}

fn api(srv: &Server, token: Option<&str>) -> ApiClient {
    let a = ApiClient::new(format!("http://127.0.0.1:{}", srv.running().api_addr.port()));
    match token {
        Some(t) => a.with_token(t),
        None => a,
    }
}

fn refused(srv: &Server, token: &str) -> (u16, String) {
    match api(srv, Some(token)).allocate(1, None) {
        Err(ApiError::Problem(p)) => {
            assert!(!p.detail.contains(token), "the answer never echoes the token");
            (p.status, p.detail)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn hs256_and_hs512_and_every_bad_token() {
    for alg in [Algorithm::HS256, Algorithm::HS512] {
        let srv = public_relay(|c| {
            c.jwt_algorithm = Some(alg);
            c.jwt_secret_file = Some(secret_file());
            c.auth_failures_per_ip_per_min = 1000;
        });
        let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
        assert!(api(&srv, Some(&mint(alg, &key, None, player("p1", "game")))).allocate(1, None).is_ok());
        let cases = [
            (json!({"sub": "p", "exp": now() - 3600, "iss": "studio", "aud": "ferry"}), "expired"),
            (
                json!({"sub": "p", "exp": now() + 600, "nbf": now() + 3600, "iss": "studio", "aud": "ferry"}),
                "not valid yet",
            ),
            (json!({"sub": "p", "exp": now() + 600, "iss": "someone-else", "aud": "ferry"}), "issuer"),
            (json!({"sub": "p", "exp": now() + 600, "iss": "studio", "aud": "another-service"}), "audience"),
        ];
        for (claims, want) in cases {
            let (status, detail) = refused(&srv, &mint(alg, &key, None, claims));
            assert_eq!(status, 401);
            assert!(detail.contains(want), "{want}: {detail}");
        }
        let wrong_key = EncodingKey::from_secret(b"another-secret-that-is-also-32-bytes-long").unwrap();
        let (status, detail) = refused(&srv, &mint(alg, &wrong_key, None, player("p", "game")));
        assert_eq!((status, detail.contains("signature")), (401, true), "{detail}");
        // alg "none": a token with no signature at all.
        let b64 = |v: &Value| {
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, v.to_string())
        };
        let none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&player("p", "game")));
        let (status, detail) = refused(&srv, &none);
        assert_eq!(status, 401, "{detail}");
        let (status, detail) = refused(&srv, "not.a.jwt");
        assert_eq!((status, detail.contains("well-formed")), (401, true), "{detail}");
        // No token at all on a public listener.
        match api(&srv, None).allocate(1, None) {
            Err(ApiError::Problem(p)) => assert_eq!(p.status, 401),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn public_key_algorithms_from_pem_and_jwks_file() {
    let cases = [
        (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa.pem")).unwrap()).unwrap(),
            "rsa.pub.pem",
        ),
        (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(&std::fs::read(fixture("ec.pem")).unwrap()).unwrap(),
            "ec.pub.pem",
        ),
        (
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(&std::fs::read(fixture("ed.pem")).unwrap()).unwrap(),
            "ed.pub.pem",
        ),
    ];
    for (alg, key, public) in cases {
        let srv = public_relay(|c| {
            c.jwt_algorithm = Some(alg);
            c.jwt_public_key_file = Some(fixture(public));
        });
        assert!(
            api(&srv, Some(&mint(alg, &key, None, player("p", "g")))).allocate(1, None).is_ok(),
            "{alg:?} PEM"
        );
        // The same key from a JWKS file, found by kid.
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, alg).unwrap();
        jwk.common.key_id = Some("k1".into());
        let path = std::env::temp_dir().join(format!("ferry-jwks-{:?}-{}.json", alg, std::process::id()));
        std::fs::write(&path, serde_json::to_string(&jsonwebtoken::jwk::JwkSet { keys: vec![jwk] }).unwrap())
            .unwrap();
        let srv = public_relay(|c| {
            c.jwt_algorithm = Some(alg);
            c.jwt_jwks_file = Some(path.clone());
        });
        assert!(
            api(&srv, Some(&mint(alg, &key, Some("k1"), player("p", "g")))).allocate(1, None).is_ok(),
            "{alg:?} JWKS"
        );
        let (status, _) = refused(&srv, &mint(alg, &key, Some("unknown"), player("p", "g")));
        assert_eq!(status, 401);
    }
}

#[test]
fn algorithm_confusion_is_refused() {
    let srv = public_relay(|c| {
        c.jwt_algorithm = Some(Algorithm::RS256);
        c.jwt_public_key_file = Some(fixture("rsa.pub.pem"));
    });
    // The classic attack: HS256 "signed" with the server's RSA public key as the HMAC secret.
    let public_pem = std::fs::read(fixture("rsa.pub.pem")).unwrap();
    let forged =
        mint(Algorithm::HS256, &EncodingKey::from_secret(&public_pem).unwrap(), None, player("p", "g"));
    let (status, detail) = refused(&srv, &forged);
    assert_eq!((status, detail.contains("algorithm")), (401, true), "{detail}");
    // A real RS256 token from another key.
    let other = EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_other.pem")).unwrap()).unwrap();
    let (status, _) = refused(&srv, &mint(Algorithm::RS256, &other, None, player("p", "g")));
    assert_eq!(status, 401);
}

/// A JWKS served over HTTP by the test; what it serves can change, and it counts requests.
struct JwksServer {
    url: String,
    body: Arc<Mutex<Option<String>>>,
    hits: Arc<AtomicU32>,
}

impl JwksServer {
    fn start(body: String) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/.well-known/jwks.json", l.local_addr().unwrap());
        let body = Arc::new(Mutex::new(Some(body)));
        let hits = Arc::new(AtomicU32::new(0));
        let (b, h) = (body.clone(), hits.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf);
                h.fetch_add(1, Ordering::Relaxed);
                let reply = match b.lock().unwrap().clone() {
                    Some(body) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                    None => {
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .into()
                    }
                };
                let _ = s.write_all(reply.as_bytes());
            }
        });
        Self { url, body, hits }
    }
}

fn jwks(keys: &[(&EncodingKey, &str)]) -> String {
    let keys = keys
        .iter()
        .map(|(k, kid)| {
            let mut j = jsonwebtoken::jwk::Jwk::from_encoding_key(k, Algorithm::ES256).unwrap();
            j.common.key_id = Some(kid.to_string());
            j
        })
        .collect();
    serde_json::to_string(&jsonwebtoken::jwk::JwkSet { keys }).unwrap()
}

#[test]
fn jwks_url_is_cached_refreshed_on_unknown_kid_and_survives_an_outage() {
    let a = EncodingKey::from_ec_pem(&std::fs::read(fixture("ec.pem")).unwrap()).unwrap();
    let b = EncodingKey::from_ec_pem(&std::fs::read(fixture("ec_other.pem")).unwrap()).unwrap();
    let server = JwksServer::start(jwks(&[(&a, "a")]));
    let srv = public_relay(|c| {
        c.jwt_algorithm = Some(Algorithm::ES256);
        c.jwt_jwks_url = Some(server.url.clone());
    });
    assert_eq!(server.hits.load(Ordering::Relaxed), 1, "fetched at start-up");
    assert!(api(&srv, Some(&mint(Algorithm::ES256, &a, Some("a"), player("p", "g"))))
        .allocate(1, None)
        .is_ok());
    // Key b appears at the source: a token naming it makes the relay fetch once and accept it.
    *server.body.lock().unwrap() = Some(jwks(&[(&a, "a"), (&b, "b")]));
    assert!(api(&srv, Some(&mint(Algorithm::ES256, &b, Some("b"), player("p", "g"))))
        .allocate(1, None)
        .is_ok());
    assert_eq!(server.hits.load(Ordering::Relaxed), 2);
    // Another unknown kid right after: refused without hammering the JWKS (rate limited).
    let (status, detail) = refused(&srv, &mint(Algorithm::ES256, &b, Some("c"), player("p", "g")));
    assert_eq!((status, detail.contains("kid")), (401, true), "{detail}");
    assert_eq!(server.hits.load(Ordering::Relaxed), 2);
    // The JWKS goes down: cached keys keep working.
    *server.body.lock().unwrap() = None;
    assert!(api(&srv, Some(&mint(Algorithm::ES256, &a, Some("a"), player("p", "g"))))
        .allocate(1, None)
        .is_ok());

    // A relay whose JWKS was never reachable: 503 with a problem body, never 500.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let srv = public_relay(|c| {
        c.jwt_algorithm = Some(Algorithm::ES256);
        c.jwt_jwks_url = Some(format!("http://{dead}/jwks.json"));
    });
    match api(&srv, Some(&mint(Algorithm::ES256, &a, Some("a"), player("p", "g")))).allocate(1, None) {
        Err(ApiError::Problem(p)) => assert_eq!((p.status, p.code), (503, 15503), "{p:?}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn tenants_cannot_see_each_others_codes_or_sessions() {
    let srv = public_relay(|c| {
        c.jwt_algorithm = Some(Algorithm::HS256);
        c.jwt_secret_file = Some(secret_file());
        c.api_tokens = vec!["backend-token-of-game-a-0123#game-a/production".into()];
        c.tenants = vec!["game-a/production".into()];
        c.join_failures_per_ip_per_min = 1000;
    });
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    let a = api(&srv, Some(&mint(Algorithm::HS256, &key, None, player("alice", "game-a"))));
    let b = api(&srv, Some(&mint(Algorithm::HS256, &key, None, player("bob", "game-b"))));
    let host = a.allocate(2, None).unwrap();
    let code = a.join_code(&host.allocation_id).unwrap();
    assert!(
        matches!(b.join(&code), Err(ApiError::Problem(p)) if p.status == 404),
        "another game's code is not found"
    );
    assert!(matches!(b.join_code(&host.allocation_id), Err(ApiError::Problem(p)) if p.status == 404));
    // Game A's backend (static token bound to the tenant) and its players see it.
    let backend = api(&srv, Some("backend-token-of-game-a-0123"));
    assert_eq!(backend.join_code(&host.allocation_id).unwrap(), code);
    let joiner =
        api(&srv, Some(&mint(Algorithm::HS256, &key, None, player("carol", "game-a")))).join(&code).unwrap();
    // The Unity flow end to end with JWT-authenticated players on a public listener.
    let mut h = RelayClient::new(&host).unwrap();
    let mut j = RelayClient::new(&joiner.allocation).unwrap();
    h.bind().unwrap();
    j.bind().unwrap();
    let hid = j.connect_b64(&joiner.host_connection_data).unwrap();
    j.send(&hid, b"hello from a JWT player").unwrap();
    assert_eq!(h.recv_relay(Duration::from_secs(3)).unwrap().unwrap().1, b"hello from a JWT player");
    let m = srv.metrics();
    assert!(m.contains("ferry_tenant_allocations_total{tenant=\"game-a/production\"} 1"), "{m}");
    assert!(
        m.contains("ferry_tenant_allocations_total{tenant=\"other\"} 0") || !m.contains("tenant=\"game-b"),
        "labels stay bounded"
    );
}

#[test]
fn players_behind_one_address_have_their_own_budgets() {
    let srv = public_relay(|c| {
        c.jwt_algorithm = Some(Algorithm::HS256);
        c.jwt_secret_file = Some(secret_file());
        c.api_rate_limit = 2;
        c.join_failures_per_ip_per_min = 2;
    });
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    let greedy = api(&srv, Some(&mint(Algorithm::HS256, &key, None, player("greedy", "g"))));
    let other = api(&srv, Some(&mint(Algorithm::HS256, &key, None, player("other", "g"))));
    // Failed joins: the greedy player's two mistakes spend its budget, not the other's.
    for _ in 0..2 {
        assert!(matches!(greedy.join("6789BCDF"), Err(ApiError::Problem(p)) if p.status == 404));
    }
    assert!(matches!(greedy.join("6789BCDF"), Err(ApiError::RateLimited { .. })));
    assert!(
        matches!(other.join("6789BCDF"), Err(ApiError::Problem(p)) if p.status == 404),
        "own failed-join budget"
    );
    // Request rate: the greedy player is limited, another player from the same address is not.
    std::thread::sleep(Duration::from_millis(2100));
    let statuses: Vec<bool> = (0..8).map(|_| greedy.regions().is_ok()).collect();
    assert!(statuses.iter().any(|ok| !ok), "the greedy player is limited: {statuses:?}");
    assert!(other.regions().is_ok(), "another player from the same address is not");
}

#[test]
fn anonymous_on_a_public_listener_only_by_choice_and_tenant_limits() {
    let mut c = ferry::config::Config::defaults();
    c.api_listen = "0.0.0.0:7880".parse().unwrap();
    assert_eq!(c.clone().validate().unwrap_err().key, "api_listen");
    c.api_anonymous = true;
    assert!(c.validate().is_ok());
    let srv = Server::start(|c| {
        c.api_listen = "0.0.0.0:0".parse().unwrap();
        c.api_anonymous = true;
        c.tenant_max_allocations = 2;
    });
    let anon = api(&srv, None);
    assert!(anon.allocate(1, None).is_ok() && anon.allocate(1, None).is_ok());
    match anon.allocate(1, None) {
        Err(ApiError::RateLimited { problem, .. }) => {
            assert!(problem.detail.contains("tenant_max_allocations"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn jwks_over_https_with_an_operator_ca() {
    let key = EncodingKey::from_ec_pem(&std::fs::read(fixture("ec.pem")).unwrap()).unwrap();
    let body = jwks(&[(&key, "a")]);
    // An HTTPS server with a certificate for "localhost" from a CA the relay is told to trust.
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let ca = std::env::temp_dir().join(format!("ferry-jwks-ca-{}.pem", std::process::id()));
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
            )
            .unwrap(),
    );
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut t = rustls::StreamOwned::new(rustls::ServerConnection::new(tls.clone()).unwrap(), s);
            let mut buf = [0u8; 2048];
            if t.read(&mut buf).is_err() {
                continue;
            }
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = t.write_all(reply.as_bytes());
            t.conn.send_close_notify();
            let _ = t.flush();
        }
    });
    let srv = public_relay(|c| {
        c.jwt_algorithm = Some(Algorithm::ES256);
        c.jwt_jwks_url = Some(format!("https://localhost:{port}/.well-known/jwks.json"));
        c.jwt_jwks_ca_file = Some(ca.clone());
    });
    assert!(api(&srv, Some(&mint(Algorithm::ES256, &key, Some("a"), player("p", "g"))))
        .allocate(1, None)
        .is_ok());
    // Without the operator's CA the certificate is not trusted: no keys, 503.
    let srv = public_relay(|c| {
        c.jwt_algorithm = Some(Algorithm::ES256);
        c.jwt_jwks_url = Some(format!("https://localhost:{port}/.well-known/jwks.json"));
    });
    match api(&srv, Some(&mint(Algorithm::ES256, &key, Some("a"), player("p", "g")))).allocate(1, None) {
        Err(ApiError::Problem(p)) => assert_eq!(p.status, 503),
        other => panic!("{other:?}"),
    }
}
