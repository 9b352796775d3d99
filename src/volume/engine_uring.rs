//! The io_uring engine of the backing file ([`UringFileEngine`]): reads, writes,
//! fdatasync (`IORING_OP_FSYNC` with `DATASYNC`) and hole punching
//! (`IORING_OP_FALLOCATE`) go through an io_uring instead of pread/pwrite.
//!
//! Design: one small ring per calling thread (a thread-local, shared by every engine
//! that thread uses). The [`FileEngine`] methods are synchronous and called from the
//! server's many blocking threads at once; a per-thread ring needs no lock, no hand-off
//! to a submission thread and no wake-up of the caller by another thread, so each
//! request costs one `io_uring_enter` that submits and waits, like one pread. Reads of
//! cached pages complete inline in that call. Large buffers are split into several
//! operations of at most [`MAX_OP_LEN`] bytes. (A shared ring with a submission thread
//! was the alternative; it adds two thread switches per request, which is what the
//! server's threads cost today, so it only pays once requests are issued asynchronously
//! and many are in flight per thread: see docs/performance.md, "io_uring engine".)
//!
//! [`probe`] tells whether the kernel lets this process set up a ring with the
//! opcodes the engine needs; `engine_select` uses it to choose.

use std::cell::RefCell;
use std::fs::File;
use std::io::{Error, ErrorKind};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring, Probe};

use super::engine::{file_len, FileEngine};

/// Entries of each thread's ring: one operation is in flight per thread at a time.
const RING_ENTRIES: u32 = 4;

/// The largest read or write of one operation (the SQE's length is a u32).
const MAX_OP_LEN: usize = 1 << 30;

/// The user data of the engine's operations (checked on completion).
const OP_TAG: u64 = 0x6372_7970_7476_6f6c;

thread_local! {
    /// This thread's ring, set up on its first use.
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// Positioned I/O on the backing file through io_uring (see the module docs).
#[derive(Debug)]
pub(crate) struct UringFileEngine {
    file: Arc<File>,
}

impl UringFileEngine {
    pub(crate) fn new(file: Arc<File>) -> Self {
        Self { file }
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }
}

impl FileEngine for UringFileEngine {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset_plus(offset, done)?;
            match self.read_some_at(&mut buf[done..], at)? {
                0 => {
                    buf[done..].fill(0);
                    break;
                }
                n => done += n,
            }
        }
        Ok(())
    }

    fn read_some_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let len = buf.len().min(MAX_OP_LEN);
        let sqe = opcode::Read::new(self.fd(), buf.as_mut_ptr(), op_len(len))
            .offset(offset)
            .build();
        // SAFETY: `buf` is borrowed mutably for the whole call and `run` returns only
        // once the kernel has completed the operation, so the kernel writes into memory
        // that is valid and not otherwise accessed.
        unsafe { run(sqe) }.map(|n| n as usize)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let part = &buf[done..];
            let len = part.len().min(MAX_OP_LEN);
            let at = offset_plus(offset, done)?;
            let sqe = opcode::Write::new(self.fd(), part.as_ptr(), op_len(len))
                .offset(at)
                .build();
            // SAFETY: `part` is borrowed for the whole call and `run` returns only once
            // the kernel has completed the operation.
            match unsafe { run(sqe) }? {
                0 => {
                    return Err(Error::new(
                        ErrorKind::WriteZero,
                        "failed to write whole buffer",
                    ))
                }
                n => done += n as usize,
            }
        }
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        let sqe = opcode::Fsync::new(self.fd())
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        // SAFETY: the operation references no memory of ours.
        unsafe { run(sqe) }.map(|_| ())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if i64::try_from(offset).is_err() || i64::try_from(len).is_err() {
            return Err(Error::from_raw_os_error(libc::EFBIG));
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let sqe = opcode::Fallocate::new(self.fd(), len)
            .offset(offset)
            .mode(mode)
            .build();
        // SAFETY: the operation references no memory of ours.
        match unsafe { run(sqe) } {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn len(&self) -> std::io::Result<u64> {
        file_len(&self.file)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_all(&self) -> std::io::Result<()> {
        self.file.sync_all()
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

fn op_len(len: usize) -> u32 {
    // `len` is at most MAX_OP_LEN (< u32::MAX).
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn offset_plus(offset: u64, done: usize) -> std::io::Result<u64> {
    offset
        .checked_add(done as u64)
        .ok_or_else(|| Error::from_raw_os_error(libc::EFBIG))
}

/// Runs one operation on this thread's ring and waits for it: the number of bytes (or
/// 0) it returned, or its error. Interrupted operations (EINTR, EAGAIN) are retried.
///
/// # Safety
/// Every buffer `sqe` points to must stay valid (and, for a read, otherwise unaccessed)
/// until this returns; this returns only once the kernel is done with the operation.
unsafe fn run(sqe: squeue::Entry) -> std::io::Result<u32> {
    loop {
        let res = RING.with(|cell| {
            let mut slot = cell
                .try_borrow_mut()
                .map_err(|_| Error::other("io_uring engine re-entered on one thread"))?;
            if slot.is_none() {
                *slot = Some(IoUring::new(RING_ENTRIES)?);
            }
            let Some(ring) = slot.as_mut() else {
                return Err(Error::other("io_uring ring missing after set-up"));
            };
            // SAFETY: the caller's contract (buffers valid until we return) is passed on.
            let out = unsafe { submit_and_reap(ring, &sqe) };
            if out.is_err() && !ring.submission().is_empty() {
                // An entry the kernel never consumed: a fresh ring on the next use
                // discards it.
                *slot = None;
            }
            out
        })?;
        match res {
            r if r >= 0 => return Ok(r.unsigned_abs()),
            r if -r == libc::EINTR || -r == libc::EAGAIN => continue,
            r => return Err(Error::from_raw_os_error(-r)),
        }
    }
}

/// Pushes `sqe`, submits it and waits for its completion: the completion's result.
///
/// # Safety
/// As [`run`]. The ring has no operation in flight on entry and none on return.
unsafe fn submit_and_reap(ring: &mut IoUring, sqe: &squeue::Entry) -> std::io::Result<i32> {
    let sqe = sqe.clone().user_data(OP_TAG);
    // SAFETY: the buffers `sqe` references are valid until we return (caller's
    // contract), and we return only after its completion has been reaped.
    unsafe { ring.submission().push(&sqe) }
        .map_err(|_| Error::other("io_uring submission queue full"))?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            // Not consumed by the kernel: nothing is in flight, give up (`run` discards
            // the ring).
            Err(e) if !ring.submission().is_empty() && !is_transient(&e) => return Err(e),
            // Consumed (in flight) or a transient failure: the kernel may hold the
            // buffer, so keep waiting for the completion.
            Err(_) => {}
        }
        // Only this operation is ever in flight on the ring; a completion of anything
        // else (none is expected) is skipped rather than taken for ours.
        let mut completions = ring.completion();
        if let Some(cqe) = completions.find(|c| c.user_data() == OP_TAG) {
            return Ok(cqe.result());
        }
    }
}

fn is_transient(e: &Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}

/// Whether this process can use the engine: a ring can be set up and the kernel
/// supports read, write, fsync and fallocate through it. The error says why not.
pub(crate) fn probe() -> Result<(), String> {
    let ring = IoUring::new(2).map_err(|e| format!("cannot set up an io_uring: {e}"))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("cannot probe the kernel's io_uring opcodes: {e}"))?;
    let needed = [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Fallocate::CODE, "FALLOCATE"),
    ];
    match needed.iter().find(|(code, _)| !probe.is_supported(*code)) {
        Some((_, name)) => Err(format!("the kernel's io_uring does not support {name}")),
        None => Ok(()),
    }
}
