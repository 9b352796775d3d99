//! Argument groups shared by several commands, each defined once and used with
//! `#[command(flatten)]`: the keystore, unlocking and new-passphrase options, the Argon2
//! parameters of new passphrase keyslots, the snapshot store and the daemon's control
//! socket; plus the value parsers and the [`KeyOptions`] they turn into.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::defaults;
use crate::config;
use crate::keys::{Argon2Params, PassphraseSource};
use crate::ops::{KeyOptions, NewKey};
use crate::server::control as ctl;
use crate::size::parse_size;

/// Where the local keystore and its audit log are (every command that uses keys).
#[derive(Args, Clone)]
pub(super) struct KeystoreArgs {
    /// Local keystore directory [default: $CRYPTVOL_KEYSTORE, else /var/lib/cryptvol/keys
    /// for root, else $XDG_DATA_HOME/cryptvol/keys]
    #[arg(long, value_name = "DIR")]
    pub(super) keystore: Option<PathBuf>,
    /// Append key audit records to PATH [default: audit.jsonl in the keystore directory].
    #[arg(long, value_name = "PATH")]
    pub(super) audit_log: Option<PathBuf>,
}

/// How to unlock a volume whose keyslots include a passphrase (rekey, keyslot).
#[derive(Args, Clone)]
pub(super) struct UnlockArgs {
    /// Unlock through a passphrase keyslot, reading the passphrase from FILE.
    #[arg(long, value_name = "FILE", group = "unlock")]
    unlock_passphrase_file: Option<PathBuf>,
    /// Unlock through a passphrase keyslot, reading the passphrase from descriptor N.
    #[arg(long, value_name = "N", group = "unlock")]
    unlock_passphrase_fd: Option<i32>,
    /// Unlock through a passphrase keyslot, prompting on the terminal.
    #[arg(long, group = "unlock")]
    unlock_passphrase: bool,
}

impl UnlockArgs {
    pub(super) fn source(&self) -> Option<PassphraseSource> {
        passphrase_source(
            &self.unlock_passphrase_file,
            self.unlock_passphrase_fd,
            self.unlock_passphrase,
        )
    }
}

/// The passphrase source named by a FILE / descriptor / prompt option triple, if any.
pub(super) fn passphrase_source(
    file: &Option<PathBuf>,
    fd: Option<i32>,
    prompt: bool,
) -> Option<PassphraseSource> {
    if let Some(f) = file {
        Some(PassphraseSource::File(f.clone()))
    } else if let Some(fd) = fd {
        // The descriptor was opened by our caller without close-on-exec: mark it now, so
        // that no program we start (an exec key backend) inherits the passphrase source.
        // A descriptor that is not open is reported when it is read.
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        Some(PassphraseSource::Fd(fd))
    } else if prompt {
        Some(PassphraseSource::Prompt)
    } else {
        None
    }
}

/// A passphrase to unlock with or wrap under (create, import, export, serve, snapshots).
#[derive(Args, Clone)]
pub(super) struct PassphraseArgs {
    /// Read the passphrase from FILE (one trailing newline is ignored).
    #[arg(long, value_name = "FILE", group = "pass")]
    passphrase_file: Option<PathBuf>,
    /// Read the passphrase from file descriptor N until end of file.
    #[arg(long, value_name = "N", group = "pass")]
    passphrase_fd: Option<i32>,
    /// Prompt for the passphrase on the terminal.
    #[arg(long, group = "pass")]
    passphrase: bool,
    /// The most Argon2 memory (KiB) a passphrase keyslot may ask for on this host (it may
    /// use at most 16 passes of it), checked before any work since keyslots are not
    /// authenticated before they are opened [default: 1048576, 1 GiB].
    #[arg(long, value_name = "KIB", env = crate::keys::ARGON2_MAX_MEMORY_ENV,
          value_parser = clap::value_parser!(u32).range(8..=i64::from(crate::keys::ARGON2_MAX_MEMORY_KIB)))]
    max_argon2_memory: Option<u32>,
}

impl PassphraseArgs {
    /// The passphrase source; also installs `--max-argon2-memory` as this process's
    /// Argon2 limit.
    pub(super) fn source(&self) -> Option<PassphraseSource> {
        if let Some(kib) = self.max_argon2_memory {
            crate::keys::set_host_max_memory_kib(kib);
        }
        passphrase_source(&self.passphrase_file, self.passphrase_fd, self.passphrase)
    }
}

/// The Argon2id parameters of a new passphrase keyslot.
#[derive(Args, Clone)]
pub(super) struct KdfArgs {
    /// Argon2id memory cost in KiB for a new passphrase keyslot.
    #[arg(long, value_name = "KIB", default_value_t = Argon2Params::default().memory_kib)]
    pbkdf_memory: u32,
    /// Argon2id iterations for a new passphrase keyslot.
    #[arg(long, value_name = "N", default_value_t = Argon2Params::default().time)]
    pbkdf_time: u32,
    /// Argon2id lanes for a new passphrase keyslot.
    #[arg(long, value_name = "N", default_value_t = Argon2Params::default().lanes)]
    pbkdf_parallel: u32,
}

impl KdfArgs {
    pub(super) fn params(&self) -> Argon2Params {
        Argon2Params {
            memory_kib: self.pbkdf_memory,
            time: self.pbkdf_time,
            lanes: self.pbkdf_parallel,
        }
    }
}

/// The snapshot store a snapshot command works on.
#[derive(Args, Clone)]
pub(super) struct StoreArg {
    /// Snapshot store: file:///DIR, DIR, or s3://BUCKET/PREFIX [default: see below].
    #[arg(long, value_name = "STORE", env = "CRYPTVOL_SNAPSHOT_STORE")]
    pub(super) store: Option<String>,
}

impl StoreArg {
    /// The store given (or in `$CRYPTVOL_SNAPSHOT_STORE`), else the config file's, else
    /// the default one.
    pub(super) fn spec(&self) -> String {
        defaults::snapshot_store(self.store.clone()).unwrap_or_else(crate::snapshot::default_store)
    }

    /// Opens the store in effect ([`StoreArg::spec`]; `create`: make a directory store).
    pub(super) fn open(&self, create: bool) -> Result<crate::snapshot::Store> {
        Ok(crate::snapshot::Store::open(&self.spec(), create)?)
    }
}

/// Who may open an export besides the daemon's own user: `serve` (the exports of VOLUME
/// arguments) and `exports add` (the export added) take the same flags.
#[derive(Args, Clone, Default)]
pub(super) struct AllowArgs {
    /// Let Unix-socket clients running as USER (name or uid) open the export(s) named on the command line, besides
    /// the daemon's own user (repeatable; root is not implied).
    #[arg(long = "allow-uid", value_name = "USER")]
    pub(super) uid: Vec<String>,
    /// Let Unix-socket clients whose primary group (from SO_PEERCRED; supplementary groups
    /// are not visible) is GROUP (name or gid) open the export(s) named on the command line (repeatable).
    #[arg(long = "allow-gid", value_name = "GROUP")]
    pub(super) gid: Vec<String>,
    /// Let TLS clients whose verified certificate has exactly this subject (e.g.
    /// "CN=client1,O=Example") open the export(s) (repeatable). Without any --allow-tls-*,
    /// every certificate the client CA verifies is allowed.
    #[arg(long = "allow-tls-subject", value_name = "SUBJECT")]
    pub(super) tls_subject: Vec<String>,
    /// Let TLS clients whose verified certificate has exactly this subject alternative
    /// name (DNS:NAME, EMAIL:ADDR, IP:ADDR or URI:URI) open the export(s) (repeatable).
    #[arg(long = "allow-tls-san", value_name = "SAN")]
    pub(super) tls_san: Vec<String>,
    /// Let every client that can connect open the export(s), with no identity check.
    /// Plaintext TCP clients have no identity and are refused without it.
    #[arg(long = "allow-anyone")]
    pub(super) anyone: bool,
}

/// The control socket of a running daemon.
#[derive(Args, Clone)]
pub(super) struct ControlArg {
    /// The daemon's control socket [default: /run/cryptvol/control.sock].
    #[arg(long, value_name = "PATH")]
    pub(super) control: Option<PathBuf>,
}

impl ControlArg {
    /// The socket given, or the default one.
    pub(super) fn path(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| PathBuf::from(ctl::DEFAULT_CONTROL_PATH))
    }
}

/// clap value parser for sizes such as 512M or 10G.
pub(super) fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// clap value parser for `--sector-size`: 4096 or 512.
pub(super) fn parse_sector_size(s: &str) -> Result<u32, String> {
    s.parse::<crate::crypto::SectorSize>()
        .map(crate::crypto::SectorSize::get)
        .map_err(|e| e.to_string())
}

/// clap value parser for an octal socket mode.
pub(super) fn parse_mode(s: &str) -> Result<u32, String> {
    config::parse_mode(s)
}

/// The options of a command that wraps a new data key (`create`, `import`, `snapshot
/// copy`): the keystore, a passphrase instead of a master key, and the Argon2 parameters
/// of the new passphrase keyslot.
#[derive(Args, Clone)]
pub(super) struct WrappingArgs {
    #[command(flatten)]
    pub(super) keystore: KeystoreArgs,
    #[command(flatten)]
    pub(super) pass: PassphraseArgs,
    #[command(flatten)]
    pub(super) kdf: KdfArgs,
}

impl WrappingArgs {
    /// The key options these arguments give.
    pub(super) fn options(&self) -> KeyOptions {
        key_options(&self.keystore, Some(&self.pass), self.kdf.params())
    }
}

/// The key options of a command: its keystore, passphrase (if it takes one) and the
/// Argon2 parameters for a new passphrase keyslot.
pub(super) fn key_options(
    keystore: &KeystoreArgs,
    pass: Option<&PassphraseArgs>,
    kdf: Argon2Params,
) -> KeyOptions {
    KeyOptions {
        keystore: defaults::keystore(keystore.keystore.clone()),
        passphrase: pass.and_then(PassphraseArgs::source),
        argon2: kdf,
        audit_log: defaults::audit_log(keystore.audit_log.clone()),
    }
}

/// The key a new volume's data key is wrapped under, from `--key` and the passphrase
/// options (`create`, `import`), else the config file's `default_key`, else the default
/// key.
pub(super) fn new_volume_key<'a>(key: Option<&str>, keys: &'a KeyOptions) -> Result<NewKey<'a>> {
    Ok(match (&keys.passphrase, key.or(defaults::default_key())) {
        (Some(source), _) => NewKey::Passphrase(source),
        (None, Some(k)) => NewKey::Key(defaults::key_ref(k)?),
        (None, None) => NewKey::Default,
    })
}

/// The key a restored or re-encrypted copy is wrapped under: the passphrase given, else
/// `--key`, else `None` (the source's own key).
pub(super) fn optional_new_key<'a>(
    key: Option<&str>,
    keys: &'a KeyOptions,
) -> Result<Option<NewKey<'a>>> {
    Ok(match (&keys.passphrase, key) {
        (Some(source), _) => Some(NewKey::Passphrase(source)),
        (None, Some(k)) => Some(NewKey::Key(defaults::key_ref(k)?)),
        (None, None) => None,
    })
}
