//! `cryptvol break-glass`: a volume's data key to a descriptor, for dm-crypt, and the
//! commands that map the volume with it (the logic is `ops::break_glass`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::args::{key_options, KeystoreArgs, UnlockArgs};
use super::print::print_json;
use crate::keys::Argon2Params;
use crate::ops::{self, DekFd, Recovery};

/// `cryptvol break-glass`.
#[derive(Args)]
pub(super) struct BreakGlassArgs {
    /// The volume file.
    file: PathBuf,
    /// Write the 64 raw bytes of the data key to this already-open descriptor (a pipe, or
    /// a private file: `--dek-fd 3 3>/run/vol.key` under umask 077). Never a terminal.
    #[arg(long, value_name = "N")]
    dek_fd: i32,
    /// Allow --dek-fd 0, 1 or 2 (the commands are then printed on stderr).
    #[arg(long)]
    allow_std_fd: bool,
    /// The device-mapper name in the printed commands (/dev/mapper/NAME).
    #[arg(long, value_name = "NAME", default_value = "cryptvol-recovery")]
    name: String,
    /// Print the commands without --readonly (writes through dm-crypt bypass the
    /// allocation map of a thin volume: see docs/keys.md before using it).
    #[arg(long)]
    writable: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    unlock: UnlockArgs,
    #[command(flatten)]
    keystore: KeystoreArgs,
}

/// `cryptvol break-glass FILE --dek-fd N`.
pub(super) async fn break_glass(a: BreakGlassArgs) -> Result<()> {
    let out = DekFd::check(a.dek_fd, a.allow_std_fd)?;
    let fd = out.number();
    let key_file = out
        .path()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "KEYFILE".into());
    let mut keys = key_options(&a.keystore, None, Argon2Params::default());
    keys.passphrase = a.unlock.source();
    let r = ops::break_glass(&a.file, &keys, out)
        .await
        .with_context(|| format!("cannot hand out the data key of {}", a.file.display()))?;
    let text = instructions(&r, fd, &key_file, &a.name, !a.writable);
    if a.json {
        let v = serde_json::json!({
            "recovery": r,
            "dek_fd": fd,
            "cryptsetup": r.cryptsetup_line(&key_file, &a.name, !a.writable),
            "dm_table": r.dm_table("HEXKEY", "LOOPDEV"),
        });
        if fd <= 2 {
            eprintln!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        return print_json(&v);
    }
    if fd <= 2 {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
    Ok(())
}

/// What the operator reads: the audit note, the cryptsetup line, the dmsetup form.
fn instructions(r: &Recovery, fd: i32, key_file: &str, name: &str, ro: bool) -> String {
    let mut s = format!(
        "wrote the 64-byte data key of {} (volume {}, keyslot {}) to descriptor {fd}; this is audited (break-glass)\n\
         open it with dm-crypt ({}):\n  {}\n",
        r.file.display(),
        r.uuid,
        r.keyslot,
        if key_file == "KEYFILE" {
            "KEYFILE: a private file holding the 64 bytes"
        } else {
            "the key file written"
        },
        r.cryptsetup_line(key_file, name, ro),
    );
    s.push_str(&format!(
        "or with dmsetup, the volume file on a loop device (losetup -f --show{} FILE):\n  dmsetup create {name}{} --table \"{}\"\n",
        if ro { " -r" } else { "" },
        if ro { " --readonly" } else { "" },
        r.dm_table(
            &format!("$(od -An -v -tx1 {key_file} | tr -d ' \\n')"),
            "LOOPDEV"
        )
    ));
    if r.thin {
        s.push_str("this volume is thin: chunks never written hold no ciphertext and read as garbage through dm-crypt (`cryptvol export` reads them as zeros)\n");
    }
    s.push_str("the data key has left cryptvol: re-encrypt the volume (`cryptvol reencrypt`) once it is recovered, and shred the key file\n");
    s
}
