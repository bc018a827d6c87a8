//! Log output that can never stall the relay. Formatted lines go into a bounded queue that one
//! thread writes to stderr; when the queue is full (stderr is a pipe nobody reads, a full disk, a
//! slow terminal) a line is dropped and counted instead of blocking the thread that logged it.
//! `/metrics` exposes the count (`ferry_log_lines_dropped_total`) and whether the writer has been
//! stuck on one write for longer than [`STALL_MS`] (`ferry_log_output_stalled`).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crossbeam_channel::{Sender, TrySendError};
use tracing_subscriber::fmt::MakeWriter;

use crate::clock::{Clock, Millis};

/// Lines that may wait for the writer thread.
pub const QUEUE_LINES: usize = 8192;
/// A write blocked this long counts as stalled output.
pub const STALL_MS: Millis = 5_000;

static DROPPED: AtomicU64 = AtomicU64::new(0);
/// When the writer thread began its current write (+1), or 0 while it waits for lines.
static WRITING_SINCE: AtomicU64 = AtomicU64::new(0);
static CLOCK: OnceLock<Clock> = OnceLock::new();

/// Log lines dropped because the output could not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Whether the writer has been blocked on one write for more than [`STALL_MS`].
pub fn output_stalled() -> bool {
    let since = WRITING_SINCE.load(Ordering::Relaxed);
    let Some(clock) = CLOCK.get() else { return false };
    since != 0 && clock.now().saturating_sub(since - 1) > STALL_MS
}

/// A [`MakeWriter`] whose writers hand each formatted line to the queue.
#[derive(Clone)]
pub struct NonBlocking {
    tx: Sender<Vec<u8>>,
}

/// Starts the writer thread over `out` (stderr in `ferry serve`).
pub fn non_blocking(mut out: impl Write + Send + 'static) -> NonBlocking {
    let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(QUEUE_LINES);
    let clock = *CLOCK.get_or_init(Clock::new);
    let spawned = std::thread::Builder::new().name("ferry-log".into()).spawn(move || {
        for line in rx {
            WRITING_SINCE.store(clock.now() + 1, Ordering::Relaxed);
            let _ = out.write_all(&line);
            WRITING_SINCE.store(0, Ordering::Relaxed);
        }
    });
    if spawned.is_err() {
        eprintln!("ferry: cannot start the log writer thread; log lines will be dropped");
    }
    NonBlocking { tx }
}

/// One event's bytes, sent as one line when the formatter is done with it.
pub struct Line {
    buf: Vec<u8>,
    tx: Sender<Vec<u8>>,
}

impl Write for Line {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        match self.tx.try_send(std::mem::take(&mut self.buf)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl<'a> MakeWriter<'a> for NonBlocking {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { buf: Vec::with_capacity(256), tx: self.tx.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that blocks until told to go on, like a pipe nobody reads.
    struct Stuck(crossbeam_channel::Receiver<()>);

    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_output_drops_lines_instead_of_blocking() {
        let (go, wait) = crossbeam_channel::unbounded();
        let w = non_blocking(Stuck(wait));
        let before = dropped_lines();
        // Far more lines than the queue holds: every call returns at once.
        for i in 0..QUEUE_LINES + 500 {
            let mut l = w.make_writer();
            let _ = writeln!(l, "line {i}");
        }
        assert!(dropped_lines() - before >= 499, "dropped {}", dropped_lines() - before);
        drop(go);
    }
}
