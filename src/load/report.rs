//! The summary of a load run: printed, as JSON, and as an SVG chart.

use plotters::prelude::*;
use serde::Serialize;

use super::engine::Measured;

#[derive(Serialize, Debug, Clone)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

#[derive(Serialize, Debug, Clone)]
pub struct Summary {
    pub target: String,
    pub sessions: usize,
    /// The traffic shape (`burst` or `game`).
    pub shape: super::Shape,
    /// Payload bytes per datagram (the mean, for the game shape's mixed sizes).
    pub payload_bytes: usize,
    /// Offered datagrams per second (0: as fast as possible).
    pub offered_pps: u64,
    pub duration_secs: f64,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub loss_pct: f64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Sends refused by a full socket buffer on the generator (not counted as sent).
    pub send_blocked: u64,
    pub delivered_pps: f64,
    pub latency: Latency,
    /// Relay CPU time per delivered datagram, when the relay's PID was given.
    pub relay_cpu_us_per_packet: Option<f64>,
    pub series_pps: Vec<f64>,
    pub series_latency_us: Vec<(f64, f64)>,
    /// What a concurrent hostile flood sent and got back (`--flood`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flood: Option<super::flood::FloodReport>,
}

impl Summary {
    pub fn new(
        target: &str,
        sessions: usize,
        payload: usize,
        rate: u64,
        m: &Measured,
        relay_cpu_secs: Option<f64>,
    ) -> Self {
        let lost = m.sent.saturating_sub(m.received);
        let q = |p: f64| m.latency_ns.value_at_quantile(p) as f64 / 1000.0;
        Self {
            target: target.to_string(),
            sessions,
            shape: super::Shape::Burst,
            payload_bytes: payload,
            offered_pps: rate,
            duration_secs: m.measured_secs,
            sent: m.sent,
            received: m.received,
            lost,
            loss_pct: if m.sent == 0 { 0.0 } else { lost as f64 * 100.0 / m.sent as f64 },
            duplicates: m.duplicates,
            reordered: m.reordered,
            send_blocked: m.send_blocked,
            delivered_pps: m.received as f64 / m.measured_secs,
            latency: Latency {
                p50_us: q(0.5),
                p99_us: q(0.99),
                p999_us: q(0.999),
                max_us: m.latency_ns.max() as f64 / 1000.0,
            },
            relay_cpu_us_per_packet: relay_cpu_secs
                .filter(|_| m.received > 0)
                .map(|s| s * 1e6 / m.received as f64),
            series_pps: m.series_pps.iter().map(|&c| c as f64 * 10.0).collect(),
            series_latency_us: m.series_latency.clone(),
            flood: None,
        }
    }

    pub fn print(&self) {
        println!("target          {}", self.target);
        println!(
            "sessions        {}   payload {} B   offered {}",
            self.sessions,
            self.payload_bytes,
            if self.offered_pps == 0 { "max".to_string() } else { format!("{} pps", self.offered_pps) }
        );
        println!(
            "sent/received   {} / {}   lost {} ({:.3} %)   dup {}   reordered {}",
            self.sent, self.received, self.lost, self.loss_pct, self.duplicates, self.reordered
        );
        println!("delivered       {:.0} packets/s", self.delivered_pps);
        println!(
            "one-way latency p50 {:.1} µs   p99 {:.1} µs   p99.9 {:.1} µs   max {:.1} µs",
            self.latency.p50_us, self.latency.p99_us, self.latency.p999_us, self.latency.max_us
        );
        if let Some(c) = self.relay_cpu_us_per_packet {
            println!("relay CPU       {c:.3} µs per delivered packet");
        }
        if let Some(f) = &self.flood {
            println!(
                "flood           {} datagrams ({} bytes) sent, {} ({} bytes) came back: {:.4} bytes out per byte in",
                f.datagrams_sent, f.bytes_sent, f.datagrams_back, f.bytes_back, f.bytes_out_per_byte_in
            );
            if let (Some(b), Some(a)) = (f.relay_rss_before_kib, f.relay_rss_after_kib) {
                println!("relay RSS       {b} KiB → {a} KiB ({:+} KiB)", a as i64 - b as i64);
            }
        }
        if self.send_blocked > 0 {
            println!("generator       {} sends refused by a full socket buffer", self.send_blocked);
        }
    }

    /// Writes throughput and latency over time as an SVG chart.
    pub fn chart(&self, path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, bottom) = root.split_vertically(300);
        let xs = self.series_pps.len().max(1) as f64 / 10.0;
        let ymax = self.series_pps.iter().cloned().fold(1.0, f64::max) * 1.1;
        let mut c = ChartBuilder::on(&top)
            .caption(
                format!("{}: delivered packets/s ({} B payload)", self.target, self.payload_bytes),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..xs, 0.0..ymax)?;
        c.configure_mesh().x_desc("seconds").y_desc("packets/s").draw()?;
        c.draw_series(LineSeries::new(
            self.series_pps.iter().enumerate().map(|(i, &v)| (i as f64 / 10.0, v)),
            &BLUE,
        ))?;
        let lmax =
            self.series_latency_us.iter().map(|l| l.1).filter(|v| v.is_finite()).fold(1.0, f64::max) * 1.1;
        let secs = self.series_latency_us.len().max(1) as f64;
        let mut c = ChartBuilder::on(&bottom)
            .caption("one-way latency (µs): p50 blue, p99 red", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..secs, 0.0..lmax)?;
        c.configure_mesh().x_desc("seconds").y_desc("µs").draw()?;
        let pts = |f: fn(&(f64, f64)) -> f64| {
            self.series_latency_us
                .iter()
                .enumerate()
                .filter(move |(_, l)| f(l).is_finite())
                .map(move |(i, l)| (i as f64 + 0.5, f(l)))
        };
        c.draw_series(LineSeries::new(pts(|l| l.0), &BLUE))?;
        c.draw_series(LineSeries::new(pts(|l| l.1), &RED))?;
        root.present()?;
        Ok(())
    }
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}
