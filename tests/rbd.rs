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

// ---------------------------------------------------------------------------------------
// cryptvol commands on rbd:POOL/IMAGE volumes: create, info, check, serve through NBD, no
// plaintext in any RADOS object, fencing (a second server refused naming the holder,
// takeover blocklisting the old one).

/// The seed of the data the NBD tests write: no other test writes this pattern.
const PLAINTEXT_SEED: u64 = 0x5eed_c0de_7e57_0001;

/// `cryptvol` with `env`'s keystore, reaching the test cluster through `CEPH_CONF`.
fn cv(env: &common::Env) -> Command {
    let mut c = env.cmd();
    c.env("CEPH_CONF", &cluster().conf);
    c
}

/// A unique image name for one test.
fn image_name(test: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "cv-{test}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `cryptvol serve` of `volume` (NAME=rbd:...) on its own Unix and control sockets, once
/// it accepts connections.
fn serve_rbd(env: &common::Env, volume: &str, extra: &[&str]) -> common::Server {
    let tag = image_name("srv");
    let sock = env.path(&format!("{tag}.sock"));
    let ctl = env.path(&format!("{tag}.ctl"));
    let mut args = vec!["--control", common::s(&ctl)];
    args.extend_from_slice(extra);
    let conf = cluster().conf.display().to_string();
    env.serve_env(&sock, &[volume], &args, false, &[("CEPH_CONF", &conf)])
}

/// `rbd ARGS` against the test cluster; its stdout.
fn rbd_tool(args: &[&str]) -> String {
    common::run_ok(
        Command::new("rbd")
            .arg("--conf")
            .arg(&cluster().conf)
            .args(args),
    )
}

/// `rados -p rbd ARGS` against the test cluster; its stdout.
fn rados(args: &[&str]) -> String {
    common::run_ok(
        Command::new("rados")
            .arg("--conf")
            .arg(&cluster().conf)
            .args(["-p", "rbd"])
            .args(args),
    )
}

/// The RADOS object name prefix of an image's data (`rbd_data.ID`).
fn data_prefix(image: &str) -> String {
    let info: serde_json::Value = serde_json::from_str(&rbd_tool(&[
        "info",
        "--format",
        "json",
        &format!("rbd/{image}"),
    ]))
    .expect("rbd info json");
    info["block_name_prefix"]
        .as_str()
        .expect("block_name_prefix")
        .to_string()
}

/// Writes `data` at `offset` through an NBD connection in 64 KiB requests, then flushes.
fn nbd_write(c: &mut common::Raw, offset: u64, data: &[u8]) {
    for (i, chunk) in data.chunks(64 * 1024).enumerate() {
        let at = offset + (i * 64 * 1024) as u64;
        assert_eq!(c.write(i as u64, at, chunk), 0, "NBD write at {at}");
    }
    c.request(0, common::proto::CMD_FLUSH, 9999, 0, 0, &[])
        .expect("send FLUSH");
    assert_eq!(c.reply().expect("FLUSH reply"), (0, 9999), "NBD flush");
}

/// Reads `len` bytes at `offset` through an NBD connection in 64 KiB requests.
fn nbd_read(c: &mut common::Raw, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut at = offset;
    while out.len() < len {
        let n = (len - out.len()).min(64 * 1024);
        let got = c
            .read(at, at, n as u32)
            .unwrap_or_else(|e| panic!("NBD read at {at}: error {e}"));
        out.extend_from_slice(&got);
        at += n as u64;
    }
    out
}

/// Every object of pool `rbd` whose bytes hold a 64-byte piece of `plain` (the first
/// 64 bytes of each of its 4 KiB blocks) at any 512-byte-aligned offset, or its very first
/// 64 bytes anywhere; with the number of objects read.
fn objects_with_plaintext(plain: &[u8], scratch: &std::path::Path) -> (Vec<String>, usize) {
    let needles: std::collections::HashSet<&[u8]> = plain.chunks(4096).map(|b| &b[..64]).collect();
    let list = rados(&["ls"]);
    let objects: Vec<&str> = list.lines().filter(|l| !l.is_empty()).collect();
    let mut found = Vec::new();
    for obj in &objects {
        let file = scratch.join("object");
        rados(&["get", obj, common::s(&file)]);
        let bytes = std::fs::read(&file).expect("read the fetched object");
        let aligned = (0..bytes.len().saturating_sub(63))
            .step_by(512)
            .any(|at| needles.contains(&bytes[at..at + 64]));
        if aligned || common::contains(&bytes, &plain[..64]) {
            found.push(obj.to_string());
        }
    }
    (found, objects.len())
}

#[test]
fn rbd_volume_create_serve_read_back_check_and_no_plaintext_at_rest() {
    // Alone on the cluster: every object of the pool is read, none may vanish meanwhile.
    let _g = SHARED.write().unwrap_or_else(|e| e.into_inner());
    let env = common::Env::new();
    let name = image_name("vol");
    let spec = format!("rbd:rbd/{name}");
    let created = common::run_ok(cv(&env).args(["create", "--size", "64M", &spec]));
    assert!(created.contains(&spec), "{created}");
    let again = common::fails(cv(&env).args(["create", "--size", "64M", &spec]));
    assert!(again.contains("already exists"), "{again}");

    let info: serde_json::Value =
        serde_json::from_str(&common::run_ok(cv(&env).args(["info", "--json", &spec])))
            .expect("info --json");
    assert_eq!(info["size"], 64 * MIB, "{info}");

    let data = common::pattern(MIB as usize, PLAINTEXT_SEED);
    let at = 3 * MIB + 4096;
    let server = serve_rbd(&env, &format!("vol1={spec}"), &[]);
    assert!(
        server.log_text().contains("engine=\"rbd\""),
        "{}",
        server.log_text()
    );
    let (mut c, size, _) = common::Raw::open(&server, "vol1");
    assert_eq!(size, 64 * MIB);
    nbd_write(&mut c, at, &data);
    assert!(
        nbd_read(&mut c, at, data.len()) == data,
        "read back differs"
    );
    c.disconnect();
    server.stop();

    // A new server reads the same data back: it lives on the image, encrypted.
    let server = serve_rbd(&env, &format!("vol1={spec}"), &[]);
    let (mut c, _, _) = common::Raw::open(&server, "vol1");
    assert!(
        nbd_read(&mut c, at, data.len()) == data,
        "data read back by a second server differs"
    );
    assert!(
        nbd_read(&mut c, 0, 4096).iter().all(|&b| b == 0),
        "thin: never written reads as zeros"
    );
    c.disconnect();
    server.stop();

    // No plaintext at rest: the same bytes written in the clear to a control image are
    // found (the scan works), and in no object of the volume's image.
    let rc = connect();
    let control = ImageSpec::parse(&format!("rbd:rbd/{}", image_name("plain"))).unwrap();
    RbdImage::create(&rc, &control, 4 * MIB).unwrap();
    let plain = RbdImage::open(&rc, &control).unwrap();
    plain.write_at(&data, 0).unwrap();
    plain.flush().unwrap();
    let volume_prefix = data_prefix(&name);
    let control_prefix = data_prefix(&control.image);
    let (found, read) = objects_with_plaintext(&data, env.dir.path());
    let volume_objects: Vec<String> = rados(&["ls"])
        .lines()
        .filter(|o| o.starts_with(&volume_prefix))
        .map(str::to_string)
        .collect();
    eprintln!(
        "read {read} RADOS objects; {} of the volume's image; plaintext in {found:?}",
        volume_objects.len()
    );
    assert!(
        !volume_objects.is_empty(),
        "the volume's image has no data objects"
    );
    assert!(
        !found.is_empty() && found.iter().all(|o| o.starts_with(&control_prefix)),
        "plaintext expected only in the control image ({control_prefix}): {found:?}"
    );
    assert!(
        !found.iter().any(|o| o.starts_with(&volume_prefix)),
        "PLAINTEXT AT REST in the volume's objects: {found:?}"
    );
    drop(plain);
    RbdImage::remove(&rc, &control).unwrap();

    // `cryptvol check` of the image: compliant; an image in the clear is not.
    let line = common::run_ok(cv(&env).args(["check", &spec]));
    assert!(line.contains(&format!("{spec}: COMPLIANT")), "{line}");
    let control2 = ImageSpec::parse(&format!("rbd:rbd/{}", image_name("plain"))).unwrap();
    RbdImage::create(&rc, &control2, 4 * MIB).unwrap();
    RbdImage::open(&rc, &control2)
        .unwrap()
        .write_at(&data, 0)
        .unwrap();
    let out = common::run(cv(&env).arg("check").arg(control2.to_string()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("NON_COMPLIANT"), "{stdout}");
}

/// `cryptvol serve` of `volume` expected to fail at start-up (bounded); its stderr.
fn serve_refused(env: &common::Env, volume: &str) -> String {
    let tag = image_name("refused");
    let out = common::run(
        Command::new("timeout")
            .arg("120")
            .arg(common::bin())
            .env("CRYPTVOL_KEYSTORE", env.keystore())
            .env("CEPH_CONF", &cluster().conf)
            .arg("serve")
            .arg("--unix")
            .arg(env.path(&format!("{tag}.sock")))
            .arg("--control")
            .arg(env.path(&format!("{tag}.ctl")))
            .arg(volume),
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "a second serve must be refused at start-up ({}): {err}",
        out.status
    );
    err
}

#[test]
fn second_serve_is_refused_naming_the_holder_and_takeover_fences_the_old_server() {
    let _g = SHARED.read().unwrap_or_else(|e| e.into_inner());
    let env = common::Env::new();
    let name = image_name("fence");
    let volume = format!("vol1=rbd:rbd/{name}");
    common::run_ok(cv(&env).args(["create", "--size", "64M", &format!("rbd:rbd/{name}")]));
    let old = serve_rbd(&env, &volume, &[]);
    let (mut stale, _, _) = common::Raw::open(&old, "vol1");
    nbd_write(&mut stale, 0, &common::pattern(4096, PLAINTEXT_SEED + 1));

    // The holder as `rbd lock ls` names it.
    let locks: serde_json::Value = serde_json::from_str(&rbd_tool(&[
        "lock",
        "ls",
        "--format",
        "json",
        &format!("rbd/{name}"),
    ]))
    .expect("rbd lock ls json");
    let lock = &locks[0];
    let holder = format!(
        "{} ({})",
        lock["locker"].as_str().expect("locker"),
        lock["address"].as_str().expect("address")
    );
    assert!(holder.starts_with("client."), "{locks}");

    let err = serve_refused(&env, &volume);
    assert!(err.contains(&format!("is locked by {holder}")), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // The first server still writes.
    nbd_write(&mut stale, 4096, &common::pattern(4096, PLAINTEXT_SEED + 2));

    // Its host hangs (SIGSTOP: the process keeps its lock and its cluster session), and a
    // new server takes the image over.
    old.signal("STOP");
    let new = serve_rbd(&env, &volume, &["--takeover"]);
    new.wait_log("took the image over", 1, common::PATIENCE);
    let (mut fresh, _, _) = common::Raw::open(&new, "vol1");
    let mine = common::pattern(4096, PLAINTEXT_SEED + 3);
    nbd_write(&mut fresh, 0, &mine);

    // The old server wakes up: its client's write fails (EPERM), at the latest at the
    // flush (librbd's write-back cache may take the write itself), with the cause logged,
    // and never reaches the image.
    old.signal("CONT");
    let write = stale.write(1, 0, &common::pattern(4096, PLAINTEXT_SEED + 4));
    stale
        .request(0, common::proto::CMD_FLUSH, 2, 0, 0, &[])
        .expect("send FLUSH");
    let (flush, _) = stale.reply().expect("FLUSH reply");
    eprintln!("fenced server: write -> {write}, flush -> {flush}");
    for e in [write, flush] {
        assert!(
            e == 0 || e == common::proto::EPERM || e == 5,
            "a fenced server's error must be EPERM or EIO, got {e}"
        );
    }
    assert!(
        flush != 0,
        "a fenced server's flush must fail (write {write}, flush {flush}):\n{}",
        old.log_text()
    );
    old.wait_log("blocklisted", 1, common::PATIENCE);
    assert!(
        nbd_read(&mut fresh, 0, 4096) == mine,
        "a fenced write reached the image"
    );
    drop(stale);
    drop(old);

    // The new server dies (SIGKILL); a third takes over and finds the data.
    drop(fresh);
    drop(new);
    let third = serve_rbd(&env, &volume, &["--takeover"]);
    let (mut c, _, _) = common::Raw::open(&third, "vol1");
    assert!(
        nbd_read(&mut c, 0, 4096) == mine,
        "the data after a second takeover"
    );
    assert!(
        nbd_read(&mut c, 4096, 4096) == common::pattern(4096, PLAINTEXT_SEED + 2),
        "the first server's data after two takeovers"
    );
    c.disconnect();
    third.stop();
}
