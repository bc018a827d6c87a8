//! Prometheus text exposition, rendered at scrape time from per-shard snapshots.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::core::{DropReason, ReleaseReason, Stats};
use crate::shard::ShardStats;
use crate::wire::ErrorCode;

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Renders every metric. `api` counts requests by (route, status).
pub fn render(shards: &[ShardStats], api: &BTreeMap<(String, u16), u64>, hosts: usize) -> String {
    let mut total = Stats::default();
    for s in shards {
        total.merge(&s.core);
    }
    let mut o = String::with_capacity(8192);

    family(&mut o, "ferry_shard_info", "gauge", "One per shard, labelled with its I/O backend.");
    for s in shards {
        let _ = writeln!(o, "ferry_shard_info{{shard=\"{}\",io=\"{}\"}} 1", s.shard, s.backend);
    }
    family(&mut o, "ferry_allocations_active", "gauge", "Live allocations per shard.");
    for s in shards {
        let _ = writeln!(o, "ferry_allocations_active{{shard=\"{}\"}} {}", s.shard, s.allocations);
    }
    family(&mut o, "ferry_host_allocations_active", "gauge", "Live host allocations known to the API.");
    let _ = writeln!(o, "ferry_host_allocations_active {hosts}");
    family(&mut o, "ferry_allocations_total", "counter", "Allocations created.");
    let _ = writeln!(o, "ferry_allocations_total {}", total.allocations_created);
    family(&mut o, "ferry_allocations_released_total", "counter", "Allocations released, by reason.");
    for r in ReleaseReason::ALL {
        let _ = writeln!(
            o,
            "ferry_allocations_released_total{{reason=\"{}\"}} {}",
            r.as_str(),
            total.released_by(r)
        );
    }
    family(&mut o, "ferry_binds_total", "counter", "BIND messages by result.");
    for (result, v) in [
        ("new", total.binds_new),
        ("repeat", total.binds_repeat),
        ("moved", total.binds_moved),
        ("bad_hmac", total.drop_count(DropReason::BadHmac)),
        ("refused", total.drop_count(DropReason::RebindRefused)),
    ] {
        let _ = writeln!(o, "ferry_binds_total{{result=\"{result}\"}} {v}");
    }
    family(&mut o, "ferry_stun_requests_total", "counter", "STUN datagrams on the relay port, by outcome.");
    for r in crate::core::StunOutcome::ALL {
        let _ =
            writeln!(o, "ferry_stun_requests_total{{result=\"{}\"}} {}", r.as_str(), total.stun[r as usize]);
    }
    family(&mut o, "ferry_qos_requests_total", "counter", "Unity QoS pings on the relay port, by outcome.");
    for r in crate::core::QosOutcome::ALL {
        let _ =
            writeln!(o, "ferry_qos_requests_total{{result=\"{}\"}} {}", r.as_str(), total.qos[r as usize]);
    }
    family(
        &mut o,
        "ferry_relay_bind_rejects_total",
        "counter",
        "Fleet BINDs whose token was refused, by reason.",
    );
    for r in crate::core::BindReject::ALL {
        let _ = writeln!(
            o,
            "ferry_relay_bind_rejects_total{{reason=\"{}\"}} {}",
            r.as_str(),
            total.bind_rejects[r as usize]
        );
    }
    dtls(&mut o, shards);
    family(&mut o, "ferry_connects_total", "counter", "CONNECT_REQUEST outcomes.");
    let _ = writeln!(o, "ferry_connects_total{{result=\"accepted\"}} {}", total.connects_accepted);
    let _ = writeln!(o, "ferry_connects_total{{result=\"rejected\"}} {}", total.connects_rejected);

    family(&mut o, "ferry_packets_in_total", "counter", "Datagrams received, per shard.");
    for s in shards {
        let _ = writeln!(o, "ferry_packets_in_total{{shard=\"{}\"}} {}", s.shard, s.core.rx_packets);
    }
    family(&mut o, "ferry_bytes_in_total", "counter", "Bytes received.");
    let _ = writeln!(o, "ferry_bytes_in_total {}", total.rx_bytes);
    family(&mut o, "ferry_packets_out_total", "counter", "Datagrams sent, by kind.");
    for (kind, v) in [
        ("forward", total.forwarded_packets),
        ("reply", total.reply_packets),
        ("notify", total.notify_packets),
    ] {
        let _ = writeln!(o, "ferry_packets_out_total{{kind=\"{kind}\"}} {v}");
    }
    family(&mut o, "ferry_bytes_out_total", "counter", "Bytes sent, by kind.");
    let _ = writeln!(o, "ferry_bytes_out_total{{kind=\"forward\"}} {}", total.forwarded_bytes);
    let _ = writeln!(o, "ferry_bytes_out_total{{kind=\"reply\"}} {}", total.reply_bytes);
    family(&mut o, "ferry_drops_total", "counter", "Datagrams that produced nothing, by reason.");
    for r in DropReason::ALL {
        let _ = writeln!(o, "ferry_drops_total{{reason=\"{}\"}} {}", r.as_str(), total.drop_count(r));
    }
    family(&mut o, "ferry_errors_sent_total", "counter", "ERROR messages sent, by code.");
    for c in ErrorCode::ALL {
        let _ = writeln!(
            o,
            "ferry_errors_sent_total{{code=\"{}\",name=\"{}\"}} {}",
            c as u8,
            c.as_str(),
            total.errors(c)
        );
    }
    family(&mut o, "ferry_io_total", "counter", "Shard I/O events, by kind.");
    for s in shards {
        let io = &s.io;
        for (kind, v) in [
            ("recv_batches", io.recv_batches),
            ("recv_errors", io.recv_errors),
            ("send_dropped_full", io.send_dropped_full),
            ("send_errors", io.send_errors),
            ("handoff_out", io.handoff_out),
            ("handoff_in", io.handoff_in),
            ("handoff_dropped", io.handoff_dropped),
            ("gso_sends", io.gso_sends),
            ("gso_fallbacks", io.gso_fallbacks),
        ] {
            let _ = writeln!(o, "ferry_io_total{{shard=\"{}\",kind=\"{kind}\"}} {v}", s.shard);
        }
    }
    family(
        &mut o,
        "ferry_shard_busy_seconds_total",
        "counter",
        "Time each shard spent working (not waiting for datagrams).",
    );
    for s in shards {
        let busy_ms = s.io.uptime_ms.saturating_sub(s.io.idle_ns / 1_000_000);
        let _ = writeln!(
            o,
            "ferry_shard_busy_seconds_total{{shard=\"{}\"}} {:.3}",
            s.shard,
            busy_ms as f64 / 1000.0
        );
    }
    family(&mut o, "ferry_shard_uptime_seconds", "gauge", "Time since each shard started.");
    for s in shards {
        let _ = writeln!(
            o,
            "ferry_shard_uptime_seconds{{shard=\"{}\"}} {:.3}",
            s.shard,
            s.io.uptime_ms as f64 / 1000.0
        );
    }
    family(&mut o, "ferry_api_requests_total", "counter", "API requests by route and status.");
    for ((route, status), v) in api {
        let _ = writeln!(o, "ferry_api_requests_total{{route=\"{route}\",status=\"{status}\"}} {v}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_labels() {
        let mut s = ShardStats::default();
        s.core.drops[DropReason::BadHmac as usize] = 3;
        s.core.rx_packets = 10;
        let mut api = BTreeMap::new();
        api.insert(("/v1/allocate".to_string(), 201), 2);
        let text = render(&[s], &api, 1);
        assert!(text.contains("ferry_drops_total{reason=\"bad_hmac\"} 3"));
        assert!(text.contains("ferry_binds_total{result=\"bad_hmac\"} 3"));
        assert!(text.contains("ferry_packets_in_total{shard=\"0\"} 10"));
        assert!(text.contains("ferry_api_requests_total{route=\"/v1/allocate\",status=\"201\"} 2"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad sample line: {line}");
        }
    }
}

/// Counters of the control plane that live outside the shards.
#[derive(Clone, Copy, Debug, Default)]
pub struct ControlPlane {
    pub api_connections_accepted: u64,
    pub api_connections_refused_per_ip: u64,
    pub api_connections_refused_full: u64,
    pub api_connections_shed: u64,
    pub api_accept_errors: u64,
    pub api_max_connections: u64,
    pub log_lines_dropped: u64,
    pub log_output_stalled: bool,
}

/// Renders the control plane's counters (appended to [`render`]'s text by `/metrics`).
pub fn render_control(c: &ControlPlane) -> String {
    let mut o = String::with_capacity(1024);
    family(&mut o, "ferry_api_connections_total", "counter", "API connections by outcome at accept.");
    for (result, v) in [
        ("accepted", c.api_connections_accepted),
        ("refused_per_ip", c.api_connections_refused_per_ip),
        ("refused_full", c.api_connections_refused_full),
        ("shed", c.api_connections_shed),
        ("accept_error", c.api_accept_errors),
    ] {
        let _ = writeln!(o, "ferry_api_connections_total{{result=\"{result}\"}} {v}");
    }
    family(&mut o, "ferry_api_max_connections", "gauge", "API connections allowed open at once.");
    let _ = writeln!(o, "ferry_api_max_connections {}", c.api_max_connections);
    family(
        &mut o,
        "ferry_log_lines_dropped_total",
        "counter",
        "Log lines dropped because the output could not keep up.",
    );
    let _ = writeln!(o, "ferry_log_lines_dropped_total {}", c.log_lines_dropped);
    family(
        &mut o,
        "ferry_log_output_stalled",
        "gauge",
        "1 while the log writer has been blocked on one write for over 5 s.",
    );
    let _ = writeln!(o, "ferry_log_output_stalled {}", c.log_output_stalled as u8);
    o
}

/// Per-tenant counters: `(label, live host allocations, allocations created)`. Labels are the
/// configured tenants, `default` and `other`, so their number stays bounded.
pub fn render_tenants(rows: &[(String, u64, u64)]) -> String {
    let mut o = String::new();
    family(&mut o, "ferry_tenant_host_allocations_active", "gauge", "Live host allocations per tenant.");
    for (t, live, _) in rows {
        let _ = writeln!(o, "ferry_tenant_host_allocations_active{{tenant=\"{t}\"}} {live}");
    }
    family(&mut o, "ferry_tenant_allocations_total", "counter", "Host allocations created per tenant.");
    for (t, _, created) in rows {
        let _ = writeln!(o, "ferry_tenant_allocations_total{{tenant=\"{t}\"}} {created}");
    }
    o
}

/// A Prometheus histogram with fixed buckets (seconds), for API request durations.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    counts: [u64; Histogram::BOUNDS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub const BOUNDS: [f64; 10] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5];

    pub fn observe(&mut self, secs: f64) {
        for (i, b) in Self::BOUNDS.iter().enumerate() {
            if secs <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += secs;
        self.count += 1;
    }
}

/// Renders one histogram family, one series per label value.
pub fn render_latency(name: &str, label: &str, hists: &BTreeMap<String, Histogram>) -> String {
    let mut o = String::new();
    family(&mut o, name, "histogram", "API request duration in seconds, by route.");
    for (value, h) in hists {
        for (i, b) in Histogram::BOUNDS.iter().enumerate() {
            let _ = writeln!(o, "{name}_bucket{{{label}=\"{value}\",le=\"{b}\"}} {}", h.counts[i]);
        }
        let _ = writeln!(o, "{name}_bucket{{{label}=\"{value}\",le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(o, "{name}_sum{{{label}=\"{value}\"}} {}", h.sum);
        let _ = writeln!(o, "{name}_count{{{label}=\"{value}\"}} {}", h.count);
    }
    o
}

/// The DTLS layers' counters, summed over shards.
fn dtls(o: &mut String, shards: &[ShardStats]) {
    let mut t = crate::secure::dtls::DtlsStats::default();
    for s in shards {
        let d = &s.dtls;
        macro_rules! add { ($($f:ident),*) => { $( t.$f += d.$f; )* } }
        add!(
            hello_verify_sent,
            handshakes_started,
            handshakes_completed,
            handshakes_failed,
            handshakes_timed_out,
            refused_capacity,
            stray_hellos,
            bad_records,
            no_session,
            hellos_refused,
            records_refused,
            plaintext_on_secure,
            oversize,
            closed_by_peer,
            idle_expired,
            migrated_out,
            migrated_in,
            sessions,
            halfopen,
            offloaded,
            final_flight_resent
        );
    }
    family(o, "ferry_dtls_sessions", "gauge", "DTLS sessions, by state.");
    let _ = writeln!(
        o,
        "ferry_dtls_sessions{{state=\"established\"}} {}",
        t.sessions - t.halfopen.min(t.sessions)
    );
    let _ = writeln!(o, "ferry_dtls_sessions{{state=\"handshaking\"}} {}", t.halfopen);
    family(
        o,
        "ferry_dtls_hello_verify_total",
        "counter",
        "HelloVerifyRequests sent (stateless cookie exchange).",
    );
    let _ = writeln!(o, "ferry_dtls_hello_verify_total {}", t.hello_verify_sent);
    family(
        o,
        "ferry_dtls_handshakes_total",
        "counter",
        "DTLS handshakes past the cookie exchange, by result.",
    );
    for (r, v) in [
        ("started", t.handshakes_started),
        ("completed", t.handshakes_completed),
        ("failed", t.handshakes_failed),
        ("timed_out", t.handshakes_timed_out),
    ] {
        let _ = writeln!(o, "ferry_dtls_handshakes_total{{result=\"{r}\"}} {v}");
    }
    family(
        o,
        "ferry_dtls_drops_total",
        "counter",
        "DTLS datagrams or messages dropped without an answer, by reason.",
    );
    for (r, v) in [
        ("bad_record", t.bad_records),
        ("no_session", t.no_session),
        ("stray_hello", t.stray_hellos),
        ("hello_refused", t.hellos_refused),
        ("capacity", t.refused_capacity),
        ("record_refused", t.records_refused),
        ("plaintext_on_secure", t.plaintext_on_secure),
        ("oversize", t.oversize),
    ] {
        let _ = writeln!(o, "ferry_dtls_drops_total{{reason=\"{r}\"}} {v}");
    }
    family(o, "ferry_dtls_sessions_ended_total", "counter", "Established DTLS sessions ended, by reason.");
    let _ = writeln!(o, "ferry_dtls_sessions_ended_total{{reason=\"closed\"}} {}", t.closed_by_peer);
    let _ = writeln!(o, "ferry_dtls_sessions_ended_total{{reason=\"idle\"}} {}", t.idle_expired);
    family(
        o,
        "ferry_dtls_offloaded_total",
        "counter",
        "Established DTLS sessions whose records Ferry protects itself (OpenSSL's session freed).",
    );
    let _ = writeln!(o, "ferry_dtls_offloaded_total {}", t.offloaded);
    family(o, "ferry_dtls_final_flight_resent_total", "counter", "Final handshake flights sent again.");
    let _ = writeln!(o, "ferry_dtls_final_flight_resent_total {}", t.final_flight_resent);
    family(
        o,
        "ferry_dtls_migrations_total",
        "counter",
        "DTLS sessions moved to the shard owning their allocation.",
    );
    let _ = writeln!(o, "ferry_dtls_migrations_total {}", t.migrated_out);
}

/// The WebSocket listeners' counters, and what shards refused to send to WebSocket clients.
pub fn render_ws(w: &crate::secure::stream::WsStats, shards: &[ShardStats]) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut o = String::new();
    family(&mut o, "ferry_ws_connections", "gauge", "Open WebSocket connections.");
    let _ = writeln!(o, "ferry_ws_connections {}", w.active.load(Relaxed));
    family(&mut o, "ferry_ws_connections_total", "counter", "WebSocket connections, by outcome.");
    for (r, v) in [
        ("accepted", &w.accepted),
        ("refused_capacity", &w.refused_capacity),
        ("refused_per_ip", &w.refused_per_ip),
        ("refused_rate", &w.refused_rate),
        ("tls_failed", &w.tls_failed),
        ("bad_upgrade", &w.bad_upgrade),
        ("violation", &w.violations),
        ("idle", &w.idle_closed),
    ] {
        let _ = writeln!(o, "ferry_ws_connections_total{{result=\"{r}\"}} {}", v.load(Relaxed));
    }
    family(&mut o, "ferry_ws_messages_total", "counter", "Relay messages over WebSocket, by direction.");
    let _ = writeln!(o, "ferry_ws_messages_total{{direction=\"in\"}} {}", w.messages_in.load(Relaxed));
    let _ = writeln!(o, "ferry_ws_messages_total{{direction=\"out\"}} {}", w.messages_out.load(Relaxed));
    let sum = |f: fn(&ShardStats) -> u64| shards.iter().map(f).sum::<u64>();
    family(&mut o, "ferry_ws_drops_total", "counter", "WebSocket messages dropped, by reason.");
    for (r, v) in [
        ("not_relay", w.not_relay.load(Relaxed)),
        ("mailbox_full", w.mailbox_full.load(Relaxed)),
        ("oversize", sum(|s| s.io.ws_oversize)),
        ("outbox_full", sum(|s| s.io.ws_outbox_full)),
        ("gone", sum(|s| s.io.ws_gone)),
    ] {
        let _ = writeln!(o, "ferry_ws_drops_total{{reason=\"{r}\"}} {v}");
    }
    o
}
