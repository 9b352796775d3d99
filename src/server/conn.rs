//! One client connection: handshake, then transmission with concurrent requests
//! and out-of-order replies.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::export::{errno_for, Export};
use super::Shared;
use crate::nbd::{
    self, encode_simple_reply, parse_client_flags, parse_option_header, parse_request,
    server_greeting, validate, FrameError, NbdErrno, Negotiation, Next, ValidRequest,
    MAX_OPTION_LEN, REQUEST_HEADER_LEN,
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
}

/// Runs one connection to completion. Never panics on client input.
pub(crate) async fn run<S>(stream: S, peer: String, id: u64, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mut wr = BufWriter::with_capacity(256 * 1024, wr);
    let mut shutdown = shared.shutdown.clone();
    let negotiated = tokio::select! {
        r = tokio::time::timeout(shared.config.handshake_timeout, handshake(&mut rd, &mut wr, &shared)) => {
            match r {
                Ok(r) => r,
                Err(_) => Err(HandshakeFailure::Timeout),
            }
        }
        _ = shutdown.wait_for(|s| *s) => Err(HandshakeFailure::Shutdown),
    };
    let export = match negotiated {
        Ok(name) => name,
        Err(HandshakeFailure::Closed) => {
            tracing::debug!(conn = id, peer = %peer, "client closed during negotiation");
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
    tracing::info!(conn = id, peer = %peer, export = %export, "client connected");
    let stats = transmission(rd, wr, exp, &shared, id).await;
    tracing::info!(
        conn = id,
        peer = %peer,
        export = %export,
        requests = stats.requests,
        bytes_read = stats.bytes_read,
        bytes_written = stats.bytes_written,
        "client disconnected{}",
        stats.reason.map(|r| format!(": {r}")).unwrap_or_default()
    );
}

async fn handshake<R, W>(
    rd: &mut R,
    wr: &mut W,
    shared: &Shared,
) -> Result<String, HandshakeFailure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_all(&server_greeting()).await?;
    wr.flush().await?;
    let mut flags = [0u8; 4];
    read_or_closed(rd, &mut flags).await?;
    let client = parse_client_flags(flags)?;
    let mut neg = Negotiation::new(client);
    loop {
        let mut hdr = [0u8; 16];
        read_or_closed(rd, &mut hdr).await?;
        let hdr = parse_option_header(&hdr)?;
        let outcome = if hdr.len > MAX_OPTION_LEN {
            let mut limited = (&mut *rd).take(u64::from(hdr.len));
            let skipped = tokio::io::copy(&mut limited, &mut tokio::io::sink()).await?;
            if skipped != u64::from(hdr.len) {
                return Err(HandshakeFailure::Closed);
            }
            neg.handle_oversized(&hdr)
        } else {
            let mut data = vec![0u8; hdr.len as usize];
            read_or_closed(rd, &mut data).await?;
            neg.handle_option(&hdr, &data, &shared.exports)
        };
        wr.write_all(&outcome.reply).await?;
        wr.flush().await?;
        match outcome.next {
            Next::Continue => {}
            Next::Transmit { export, .. } => return Ok(export.name),
            Next::Close => return Err(HandshakeFailure::Closed),
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

/// A reply ready to be written: header, optional READ payload, and the byte budget it holds.
struct Reply {
    header: [u8; 16],
    data: Option<Vec<u8>>,
    _permit: Option<OwnedSemaphorePermit>,
}

#[derive(Default)]
struct Stats {
    requests: u64,
    bytes_read: u64,
    bytes_written: u64,
    reason: Option<String>,
}

async fn transmission<R, W>(
    mut rd: BufReader<R>,
    wr: BufWriter<W>,
    exp: &Export,
    shared: &Shared,
    id: u64,
) -> Stats
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let write_failed = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_replies(wr, rx, write_failed.clone()));
    let mut stats = Stats::default();
    let mut shutdown = shared.shutdown.clone();
    loop {
        if write_failed.load(Ordering::Relaxed) != 0 {
            stats.reason = Some("reply could not be sent (client went away)".into());
            break;
        }
        let mut hdr = [0u8; REQUEST_HEADER_LEN];
        let read = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => {
                stats.reason = Some("server shutting down".into());
                break;
            }
            r = rd.read_exact(&mut hdr) => r,
        };
        if let Err(e) = read {
            if e.kind() != std::io::ErrorKind::UnexpectedEof {
                stats.reason = Some(format!("read error: {e}"));
            } else {
                stats.reason = Some("client closed the connection without NBD_CMD_DISC".into());
            }
            break;
        }
        let req = match parse_request(&hdr) {
            Ok(r) => r,
            Err(e @ (FrameError::BadMagic(_) | FrameError::TooLarge(_))) => {
                tracing::warn!(conn = id, "closing connection: {e}");
                stats.reason = Some(e.to_string());
                break;
            }
        };
        stats.requests += 1;
        let cookie = req.cookie;
        let valid = match validate(&req, &exp.info) {
            Ok(v) => v,
            Err(rej) => {
                let payload = u64::from(req.payload_len());
                if payload > 0 {
                    let mut limited = (&mut rd).take(payload);
                    match tokio::io::copy(&mut limited, &mut tokio::io::sink()).await {
                        Ok(n) if n == payload => {}
                        _ => {
                            stats.reason = Some("client closed during a write payload".into());
                            break;
                        }
                    }
                }
                tracing::debug!(conn = id, ?req, errno = ?rej.errno, "request rejected");
                let _ = tx.send(Reply {
                    header: encode_simple_reply(cookie, Some(rej.errno)),
                    data: None,
                    _permit: None,
                });
                continue;
            }
        };
        if let ValidRequest::Disc = valid {
            stats.reason = Some("client sent NBD_CMD_DISC".into());
            break;
        }
        // Reserve the byte budget before reading or allocating any payload.
        let cost = match valid {
            ValidRequest::Read { len, .. } | ValidRequest::Write { len, .. } => len.max(1),
            _ => 1,
        };
        let permit = match shared.inflight.clone().acquire_many_owned(cost).await {
            Ok(p) => p,
            Err(_) => break,
        };
        let mut payload = Vec::new();
        if let ValidRequest::Write { len, .. } = valid {
            payload = vec![0u8; len as usize];
            if let Err(e) = rd.read_exact(&mut payload).await {
                stats.reason = Some(format!("client closed during a write payload: {e}"));
                break;
            }
            stats.bytes_written += u64::from(len);
        }
        if let ValidRequest::Read { len, .. } = valid {
            stats.bytes_read += u64::from(len);
        }
        let vol = exp.volume.clone();
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || {
            let (result, data) = execute(&vol, valid, payload);
            let header = encode_simple_reply(cookie, result.err());
            let data = if result.is_ok() { data } else { None };
            let _ = tx.send(Reply {
                header,
                data,
                _permit: Some(permit),
            });
        });
    }
    // Let in-flight requests finish and their replies go out, then close.
    drop(tx);
    let _ = writer.await;
    stats
}

/// Performs one validated request on the volume (on a blocking thread).
fn execute(
    vol: &crate::volume::Volume,
    req: ValidRequest,
    mut payload: Vec<u8>,
) -> (Result<(), NbdErrno>, Option<Vec<u8>>) {
    let r = match req {
        ValidRequest::Read { offset, len } => {
            let mut buf = vec![0u8; len as usize];
            return match vol.read_at(&mut buf, offset) {
                Ok(()) => (Ok(()), Some(buf)),
                Err(e) => (Err(log_err("read", errno_for(&e), &e)), None),
            };
        }
        ValidRequest::Write { offset, fua, .. } => vol.write_at_mut(&mut payload, offset, fua),
        ValidRequest::Flush => vol.flush(),
        ValidRequest::Trim { offset, len, fua } => vol
            .discard(offset, u64::from(len))
            .and_then(|()| if fua { vol.flush() } else { Ok(()) }),
        ValidRequest::WriteZeroes {
            offset, len, fua, ..
        } => vol.write_zeroes(offset, u64::from(len), fua),
        ValidRequest::Cache { .. } => Ok(()),
        ValidRequest::Disc => Ok(()),
    };
    (r.map_err(|e| log_err("request", errno_for(&e), &e)), None)
}

fn log_err(what: &str, errno: NbdErrno, e: &crate::volume::VolumeError) -> NbdErrno {
    tracing::warn!("{what} failed ({errno:?}): {e}");
    errno
}

async fn write_replies<W>(
    mut wr: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    failed: Arc<AtomicU64>,
) where
    W: AsyncWrite + Unpin,
{
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Batch every reply that is already waiting into one flush.
        while let Some(reply) = next {
            if write_one(&mut wr, &reply).await.is_err() {
                failed.store(1, Ordering::Relaxed);
                // Keep draining so that blocked senders and permits are released.
                while rx.recv().await.is_some() {}
                return;
            }
            next = rx.try_recv().ok();
        }
        if wr.flush().await.is_err() {
            failed.store(1, Ordering::Relaxed);
            while rx.recv().await.is_some() {}
            return;
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

async fn write_one<W: AsyncWrite + Unpin>(
    wr: &mut BufWriter<W>,
    reply: &Reply,
) -> std::io::Result<()> {
    wr.write_all(&reply.header).await?;
    if let Some(d) = &reply.data {
        wr.write_all(d).await?;
    }
    Ok(())
}
