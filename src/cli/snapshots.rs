//! `cryptvol snapshot …`: create (from a file, or through the daemon for a served
//! export), list, describe, delete, gc and copy.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::args::{
    key_options, optional_new_key, ControlArg, KeystoreArgs, PassphraseArgs, StoreArg, WrappingArgs,
};
use super::control::control_call;
use super::print::{keyslot_line, print_json};
use super::signals::interruptible;
use crate::keys::Argon2Params;
use crate::ops;
use crate::server::control::Request;
use crate::size::format_size;
use crate::snapshot::{self as snap, CreateOptions, Parent};

const SNAPSHOT_AFTER_HELP: &str = "\
Stores: file:///DIR or a plain directory path (default: $CRYPTVOL_SNAPSHOT_STORE, else
/var/lib/cryptvol/snapshots for root, else $XDG_DATA_HOME/cryptvol/snapshots), or
s3://BUCKET/PREFIX with the standard AWS environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL[_S3]; http:// endpoints only on
loopback). Chunks are stored encrypted under the volume's data key; see README, Snapshots.

Examples:
  cryptvol snapshot create vol.img --store /backup/snaps --description nightly
  cryptvol snapshot list --store /backup/snaps --volume vol.img
  cryptvol create --from-snapshot snap-0123456789abcdef0 --store /backup/snaps restored.img
  cryptvol snapshot copy snap-0123456789abcdef0 --store /backup/snaps --to-store s3://b/p --key alias/dr";

/// `cryptvol snapshot`.
#[derive(Subcommand)]
#[command(after_help = SNAPSHOT_AFTER_HELP)]
pub(super) enum SnapshotCommand {
    /// Snapshot a volume: a file that is not being served is read directly; a served
    /// export is snapshotted through its daemon (crash-consistent: the daemon flushes and
    /// keeps serving writes, preserving old contents until they are copied).
    /// Incremental: chunks the store already holds are not uploaded.
    #[command(after_help = SNAPSHOT_AFTER_HELP)]
    Create(CreateArgs),
    /// List the snapshots of a store (no key needed).
    #[command(after_help = SNAPSHOT_AFTER_HELP)]
    List {
        #[command(flatten)]
        store: StoreArg,
        /// Only snapshots of this volume: its UUID, or a volume file.
        #[arg(long, value_name = "UUID|FILE")]
        volume: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one snapshot (no key needed).
    Describe {
        id: String,
        #[command(flatten)]
        store: StoreArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot: its manifest, then the chunks no other snapshot uses.
    Delete {
        id: String,
        #[command(flatten)]
        store: StoreArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete chunks no snapshot references (left by interrupted snapshots). Do not run it
    /// while a snapshot is being created or copied into the same store.
    Gc {
        #[command(flatten)]
        store: StoreArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy a snapshot to another store, as it is or re-encrypted under another key.
    #[command(after_help = SNAPSHOT_AFTER_HELP)]
    Copy(CopyArgs),
}

/// `cryptvol snapshot create`.
#[derive(Args)]
pub(super) struct CreateArgs {
    /// The volume file, or the name of an export served by the daemon at --control.
    #[arg(value_name = "FILE|EXPORT")]
    file: PathBuf,
    #[command(flatten)]
    control: ControlArg,
    #[command(flatten)]
    store: StoreArg,
    /// A free-text description stored in the manifest.
    #[arg(long, value_name = "TEXT", default_value = "")]
    description: String,
    /// Parent snapshot [default: the newest snapshot of this volume in the store;
    /// "none" for none].
    #[arg(long, value_name = "ID")]
    parent: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    keystore: KeystoreArgs,
    #[command(flatten)]
    pass: PassphraseArgs,
}

/// `cryptvol snapshot copy`.
#[derive(Args)]
pub(super) struct CopyArgs {
    id: String,
    #[command(flatten)]
    store: StoreArg,
    /// The destination store.
    #[arg(long, value_name = "STORE")]
    to_store: String,
    /// Re-encrypt under a new data key wrapped by this master key (a key other than the
    /// snapshot's); without it the snapshot is copied as it is (no key needed).
    #[arg(
        long,
        visible_alias = "kms-key-id",
        value_name = "KEY",
        conflicts_with = "pass"
    )]
    key: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    keys: WrappingArgs,
}

/// A snapshot id argument, parsed.
pub(super) fn snapshot_id(s: &str) -> Result<crate::snapshot::SnapshotId> {
    Ok(crate::snapshot::SnapshotId::parse(s)?)
}

/// What `snapshot list/describe` show (no key material; keyslots without their blobs).
#[derive(serde::Serialize)]
struct SnapshotView {
    id: String,
    volume_uuid: String,
    volume_size: u64,
    sector_size: u32,
    chunk_size: u32,
    chunks: u64,
    data_chunks: u64,
    stored_bytes: u64,
    parent: Option<String>,
    created_at: String,
    description: String,
    encryption_context: std::collections::BTreeMap<String, String>,
    keyslots: Vec<ops::KeyslotInfo>,
}

/// The view of a manifest that `snapshot list/describe` show.
fn snapshot_view(m: &crate::snapshot::Manifest) -> SnapshotView {
    SnapshotView {
        id: m.id.to_string(),
        volume_uuid: m.volume_uuid.to_string(),
        volume_size: m.volume_size,
        sector_size: m.sector_size,
        chunk_size: m.chunk_size,
        chunks: m.chunk_count(),
        data_chunks: m.chunks.len() as u64,
        stored_bytes: m.chunks.keys().map(|&i| m.chunk_len(i) as u64).sum(),
        parent: m.parent.as_ref().map(|p| p.to_string()),
        created_at: m.created_at.clone(),
        description: m.description.clone(),
        encryption_context: m.encryption_context.0.clone(),
        keyslots: m
            .keyslots
            .iter()
            .enumerate()
            .map(|(slot, k)| ops::KeyslotInfo {
                slot,
                backend: k.backend.clone(),
                key_id: k.key_id.clone(),
                encryption_context: k.context.0.clone(),
            })
            .collect(),
    }
}

/// `cryptvol snapshot …`: one function per subcommand.
pub(super) async fn snapshot(c: SnapshotCommand) -> Result<()> {
    match c {
        SnapshotCommand::Create(a) => create(a).await,
        SnapshotCommand::List {
            store,
            volume,
            json,
        } => list(&store, volume.as_deref(), json).await,
        SnapshotCommand::Describe { id, store, json } => describe(&id, &store, json).await,
        SnapshotCommand::Delete { id, store, json } => delete(&id, &store, json).await,
        SnapshotCommand::Gc { store, json } => gc(&store, json).await,
        SnapshotCommand::Copy(a) => copy(a).await,
    }
}

/// `snapshot create`: through the daemon for a served export (`--control`, or no such
/// file), else directly from the file.
async fn create(a: CreateArgs) -> Result<()> {
    if a.control.control.is_some() || !a.file.is_file() {
        let export = a.file.to_string_lossy().into_owned();
        let spec = a.store.spec();
        let parent = a.parent.filter(|p| p != "auto");
        return snapshot_create_online(
            &a.control.path(),
            &export,
            &spec,
            &a.description,
            parent.as_deref(),
            a.json,
        )
        .await;
    }
    let store = a.store.open(true)?;
    let keys = key_options(&a.keystore, Some(&a.pass), Argon2Params::default());
    let parent = match a.parent.as_deref() {
        None => Parent::Auto,
        Some("none") => Parent::None,
        Some(p) => Parent::Id(snapshot_id(p)?),
    };
    let opts = CreateOptions {
        parent,
        changed: None,
        description: a.description,
    };
    let file = &a.file;
    let st = interruptible("snapshot", async {
        ops::snapshot_create(file, &keys, &store, &opts)
            .await
            .with_context(|| format!("cannot snapshot {}", file.display()))
    })
    .await?;
    if a.json {
        return print_json(&st);
    }
    println!(
        "snapshot {} of {} in {}: {} chunks, {} with data, {} uploaded ({}){}",
        st.id,
        file.display(),
        store.url(),
        st.chunks,
        st.data_chunks,
        st.uploaded,
        format_size(st.uploaded_bytes),
        match &st.parent {
            Some(p) => format!(", incremental to {p}"),
            None => String::new(),
        }
    );
    Ok(())
}

/// `snapshot list`.
async fn list(store: &StoreArg, volume: Option<&str>, json: bool) -> Result<()> {
    let store = store.open(false)?;
    let filter = volume.map(volume_uuid).transpose()?;
    let all = snap::list_snapshots(&store).await?;
    let views: Vec<SnapshotView> = all
        .iter()
        .filter(|m| filter.is_none_or(|u| m.volume_uuid == u))
        .map(snapshot_view)
        .collect();
    if json {
        return print_json(&views);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<22}  {:<27}  {:<36}  {:>9}  {:>9}  {:<22}  DESCRIPTION",
        "ID", "CREATED", "VOLUME", "SIZE", "STORED", "PARENT"
    )?;
    for v in &views {
        writeln!(
            out,
            "{:<22}  {:<27}  {:<36}  {:>9}  {:>9}  {:<22}  {}",
            v.id,
            v.created_at,
            v.volume_uuid,
            format_size(v.volume_size),
            format_size(v.stored_bytes),
            v.parent.as_deref().unwrap_or("-"),
            v.description.escape_debug()
        )?;
    }
    Ok(())
}

/// `--volume UUID|FILE` of `snapshot list`: the UUID given, or the one of that volume.
fn volume_uuid(v: &str) -> Result<uuid::Uuid> {
    Ok(match uuid::Uuid::try_parse(v) {
        Ok(u) => u,
        Err(_) => ops::info(Path::new(v))
            .with_context(|| format!("--volume {v}: not a UUID nor a readable volume"))?
            .uuid
            .parse()?,
    })
}

/// `snapshot describe`.
async fn describe(id: &str, store: &StoreArg, json: bool) -> Result<()> {
    let store = store.open(false)?;
    let m = snap::restore::load_manifest(&store, &snapshot_id(id)?).await?;
    let v = snapshot_view(&m);
    if json {
        return print_json(&v);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "snapshot:     {}", v.id)?;
    writeln!(out, "store:        {}", store.url())?;
    writeln!(out, "created:      {}", v.created_at)?;
    writeln!(out, "description:  {}", v.description.escape_debug())?;
    writeln!(out, "volume:       {}", v.volume_uuid)?;
    writeln!(
        out,
        "size:         {} ({} bytes), {}-byte sectors",
        format_size(v.volume_size),
        v.volume_size,
        v.sector_size
    )?;
    writeln!(
        out,
        "chunks:       {} of {} bytes, {} with data ({}), {} holes",
        v.chunks,
        v.chunk_size,
        v.data_chunks,
        format_size(v.stored_bytes),
        v.chunks - v.data_chunks
    )?;
    writeln!(out, "parent:       {}", v.parent.as_deref().unwrap_or("-"))?;
    let ctx: Vec<String> = v
        .encryption_context
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    writeln!(out, "key context:  {}", ctx.join(", "))?;
    writeln!(out, "keyslots:")?;
    for k in &v.keyslots {
        writeln!(out, "  {}", keyslot_line(k))?;
    }
    Ok(())
}

/// `snapshot delete`.
async fn delete(id: &str, store: &StoreArg, json: bool) -> Result<()> {
    let store = store.open(false)?;
    let id = snapshot_id(id)?;
    let st = snap::delete_snapshot(&store, &id).await?;
    if json {
        return print_json(&st);
    }
    println!(
        "deleted snapshot {id} from {}: {} chunks removed, {} kept (used by other snapshots)",
        store.url(),
        st.chunks_deleted,
        st.chunks_kept
    );
    Ok(())
}

/// `snapshot gc`.
async fn gc(store: &StoreArg, json: bool) -> Result<()> {
    let store = store.open(false)?;
    let st = snap::collect_garbage(&store).await?;
    if json {
        return print_json(&st);
    }
    println!(
        "{}: {} unreferenced chunks removed, {} in use",
        store.url(),
        st.chunks_deleted,
        st.chunks_kept
    );
    Ok(())
}

/// `snapshot copy`: as it is, or re-encrypted under a new data key.
async fn copy(a: CopyArgs) -> Result<()> {
    let from = a.store.open(false)?;
    let to = StoreArg {
        store: Some(a.to_store),
    }
    .open(true)?;
    let id = snapshot_id(&a.id)?;
    let keys = a.keys.options();
    let target = optional_new_key(a.key.as_deref(), &keys)?;
    let st = interruptible("copy", async {
        ops::snapshot_copy(&from, &id, &to, &keys, target)
            .await
            .with_context(|| format!("cannot copy snapshot {id} to {}", to.url()))
    })
    .await?;
    if a.json {
        return print_json(&st);
    }
    println!(
        "copied snapshot {id} to {} as {}{}: {} chunks transferred, {} already there",
        to.url(),
        st.id,
        if st.reencrypted {
            " (re-encrypted under a new data key)"
        } else {
            ""
        },
        st.chunks_copied,
        st.chunks_present
    );
    Ok(())
}

/// `cryptvol snapshot create EXPORT` through the daemon.
async fn snapshot_create_online(
    control: &Path,
    export: &str,
    store: &str,
    description: &str,
    parent: Option<&str>,
    json: bool,
) -> Result<()> {
    let store = absolute_store(store)?;
    let m = control_call(
        control.to_path_buf(),
        Request::Snapshot {
            export: export.to_string(),
            store: store.clone(),
            description: description.to_string(),
            parent: parent.map(str::to_string),
        },
        format!("snapshot {export}"),
    )
    .await
    .with_context(|| format!("cannot snapshot export {export:?}"))?;
    if json {
        print_json(&m)?;
    } else {
        let snap = m.get("snapshot").cloned().unwrap_or_default();
        let id = snap
            .get("id")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| snap.to_string());
        let n = |k: &str| snap.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        println!(
            "snapshot {id} of export {export} in {store}: {} chunks, {} with data, {} read, {} uploaded ({}){}",
            n("chunks"),
            n("data_chunks"),
            n("read"),
            n("uploaded"),
            format_size(n("uploaded_bytes")),
            match snap.get("parent").and_then(|v| v.as_str()) {
                Some(p) => format!(", incremental to {p}"),
                None => String::new(),
            }
        );
    }
    Ok(())
}

/// A store as the daemon should see it: URLs as given, a directory made absolute.
fn absolute_store(store: &str) -> Result<String> {
    if store.contains("://") {
        return Ok(store.to_string());
    }
    let p = std::path::absolute(store)
        .with_context(|| format!("cannot make the store path {store:?} absolute"))?;
    Ok(p.display().to_string())
}
