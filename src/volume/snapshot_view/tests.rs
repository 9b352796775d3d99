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
