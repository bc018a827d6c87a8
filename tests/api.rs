//! The allocations API's contract: shapes, status codes, problem bodies for every bad input,
//! auth, rate limits, health and readiness.

mod support;

use ferry::client::ApiClient;
use serde_json::Value;
use support::*;

fn call(api: &ApiClient, method: &str, path: &str, body: Option<&str>) -> (u16, Value, Option<String>) {
    let r = api.raw(method, path, body.map(str::as_bytes)).unwrap();
    let ct = r.header("content-type").map(str::to_string);
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v, ct)
}

fn assert_problem(api: &ApiClient, method: &str, path: &str, body: Option<&str>, status: u16, code: u64) {
    let (s, v, ct) = call(api, method, path, body);
    assert_eq!(s, status, "{method} {path} {body:?} → {v}");
    assert_eq!(ct.as_deref(), Some("application/problem+json"), "{method} {path} {body:?}");
    assert_eq!(v["status"], status as u64);
    assert_eq!(v["code"], code, "{v}");
    assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "readable detail: {v}");
    assert!(v["title"].is_string() && v["type"].is_string());
}

#[test]
fn success_shapes_match_unity() {
    let srv = Server::start(|c| c.region = "eu-west".into());
    let api = srv.api();
    let (s, v, _) = call(&api, "POST", "/v1/allocate", Some(r#"{"maxConnections": 4, "region": "eu-west"}"#));
    assert_eq!(s, 201);
    assert_eq!(v["meta"]["status"], 201);
    assert!(v["meta"]["requestId"].is_string());
    let a = &v["data"]["allocation"];
    for k in ["allocationId", "allocationIdBytes", "key", "connectionData", "region"] {
        assert!(a[k].is_string(), "{k} in {a}");
    }
    let ep = &a["serverEndpoints"][0];
    assert_eq!(
        (
            ep["connectionType"].as_str(),
            ep["network"].as_str(),
            ep["reliable"].as_bool(),
            ep["secure"].as_bool()
        ),
        (Some("udp"), Some("udp"), Some(false), Some(false))
    );
    assert!(ep["host"].is_string() && ep["port"].is_u64());
    assert!(a["relayServer"]["ipV4"].is_string() && a["relayServer"]["port"].is_u64());
    let id = a["allocationId"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
    assert_eq!(b64(a["allocationIdBytes"].as_str().unwrap()), uuid::Uuid::parse_str(id).unwrap().as_bytes());

    let body = format!(r#"{{"allocationId": "{id}"}}"#);
    let (s, v, _) = call(&api, "POST", "/v1/joincode", Some(&body));
    assert_eq!(s, 201);
    let code = v["data"]["joinCode"].as_str().unwrap().to_string();
    let (s, _, _) = call(&api, "POST", "/v1/joincode", Some(&body));
    assert_eq!(s, 200, "asking again returns the same code with 200");

    let (s, v, _) =
        call(&api, "POST", "/v1/join", Some(&format!(r#"{{"joinCode": "{}"}}"#, code.to_lowercase())));
    assert_eq!(s, 200);
    assert_eq!(v["data"]["allocation"]["hostConnectionData"], a["connectionData"]);
    assert!(v["data"]["allocation"]["key"].is_string());

    let (s, v, _) = call(&api, "GET", "/v1/regions", None);
    assert_eq!(s, 200);
    assert_eq!(v["data"]["regions"][0]["id"], "eu-west");
}

#[test]
fn every_bad_input_gets_a_problem() {
    let srv = Server::start(|c| c.join_failures_per_ip_per_min = 1000);
    let api = srv.api();
    let alloc = "/v1/allocate";
    for body in [
        "",
        "{",
        "not json",
        "[]",
        "{}",
        r#"{"maxConnections": "two"}"#,
        r#"{"maxConnections": 1.5}"#,
        r#"{"maxConnections": null}"#,
        r#"{"maxConnections": 0}"#,
        r#"{"maxConnections": -1}"#,
        r#"{"maxConnections": 101}"#,
        r#"{"maxConnections": 99999999999999999999}"#,
        r#"{"maxConnections": 2, "region": 7}"#,
        "[4]",
        r#"[4, "local"]"#,
        "4",
        r#""four""#,
        "null",
        "true",
    ] {
        assert_problem(&api, "POST", alloc, Some(body), 400, 15001);
    }
    let (_, v, _) = call(&api, "POST", alloc, Some(r#"[4, "local"]"#));
    assert!(v["detail"].as_str().unwrap().contains("must be a JSON object"), "{v}");
    let big = format!(r#"{{"maxConnections": 2, "pad": "{}"}}"#, "x".repeat(20_000));
    assert_problem(&api, "POST", alloc, Some(&big), 413, 15001);
    assert_problem(&api, "POST", alloc, Some(r#"{"maxConnections": 2, "region": "mars"}"#), 404, 15007);

    for body in [
        "",
        "{}",
        r#"{"allocationId": 5}"#,
        r#"{"allocationId": "not-a-uuid"}"#,
        r#"["3f2504e0-4f89-41d3-9a0c-0305e82c3301"]"#,
    ] {
        assert_problem(&api, "POST", "/v1/joincode", Some(body), 400, 15001);
    }
    let unknown = r#"{"allocationId": "3f2504e0-4f89-41d3-9a0c-0305e82c3301"}"#;
    assert_problem(&api, "POST", "/v1/joincode", Some(unknown), 404, 15008);

    for body in [
        "",
        "{}",
        r#"{"joinCode": 123}"#,
        r#"{"joinCode": "ABC"}"#,
        r#"{"joinCode": "AAAAAAAA"}"#,
        r#"["6789BCDF"]"#,
    ] {
        assert_problem(&api, "POST", "/v1/join", Some(body), 400, 15001);
    }
    assert_problem(&api, "POST", "/v1/join", Some(r#"{"joinCode": "6789BCDF"}"#), 404, 15009);

    assert_problem(&api, "GET", "/v1/nothing", None, 404, 15001);
    assert_problem(&api, "GET", alloc, None, 405, 15001);
    assert_problem(&api, "DELETE", "/v1/join", None, 405, 15001);
    assert!(srv.metric("ferry_api_requests_total{route=\"/v1/allocate\",status=\"400\"}") >= 14);
}

#[test]
fn bearer_tokens_when_configured() {
    let srv = Server::start(|c| c.api_tokens = vec!["0123456789abcdef-token".into()]);
    let anon = srv.api();
    assert_problem(&anon, "POST", "/v1/allocate", Some(r#"{"maxConnections": 2}"#), 401, 15401);
    let wrong = srv.api().with_token("0123456789abcdef-nope!");
    assert_problem(&wrong, "POST", "/v1/allocate", Some(r#"{"maxConnections": 2}"#), 401, 15401);
    let ok = srv.api().with_token("0123456789abcdef-token");
    assert!(ok.allocate(2, None).is_ok());
    // Health endpoints stay open for probes.
    assert_eq!(anon.raw("GET", "/healthz", None).unwrap().status, 200);
}

#[test]
fn per_ip_rate_limit_answers_429_with_retry_after() {
    let srv = Server::start(|c| c.api_rate_limit = 5);
    let api = srv.api();
    let statuses: Vec<u16> = (0..30).map(|_| api.raw("GET", "/v1/regions", None).unwrap().status).collect();
    assert!(statuses.iter().filter(|&&s| s == 200).count() >= 10, "burst of twice the rate: {statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    let r = api.raw("GET", "/v1/regions", None).unwrap();
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["code"], 15429);
}

#[test]
fn failed_joins_are_limited_per_ip() {
    let srv = Server::start(|c| c.join_failures_per_ip_per_min = 3);
    let api = srv.api();
    for _ in 0..3 {
        assert_problem(&api, "POST", "/v1/join", Some(r#"{"joinCode": "6789BCDF"}"#), 404, 15009);
    }
    assert_problem(&api, "POST", "/v1/join", Some(r#"{"joinCode": "6789BCDF"}"#), 429, 15429);
    // Even a valid code waits: the limiter answers before any lookup.
    let a = api.allocate(2, None).unwrap();
    let code = api.join_code(&a.allocation_id).unwrap();
    assert_problem(&api, "POST", "/v1/join", Some(&format!(r#"{{"joinCode": "{code}"}}"#)), 429, 15429);
}

#[test]
fn health_readiness_metrics_and_drain() {
    let srv = Server::start(|_| {});
    let api = srv.api();
    assert_eq!(api.raw("GET", "/healthz", None).unwrap().status, 200);
    assert_eq!(api.raw("GET", "/readyz", None).unwrap().status, 200);
    let m = api.raw("GET", "/metrics", None).unwrap();
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    let text = String::from_utf8(m.body).unwrap();
    for family in [
        "ferry_allocations_active",
        "ferry_allocations_total",
        "ferry_binds_total",
        "ferry_packets_in_total",
        "ferry_bytes_in_total",
        "ferry_packets_out_total",
        "ferry_drops_total",
        "ferry_api_requests_total",
        "ferry_api_request_duration_seconds",
        "ferry_shard_busy_seconds_total",
        "ferry_stun_requests_total",
        "ferry_api_connections_total",
    ] {
        assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
    }
    let a = api.allocate(2, None).unwrap();
    srv.running().start_draining();
    assert_eq!(api.raw("GET", "/readyz", None).unwrap().status, 503);
    assert_problem(&api, "POST", "/v1/allocate", Some(r#"{"maxConnections": 2}"#), 503, 15010);
    // Live allocations keep working while draining.
    let raw = Raw::new(&a);
    assert_eq!(raw.bind(0), BIND_RECEIVED);
}

mod slow_clients {
    use super::support::{post_request as post, status_from as status_of, Server};
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    fn connect_from(src: &str, api: SocketAddr) -> TcpStream {
        super::support::tcp_from(src, api).unwrap()
    }

    /// Reads until the server closes; true if it did (EOF or reset) before the read timeout.
    fn closed_by_server(s: &mut TcpStream) -> bool {
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }

    #[test]
    fn idle_and_slow_header_connections_are_closed() {
        let srv = Server::start(|c| c.api_header_timeout = Duration::from_millis(300));
        let api = srv.running().api_addr;
        let mut idle = connect_from("127.0.0.1", api);
        assert!(closed_by_server(&mut idle), "a silent connection is closed");
        let mut slow = connect_from("127.0.0.1", api);
        slow.write_all(b"POST /v1/allocate HTTP/1.1\r\n").unwrap();
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(100));
            if slow.write_all(b"X").is_err() {
                break;
            }
        }
        assert!(closed_by_server(&mut slow), "a slow-loris connection is closed");
        assert!(srv.api().regions().is_ok(), "and the API still answers");
    }

    #[test]
    fn a_full_table_sheds_the_oldest_idle_connection() {
        let srv = Server::start(|c| {
            c.api_max_connections = Some(3);
            c.api_header_timeout = Duration::from_secs(30);
        });
        let api = srv.running().api_addr;
        let mut held: Vec<TcpStream> = Vec::new();
        for _ in 0..3 {
            held.push(connect_from("127.0.0.1", api));
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        // A newcomer with a real request takes the place of the oldest idle connection.
        let s =
            status_of("127.0.0.2", api, "GET /v1/regions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert_eq!(s, 200);
        assert!(closed_by_server(&mut held[0]), "the oldest idle connection is cut");
        assert!(srv.running().state.http.shed.load(std::sync::atomic::Ordering::Relaxed) >= 1);
        assert!(srv.metric("ferry_api_connections_total{result=\"shed\"}") >= 1);
    }

    #[test]
    fn per_source_cap_refuses_extra_connections_from_one_address() {
        let srv = Server::start(|c| {
            c.api_max_connections_per_ip = 3;
            c.api_header_timeout = Duration::from_secs(30);
        });
        let api = srv.running().api_addr;
        let held: Vec<TcpStream> = (0..3).map(|_| connect_from("127.0.0.3", api)).collect();
        std::thread::sleep(Duration::from_millis(200));
        let mut extra = connect_from("127.0.0.3", api);
        assert!(closed_by_server(&mut extra), "the fourth connection from one address is closed on accept");
        assert!(srv.running().state.http.refused_per_source.load(std::sync::atomic::Ordering::Relaxed) >= 1);
        let s =
            status_of("127.0.0.4", api, "GET /v1/regions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert_eq!(s, 200, "other addresses are served");
        drop(held);
    }

    #[test]
    fn slow_body_gets_408() {
        let srv = Server::start(|c| c.api_body_timeout = Duration::from_millis(300));
        let api = srv.running().api_addr;
        let mut s = connect_from("127.0.0.1", api);
        s.write_all(b"POST /v1/allocate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"max").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
        assert!(out.contains("application/problem+json"));
    }

    #[test]
    fn per_token_rate_limit_across_addresses() {
        let token = "shared-token-0123456789";
        let srv = Server::start(|c| {
            c.api_tokens = vec![token.into()];
            c.api_rate_limit = 2;
        });
        let api = srv.running().api_addr;
        let statuses: Vec<u16> = (2..20)
            .map(|i| {
                status_of(
                    &format!("127.0.0.{i}"),
                    api,
                    &post("/v1/allocate", r#"{"maxConnections": 1}"#, Some(token)),
                )
            })
            .collect();
        // A burst of twice the rate passes; after that the shared token is limited even though
        // every request comes from a fresh address (a token may refill on a slow machine).
        assert!(statuses[..4].iter().all(|&s| s == 201), "burst of twice the rate: {statuses:?}");
        assert!(statuses[4..].iter().filter(|&&s| s == 429).count() >= 10, "{statuses:?}");
    }

    #[test]
    fn failed_joins_are_limited_globally() {
        let srv = Server::start(|c| c.join_failures_global_per_sec = 3);
        let api = srv.running().api_addr;
        let statuses: Vec<u16> = (2..12)
            .map(|i| {
                status_of(
                    &format!("127.0.0.{i}"),
                    api,
                    &post("/v1/join", r#"{"joinCode": "6789BCDF"}"#, None),
                )
            })
            .collect();
        assert_eq!(&statuses[..3], &[404, 404, 404], "{statuses:?}");
        assert!(statuses[3..].iter().filter(|&&s| s == 429).count() >= 5, "{statuses:?}");
    }
}

#[test]
fn a_full_session_says_so_and_the_host_can_clear_unconnected_joiners() {
    let srv = Server::start(|c| c.join_failures_per_ip_per_min = 1000);
    let api = srv.api();
    let host = api.allocate(1, None).unwrap();
    let code = api.join_code(&host.allocation_id).unwrap();
    // Whoever holds the code fills every joiner slot (maxConnections 1 → 17 joiner allocations).
    let mut joiners = Vec::new();
    loop {
        match api.join(&code) {
            Ok(j) => joiners.push(j),
            Err(ferry::client::ApiError::Problem(p)) => {
                assert_eq!((p.status, p.code, p.title.as_str()), (409, 15011, "Session Full"), "{p:?}");
                assert!(p.detail.contains("removejoiners"), "{p:?}");
                break;
            }
            Err(e) => panic!("{e}"),
        }
        assert!(joiners.len() <= 100);
    }
    assert_eq!(joiners.len(), 17);
    // One joiner is a real player: it binds and connects; it must survive the clean-up.
    let mut player = ferry::client::RelayClient::new(&joiners[0].allocation).unwrap();
    player.bind().unwrap();
    let mut h = ferry::client::RelayClient::new(&host).unwrap();
    h.bind().unwrap();
    player.connect_b64(&joiners[0].host_connection_data).unwrap();

    let remove = |key: &str, joiner: Option<&str>| {
        let mut body = serde_json::json!({"allocationId": host.allocation_id, "key": key});
        if let Some(j) = joiner {
            body["joinerAllocationId"] = j.into();
        }
        call(&api, "POST", "/v1/removejoiners", Some(&body.to_string()))
    };
    let wrong = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 64]);
    let (s, v, _) = remove(&wrong, None);
    assert_eq!((s, v["code"].as_u64()), (403, Some(15403)), "{v}");
    let (s, v, _) = remove(&host.key, Some(&joiners[1].allocation.allocation_id));
    assert_eq!((s, v["data"]["removed"].as_u64()), (200, Some(1)), "{v}");
    let (s, v, _) = remove(&host.key, None);
    assert_eq!((s, v["data"]["removed"].as_u64()), (200, Some(15)), "every unconnected joiner: {v}");
    assert!(api.join(&code).is_ok(), "slots are free again");
    // The connected player is untouched.
    player.send(&host_id(&host), b"still here").unwrap();
    assert_eq!(h.recv_relay(std::time::Duration::from_secs(3)).unwrap().unwrap().1, b"still here");
}

fn host_id(a: &ferry::client::api::Allocation) -> ferry::wire::AllocationId {
    ferry::wire::AllocationId::parse(&a.allocation_id).unwrap()
}

#[test]
fn the_shipped_dashboard_only_uses_metrics_that_exist() {
    let srv = Server::start(|_| {});
    let api = srv.api();
    let _ = api.allocate(1, None);
    let metrics = srv.metrics();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/grafana/dashboards/ferry.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("ferry_") {
                let name: String =
                    rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[i + name.len()..];
                names.push(name);
            }
        }
    }
    assert!(names.len() >= 10, "{names:?}");
    for n in names {
        let family = n.strip_suffix("_bucket").unwrap_or(&n);
        assert!(
            metrics.contains(&format!("# TYPE {family} ")),
            "the dashboard uses {n}, which /metrics does not have"
        );
    }
}
