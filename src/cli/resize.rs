//! `cryptvol resize`: grow a volume file that is not served (offline, in this process).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::args::{key_options, KeystoreArgs, UnlockArgs};
use crate::keys::Argon2Params;
use crate::ops::{self, NewSize, ResizeOptions};
use crate::size::format_size;

const RESIZE_AFTER_HELP: &str = "\
Grows the volume's data area; the new space reads as zeros. The file is extended
(sparse), the allocation map moved when it needs more room, and the header that records
the new size written last, so a crash at any point leaves the old or the new size.
Shrinking is refused (data beyond the new end would be lost): make a new volume and copy.
The new space is thin (unallocated) unless --preallocate fills it, as `create
--preallocate` does; an interrupted preallocation leaves the new size, partly thin.
The change is recorded in the key audit log (operation `resize`).

After growing, grow the filesystem inside (e.g. resize2fs) once it is attached.

Examples:
  cryptvol resize /var/lib/cryptvol/vol1.img --size 20G
  cryptvol resize /var/lib/cryptvol/vol1.img --size +10G
  cryptvol resize /var/lib/cryptvol/thick.img --size 200G --preallocate";

/// `cryptvol resize FILE --size SIZE`.
#[derive(Args)]
#[command(after_help = RESIZE_AFTER_HELP)]
pub(super) struct ResizeArgs {
    /// The volume file (not served).
    file: PathBuf,
    /// The new size (e.g. 20G; units as in `create --size`), or `+SIZE` to add that much.
    #[arg(long, value_name = "SIZE")]
    size: String,
    /// Then fill all unallocated space with encrypted zeros (for a volume made with
    /// `create --preallocate`: its new space is then allocated too).
    #[arg(long)]
    preallocate: bool,
    #[command(flatten)]
    unlock: UnlockArgs,
    #[command(flatten)]
    keystore: KeystoreArgs,
}

/// `cryptvol resize FILE --size SIZE`.
pub(super) async fn resize(a: ResizeArgs) -> Result<()> {
    let size = NewSize::parse(&a.size).with_context(|| format!("invalid --size {:?}", a.size))?;
    let mut keys = key_options(&a.keystore, None, Argon2Params::default());
    keys.passphrase = a.unlock.source();
    let opts = ResizeOptions {
        size,
        preallocate: a.preallocate,
        progress: true,
    };
    let g = ops::resize(&a.file, &keys, opts)
        .await
        .with_context(|| format!("cannot resize {}", a.file.display()))?;
    println!(
        "{}: grown from {} to {} ({} bytes){}",
        a.file.display(),
        format_size(g.old_size),
        format_size(g.new_size),
        g.new_size,
        if g.map_relocated {
            "; the allocation map was moved to a larger place"
        } else {
            ""
        }
    );
    Ok(())
}
