//! One connection from accept to close: the handshake under its timeout, the start of
//! transmission, and the wait for it to end (or for shutdown), with the log lines that
//! frame a session.

use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use tokio::sync::{oneshot, watch};

use super::handshake::{handshake, Handshake, HandshakeFailure};
use super::state::Conn;
use super::stream::{BlockingStream, IntoBlocking, Transport};
use crate::server::peer::PeerIdentity;
use crate::server::Shared;

/// Runs one connection to completion. Never panics on client input.
pub(crate) async fn run<S: IntoBlocking>(
    stream: S,
    mut peer: PeerIdentity,
    id: u64,
    shared: Arc<Shared>,
) {
    let Some(Handshake {
        transport,
        export,
        info,
        negotiated,
    }) = negotiate(stream, &shared, &mut peer, id).await
    else {
        return;
    };
    let Some(exp) = shared.exports.get(&export) else {
        return;
    };
    let _counted = exp.connection_guard();
    let removal = exp.removal();
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
        info,
        negotiated,
        id,
        &shared,
        exp.metrics.clone(),
    ) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::warn!(conn = id, peer = %peer, "cannot start transmission: {e}");
            return;
        }
    };
    transmit(conn, control, &shared, removal, (&peer, &export)).await;
}

/// The handshake under `--handshake-timeout` (and until shutdown); `None`, with the
/// reason logged, when the connection ends before transmission.
async fn negotiate<S: IntoBlocking>(
    stream: S,
    shared: &Shared,
    peer: &mut PeerIdentity,
    id: u64,
) -> Option<Handshake<S>> {
    let mut shutdown = shared.shutdown.clone();
    let negotiated = tokio::select! {
        r = tokio::time::timeout(shared.config.handshake_timeout, handshake(stream, shared, peer, id)) => {
            match r {
                Ok(r) => r,
                Err(_) => Err(HandshakeFailure::Timeout),
            }
        }
        _ = shutdown.wait_for(|s| *s) => Err(HandshakeFailure::Shutdown),
    };
    match negotiated {
        Ok(x) => Some(x),
        Err(HandshakeFailure::Closed) => {
            tracing::debug!(conn = id, peer = %peer, "client closed during negotiation");
            None
        }
        Err(HandshakeFailure::Tls(reason)) => {
            tracing::warn!(conn = id, "TLS handshake with {peer} failed: {reason}");
            None
        }
        Err(e @ HandshakeFailure::TlsRequired) => {
            tracing::warn!(conn = id, peer = %peer, "{e}");
            None
        }
        Err(e) => {
            tracing::info!(conn = id, peer = %peer, "negotiation ended: {e}");
            None
        }
    }
}

/// Turns `true` once the export is removed (never, if its sender is gone).
async fn export_removed(mut removal: watch::Receiver<bool>) {
    if removal.wait_for(|r| *r).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Starts the first transmission thread and waits until the last one ends (or, on
/// shutdown or the export's removal, stops reading and lets in-flight requests finish);
/// then logs the session's counters.
async fn transmit(
    conn: Arc<Conn>,
    control: BlockingStream,
    shared: &Shared,
    removal: watch::Receiver<bool>,
    (peer, export): (&PeerIdentity, &str),
) {
    let id = conn.id;
    let mut shutdown = shared.shutdown.clone();
    let (done_tx, mut done_rx) = oneshot::channel();
    *conn.done.lock().unwrap_or_else(PoisonError::into_inner) = Some(done_tx);
    if let Err(e) = Conn::spawn_worker(&conn) {
        tracing::warn!(conn = id, peer = %peer, "cannot start a transmission thread: {e}");
        return;
    }
    let stopping = tokio::select! {
        _ = &mut done_rx => None,
        r = shutdown.wait_for(|s| *s) => r.is_ok().then_some("server shutting down"),
        () = export_removed(removal) => Some("export removed"),
    };
    if let Some(why) = stopping {
        // Stop reading new requests; in-flight ones finish and are answered.
        conn.close(why);
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
