//! What a file that is not a cryptvol volume holds, from the signatures ("magic") of
//! common disk image formats, partition tables and filesystems. Pure functions over the
//! first bytes of the file.

/// Bytes of the start of a file [`detect`] looks at (the btrfs superblock lies at 64 KiB).
pub const PROBE_LEN: usize = 128 * 1024;

/// The content of a file that is not a cryptvol volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataKind {
    /// Zero bytes long.
    Empty,
    /// Only zero bytes (or holes).
    Zeros,
    Qcow2 {
        version: u32,
    },
    Vmdk,
    Vhdx,
    Vhd,
    Vdi,
    Luks {
        version: u16,
    },
    Gpt,
    Mbr,
    /// ext2, ext3 or ext4 (the number).
    Ext(u8),
    Xfs,
    Btrfs,
    Fat,
    Ntfs,
    Swap,
    Iso9660,
    /// No known signature, not all zeros.
    Unrecognised,
}

impl DataKind {
    /// Short stable name, as in the JSON `content` field.
    pub fn name(&self) -> String {
        match self {
            DataKind::Empty => "empty".into(),
            DataKind::Zeros => "zeros".into(),
            DataKind::Qcow2 { .. } => "qcow2".into(),
            DataKind::Vmdk => "vmdk".into(),
            DataKind::Vhdx => "vhdx".into(),
            DataKind::Vhd => "vhd".into(),
            DataKind::Vdi => "vdi".into(),
            DataKind::Luks { .. } => "luks".into(),
            DataKind::Gpt => "gpt".into(),
            DataKind::Mbr => "mbr".into(),
            DataKind::Ext(n) => format!("ext{n}"),
            DataKind::Xfs => "xfs".into(),
            DataKind::Btrfs => "btrfs".into(),
            DataKind::Fat => "fat".into(),
            DataKind::Ntfs => "ntfs".into(),
            DataKind::Swap => "swap".into(),
            DataKind::Iso9660 => "iso9660".into(),
            DataKind::Unrecognised => "unrecognised".into(),
        }
    }

    /// What a person reads.
    pub fn describe(&self) -> String {
        match self {
            DataKind::Empty => "an empty file".into(),
            DataKind::Zeros => "all zeros (an unwritten raw image or sparse file)".into(),
            DataKind::Qcow2 { version } => {
                format!("an unencrypted qcow2 disk image (version {version})")
            }
            DataKind::Vmdk => "an unencrypted VMDK disk image".into(),
            DataKind::Vhdx => "an unencrypted VHDX disk image".into(),
            DataKind::Vhd => "an unencrypted VHD disk image".into(),
            DataKind::Vdi => "an unencrypted VirtualBox VDI disk image".into(),
            DataKind::Luks { version } => format!(
                "a LUKS{version} volume (encrypted, but not managed by cryptvol: no \
                 cryptvol key states, policies or audit)"
            ),
            DataKind::Gpt => "an unencrypted raw disk image with a GPT partition table".into(),
            DataKind::Mbr => "an unencrypted raw disk image with an MBR partition table".into(),
            DataKind::Ext(n) => format!("an unencrypted raw image with an ext{n} filesystem"),
            DataKind::Xfs => "an unencrypted raw image with an XFS filesystem".into(),
            DataKind::Btrfs => "an unencrypted raw image with a btrfs filesystem".into(),
            DataKind::Fat => "an unencrypted raw image with a FAT filesystem".into(),
            DataKind::Ntfs => "an unencrypted raw image with an NTFS filesystem".into(),
            DataKind::Swap => "an unencrypted Linux swap area".into(),
            DataKind::Iso9660 => "an ISO 9660 (CD/DVD) image".into(),
            DataKind::Unrecognised => "unrecognised data".into(),
        }
    }
}

fn at(buf: &[u8], offset: usize, magic: &[u8]) -> bool {
    buf.get(offset..offset + magic.len()) == Some(magic)
}

fn le_u32(buf: &[u8], offset: usize) -> Option<u32> {
    let b = buf.get(offset..offset + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn be_u32(buf: &[u8], offset: usize) -> Option<u32> {
    let b = buf.get(offset..offset + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The kind named by a signature in `buf` (the first bytes of the file, up to
/// [`PROBE_LEN`]), or `None` when no signature matches (the caller then tells zeros
/// from unrecognised data).
pub fn detect(buf: &[u8]) -> Option<DataKind> {
    // Image containers first: their own header is at offset 0.
    if at(buf, 0, b"QFI\xfb") {
        let version = be_u32(buf, 4).unwrap_or(0);
        return Some(DataKind::Qcow2 { version });
    }
    if at(buf, 0, b"vhdxfile") {
        return Some(DataKind::Vhdx);
    }
    if at(buf, 0, b"KDMV") || at(buf, 0, b"COWD") || at(buf, 0, b"# Disk DescriptorFile") {
        return Some(DataKind::Vmdk);
    }
    if le_u32(buf, 0x40) == Some(0xbeda_107f) || at(buf, 0, b"<<< Oracle VM VirtualBox") {
        return Some(DataKind::Vdi);
    }
    if at(buf, 0, b"conectix") {
        return Some(DataKind::Vhd);
    }
    if at(buf, 0, b"LUKS\xba\xbe") {
        let version = buf
            .get(6..8)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .unwrap_or(0);
        return Some(DataKind::Luks { version });
    }
    // Partition tables: GPT (after a protective MBR) at LBA 1, for 512- or 4096-byte
    // logical blocks.
    if at(buf, 512, b"EFI PART") || at(buf, 4096, b"EFI PART") {
        return Some(DataKind::Gpt);
    }
    // Filesystems directly on the image.
    if at(buf, 0, b"XFSB") {
        return Some(DataKind::Xfs);
    }
    if at(buf, 0x10040, b"_BHRfS_M") {
        return Some(DataKind::Btrfs);
    }
    if at(buf, 1024 + 0x38, &[0x53, 0xef]) {
        return Some(DataKind::Ext(ext_generation(buf)));
    }
    if at(buf, 3, b"NTFS    ") {
        return Some(DataKind::Ntfs);
    }
    if at(buf, 0x36, b"FAT1") || at(buf, 0x52, b"FAT32   ") {
        return Some(DataKind::Fat);
    }
    if at(buf, 4096 - 10, b"SWAPSPACE2") || at(buf, 4096 - 10, b"SWAP-SPACE") {
        return Some(DataKind::Swap);
    }
    if at(buf, 0x8001, b"CD001") {
        return Some(DataKind::Iso9660);
    }
    if is_mbr(buf) {
        return Some(DataKind::Mbr);
    }
    None
}

/// ext2/3/4 from the superblock feature flags: a journal makes ext3; extents, 64bit,
/// flex_bg or huge files make ext4.
fn ext_generation(buf: &[u8]) -> u8 {
    const SB: usize = 1024;
    let compat = le_u32(buf, SB + 0x5c).unwrap_or(0);
    let incompat = le_u32(buf, SB + 0x60).unwrap_or(0);
    let ro_compat = le_u32(buf, SB + 0x64).unwrap_or(0);
    const INCOMPAT_EXTENTS: u32 = 0x40;
    const INCOMPAT_64BIT: u32 = 0x80;
    const INCOMPAT_FLEX_BG: u32 = 0x200;
    const RO_COMPAT_HUGE_FILE: u32 = 0x8;
    const COMPAT_HAS_JOURNAL: u32 = 0x4;
    if incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG) != 0
        || ro_compat & RO_COMPAT_HUGE_FILE != 0
    {
        4
    } else if compat & COMPAT_HAS_JOURNAL != 0 {
        3
    } else {
        2
    }
}

/// The boot signature 55 AA and four plausible partition entries (boot flag 0x00 or
/// 0x80, at least one non-empty type).
fn is_mbr(buf: &[u8]) -> bool {
    if !at(buf, 510, &[0x55, 0xaa]) {
        return false;
    }
    let mut used = 0;
    for i in 0..4 {
        let e = 446 + 16 * i;
        let (Some(&flag), Some(&kind)) = (buf.get(e), buf.get(e + 4)) else {
            return false;
        };
        if flag != 0 && flag != 0x80 {
            return false;
        }
        if kind != 0 {
            used += 1;
        }
    }
    used > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(len: usize, parts: &[(usize, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; len];
        for (off, bytes) in parts {
            b[*off..*off + bytes.len()].copy_from_slice(bytes);
        }
        b
    }

    #[test]
    fn image_formats() {
        let q = with(512, &[(0, b"QFI\xfb\0\0\0\x03")]);
        assert_eq!(detect(&q), Some(DataKind::Qcow2 { version: 3 }));
        assert_eq!(
            detect(&with(512, &[(0, b"vhdxfile")])),
            Some(DataKind::Vhdx)
        );
        assert_eq!(detect(&with(512, &[(0, b"KDMV")])), Some(DataKind::Vmdk));
        assert_eq!(
            detect(&with(512, &[(0, b"# Disk DescriptorFile\n")])),
            Some(DataKind::Vmdk)
        );
        assert_eq!(
            detect(&with(512, &[(0x40, &[0x7f, 0x10, 0xda, 0xbe])])),
            Some(DataKind::Vdi)
        );
        assert_eq!(detect(&with(512, &[(0, b"conectix")])), Some(DataKind::Vhd));
        assert_eq!(
            detect(&with(512, &[(0, b"LUKS\xba\xbe\0\x02")])),
            Some(DataKind::Luks { version: 2 })
        );
    }

    #[test]
    fn partition_tables() {
        let gpt = with(
            1024,
            &[(510, &[0x55, 0xaa]), (450, &[0xee]), (512, b"EFI PART")],
        );
        assert_eq!(detect(&gpt), Some(DataKind::Gpt));
        let gpt4k = with(8192, &[(4096, b"EFI PART")]);
        assert_eq!(detect(&gpt4k), Some(DataKind::Gpt));
        let mbr = with(512, &[(510, &[0x55, 0xaa]), (446, &[0x80]), (450, &[0x83])]);
        assert_eq!(detect(&mbr), Some(DataKind::Mbr));
        // A boot signature with garbage entries is not an MBR.
        let junk = with(512, &[(510, &[0x55, 0xaa]), (446, &[0x13]), (450, &[0x83])]);
        assert_eq!(detect(&junk), None);
        // Nor one without any partition.
        assert_eq!(detect(&with(512, &[(510, &[0x55, 0xaa])])), None);
    }

    #[test]
    fn filesystems() {
        assert_eq!(detect(&with(512, &[(0, b"XFSB")])), Some(DataKind::Xfs));
        assert_eq!(
            detect(&with(PROBE_LEN, &[(0x10040, b"_BHRfS_M")])),
            Some(DataKind::Btrfs)
        );
        let ext = |compat: u32, incompat: u32| {
            with(
                4096,
                &[
                    (1080, &[0x53, 0xef]),
                    (1024 + 0x5c, &compat.to_le_bytes()),
                    (1024 + 0x60, &incompat.to_le_bytes()),
                ],
            )
        };
        assert_eq!(detect(&ext(0, 0)), Some(DataKind::Ext(2)));
        assert_eq!(detect(&ext(4, 0)), Some(DataKind::Ext(3)));
        assert_eq!(detect(&ext(4, 0x2c2)), Some(DataKind::Ext(4)));
        assert_eq!(
            detect(&with(512, &[(3, b"NTFS    ")])),
            Some(DataKind::Ntfs)
        );
        assert_eq!(
            detect(&with(512, &[(0x52, b"FAT32   "), (510, &[0x55, 0xaa])])),
            Some(DataKind::Fat)
        );
        assert_eq!(
            detect(&with(4096, &[(4086, b"SWAPSPACE2")])),
            Some(DataKind::Swap)
        );
        assert_eq!(
            detect(&with(0x9000, &[(0x8001, b"CD001")])),
            Some(DataKind::Iso9660)
        );
    }

    #[test]
    fn nothing_known() {
        assert_eq!(detect(&[]), None);
        assert_eq!(detect(&[0u8; 4096]), None);
        assert_eq!(detect(b"hello world"), None);
        // Short buffers never index out of bounds.
        for n in 0..1100 {
            let b = vec![0x55u8; n];
            let _ = detect(&b);
        }
    }

    #[test]
    fn names_and_descriptions() {
        assert_eq!(DataKind::Ext(4).name(), "ext4");
        assert_eq!(DataKind::Qcow2 { version: 2 }.name(), "qcow2");
        assert!(DataKind::Gpt.describe().contains("GPT"));
        assert!(DataKind::Luks { version: 1 }.describe().contains("LUKS1"));
        assert_eq!(DataKind::Unrecognised.describe(), "unrecognised data");
    }
}
