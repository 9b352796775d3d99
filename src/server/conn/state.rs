//! The transmission state of one connection ([`Conn`]), shared by its threads, and the
//! lifecycle of those threads: started lazily, each one looping read → serve → reply,
//! the last one out reporting the connection done.

use std::io::BufReader;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};

use tokio::sync::oneshot;

use super::reader::Incoming;
use super::reply::rejection_message;
use super::stream::BlockingStream;
use crate::blockdev::BlockDevice;
use crate::nbd::{self, Negotiated};
use crate::server::budget::{BufferPool, ByteBudget};
use crate::server::metrics::ExportMetrics;
use crate::server::Shared;

/// A transmission thread keeps a payload buffer up to this size between requests; a
/// larger one goes back to the server-wide [`BufferPool`] (bounded) as soon as its
/// request is answered, so that the memory idle connections hold stays small (payload
/// memory in use is bounded by the byte budget; see
/// `budget::return_freed_memory_to_the_system` for why freeing really returns it).
pub(super) const KEEP_BUFFER: usize = 64 * 1024;

/// The transmission state of one connection, shared by its threads.
pub(super) struct Conn {
    pub(super) reader: Mutex<BufReader<BlockingStream>>,
    pub(super) writer: Mutex<BlockingStream>,
    pub(super) device: Arc<dyn BlockDevice>,
    /// What requests are checked against: the export as the handshake described it, with
    /// the size raised when the export grows online (the client keeps the size it was
    /// told, but one told more out of band, as a kernel device by `cryptvol attach
    /// --refresh-size`, uses its open connections for the grown space).
    pub(super) info: RwLock<nbd::ExportInfo>,
    /// Structured replies and metadata contexts, as the handshake settled them.
    pub(super) negotiated: Negotiated,
    pub(super) budget: Arc<ByteBudget>,
    pub(super) buffers: Arc<BufferPool>,
    pub(super) id: u64,
    pub(super) max_threads: usize,
    /// `--idle-timeout`: the socket's receive/send timeout.
    pub(super) idle_timeout: Option<std::time::Duration>,
    /// Set once no further request may be read (DISC, EOF, error, shutdown).
    pub(super) closing: AtomicBool,
    /// Threads alive / threads waiting to read a request.
    pub(super) threads: AtomicUsize,
    pub(super) waiting: AtomicUsize,
    pub(super) requests: AtomicU64,
    pub(super) bytes_read: AtomicU64,
    pub(super) bytes_written: AtomicU64,
    /// The export's counters (`serve --metrics`).
    pub(super) metrics: Arc<ExportMetrics>,
    pub(super) reason: Mutex<Option<String>>,
    pub(super) done: Mutex<Option<oneshot::Sender<()>>>,
}

impl Conn {
    pub(super) fn new(
        stream: BlockingStream,
        device: Arc<dyn BlockDevice>,
        info: nbd::ExportInfo,
        negotiated: Negotiated,
        id: u64,
        shared: &Shared,
        metrics: Arc<ExportMetrics>,
    ) -> std::io::Result<Conn> {
        let config = &shared.config;
        let idle_timeout = config.idle_timeout;
        if idle_timeout.is_some() {
            stream.set_timeouts(idle_timeout)?;
        }
        let writer = stream.try_clone()?;
        Ok(Conn {
            reader: Mutex::new(BufReader::with_capacity(64 * 1024, stream)),
            writer: Mutex::new(writer),
            device,
            info: RwLock::new(info),
            negotiated,
            budget: shared.budget.clone(),
            buffers: shared.buffers.clone(),
            id,
            max_threads: config.threads_per_connection.max(1),
            idle_timeout,
            closing: AtomicBool::new(false),
            threads: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            metrics,
            reason: Mutex::new(None),
            done: Mutex::new(None),
        })
    }

    /// Marks the connection as closing, keeping the first reason.
    pub(super) fn close(&self, reason: &str) {
        self.closing.store(true, Ordering::SeqCst);
        let mut r = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if r.is_none() {
            *r = Some(reason.to_string());
        }
    }

    pub(super) fn spawn_worker(conn: &Arc<Conn>) -> std::io::Result<()> {
        conn.threads.fetch_add(1, Ordering::SeqCst);
        let c = conn.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("cryptvol-conn{}", conn.id))
            .spawn(move || {
                c.worker();
                // Release this thread's reference (and with it, possibly the last one to
                // the volume and its key schedules) before the connection is reported
                // finished, so that shutdown really drops every volume.
                let done = c.thread_exit_take();
                if done.is_some() && !c.device.read_only() {
                    // The connection is over: make the allocation map of its writes
                    // durable now rather than at the next flush (clients such as
                    // nbdcopy disconnect without flushing; data they wrote must not
                    // vanish if the server is killed later).
                    if let Err(e) = c.device.persist_metadata() {
                        tracing::warn!(conn = c.id, "writing the allocation map failed: {e}");
                    }
                }
                drop(c);
                if let Some(tx) = done {
                    let _ = tx.send(());
                }
            });
        if let Err(e) = spawned {
            conn.thread_exit();
            return Err(e);
        }
        Ok(())
    }

    pub(super) fn thread_exit(&self) {
        if let Some(tx) = self.thread_exit_take() {
            let _ = tx.send(());
        }
    }

    /// Counts a thread out; for the last one, the sender that reports the connection done.
    pub(super) fn thread_exit_take(&self) -> Option<oneshot::Sender<()>> {
        if self.threads.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.done
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
        } else {
            None
        }
    }

    /// The loop of one transmission thread.
    pub(super) fn worker(self: &Arc<Self>) {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let incoming = self.next_request(&mut buf);
            let still_waiting = self.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
            match incoming {
                Incoming::Stop => return,
                Incoming::Reject(cookie, errno) => {
                    self.metrics.error(errno);
                    if !self.send_error(cookie, errno, rejection_message(errno)) {
                        return;
                    }
                }
                Incoming::Serve(cookie, req, guard) => {
                    // Keep one thread ready to read while this one works.
                    if still_waiting == 0
                        && !self.closing.load(Ordering::SeqCst)
                        && self.threads.load(Ordering::SeqCst) < self.max_threads
                    {
                        if let Err(e) = Conn::spawn_worker(self) {
                            tracing::warn!(
                                conn = self.id,
                                "cannot start another transmission thread: {e}"
                            );
                        }
                    }
                    let ok = self.serve(cookie, req, &mut buf);
                    // Give a large buffer back before its bytes go back to the budget.
                    if buf.capacity() > KEEP_BUFFER {
                        self.buffers.put(std::mem::take(&mut buf));
                    }
                    drop(guard);
                    if !ok {
                        return;
                    }
                }
            }
        }
    }
}

impl Conn {
    /// The export as requests are checked against now: the handshake's, its size raised
    /// to the export's current one after an online grow (sizes never shrink).
    pub(super) fn bounds(&self) -> RwLockReadGuard<'_, nbd::ExportInfo> {
        let size = self.device.size();
        {
            let info = self.info.read().unwrap_or_else(PoisonError::into_inner);
            if info.size >= size {
                return info;
            }
        }
        {
            let mut info = self.info.write().unwrap_or_else(PoisonError::into_inner);
            info.size = info.size.max(size);
        }
        self.info.read().unwrap_or_else(PoisonError::into_inner)
    }
}
