//! `rbd_aio_*` completions bridged to Rust: each operation carries a boxed closure that
//! librbd's callback thread calls once with the operation's return value. A blocking
//! caller waits on a channel ([`run_blocking`]); an async caller awaits a oneshot
//! ([`run_async`]) whose closure owns the I/O buffer until librbd is done with it.

use std::ffi::{c_int, c_void};
use std::ptr;

use super::ffi;

/// What runs when an operation completes: its return value (bytes, or a negative errno).
type Done = Box<dyn FnOnce(isize) + Send>;

/// The C callback: takes back the boxed closure, releases the completion, calls it.
unsafe extern "C" fn on_complete(c: ffi::RbdCompletionT, arg: *mut c_void) {
    // SAFETY: `c` is the completion librbd is completing; reading its value is allowed
    // inside the callback (qemu's block/rbd.c does the same).
    let ret = unsafe { ffi::rbd_aio_get_return_value(c) };
    // SAFETY: `arg` is the `Box<Done>` leaked in `submit` for this completion only; the
    // callback runs exactly once, so ownership is taken back exactly once.
    let done = unsafe { Box::from_raw(arg.cast::<Done>()) };
    // SAFETY: librbd holds its own reference while the callback runs; releasing our
    // reference here is the documented pattern and `c` is not used after.
    unsafe { ffi::rbd_aio_release(c) };
    done(ret);
}

/// Creates a completion carrying `done` and starts an operation with it. `start` gets the
/// completion and returns librbd's submission result. On a submission error `done` is
/// dropped uncalled and the negative errno is returned.
///
/// # Safety
/// `start` must hand the completion to exactly one `rbd_aio_*` call whose buffers stay
/// valid until `done` runs.
unsafe fn submit(start: impl FnOnce(ffi::RbdCompletionT) -> c_int, done: Done) -> Result<(), i32> {
    let arg = Box::into_raw(Box::new(done)).cast::<c_void>();
    let mut c: ffi::RbdCompletionT = ptr::null_mut();
    // SAFETY: `arg` is a valid leaked box, `on_complete` matches rbd_callback_t, `c` is a
    // valid out-pointer.
    let r = unsafe { ffi::rbd_aio_create_completion(arg, on_complete, &mut c) };
    if r < 0 {
        // SAFETY: the completion was not created, so nobody else owns `arg`.
        drop(unsafe { Box::from_raw(arg.cast::<Done>()) });
        return Err(r);
    }
    let r = start(c);
    if r < 0 {
        // SAFETY: submission failed, so librbd never calls back: we own both `c` and
        // `arg` again.
        unsafe {
            ffi::rbd_aio_release(c);
            drop(Box::from_raw(arg.cast::<Done>()));
        }
        return Err(r);
    }
    Ok(())
}

/// Starts an operation and blocks the calling thread until it completes; returns its
/// value (negative: an errno).
///
/// # Safety
/// As [`submit`]; the buffers `start` passes may be borrowed from the caller: this
/// function does not return before librbd has completed the operation.
pub(super) unsafe fn run_blocking(start: impl FnOnce(ffi::RbdCompletionT) -> c_int) -> i64 {
    let (tx, rx) = std::sync::mpsc::sync_channel::<isize>(1);
    let done: Done = Box::new(move |r| {
        let _ = tx.send(r);
    });
    // SAFETY: forwarded to the caller's contract; we wait below for the completion.
    if let Err(r) = unsafe { submit(start, done) } {
        return i64::from(r);
    }
    // The sender is only dropped after sending (the callback runs once), so `recv` returns
    // the value; a closed channel cannot happen but is reported as EIO, not a panic.
    rx.recv().map_or(-i64::from(libc::EIO), |r| r as i64)
}

/// Starts an operation whose buffer `keep` is owned by the completion, and returns a
/// future of its value and the buffer back.
///
/// # Safety
/// As [`submit`]; `start` may only pass pointers into `keep`'s heap storage (which does
/// not move when `keep` is moved into the closure).
pub(super) unsafe fn run_async<K: Send + 'static>(
    keep: K,
    start: impl FnOnce(ffi::RbdCompletionT) -> c_int,
) -> impl std::future::Future<Output = (i64, Option<K>)> {
    let (tx, rx) = tokio::sync::oneshot::channel::<(isize, K)>();
    let done: Done = Box::new(move |r| {
        let _ = tx.send((r, keep));
    });
    // SAFETY: forwarded to the caller's contract; `keep` lives in the closure until done.
    let submitted = unsafe { submit(start, done) };
    async move {
        match submitted {
            Err(r) => (i64::from(r), None),
            Ok(()) => match rx.await {
                Ok((r, keep)) => (r as i64, Some(keep)),
                Err(_) => (-i64::from(libc::EIO), None),
            },
        }
    }
}
