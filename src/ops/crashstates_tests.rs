//! Every crash state of the operations that write a volume's header through its keys
//! or make a new volume file: create, rekey, keyslot add and remove, restore of a
//! snapshot. Recorded and enumerated by `volume/crashstates.rs` (method and bounds
//! there and in docs/testing.md); each state is opened the way a restart would, through
//! the keyslots and the local keystore.

use std::path::{Path, PathBuf};

use crate::keys::{Argon2Params, KeyRef, WrappedDek};
use crate::snapshot::{self, SnapshotId, Store};
use crate::volume::crashstates::{enumerate, report, scratch_dir, Counts, Image, Recorder, State};
use crate::volume::{self, Header, OpenOptions, VolumeError, VolumeSpec};

use super::{KeyOptions, NewKey};

const FAST: Argon2Params = Argon2Params {
    memory_kib: 8192,
    time: 1,
    lanes: 1,
};

/// A keystore, a directory of volumes (recorded), a scratch file for states.
struct Bench {
    _dir: tempfile::TempDir,
    vols: PathBuf,
    keys: KeyOptions,
    rt: tokio::runtime::Runtime,
    scratch_dir: tempfile::TempDir,
}

impl Bench {
    fn new() -> Bench {
        let dir = tempfile::tempdir().expect("tempdir");
        let vols = dir.path().join("vols");
        std::fs::create_dir(&vols).expect("mkdir");
        let keys = KeyOptions {
            keystore: Some(dir.path().join("keys")),
            passphrase: None,
            argon2: FAST,
            audit_log: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let scratch_dir = scratch_dir(dir.path());
        Bench {
            _dir: dir,
            vols,
            keys,
            rt,
            scratch_dir,
        }
    }

    fn scratch(&self) -> PathBuf {
        self.scratch_dir.path().join("state.img")
    }

    /// A new local master key.
    fn new_key(&self) -> NewKey<'static> {
        let info = self
            .keys
            .local(true)
            .expect("keystore")
            .create_key(None)
            .expect("key");
        NewKey::Key(KeyRef::Local(Some(info.key_id)))
    }

    /// A new thin volume of 256 KiB holding `data` at 0 (flushed), and its header.
    fn volume(&self, name: &str, data: &[u8]) -> (PathBuf, Header) {
        let path = self.vols.join(name);
        let spec = VolumeSpec {
            size: 256 * 1024,
            sector_size: 4096,
        };
        self.rt
            .block_on(super::create_volume(
                &path,
                &spec,
                NewKey::Key(KeyRef::Local(None)),
                &self.keys,
            ))
            .expect("create");
        let (v, _, _) = self
            .rt
            .block_on(super::unlock(&path, &self.keys, OpenOptions::default()))
            .expect("unlock");
        v.write_at(data, 0, false).expect("write");
        v.flush().expect("flush");
        drop(v);
        let (h, _) = volume::read_header(&path).expect("header");
        (path, h)
    }

    /// Opens the state at `p` through its keyslots (read-write, as a restart does) and
    /// reads the whole volume.
    fn open_state(&self, p: &Path) -> Result<(Header, Vec<u8>), String> {
        let (v, h, _) = self
            .rt
            .block_on(super::unlock(p, &self.keys, OpenOptions::default()))
            .map_err(|e| format!("unlock: {e}"))?;
        let mut buf = vec![0u8; v.size() as usize];
        v.read_at(&mut buf, 0).map_err(|e| format!("read: {e}"))?;
        Ok((h, buf))
    }

    /// Runs `op` with `path`'s directory recorded, then checks every crash state of
    /// `path` (`existed`: whether it existed before).
    fn enumerate(
        &self,
        name: &str,
        path: &Path,
        existed: bool,
        op: impl FnOnce(),
        check: impl FnMut(&State) -> Result<(), String>,
    ) -> Counts {
        let base = existed.then(|| Image::read_file(path).expect("image"));
        let rec = Recorder::start(&self.vols);
        op();
        let events = rec.take(path);
        drop(rec);
        let counts = enumerate(base.as_ref(), &events, &self.scratch(), check)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        report(name, &counts);
        counts
    }

    /// A keyslot operation: every state opens, with the old keyslots or the new ones
    /// (the new ones when the operation completed), and the data flushed before it.
    fn keyslot_states(&self, name: &str, path: &Path, data: &[u8], op: impl FnOnce()) -> Counts {
        let old = volume::read_header(path).expect("header").0.keyslots;
        let new_slots = std::cell::RefCell::new(Vec::<WrappedDek>::new());
        let counts = self.enumerate(
            name,
            path,
            true,
            || {
                op();
                *new_slots.borrow_mut() = volume::read_header(path).expect("header").0.keyslots;
            },
            |s| {
                let (h, got) = self.open_state(s.path)?;
                let new = new_slots.borrow();
                if got[..data.len()] != data[..] || got[data.len()..].iter().any(|&b| b != 0) {
                    return Err("the data flushed before the operation changed".into());
                }
                match (h.keyslots == *new, h.keyslots == old, s.complete) {
                    (true, _, _) | (false, true, false) => Ok(()),
                    (false, true, true) => Err("the completed operation is not on disk".into()),
                    (false, false, _) => Err("keyslots neither the old nor the new ones".into()),
                }
            },
        );
        assert_ne!(*new_slots.borrow(), old, "{name} changed the keyslots");
        counts
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

/// Refusals that say the file holds no (complete) volume yet.
fn no_volume_yet(e: &VolumeError) -> bool {
    matches!(
        e,
        VolumeError::NotAVolume { .. }
            | VolumeError::Truncated { .. }
            | VolumeError::BothHeadersDamaged { .. }
    )
}

#[test]
fn create_leaves_no_volume_or_a_whole_one_that_reads_zeros() {
    let b = Bench::new();
    let path = b.vols.join("new.img");
    let spec = VolumeSpec {
        size: 256 * 1024,
        sector_size: 4096,
    };
    let (mut absent, mut refused, mut opened) = (0, 0, 0);
    let counts = b.enumerate(
        "create",
        &path,
        false,
        || {
            b.rt.block_on(super::create_volume(
                &path,
                &spec,
                NewKey::Key(KeyRef::Local(None)),
                &b.keys,
            ))
            .expect("create");
        },
        |s| {
            if !s.path.exists() {
                absent += 1;
                return Ok(());
            }
            let len = std::fs::metadata(s.path).map_err(|e| e.to_string())?.len();
            match volume::read_header(s.path) {
                Err(e) if no_volume_yet(&e) && !s.complete => {
                    refused += 1;
                    return Ok(());
                }
                Err(e) => return Err(format!("header: {e}")),
                // Opening refuses it as truncated (checked by the open tests).
                Ok((h, _)) if len < h.data_offset + h.size && !s.complete => {
                    refused += 1;
                    return Ok(());
                }
                Ok(_) => {}
            }
            let (h, data) = b.open_state(s.path)?;
            if h.size != spec.size || data.iter().any(|&x| x != 0) {
                return Err("a new volume that does not read as zeros".into());
            }
            opened += 1;
            Ok(())
        },
    );
    println!(
        "crash states: create: {absent} absent, {refused} refused as no volume, {opened} opened"
    );
    assert!(absent == 1 && refused > 0 && opened > 0, "{counts:?}");
}

#[test]
fn rekey_and_keyslot_add_and_remove_open_with_the_old_or_the_new_keyslots() {
    let b = Bench::new();
    let data = pattern(10_000, 1);
    let (path, _) = b.volume("v.img", &data);
    let to = b.new_key();
    let c1 = b.keyslot_states("rekey", &path, &data, || {
        b.rt.block_on(super::rekey(&path, &b.keys, to, None))
            .expect("rekey");
    });
    let extra = b.new_key();
    let c2 = b.keyslot_states("keyslot add", &path, &data, || {
        b.rt.block_on(super::keyslot_add(&path, &b.keys, extra))
            .expect("add");
    });
    let c3 = b.keyslot_states("keyslot remove", &path, &data, || {
        b.rt.block_on(super::keyslot_remove(&path, &b.keys, 0))
            .expect("remove");
    });
    for c in [c1, c2, c3] {
        assert!(c.states >= 4 && c.epochs >= 2, "{c:?}");
    }
}

#[test]
fn a_restore_is_published_only_complete() {
    let b = Bench::new();
    let data = pattern(100_000, 2);
    let (src, _) = b.volume("src.img", &data);
    let store_dir = b.vols.parent().expect("parent").join("store");
    let store = Store::open(store_dir.to_str().expect("utf-8"), true).expect("store");
    let opts = snapshot::CreateOptions {
        parent: snapshot::Parent::None,
        changed: None,
        description: String::new(),
    };
    let st =
        b.rt.block_on(super::snapshot_create(&src, &b.keys, &store, &opts))
            .expect("snapshot");
    let id = SnapshotId::parse(&st.id).expect("id");
    let dest = b.vols.join("restored.img");
    let partial = super::partial_path(&dest);
    let (mut hidden, mut published) = (0, 0);
    let mut leftovers: Vec<Vec<u8>> = Vec::new();
    let counts = b.enumerate(
        "restore",
        &partial,
        false,
        || {
            b.rt.block_on(super::restore_snapshot(&store, &id, &dest, &b.keys, None))
                .expect("restore");
        },
        |s| {
            // Before the link the volume's name does not exist (the next restore
            // removes the hidden partial file); after it, the volume is complete.
            if !s.linked {
                hidden += 1;
                if let Ok(img) = std::fs::read(s.path) {
                    leftovers.truncate(1); // the first one left, and the latest
                    leftovers.push(img);
                }
                return Ok(());
            }
            let (_, got) = b.open_state(s.path)?;
            if got[..data.len()] != data[..] || got[data.len()..].iter().any(|&x| x != 0) {
                return Err("a published restore that is not the snapshot".into());
            }
            published += 1;
            Ok(())
        },
    );
    println!(
        "crash states: restore: {hidden} before publication (name absent), {published} published"
    );
    assert!(hidden > 0 && published > 0, "{counts:?}");
    let (_, got) = b.open_state(&dest).expect("restored");
    assert_eq!(&got[..data.len()], &data[..]);
    // What a crash before publication leaves is removed by the next restore to the
    // same name, which then completes.
    assert_eq!(leftovers.len(), 2);
    for img in leftovers {
        std::fs::remove_file(&dest).expect("rm");
        std::fs::write(&partial, img).expect("leftover");
        b.rt.block_on(super::restore_snapshot(&store, &id, &dest, &b.keys, None))
            .expect("restore over a leftover");
        let (_, got) = b.open_state(&dest).expect("restored");
        assert_eq!(&got[..data.len()], &data[..]);
        assert!(!partial.exists());
    }
}
