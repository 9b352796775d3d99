//! The RBD engine against a real one-node Ceph cluster (scripts/ceph-cluster.sh), started
//! once for this test program and stopped when it exits: image I/O round trips (blocking
//! and async), the exclusive lock refusing a second opener with the holder's name, the
//! takeover that blocklists the old owner, and bounded waits with the OSD stopped or the
//! cluster full. A watchdog aborts the program if it runs past [`PROGRAM_LIMIT`]: librados
//! can block forever, and a hung test would hold CI until its own limit.
//! Built only with `--features rbd` (scripts/test.sh turns it on).

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{OnceLock, RwLock};
use std::time::{Duration, Instant};

use cryptvol::rbd::{Cluster, ClusterOptions, ImageSpec, RbdError, RbdImage, Timeouts};

const MIB: u64 = 1 << 20;

struct TestCluster {
    dir: PathBuf,
    conf: PathBuf,
}

/// The one cluster of this test program. Tests take `SHARED` for reading; the test that
/// kills the OSD takes it for writing (and restarts the OSD before releasing it).
static CLUSTER: OnceLock<TestCluster> = OnceLock::new();
static SHARED: RwLock<()> = RwLock::new(());

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-cluster.sh")
}

fn cluster_start(dir: &std::path::Path) -> String {
    common::run_ok(Command::new(script()).arg("start").arg(dir))
}

/// The longest this test program may run (about 2 minutes on an idle machine); past it a
/// watchdog aborts the process, naming the limit, and the reaper stops the cluster.
const PROGRAM_LIMIT: Duration = Duration::from_secs(20 * 60);

fn start_watchdog() {
    std::thread::spawn(|| {
        std::thread::sleep(PROGRAM_LIMIT);
        eprintln!(
            "tests/rbd.rs: still running after {PROGRAM_LIMIT:?}; aborting (a librados call hung?)"
        );
        std::process::abort();
    });
}

fn cluster() -> &'static TestCluster {
    CLUSTER.get_or_init(|| {
        start_watchdog();
        let dir = std::env::temp_dir().join(format!("cryptvol-rbd-test-{}", std::process::id()));
        stop_when_we_exit(&dir);
        let started = Instant::now();
        let env = cluster_start(&dir);
        eprintln!("ceph cluster started in {:?}:\n{env}", started.elapsed());
        TestCluster {
            conf: dir.join("ceph.conf"),
            dir,
        }
    })
}

/// Test programs have no exit hook: a detached shell waits for this process to end, then
/// stops the daemons and removes the cluster's directory.
fn stop_when_we_exit(dir: &std::path::Path) {
    let cmd = format!(
        "tail --pid={} -f /dev/null; '{}' stop '{}'; rm -rf '{}'",
        std::process::id(),
        script().display(),
        dir.display(),
        dir.display()
    );
    // `setsid -f` forks the shell into its own session and returns at once.
    let status = Command::new("setsid")
        .args(["-f", "sh", "-c", &cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("spawn the cluster reaper");
    assert!(status.success(), "setsid: {status}");
}

fn options(timeouts: Timeouts) -> ClusterOptions {
    ClusterOptions {
        conf: Some(cluster().conf.clone()),
        client_id: None,
        timeouts,
    }
}

fn connect() -> Cluster {
    Cluster::connect(&options(Timeouts::default())).expect("connect to the test cluster")
}

fn connect_with(op: Duration) -> Cluster {
    let t = Timeouts {
        osd_op: op,
        mon_op: op,
        mount: op,
    };
    Cluster::connect(&options(t)).expect("connect to the test cluster")
}

/// A new image of `size` bytes with a name unique to the test.
fn new_image(c: &Cluster, test: &str, size: u64) -> ImageSpec {
    let spec = ImageSpec::parse(&format!("rbd:rbd/{test}-{}", std::process::id())).unwrap();
    RbdImage::create(c, &spec, size).expect("create the image");
    spec
}

#[test]
fn spec_names_the_image_the_rbd_tool_sees() {
    let _g = SHARED.read().unwrap_or_else(|e| e.into_inner());
    let c = connect();
    let spec = new_image(&c, "visible", 8 * MIB);
    let out = common::run_ok(
        Command::new("rbd")
            .arg("--conf")
            .arg(&cluster().conf)
            .args(["info", "--format", "json"])
            .arg(format!("rbd/{}", spec.image)),
    );
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["size"], 8 * MIB, "{out}");
    let features = info["features"].to_string();
    assert!(features.contains("exclusive-lock"), "{out}");
}

#[test]
fn blocking_round_trip_read_write_discard_flush_resize() {
    let _g = SHARED.read().unwrap_or_else(|e| e.into_inner());
    let c = connect();
    let spec = new_image(&c, "roundtrip", 16 * MIB);
    let img = RbdImage::open(&c, &spec).expect("open");
    assert_eq!(img.size().unwrap(), 16 * MIB);

    let data = common::pattern(3 * MIB as usize + 513, 7);
    let at = 5 * MIB - 4096 + 17; // across an object boundary, unaligned
    img.write_at(&data, at).unwrap();
    img.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    img.read_at(&mut back, at).unwrap();
    assert!(back == data, "read back differs from what was written");

    // A zeroed range (unaligned) reads as zeros; its neighbours are untouched.
    img.write_zeroes(5 * MIB + 100, 4000).unwrap();
    let mut zeroed = vec![0xffu8; 4200];
    img.read_at(&mut zeroed, 5 * MIB).unwrap();
    let base = (5 * MIB - at) as usize;
    assert_eq!(zeroed[..100], data[base..base + 100]);
    assert!(
        zeroed[100..4100].iter().all(|&b| b == 0),
        "zeroed range is not zero"
    );
    assert_eq!(zeroed[4100..], data[base + 4100..base + 4200]);

    // A discard of whole granules (64 KiB) reads as zeros; its neighbours are untouched.
    img.discard(6 * MIB, MIB).unwrap();
    let mut hole = vec![0xffu8; MIB as usize];
    img.read_at(&mut hole, 6 * MIB).unwrap();
    assert!(hole.iter().all(|&b| b == 0), "discarded range is not zero");
    let mut before = vec![0u8; 4096];
    img.read_at(&mut before, 6 * MIB - 4096).unwrap();
    let off = (6 * MIB - 4096 - at) as usize;
    assert_eq!(before, data[off..off + 4096]);

    // Reads past the end are zeros (as a short file); writes past the end fail.
    let mut tail = vec![0xffu8; 8192];
    img.write_at(&[0xab; 4096], 16 * MIB - 4096).unwrap();
    img.read_at(&mut tail, 16 * MIB - 4096).unwrap();
    assert!(tail[..4096].iter().all(|&b| b == 0xab));
    assert!(tail[4096..].iter().all(|&b| b == 0));
    assert!(img.write_at(&[1; 4096], 16 * MIB).is_err());

    img.resize(32 * MIB).unwrap();
    assert_eq!(img.size().unwrap(), 32 * MIB);
    img.write_at(&[0xcd; 4096], 31 * MIB).unwrap();
    let mut grown = vec![0u8; 4096];
    img.read_at(&mut grown, 31 * MIB).unwrap();
    assert!(grown.iter().all(|&b| b == 0xcd));
    drop(img);
    RbdImage::remove(&c, &spec).unwrap();
}

#[test]
fn async_writes_at_queue_depth_32_read_back() {
    let _g = SHARED.read().unwrap_or_else(|e| e.into_inner());
    let c = connect();
    let spec = new_image(&c, "async", 16 * MIB);
    let img = std::sync::Arc::new(RbdImage::open(&c, &spec).expect("open"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        let blocks: Vec<u64> = (0..256u64).map(|i| (i * 37) % 4096).collect();
        for chunk in blocks.chunks(32) {
            let writes = chunk.iter().map(|&b| {
                let img = img.clone();
                async move { img.write_owned(common::pattern(4096, b), b * 4096).await }
            });
            for r in futures::future::join_all(writes).await {
                assert_eq!(r.expect("async write").len(), 4096, "the buffer comes back");
            }
        }
        img.flush_async().await.unwrap();
        for &b in &blocks {
            let got = img.read_owned(b * 4096, 4096).await.unwrap();
            assert_eq!(got, common::pattern(4096, b), "block {b}");
        }
        img.discard_async(0, 4 * MIB).await.unwrap();
        let zeros = img.read_owned(0, 4096).await.unwrap();
        assert!(zeros.iter().all(|&b| b == 0));
    });
}

#[test]
fn second_opener_is_refused_naming_the_holder() {
    let _g = SHARED.read().unwrap_or_else(|e| e.into_inner());
    let first = connect();
    let spec = new_image(&first, "lock", 8 * MIB);
    let held = RbdImage::open(&first, &spec).unwrap();
    held.lock_exclusive().expect("first lock");
    assert!(held.is_lock_owner().unwrap());

    let second = connect_with(Duration::from_secs(10));
    let other = RbdImage::open(&second, &spec).unwrap();
    let err = other
        .lock_exclusive()
        .expect_err("a second lock must be refused");
    // The holder is named as `rbd lock ls` does: client.N and its address (what a
    // blocklist entry names).
    let holder = first.address().unwrap();
    assert!(!holder.is_empty());
    match &err {
        RbdError::Locked { holder: h, .. } => {
            assert!(h.contains(&holder), "{err}");
            let entity = format!("client.{}", first.instance_id());
            assert!(h.contains(&entity), "{err}");
        }
        _ => panic!("expected Locked, got {err}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&spec.to_string()) && msg.contains("take the image over"),
        "{msg}"
    );
    eprintln!("second lock refused: {msg}");
    let lockers = other.lockers().unwrap();
    assert_eq!(
        lockers,
        [(format!("client.{}", first.instance_id()), holder.clone())]
    );
    // A write without the lock is refused (librbd asks the holder, which refuses), and
    // does not hang.
    let t = Instant::now();
    let refused = other
        .write_at(&[2; 4096], 0)
        .expect_err("a write without the lock");
    eprintln!("unlocked write refused after {:?}: {refused}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        matches!(refused, RbdError::NotLockOwner { .. }),
        "{refused}"
    );
    // The holder keeps its lock and can still write.
    held.write_at(&[1; 4096], 0).unwrap();
    assert!(held.is_lock_owner().unwrap());
    assert!(!other.is_lock_owner().unwrap());
}

#[test]
fn takeover_blocklists_the_old_owner() {
    let _g = SHARED.read().unwrap_or_else(|e| e.into_inner());
    let old = connect_with(Duration::from_secs(10));
    let spec = new_image(&old, "takeover", 8 * MIB);
    let stale = RbdImage::open(&old, &spec).unwrap();
    stale.lock_exclusive().unwrap();
    stale.write_at(&[0x11; 4096], 0).unwrap();

    let new = connect();
    let img = RbdImage::open(&new, &spec).unwrap();
    let fenced = img.take_over().expect("takeover");
    assert_eq!(fenced.len(), 1, "{fenced:?}");
    assert_eq!(fenced[0], old.address().unwrap(), "{fenced:?}");
    assert!(img.is_lock_owner().unwrap());
    img.write_at(&[0x22; 4096], 0).unwrap();
    img.flush().unwrap();

    // The old server cannot write again, and does not hang trying.
    let t = Instant::now();
    let err = stale
        .write_at(&[0x33; 4096], 0)
        .and_then(|()| stale.flush())
        .expect_err("a blocklisted client must not write");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
    eprintln!("stale write refused after {:?}: {err}", t.elapsed());
    let mut back = vec![0u8; 4096];
    img.read_at(&mut back, 0).unwrap();
    assert!(
        back.iter().all(|&b| b == 0x22),
        "the stale write reached the image"
    );
}

#[test]
fn missing_config_and_image_are_clear_errors() {
    let err = Cluster::connect(&ClusterOptions {
        conf: Some("/nonexistent/ceph.conf".into()),
        ..Default::default()
    })
    .expect_err("no config");
    assert!(err.to_string().contains("CEPH_CONF"), "{err}");

    let _g = SHARED.read().unwrap_or_else(|e| e.into_inner());
    let c = connect();
    let spec = ImageSpec::parse("rbd:rbd/no-such-image").unwrap();
    let err = RbdImage::open(&c, &spec).expect_err("missing image");
    assert!(matches!(err, RbdError::NotFound { .. }), "{err}");
    let spec = ImageSpec::parse("rbd:no-such-pool/img").unwrap();
    let err = RbdImage::open(&c, &spec).expect_err("missing pool");
    assert!(err.to_string().contains("no-such-pool"), "{err}");
}

fn osd_pid() -> u32 {
    let p = cluster().dir.join("run/osd.pid");
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .parse()
        .unwrap()
}

/// The OSD stopped (SIGSTOP: alive, holding its sockets, answering nothing, as a hung or
/// partitioned OSD does) and continued when dropped, also when the test fails, so the
/// other tests keep a working cluster. A stopped OSD resumes at once; a killed one would
/// need a restart that takes minutes on a busy machine.
struct StoppedOsd(u32);

impl StoppedOsd {
    fn new() -> StoppedOsd {
        let pid = osd_pid();
        common::run_ok(Command::new("kill").args(["-STOP", &pid.to_string()]));
        StoppedOsd(pid)
    }
}

impl Drop for StoppedOsd {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

#[test]
fn with_the_osd_stopped_io_times_out_within_the_bound() {
    let _g = SHARED.write().unwrap_or_else(|e| e.into_inner());
    let bound = Duration::from_secs(5);
    let c = connect_with(bound);
    let spec = new_image(&c, "timeout", 8 * MIB);
    let img = RbdImage::open(&c, &spec).unwrap();
    img.write_at(&[7; 4096], 0).unwrap();

    let stopped = StoppedOsd::new();
    let t = Instant::now();
    let write = img.write_at(&[8; 4096], 4096);
    let write_took = t.elapsed();
    let t = Instant::now();
    let mut buf = vec![0u8; 4096];
    let read = img.read_at(&mut buf, 8 * 4096);
    let read_took = t.elapsed();
    drop(stopped);

    for (what, r, took) in [("write", write, write_took), ("read", read, read_took)] {
        let err = r.expect_err(what);
        eprintln!("{what} with the OSD stopped failed after {took:?}: {err}");
        assert!(
            matches!(err, RbdError::Timeout { secs: 5, .. }),
            "{what}: {err}"
        );
        assert!(err.to_string().contains("timed out after 5 s"), "{err}");
        assert!(
            took >= bound - Duration::from_millis(500),
            "{what} took {took:?}"
        );
        assert!(took < bound * 4, "{what} took {took:?}, bound {bound:?}");
        let io: std::io::Error = err.into();
        assert_eq!(io.kind(), std::io::ErrorKind::TimedOut);
    }
    // The image works again once the OSD runs again (bounded: the client's timeouts).
    let deadline = Instant::now() + common::PATIENCE;
    while let Err(e) = img.write_at(&[9; 4096], 4096) {
        assert!(Instant::now() < deadline, "the OSD never came back: {e}");
    }
}

/// Runs `ceph` as client.admin against the test cluster.
fn ceph(args: &[&str]) -> String {
    common::run_ok(
        Command::new("ceph")
            .arg("--conf")
            .arg(&cluster().conf)
            .args(["--connect-timeout", "10"])
            .args(args),
    )
}

/// Waits (bounded) until `ceph health detail` does or does not mention `what`.
fn wait_health(what: &str, present: bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let health = ceph(&["health", "detail"]);
        if health.contains(what) == present {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "waiting for {what} present={present}: {health}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn set_full_ratios(near: &str, backfill: &str, full: &str) {
    // Raised full first, lowered full last, so the three stay ordered at every step.
    let lowering = full.parse::<f64>().unwrap() < 0.5;
    let steps = [
        ("set-full-ratio", full),
        ("set-backfillfull-ratio", backfill),
        ("set-nearfull-ratio", near),
    ];
    let order: Vec<_> = if lowering {
        steps.iter().rev().collect()
    } else {
        steps.iter().collect()
    };
    for (cmd, value) in order {
        ceph(&["osd", cmd, value]);
    }
}

/// The cluster made full; restored (ratios back, `POOL_FULL` gone) when dropped, also
/// when the test fails, so the other tests keep a working cluster.
struct FullCluster;

impl FullCluster {
    fn new() -> FullCluster {
        let full = FullCluster;
        set_full_ratios("0.0005", "0.0008", "0.001");
        wait_health("POOL_FULL", true);
        full
    }
}

impl Drop for FullCluster {
    fn drop(&mut self) {
        set_full_ratios("0.85", "0.9", "0.97");
        wait_health("POOL_FULL", false);
    }
}

#[test]
fn with_the_cluster_full_writes_time_out_within_the_bound() {
    let _g = SHARED.write().unwrap_or_else(|e| e.into_inner());
    let bound = Duration::from_secs(5);
    let c = connect_with(bound);
    let spec = new_image(&c, "full", 8 * MIB);
    let img = RbdImage::open(&c, &spec).unwrap();
    img.write_at(&[5; 4096], 0).unwrap();

    // A full ratio below what bluestore already uses makes the OSD, then the pool, full.
    let full = FullCluster::new();
    let t = Instant::now();
    let write = img.write_at(&[6; 4096], 4096);
    let took = t.elapsed();
    let mut buf = vec![0u8; 4096];
    let read = img.read_at(&mut buf, 0);
    drop(full);

    let err = write.expect_err("a write to a full cluster");
    eprintln!("write to the full cluster failed after {took:?}: {err}");
    assert!(matches!(err, RbdError::Timeout { secs: 5, .. }), "{err}");
    assert!(took >= bound - Duration::from_millis(500), "took {took:?}");
    assert!(took < bound * 4, "took {took:?}, bound {bound:?}");
    read.expect("reads still work on a full cluster");
    assert!(buf.iter().all(|&b| b == 5));
    // Writes work again once there is room.
    img.write_at(&[7; 4096], 4096).unwrap();
}
