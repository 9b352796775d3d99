//! Tests of the header format, by topic: creating volumes (`create`), the two copies
//! and their recovery (`recovery`), crash-safe updates (`write`), the key check value
//! and MAC (`mac`). This module holds the helpers they share; `dummy_slot`,
//! `new_volume` and `new_legacy_volume` also serve the volume I/O tests.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::copy::{copy_checksum, le_u32, COPY_LEN, OFF_CSUM, OFF_META_LEN};
use super::*;
use crate::crypto::Dek;
use crate::keys::{EncryptionContext, WrappedDek};

mod create;
mod mac;
mod recovery;
mod write;

pub(crate) fn dummy_slot(uuid: &uuid::Uuid, tag: &str) -> WrappedDek {
    let mut params = BTreeMap::new();
    params.insert("tag".to_string(), tag.to_string());
    WrappedDek {
        backend: "local".into(),
        key_id: format!("key-{tag}"),
        blob: vec![0xA5; 60],
        context: EncryptionContext::for_volume(uuid),
        params,
    }
}

pub(crate) fn new_volume(dir: &Path, size: u64, sector_size: u32) -> (PathBuf, Header, Dek) {
    let path = dir.join("vol.img");
    let uuid = uuid::Uuid::new_v4();
    let dek = Dek::generate().expect("dek");
    let spec = VolumeSpec { size, sector_size };
    let h = create(&path, &spec, uuid, vec![dummy_slot(&uuid, "a")], &dek).expect("create");
    (path, h, dek)
}

/// A volume as cryptvol made them before the allocation map existed (no map, no
/// feature): every block is treated as allocated.
pub(crate) fn new_legacy_volume(dir: &Path, size: u64, sector_size: u32) -> (PathBuf, Header, Dek) {
    let (path, mut h, dek) = new_volume(dir, size, sector_size);
    h.allocation_map = None;
    h.required_features.clear();
    assert_eq!(
        h.data_offset, DEFAULT_DATA_OFFSET,
        "legacy layout needs the default offset"
    );
    write_header(&path, &mut h, &dek).expect("rewrite header without the map");
    (path, h, dek)
}

pub(super) fn read_copy(path: &Path, index: usize) -> Vec<u8> {
    let f = File::open(path).expect("open");
    let mut b = vec![0u8; COPY_LEN];
    f.read_exact_at(&mut b, index as u64 * HEADER_COPY_SIZE)
        .expect("read");
    b
}

pub(super) fn write_copy(path: &Path, index: usize, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.write_all_at(bytes, index as u64 * HEADER_COPY_SIZE)
        .expect("write");
}

pub(super) fn corrupt(path: &Path, index: usize, at: usize) {
    let mut c = read_copy(path, index);
    c[at] ^= 0x40;
    write_copy(path, index, &c);
}

/// Simulates an attacker: edits a copy's metadata JSON, fixes the length and checksum.
pub(crate) fn tamper_json(path: &Path, index: usize, f: &dyn Fn(&mut serde_json::Value)) {
    let mut c = read_copy(path, index);
    let len = le_u32(&c, OFF_META_LEN) as usize;
    let mut v: serde_json::Value =
        serde_json::from_slice(&c[BINARY_HEADER_SIZE..BINARY_HEADER_SIZE + len]).expect("json");
    f(&mut v);
    let json = serde_json::to_vec(&v).expect("json");
    c[BINARY_HEADER_SIZE..].fill(0);
    c[BINARY_HEADER_SIZE..BINARY_HEADER_SIZE + json.len()].copy_from_slice(&json);
    c[OFF_META_LEN..OFF_META_LEN + 4].copy_from_slice(&(json.len() as u32).to_le_bytes());
    let sum = copy_checksum(&c);
    c[OFF_CSUM..OFF_CSUM + 32].copy_from_slice(&sum);
    write_copy(path, index, &c);
}

/// Edits a copy's binary header and fixes the checksum.
pub(super) fn tamper_binary(path: &Path, index: usize, f: &dyn Fn(&mut [u8])) {
    let mut c = read_copy(path, index);
    f(&mut c);
    let sum = copy_checksum(&c);
    c[OFF_CSUM..OFF_CSUM + 32].copy_from_slice(&sum);
    write_copy(path, index, &c);
}

pub(super) fn tamper_both(path: &Path, f: &dyn Fn(&mut serde_json::Value)) {
    tamper_json(path, 0, f);
    tamper_json(path, 1, f);
}

pub(super) trait TapMkdir {
    fn tap_mkdir(self) -> PathBuf;
}
impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).expect("mkdir");
        self
    }
}
