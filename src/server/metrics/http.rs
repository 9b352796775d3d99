//! The `/metrics` HTTP endpoint: a small HTTP/1.x responder on a tokio listener. One
//! request per connection (`Connection: close`), the request head bounded in size
//! ([`MAX_HEAD`]) and time ([`REQUEST_TIMEOUT`]), `GET`/`HEAD /metrics` answered with
//! the Prometheus text, other paths 404, other methods 405, anything unparsable 400.
//! Hand-written rather than an HTTP crate: serving one fixed page needs none of a
//! general server's features, and hyper/axum would add a large stack to a daemon whose
//! other listeners are all its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// Largest request head read (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head, and then to take the reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes served at once; further connections are closed at once.
const MAX_CLIENTS: usize = 16;
/// The Prometheus text exposition format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source} (choose another --metrics address)")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// The bound metrics socket, before the server runs.
#[derive(Debug)]
pub struct MetricsListener {
    listener: TcpListener,
}

impl MetricsListener {
    /// Binds `addr` (`HOST:PORT`; port 0 picks a free port).
    pub async fn bind(addr: &str) -> Result<MetricsListener, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        Ok(MetricsListener { listener })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// What a request head asks for, or the status that refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// `GET /metrics` (`head`: `HEAD /metrics`, the same without a body).
    Metrics {
        head: bool,
    },
    Refused(Status),
}

/// The statuses the endpoint answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    HeadTooLarge,
    Internal,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::HeadTooLarge => "431 Request Header Fields Too Large",
            Status::Internal => "500 Internal Server Error",
        }
    }
}

/// Routes a complete request head (pure: no I/O).
pub(crate) fn route(head: &[u8]) -> Route {
    let Some(line) = head.split(|&b| b == b'\n').next() else {
        return Route::Refused(Status::BadRequest);
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return Route::Refused(Status::BadRequest);
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::Refused(Status::BadRequest);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Route::Refused(Status::BadRequest);
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics { head: false },
        ("HEAD", "/metrics") => Route::Metrics { head: true },
        (_, "/metrics") => Route::Refused(Status::MethodNotAllowed),
        _ if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) => {
            Route::Refused(Status::BadRequest)
        }
        _ => Route::Refused(Status::NotFound),
    }
}

/// Serves scrapes until shutdown.
pub(crate) async fn serve_metrics(
    listener: MetricsListener,
    registry: Arc<Registry>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let accepted = tokio::select! {
            a = listener.listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics endpoint busy: connection closed");
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            answer(stream, &registry).await;
            drop(slot);
        });
    }
}

/// Reads one request head and answers it; errors end the connection quietly.
async fn answer(mut stream: TcpStream, registry: &Registry) {
    let route = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => route(&head),
        Ok(Err(status)) => Route::Refused(status),
        Err(_) => return, // the client sent no complete request in time
    };
    let (status, body, head_only) = match route {
        Route::Metrics { head } => match super::collect::render(registry) {
            Ok(text) => (Status::Ok, text, head),
            Err(_) => (Status::Internal, "cannot encode the metrics\n".into(), head),
        },
        Route::Refused(status) => (status, format!("{}\n", status.line()), false),
    };
    let reply = response(status, &body, head_only);
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
    drain(&mut stream).await;
}

/// Reads and discards what the client still sends (bounded in bytes and time) before the
/// socket is closed: closing with unread input would reset the connection and could
/// destroy the reply before the client reads it.
async fn drain(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    let mut left = 64 * 1024usize;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// The bytes up to the end of the request head (`\r\n\r\n` or `\n\n`), at most
/// [`MAX_HEAD`]; a client that closes first sent a bad request.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, Status> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| Status::BadRequest)?;
        if n == 0 {
            return Err(Status::BadRequest);
        }
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(head);
        }
        if head.len() > MAX_HEAD {
            return Err(Status::HeadTooLarge);
        }
    }
}

/// A complete HTTP/1.1 response that closes the connection.
fn response(status: Status, body: &str, head_only: bool) -> String {
    let content_type = if status == Status::Ok {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let allow = if status == Status::MethodNotAllowed {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{}",
        status.line(),
        body.len(),
        if head_only { "" } else { body }
    )
}
