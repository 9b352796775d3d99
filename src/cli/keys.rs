//! `cryptvol key …`: the local keystore's master keys (create, list, describe, aliases,
//! states, rotation, grants), the default key and the exec backends.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use clap::{ArgGroup, Args, Subcommand};

use super::args::{key_options, KeystoreArgs};
use super::print::print_json;
use crate::keys::{
    Argon2Params, ExecSpec, KeyError, KeyInfo, KeyRef, KeyState, LocalKeystore, Permission,
    Principal,
};
use crate::ops::{self, KeyOptions};

/// `cryptvol key`.
#[derive(Subcommand)]
pub(super) enum KeyCommand {
    /// Create a new master key in the local keystore (you may do everything with it).
    Create {
        /// An alias for the key, written alias/NAME.
        #[arg(long, value_name = "alias/NAME")]
        alias: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// List the master keys of the local keystore (never key material).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Show a local key: state, aliases, material versions, policy.
    Describe {
        /// Key id or alias/NAME.
        key: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Add, retarget or remove aliases of local keys.
    #[command(subcommand)]
    Alias(AliasCommand),
    /// Enable a disabled key.
    Enable(KeyArg),
    /// Disable a key: volumes using it can no longer be attached (attached ones keep working).
    Disable(KeyArg),
    /// Schedule the destruction of a key after a waiting period; until then it is unusable.
    ScheduleDeletion {
        /// Key id or alias/NAME.
        key: String,
        /// Waiting period in days (7 to 30).
        #[arg(long, default_value_t = crate::keys::MAX_DELETION_DAYS)]
        days: u32,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Cancel a scheduled deletion; the key is left disabled (enable it to use it).
    CancelDeletion(KeyArg),
    /// Give a key new material: new wraps use it, existing keyslots still unwrap.
    Rotate(KeyArg),
    /// Destroy the keys whose deletion waiting period has passed (serve does this at start).
    Purge {
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Allow a Unix user to use a key for some operations.
    Grant(GrantArgs),
    /// Withdraw operations from a Unix user on a key.
    Revoke(GrantArgs),
    /// Set the key used when `create` is given none (any backend), or --reset to the local
    /// default key.
    #[command(group(ArgGroup::new("what").required(true).args(["key", "reset"])))]
    SetDefault {
        /// Key reference (local id or alias, exec:NAME[:KEY]).
        key: Option<String>,
        /// Go back to the local default key (alias/cryptvol/default).
        #[arg(long)]
        reset: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Show the key used when `create` is given none, and where that choice comes from.
    GetDefault {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Register external programs as key backends (exec:NAME).
    #[command(subcommand)]
    Exec(ExecCommand),
}

/// A local key and its keystore.
#[derive(Args)]
pub(super) struct KeyArg {
    /// Key id or alias/NAME.
    key: String,
    #[command(flatten)]
    keystore: KeystoreArgs,
}

/// `key grant` and `key revoke`.
#[derive(Args)]
pub(super) struct GrantArgs {
    /// Key id or alias/NAME.
    key: String,
    /// Unix user name or uid.
    #[arg(long, value_name = "USER")]
    principal: String,
    /// Comma-separated: generate (or wrap), unwrap, rewrap, administer, all.
    #[arg(long, value_name = "LIST")]
    operations: String,
    #[command(flatten)]
    keystore: KeystoreArgs,
}

/// `cryptvol key alias`.
#[derive(Subcommand)]
pub(super) enum AliasCommand {
    /// Create alias/NAME pointing at a key.
    Add {
        alias: String,
        /// Key id or alias/NAME.
        key: String,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Point an existing alias at another key (existing volumes keep their key).
    Retarget {
        alias: String,
        /// Key id or alias/NAME.
        key: String,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Remove an alias (the key stays).
    Remove {
        alias: String,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
}

/// `cryptvol key exec`.
#[derive(Subcommand)]
pub(super) enum ExecCommand {
    /// Register PROGRAM (absolute path) as exec backend NAME (replaces an existing one).
    Add {
        /// Backend name, used in key references as exec:NAME[:KEY].
        name: String,
        /// Seconds the program may take per operation.
        #[arg(long, value_name = "SECS", default_value_t = 10)]
        timeout: u64,
        /// Pass environment variable NAME on to the program (repeatable). It otherwise
        /// gets only PATH, LANG, LC_ALL, LC_CTYPE, TZ and CRYPTVOL_EXEC_PROTOCOL.
        #[arg(long = "env", value_name = "NAME")]
        env: Vec<String>,
        /// The program and its fixed arguments, after `--`.
        #[arg(last = true, required = true, value_name = "PROGRAM [ARGS]")]
        command: Vec<String>,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// Unregister exec backend NAME.
    Remove {
        name: String,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
    /// List registered exec backends.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
}

/// `cryptvol key …`: one function per subcommand.
pub(super) fn key(k: KeyCommand) -> Result<()> {
    match k {
        KeyCommand::Create {
            alias,
            json,
            keystore,
        } => create(alias.as_deref(), json, &keystore),
        KeyCommand::List { json, keystore } => list(json, &keystore),
        KeyCommand::Describe {
            key,
            json,
            keystore,
        } => describe(&key, json, &keystore),
        KeyCommand::Alias(a) => alias(a),
        KeyCommand::Enable(a) => enable(&a),
        KeyCommand::Disable(a) => disable(&a),
        KeyCommand::ScheduleDeletion {
            key,
            days,
            keystore,
        } => schedule_deletion(&key, days, &keystore),
        KeyCommand::CancelDeletion(a) => cancel_deletion(&a),
        KeyCommand::Rotate(a) => rotate(&a),
        KeyCommand::Purge { keystore } => purge(&keystore),
        KeyCommand::Grant(g) => grant(&g),
        KeyCommand::Revoke(g) => revoke(&g),
        KeyCommand::SetDefault {
            key,
            reset,
            keystore,
        } => set_default(key.as_deref(), reset, &keystore),
        KeyCommand::GetDefault { json, keystore } => get_default(json, &keystore),
        KeyCommand::Exec(e) => exec(e),
    }
}

/// The key options of a `key` subcommand (no passphrase, default Argon2 parameters).
fn opts(keystore: &KeystoreArgs) -> KeyOptions {
    key_options(keystore, None, Argon2Params::default())
}

/// `key create`.
fn create(alias: Option<&str>, json: bool, keystore: &KeystoreArgs) -> Result<()> {
    let ks = opts(keystore).local(true)?;
    let info = ks.create_key(alias)?;
    if json {
        return print_json(&info);
    }
    println!(
        "created master key {}{} in {}",
        info.key_id,
        aliases_suffix(&info),
        ks.dir().display()
    );
    Ok(())
}

/// `key list`.
fn list(json: bool, keystore: &KeystoreArgs) -> Result<()> {
    let ks = opts(keystore).local(false)?;
    let list = ks.list_keys()?;
    if json {
        return print_json(&list);
    }
    if list.is_empty() {
        println!("no master keys in {}", ks.dir().display());
        return Ok(());
    }
    println!("{:<36} {:<16} {:<21} ALIASES", "KEY ID", "STATE", "CREATED");
    for k in &list {
        let mut aliases = k.aliases.join(",");
        if k.default {
            aliases.push_str(" (local default)");
        }
        println!(
            "{:<36} {:<16} {:<21} {}",
            k.key_id,
            state_label(&k.state),
            k.created_at,
            aliases
        );
    }
    Ok(())
}

/// `key describe`.
fn describe(key: &str, json: bool, keystore: &KeystoreArgs) -> Result<()> {
    let d = local_admin(keystore, key)?.describe(key)?;
    if json {
        return print_json(&d);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "key id:     {}", d.key_id)?;
    writeln!(out, "state:      {}", state_label(&d.state))?;
    if let Some(date) = &d.deletion_date {
        writeln!(out, "deletion:   {date} (the material is destroyed then)")?;
    }
    writeln!(out, "aliases:    {}", d.aliases.join(", "))?;
    writeln!(out, "created:    {} by {}", d.created_at, d.creator)?;
    writeln!(
        out,
        "material:   version {} (of {}; older versions still unwrap)",
        d.current_material_version,
        d.material_versions.len()
    )?;
    writeln!(out, "policy:     (root may always do everything)")?;
    for (op, who) in &d.policy {
        writeln!(out, "  {op:<11} {}", who.join(", "))?;
    }
    Ok(())
}

/// `key alias add|retarget|remove`.
fn alias(a: AliasCommand) -> Result<()> {
    match a {
        AliasCommand::Add {
            alias,
            key,
            keystore,
        } => {
            let id = local_admin(&keystore, &key)?.alias_add(&alias, &key)?;
            println!("alias {alias} now names key {id}");
        }
        AliasCommand::Retarget {
            alias,
            key,
            keystore,
        } => {
            let id = local_admin(&keystore, &key)?.alias_retarget(&alias, &key)?;
            println!("alias {alias} now names key {id} (existing volumes keep the key they were wrapped with)");
        }
        AliasCommand::Remove { alias, keystore } => {
            let id = opts(&keystore).local(false)?.alias_remove(&alias)?;
            println!("removed alias {alias} (it named key {id})");
        }
    }
    Ok(())
}

/// `key enable`.
fn enable(a: &KeyArg) -> Result<()> {
    let id = local_admin(&a.keystore, &a.key)?.enable(&a.key)?;
    println!("key {id} is enabled");
    Ok(())
}

/// `key disable`.
fn disable(a: &KeyArg) -> Result<()> {
    let id = local_admin(&a.keystore, &a.key)?.disable(&a.key)?;
    println!(
        "key {id} is disabled: volumes wrapped by it cannot be attached until it is \
            enabled again (volumes already being served keep working)"
    );
    Ok(())
}

/// `key schedule-deletion`.
fn schedule_deletion(key: &str, days: u32, keystore: &KeystoreArgs) -> Result<()> {
    let date = local_admin(keystore, key)?.schedule_deletion(key, days)?;
    println!(
        "key {key} is pending deletion: its material is destroyed after {date} (by \
            `cryptvol key purge` or the next `cryptvol serve` start); until then \
            `cryptvol key cancel-deletion {key}` keeps it. Volumes wrapped only by this key \
            become unreadable: rekey them first (cryptvol rekey FILE --to-key KEY)."
    );
    Ok(())
}

/// `key cancel-deletion`.
fn cancel_deletion(a: &KeyArg) -> Result<()> {
    let id = local_admin(&a.keystore, &a.key)?.cancel_deletion(&a.key)?;
    println!(
        "deletion of key {id} cancelled; the key is disabled: `cryptvol key enable {id}` to use it"
    );
    Ok(())
}

/// `key rotate`.
fn rotate(a: &KeyArg) -> Result<()> {
    let v = local_admin(&a.keystore, &a.key)?.rotate(&a.key)?;
    println!(
        "key {} has new material (version {v}); new wraps use it, existing keyslots still unwrap",
        a.key
    );
    Ok(())
}

/// `key purge`.
fn purge(keystore: &KeystoreArgs) -> Result<()> {
    let deleted = ops::purge_expired_keys(&opts(keystore))?;
    if deleted.is_empty() {
        println!("no key is due for deletion");
    }
    for id in deleted {
        println!("destroyed key {id}");
    }
    Ok(())
}

/// `key grant`.
fn grant(g: &GrantArgs) -> Result<()> {
    let (ks, who, perms) = grant_parts(g)?;
    let id = ks.grant(&g.key, &who, &perms)?;
    println!("{who} may now use key {id} for {}", perm_list(&perms));
    Ok(())
}

/// `key revoke`.
fn revoke(g: &GrantArgs) -> Result<()> {
    let (ks, who, perms) = grant_parts(g)?;
    let id = ks.revoke(&g.key, &who, &perms)?;
    println!("{who} may no longer use key {id} for {}", perm_list(&perms));
    Ok(())
}

/// `key set-default KEY|--reset`.
fn set_default(key: Option<&str>, reset: bool, keystore: &KeystoreArgs) -> Result<()> {
    let svc = opts(keystore).service();
    let reference = match (key, reset) {
        (Some(k), false) => Some(super::defaults::key_ref(k)?),
        _ => None,
    };
    svc.set_default_key(reference.as_ref())?;
    match reference {
        Some(r) => println!("new volumes are wrapped by {r} unless --key is given"),
        None => println!(
            "new volumes are wrapped by the local default key ({}) unless --key is given",
            crate::keys::DEFAULT_KEY_ALIAS
        ),
    }
    Ok(())
}

/// `key get-default`'s record.
#[derive(serde::Serialize)]
struct DefaultKeyView {
    /// The key reference.
    key: String,
    /// Its backend kind.
    backend: &'static str,
    /// "config" (`[keys] default_key`), "keystore" (`key set-default`) or "built-in".
    source: &'static str,
}

/// `key get-default`: the config file's `default_key`, else the keystore's, else the
/// local default key.
fn get_default(json: bool, keystore: &KeystoreArgs) -> Result<()> {
    let view = match super::defaults::default_key() {
        Some(k) => {
            let r = super::defaults::key_ref(k)?;
            DefaultKeyView {
                key: r.to_string(),
                backend: r.backend(),
                source: "config",
            }
        }
        None => match opts(keystore).service().default_key()? {
            KeyRef::Local(None) => DefaultKeyView {
                key: crate::keys::DEFAULT_KEY_ALIAS.to_string(),
                backend: crate::keys::LOCAL,
                source: "built-in",
            },
            r => DefaultKeyView {
                key: r.to_string(),
                backend: r.backend(),
                source: "keystore",
            },
        },
    };
    if json {
        return print_json(&view);
    }
    match view.source {
        "built-in" => println!("{} (the local default key, created on first use)", view.key),
        "config" => println!(
            "{} (default_key in {})",
            view.key,
            super::defaults::config_file()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
        _ => println!("{}", view.key),
    }
    Ok(())
}

/// `key exec add|remove|list`.
fn exec(e: ExecCommand) -> Result<()> {
    match e {
        ExecCommand::Add {
            name,
            timeout,
            env,
            command,
            keystore,
        } => exec_add(&name, timeout, env, &command, &keystore),
        ExecCommand::Remove { name, keystore } => {
            opts(&keystore).local(false)?.exec_remove(&name)?;
            println!("unregistered exec backend {name}");
            Ok(())
        }
        ExecCommand::List { json, keystore } => exec_list(json, &keystore),
    }
}

/// `key exec add`.
fn exec_add(
    name: &str,
    timeout: u64,
    env: Vec<String>,
    command: &[String],
    keystore: &KeystoreArgs,
) -> Result<()> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("give the program after --"))?;
    let spec = ExecSpec {
        program: PathBuf::from(program),
        args: args.to_vec(),
        timeout_secs: timeout,
        env,
    };
    opts(keystore).local(true)?.exec_add(name, spec)?;
    println!("registered exec backend {name}: use it as --key exec:{name}[:KEY]");
    Ok(())
}

/// `key exec list`.
fn exec_list(json: bool, keystore: &KeystoreArgs) -> Result<()> {
    let list = opts(keystore).local(false)?.exec_backends()?;
    if json {
        return print_json(&list);
    }
    if list.is_empty() {
        println!("no exec backends registered");
    }
    for (name, spec) in &list {
        let env = if spec.env.is_empty() {
            String::new()
        } else {
            format!(", environment {}", spec.env.join(" "))
        };
        println!(
            "{name}: {} {} (timeout {} s{env})",
            spec.program.display(),
            spec.args.join(" "),
            spec.timeout_secs
        );
    }
    Ok(())
}

/// The state as `key list` and `key describe` show it.
fn state_label(s: &KeyState) -> &'static str {
    match s {
        KeyState::Enabled => "Enabled",
        KeyState::Disabled => "Disabled",
        KeyState::PendingDeletion => "PendingDeletion",
    }
}

/// Opens the keystore for an administrative command on a local key reference.
fn local_admin(keystore: &KeystoreArgs, key: &str) -> Result<LocalKeystore> {
    match KeyRef::parse(key)? {
        KeyRef::Local(_) => {}
        other => {
            return Err(KeyError::Unsupported(format!(
                "`cryptvol key` manages local keys; {other} belongs to the {} backend, which \
                 manages its keys itself",
                other.backend()
            ))
            .into())
        }
    }
    Ok(opts(keystore).local(false)?)
}

/// The keystore, principal and operations of `key grant`/`key revoke`.
fn grant_parts(g: &GrantArgs) -> Result<(LocalKeystore, Principal, Vec<Permission>)> {
    let ks = local_admin(&g.keystore, &g.key)?;
    let who = Principal::parse(&g.principal)?;
    let perms = Permission::parse_list(&g.operations)?;
    Ok((ks, who, perms))
}

/// `generate, unwrap`.
fn perm_list(perms: &[Permission]) -> String {
    perms
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// ` (alias/a, alias/b)`, or nothing.
fn aliases_suffix(k: &KeyInfo) -> String {
    if k.aliases.is_empty() {
        String::new()
    } else {
        format!(" ({})", k.aliases.join(", "))
    }
}
