//! The semantic checks every v1 header passes, on reading and on writing alike: the
//! geometry (through [`crate::volume::geometry`]), the cipher, the keyslots, and
//! each optional part together with the required feature that announces it.

use super::{alloc, Header, CIPHER, DEFAULT_DATA_OFFSET, FORMAT_VERSION, MAX_KEYSLOTS};
use super::{Reencryption, REENCRYPT_FEATURE};
use crate::crypto::SectorSize;
use crate::volume::geometry;

impl Header {
    /// Semantic checks every v1 header must pass (reading and writing alike).
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.format_version != FORMAT_VERSION {
            return Err(format!(
                "format version {} (expected {FORMAT_VERSION})",
                self.format_version
            ));
        }
        let sector = self.validate_geometry()?;
        if self.cipher != CIPHER {
            return Err(format!(
                "cipher {:?} (format v1 knows only {CIPHER:?})",
                self.cipher
            ));
        }
        if self.keyslots.is_empty() || self.keyslots.len() > MAX_KEYSLOTS {
            return Err(format!(
                "{} keyslots (must be 1 to {MAX_KEYSLOTS})",
                self.keyslots.len()
            ));
        }
        if self.keyslots.iter().any(|k| k.backend.is_empty()) {
            return Err("a keyslot has an empty backend name".into());
        }
        self.validate_allocation_map()?;
        self.validate_reencrypt_feature(sector)
    }

    /// Sector size, IV unit, size and data offset; the sector size, once checked.
    fn validate_geometry(&self) -> Result<SectorSize, String> {
        let sector = SectorSize::try_from(self.sector_size)
            .map_err(|_| format!("sector size {} (must be 512 or 4096)", self.sector_size))?;
        if self.iv_unit != self.sector_size {
            return Err(format!(
                "IV unit {} differs from the sector size {} (format v1 requires them equal)",
                self.iv_unit, self.sector_size
            ));
        }
        if !geometry::is_whole_sectors(self.size, sector) {
            return Err(format!(
                "volume size {} is not a positive multiple of the sector size {}",
                self.size, self.sector_size
            ));
        }
        if !geometry::is_valid_data_offset(self.data_offset) {
            return Err(format!(
                "data offset {} (must be a multiple of 4096 and at least {DEFAULT_DATA_OFFSET})",
                self.data_offset
            ));
        }
        if geometry::data_end(self.data_offset, self.size).is_none() {
            return Err("data offset + size exceeds the largest possible file".into());
        }
        Ok(sector)
    }

    fn requires(&self, feature: &str) -> bool {
        self.required_features.iter().any(|f| f == feature)
    }

    fn validate_allocation_map(&self) -> Result<(), String> {
        match &self.allocation_map {
            Some(map) if self.requires(alloc::FEATURE) => {
                map.validate(self.size, self.sector_size, self.data_offset)
            }
            None if !self.requires(alloc::FEATURE) => Ok(()),
            _ => Err(format!(
                "the allocation map and the required feature {:?} must come together",
                alloc::FEATURE
            )),
        }
    }

    fn validate_reencrypt_feature(&self, sector: SectorSize) -> Result<(), String> {
        let state: Option<&Reencryption> = self.reencrypt.as_ref();
        match state {
            Some(r) if self.requires(REENCRYPT_FEATURE) => self.validate_reencrypt(r, sector),
            None if !self.requires(REENCRYPT_FEATURE) => Ok(()),
            _ => Err(format!(
                "the re-encryption state and the required feature {REENCRYPT_FEATURE:?} must come together"
            )),
        }
    }
}
