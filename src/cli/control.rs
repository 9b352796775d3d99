//! The client side of the daemon's control socket: one request with its progress
//! shown, and `cryptvol status`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::args::ControlArg;
use super::print::print_json;
use super::reencrypt::reencrypt_line;
use crate::server::control::{self as ctl, ProgressEvent, Request};
use crate::size::format_size;

/// Runs one control request on a blocking thread, showing progress events as a bar (or
/// log lines) named `what`.
pub(super) async fn control_call(
    path: PathBuf,
    req: Request,
    what: String,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let shown = path.display().to_string();
    let answer = tokio::task::spawn_blocking(move || {
        let mut bar: Option<crate::progress::Progress> = None;
        let mut last_error: Option<String> = None;
        let mut total = 0;
        let r = ctl::request(&path, &req, |ev: &ProgressEvent| {
            total = ev.total;
            bar.get_or_insert_with(|| crate::progress::Progress::new(what.clone(), ev.total))
                .set_done(ev.done);
            if ev.error.is_some() && ev.error != last_error {
                if let Some(e) = &ev.error {
                    eprintln!("cryptvol: warning: {}: {e} (the daemon retries)", ev.export);
                }
            }
            last_error.clone_from(&ev.error);
        });
        if let Some(b) = bar {
            // Progress events are sampled: a job that succeeded is complete.
            if r.is_ok() {
                b.set_done(total);
            }
            b.finish();
        }
        r
    })
    .await
    .context("control request task failed")?;
    answer.with_context(|| format!("control socket {shown}"))
}

/// `cryptvol status`.
#[derive(Args)]
pub(super) struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    control: ControlArg,
}

/// `cryptvol status`: what a running daemon serves.
pub(super) async fn status(a: StatusArgs) -> Result<()> {
    let m = control_call(a.control.path(), Request::Status, String::new()).await?;
    let reply: ctl::StatusReply = serde_json::from_value(serde_json::Value::Object(m))
        .context("the daemon's status answer is not understood (version mismatch?)")?;
    if a.json {
        return print_json(&reply);
    }
    println!(
        "cryptvol daemon pid {}: {} export(s), {} connection(s)",
        reply.pid,
        reply.exports.len(),
        reply.connections
    );
    for e in &reply.exports {
        println!(
            "{}: {} ({}, {}-byte sectors{}), {} connection(s), allocated {}",
            e.name,
            e.path,
            format_size(e.size),
            e.sector_size,
            if e.read_only { ", read-only" } else { "" },
            e.connections,
            if e.thin {
                format_size(e.allocated_bytes)
            } else {
                "everything (not thin)".into()
            }
        );
        if let Some(r) = &e.reencrypt {
            if r.finished {
                println!("  re-encryption complete");
            } else {
                println!("  {}", reencrypt_line(r));
            }
        }
    }
    Ok(())
}
