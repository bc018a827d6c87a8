//! The API under abuse: each test runs an attack and asserts what honest clients get meanwhile.
//! Attacks come from loopback addresses of their own (127.0.x.y), honest clients from others.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{post_request as post, status_from as status_of, tcp_from as connect_from, Server};

/// Whether the server has closed `s` (a non-blocking peek sees EOF or an error).
fn cut(s: &TcpStream) -> bool {
    let _ = s.set_nonblocking(true);
    let mut b = [0u8; 1];
    let r = match s.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = s.set_nonblocking(false);
    r
}

/// Holds `per_source` connections open from each source until `stop`: a third idle, a third
/// sending headers a byte at a time, a third sending a body a byte at a time; each one the
/// server cuts is reopened at once. Returns how many connections it opened.
fn connection_flood(api: SocketAddr, sources: Vec<String>, per_source: usize, stop: Arc<AtomicBool>) -> u64 {
    let opened = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = sources
        .chunks(sources.len().div_ceil(4))
        .map(|chunk| {
            let (chunk, stop, opened) = (chunk.to_vec(), stop.clone(), opened.clone());
            std::thread::spawn(move || {
                let mut held: Vec<(String, usize, Option<TcpStream>)> = chunk
                    .iter()
                    .flat_map(|src| (0..per_source).map(move |k| (src.clone(), k % 3, None)))
                    .collect();
                let mut tick = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for (src, kind, conn) in held.iter_mut() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if conn.as_ref().is_none_or(cut) {
                            *conn = connect_from(src, api).ok();
                            opened.fetch_add(1, Ordering::Relaxed);
                            if let (Some(c), 2) = (conn.as_mut(), *kind) {
                                let _ = c.write_all(
                                    b"POST /v1/allocate HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n{",
                                );
                            }
                        } else if let Some(c) = conn.as_mut() {
                            let _ = match *kind {
                                1 if tick.is_multiple_of(3) => {
                                    c.write_all(if tick == 0 { b"P" } else { b"X" })
                                }
                                2 if tick.is_multiple_of(3) => c.write_all(b" "),
                                _ => Ok(()),
                            };
                        }
                    }
                    tick += 1;
                    std::thread::sleep(Duration::from_millis(30));
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    opened.load(Ordering::Relaxed)
}

/// Honest clients from their own addresses make allocations during `secs` seconds; returns
/// (answered with 201, asked).
fn honest_allocations(api: SocketAddr, secs: u64) -> (u64, u64) {
    let clock = ferry::clock::Clock::new();
    let end = secs * 1000;
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let (mut ok, mut asked) = (0, 0);
                let mut k = 0;
                while clock.now() < end {
                    let src = format!("127.0.200.{}", 1 + t * 10 + k % 10);
                    k += 1;
                    asked += 1;
                    if status_of(&src, api, &post("/v1/allocate", r#"{"maxConnections": 1}"#, None)) == 201 {
                        ok += 1;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                (ok, asked)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

fn flood_while_honest(sources: Vec<String>, per_source: usize) {
    ferry::serve::raise_nofile_limit();
    let srv = Server::start(|c| {
        c.api_max_connections = Some(1024);
        c.api_header_timeout = Duration::from_secs(5);
        c.api_body_timeout = Duration::from_secs(10);
    });
    let api = srv.running().api_addr;
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let attack = std::thread::spawn(move || connection_flood(api, sources, per_source, s2));
    // Let the attacker fill the table first.
    std::thread::sleep(Duration::from_secs(2));
    let (ok, asked) = honest_allocations(api, 5);
    stop.store(true, Ordering::Relaxed);
    let opened = attack.join().unwrap();
    let http = &srv.running().state.http;
    let (shed, per_ip) = (http.shed.load(Ordering::Relaxed), http.refused_per_source.load(Ordering::Relaxed));
    eprintln!("honest {ok}/{asked}; attacker opened {opened}; shed {shed}; refused per source {per_ip}");
    assert!(asked >= 50, "honest clients asked {asked} times");
    assert!(ok * 100 >= asked * 99, "honest allocations answered: {ok} of {asked}");
    assert!(shed + per_ip > 0, "the attack reached the limits");
}

#[test]
fn connection_flood_from_one_address_leaves_honest_clients_served() {
    flood_while_honest(vec!["127.0.100.1".into()], 1100);
}

#[test]
fn connection_flood_from_a_hundred_addresses_leaves_honest_clients_served() {
    flood_while_honest((1..=100).map(|i| format!("127.0.101.{i}")).collect(), 11);
}

#[test]
fn a_declared_oversize_body_is_refused_at_once() {
    let srv = Server::start(|c| c.api_body_timeout = Duration::from_secs(10));
    let api = srv.running().api_addr;
    let mut s = connect_from("127.0.0.1", api).unwrap();
    s.write_all(b"POST /v1/allocate HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n{").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).expect("an answer before the body timeout");
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
}

#[test]
fn bad_code_flood_from_300_sources_leaves_a_token_holding_backend_joining() {
    let backend = "backend-token-0123456789";
    let players = "players-token-0123456789";
    let srv = Server::start(|c| {
        c.api_tokens = vec![backend.into(), players.into()];
        c.api_rate_limit = 1000;
    });
    let api = srv.running().api_addr;
    let stop = Arc::new(AtomicBool::new(false));
    let flood: Vec<_> = (0..3)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let src = format!("127.0.{}.{}", 110 + t, 1 + sent % 100);
                    // Half present the players' shared token, half no valid token at all.
                    let token =
                        if sent.is_multiple_of(2) { Some(players) } else { Some("not-a-valid-token-000000") };
                    status_of(&src, api, &post("/v1/join", r#"{"joinCode": "6789BCDF"}"#, token));
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let backend_api = srv.api().with_token(backend);
    let (mut ok, mut asked) = (0, 0);
    for _ in 0..60 {
        let h = backend_api.allocate(1, None).unwrap();
        let code = backend_api.join_code(&h.allocation_id).unwrap();
        asked += 1;
        if status_of(
            "127.0.0.9",
            api,
            &post("/v1/join", &format!(r#"{{"joinCode": "{code}"}}"#), Some(backend)),
        ) == 200
        {
            ok += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent: u64 = flood.into_iter().map(|t| t.join().unwrap()).sum();
    eprintln!("backend joins {ok}/{asked} while {sent} bad joins were sent");
    assert!(ok * 100 >= asked * 99, "backend joins answered: {ok} of {asked}");
    // The flood was held back: the players' token hit its failed-join budget, the bad tokens
    // their per-address authentication budget.
    let m = srv.metrics();
    let limited = m
        .lines()
        .find(|l| l.starts_with("ferry_api_requests_total{route=\"/v1/join\",status=\"429\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(limited > 0, "the flood was rate limited");
}

#[test]
fn failed_authentications_are_limited_per_source() {
    let srv = Server::start(|c| {
        c.api_tokens = vec!["a-real-token-0123456789".into()];
        c.auth_failures_per_ip_per_min = 5;
    });
    let api = srv.running().api_addr;
    let statuses: Vec<u16> = (0..12)
        .map(|_| {
            status_of(
                "127.0.120.1",
                api,
                &post("/v1/allocate", r#"{"maxConnections": 1}"#, Some("guess-0123456789abcdef")),
            )
        })
        .collect();
    assert_eq!(&statuses[..5], &[401; 5], "{statuses:?}");
    assert!(statuses[5..].iter().all(|&s| s == 429), "{statuses:?}");
    // Another address and the right token are unaffected.
    let ok = status_of(
        "127.0.120.2",
        api,
        &post("/v1/allocate", r#"{"maxConnections": 1}"#, Some("a-real-token-0123456789")),
    );
    assert_eq!(ok, 201);
}

#[test]
fn a_proxy_is_believed_only_when_trusted() {
    let srv = Server::start(|c| {
        c.join_failures_per_ip_per_min = 2;
        c.trusted_proxies = vec!["127.0.130.1/32".parse().unwrap()];
    });
    let api = srv.running().api_addr;
    let join = |src: &str, xff: &str| {
        let body = r#"{"joinCode":"6789BCDF"}"#;
        let req = format!(
            "POST /v1/join HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Forwarded-For: {xff}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        status_of(src, api, &req)
    };
    // Through the trusted proxy, each player has its own failed-join budget.
    assert_eq!([join("127.0.130.1", "203.0.113.1"), join("127.0.130.1", "203.0.113.1")], [404, 404]);
    assert_eq!(join("127.0.130.1", "203.0.113.1"), 429);
    assert_eq!(join("127.0.130.1", "203.0.113.2"), 404, "another player behind the proxy is not blocked");
    // An untrusted client cannot spread itself over forged addresses.
    assert_eq!([join("127.0.130.2", "198.51.100.1"), join("127.0.130.2", "198.51.100.2")], [404, 404]);
    assert_eq!(join("127.0.130.2", "198.51.100.3"), 429);
}

#[test]
fn failed_join_429_carries_retry_after() {
    let srv = Server::start(|c| c.join_failures_per_ip_per_min = 1);
    let api = srv.api();
    let _ = api.raw("POST", "/v1/join", Some(br#"{"joinCode": "6789BCDF"}"#)).unwrap();
    let r = api.raw("POST", "/v1/join", Some(br#"{"joinCode": "6789BCDF"}"#)).unwrap();
    assert_eq!(r.status, 429);
    let secs: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&secs), "{secs}");
}
