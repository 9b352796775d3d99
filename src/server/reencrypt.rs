//! Background re-encryption of served volumes: one thread per export that calls
//! [`Volume::reencrypt_step`] until the volume reports no re-encryption in progress.
//! The loop itself, [`step_until_done`], is shared with offline re-encryption
//! (`cryptvol reencrypt FILE`), which plugs in its own [`StepHandler`].
//!
//! The thread stops between steps when the server shuts down (the header records the
//! watermark, so the next start resumes); a failed step is logged at error level and
//! retried after [`RETRY_DELAY`]. Progress is published on a `watch` channel that
//! control connections follow, and logged every [`LOG_EVERY`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::volume::{ReencryptStatus, Volume, VolumeError};

/// Delay before a failed step is retried.
pub const RETRY_DELAY: Duration = Duration::from_secs(5);
/// How often progress is logged.
pub const LOG_EVERY: Duration = Duration::from_secs(5);
/// How often a sleeping worker checks for shutdown.
const POLL: Duration = Duration::from_millis(100);

/// What a job reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobState {
    /// Bytes under the new key (the watermark).
    pub done: u64,
    /// Size of the data area.
    pub total: u64,
    /// The worker thread is running.
    pub running: bool,
    /// The re-encryption completed in this daemon.
    pub finished: bool,
    /// The last failed step's error, until a step succeeds again.
    pub last_error: Option<String>,
}

struct Job {
    state: watch::Sender<JobState>,
    thread: Option<JoinHandle<()>>,
}

/// The re-encryption jobs of a server, by export name.
#[derive(Default)]
pub(crate) struct Jobs {
    jobs: Mutex<HashMap<String, Job>>,
}

impl Jobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state of the job of `export`, if one ran or runs in this daemon.
    pub fn state(&self, export: &str) -> Option<JobState> {
        self.lock().get(export).map(|j| j.state.borrow().clone())
    }

    /// A receiver on the job of `export` when it is running.
    pub fn follow(&self, export: &str) -> Option<watch::Receiver<JobState>> {
        self.lock()
            .get(export)
            .filter(|j| j.state.borrow().running)
            .map(|j| j.state.subscribe())
    }

    /// Starts the worker of `export` (a running one is followed instead).
    pub fn start(
        &self,
        export: &str,
        volume: Arc<Volume>,
        shutdown: watch::Receiver<bool>,
    ) -> watch::Receiver<JobState> {
        let mut jobs = self.lock();
        if let Some(j) = jobs.get(export) {
            if j.state.borrow().running {
                return j.state.subscribe();
            }
        }
        let initial = JobState {
            done: volume.reencrypt_status().map(|s| s.watermark).unwrap_or(0),
            total: volume.size(),
            running: true,
            finished: false,
            last_error: None,
        };
        let (tx, rx) = watch::channel(initial);
        let tx2 = tx.clone();
        let name = export.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!(
                "reencrypt-{}",
                export.chars().take(8).collect::<String>()
            ))
            .spawn(move || run(&name, &volume, &tx2, &shutdown));
        let thread = match spawned {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(export, "cannot start the re-encryption thread: {e}");
                tx.send_modify(|s| {
                    s.running = false;
                    s.last_error = Some(format!("cannot start the re-encryption thread: {e}"));
                });
                None
            }
        };
        // A finished earlier job of the same export is replaced (its thread has ended).
        if let Some(old) = jobs.insert(export.to_string(), Job { state: tx, thread }) {
            if let Some(t) = old.thread {
                let _ = t.join();
            }
        }
        rx
    }

    /// Waits for every worker to stop (they do between steps once shutdown is set).
    pub fn join_all(&self) {
        let threads: Vec<JoinHandle<()>> = self
            .lock()
            .values_mut()
            .filter_map(|j| j.thread.take())
            .collect();
        for t in threads {
            if t.join().is_err() {
                tracing::error!("a re-encryption thread panicked");
            }
        }
    }
}

/// Test-only: sleeps before each re-encryption step for
/// `CRYPTVOL_TEST_REENCRYPT_STEP_DELAY_MS` milliseconds (at most 10 s), honoured only
/// together with `CRYPTVOL_FAULT_INJECTION=1`, so that tests can interrupt a
/// re-encryption of a small volume in the middle (daemon and offline alike).
fn test_step_delay() {
    if std::env::var_os("CRYPTVOL_FAULT_INJECTION").is_some_and(|v| v == "1") {
        if let Some(ms) = std::env::var("CRYPTVOL_TEST_REENCRYPT_STEP_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            std::thread::sleep(Duration::from_millis(ms.min(10_000)));
        }
    }
}

/// How a run of [`step_until_done`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunEnd {
    /// The volume reports no re-encryption in progress any more: it is complete.
    Finished,
    /// Stopped between two steps because [`StepHandler::should_stop`] said so (the
    /// header records the watermark: the next run resumes from there).
    Stopped,
}

/// The caller's side of [`step_until_done`]: when to stop, where progress goes, what a
/// failed step does. The daemon retries failed steps and publishes progress to control
/// connections; `cryptvol reencrypt FILE` shows a progress bar and gives up.
pub(crate) trait StepHandler {
    /// Why the run gives up, if it ever does.
    type Error;
    /// Asked before each step: stop now (shutdown, a signal)?
    fn should_stop(&self) -> bool;
    /// A step succeeded; `st` is the progress after it.
    fn progressed(&mut self, st: ReencryptStatus);
    /// A step failed: `Ok(())` tries again (after whatever waiting the handler does),
    /// `Err` ends the run with that error.
    fn failed(&mut self, e: VolumeError) -> Result<(), Self::Error>;
}

/// The one re-encryption loop, used by the daemon's workers and by offline
/// re-encryption: calls [`Volume::reencrypt_step`] until the volume reports no
/// re-encryption in progress, checking `handler` for a stop request before each step.
pub(crate) fn step_until_done<H: StepHandler>(
    volume: &Volume,
    handler: &mut H,
) -> Result<RunEnd, H::Error> {
    loop {
        test_step_delay();
        if handler.should_stop() {
            return Ok(RunEnd::Stopped);
        }
        match volume.reencrypt_step() {
            Ok(Some(st)) => handler.progressed(st),
            Ok(None) => return Ok(RunEnd::Finished),
            Err(e) => handler.failed(e)?,
        }
    }
}

/// A daemon worker's [`StepHandler`]: publishes progress on the job's channel, logs it
/// every [`LOG_EVERY`], retries a failed step after [`RETRY_DELAY`] and stops at
/// shutdown.
struct Worker<'a> {
    export: &'a str,
    tx: &'a watch::Sender<JobState>,
    shutdown: &'a watch::Receiver<bool>,
    started: Instant,
    last_log: Instant,
    first_done: Option<u64>,
}

impl StepHandler for Worker<'_> {
    type Error = std::convert::Infallible;

    fn should_stop(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn progressed(&mut self, st: ReencryptStatus) {
        let from = *self.first_done.get_or_insert(st.watermark);
        self.tx.send_modify(|s| {
            s.done = st.watermark;
            s.total = st.size;
            s.last_error = None;
        });
        if self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            log_progress(self.export, st.watermark, st.size, from, self.started);
        }
    }

    fn failed(&mut self, e: VolumeError) -> Result<(), Self::Error> {
        let msg = e.to_string();
        tracing::error!(
            export = self.export,
            "re-encryption step failed (retrying in {} s): {msg}",
            RETRY_DELAY.as_secs()
        );
        self.tx.send_modify(|s| s.last_error = Some(msg));
        let until = Instant::now() + RETRY_DELAY;
        while Instant::now() < until && !*self.shutdown.borrow() {
            std::thread::sleep(POLL);
        }
        Ok(())
    }
}

/// The worker thread of `export`: runs the re-encryption to its end or to shutdown.
fn run(
    export: &str,
    volume: &Volume,
    tx: &watch::Sender<JobState>,
    shutdown: &watch::Receiver<bool>,
) {
    let mut worker = Worker {
        export,
        tx,
        shutdown,
        started: Instant::now(),
        last_log: Instant::now(),
        first_done: None,
    };
    tracing::info!(
        export,
        path = volume.path(),
        "re-encryption running in the background"
    );
    let end = match step_until_done(volume, &mut worker) {
        Ok(end) => end,
        Err(never) => match never {},
    };
    match end {
        RunEnd::Stopped => {
            let s = tx.borrow().clone();
            tracing::info!(
                export,
                "re-encryption paused at {} of {} bytes for shutdown; it resumes at the next start",
                s.done,
                s.total
            );
            tx.send_modify(|s| s.running = false);
        }
        RunEnd::Finished => {
            tx.send_modify(|s| {
                s.done = s.total;
                s.running = false;
                s.finished = true;
                s.last_error = None;
            });
            tracing::info!(
                export,
                secs = worker.started.elapsed().as_secs(),
                "re-encryption complete: the volume is under its new data key; the old key is destroyed"
            );
        }
    }
}

fn log_progress(export: &str, done: u64, total: u64, from: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64().max(0.001);
    let rate = done.saturating_sub(from) as f64 / secs;
    let pct = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    let eta = if rate > 0.0 {
        format!("{:.0}s", total.saturating_sub(done) as f64 / rate)
    } else {
        "?".into()
    };
    tracing::info!(
        export,
        "re-encryption: {pct:.1}% ({done} of {total} bytes, {:.1} MiB/s, ETA {eta})",
        rate / (1024.0 * 1024.0)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::control::tests::volume;

    #[test]
    fn a_job_runs_until_the_volume_reports_done() {
        let tmp = tempfile::tempdir().unwrap();
        let vol = Arc::new(volume(tmp.path(), 1 << 20));
        let jobs = Jobs::default();
        let (_tx, shutdown) = watch::channel(false);
        let mut rx = jobs.start("v", vol.clone(), shutdown);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let done = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| !s.running))
                    .await
                    .map(|r| r.map(|s| s.clone()))
            })
            .unwrap()
            .unwrap();
        assert!(done.finished && done.done == done.total && done.total == 1 << 20);
        assert_eq!(jobs.state("v").unwrap(), done);
        assert!(jobs.follow("v").is_none(), "a finished job is not followed");
        jobs.join_all();
    }

    /// Stops after `stop_after` progress reports; counts them.
    struct Counting {
        stop_after: usize,
        seen: usize,
    }

    impl StepHandler for Counting {
        type Error = VolumeError;
        fn should_stop(&self) -> bool {
            self.seen >= self.stop_after
        }
        fn progressed(&mut self, _: ReencryptStatus) {
            self.seen += 1;
        }
        fn failed(&mut self, e: VolumeError) -> Result<(), VolumeError> {
            Err(e)
        }
    }

    #[test]
    fn the_loop_stops_when_asked_and_a_second_run_finishes() {
        let tmp = tempfile::tempdir().unwrap();
        let zone = crate::volume::ZONE_SECTORS * 4096;
        let vol = volume(tmp.path(), 3 * zone);
        let slot = crate::keys::WrappedDek {
            backend: "local".into(),
            key_id: "mk-test".into(),
            blob: vec![2; 60],
            context: crate::keys::EncryptionContext::for_volume(&vol.uuid()),
            params: Default::default(),
        };
        let dek = crate::crypto::Dek::generate().unwrap();
        vol.reencrypt_begin(dek, vec![slot]).unwrap();

        let mut first = Counting {
            stop_after: 1,
            seen: 0,
        };
        assert_eq!(step_until_done(&vol, &mut first).unwrap(), RunEnd::Stopped);
        assert_eq!(vol.reencrypt_status().unwrap().watermark, zone);

        let mut rest = Counting {
            stop_after: usize::MAX,
            seen: 0,
        };
        assert_eq!(step_until_done(&vol, &mut rest).unwrap(), RunEnd::Finished);
        assert!(vol.reencrypt_status().is_none());
        assert!(rest.seen >= 1, "{}", rest.seen);
        let mut buf = [0u8; 4096];
        vol.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [7u8; 4096], "data survives under the new key");
    }

    #[test]
    fn a_job_stops_at_shutdown() {
        let tmp = tempfile::tempdir().unwrap();
        let vol = Arc::new(volume(tmp.path(), 1 << 20));
        let jobs = Jobs::default();
        let (_tx, shutdown) = watch::channel(true);
        jobs.start("v", vol, shutdown);
        jobs.join_all();
        let s = jobs.state("v").unwrap();
        assert!(!s.running && !s.finished, "{s:?}");
    }
}
