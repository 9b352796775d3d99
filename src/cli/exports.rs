//! `cryptvol exports add|remove|list`: live export management through a running
//! daemon's control socket (like `cryptvol status`).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::args::{AllowArgs, ControlArg};
use super::control::control_call;
use super::print::print_json;
use crate::config::parse_volume_arg;
use crate::server::control::{ExportAdd, ExportEntry, ExportList, ExportsRequest, Request};
use crate::size::format_size;

/// `cryptvol exports`.
#[derive(Subcommand)]
pub(super) enum ExportsCommand {
    /// Unlock a volume and serve it from now on (key states, policy and audit apply, as at
    /// start-up); the other exports and their clients are not touched.
    Add(AddArgs),
    /// Stop serving an export: refused while clients are connected unless --force, which
    /// flushes the volume and disconnects them cleanly. Its data key is dropped.
    Remove(RemoveArgs),
    /// List the exports a running daemon serves.
    List(ListArgs),
}

/// `cryptvol exports add`.
#[derive(Args)]
pub(super) struct AddArgs {
    /// The volume to serve: NAME=FILE, or FILE (export name = file stem).
    #[arg(value_name = "NAME=FILE")]
    volume: String,
    /// Serve it read-only.
    #[arg(long)]
    read_only: bool,
    /// Punch holes in the backing file on TRIM (see `serve --discard`).
    #[arg(long)]
    discard: bool,
    /// Who may open it.
    #[command(flatten)]
    allow: AllowArgs,
    #[command(flatten)]
    control: ControlArg,
}

/// `cryptvol exports remove`.
#[derive(Args)]
pub(super) struct RemoveArgs {
    /// The export to stop serving.
    name: String,
    /// Even with clients connected: flush the volume and disconnect them (in-flight
    /// requests are answered first).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    control: ControlArg,
}

/// `cryptvol exports list`.
#[derive(Args)]
pub(super) struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    control: ControlArg,
}

/// `cryptvol exports …`.
pub(super) async fn exports(c: ExportsCommand) -> Result<()> {
    match c {
        ExportsCommand::Add(a) => add(a).await,
        ExportsCommand::Remove(a) => remove(a).await,
        ExportsCommand::List(a) => list(a).await,
    }
}

async fn add(a: AddArgs) -> Result<()> {
    let (name, file) = parse_volume_arg(&a.volume).map_err(anyhow::Error::msg)?;
    // The daemon's working directory is not ours.
    let path = std::path::absolute(&file)
        .with_context(|| format!("cannot make {} an absolute path", file.display()))?;
    let req = ExportAdd {
        name,
        path: path
            .to_str()
            .with_context(|| format!("{} is not valid UTF-8", path.display()))?
            .to_string(),
        read_only: a.read_only,
        discard: a.discard,
        allow_uid: a.allow.uid,
        allow_gid: a.allow.gid,
        allow_tls_subject: a.allow.tls_subject,
        allow_tls_san: a.allow.tls_san,
        allow_anyone: a.allow.anyone,
    };
    let m = call(&a.control, ExportsRequest::Add(req)).await?;
    let e: ExportEntry = serde_json::from_value(m.get("export").cloned().unwrap_or_default())
        .context("the daemon's answer is not understood (version mismatch?)")?;
    println!("export {} added: {}", e.name, describe(&e));
    Ok(())
}

async fn remove(a: RemoveArgs) -> Result<()> {
    let req = ExportsRequest::Remove {
        name: a.name.clone(),
        force: a.force,
    };
    let m = call(&a.control, req).await?;
    let n = m
        .get("disconnected")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    println!("export {} removed ({n} client(s) disconnected)", a.name);
    Ok(())
}

async fn list(a: ListArgs) -> Result<()> {
    let m = call(&a.control, ExportsRequest::List).await?;
    let reply: ExportList = serde_json::from_value(serde_json::Value::Object(m))
        .context("the daemon's export list is not understood (version mismatch?)")?;
    if a.json {
        return print_json(&reply);
    }
    for e in &reply.exports {
        println!("{}: {}", e.name, describe(e));
    }
    Ok(())
}

async fn call(
    control: &ControlArg,
    req: ExportsRequest,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    control_call(control.path(), Request::Exports(req), String::new()).await
}

fn describe(e: &ExportEntry) -> String {
    format!(
        "{} ({}{}), {} connection(s)",
        e.path,
        format_size(e.size),
        if e.read_only { ", read-only" } else { "" },
        e.connections
    )
}
