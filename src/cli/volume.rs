//! Volume files: `create` (also from a snapshot: restore) and `info`.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::args::{
    new_volume_key, optional_new_key, parse_sector_size, parse_size_arg, StoreArg, WrappingArgs,
};
use super::print::{first_slot_label, keyslot_line, percent, print_json};
use super::signals::interruptible;
use super::snapshots::snapshot_id;
use crate::ops;
use crate::size::format_size;
use crate::volume::{VolumeError, VolumeSpec, DEFAULT_SECTOR_SIZE};

/// `cryptvol create`.
#[derive(Args)]
pub(super) struct CreateArgs {
    /// Volume size, e.g. 512M, 10G, 1T (binary units); a multiple of the sector size. A
    /// number without a unit is in bytes (not GiB as in `aws ec2 create-volume --size`).
    #[arg(long, value_name = "SIZE", value_parser = parse_volume_size, required_unless_present = "from_snapshot", conflicts_with = "from_snapshot")]
    size: Option<VolumeSize>,
    /// Accepted for the EBS habit (`aws ec2 create-volume --encrypted`) and changes
    /// nothing: every cryptvol volume is encrypted.
    #[arg(long)]
    encrypted: bool,
    /// Restore the volume from this snapshot (size and sector size come from it). The
    /// volume gets its own new data key, wrapped by --key (default: the snapshot's own
    /// master key), and every chunk is re-encrypted under it.
    #[arg(long, value_name = "SNAPSHOT-ID")]
    from_snapshot: Option<String>,
    /// The snapshot store of --from-snapshot [default: the config file's snapshot_store,
    /// else the default store, as for `cryptvol snapshot`].
    #[arg(long, value_name = "STORE", env = "CRYPTVOL_SNAPSHOT_STORE")]
    store: Option<String>,
    /// Master key to wrap the data key: a local key id (mk-…) or alias/NAME, exec:NAME[:KEY],
    /// or an AWS KMS key (arn:aws:kms:…, aws-kms:ID, aws-kms:alias/NAME) [default: the key set
    /// with `cryptvol key set-default`, else the local default key, created on first use].
    #[arg(
        long,
        visible_alias = "kms-key-id",
        value_name = "KEY",
        conflicts_with = "pass"
    )]
    key: Option<String>,
    /// Sector size: the XTS data unit and the smallest block clients should use.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_SECTOR_SIZE, value_parser = parse_sector_size)]
    sector_size: u32,
    /// Write ciphertext over the whole data area now and mark it all allocated, so the
    /// file never reveals which blocks were written (uses the full size on disk, takes a
    /// full write; block status then reports no holes). Default: thin, never-written
    /// blocks read as zeros and take no space.
    #[arg(long)]
    preallocate: bool,
    /// Make a volume without an allocation map, in the original format that cryptvol
    /// before thin volumes can open (never-written blocks then read as random bytes, not
    /// zeros, and block status reports no holes). For compatibility and benchmarking.
    #[arg(long, hide_short_help = true)]
    no_allocation_map: bool,
    /// Print the new volume's header as JSON (as `cryptvol info --json` does).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    keys: WrappingArgs,
    /// The volume file to create (refuses to overwrite an existing file).
    file: PathBuf,
}

/// `--size` as given: its bytes, and whether it had a unit.
#[derive(Debug, Clone, Copy)]
pub(super) struct VolumeSize {
    bytes: u64,
    unitless: bool,
}

/// clap value parser for `create --size`.
fn parse_volume_size(s: &str) -> Result<VolumeSize, String> {
    Ok(VolumeSize {
        bytes: parse_size_arg(s)?,
        unitless: s.trim().bytes().all(|b| b.is_ascii_digit()),
    })
}

impl VolumeSize {
    /// A bare number refused as no whole number of sectors was most likely meant in GiB
    /// (`aws ec2 create-volume --size 100`): the refusal gets the spelling that works.
    fn explain(self, e: ops::OpsError) -> anyhow::Error {
        if self.unitless && matches!(e, ops::OpsError::Volume(VolumeError::BadSize { .. })) {
            return anyhow::anyhow!(
                "{e}: a size without a unit is in bytes; for {n} GiB (as `aws ec2 \
                 create-volume --size {n}` means) write --size {n}G",
                n = self.bytes
            );
        }
        e.into()
    }
}

/// `cryptvol info`.
#[derive(Args)]
pub(super) struct InfoArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// The volume file.
    file: PathBuf,
}

/// `cryptvol create`: a new volume, or one restored from a snapshot.
pub(super) async fn create(a: CreateArgs) -> Result<()> {
    if a.from_snapshot.is_some() {
        return restore(a).await;
    }
    if a.encrypted {
        tracing::debug!("--encrypted: every volume is encrypted (accepted for EBS habits)");
    }
    let size = a.size.context("--size is required")?;
    let keys = a.keys.options();
    let new_key = new_volume_key(a.key.as_deref(), &keys)?;
    let spec = VolumeSpec {
        size: size.bytes,
        sector_size: a.sector_size,
    };
    let opts = ops::CreateOptions {
        preallocate: a.preallocate,
        progress: true,
        no_allocation_map: a.no_allocation_map,
    };
    let header = ops::create_volume_with(&a.file, &spec, new_key, &keys, &opts)
        .await
        .map_err(|e| size.explain(e))
        .with_context(|| format!("cannot create {}", a.file.display()))?;
    if a.json {
        return print_json(&ops::info(&a.file)?);
    }
    println!(
        "created {} ({}, {}-byte sectors, uuid {}), data key wrapped by {}",
        a.file.display(),
        format_size(header.size),
        header.sector_size,
        header.uuid,
        first_slot_label(&header.keyslots)
    );
    Ok(())
}

/// `cryptvol info`: the header, as text or JSON.
pub(super) fn info(a: InfoArgs) -> Result<()> {
    let i = ops::info(&a.file)?;
    if a.json {
        return print_json(&i);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "volume:       {}", i.path)?;
    writeln!(out, "format:       cryptvol v{}", i.format_version)?;
    writeln!(out, "uuid:         {}", i.uuid)?;
    writeln!(
        out,
        "size:         {} ({} bytes)",
        format_size(i.size),
        i.size
    )?;
    writeln!(out, "sector size:  {}", i.sector_size)?;
    writeln!(
        out,
        "cipher:       {} (512-bit key, IV = sector number from data start)",
        i.cipher
    )?;
    writeln!(out, "data offset:  {}", i.data_offset)?;
    writeln!(
        out,
        "header:       primary {}, secondary {} (sequence {})",
        i.header.primary, i.header.secondary, i.sequence
    )?;
    info_allocation(&mut out, &i)?;
    writeln!(out, "keyslots:")?;
    for k in &i.keyslots {
        writeln!(out, "  {}", keyslot_line(k))?;
    }
    if let Some(r) = &i.reencrypt {
        info_reencrypt(&mut out, r)?;
    }
    Ok(())
}

/// `cryptvol info`: how much of the volume is allocated.
fn info_allocation(out: &mut impl std::io::Write, i: &ops::VolumeInfo) -> Result<()> {
    match &i.allocation {
        Some(al) => {
            let pct = if i.size == 0 {
                0.0
            } else {
                al.allocated_bytes as f64 * 100.0 / i.size as f64
            };
            writeln!(
                out,
                "allocated:    {} ({} bytes, {pct:.1}%; {} of {} chunks of {} KiB)",
                format_size(al.allocated_bytes),
                al.allocated_bytes,
                al.allocated_chunks,
                al.chunks,
                al.chunk_size / 1024
            )?;
            writeln!(out, "alloc map:    {}", al.map)?;
        }
        None => writeln!(
            out,
            "allocated:    everything (volume made before allocation maps; not thin)"
        )?,
    }
    Ok(())
}

/// `cryptvol info`: the re-encryption in progress.
fn info_reencrypt(out: &mut impl std::io::Write, r: &ops::ReencryptionInfo) -> Result<()> {
    let pct = percent(r.watermark, r.size);
    writeln!(
        out,
        "re-encryption: in progress, {pct:.1}% under the new data key ({} of {}, watermark {} bytes)",
        format_size(r.watermark),
        format_size(r.size),
        r.watermark
    )?;
    if let Some(z) = &r.hotzone {
        writeln!(
            out,
            "  interrupted step: bytes {}..{} (finished when the volume is next opened for writing)",
            z.offset,
            z.offset.saturating_add(z.length)
        )?;
    }
    writeln!(
        out,
        "  new keyslots (replace the keyslots when it finishes):"
    )?;
    for k in &r.new_keyslots {
        writeln!(out, "    {}", keyslot_line(k))?;
    }
    writeln!(
        out,
        "  resume: `cryptvol reencrypt FILE` (offline) or serve the volume (resumes by itself)"
    )?;
    Ok(())
}

/// `cryptvol create --from-snapshot`: a new volume from a snapshot, re-encrypted under
/// a new data key.
async fn restore(a: CreateArgs) -> Result<()> {
    let id = snapshot_id(a.from_snapshot.as_deref().unwrap_or_default())?;
    let store = StoreArg {
        store: a.store.clone(),
    }
    .open(false)?;
    let keys = a.keys.options();
    let target = optional_new_key(a.key.as_deref(), &keys)?;
    let out = interruptible("restore", async {
        ops::restore_snapshot(&store, &id, &a.file, &keys, target)
            .await
            .with_context(|| format!("cannot restore {} from snapshot {id}", a.file.display()))
    })
    .await?;
    if a.json {
        return print_json(&ops::info(&a.file)?);
    }
    if out.header.sector_size != a.sector_size && a.sector_size != DEFAULT_SECTOR_SIZE {
        tracing::warn!(
            "--sector-size {} ignored: the volume has the snapshot's sector size {}",
            a.sector_size,
            out.header.sector_size
        );
    }
    println!(
        "created {} from snapshot {id} ({}, {}-byte sectors, uuid {}, {} of {} chunks with data), re-encrypted under a new data key, data key wrapped by {}",
        a.file.display(),
        format_size(out.header.size),
        out.header.sector_size,
        out.header.uuid,
        out.stats.data_chunks,
        out.stats.chunks,
        first_slot_label(&out.header.keyslots)
    );
    Ok(())
}
