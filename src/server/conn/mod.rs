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

use std::io::{BufReader, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_rustls::server::TlsStream;

use super::budget::{BudgetGuard, BufferPool, ByteBudget};
use super::export::{errno_for, AuthorizedCatalog};
use super::peer::PeerIdentity;
use super::tls::{cert_identity, handshake_failure, BlockingTls, PlainSocket};
use super::Shared;
use crate::blockdev::BlockDevice;
use crate::nbd::{
    self, encode_simple_reply, parse_client_flags, parse_option_header, parse_request,
    server_greeting, structured, validate_negotiated, NbdErrno, Negotiated, Negotiation, Next,
    Refusal, TlsMode, ValidRequest, MAX_OPTION_LEN, REQUEST_HEADER_LEN, STATE_HOLE, STATE_ZERO,
};

/// Why a connection ended before transmission.
#[derive(Debug, thiserror::Error)]
enum HandshakeFailure {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] nbd::HandshakeError),
    #[error("client ended the negotiation")]
    Closed,
    #[error("handshake timed out")]
    Timeout,
    #[error("server is shutting down")]
    Shutdown,
    #[error("more than {MAX_REFUSALS} requests for exports the client may not open")]
    TooManyRefusals,
    /// Logged as "TLS handshake with PEER failed: ...".
    #[error("{0}")]
    Tls(String),
    #[error(
        "plaintext client refused: this server requires TLS (--tls require) and the client \
         did not send NBD_OPT_STARTTLS; no export was listed or opened"
    )]
    TlsRequired,
}

/// The socket after the handshake: the accepted one, or TLS over it.
enum Transport<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
}

/// What the handshake settled.
struct Handshake<S> {
    transport: Transport<S>,
    export: String,
    negotiated: Negotiated,
}

/// Refused export requests a connection may make before it is closed (a client probing
/// names costs at most this many audit records per connection).
const MAX_REFUSALS: usize = 16;

/// A socket that can leave the async runtime for blocking transmission threads.
pub(crate) trait IntoBlocking: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn into_blocking(self) -> std::io::Result<BlockingStream>;
}

impl IntoBlocking for tokio::net::TcpStream {
    fn into_blocking(self) -> std::io::Result<BlockingStream> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(BlockingStream::Tcp(s))
    }
}

impl IntoBlocking for tokio::net::UnixStream {
    fn into_blocking(self) -> std::io::Result<BlockingStream> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        Ok(BlockingStream::Unix(s))
    }
}

/// A blocking TCP or Unix stream, or TLS over one.
pub(crate) enum BlockingStream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
    Tls(BlockingTls),
}

impl BlockingStream {
    fn try_clone(&self) -> std::io::Result<BlockingStream> {
        Ok(match self {
            BlockingStream::Tcp(s) => BlockingStream::Tcp(s.try_clone()?),
            BlockingStream::Unix(s) => BlockingStream::Unix(s.try_clone()?),
            BlockingStream::Tls(s) => BlockingStream::Tls(s.try_clone()?),
        })
    }
    /// Sets `SO_RCVTIMEO` and `SO_SNDTIMEO` (shared by every clone of the socket).
    fn set_timeouts(&self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        match self {
            BlockingStream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            BlockingStream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            BlockingStream::Tls(s) => s.set_timeouts(t),
        }
    }
    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            BlockingStream::Tcp(s) => s.shutdown(how),
            BlockingStream::Unix(s) => s.shutdown(how),
            BlockingStream::Tls(s) => {
                s.shutdown(how);
                Ok(())
            }
        };
    }
}

impl Read for BlockingStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            BlockingStream::Tcp(s) => s.read(buf),
            BlockingStream::Unix(s) => s.read(buf),
            BlockingStream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for BlockingStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            BlockingStream::Tcp(s) => s.write(buf),
            BlockingStream::Unix(s) => s.write(buf),
            BlockingStream::Tls(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            BlockingStream::Tcp(s) => s.write_vectored(bufs),
            BlockingStream::Unix(s) => s.write_vectored(bufs),
            BlockingStream::Tls(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs one connection to completion. Never panics on client input.
pub(crate) async fn run<S: IntoBlocking>(
    stream: S,
    mut peer: PeerIdentity,
    id: u64,
    shared: Arc<Shared>,
) {
    let mut shutdown = shared.shutdown.clone();
    let negotiated = tokio::select! {
        r = tokio::time::timeout(shared.config.handshake_timeout, handshake(stream, &shared, &mut peer, id)) => {
            match r {
                Ok(r) => r,
                Err(_) => Err(HandshakeFailure::Timeout),
            }
        }
        _ = shutdown.wait_for(|s| *s) => Err(HandshakeFailure::Shutdown),
    };
    let Handshake {
        transport,
        export,
        negotiated,
    } = match negotiated {
        Ok(x) => x,
        Err(HandshakeFailure::Closed) => {
            tracing::debug!(conn = id, peer = %peer, "client closed during negotiation");
            return;
        }
        Err(HandshakeFailure::Tls(reason)) => {
            tracing::warn!(conn = id, "TLS handshake with {peer} failed: {reason}");
            return;
        }
        Err(e @ HandshakeFailure::TlsRequired) => {
            tracing::warn!(conn = id, peer = %peer, "{e}");
            return;
        }
        Err(e) => {
            tracing::info!(conn = id, peer = %peer, "negotiation ended: {e}");
            return;
        }
    };
    let Some(exp) = shared.exports.get(&export) else {
        return;
    };
    let _counted = exp.connection_guard();
    let tls = matches!(transport, Transport::Tls(_));
    let (stream, control) = match transport
        .into_blocking()
        .and_then(|s| s.try_clone().map(|c| (s, c)))
    {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(conn = id, peer = %peer, "cannot start transmission: {e}");
            return;
        }
    };
    tracing::info!(
        conn = id,
        peer = %peer,
        export = %export,
        tls,
        client = peer.cert.as_ref().map(|c| c.subject.as_str()).unwrap_or(""),
        "client connected"
    );
    tracing::debug!(
        conn = id,
        structured_replies = negotiated.structured_replies,
        base_allocation = negotiated.base_allocation.is_some(),
        "negotiated"
    );
    let conn = match Conn::new(
        stream,
        exp.device.clone(),
        exp.info.clone(),
        negotiated,
        id,
        &shared,
    ) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::warn!(conn = id, peer = %peer, "cannot start transmission: {e}");
            return;
        }
    };
    let (done_tx, mut done_rx) = oneshot::channel();
    *conn.done.lock().unwrap_or_else(PoisonError::into_inner) = Some(done_tx);
    if let Err(e) = Conn::spawn_worker(&conn) {
        tracing::warn!(conn = id, peer = %peer, "cannot start a transmission thread: {e}");
        return;
    }
    let stopping = tokio::select! {
        _ = &mut done_rx => false,
        r = shutdown.wait_for(|s| *s) => r.is_ok(),
    };
    if stopping {
        // Stop reading new requests; in-flight ones finish and are answered.
        conn.close("server shutting down");
        control.shutdown(Shutdown::Read);
        let _ = done_rx.await;
    }
    let reason = conn
        .reason
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let counters = (
        conn.requests.load(Ordering::Relaxed),
        conn.bytes_read.load(Ordering::Relaxed),
        conn.bytes_written.load(Ordering::Relaxed),
    );
    // The last handle of a TLS session sends close_notify.
    drop(conn);
    drop(control);
    tracing::info!(
        conn = id,
        peer = %peer,
        export = %export,
        requests = counters.0,
        bytes_read = counters.1,
        bytes_written = counters.2,
        "client disconnected{}",
        reason.map(|r| format!(": {r}")).unwrap_or_default()
    );
}

/// The whole handshake: greeting, options, and the TLS upgrade when the client sends
/// `NBD_OPT_STARTTLS` (and TLS is configured). A verified client certificate becomes part
/// of `peer` as soon as TLS is up, before any export is listed or opened over it.
async fn handshake<S>(
    mut s: S,
    shared: &Shared,
    peer: &mut PeerIdentity,
    id: u64,
) -> Result<Handshake<S>, HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut refusals = Refusals::default();
    s.write_all(&server_greeting()).await?;
    let mut flags = [0u8; 4];
    read_or_closed(&mut s, &mut flags).await?;
    let client = parse_client_flags(flags)?;
    let tls = shared.config.tls.as_deref();
    let mode = tls.map_or(TlsMode::Off, |t| t.mode());
    let mut neg = Negotiation::with_tls(client, mode);
    let step = match options(&mut s, &mut neg, shared, peer, &mut refusals).await {
        Err(HandshakeFailure::Closed) if neg.tls_refusals() > 0 => {
            return Err(HandshakeFailure::TlsRequired)
        }
        r => r?,
    };
    let Some(tls) = tls.filter(|_| step.is_none()) else {
        let (export, negotiated) = step.ok_or(HandshakeFailure::Closed)?;
        return Ok(Handshake {
            transport: Transport::Plain(s),
            export,
            negotiated,
        });
    };
    // NBD_OPT_STARTTLS was acknowledged: the TLS handshake follows at once.
    let mut s = tls
        .acceptor()
        .accept(s)
        .await
        .map_err(|e| HandshakeFailure::Tls(handshake_failure(&e)))?;
    neg.tls_started();
    // rustls returns client certificates only when it verified them (--tls-client-ca).
    peer.cert = s
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(cert_identity);
    match &peer.cert {
        Some(c) => {
            tracing::info!(conn = id, peer = %peer, "TLS established; verified client certificate: {c}")
        }
        None => tracing::info!(conn = id, peer = %peer, "TLS established (no client certificate)"),
    }
    let (export, negotiated) = options(&mut s, &mut neg, shared, peer, &mut refusals)
        .await?
        .ok_or(HandshakeFailure::Closed)?;
    Ok(Handshake {
        transport: Transport::Tls(Box::new(s)),
        export,
        negotiated,
    })
}

/// Negotiates options until transmission (`Some`) or an acknowledged `NBD_OPT_STARTTLS`
/// (`None`). Exports are listed and opened through `peer`'s view of the catalog; refusals
/// are recorded before the client hears of them.
async fn options<S>(
    s: &mut S,
    neg: &mut Negotiation,
    shared: &Shared,
    peer: &PeerIdentity,
    refusals: &mut Refusals,
) -> Result<Option<(String, Negotiated)>, HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let daemon_uid = nix::unistd::geteuid().as_raw();
    loop {
        let mut hdr = [0u8; 16];
        read_or_closed(s, &mut hdr).await?;
        let hdr = parse_option_header(&hdr)?;
        let outcome = if hdr.len > MAX_OPTION_LEN {
            let mut limited = (&mut *s).take(u64::from(hdr.len));
            let skipped = tokio::io::copy(&mut limited, &mut tokio::io::sink()).await?;
            if skipped != u64::from(hdr.len) {
                return Err(HandshakeFailure::Closed);
            }
            neg.handle_oversized(&hdr)
        } else {
            let mut data = vec![0u8; hdr.len as usize];
            read_or_closed(s, &mut data).await?;
            let catalog = AuthorizedCatalog {
                exports: &shared.exports,
                peer,
                daemon_uid,
            };
            neg.handle_option(&hdr, &data, &catalog)
        };
        if let Some(refusal) = &outcome.refusal {
            // Recorded before the client hears of it.
            refusals.record(shared, peer, refusal).await?;
        }
        s.write_all(&outcome.reply).await?;
        // Nothing may stay queued in a TLS session when it leaves the runtime.
        s.flush().await?;
        match outcome.next {
            Next::Continue => {}
            Next::Transmit { export, .. } => return Ok(Some((export.name, neg.negotiated()))),
            Next::StartTls => return Ok(None),
            Next::Close => return Err(HandshakeFailure::Closed),
        }
    }
}

/// The refusals of one connection: each export's first refusal is logged and audited.
#[derive(Default)]
struct Refusals {
    count: usize,
    audited: Vec<String>,
}

impl Refusals {
    async fn record(
        &mut self,
        shared: &Shared,
        peer: &PeerIdentity,
        refusal: &Refusal,
    ) -> Result<(), HandshakeFailure> {
        self.count += 1;
        if self.count > MAX_REFUSALS {
            return Err(HandshakeFailure::TooManyRefusals);
        }
        if self.audited.contains(&refusal.export) {
            return Ok(());
        }
        self.audited.push(refusal.export.clone());
        tracing::warn!(
            peer = %peer,
            listener = %peer.listener,
            export = %refusal.export,
            "refused: the client may not open this export: {}",
            refusal.reason
        );
        let Some(log) = shared.config.audit_log.clone() else {
            return Ok(());
        };
        let (peer, refusal) = (peer.clone(), refusal.clone());
        let written = tokio::task::spawn_blocking(move || {
            let event = crate::keys::AccessEvent {
                export: &refusal.export,
                listener: &peer.listener,
                peer: &peer.addr,
                peer_uid: peer.cred.map(|c| c.uid),
                peer_gid: peer.cred.map(|c| c.gid),
                peer_pid: peer.cred.and_then(|c| c.pid),
                tls_subject: peer.cert.as_ref().map(|c| c.subject.as_str()),
                reason: &refusal.reason,
            };
            log.record_access(&event, &crate::keys::Principal::current())
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("cannot audit a refused client: {e}"),
            Err(e) => tracing::error!("cannot audit a refused client: {e}"),
        }
        Ok(())
    }
}

impl<S: IntoBlocking> Transport<S> {
    /// The blocking stream the transmission threads use. A TLS session moves with its
    /// socket (and any plaintext it has already received) to the threads, which encrypt
    /// and decrypt themselves (see `tls::BlockingTls`); a plaintext socket is unchanged.
    fn into_blocking(self) -> std::io::Result<BlockingStream> {
        match self {
            Transport::Plain(s) => s.into_blocking(),
            Transport::Tls(tls) => {
                let (io, session) = tls.into_inner();
                let sock = match io.into_blocking()? {
                    BlockingStream::Tcp(s) => PlainSocket::Tcp(s),
                    BlockingStream::Unix(s) => PlainSocket::Unix(s),
                    BlockingStream::Tls(_) => {
                        return Err(std::io::Error::other("TLS over TLS is not supported"))
                    }
                };
                Ok(BlockingStream::Tls(BlockingTls::new(sock, session)?))
            }
        }
    }
}

async fn read_or_closed<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
) -> Result<(), HandshakeFailure> {
    match rd.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(HandshakeFailure::Closed),
        Err(e) => Err(e.into()),
    }
}

/// A transmission thread keeps a payload buffer up to this size between requests; a
/// larger one goes back to the server-wide [`BufferPool`] (bounded) as soon as its
/// request is answered, so that the memory idle connections hold stays small (payload
/// memory in use is bounded by the byte budget; see
/// `budget::return_freed_memory_to_the_system` for why freeing really returns it).
const KEEP_BUFFER: usize = 64 * 1024;

/// The transmission state of one connection, shared by its threads.
struct Conn {
    reader: Mutex<BufReader<BlockingStream>>,
    writer: Mutex<BlockingStream>,
    device: Arc<dyn BlockDevice>,
    info: nbd::ExportInfo,
    /// Structured replies and metadata contexts, as the handshake settled them.
    negotiated: Negotiated,
    budget: Arc<ByteBudget>,
    buffers: Arc<BufferPool>,
    id: u64,
    max_threads: usize,
    /// `--idle-timeout`: the socket's receive/send timeout.
    idle_timeout: Option<std::time::Duration>,
    /// Set once no further request may be read (DISC, EOF, error, shutdown).
    closing: AtomicBool,
    /// Threads alive / threads waiting to read a request.
    threads: AtomicUsize,
    waiting: AtomicUsize,
    requests: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    reason: Mutex<Option<String>>,
    done: Mutex<Option<oneshot::Sender<()>>>,
}

/// What the reading thread got.
enum Incoming {
    /// Serve this request; the payload (WRITE) is in the thread's buffer.
    Serve(u64, ValidRequest, Option<BudgetGuard>),
    /// Answer this error (the payload, if any, was discarded).
    Reject(u64, NbdErrno),
    /// Stop reading.
    Stop,
}

impl Conn {
    fn new(
        stream: BlockingStream,
        device: Arc<dyn BlockDevice>,
        info: nbd::ExportInfo,
        negotiated: Negotiated,
        id: u64,
        shared: &Shared,
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
            info,
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
            reason: Mutex::new(None),
            done: Mutex::new(None),
        })
    }

    /// Marks the connection as closing, keeping the first reason.
    fn close(&self, reason: &str) {
        self.closing.store(true, Ordering::SeqCst);
        let mut r = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if r.is_none() {
            *r = Some(reason.to_string());
        }
    }

    fn spawn_worker(conn: &Arc<Conn>) -> std::io::Result<()> {
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

    fn thread_exit(&self) {
        if let Some(tx) = self.thread_exit_take() {
            let _ = tx.send(());
        }
    }

    /// Counts a thread out; for the last one, the sender that reports the connection done.
    fn thread_exit_take(&self) -> Option<oneshot::Sender<()>> {
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
    fn worker(self: &Arc<Self>) {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let incoming = self.next_request(&mut buf);
            let still_waiting = self.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
            match incoming {
                Incoming::Stop => return,
                Incoming::Reject(cookie, errno) => {
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

    /// Reads the next request under the read lock. A WRITE's payload lands in `buf`.
    fn next_request(&self, buf: &mut Vec<u8>) -> Incoming {
        let mut rd = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        if self.closing.load(Ordering::SeqCst) {
            return Incoming::Stop;
        }
        let mut hdr = [0u8; REQUEST_HEADER_LEN];
        let mut filled = 0;
        while filled < hdr.len() {
            match rd.read(&mut hdr[filled..]) {
                Ok(0) => {
                    self.close(if filled == 0 {
                        "client closed the connection without NBD_CMD_DISC"
                    } else {
                        "client closed the connection in the middle of a request"
                    });
                    return Incoming::Stop;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    // The idle timeout: no request for that long. A request still being
                    // served (by another thread) means the client is not idle.
                    if self.busy() {
                        continue;
                    }
                    let secs = self.idle_timeout.map_or(0, |t| t.as_secs());
                    self.close(&format!(
                        "no request for {secs} s: idle timeout (--idle-timeout)"
                    ));
                    return Incoming::Stop;
                }
                Err(e) => {
                    self.close(&format!("read error: {e}"));
                    return Incoming::Stop;
                }
            }
        }
        let req = match parse_request(&hdr) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(conn = self.id, "closing connection: {e}");
                self.close(&e.to_string());
                return Incoming::Stop;
            }
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let valid = match validate_negotiated(&req, &self.info, &self.negotiated) {
            Ok(v) => v,
            Err(rej) => {
                let payload = u64::from(req.payload_len());
                if payload > 0 {
                    match std::io::copy(&mut (&mut *rd).take(payload), &mut std::io::sink()) {
                        Ok(n) if n == payload => {}
                        _ => {
                            self.close("client closed during a write payload");
                            return Incoming::Stop;
                        }
                    }
                }
                tracing::debug!(conn = self.id, ?req, errno = ?rej.errno, "request rejected");
                return Incoming::Reject(req.cookie, rej.errno);
            }
        };
        match valid {
            ValidRequest::Disc => {
                self.close("client sent NBD_CMD_DISC");
                Incoming::Stop
            }
            ValidRequest::Write { len, .. } => {
                let guard = self.budget_for(len);
                let len = len as usize;
                self.payload_buffer(buf, len);
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                if let Err(e) = rd.read_exact(&mut buf[..len]) {
                    self.close(&format!("client closed during a write payload: {e}"));
                    return Incoming::Stop;
                }
                self.bytes_written.fetch_add(len as u64, Ordering::Relaxed);
                Incoming::Serve(req.cookie, valid, Some(guard))
            }
            ValidRequest::Read { len, .. } => {
                let guard = self.budget_for(len);
                self.payload_buffer(buf, len as usize);
                self.bytes_read.fetch_add(u64::from(len), Ordering::Relaxed);
                Incoming::Serve(req.cookie, valid, Some(guard))
            }
            _ => Incoming::Serve(req.cookie, valid, None),
        }
    }

    /// Makes `buf` a buffer with room for `len` bytes, from the pool when it has one (a
    /// new one is allocated by the caller's resize otherwise).
    fn payload_buffer(&self, buf: &mut Vec<u8>, len: usize) {
        if buf.capacity() < len {
            if let Some(b) = self.buffers.take(len) {
                *buf = b;
            }
        }
    }

    /// Whether a request is being served by some thread of this connection (called by
    /// the reading thread, which counts itself as waiting).
    fn busy(&self) -> bool {
        self.threads.load(Ordering::SeqCst) > self.waiting.load(Ordering::SeqCst)
    }

    /// Takes `len` bytes of the server-wide budget (blocks while it is exhausted).
    fn budget_for(&self, len: u32) -> BudgetGuard {
        self.budget.acquire(len as usize)
    }

    /// Performs a request and sends its reply. Returns false once the connection is unusable.
    fn serve(&self, cookie: u64, req: ValidRequest, buf: &mut Vec<u8>) -> bool {
        let vol = &*self.device;
        let result = match req {
            ValidRequest::Read { offset, len } if self.negotiated.structured_replies => {
                return self.read_structured(cookie, offset, len, buf);
            }
            ValidRequest::Read { offset, len } => {
                let len = len as usize;
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                match vol.read_at(&mut buf[..len], offset) {
                    Ok(()) => return self.send(&encode_simple_reply(cookie, None), &buf[..len]),
                    Err(e) => Err(e),
                }
            }
            ValidRequest::Write { offset, len, fua } => {
                vol.write_at(&mut buf[..len as usize], offset, fua)
            }
            ValidRequest::Flush => vol.flush(),
            ValidRequest::Trim { offset, len, fua } => vol
                .discard(offset, u64::from(len))
                .and_then(|()| if fua { vol.flush() } else { Ok(()) }),
            ValidRequest::WriteZeroes {
                offset,
                len,
                fua,
                no_hole: false,
            } => vol.write_zeroes(offset, u64::from(len), fua),
            ValidRequest::WriteZeroes {
                offset,
                len,
                fua,
                no_hole: true,
            } => vol.write_zeroes_no_hole(offset, u64::from(len), fua),
            ValidRequest::BlockStatus {
                offset,
                len,
                req_one,
            } => return self.block_status(cookie, offset, len, req_one),
            ValidRequest::Cache { .. } | ValidRequest::Disc => Ok(()),
        };
        match result {
            Ok(()) => self.send(&encode_simple_reply(cookie, None), &[]),
            Err(e) => self.failed(cookie, &req, &e),
        }
    }

    /// Logs a failed request and sends its error reply.
    fn failed(&self, cookie: u64, req: &ValidRequest, e: &crate::volume::VolumeError) -> bool {
        let errno = errno_for(e);
        tracing::warn!(conn = self.id, "{req:?} failed ({errno:?}): {e}");
        self.send_error(cookie, errno, failure_message(errno))
    }

    /// An error reply: a structured `ERROR` chunk (with a short message for the user) when
    /// structured replies were negotiated, as READ requires and the spec prefers for every
    /// command; a simple reply otherwise.
    fn send_error(&self, cookie: u64, errno: NbdErrno, message: &str) -> bool {
        if self.negotiated.structured_replies {
            self.send(&structured::error(cookie, errno, message, true), &[])
        } else {
            self.send(&encode_simple_reply(cookie, Some(errno)), &[])
        }
    }

    /// READ with structured replies: one `OFFSET_HOLE` chunk when the whole range is
    /// unallocated (nothing is read or decrypted), else one `OFFSET_DATA` chunk sent
    /// straight from the thread's buffer; `NONE` for a zero-length read. All are final
    /// (`DONE`): the data is complete in memory before its chunk is sent.
    fn read_structured(&self, cookie: u64, offset: u64, len: u32, buf: &mut Vec<u8>) -> bool {
        if len == 0 {
            return self.send(&structured::none(cookie), &[]);
        }
        if self.all_unallocated(offset, len) {
            if let Some(chunk) = structured::offset_hole(cookie, offset, len, true) {
                return self.send(&chunk, &[]);
            }
        }
        let n = len as usize;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        if let Err(e) = self.device.read_at(&mut buf[..n], offset) {
            return self.failed(cookie, &ValidRequest::Read { offset, len }, &e);
        }
        match structured::offset_data_prefix(cookie, offset, len, true) {
            Some(prefix) => self.send(&prefix, &buf[..n]),
            // len is in 1..=MAX_PAYLOAD, so a prefix always exists.
            None => self.send_error(cookie, NbdErrno::Inval, "read length not representable"),
        }
    }

    /// Whether the allocation map reports `[offset, offset + len)` as entirely unallocated.
    /// A map error counts as "allocated": the read then reports its own error, if any.
    fn all_unallocated(&self, offset: u64, len: u32) -> bool {
        match self.device.extents(offset, u64::from(len)) {
            Ok(extents) => !extents.is_empty() && extents.iter().all(|e| !e.allocated),
            Err(e) => {
                tracing::debug!(conn = self.id, "allocation lookup failed: {e}");
                false
            }
        }
    }

    /// BLOCK_STATUS for `base:allocation`: one `BLOCK_STATUS` chunk (the only selectable
    /// context) with allocated extents as status 0 and unallocated ones as `HOLE | ZERO`.
    fn block_status(&self, cookie: u64, offset: u64, len: u32, req_one: bool) -> bool {
        let req = ValidRequest::BlockStatus {
            offset,
            len,
            req_one,
        };
        let Some(context) = self.negotiated.base_allocation else {
            // validate_negotiated refuses BLOCK_STATUS without a context.
            return self.send_error(cookie, NbdErrno::Inval, rejection_message(NbdErrno::Inval));
        };
        let extents = match self.device.extents(offset, u64::from(len)) {
            Ok(extents) => extents,
            Err(e) => return self.failed(cookie, &req, &e),
        };
        let status = |allocated: bool| {
            if allocated {
                0
            } else {
                STATE_HOLE | STATE_ZERO
            }
        };
        let mut descriptors = structured::block_descriptors(
            extents.iter().map(|e| (e.len, status(e.allocated))),
            len,
            req_one,
        );
        if descriptors.is_empty() {
            // The map covered nothing: status 0 ("allocated, contents unknown") is always
            // a correct answer.
            tracing::warn!(conn = self.id, "{req:?}: allocation map returned no extent");
            descriptors.push(structured::BlockDescriptor { len, flags: 0 });
        }
        match structured::block_status(cookie, context, &descriptors, true) {
            Some(chunk) => self.send(&chunk, &[]),
            None => self.send_error(cookie, NbdErrno::Io, "block status could not be encoded"),
        }
    }

    /// Writes one whole reply under the write lock (replies never interleave).
    fn send(&self, header: &[u8], data: &[u8]) -> bool {
        let mut w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        match write_all_vectored(&mut *w, header, data) {
            Ok(()) => true,
            Err(e) => {
                drop(w);
                self.close(&format!("reply could not be sent (client went away): {e}"));
                // Wake a thread blocked reading this dead connection.
                if let Ok(r) = self.reader.try_lock() {
                    r.get_ref().shutdown(Shutdown::Read);
                }
                false
            }
        }
    }
}

/// Whether an I/O error is the expiry of `SO_RCVTIMEO`/`SO_SNDTIMEO`.
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// The message of a structured error reply to a request refused by validation.
fn rejection_message(errno: NbdErrno) -> &'static str {
    match errno {
        NbdErrno::Perm => "the export is read-only",
        NbdErrno::NoSpc => "the request extends beyond the end of the export",
        NbdErrno::Inval => {
            "invalid request: unknown command or flag, range beyond the end of the export, \
             zero-length block status, or block status without a metadata context"
        }
        _ => "request refused by the server",
    }
}

/// The message of a structured error reply to a request that failed on the volume (the
/// details, which may name files, stay in the server log).
fn failure_message(errno: NbdErrno) -> &'static str {
    match errno {
        NbdErrno::NoSpc => "no space left on the server's backing storage",
        NbdErrno::Perm => "the server may not write the backing file",
        NbdErrno::NoMem => "the server is out of memory",
        _ => "i/o error on the server's backing storage (details in the server log)",
    }
}

/// Writes `header` then `data` with as few system calls as possible.
fn write_all_vectored<W: Write>(w: &mut W, header: &[u8], data: &[u8]) -> std::io::Result<()> {
    let total = header.len() + data.len();
    let mut done = 0usize;
    while done < total {
        let n = if done < header.len() {
            w.write_vectored(&[IoSlice::new(&header[done..]), IoSlice::new(data)])
        } else {
            w.write(&data[done - header.len()..])
        };
        match n {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The transmission path over a socket pair against an in-memory device: no process, no
/// listener, no handshake (`Negotiated` is built directly).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockdev::{BlockDevice, MemDevice};
    use crate::nbd::consts::{
        CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR,
        REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE,
    };
    use crate::nbd::structured::{decode_chunk_header, ChunkHeader, CHUNK_HEADER_LEN};
    use crate::nbd::{decode_simple_reply, encode_request, Command, Request, SIMPLE_REPLY_LEN};
    use crate::server::budget::{BufferPool, ByteBudget};
    use crate::server::{Exports, ServerConfig};
    use std::os::unix::net::UnixStream;

    const SIZE: u64 = 1 << 20;

    struct Session {
        client: UnixStream,
        dev: Arc<MemDevice>,
        conn: Arc<Conn>,
        done: oneshot::Receiver<()>,
    }

    fn start(read_only: bool, structured: bool) -> Session {
        let dev = Arc::new(MemDevice::new(SIZE, 512, read_only).unwrap());
        let info = nbd::ExportInfo {
            name: "mem".into(),
            description: String::new(),
            size: SIZE,
            read_only,
            min_block: 512,
            preferred_block: 4096,
            max_block: nbd::MAX_PAYLOAD,
        };
        let negotiated = Negotiated {
            structured_replies: structured,
            base_allocation: structured.then_some(1),
        };
        let shared = Shared {
            exports: Exports::new(Vec::new()),
            config: ServerConfig::default(),
            budget: Arc::new(ByteBudget::new(64 << 20)),
            buffers: Arc::new(BufferPool::new(1 << 20)),
            open_connections: Arc::new(AtomicUsize::new(0)),
            shutdown: tokio::sync::watch::channel(false).1,
        };
        let (client, server) = UnixStream::pair().unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        let device: Arc<dyn BlockDevice> = dev.clone();
        let conn = Conn::new(
            BlockingStream::Unix(server),
            device,
            info,
            negotiated,
            1,
            &shared,
        )
        .unwrap();
        let conn = Arc::new(conn);
        let (tx, done) = oneshot::channel();
        *conn.done.lock().unwrap() = Some(tx);
        Conn::spawn_worker(&conn).unwrap();
        Session {
            client,
            dev,
            conn,
            done,
        }
    }

    impl Session {
        fn send(&mut self, command: Command, flags: u16, cookie: u64, offset: u64, len: u32) {
            let req = Request {
                flags,
                command,
                cookie,
                offset,
                len,
            };
            self.client.write_all(&encode_request(&req)).unwrap();
        }
        /// A simple reply: (error, cookie).
        fn simple(&mut self) -> (u32, u64) {
            let mut b = [0u8; SIMPLE_REPLY_LEN];
            self.client.read_exact(&mut b).unwrap();
            let r = decode_simple_reply(&b).expect("simple reply magic");
            (r.error, r.cookie)
        }
        fn chunk(&mut self) -> (ChunkHeader, Vec<u8>) {
            let mut b = [0u8; CHUNK_HEADER_LEN];
            self.client.read_exact(&mut b).unwrap();
            let h = decode_chunk_header(&b).expect("structured reply magic");
            let mut payload = vec![0u8; h.len as usize];
            self.client.read_exact(&mut payload).unwrap();
            (h, payload)
        }
        fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
            self.send(Command::Write, 0, cookie, offset, data.len() as u32);
            self.client.write_all(data).unwrap();
        }
        /// Waits until every transmission thread has ended; the reason the connection closed.
        fn finish(self) -> String {
            let Session {
                client, conn, done, ..
            } = self;
            let _ = done.blocking_recv();
            drop(client);
            let reason = conn.reason.lock().unwrap().clone();
            reason.unwrap_or_default()
        }
    }

    fn be32(b: &[u8]) -> u32 {
        u32::from_be_bytes(b[..4].try_into().unwrap())
    }

    #[test]
    fn read_write_round_trip_then_disc_ends_the_connection() {
        let mut s = start(false, false);
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        s.write(1, 8192 + 100, &data);
        assert_eq!(s.simple(), (0, 1));
        s.send(Command::Read, 0, 2, 8192 + 100, 4096);
        assert_eq!(s.simple(), (0, 2));
        let mut back = vec![0u8; 4096];
        s.client.read_exact(&mut back).unwrap();
        assert_eq!(back, data);
        s.send(Command::Disc, 0, 3, 0, 0);
        assert!(s.finish().contains("NBD_CMD_DISC"));
    }

    #[test]
    fn flush_and_fua_reach_the_device() {
        let mut s = start(false, false);
        s.send(Command::Flush, 0, 1, 0, 0);
        assert_eq!(s.simple(), (0, 1));
        assert_eq!(s.dev.flushes(), 1);
        s.send(Command::Write, CMD_FLAG_FUA, 2, 0, 512);
        s.client.write_all(&[1u8; 512]).unwrap();
        assert_eq!(s.simple(), (0, 2));
        assert_eq!(s.dev.flushes(), 2);
        s.send(Command::Trim, CMD_FLAG_FUA, 3, 0, 512);
        assert_eq!(s.simple(), (0, 3));
        assert_eq!(s.dev.flushes(), 3);
    }

    #[test]
    fn trim_and_write_zeroes_zero_the_range_and_punch_only_without_no_hole() {
        let mut s = start(false, false);
        s.write(1, 0, &[0xaa; 8192]);
        assert_eq!(s.simple(), (0, 1));
        s.send(Command::Trim, 0, 2, 0, 4096);
        assert_eq!(s.simple(), (0, 2));
        s.send(Command::WriteZeroes, CMD_FLAG_NO_HOLE, 3, 4096, 1024);
        assert_eq!(s.simple(), (0, 3));
        s.send(Command::WriteZeroes, 0, 4, 6144, 1024);
        assert_eq!(s.simple(), (0, 4));
        let ext: Vec<(u64, bool)> = s
            .dev
            .extents(0, 8192)
            .unwrap()
            .iter()
            .map(|e| (e.len, e.allocated))
            .collect();
        assert_eq!(
            ext,
            vec![(4096, false), (2048, true), (1024, false), (1024, true)]
        );
        let mut back = vec![0u8; 8192];
        s.dev.read_at(&mut back, 0).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert!(back[4096..5120].iter().all(|&b| b == 0));
        assert!(back[5120..6144].iter().all(|&b| b == 0xaa));
        assert!(back[6144..7168].iter().all(|&b| b == 0));
        assert!(back[7168..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn structured_reads_and_block_status_report_holes() {
        let mut s = start(false, true);
        s.write(1, 512, &[5u8; 512]);
        // Success of a command other than READ: a simple reply, as before.
        assert_eq!(s.simple(), (0, 1));
        // BLOCK_STATUS: context id, then (length, flags) descriptors.
        s.send(Command::BlockStatus, 0, 2, 0, 4096);
        let (h, p) = s.chunk();
        assert_eq!(
            (h.reply_type, h.cookie, h.done()),
            (REPLY_TYPE_BLOCK_STATUS, 2, true)
        );
        let hole = STATE_HOLE | STATE_ZERO;
        let words: Vec<u32> = p.chunks(4).map(be32).collect();
        assert_eq!(words, vec![1, 512, hole, 512, 0, 3072, hole]);
        // An unallocated range reads as one OFFSET_HOLE chunk.
        s.send(Command::Read, 0, 3, 8192, 1024);
        let (h, p) = s.chunk();
        assert_eq!(
            (h.reply_type, h.cookie, h.done()),
            (REPLY_TYPE_OFFSET_HOLE, 3, true)
        );
        assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), 8192);
        assert_eq!(be32(&p[8..]), 1024);
        // Data comes back in one OFFSET_DATA chunk.
        s.send(Command::Read, 0, 4, 512, 512);
        let (h, p) = s.chunk();
        assert_eq!((h.reply_type, h.cookie), (REPLY_TYPE_OFFSET_DATA, 4));
        assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), 512);
        assert_eq!(&p[8..], &[5u8; 512][..]);
    }

    #[test]
    fn out_of_range_requests_get_einval_or_enospc_and_the_session_goes_on() {
        let mut s = start(false, false);
        s.send(Command::Read, 0, 1, SIZE - 512, 1024);
        assert_eq!(s.simple(), (NbdErrno::Inval.wire(), 1));
        // The refused write's payload is read and discarded.
        s.write(2, SIZE - 512, &[1u8; 1024]);
        assert_eq!(s.simple(), (NbdErrno::NoSpc.wire(), 2));
        s.send(Command::WriteZeroes, 0, 3, SIZE, 512);
        assert_eq!(s.simple(), (NbdErrno::NoSpc.wire(), 3));
        s.send(Command::Trim, 0, 4, u64::MAX - 10, 512);
        assert_eq!(s.simple(), (NbdErrno::Inval.wire(), 4));
        s.send(Command::Flush, 0, 5, 0, 0);
        assert_eq!(s.simple(), (0, 5));
    }

    #[test]
    fn read_only_export_refuses_writes_with_eperm() {
        let mut s = start(true, false);
        s.write(1, 0, &[1u8; 512]);
        assert_eq!(s.simple(), (NbdErrno::Perm.wire(), 1));
        s.send(Command::Trim, 0, 2, 0, 512);
        assert_eq!(s.simple(), (NbdErrno::Perm.wire(), 2));
        s.send(Command::WriteZeroes, 0, 3, 0, 512);
        assert_eq!(s.simple(), (NbdErrno::Perm.wire(), 3));
        s.send(Command::Read, 0, 4, 0, 512);
        assert_eq!(s.simple(), (0, 4));
        let mut back = [9u8; 512];
        s.client.read_exact(&mut back).unwrap();
        assert_eq!(back, [0u8; 512]);
    }

    #[test]
    fn device_failure_becomes_eio_in_a_structured_error_chunk() {
        let mut s = start(false, true);
        s.write(1, 0, &[1u8; 512]);
        assert_eq!(s.simple(), (0, 1));
        s.dev.fail_reads(true);
        s.send(Command::Read, 0, 2, 0, 512);
        let (h, p) = s.chunk();
        assert_eq!(
            (h.reply_type, h.cookie, h.done()),
            (REPLY_TYPE_ERROR, 2, true)
        );
        assert_eq!(be32(&p), NbdErrno::Io.wire());
    }

    #[test]
    fn client_cut_in_a_write_payload_ends_the_connection_cleanly() {
        let mut s = start(false, false);
        s.send(Command::Write, 0, 1, 0, 4096);
        s.client.write_all(&[1u8; 100]).unwrap();
        s.client.shutdown(Shutdown::Write).unwrap();
        let reason = s.finish();
        assert!(reason.contains("write payload"), "{reason}");
    }

    #[test]
    fn client_cut_in_a_request_header_ends_the_connection_cleanly() {
        let mut s = start(false, false);
        s.client.write_all(&[0x25, 0x60, 0x95, 0x13, 0, 0]).unwrap();
        s.client.shutdown(Shutdown::Write).unwrap();
        let reason = s.finish();
        assert!(reason.contains("middle of a request"), "{reason}");
    }
}
