//! `cryptvol serve --metrics`: a Prometheus scrape during and after a fio run against the
//! export matches fio's own counts; connections, key backend calls and errors are
//! counted; bad HTTP requests are refused without harming the daemon.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The address the daemon logged for its metrics endpoint (waits for the log line).
fn metrics_addr(srv: &Server) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = srv.log_text();
        let found = log.lines().find_map(|l| {
            let rest = l.split("metrics endpoint listening on http://").nth(1)?;
            rest.split('/').next().map(str::to_string)
        });
        if let Some(addr) = found {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "no metrics address logged:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends raw bytes as an HTTP request; returns (status code, body).
fn http(addr: &str, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(request).expect("send request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {out:?}"));
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// One scrape: sample name with labels (as written) → value.
fn scrape(addr: &str) -> HashMap<String, f64> {
    let (status, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("sample line");
            (k.to_string(), v.parse().expect("sample value"))
        })
        .collect()
}

fn value(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| {
        let mut keys: Vec<_> = m.keys().collect();
        keys.sort();
        panic!("no sample {key} in the scrape: {keys:#?}")
    })
}

fn requests(m: &HashMap<String, f64>, command: &str) -> f64 {
    value(
        m,
        &format!("cryptvol_nbd_requests_total{{export=\"m\",command=\"{command}\"}}"),
    )
}

fn bytes(m: &HashMap<String, f64>, command: &str) -> f64 {
    value(
        m,
        &format!("cryptvol_nbd_request_bytes_total{{export=\"m\",command=\"{command}\"}}"),
    )
}

fn within_one_percent(what: &str, got: f64, want: f64) {
    assert!(want > 0.0, "{what}: fio reported nothing");
    assert!(
        (got - want).abs() <= want * 0.01,
        "{what}: the scrape says {got}, fio says {want}"
    );
}

/// fio's JSON for one job: (total_ios, io_bytes) of `dir` ("read" or "write").
fn fio_counts(json: &serde_json::Value, dir: &str) -> (f64, f64) {
    let job = &json["jobs"][0][dir];
    let ios = job["total_ios"].as_f64().expect("total_ios");
    let bytes = job["io_bytes"].as_f64().expect("io_bytes");
    (ios, bytes)
}

#[test]
fn a_scrape_during_and_after_fio_matches_fios_counts() {
    require("fio");
    let env = Env::new();
    let vol = env.create("m.img", "64M", &[]);
    let srv = env.serve(&[s(&vol)], &["--metrics", "127.0.0.1:0"], false);
    let addr = metrics_addr(&srv);

    let before = scrape(&addr);
    assert!(
        value(
            &before,
            "cryptvol_key_backend_calls_total{backend=\"local\"}"
        ) >= 1.0,
        "unlocking the export at start is a local key backend call"
    );
    assert_eq!(
        value(&before, "cryptvol_volume_size_bytes{export=\"m\"}"),
        64.0 * 1048576.0
    );
    assert_eq!(
        value(&before, "cryptvol_connections_total{export=\"m\"}"),
        0.0
    );
    assert_eq!(requests(&before, "write"), 0.0);

    // A known mix: 4 KiB random reads and writes, 24 MiB in all, rate-limited so that
    // the run lasts a few seconds and can be scraped while it goes.
    let mut fio = Command::new("fio")
        .current_dir(env.dir.path())
        .args([
            "--name=mix",
            "--ioengine=nbd",
            &format!("--uri={}", srv.uri("m")),
            "--rw=randrw",
            "--rwmixread=50",
            "--bs=4k",
            "--size=24M",
            "--iodepth=8",
            "--rate_iops=800",
            "--randseed=1616",
            "--output-format=json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fio");

    // During the run: the write counter is present and moves between two scrapes.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut during = Vec::new();
    while during.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "fio did not start writing in time"
        );
        assert!(
            fio.try_wait().expect("fio status").is_none(),
            "fio finished before two scrapes saw it running"
        );
        let m = scrape(&addr);
        let writes = requests(&m, "write");
        if writes > during.last().copied().unwrap_or(0.0) {
            during.push(writes);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        during[1] > during[0],
        "counters move during the run: {during:?}"
    );
    let live = scrape(&addr);
    // fio's I/O connection is open (its earlier size probe may still be closing).
    assert!(value(&live, "cryptvol_connections_open{export=\"m\"}") >= 1.0);

    let out = fio.wait_with_output().expect("fio output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let json_start = stdout.find('{').expect("fio JSON");
    let json: serde_json::Value =
        serde_json::from_str(&stdout[json_start..]).expect("fio --output-format=json");

    let after = scrape(&addr);
    for dir in ["read", "write"] {
        let (ios, io_bytes) = fio_counts(&json, dir);
        eprintln!(
            "{dir}: fio {ios} requests / {io_bytes} bytes; scrape {} / {}",
            requests(&after, dir),
            bytes(&after, dir)
        );
        within_one_percent(&format!("{dir} requests"), requests(&after, dir), ios);
        within_one_percent(&format!("{dir} bytes"), bytes(&after, dir), io_bytes);
        let count = value(
            &after,
            &format!(
                "cryptvol_nbd_request_duration_seconds_count{{export=\"m\",command=\"{dir}\"}}"
            ),
        );
        within_one_percent(&format!("{dir} latency samples"), count, ios);
    }
    assert!(value(&after, "cryptvol_connections_total{export=\"m\"}") >= 1.0);
    assert!(value(&after, "cryptvol_volume_allocated_bytes{export=\"m\"}") > 0.0);
    assert_eq!(
        value(
            &after,
            "cryptvol_nbd_errors_total{export=\"m\",errno=\"ENOSPC\"}"
        ),
        0.0
    );

    // A write past the end is refused with ENOSPC (as the NBD spec asks), and counted
    // under that error value.
    let (mut raw, size, _) = Raw::open(&srv, "m");
    assert_eq!(raw.write(1, size, &[0u8; 4096]), 28, "ENOSPC");
    raw.disconnect();
    let errs = scrape(&addr);
    assert_eq!(
        value(
            &errs,
            "cryptvol_nbd_errors_total{export=\"m\",errno=\"ENOSPC\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &errs,
            "cryptvol_nbd_errors_total{export=\"m\",errno=\"EIO\"}"
        ),
        0.0
    );

    // Bad HTTP requests are refused; the endpoint and the NBD side keep working.
    assert_eq!(http(&addr, b"GET /nope HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(http(&addr, b"BLAH\r\n\r\n").0, 400);
    assert_eq!(http(&addr, b"DELETE /metrics HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(http(&addr, &vec![b'x'; 16 * 1024]).0, 431);
    let (mut raw, _, _) = Raw::open(&srv, "m");
    assert!(raw.read(2, 0, 4096).is_ok(), "the daemon still serves NBD");
    raw.disconnect();
    let last = scrape(&addr);
    assert!(requests(&last, "read") > requests(&after, "read"));
    let log = srv.stop();
    assert!(!log.contains("panicked"), "{log}");
}
