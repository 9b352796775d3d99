use crate::volume::header::tests::new_volume;
use crate::volume::reencrypt::tests::copy;
use crate::volume::tracking::{cbt_decode, Tracking};
use crate::volume::{OpenOptions, Volume, SNAPSHOT_CHUNK};
use std::sync::Arc;

#[test]
fn snapshot_view_preserves_old_contents_and_tracks_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 4 * SNAPSHOT_CHUNK + 8192;
    let (path, h, dek) = new_volume(dir.path(), size, 4096);
    let v = Arc::new(Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open"));
    v.enable_change_tracking().expect("tracking");
    v.write_at(&vec![0xAA; SNAPSHOT_CHUNK as usize], 0, false)
        .expect("w");
    v.write_at(&[0xBB; 4096], 2 * SNAPSHOT_CHUNK + 65536, false)
        .expect("w");
    let view = v.snapshot_view(SNAPSHOT_CHUNK).expect("view");
    assert!(
        v.snapshot_view(SNAPSHOT_CHUNK).is_err(),
        "one view at a time"
    );
    assert_eq!(view.changed_since("snap-x"), None, "no base yet");
    // Writes after the view: chunk 0 overwritten, chunk 1 newly written, chunk 2
    // zeroed, chunk 4 (short) written.
    v.write_at(&vec![0xCC; 100_000], 10, false).expect("w");
    v.write_at(&[0xDD; 4096], SNAPSHOT_CHUNK, false).expect("w");
    v.write_zeroes(2 * SNAPSHOT_CHUNK, SNAPSHOT_CHUNK, false)
        .expect("z");
    v.write_at(&[0xEE; 8192], 4 * SNAPSHOT_CHUNK, false)
        .expect("w");
    let mut buf = vec![0u8; SNAPSHOT_CHUNK as usize];
    assert!(view.read_chunk(0, &mut buf).expect("c0"));
    assert!(buf.iter().all(|&b| b == 0xAA), "chunk 0 as of the view");
    assert!(
        !view.read_chunk(1, &mut buf).expect("c1"),
        "chunk 1 was a hole"
    );
    assert!(buf.iter().all(|&b| b == 0));
    assert!(view.read_chunk(2, &mut buf).expect("c2"));
    let mut want = vec![0u8; SNAPSHOT_CHUNK as usize];
    want[65536..65536 + 4096].fill(0xBB);
    assert_eq!(buf, want, "chunk 2 as of the view (partially allocated)");
    assert!(!view.read_chunk(3, &mut buf).expect("c3"));
    assert!(!view.read_chunk(4, &mut buf[..8192]).expect("c4 short"));
    // After reading a chunk, writes to it need no preserving and the view keeps its
    // answer for the chunks it has not read yet.
    v.write_at(&[0x11; 4096], 0, false).expect("w");
    view.completed("snap-0000000000000000a").expect("completed");
    drop(view);
    // The changes after the view are what the next view reports against that base.
    v.write_at(&[0x22; 4096], 3 * SNAPSHOT_CHUNK, false)
        .expect("w");
    let view2 = v.snapshot_view(SNAPSHOT_CHUNK).expect("view2");
    let changed = view2
        .changed_since("snap-0000000000000000a")
        .expect("tracked");
    assert_eq!(changed, vec![0, 1, 2, 3, 4]);
    assert_eq!(view2.changed_since("snap-other"), None);
    drop(view2); // not completed: its bits go back
    let view3 = v.snapshot_view(SNAPSHOT_CHUNK).expect("view3");
    assert_eq!(
        view3
            .changed_since("snap-0000000000000000a")
            .expect("tracked"),
        vec![0, 1, 2, 3, 4]
    );
    view3
        .completed("snap-0000000000000000b")
        .expect("completed");
    drop(view3);
    v.write_at(&[0x33; 10], 5, false).expect("w");
    // A clean close keeps the tracking; a crash (sidecar left "in use") loses it.
    drop(v);
    let v = Arc::new(Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open"));
    v.enable_change_tracking().expect("tracking");
    let view = v.snapshot_view(SNAPSHOT_CHUNK).expect("view");
    assert_eq!(view.changed_since("snap-0000000000000000b"), Some(vec![0]));
    drop(view);
    std::mem::forget(v); // no clean close: like kill -9 (the sidecar stays "in use")
    let side = std::fs::read(format!("{}.cbt", path.display())).expect("sidecar");
    assert!(
        cbt_decode(&side, &h.uuid, Tracking::nwords(size)).is_none(),
        "an in-use sidecar is not trusted"
    );
}

/// Regression (found by the soak, scripts/soak.sh): a view's chunk read took the
/// view's lock, then (a punch being under way) the chunk's range lock inside
/// `read_at`, while a writer of that chunk held the range lock and waited for the
/// view's lock in its copy-before-write step. Each round one thread starts a view and
/// reads every chunk of it again and again while the others write and punch the same
/// chunks; a barrier ends the round. Bounded by a deadline: a deadlock fails the test
/// instead of hanging it.
#[test]
fn view_reads_do_not_deadlock_with_writers_during_a_punch() {
    use crate::volume::io::test_support::{open_discard, Rng};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Barrier;
    use std::time::{Duration, Instant};

    const CHUNKS: u64 = 4;
    const ROUNDS: u64 = 60;
    const READS_PER_ROUND: u64 = 3;
    const OPS_PER_ROUND: u64 = 16;
    const DEADLINE: Duration = Duration::from_secs(120);
    const WORKERS: [(u64, bool); 4] = [(1, false), (2, false), (3, true), (4, true)];
    let dir = tempfile::tempdir().expect("tempdir");
    let size = CHUNKS * SNAPSHOT_CHUNK;
    let (path, h, dek) = new_volume(dir.path(), size, 4096);
    let v = Arc::new(open_discard(&path, &h, &dek));
    assert!(
        v.is_thin() && v.discard_enabled(),
        "a thin volume with discard"
    );
    // Two waits a round: after the view starts, and after everyone's I/O.
    let barrier = Arc::new(Barrier::new(WORKERS.len() + 1));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<&'static str>();
    let (reads, punches) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut handles = Vec::new();
    {
        let (v, b, tx, reads) = (v.clone(), barrier.clone(), done_tx.clone(), reads.clone());
        handles.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; SNAPSHOT_CHUNK as usize];
            for _ in 0..ROUNDS {
                let view = v.snapshot_view(SNAPSHOT_CHUNK).expect("view");
                b.wait();
                for _ in 0..READS_PER_ROUND {
                    for c in 0..CHUNKS {
                        view.read_chunk(c, &mut buf).expect("read chunk");
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
                b.wait();
            }
            tx.send("reader").expect("send");
        }));
    }
    for (seed, punch) in WORKERS {
        let (v, b, tx, punches) = (v.clone(), barrier.clone(), done_tx.clone(), punches.clone());
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let cs = v.chunk_size().expect("thin");
            for _ in 0..ROUNDS {
                b.wait();
                for _ in 0..OPS_PER_ROUND {
                    if punch {
                        let c = rng.below(size / cs);
                        v.discard(c * cs, cs).expect("punch");
                        punches.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let off = rng.below(size / 4096) * 4096;
                        v.write_at(&[seed as u8; 4096], off, false).expect("write");
                    }
                }
                b.wait();
            }
            tx.send(if punch { "puncher" } else { "writer" })
                .expect("send");
        }));
    }
    drop(done_tx);
    let deadline = Instant::now() + DEADLINE;
    let mut finished = Vec::new();
    while finished.len() < handles.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(who) => finished.push(who),
            Err(e) => panic!(
                "deadlock: after {DEADLINE:?} only {finished:?} finished \
                 ({} chunk reads, {} punches): {e}",
                reads.load(Ordering::Relaxed),
                punches.load(Ordering::Relaxed)
            ),
        }
    }
    for h in handles {
        h.join().expect("thread");
    }
    assert_eq!(
        reads.load(Ordering::Relaxed),
        ROUNDS * READS_PER_ROUND * CHUNKS
    );
    assert_eq!(punches.load(Ordering::Relaxed), ROUNDS * OPS_PER_ROUND * 2);
}
