//! The header's decoder and encoder over bytes in memory, for the fuzz targets
//! (`crate::fuzzing`): `read_header` without a file, a copy's checksum, the MAC.

use std::path::Path;

use super::copy::{copy_checksum, encode_copy, COPY_LEN, OFF_CSUM};
use super::mac::compute_mac;
use super::recovery::decode_copies;
use super::{Header, HeaderHealth, VolumeError, HEADER_AREA_SIZE};
use crate::crypto::Dek;

/// What [`super::read_header`] answers for a file whose whole content is `bytes`.
pub(crate) fn resolve_header_bytes(bytes: &[u8]) -> Result<(Header, HeaderHealth), VolumeError> {
    let area = &bytes[..bytes.len().min(HEADER_AREA_SIZE as usize)];
    decode_copies(area, bytes.len() as u64).resolve(Path::new("fuzz-input"))
}

/// One encoded copy (`index` 0 = primary, 1 = secondary) of `h`, with a fresh salt.
pub(crate) fn encode_header_copy(h: &Header, index: usize) -> Result<Vec<u8>, String> {
    encode_copy(h, index)
}

/// Writes the checksum a copy of at least one copy's length must carry.
pub(crate) fn seal_header_copy(copy: &mut [u8]) {
    if copy.len() >= COPY_LEN {
        let sum = copy_checksum(&copy[..COPY_LEN]);
        copy[OFF_CSUM..OFF_CSUM + 32].copy_from_slice(&sum);
    }
}

/// The header MAC `h` must carry under `dek`.
pub(crate) fn header_mac(dek: &Dek, h: &Header) -> Result<[u8; 32], VolumeError> {
    compute_mac(dek, h)
}

/// The canonical bytes the header MAC covers.
pub(crate) fn header_mac_input(h: &Header) -> Result<Vec<u8>, VolumeError> {
    h.mac_input()
}
