//! Progress reporting for long operations (snapshots, restores, imports, exports,
//! re-encryption): a progress bar with rate and ETA when stderr is a terminal,
//! periodic `tracing` log lines otherwise (systemd journal, CI logs, cron).
//!
//! Usage: `let p = Progress::new("import", total_bytes); p.advance(n); p.finish();`

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the non-terminal reporter logs a line.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// A progress reporter over a known number of bytes. `Sync`: share it between threads.
#[derive(Debug)]
pub struct Progress {
    what: String,
    total: u64,
    done: AtomicU64,
    started: Instant,
    bar: Option<indicatif::ProgressBar>,
    last_log: Mutex<Instant>,
}

impl Progress {
    /// A reporter for `total` bytes of work named `what` (e.g. "snapshot vol1").
    /// Shows a bar when stderr is a terminal, logs every few seconds otherwise.
    pub fn new(what: impl Into<String>, total: u64) -> Progress {
        let what = what.into();
        let bar = if std::io::stderr().is_terminal()
            && std::env::var_os("CRYPTVOL_NO_PROGRESS").is_none()
        {
            let bar = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_message(what.clone());
            Some(bar)
        } else {
            None
        };
        let now = Instant::now();
        Progress {
            what,
            total,
            done: AtomicU64::new(0),
            started: now,
            bar,
            last_log: Mutex::new(now),
        }
    }

    /// A reporter that never prints (tests, nested operations).
    pub fn hidden(total: u64) -> Progress {
        let now = Instant::now();
        Progress {
            what: String::new(),
            total,
            done: AtomicU64::new(0),
            started: now,
            bar: Some(indicatif::ProgressBar::hidden()),
            last_log: Mutex::new(now),
        }
    }

    /// Records `n` more bytes done.
    pub fn advance(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed).saturating_add(n);
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None => {
                let mut last = match self.last_log.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                if last.elapsed() >= LOG_EVERY {
                    *last = Instant::now();
                    drop(last);
                    self.log_line(done);
                }
            }
        }
    }

    /// Sets the position (resumed operations start part-way through).
    pub fn set_done(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
    }

    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    fn log_line(&self, done: u64) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let pct = if self.total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / self.total as f64
        };
        let eta = if rate > 0.0 {
            format!("{:.0}s", self.total.saturating_sub(done) as f64 / rate)
        } else {
            "?".into()
        };
        tracing::info!(
            "{}: {:.1}% ({} of {} bytes, {:.1} MiB/s, ETA {})",
            self.what,
            pct,
            done,
            self.total,
            rate / (1024.0 * 1024.0),
            eta
        );
    }

    /// Ends the display (clears the bar; logs a final line when not on a terminal).
    pub fn finish(&self) {
        match &self.bar {
            Some(bar) => bar.finish_and_clear(),
            None => self.log_line(self.done()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_bytes_from_many_threads() {
        let p = Progress::hidden(4000);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        p.advance(1)
                    }
                });
            }
        });
        assert_eq!(p.done(), 4000);
        p.set_done(10);
        assert_eq!(p.done(), 10);
        p.finish();
    }
}
