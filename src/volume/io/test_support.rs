//! Helpers shared by the volume's unit tests: opening fresh volumes, a deterministic
//! pseudo-random generator, the file's allocated blocks.

use crate::crypto::Dek;
use crate::volume::header::tests::new_volume;
use crate::volume::{Header, OpenOptions, Volume};
use std::path::{Path, PathBuf};

pub(in crate::volume) fn open_rw(path: &Path, h: &Header, dek: &Dek) -> Volume {
    let dek = Dek::from_slice(dek.expose()).expect("dek");
    Volume::open(path, h, dek, OpenOptions::default()).expect("open")
}

pub(in crate::volume) fn setup(
    size: u64,
    ss: u32,
) -> (tempfile::TempDir, PathBuf, Header, Dek, Volume) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, h, dek) = new_volume(dir.path(), size, ss);
    let v = open_rw(&path, &h, &dek);
    (dir, path, h, dek, v)
}

/// xorshift64*: deterministic pseudo-random numbers for tests.
pub(in crate::volume) struct Rng(pub(in crate::volume) u64);
impl Rng {
    pub(in crate::volume) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(in crate::volume) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub(in crate::volume) fn open_discard(path: &Path, h: &Header, dek: &Dek) -> Volume {
    Volume::open(
        path,
        h,
        Dek::from_slice(dek.expose()).expect("dek"),
        OpenOptions {
            read_only: false,
            discard: true,
            ..OpenOptions::default()
        },
    )
    .expect("open")
}

/// Allocated bytes of the backing file's data area (what `du` would count).
pub(in crate::volume) fn file_blocks(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}
