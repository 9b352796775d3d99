//! `cryptvol resize`: grow a volume file that is not served (offline, in this process),
//! or an export of a running daemon through its control socket (online).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::args::{key_options, KeystoreArgs, UnlockArgs};
use super::control::control_call;
use crate::keys::Argon2Params;
use crate::ops::{self, NewSize, ResizeOptions};
use crate::server::control::{Request, ResizeReply, ResizeRequest, ResizeTo};
use crate::size::format_size;

const RESIZE_AFTER_HELP: &str = "\
Grows the volume's data area; the new space reads as zeros. The file is extended
(sparse), the allocation map moved when it needs more room, and the header that records
the new size written last, so a crash at any point leaves the old or the new size.
Shrinking is refused (data beyond the new end would be lost): make a new volume and copy.
The new space is thin (unallocated) unless --preallocate fills it, as `create
--preallocate` does; an interrupted preallocation leaves the new size, partly thin.
The change is recorded in the key audit log (operation `resize`).

Online: with --control PATH, EXPORT names an export of the daemon on that control
socket, which grows it while it is served, in the same crash-safe order (writes wait
for the moment it takes). Refused while an online re-encryption or a snapshot of it is
running. NBD connections made afterwards see the new size; connections already open keep
the size of their handshake (NBD cannot announce a new size), but the daemon serves them
up to the new size: a kernel device attached with `cryptvol attach` picks it up with
`cryptvol attach --refresh-size DEVICE EXPORT`.

After growing, grow the filesystem inside (e.g. resize2fs) once it is attached.

Examples:
  cryptvol resize /var/lib/cryptvol/vol1.img --size 20G
  cryptvol resize /var/lib/cryptvol/vol1.img --size +10G
  cryptvol resize /var/lib/cryptvol/thick.img --size 200G --preallocate
  cryptvol resize --control /run/cryptvol/control.sock vol1 --size +10G";

/// `cryptvol resize FILE --size SIZE`.
#[derive(Args)]
#[command(after_help = RESIZE_AFTER_HELP)]
pub(super) struct ResizeArgs {
    /// The volume file (not served); with --control, the name of a served export.
    #[arg(value_name = "FILE|EXPORT")]
    file: PathBuf,
    /// Grow the export EXPORT of the running daemon with this control socket, online
    /// (e.g. /run/cryptvol/control.sock).
    #[arg(long, value_name = "PATH", conflicts_with = "preallocate")]
    control: Option<PathBuf>,
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
    if let Some(control) = a.control.clone() {
        return resize_online(control, &a.file, size).await;
    }
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

/// `cryptvol resize --control PATH EXPORT --size SIZE`: the daemon grows its export.
async fn resize_online(control: PathBuf, export: &std::path::Path, size: NewSize) -> Result<()> {
    let export = export
        .to_str()
        .context("the export name is not valid UTF-8")?
        .to_string();
    let to = match size {
        NewSize::Absolute(n) => ResizeTo::Size(n),
        NewSize::Grow(n) => ResizeTo::Add(n),
    };
    let req = Request::Resize(ResizeRequest {
        export: export.clone(),
        to,
    });
    let m = control_call(control, req, String::new())
        .await
        .with_context(|| format!("cannot resize export {export:?}"))?;
    let r: ResizeReply = serde_json::from_value(serde_json::Value::Object(m))
        .context("the daemon's resize answer is not understood (version mismatch?)")?;
    println!(
        "{}: grown online from {} to {} ({} bytes){}; new connections see the new size{}",
        r.export,
        format_size(r.old_size),
        format_size(r.new_size),
        r.new_size,
        if r.map_relocated {
            "; the allocation map was moved to a larger place"
        } else {
            ""
        },
        if r.connections > 0 {
            format!(
                ", the {} open connection(s) keep the old one (a kernel device takes the new one on them: cryptvol attach --refresh-size DEVICE {})",
                r.connections, r.export
            )
        } else {
            String::new()
        }
    );
    Ok(())
}
