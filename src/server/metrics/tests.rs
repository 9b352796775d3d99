//! The metrics module: request routing, counters, encoding, and the endpoint over a real
//! socket.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::http::{route, Route, Status};
use super::*;
use crate::keys::stats::BackendSnapshot;
use crate::latency::LatencyHistogram;

#[test]
fn routes_get_and_head_of_metrics_and_refuses_the_rest() {
    let r = |s: &str| route(s.as_bytes());
    assert_eq!(
        r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
        Route::Metrics { head: false }
    );
    assert_eq!(
        r("GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
        Route::Metrics { head: false }
    );
    assert_eq!(
        r("HEAD /metrics HTTP/1.1\r\n\r\n"),
        Route::Metrics { head: true }
    );
    assert_eq!(
        r("GET / HTTP/1.1\r\n\r\n"),
        Route::Refused(Status::NotFound)
    );
    assert_eq!(
        r("GET /metricsx HTTP/1.1\r\n\r\n"),
        Route::Refused(Status::NotFound)
    );
    assert_eq!(
        r("POST /metrics HTTP/1.1\r\n\r\n"),
        Route::Refused(Status::MethodNotAllowed)
    );
    for bad in [
        "GARBAGE\r\n\r\n",
        "GET /metrics\r\n\r\n",
        "GET /metrics HTTP/2\r\n\r\n",
        "GET metrics HTTP/1.1\r\n\r\n",
        "GET  /metrics HTTP/1.1\r\n\r\n",
        "get /x HTTP/1.1\r\n\r\n",
        "\r\n\r\n",
    ] {
        assert_eq!(r(bad), Route::Refused(Status::BadRequest), "{bad:?}");
    }
    assert_eq!(
        route(b"GET /\xff HTTP/1.1\r\n\r\n"),
        Route::Refused(Status::BadRequest)
    );
}

#[test]
fn commands_and_errors_are_counted_per_kind() {
    let m = ExportMetrics::default();
    let write = ValidRequest::Write {
        offset: 0,
        len: 4096,
        fua: false,
    };
    let (cmd, bytes) = Command::of(&write).unwrap();
    assert_eq!((cmd, bytes), (Command::Write, 4096));
    for elapsed in [Duration::from_micros(80), Duration::from_millis(2)] {
        m.started(cmd, bytes);
        m.finished(cmd, elapsed);
    }
    m.started(Command::Flush, 0);
    m.finished(Command::Flush, Duration::from_millis(1));
    assert_eq!(Command::of(&ValidRequest::Disc), None);
    m.error(NbdErrno::NoSpc);
    m.error(NbdErrno::NoSpc);
    m.error(NbdErrno::Inval);
    m.connection_opened();
    let c = m.commands();
    let w = c.iter().find(|c| c.command == Command::Write).unwrap();
    assert_eq!((w.requests, w.bytes, w.latency.count), (2, 8192, 2));
    let f = c.iter().find(|c| c.command == Command::Flush).unwrap();
    assert_eq!((f.requests, f.bytes), (1, 0));
    let r = c.iter().find(|c| c.command == Command::Read).unwrap();
    assert_eq!(r.requests, 0);
    let errors = m.errors();
    assert!(errors.contains(&(NbdErrno::NoSpc, 2)));
    assert!(errors.contains(&(NbdErrno::Inval, 1)));
    assert!(errors.contains(&(NbdErrno::Io, 0)));
    assert_eq!(m.connections_total(), 1);
    m.snapshot_running(true);
    m.snapshot_progress(10, 100);
    assert_eq!(m.snapshot_state(), (true, 10, 100));
    assert_eq!(
        Command::ALL.map(Command::label),
        [
            "read",
            "write",
            "flush",
            "trim",
            "write_zeroes",
            "block_status",
            "cache"
        ]
    );
    assert_eq!(NbdErrno::ALL.map(errno_label)[..2], ["EPERM", "EIO"]);
}

/// A collector with fixed key backend figures, to check the encoding.
#[derive(Debug)]
struct FixedBackends;

impl prometheus_client::collector::Collector for FixedBackends {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let h = LatencyHistogram::new();
        h.observe(Duration::from_millis(3));
        let snap = [BackendSnapshot {
            backend: "exec",
            calls: 3,
            failures: 1,
            latency: h.snapshot(),
        }];
        collect::encode_key_backends(&mut encoder, &snap)
    }
}

fn fixed_registry() -> Registry {
    let mut r = Registry::with_prefix("cryptvol");
    r.register_collector(Box::new(FixedBackends));
    r
}

#[test]
fn key_backend_figures_are_encoded_as_prometheus_text() {
    let text = collect::render(&fixed_registry()).unwrap();
    for line in [
        "# TYPE cryptvol_key_backend_calls_total counter",
        "cryptvol_key_backend_calls_total{backend=\"exec\"} 3",
        "cryptvol_key_backend_failures_total{backend=\"exec\"} 1",
        "# TYPE cryptvol_key_backend_call_duration_seconds histogram",
        "cryptvol_key_backend_call_duration_seconds_bucket{backend=\"exec\",le=\"0.0025\"} 0",
        "cryptvol_key_backend_call_duration_seconds_bucket{backend=\"exec\",le=\"0.005\"} 1",
        "cryptvol_key_backend_call_duration_seconds_bucket{backend=\"exec\",le=\"+Inf\"} 1",
        "cryptvol_key_backend_call_duration_seconds_count{backend=\"exec\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
}

async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn the_endpoint_answers_scrapes_and_refuses_bad_requests() {
    let listener = MetricsListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(serve_metrics(listener, Arc::new(fixed_registry()), rx));
    let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(
        ok.contains("Content-Type: text/plain; version=0.0.4"),
        "{ok}"
    );
    assert!(
        ok.contains("cryptvol_key_backend_calls_total{backend=\"exec\"} 3"),
        "{ok}"
    );
    let head = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert!(
        head.starts_with("HTTP/1.1 200 OK") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
    let nf = exchange(addr, b"GET /other HTTP/1.1\r\n\r\n").await;
    assert!(nf.starts_with("HTTP/1.1 404 "), "{nf}");
    let bad = exchange(addr, b"\x00\x01garbage\r\n\r\n").await;
    assert!(bad.starts_with("HTTP/1.1 400 "), "{bad}");
    let big = vec![b'a'; 3 * http::MAX_HEAD];
    let too_big = exchange(addr, &big).await;
    assert!(too_big.starts_with("HTTP/1.1 431 "), "{too_big}");
    // A client that sends half a request and leaves harms nothing.
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /met").await.unwrap();
    drop(half);
    let again = exchange(addr, b"GET /metrics HTTP/1.0\r\n\r\n").await;
    assert!(again.starts_with("HTTP/1.1 200 OK"), "{again}");
    tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the endpoint stops on shutdown")
        .unwrap();
}
