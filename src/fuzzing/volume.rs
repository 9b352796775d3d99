//! The volume file's metadata as an attacker who can write the file chooses it: the two
//! header copies (metadata JSON, keyslots), the allocation map's pages, and the
//! changed-block sidecar `<volume>.cbt`.
//!
//! Checksums are SHA-256 over each structure, so random bytes never get past them; a flag
//! in the input lets the body write the right checksum first, so that the fuzzer
//! explores what lies behind it (an attacker can compute a checksum too).

use std::path::Path;

use sha2::{Digest, Sha256};

use super::input::Input;
use super::seeds::{other_dek, seed_dek, seed_headers};
use crate::volume::fuzz_hooks::{
    decode_cbt, decode_map_page, encode_cbt, encode_header_copy, encode_map_page, header_mac_input,
    memory_file, resolve_header_bytes, seal_header_copy, seal_map_page, summarize_map,
    MAP_PAGE_SIZE,
};
use crate::volume::{CopyStatus, Header, MapLayout, HEADER_COPY_SIZE};

const COPY: usize = HEADER_COPY_SIZE as usize;
/// Where the metadata JSON starts in a copy, and the binary fields the body may set
/// (docs/format.md §2).
const METADATA_AT: usize = 4096;
const BINARY_PREFIX: usize = 128;
const OFF_COPY_INDEX: usize = 12;
const OFF_COPY_OFFSET: usize = 24;
const OFF_META_LEN: usize = 56;

/// Flags of the header input's first byte.
const SET_META_LEN: u8 = 1;
const SEAL: u8 = 2;
const MIRROR: u8 = 4;
const TRUNCATE: u8 = 8;

/// Two header copies: `data[0]` flags (set the metadata length, seal with the right
/// checksum, mirror the primary into the secondary, truncate the file), then the
/// primary's first 128 binary bytes and its metadata JSON.
///
/// An accepted header must round-trip through the encoder, must never verify under a
/// key it was not made with, and verifies under the seeds' key only if every field the
/// MAC covers is that of a seed (a header altered by whoever wrote the file never
/// yields a key).
pub fn volume_header(data: &[u8]) -> bool {
    let bytes = header_file(data);
    let Ok((header, health)) = resolve_header_bytes(&bytes) else {
        return false;
    };
    assert!(
        health.primary == CopyStatus::Ok || health.secondary == CopyStatus::Ok,
        "a header was chosen from no current copy: {health:?}"
    );
    check_key(&header);
    check_round_trip(&header);
    true
}

fn header_file(data: &[u8]) -> Vec<u8> {
    let mut input = Input(data);
    let flags = input.byte();
    let body = input.rest();
    let (binary, meta) = body.split_at(body.len().min(BINARY_PREFIX));
    let meta = &meta[..meta.len().min(COPY - METADATA_AT)];
    let mut file = vec![0u8; 2 * COPY];
    file[..binary.len()].copy_from_slice(binary);
    file[METADATA_AT..METADATA_AT + meta.len()].copy_from_slice(meta);
    if flags & SET_META_LEN != 0 {
        let len = u32::try_from(meta.len()).unwrap_or(u32::MAX);
        file[OFF_META_LEN..OFF_META_LEN + 4].copy_from_slice(&len.to_le_bytes());
    }
    if flags & SEAL != 0 {
        seal_header_copy(&mut file[..COPY]);
    }
    if flags & MIRROR != 0 {
        let (primary, secondary) = file.split_at_mut(COPY);
        secondary.copy_from_slice(primary);
        secondary[..8].copy_from_slice(b"LOVTPYRC");
        secondary[OFF_COPY_INDEX] = 1;
        secondary[OFF_COPY_OFFSET..OFF_COPY_OFFSET + 8]
            .copy_from_slice(&HEADER_COPY_SIZE.to_le_bytes());
        if flags & SEAL != 0 {
            seal_header_copy(secondary);
        }
    }
    if flags & TRUNCATE != 0 {
        file.truncate(COPY + meta.len() % COPY);
    }
    file
}

/// The key check: no other key verifies; the seeds' key only for a seed's fields.
fn check_key(header: &Header) {
    let path = Path::new("fuzz-input");
    let other = other_dek();
    assert!(
        header.verify_with_dek(&other, path).is_err(),
        "a header verified under a key it was not made with"
    );
    if header.verify_with_dek(&seed_dek(), path).is_ok() {
        let covered = header_mac_input(header).expect("the MAC input of a verified header");
        let known = seed_headers().iter().any(|s| {
            header_mac_input(s).is_ok_and(|m| m == covered) && s.key_check == header.key_check
        });
        assert!(
            known,
            "a header whose covered fields differ from every seed verified under the seeds' key"
        );
    }
}

/// Encoding an accepted header and reading it back gives the same header, with both
/// copies current.
fn check_round_trip(header: &Header) {
    let mut file = Vec::with_capacity(2 * COPY);
    for index in 0..2 {
        match encode_header_copy(header, index) {
            Ok(copy) => file.extend_from_slice(&copy),
            Err(e) => panic!("an accepted header cannot be encoded: {e}"),
        }
    }
    match resolve_header_bytes(&file) {
        Ok((again, health)) => {
            assert_eq!(
                format!("{again:?}"),
                format!("{header:?}"),
                "the header changed in a round trip"
            );
            assert!(
                health.is_healthy(),
                "re-encoded copies are not both current: {health:?}"
            );
        }
        Err(e) => panic!("a re-encoded header is refused: {e}"),
    }
}

/// The allocation map of a volume: `data[0]` flags (bit 0: seal every page with its
/// checksum), `data[1]` the page count (1 to 4), `data[2..10]` the volume size, then
/// the first 128 bytes of each page of copy 0 and then copy 1 (the rest of a page is
/// zero). Loaded as `cryptvol info` and `Volume::open` load it; every page that decodes
/// must encode back to the same bytes.
pub fn alloc_map(data: &[u8]) -> bool {
    const PAGE_PREFIX: usize = 128;
    let mut input = Input(data);
    let seal = input.byte() & 1 != 0;
    let pages = u64::from(input.byte() % 4) + 1;
    let size = input.u64() % (pages * crate::volume::CHUNKS_PER_PAGE * 65536 + 1);
    let uuid = uuid::Uuid::from_bytes([7; 16]);
    let copy_bytes = pages * MAP_PAGE_SIZE as u64;
    let layout = MapLayout {
        chunk_size: crate::volume::DEFAULT_CHUNK_SIZE,
        pages,
        copy_offsets: [0, copy_bytes],
    };
    let mut file = vec![0u8; 2 * copy_bytes as usize];
    let mut decoded = 0;
    for (i, page) in file.chunks_exact_mut(MAP_PAGE_SIZE).enumerate() {
        let prefix = match input.take(PAGE_PREFIX) {
            Some(p) => p,
            None => input.rest(),
        };
        page[..prefix.len()].copy_from_slice(prefix);
        let page: &mut [u8; MAP_PAGE_SIZE] = page.try_into().expect("a whole page");
        if seal {
            seal_map_page(page);
        }
        let (copy, index) = (i / pages as usize, i as u64 % pages);
        if let Ok((seq, words)) = decode_map_page(page, &uuid, index, copy) {
            let encoded = encode_map_page(&uuid, index, copy, seq, &words);
            assert!(
                encoded[..] == page[..],
                "map page {index} of copy {copy} does not round-trip"
            );
            decoded += 1;
        }
    }
    let file = memory_file(&file).expect("an in-memory file");
    let Ok(summary) = summarize_map(&file, &layout, &uuid, size) else {
        return false;
    };
    assert!(summary.allocated_chunks <= summary.chunks, "{summary:?}");
    assert!(summary.health.pages_damaged.len() as u64 <= pages);
    assert!(summary.health.pages_one_copy_bad <= pages);
    decoded > 0
}

/// The changed-block sidecar: `data[0]` flags (bit 0: append the right SHA-256),
/// `data[1]` the word count the volume expects (0 to 15), then the sidecar's bytes. An
/// accepted sidecar must encode back to the same bytes.
pub fn cbt_sidecar(data: &[u8]) -> bool {
    let mut input = Input(data);
    let seal = input.byte() & 1 != 0;
    let nwords = usize::from(input.byte() % 16);
    let mut bytes = input.rest().to_vec();
    if seal {
        let sum = Sha256::digest(&bytes);
        bytes.extend_from_slice(&sum);
    }
    let uuid = uuid::Uuid::from_bytes([7; 16]);
    let Some((base, words)) = decode_cbt(&bytes, &uuid, nwords) else {
        return false;
    };
    assert_eq!(words.len(), nwords);
    match encode_cbt(&uuid, false, Some(&base), &words) {
        Ok(encoded) => assert!(
            encoded == bytes,
            "an accepted sidecar does not encode back to itself"
        ),
        Err(e) => panic!("an accepted sidecar cannot be encoded: {e}"),
    }
    true
}
