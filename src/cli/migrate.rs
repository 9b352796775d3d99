//! Migrating in and out: `import` (an unencrypted disk into a new volume) and `export`
//! (a volume decrypted to plaintext).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

use super::args::{
    key_options, new_volume_key, parse_sector_size, KeystoreArgs, PassphraseArgs, WrappingArgs,
};
use super::print::print_json;
use super::signals::cancel_on_signal;
use crate::keys::Argon2Params;
use crate::ops;
use crate::size::format_size;

const IMPORT_AFTER_HELP: &str = "\
The volume is built as .FILE.partial next to FILE, with a journal .FILE.import; FILE appears
only once the copy is complete and its SHA-256 matches the source's. Zero regions (64 KiB
units, and holes of sparse files) stay unallocated. The volume's size is the source's,
rounded up to the sector size (the tail is zero padding).

An interrupted import (Ctrl-C, kill, crash) continues from its last checkpoint when the same
command is run again (at most 32 MiB is redone). A different source refuses to resume;
--restart discards the interrupted import and starts over.

Examples:
  cryptvol import disk.raw vol.img
  cryptvol import /dev/sdb vol.img --key alias/db
  qemu-nbd --read-only --persistent -k /tmp/q.sock disk.qcow2 &
  cryptvol import 'nbd+unix:///?socket=/tmp/q.sock' vol.img";

/// `cryptvol import`.
#[derive(Args)]
#[command(after_help = IMPORT_AFTER_HELP)]
pub(super) struct ImportArgs {
    /// The unencrypted source: a raw image file, a block device, or an NBD URI
    /// (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH).
    source: String,
    /// The volume file to create (never overwritten).
    file: PathBuf,
    /// Master key to wrap the data key (as for `cryptvol create`).
    #[arg(
        long,
        visible_alias = "kms-key-id",
        value_name = "KEY",
        conflicts_with = "pass"
    )]
    key: Option<String>,
    /// Sector size of the new volume [default: 4096, or the interrupted import's].
    #[arg(long, value_name = "BYTES", value_parser = parse_sector_size)]
    sector_size: Option<u32>,
    /// Only continue an interrupted import (fail if there is none).
    #[arg(long, conflicts_with = "restart")]
    resume: bool,
    /// Discard an interrupted import into FILE and start over.
    #[arg(long)]
    restart: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    keys: WrappingArgs,
}

/// `cryptvol export`.
#[derive(Args)]
pub(super) struct ExportArgs {
    /// The volume file (must not be open for writing elsewhere).
    file: PathBuf,
    /// Where the plaintext goes: a new raw file (sparse), an existing file or block device
    /// (with --force), or an NBD URI.
    dest: String,
    /// Overwrite an existing DEST file or block device.
    #[arg(long)]
    force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    keystore: KeystoreArgs,
    /// Unlock a passphrase keyslot with a passphrase from FILE / descriptor N / the terminal.
    #[command(flatten)]
    pass: PassphraseArgs,
}

/// `cryptvol import`: an encrypted volume from an unencrypted disk (resumable).
pub(super) async fn import(a: ImportArgs) -> Result<()> {
    use crate::migrate::{ImportRequest, ResumeMode};
    let keys = a.keys.options();
    let key = new_volume_key(a.key.as_deref(), &keys)?;
    let key_label = match (&keys.passphrase, &a.key) {
        (Some(_), _) => "passphrase".to_string(),
        (None, Some(k)) => format!("key:{k}"),
        (None, None) => "default".to_string(),
    };
    let req = ImportRequest {
        source: &a.source,
        target: &a.file,
        sector_size: a.sector_size,
        key_label,
        mode: if a.restart {
            ResumeMode::Restart
        } else if a.resume {
            ResumeMode::Require
        } else {
            ResumeMode::Auto
        },
    };
    let cancel = cancel_on_signal("import");
    let r = crate::migrate::import(&req, key, &keys, &cancel)
        .await
        .with_context(|| format!("cannot import {} into {}", a.source, a.file.display()))?;
    if a.json {
        return print_json(&r);
    }
    print_import(&r, &a.file);
    Ok(())
}

/// The text report of a finished import.
fn print_import(r: &crate::migrate::ImportReport, file: &Path) {
    let wrapped_by = ops::info(file)
        .ok()
        .and_then(|i| i.keyslots.into_iter().next())
        .map(|k| {
            if k.key_id.is_empty() {
                k.backend
            } else {
                format!("{} key {}", k.backend, k.key_id)
            }
        })
        .unwrap_or_else(|| "?".into());
    println!(
        "imported {} into {} ({}, {}-byte sectors, uuid {}), data key wrapped by {}",
        r.source.location,
        r.volume,
        format_size(r.volume_size),
        r.sector_size,
        r.uuid,
        wrapped_by
    );
    if r.padding > 0 {
        println!(
            "  note: the source's size ({} bytes) is not a multiple of the sector size: the volume is {} bytes, its last {} bytes are zero padding",
            r.source_size, r.volume_size, r.padding
        );
    }
    if let Some(from) = r.resumed_from {
        println!("  resumed an interrupted import at offset {from}");
    }
    println!(
        "  data written: {} bytes; zeros left unallocated: {} bytes",
        r.written, r.skipped_zero
    );
    println!("  source SHA-256: {}", r.source_sha256);
    println!("  volume SHA-256: {} (matches)", r.volume_sha256);
}

/// `cryptvol export`: a volume decrypted to a file, a device or an NBD export.
pub(super) async fn export(a: ExportArgs) -> Result<()> {
    use crate::migrate::ExportRequest;
    let keys = key_options(&a.keystore, Some(&a.pass), Argon2Params::default());
    let req = ExportRequest {
        volume: &a.file,
        dest: &a.dest,
        force: a.force,
    };
    crate::migrate::export::precheck(&req)
        .with_context(|| format!("cannot export {} to {}", a.file.display(), a.dest))?;
    eprintln!(
        "cryptvol: warning: {} will hold the decrypted PLAINTEXT of {}: anyone who can read it \
         can read the volume's data. Protect it, and destroy it when it is no longer needed.",
        a.dest,
        a.file.display()
    );
    let cancel = cancel_on_signal("export");
    let r = crate::migrate::export(&req, &keys, &cancel)
        .await
        .with_context(|| format!("cannot export {} to {}", a.file.display(), a.dest))?;
    if a.json {
        return print_json(&r);
    }
    println!(
        "exported {} to {} ({}, {} bytes; {} bytes of data, {} bytes of zeros{})",
        r.volume,
        r.dest,
        r.dest_kind,
        r.size,
        r.written,
        r.zero,
        if r.dest_kind == "file" {
            " left as holes"
        } else {
            ""
        }
    );
    println!("  plaintext SHA-256: {}", r.sha256);
    Ok(())
}
