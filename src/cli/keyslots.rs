//! Keyslots of a volume: `rekey` (rewrap one keyslot's data key under another key) and
//! `keyslot add|remove`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{ArgGroup, Args, Subcommand};

use super::args::{key_options, passphrase_source, KdfArgs, KeystoreArgs, UnlockArgs};
use super::print::{keyslot_list, print_json, slot_label};
use crate::keys::{Argon2Params, PassphraseSource};
use crate::ops::{self, KeyOptions, KeyslotChange, NewKey};

/// `cryptvol rekey`.
#[derive(Args)]
#[command(group(ArgGroup::new("to").required(true)))]
pub(super) struct RekeyArgs {
    /// The volume file.
    file: PathBuf,
    /// The new master key (local id or alias, exec:NAME[:KEY], an AWS KMS key).
    #[arg(long, value_name = "KEY", group = "to")]
    to_key: Option<String>,
    /// Rewrap under a passphrase read from FILE.
    #[arg(long, value_name = "FILE", group = "to")]
    to_passphrase_file: Option<PathBuf>,
    /// Rewrap under a passphrase read from descriptor N.
    #[arg(long, value_name = "N", group = "to")]
    to_passphrase_fd: Option<i32>,
    /// Rewrap under a passphrase typed on the terminal (asked twice).
    #[arg(long, group = "to")]
    to_passphrase: bool,
    /// The keyslot to replace [default: the only keyslot].
    #[arg(long, value_name = "N")]
    slot: Option<usize>,
    /// Print the volume's header afterwards as JSON (as `cryptvol info --json` does).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    unlock: UnlockArgs,
    #[command(flatten)]
    keystore: KeystoreArgs,
    #[command(flatten)]
    kdf: KdfArgs,
}

/// `cryptvol keyslot`.
#[derive(Subcommand)]
pub(super) enum KeyslotCommand {
    /// Add a keyslot wrapping the data key under another key or a (recovery) passphrase.
    Add(KeyslotAddArgs),
    /// Remove keyslot SLOT (never the last; unlocks through a keyslot that remains).
    Remove {
        /// The volume file.
        file: PathBuf,
        /// The keyslot number (see `cryptvol info`).
        slot: usize,
        /// Print the volume's header afterwards as JSON (as `cryptvol info --json` does).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        unlock: UnlockArgs,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
}

/// `cryptvol keyslot add`.
#[derive(Args)]
#[command(group(ArgGroup::new("new").required(true).args(["key", "passphrase_file", "passphrase_fd", "passphrase"])))]
pub(super) struct KeyslotAddArgs {
    /// The volume file.
    file: PathBuf,
    /// Master key of the new keyslot (local id or alias, exec:NAME[:KEY], an AWS KMS key).
    #[arg(long, visible_alias = "kms-key-id", value_name = "KEY")]
    key: Option<String>,
    /// Passphrase of the new keyslot, read from FILE.
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// Passphrase of the new keyslot, read from descriptor N.
    #[arg(long, value_name = "N")]
    passphrase_fd: Option<i32>,
    /// Passphrase of the new keyslot, typed on the terminal (asked twice).
    #[arg(long)]
    passphrase: bool,
    /// Print the volume's header afterwards as JSON (as `cryptvol info --json` does).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    unlock: UnlockArgs,
    #[command(flatten)]
    keystore: KeystoreArgs,
    #[command(flatten)]
    kdf: KdfArgs,
}

/// `cryptvol rekey`: rewrap the data key of one keyslot under another key.
pub(super) async fn rekey(a: RekeyArgs) -> Result<()> {
    let keys = unlock_options(&a.keystore, &a.unlock, a.kdf.params());
    let to_pass = passphrase_source(&a.to_passphrase_file, a.to_passphrase_fd, a.to_passphrase);
    let target = key_or_passphrase(a.to_key.as_deref(), &to_pass)?.ok_or_else(|| {
        anyhow::anyhow!("say which key to rewrap under: --to-key KEY or --to-passphrase-file FILE")
    })?;
    let change = ops::rekey(&a.file, &keys, target, a.slot)
        .await
        .with_context(|| format!("cannot rekey {}", a.file.display()))?;
    report("rekeyed", &a.file, &change, a.json)
}

/// `cryptvol keyslot add|remove`.
pub(super) async fn keyslot(k: KeyslotCommand) -> Result<()> {
    match k {
        KeyslotCommand::Add(a) => keyslot_add(a).await,
        KeyslotCommand::Remove {
            file,
            slot,
            json,
            unlock,
            keystore,
        } => {
            let keys = unlock_options(&keystore, &unlock, Argon2Params::default());
            let change = ops::keyslot_remove(&file, &keys, slot)
                .await
                .with_context(|| format!("cannot remove keyslot {slot} of {}", file.display()))?;
            report("removed keyslot from", &file, &change, json)
        }
    }
}

/// `cryptvol keyslot add`.
async fn keyslot_add(a: KeyslotAddArgs) -> Result<()> {
    let keys = unlock_options(&a.keystore, &a.unlock, a.kdf.params());
    let new_pass = passphrase_source(&a.passphrase_file, a.passphrase_fd, a.passphrase);
    let target = key_or_passphrase(a.key.as_deref(), &new_pass)?.ok_or_else(|| {
        anyhow::anyhow!("say what the new keyslot uses: --key KEY or --passphrase-file FILE")
    })?;
    let change = ops::keyslot_add(&a.file, &keys, target)
        .await
        .with_context(|| format!("cannot add a keyslot to {}", a.file.display()))?;
    report("added keyslot to", &a.file, &change, a.json)
}

/// The key options of a command that changes keyslots: unlock with the `--unlock-*`
/// passphrase if given, make passphrase keyslots with `kdf`.
fn unlock_options(keystore: &KeystoreArgs, unlock: &UnlockArgs, kdf: Argon2Params) -> KeyOptions {
    let mut keys = key_options(keystore, None, kdf);
    keys.passphrase = unlock.source();
    keys
}

/// The target of a new keyslot: `key` if given, else the passphrase, else `None`.
fn key_or_passphrase<'a>(
    key: Option<&str>,
    pass: &'a Option<PassphraseSource>,
) -> Result<Option<NewKey<'a>>> {
    Ok(match (key, pass) {
        (Some(k), _) => Some(NewKey::Key(super::defaults::key_ref(k)?)),
        (None, Some(source)) => Some(NewKey::Passphrase(source)),
        (None, None) => None,
    })
}

/// The volume's header as JSON with `json`, else [`print_change`].
fn report(what: &str, file: &Path, c: &KeyslotChange, json: bool) -> Result<()> {
    if json {
        return print_json(&ops::info(file)?);
    }
    print_change(what, file, c);
    Ok(())
}

/// `rekeyed FILE: keyslot N is …`, then `keyslots now: …`.
fn print_change(what: &str, file: &Path, c: &KeyslotChange) {
    let now = c
        .header
        .keyslots
        .get(c.slot)
        .map(slot_label)
        .unwrap_or_else(|| "(removed)".into());
    let was = c
        .old
        .as_ref()
        .map(|o| format!(" (was {})", slot_label(o)))
        .unwrap_or_default();
    if c.old.is_some() && what.starts_with("removed") {
        println!("{what} {}: keyslot {}{was}", file.display(), c.slot);
    } else {
        println!(
            "{what} {}: keyslot {} is {now}{was}",
            file.display(),
            c.slot
        );
    }
    println!("keyslots now: {}", keyslot_list(&c.header.keyslots));
}
