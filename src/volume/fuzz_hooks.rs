//! The volume layer's parsers of on-disk bytes, reachable from the fuzz targets
//! (`crate::fuzzing`) without making them public: the header copies, the allocation
//! map's pages and the changed-block sidecar.

use std::fs::File;

pub(crate) use super::alloc::{summarize as summarize_map, PAGE_SIZE as MAP_PAGE_SIZE};
pub(crate) use super::header::compute_kcv;
pub(crate) use super::header::fuzz_hooks::{
    encode_header_copy, header_mac, header_mac_input, resolve_header_bytes, seal_header_copy,
};

/// Decodes page `index` of map copy `copy`: its sequence number and bitmap words.
pub(crate) fn decode_map_page(
    page: &[u8; MAP_PAGE_SIZE],
    uuid: &uuid::Uuid,
    index: u64,
    copy: usize,
) -> Result<(u64, Vec<u64>), String> {
    super::alloc::decode_page(page, uuid, index, copy)
}

/// Encodes a map page (the inverse of [`decode_map_page`]).
pub(crate) fn encode_map_page(
    uuid: &uuid::Uuid,
    index: u64,
    copy: usize,
    seq: u64,
    words: &[u64],
) -> Box<[u8; MAP_PAGE_SIZE]> {
    super::alloc::encode_page(uuid, index, copy, seq, words)
}

/// Writes the checksum a map page must carry into it.
pub(crate) fn seal_map_page(page: &mut [u8; MAP_PAGE_SIZE]) {
    let sum = super::alloc::page_checksum(page);
    let at = super::alloc::OFF_CSUM;
    page[at..at + 32].copy_from_slice(&sum);
}

/// Parses a changed-block sidecar written for volume `uuid` with `nwords` words.
pub(crate) fn decode_cbt(b: &[u8], uuid: &uuid::Uuid, nwords: usize) -> Option<(String, Vec<u64>)> {
    super::tracking::cbt_decode(b, uuid, nwords)
}

/// Encodes a changed-block sidecar (the inverse of [`decode_cbt`] for a clean close).
pub(crate) fn encode_cbt(
    uuid: &uuid::Uuid,
    in_use: bool,
    base: Option<&str>,
    words: &[u64],
) -> std::io::Result<Vec<u8>> {
    super::tracking::cbt_encode(uuid, in_use, base, words)
}

/// A file holding exactly `bytes`, in memory (`memfd`), for the parsers that read a `File`.
pub(crate) fn memory_file(bytes: &[u8]) -> std::io::Result<File> {
    use std::io::Write;
    let fd = nix::sys::memfd::memfd_create(
        c"cryptvol-fuzz",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut file = File::from(fd);
    file.write_all(bytes)?;
    Ok(file)
}
