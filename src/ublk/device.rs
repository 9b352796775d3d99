//! The `libublk` wiring: the control device, one queue thread per CPU serving its tags
//! through the [`BlockDevice`], start (new or recovered) and stop.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{BufDescList, UblkDev, UblkQueue};
use libublk::{sys, BufDesc, UblkFlags, UblkIORes};

use super::params::{ublk_params, Geometry};
use super::plan::{plan, state_name, Existing, Plan};
use super::queues::{
    guard_queue, injected_failure, panic_text, wait_start, InjectedFailure, QueueFailures,
    StartReport, FAIL_QUEUE_ENV,
};
use super::request::{execute, Request};
use super::UblkError;
use crate::blockdev::BlockDevice;

/// How a volume is exposed over ublk.
#[derive(Debug, Clone)]
pub struct UblkOptions {
    /// The export's name (the device's name in libublk's `/run/ublksrvd` record).
    pub name: String,
    /// The device id (`/dev/ublkbN`); `None`: the driver picks one. An id whose device the
    /// kernel kept quiesced after its server died is recovered.
    pub dev_id: Option<u32>,
    /// Hardware queues (one thread each) [default: one per CPU].
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Bytes of each tag's buffer: the largest read or write.
    pub io_buf_bytes: u32,
    /// How long start-up (including waiting for a dead server's device to quiesce) may take.
    pub start_timeout: Duration,
}

impl UblkOptions {
    /// Defaults for `name` and `dev_id`: one queue per CPU (at most 16), 64 tags of 256 KiB.
    pub fn new(name: &str, dev_id: Option<u32>) -> UblkOptions {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        UblkOptions {
            name: name.to_string(),
            dev_id,
            queues: u16::try_from(cpus.min(16)).unwrap_or(1),
            depth: 64,
            io_buf_bytes: 256 << 10,
            start_timeout: Duration::from_secs(60),
        }
    }
}

/// Recovery without failing what waited: requests the dead server had fetched are
/// reissued to the next one (block writes are idempotent).
const CTRL_FLAGS: u64 = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;

/// A served ublk device.
///
/// libublk keeps its control ring per thread, so the whole life of the control device
/// (add or recover, start, stop, delete) happens on one thread, the target thread; `stop`
/// asks it over a channel.
pub struct UblkFrontend {
    thread: Option<JoinHandle<Result<(), UblkError>>>,
    stop: mpsc::Sender<()>,
    device: Arc<dyn BlockDevice>,
    dev_id: u32,
    recovered: bool,
}

impl std::fmt::Debug for UblkFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkFrontend")
            .field("dev_id", &self.dev_id)
            .field("recovered", &self.recovered)
            .finish_non_exhaustive()
    }
}

impl UblkFrontend {
    /// Adds (or recovers) the device and serves `device` on it until [`UblkFrontend::stop`].
    /// Blocking: returns once `/dev/ublkbN` is live.
    pub fn start(
        device: Arc<dyn BlockDevice>,
        opts: &UblkOptions,
    ) -> Result<UblkFrontend, UblkError> {
        let geometry = Geometry {
            size: device.size(),
            sector_size: device.sector_size(),
            read_only: device.read_only(),
            io_buf_bytes: opts.io_buf_bytes,
        };
        let params = ublk_params(geometry)?;
        let (started_tx, started_rx) = mpsc::channel();
        let (stop, stop_rx) = mpsc::channel();
        // The target thread reports the start here, and so does a queue thread that fails
        // before the device is live (see `queues.rs`): the wait ends either way.
        let thread = spawn_target(opts.clone(), device.clone(), params, started_tx, stop_rx);
        let (dev_id, recovered) = match wait_start(&started_rx, opts.start_timeout * 2) {
            Ok(started) => started,
            Err(e) => {
                drop(stop);
                settle(thread, CLEAN_UP_TIME);
                return Err(e);
            }
        };
        Ok(UblkFrontend {
            thread: Some(thread),
            stop,
            device,
            dev_id,
            recovered,
        })
    }

    /// The device id: the block device is `/dev/ublkb<id>`.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// Whether this start took over a device a dead server left.
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// Stops and removes the device (what is mounted on it sees I/O errors from now on),
    /// then flushes the volume. Blocking.
    pub fn stop(mut self) -> Result<(), UblkError> {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(r) => r?,
                Err(_) => tracing::error!(dev_id = self.dev_id, "the ublk target thread panicked"),
            }
        }
        self.device
            .flush()
            .and_then(|()| self.device.persist_metadata())
            .map_err(|e| UblkError::driver("final flush", e))
    }
}

/// How long a failed start waits for the target thread to remove the device it added.
const CLEAN_UP_TIME: Duration = Duration::from_secs(10);

/// Gives the target thread of a failed start up to `bound` to end (it removes a device it
/// added when its control device drops). A thread still blocked in the kernel then (in
/// START_DEV, waiting for a queue that is gone) is left to the daemon's exit.
fn settle(thread: JoinHandle<Result<(), UblkError>>, bound: Duration) {
    let deadline = Instant::now() + bound;
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            tracing::warn!(
                "the ublk target thread is still busy {} s after the failed start",
                bound.as_secs()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its error is the one the start already returned (or came after it).
    let _ = thread.join();
}

/// Add or recover, waiting (bounded) for a dead server's device to be quiesced.
fn decide(opts: &UblkOptions) -> Result<Plan, UblkError> {
    let deadline = Instant::now() + opts.start_timeout;
    loop {
        let existing = opts.dev_id.and_then(existing_device);
        match plan(opts.dev_id, existing)? {
            Plan::Wait if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Plan::Wait => {
                return Err(UblkError::NotRecoverable {
                    id: opts.dev_id.unwrap_or_default(),
                    state: existing.map_or("gone".into(), |e| state_name(e.state)),
                    secs: opts.start_timeout.as_secs(),
                })
            }
            step => return Ok(step),
        }
    }
}

/// What the kernel has under `id`, if anything.
fn existing_device(id: u32) -> Option<Existing> {
    let ctrl = UblkCtrl::new_simple(i32::try_from(id).ok()?).ok()?;
    let info = ctrl.dev_info();
    // new_simple() is only for looking: its drop removes nothing.
    let pid = info.ublksrv_pid;
    let pid_alive =
        pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    Some(Existing {
        state: info.state,
        pid,
        pid_alive,
    })
}

/// The control device for a new device or for recovering `id`.
fn build_ctrl(opts: &UblkOptions, step: Plan) -> Result<UblkCtrl, UblkError> {
    let (id, flags) = match step {
        Plan::Recover(id) => (id_arg(Some(id)), UblkFlags::UBLK_DEV_F_RECOVER_DEV),
        Plan::Add(id) => (id_arg(id), UblkFlags::UBLK_DEV_F_ADD_DEV),
        Plan::Wait => unreachable_wait(),
    };
    UblkCtrlBuilder::default()
        .name(&opts.name)
        .id(id)
        .nr_queues(opts.queues)
        .depth(opts.depth)
        .io_buf_bytes(opts.io_buf_bytes)
        .ctrl_flags(CTRL_FLAGS)
        .dev_flags(flags)
        .build()
        .map_err(|e| UblkError::driver("ADD_DEV", e))
}

/// `decide` never returns `Wait`; an id of -1 asks the driver to pick one.
fn unreachable_wait() -> (i32, UblkFlags) {
    (-1, UblkFlags::UBLK_DEV_F_ADD_DEV)
}

fn id_arg(id: Option<u32>) -> i32 {
    id.and_then(|i| i32::try_from(i).ok()).unwrap_or(-1)
}

/// The target thread: decides add or recover, builds the control device, runs the target
/// (queue threads, START_DEV or END_USER_RECOVERY), reports on `started`, waits for `stop`,
/// then stops the device, waits for the queues and removes the device.
fn spawn_target(
    opts: UblkOptions,
    device: Arc<dyn BlockDevice>,
    params: sys::ublk_params,
    started: mpsc::Sender<StartReport>,
    stop: mpsc::Receiver<()>,
) -> JoinHandle<Result<(), UblkError>> {
    std::thread::spawn(move || {
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_target(&opts, device, params, &started, stop)
        }));
        let failed = match run {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(p) => UblkError::driver("the ublk target thread", panic_text(p.as_ref())),
        };
        // Before start-up completed this reaches `start`; afterwards it is logged.
        let text = failed.to_string();
        if started.send(Err(failed)).is_err() {
            tracing::error!("{text}");
        }
        Err(UblkError::driver("the ublk target", text))
    })
}

/// See [`spawn_target`].
fn run_target(
    opts: &UblkOptions,
    device: Arc<dyn BlockDevice>,
    params: sys::ublk_params,
    started: &mpsc::Sender<StartReport>,
    stop: mpsc::Receiver<()>,
) -> Result<(), UblkError> {
    let step = decide(opts)?;
    let ctrl = build_ctrl(opts, step)?;
    let recovered = matches!(step, Plan::Recover(_));
    if recovered {
        ctrl.start_user_recover()
            .map_err(|e| UblkError::driver("START_USER_RECOVERY", e))?;
    }
    let size = device.size();
    let tgt_init = move |dev: &mut UblkDev| {
        dev.tgt.dev_size = size;
        dev.tgt.params = params;
        Ok(())
    };
    let on_started = started.clone();
    // (libublk wants a `Sync` closure; only this thread receives.)
    let stop = std::sync::Mutex::new(stop);
    let device_fn = move |c: &UblkCtrl| {
        let _ = on_started.send(Ok((c.dev_info().dev_id, recovered)));
        // Serve until asked to stop (or until the daemon drops the frontend).
        if let Ok(rx) = stop.lock() {
            let _ = rx.recv();
        }
        if let Err(e) = c.kill_dev() {
            tracing::error!("ublk STOP_DEV failed: {e}");
        }
    };
    let failures = std::sync::Arc::new(QueueFailures::new(started.clone()));
    let queue_failures = failures.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| {
        if !guard_queue(qid, &queue_failures, || {
            serve_queue(qid, dev, device.as_ref())
        }) {
            // libublk's start waits for every queue's buffer registration and has no
            // public way to hear of a failed queue: counting this one as registered with
            // a failure (the mlock flag) makes that wait return an error instead of
            // waiting forever. The start already heard of it through `failures`.
            dev.notify_buffer_registration_complete(true);
        }
    };
    let ran = ctrl.run_target(tgt_init, q_fn, device_fn);
    // A failed queue is the cause of whatever the start reported after it.
    let failed = failures.first();
    if let Err(e) = ran {
        return Err(failed.unwrap_or_else(|| UblkError::driver("START_DEV", e)));
    }
    // libublk removes a device it added when `ctrl` drops; a recovered one was added by
    // another process, so it is removed here.
    if recovered {
        ctrl.del_dev()
            .map_err(|e| UblkError::driver("DEL_DEV", e))?;
    }
    // A queue that failed after the start: the device is gone now, the failure reported.
    failed.map_or(Ok(()), Err)
}

/// One queue: fetch every tag, then serve each request synchronously on this thread
/// until the device stops. A set-up error is returned (the caller records it).
fn serve_queue(qid: u16, dev: &UblkDev, device: &dyn BlockDevice) -> Result<(), String> {
    let hook = std::env::var(FAIL_QUEUE_ENV).ok();
    match injected_failure(hook.as_deref(), qid) {
        None => {}
        Some(InjectedFailure::Error) => return Err(format!("injected by {FAIL_QUEUE_ENV}")),
        Some(InjectedFailure::Panic) => panic!("injected by {FAIL_QUEUE_ENV}"),
    }
    let mut bufs = dev.alloc_queue_io_bufs();
    let queue = UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
        .map_err(|e| format!("queue set-up (io_uring, buffers, FETCH_REQ) failed: {e}"))?;
    let size = device.size();
    queue.wait_and_handle_io(move |q, tag, _| {
        let Some(buf) = bufs.get_mut(usize::from(tag)) else {
            tracing::error!(queue = qid, tag, "ublk tag beyond the queue depth");
            return;
        };
        let buf = buf.as_mut_slice();
        let res = match Request::decode(q.get_iod(tag).into(), size, buf.len()) {
            Ok(req) => execute(device, req, buf),
            Err(refusal) => refusal.errno(),
        };
        if let Err(e) =
            q.complete_io_cmd_unified(tag, BufDesc::Slice(buf), Ok(UblkIORes::Result(res)))
        {
            tracing::warn!(queue = qid, tag, "ublk completion failed: {e}");
        }
    });
    Ok(())
}
