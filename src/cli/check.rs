//! `cryptvol check`: the compliance scan's arguments, its report lines and its exit
//! status.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::compliance::{CheckOptions, ItemReport, Scanner, Verdict};

const CHECK_AFTER_HELP: &str = "\
Prints one line per item (with --json: one JSON object per line): PATH, the verdict
COMPLIANT, NON_COMPLIANT, ERROR (could not be checked) or SKIPPED (sockets, FIFOs,
character devices, the keystore directory), and the finding codes with their reasons.
A summary goes to stderr. Finding codes are listed in docs/compliance.md.

Never needs a data key or a passphrase and never writes anything (not even the audit log);
volumes being served are checked as they are.

Exit status (for cron and CI):
  0  every item checked is compliant (skipped items do not count)
  1  at least one item is NON_COMPLIANT, and everything could be checked
  2  usage error, or something could not be checked (an unreadable file, a key that could
     not be looked up); takes precedence over 1

Examples:
  cryptvol check /var/lib/cryptvol
  cryptvol check --json --require-key alias/prod --require-rotation /srv/volumes
  cryptvol check --no-default-key --max-key-age 90 vol1.img vol2.img";

/// `cryptvol check`.
#[derive(Args)]
#[command(after_help = CHECK_AFTER_HELP)]
pub(super) struct CheckArgs {
    /// Print one JSON object per item and line.
    #[arg(long)]
    json: bool,
    /// Every keyslot backed by a master key must use KEY (a local key id or alias/NAME,
    /// exec:NAME[:KEY], an AWS KMS ARN, aws-kms:ID or aws-kms:alias/NAME); aliases are
    /// resolved. Repeatable: any of the keys given is accepted.
    #[arg(long, value_name = "KEY")]
    require_key: Vec<String>,
    /// No keyslot may use a default key (the local default key alias/cryptvol/default or
    /// the key set with `cryptvol key set-default`). Implied by --require-key unless the
    /// default key is the one required.
    #[arg(long)]
    no_default_key: bool,
    /// The newest material of each local master key must be younger than DAYS days
    /// (KEY_ROTATION_OVERDUE); 0 flags every key.
    #[arg(long, value_name = "DAYS")]
    max_key_age: Option<u32>,
    /// Each local master key must be rotated every --max-key-age days (default 365): a
    /// never-rotated key past that age is KEY_ROTATION_OFF, a rotated one
    /// KEY_ROTATION_OVERDUE.
    #[arg(long)]
    require_rotation: bool,
    /// Local keystore directory (also where exec backends are registered) [default:
    /// $CRYPTVOL_KEYSTORE, else /var/lib/cryptvol/keys for root, else
    /// $XDG_DATA_HOME/cryptvol/keys]
    #[arg(long, value_name = "DIR")]
    keystore: Option<PathBuf>,
    /// Volume files, block devices and directories (scanned recursively, symbolic links
    /// followed).
    #[arg(value_name = "PATH", required = true)]
    paths: Vec<PathBuf>,
}

/// A non-zero exit status `check` chose (its output has been printed already).
#[derive(Debug)]
pub(super) struct CheckStatus(pub(super) u8);

impl std::fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for CheckStatus {}

/// `cryptvol check`: scans, prints one line per item and a summary, and fails with the
/// scan's exit status ([`CheckStatus`]) unless everything is compliant.
pub(super) async fn check(a: CheckArgs) -> Result<()> {
    let opts = CheckOptions {
        keystore_dir: super::defaults::keystore(a.keystore.clone())
            .unwrap_or_else(crate::keys::default_keystore_dir),
        require_keys: required_keys(&a.require_key)?,
        no_default_key: a.no_default_key,
        max_key_age_days: a.max_key_age,
        require_rotation: a.require_rotation,
    };
    let mut scanner = Scanner::new(&opts).await?;
    let mut write_err = None;
    let summary = {
        let mut out = std::io::stdout().lock();
        let mut emit = |r: &ItemReport| {
            let res = if a.json {
                serde_json::to_writer(&mut out, r)
                    .map_err(std::io::Error::from)
                    .and_then(|()| writeln!(out))
            } else {
                writeln!(out, "{}", check_line(r))
            };
            if let Err(e) = res.and_then(|()| out.flush()) {
                write_err.get_or_insert(e);
            }
        };
        scanner.scan(&a.paths, &mut emit).await
    };
    if let Some(e) = write_err {
        return Err(anyhow::Error::new(e).context("cannot write the report"));
    }
    eprintln!(
        "cryptvol check: {} item(s): {} compliant, {} non-compliant, {} error(s), {} skipped",
        summary.total(),
        summary.compliant,
        summary.non_compliant,
        summary.errors,
        summary.skipped
    );
    match summary.exit_code() {
        0 => Ok(()),
        code => Err(CheckStatus(code).into()),
    }
}

/// `--require-key` values; with bare references meaning AWS KMS, written out so that the
/// scan (which reads them as references) sees the KMS key.
fn required_keys(keys: &[String]) -> Result<Vec<String>> {
    if super::defaults::bare_key_refs() == crate::keys::BareRefs::Local {
        return Ok(keys.to_vec());
    }
    keys.iter()
        .map(|k| Ok(super::defaults::key_ref(k)?.to_string()))
        .collect()
}

/// Control characters (from file names or headers) shown escaped, so one item stays on
/// one line.
fn one_line(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// `PATH: VERDICT (details) [CODE: message; ...]`.
fn check_line(r: &ItemReport) -> String {
    let mut line = format!("{}: {}", r.path, r.verdict.as_str());
    if r.verdict == Verdict::Compliant {
        let keys: Vec<String> = r
            .keyslots
            .iter()
            .map(|k| {
                if k.key_id.is_empty() {
                    k.backend.clone()
                } else {
                    format!("{} {}", k.backend, k.key_id)
                }
            })
            .collect();
        line.push_str(&format!(
            " (volume {}, keys: {})",
            r.volume_uuid.as_deref().unwrap_or("?"),
            keys.join(", ")
        ));
    }
    for f in r.reasons.iter().chain(&r.notes) {
        line.push_str(&format!(" [{}: {}]", f.code.as_str(), f.message));
    }
    one_line(&line)
}
