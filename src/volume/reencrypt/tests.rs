use super::*;
use crate::volume::header::tests::{dummy_slot, new_legacy_volume, new_volume};
use crate::volume::{OpenOptions, SNAPSHOT_CHUNK};
use std::cell::Cell;
use std::sync::Arc;

thread_local! {
    /// Makes the next zone conversion stop half-way, as a crash would.
    pub(in crate::volume) static INTERRUPT: Cell<bool> = const { Cell::new(false) };
    /// Makes finishing an interrupted zone in-process fail too (as when the
    /// process dies: the zone is left for the next open).
    pub(in crate::volume) static FAIL_FINISH: Cell<bool> = const { Cell::new(false) };
}

pub(in crate::volume) fn copy(d: &Dek) -> Dek {
    Dek::from_slice(d.expose()).expect("dek")
}

pub(in crate::volume) fn image(v: &Volume) -> Vec<u8> {
    let mut b = vec![0u8; v.size() as usize];
    v.read_at(&mut b, 0).expect("read");
    b
}

/// Writes a pattern over parts of the volume (leaving some chunks unallocated).
pub(in crate::volume) fn fill(v: &Volume, seed: u8) {
    let size = v.size();
    let mut off = 0;
    while off < size {
        let n = (size - off).min(40_000);
        let data: Vec<u8> = (0..n)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect();
        v.write_at(&data, off, false).expect("write");
        off += 3 * 65536 + 4096; // skip some chunks
    }
    v.flush().expect("flush");
}

pub(in crate::volume) fn begin(v: &Volume) -> Dek {
    let new = Dek::generate().expect("dek");
    let slot = dummy_slot(&v.uuid(), "new");
    v.reencrypt_begin(copy(&new), vec![slot]).expect("begin");
    new
}

#[test]
fn reencrypts_with_concurrent_writes_and_destroys_the_old_key() {
    for ss in [512u32, 4096] {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 3 * ZONE_SECTORS * u64::from(ss) + 5 * u64::from(ss);
        let (path, h, dek) = new_volume(dir.path(), size, ss);
        let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
        fill(&v, 3);
        let before = image(&v);
        let new = begin(&v);
        assert_eq!(
            v.reencrypt_status(),
            Some(ReencryptStatus { watermark: 0, size })
        );
        assert!(v
            .reencrypt_begin(
                Dek::generate().expect("d"),
                vec![dummy_slot(&v.uuid(), "x")]
            )
            .is_err());
        // Interleave steps with writes on both sides of the watermark.
        let mut model = before.clone();
        let mut steps = 0;
        while let Some(st) = v.reencrypt_step().expect("step") {
            steps += 1;
            assert!(st.watermark <= size);
            for off in [
                0u64,
                st.watermark.saturating_sub(700).min(size - 1500),
                size - 3000,
                size / 2,
            ] {
                let data = vec![steps as u8; 1500];
                v.write_at(&data, off, false).expect("write");
                model[off as usize..off as usize + 1500].copy_from_slice(&data);
            }
            assert_eq!(image(&v), model, "after step {steps}");
        }
        assert_eq!(steps, 4, "3 full zones and a short one");
        assert!(v.reencrypt_status().is_none());
        v.flush().expect("flush");
        drop(v);
        let (h2, _) = crate::volume::read_header(&path).expect("header");
        assert!(
            h2.reencrypt.is_none() && !h2.required_features.iter().any(|f| f == REENCRYPT_FEATURE)
        );
        assert_eq!(
            h2.keyslots[0].params.get("tag").map(String::as_str),
            Some("new")
        );
        // The old DEK no longer opens the volume; the new one does, with the data.
        assert!(matches!(
            Volume::open(&path, &h2, copy(&dek), OpenOptions::default()),
            Err(VolumeError::KeyCheckFailed { .. })
        ));
        let v = Volume::open(&path, &h2, copy(&new), OpenOptions::default()).expect("open new");
        assert_eq!(image(&v), model);
        drop(v);
        // Even with the old header put back, the old key decrypts only garbage.
        let mut old_h = h.clone();
        old_h.sequence = h2.sequence + 10;
        crate::volume::write_header(&path, &mut old_h, &dek).expect("restore old header");
        let v = Volume::open(&path, &old_h, copy(&dek), OpenOptions::default()).expect("open old");
        let img = image(&v);
        let written: Vec<usize> = (0..model.len()).filter(|&i| model[i] != 0).collect();
        let same = written.iter().filter(|&&i| img[i] == model[i]).count();
        assert!(
            same * 50 < written.len(),
            "old key still reads the data ({same}/{})",
            written.len()
        );
    }
}

#[test]
fn an_interrupted_step_is_finished_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 2 * ZONE_SECTORS * 4096;
    let (path, h, dek) = new_volume(dir.path(), size, 4096);
    let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
    fill(&v, 9);
    let want = image(&v);
    let new = begin(&v);
    v.reencrypt_step().expect("first zone");
    INTERRUPT.with(|f| f.set(true));
    FAIL_FINISH.with(|f| f.set(true));
    assert!(
        v.reencrypt_step().is_err(),
        "interrupted half-way through zone 2"
    );
    INTERRUPT.with(|f| f.set(false));
    FAIL_FINISH.with(|f| f.set(false));
    // The zone is refused until the volume is opened again; the rest works.
    let mut b = vec![0u8; 4096];
    assert!(v.read_at(&mut b, ZONE_SECTORS * 4096 + 8192).is_err());
    assert!(v.write_at(&b, ZONE_SECTORS * 4096, false).is_err());
    assert!(v.reencrypt_step().is_err(), "no more steps until reopened");
    v.read_at(&mut b, 0).expect("outside the zone");
    drop(v);
    let (h2, _) = crate::volume::read_header(&path).expect("header");
    let r = h2.reencrypt.clone().expect("in progress");
    let zone = r.hotzone.clone().expect("hotzone recorded");
    assert_eq!(
        (r.watermark, zone.offset),
        (ZONE_SECTORS * 4096, ZONE_SECTORS * 4096)
    );
    // Without the new key the volume cannot be opened; read-only cannot recover.
    assert!(matches!(
        Volume::open(&path, &h2, copy(&dek), OpenOptions::default()),
        Err(VolumeError::ReencryptKeyNeeded { .. })
    ));
    let ro = OpenOptions {
        read_only: true,
        discard: false,
        ..OpenOptions::default()
    };
    assert!(matches!(
        Volume::open_with_next(&path, &h2, copy(&dek), Some(copy(&new)), ro),
        Err(VolumeError::ReencryptInterrupted { .. })
    ));
    let v = Volume::open_with_next(
        &path,
        &h2,
        copy(&dek),
        Some(copy(&new)),
        OpenOptions::default(),
    )
    .expect("open recovers");
    assert_eq!(
        v.reencrypt_status().map(|s| s.watermark),
        Some(2 * ZONE_SECTORS * 4096)
    );
    assert_eq!(image(&v), want, "recovered data");
    while v.reencrypt_step().expect("step").is_some() {}
    assert_eq!(image(&v), want);
    drop(v);
    let (h3, _) = crate::volume::read_header(&path).expect("header");
    let v = Volume::open(&path, &h3, copy(&new), OpenOptions::default()).expect("open");
    assert_eq!(image(&v), want);
}

/// A step that fails half-way while the process keeps running (EIO, ENOSPC) is
/// finished in-process from the recorded hashes: no read ever sees a half-converted
/// zone with the wrong key, and a retry converts nothing twice.
#[test]
fn a_failed_step_is_finished_in_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 2 * ZONE_SECTORS * 4096;
    let (path, h, dek) = new_volume(dir.path(), size, 4096);
    let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
    let mut data = vec![0u8; size as usize];
    for c in (0..size / 65536).step_by(2) {
        let o = (c * 65536) as usize;
        for (i, b) in data[o..o + 65536].iter_mut().enumerate() {
            *b = ((o + i) % 251) as u8 | 1;
        }
        v.write_at(&data[o..o + 65536], o as u64, false).expect("w");
    }
    v.flush().expect("flush");
    begin(&v);
    INTERRUPT.with(|f| f.set(true));
    let st = v.reencrypt_step();
    INTERRUPT.with(|f| f.set(false));
    assert!(st.is_ok(), "finished in-process: {st:?}");
    assert_eq!(image(&v), data, "no sector read with the wrong key");
    while v.reencrypt_step().expect("step").is_some() {}
    assert_eq!(image(&v), data, "nothing converted twice");
}

#[test]
fn snapshot_views_and_reencryption_exclude_each_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, dek) = new_volume(dir.path(), 2 << 20, 4096);
    let v = Arc::new(Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open"));
    let view = v.snapshot_view(SNAPSHOT_CHUNK).expect("view");
    let e = v.reencrypt_begin(
        Dek::generate().expect("d"),
        vec![dummy_slot(&v.uuid(), "n")],
    );
    assert!(matches!(e, Err(VolumeError::Reencrypt { .. })), "{e:?}");
    drop(view);
    begin(&v);
    assert!(matches!(
        v.snapshot_view(SNAPSHOT_CHUNK),
        Err(VolumeError::Snapshot { .. })
    ));
    assert!(matches!(v.data_key(), Err(VolumeError::Snapshot { .. })));
}

#[test]
fn reencrypt_refusals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, dek) = new_legacy_volume(dir.path(), 1 << 20, 4096);
    let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
    // A slot bound to another volume is refused; so is the current key.
    let other = dummy_slot(&uuid::Uuid::new_v4(), "x");
    assert!(v
        .reencrypt_begin(Dek::generate().expect("d"), vec![other])
        .is_err());
    assert!(v
        .reencrypt_begin(copy(&dek), vec![dummy_slot(&v.uuid(), "same")])
        .is_err());
    assert_eq!(v.reencrypt_step().expect("none"), None);
    drop(v);
    let ro = OpenOptions {
        read_only: true,
        discard: false,
        ..OpenOptions::default()
    };
    let v = Volume::open(&path, &h, copy(&dek), ro).expect("open ro");
    assert!(matches!(
        v.reencrypt_begin(Dek::generate().expect("d"), vec![dummy_slot(&h.uuid, "n")]),
        Err(VolumeError::ReadOnly)
    ));
    // A legacy volume (no map) re-encrypts every sector.
    drop(v);
    let v = Volume::open(&path, &h, copy(&dek), OpenOptions::default()).expect("open");
    v.write_at(&[5u8; 4096], 8192, true).expect("w");
    let want = image(&v);
    begin(&v);
    while v.reencrypt_step().expect("step").is_some() {}
    assert_eq!(image(&v), want);
}
