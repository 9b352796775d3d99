//! `cryptvol reencrypt`: online through the daemon's control socket (start, follow,
//! `--status`), or offline in this process for a volume file that is not served. The
//! offline run steps the volume with the daemon's own loop
//! ([`crate::server::reencrypt::step_until_done`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

use super::args::{key_options, passphrase_source, ControlArg, KdfArgs, KeystoreArgs};
use super::control::control_call;
use super::print::{keyslot_list, percent, print_json};
use super::signals::CtrlCFlag;
use crate::keys::{PassphraseBackend, PassphraseSource};
use crate::ops::{self, KeyOptions};
use crate::progress::Progress;
use crate::server::control::{self as ctl, Request};
use crate::server::reencrypt::{step_until_done, RunEnd, StepHandler};
use crate::size::format_size;
use crate::volume::{Header, OpenOptions, ReencryptStatus, Volume, VolumeError};

const REENCRYPT_AFTER_HELP: &str = "\
Online (EXPORT is an export of a running `cryptvol serve`, reached through its control
socket): the daemon generates a new data key, wraps it for every keyslot of the volume
under the same master keys, and re-encrypts the volume in the background while clients
keep using it. The progress is recorded in the volume header: after a crash or a restart
the daemon resumes by itself. At the end the old keyslots and the old data key are gone.
One re-encryption per export at a time (another request is refused while one runs);
read-only exports are refused.
Volumes with a passphrase keyslot cannot be re-encrypted online (the daemon does not keep
passphrases): re-encrypt them offline.

Offline (FILE is an existing volume file that is not served, or --offline): the same,
in this process, with a progress bar; Ctrl-C stops between steps and the next run resumes
from the watermark (`cryptvol info FILE` shows it). Passphrase keyslots are re-wrapped with the passphrase given (--passphrase-file).

Examples:
  cryptvol reencrypt vol1                     # online, shows progress until done
  cryptvol reencrypt vol1 --no-wait           # online, returns once started
  cryptvol reencrypt --status vol1
  cryptvol reencrypt /var/lib/cryptvol/vol1.img --passphrase-file /root/pass";

/// `cryptvol reencrypt`.
#[derive(Args)]
#[command(after_help = REENCRYPT_AFTER_HELP)]
pub(super) struct ReencryptArgs {
    /// A served export (online, through the daemon) or a volume file (offline).
    #[arg(value_name = "EXPORT|FILE")]
    target: String,
    /// Treat the argument as a volume file to re-encrypt offline.
    #[arg(long, conflicts_with_all = ["status", "no_wait", "control"])]
    offline: bool,
    /// Show the re-encryption progress of a served export and return.
    #[arg(long)]
    status: bool,
    /// Return as soon as the re-encryption has started (it goes on in the daemon).
    #[arg(long, conflicts_with = "status")]
    no_wait: bool,
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    control: ControlArg,
    /// Offline: the passphrase of the volume's passphrase keyslot(s), read from FILE
    /// (unlocks the volume and wraps the new data key for those keyslots).
    #[arg(long, value_name = "FILE", group = "repass")]
    passphrase_file: Option<PathBuf>,
    /// Offline: prompt for that passphrase on the terminal (asked again to wrap the new
    /// data key).
    #[arg(long, group = "repass")]
    passphrase: bool,
    #[command(flatten)]
    keystore: KeystoreArgs,
    #[command(flatten)]
    kdf: KdfArgs,
}

/// `cryptvol reencrypt`: offline for a volume file (or `--offline`), else through the
/// daemon.
pub(super) async fn reencrypt(a: ReencryptArgs) -> Result<()> {
    let as_file = Path::new(&a.target);
    if a.offline || (a.control.control.is_none() && !a.status && as_file.is_file()) {
        return reencrypt_offline(&a, as_file).await;
    }
    if a.passphrase_file.is_some() || a.passphrase {
        anyhow::bail!(
            "--passphrase-file/--passphrase apply to offline re-encryption of a volume file; \
             the daemon re-encrypts served exports with the keys it has (no passphrases)"
        );
    }
    if a.status {
        return online_status(&a).await;
    }
    let export = a.target.clone();
    let m = control_call(
        a.control.path(),
        Request::Reencrypt {
            export: export.clone(),
            wait: !a.no_wait,
        },
        format!("re-encrypt {export}"),
    )
    .await
    .with_context(|| {
        if export.contains('/') && !as_file.exists() {
            format!(
                "cannot re-encrypt {export:?}: there is no volume file at that path (to \
                 re-encrypt a file offline, give its path), and as an export name"
            )
        } else {
            format!("cannot re-encrypt export {export:?}")
        }
    })?;
    if a.json {
        print_json(&m)?;
    } else if a.no_wait {
        println!(
            "{export}: re-encryption running in the daemon (follow it with `cryptvol reencrypt --status {export}`)"
        );
    } else {
        println!("{export}: re-encrypted under a new data key; the old data key is destroyed");
    }
    Ok(())
}

/// `cryptvol reencrypt --status EXPORT`.
async fn online_status(a: &ReencryptArgs) -> Result<()> {
    let export = a.target.clone();
    let m = control_call(
        a.control.path(),
        Request::ReencryptStatus {
            export: export.clone(),
        },
        String::new(),
    )
    .await?;
    if a.json {
        return print_json(&m);
    }
    let info: Option<ctl::ReencryptInfo> = m
        .get("reencrypt")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok());
    match info {
        Some(i) if i.finished => println!("{export}: re-encryption complete"),
        Some(i) => println!("{export}: {}", reencrypt_line(&i)),
        None => println!("{export}: no re-encryption in progress"),
    }
    Ok(())
}

/// `re-encrypting: 42.0% (…)`, for `reencrypt --status` and `status`.
pub(super) fn reencrypt_line(i: &ctl::ReencryptInfo) -> String {
    let pct = percent(i.watermark, i.size);
    let mut s = format!(
        "re-encrypting: {pct:.1}% ({} of {}){}",
        format_size(i.watermark),
        format_size(i.size),
        if i.running { "" } else { ", not running" }
    );
    if let Some(e) = &i.last_error {
        s.push_str(&format!(", last error: {e}"));
    }
    s
}

/// `cryptvol reencrypt FILE`: starts (or resumes) the re-encryption of a volume file
/// and steps it to the end here, with a progress bar; Ctrl-C stops between steps.
async fn reencrypt_offline(a: &ReencryptArgs, file: &Path) -> Result<()> {
    if a.no_wait || a.status {
        anyhow::bail!("--no-wait and --status apply to served exports (online re-encryption)");
    }
    let source = || passphrase_source(&a.passphrase_file, None, a.passphrase);
    let mut keys = key_options(&a.keystore, None, a.kdf.params());
    keys.passphrase = source();
    let (vol, header, _) = ops::unlock(file, &keys, OpenOptions::default())
        .await
        .with_context(|| {
            format!(
                "cannot open {} to re-encrypt it (if it is being served, re-encrypt the export \
                 online: cryptvol reencrypt EXPORT)",
                file.display()
            )
        })?;
    let vol = Arc::new(vol);
    match vol.reencrypt_status() {
        Some(st) => eprintln!(
            "resuming the re-encryption of {} at {} of {} (watermark {} bytes)",
            file.display(),
            format_size(st.watermark),
            format_size(st.size),
            st.watermark
        ),
        None => begin_offline(file, &vol, &header, &keys, source()).await?,
    }
    let outcome = run_offline(&vol, format!("re-encrypt {}", file.display())).await?;
    match outcome.with_context(|| {
        format!(
            "re-encryption of {} failed (run the same command again to resume)",
            file.display()
        )
    })? {
        None => {
            let h = crate::volume::read_header(file).map(|(h, _)| h)?;
            println!(
                "re-encrypted {} under a new data key; the old data key is destroyed",
                file.display()
            );
            println!("keyslots now: {}", keyslot_list(&h.keyslots));
            Ok(())
        }
        Some(st) => anyhow::bail!(
            "re-encryption of {} interrupted at {} of {} ({} bytes under the new data key, \
             recorded in the header); run the same command again to resume from there",
            file.display(),
            format_size(st.watermark),
            format_size(st.size),
            st.watermark
        ),
    }
}

/// Starts a re-encryption of `file`: a new data key wrapped for every keyslot, passphrase
/// keyslots with the passphrase from `source` (read a second time).
async fn begin_offline(
    file: &Path,
    vol: &Arc<Volume>,
    header: &Header,
    keys: &KeyOptions,
    source: Option<PassphraseSource>,
) -> Result<()> {
    let pass_slots: Vec<String> = header
        .keyslots
        .iter()
        .enumerate()
        .filter(|(_, k)| k.backend == crate::keys::PASSPHRASE)
        .map(|(i, _)| i.to_string())
        .collect();
    let pb = if pass_slots.is_empty() {
        None
    } else {
        let Some(src) = source else {
            anyhow::bail!(
                "{}: keyslot {} is a passphrase keyslot: give its passphrase with \
                 --passphrase-file FILE (or --passphrase) so the new data key can be \
                 wrapped for it, or remove that keyslot first",
                file.display(),
                pass_slots.join(", ")
            );
        };
        if matches!(src, PassphraseSource::Prompt) {
            eprintln!("Enter the passphrase again to wrap the new data key.");
        }
        Some(PassphraseBackend::new(src.read(false)?, keys.argon2))
    };
    let (dek, slots) = ops::reencrypt_new_dek(file, header, keys, pb.as_ref())
        .await
        .with_context(|| format!("cannot re-encrypt {}", file.display()))?;
    let v = vol.clone();
    tokio::task::spawn_blocking(move || v.reencrypt_begin(dek, slots))
        .await
        .context("re-encryption task failed")?
        .with_context(|| format!("cannot start re-encrypting {}", file.display()))?;
    Ok(())
}

/// Steps the re-encryption of `vol` on a blocking thread until it is done (`None`) or
/// Ctrl-C stops it (the progress left); the volume is flushed either way. The outer
/// error is the task's, the inner one the volume's.
async fn run_offline(
    vol: &Arc<Volume>,
    what: String,
) -> Result<Result<Option<ReencryptStatus>, VolumeError>> {
    let ctrl_c = CtrlCFlag::watch();
    let stop = ctrl_c.flag();
    let v = vol.clone();
    tokio::task::spawn_blocking(move || {
        let progress = Progress::new(what, v.size());
        if let Some(st) = v.reencrypt_status() {
            progress.set_done(st.watermark);
        }
        let mut handler = Foreground {
            stop: &stop,
            progress: &progress,
        };
        let r = step_until_done(&v, &mut handler).map(|end| match end {
            RunEnd::Finished => None,
            RunEnd::Stopped => v.reencrypt_status(),
        });
        progress.finish();
        r.and_then(|left| v.flush().map(|()| left))
    })
    .await
    .context("re-encryption task failed")
}

/// Offline re-encryption's [`StepHandler`]: a progress bar, Ctrl-C stops, a failed step
/// ends the run (the next run resumes from the watermark).
struct Foreground<'a> {
    stop: &'a AtomicBool,
    progress: &'a Progress,
}

impl StepHandler for Foreground<'_> {
    type Error = VolumeError;

    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn progressed(&mut self, st: ReencryptStatus) {
        self.progress.set_done(st.watermark);
    }

    fn failed(&mut self, e: VolumeError) -> Result<(), VolumeError> {
        Err(e)
    }
}
