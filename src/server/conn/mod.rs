//! One client connection: the handshake on the async runtime, then transmission on a
//! small set of dedicated threads.
//!
//! Transmission follows the model nbdkit uses: each transmission thread takes the
//! connection's read lock, reads one request (and its payload), releases the lock,
//! performs the request (file I/O and XTS) and writes its reply under the write lock.
//! A request is thus read, served and answered by the same thread, with no hand-off
//! between threads, and replies go out in completion order. Threads are started lazily
//! (one at first, another whenever no thread is left waiting to read) up to
//! `ServerConfig::threads_per_connection`. Crypto and file I/O never run on the async
//! runtime.
//!
//! Modules by phase: [`session`] (accept to close), [`handshake`] and [`refusals`] (on
//! the async runtime), [`stream`] (the socket before and after it leaves the runtime),
//! [`state`] (the shared transmission state and its threads), [`reader`] (requests in),
//! [`commands`] (requests served on the `BlockDevice`) and [`reply`] (replies out).

mod commands;
mod handshake;
mod reader;
mod refusals;
mod reply;
mod session;
mod state;
mod stream;

pub(crate) use session::run;

#[cfg(test)]
mod tests;
