//! The key check value and the header MAC (docs/format.md §4–§5): both are
//! HMAC-SHA256 under a key derived from the DEK by HKDF, the KCV over the UUID and
//! the MAC over the canonical encoding ([`CanonicalWriter`] with [`MAC_V1`]) of every
//! field the header covers.

use std::path::Path;

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::slots::encode_slots;
use super::{alloc, Header, VolumeError, REENCRYPT_FEATURE};
use crate::crypto::canonical::{CanonicalWriter, MAC_V1};
use crate::crypto::{CryptoError, Dek, DEK_LEN};

pub(super) const KCV_INFO: &[u8] = b"cryptvol kcv";
pub(super) const MAC_INFO: &[u8] = b"cryptvol header mac";
const MAC_DOMAIN: &[u8] = b"cryptvol header mac v1\0";

impl Header {
    /// Checks the key check value, then the header MAC, with an unwrapped DEK.
    pub fn verify_with_dek(&self, dek: &Dek, path: &Path) -> Result<(), VolumeError> {
        let p = || path.display().to_string();
        let kcv = keyed_mac(dek, KCV_INFO)?.chain_update(self.uuid.as_bytes());
        if kcv.verify_slice(&self.key_check).is_err() {
            return Err(VolumeError::KeyCheckFailed { path: p() });
        }
        let mac = keyed_mac(dek, MAC_INFO)?.chain_update(self.mac_input()?);
        if mac.verify_slice(&self.header_mac).is_err() {
            return Err(VolumeError::HeaderMacMismatch { path: p() });
        }
        Ok(())
    }

    /// Checks the new DEK of a re-encryption in progress against its key check value.
    pub fn verify_next_dek(&self, dek: &Dek, path: &Path) -> Result<(), VolumeError> {
        let Some(r) = &self.reencrypt else {
            return Err(VolumeError::Reencrypt {
                path: path.display().to_string(),
                detail: "no re-encryption is in progress".into(),
            });
        };
        let kcv = keyed_mac(dek, KCV_INFO)?.chain_update(self.uuid.as_bytes());
        if kcv.verify_slice(&r.key_check).is_err() {
            return Err(VolumeError::KeyCheckFailed {
                path: path.display().to_string(),
            });
        }
        Ok(())
    }

    /// The canonical byte string the header MAC covers (see docs/format.md §5).
    /// Fails only if a field is too long for its length prefix.
    pub(super) fn mac_input(&self) -> Result<Vec<u8>, VolumeError> {
        let mut w = CanonicalWriter::with_capacity(MAC_V1, 512);
        w.bytes(MAC_DOMAIN)
            .u32(self.format_version)
            .raw(self.uuid.as_bytes())
            .u64(self.size)
            .u32(self.sector_size)
            .u64(self.data_offset)
            .str(&self.cipher)
            .u32(DEK_LEN as u32)
            .u32(self.iv_unit)
            .list(&self.required_features)
            .list(&self.compatible_features);
        encode_slots(&mut w, &self.keyslots);
        if let Some(map) = &self.allocation_map {
            w.str(alloc::FEATURE)
                .u32(map.chunk_size)
                .u32(alloc::PAGE_SIZE as u32)
                .u64(map.pages)
                .u64(map.copy_offsets[0])
                .u64(map.copy_offsets[1]);
        }
        if let Some(r) = &self.reencrypt {
            w.str(REENCRYPT_FEATURE).u64(r.watermark).raw(&r.key_check);
            encode_slots(&mut w, &r.keyslots);
            match &r.hotzone {
                None => w.flag(false),
                Some(z) => w
                    .flag(true)
                    .u64(z.offset)
                    .u64(z.len)
                    .bytes(&z.hashes.concat()),
            };
        }
        Ok(w.finish()?)
    }
}

/// HMAC-SHA256 keyed with HKDF-SHA256(ikm = DEK, salt = none, info) → 32 bytes.
fn keyed_mac(dek: &Dek, info: &[u8]) -> Result<Hmac<Sha256>, VolumeError> {
    let mut key = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(None, dek.expose())
        .expand(info, &mut key[..])
        .map_err(|_| CryptoError::BadKeyLength(key.len()))?;
    let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key[..])
        .map_err(|_| CryptoError::BadKeyLength(key.len()))?;
    Ok(mac)
}

pub(super) fn tag32(mac: Hmac<Sha256>) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&mac.finalize().into_bytes());
    out
}

pub(crate) fn compute_kcv(dek: &Dek, uuid: &uuid::Uuid) -> Result<[u8; 32], VolumeError> {
    Ok(tag32(
        keyed_mac(dek, KCV_INFO)?.chain_update(uuid.as_bytes()),
    ))
}

pub(super) fn compute_mac(dek: &Dek, header: &Header) -> Result<[u8; 32], VolumeError> {
    Ok(tag32(
        keyed_mac(dek, MAC_INFO)?.chain_update(header.mac_input()?),
    ))
}
