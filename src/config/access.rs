//! Who may open an export: the access policy of an `[[export]]` table or of the
//! `--allow-*` flags, with user and group names resolved once, at start-up.

use super::file::ExportSection;
use super::overrides::AllowFlags;
use crate::server::AccessPolicy;

/// The access policy of an `[[export]]` table.
pub(super) fn file_policy(e: &ExportSection) -> Result<AccessPolicy, String> {
    let ids = |values: &[toml::Value], key: &str, kind: IdKind| {
        values
            .iter()
            .map(|v| match v {
                toml::Value::Integer(i) => u32::try_from(*i)
                    .map_err(|_| format!("{key}: {i} is not a valid {}", kind.id_name())),
                toml::Value::String(s) => resolve_id(s, kind).map_err(|m| format!("{key}: {m}")),
                other => Err(format!(
                    "{key}: expected {} names or numbers, not {}",
                    kind.noun(),
                    other.type_str()
                )),
            })
            .collect::<Result<Vec<u32>, String>>()
    };
    let policy = AccessPolicy {
        allow_uid: ids(&e.allow_uid, "allow_uid", IdKind::User)?,
        allow_gid: ids(&e.allow_gid, "allow_gid", IdKind::Group)?,
        allow_tls_subject: e.allow_tls_subject.clone(),
        allow_tls_san: e.allow_tls_san.clone(),
        allow_anyone: e.allow_anyone,
    };
    check_tls_lists(&policy, "allow_tls_subject", "allow_tls_san")?;
    Ok(policy)
}

/// The access policy the `--allow-*` flags give.
pub(super) fn cli_policy(a: &AllowFlags) -> Result<AccessPolicy, String> {
    let ids = |values: &[String], flag: &str, kind: IdKind| {
        values
            .iter()
            .map(|s| resolve_id(s, kind).map_err(|m| format!("{flag}: {m}")))
            .collect::<Result<Vec<u32>, String>>()
    };
    let policy = AccessPolicy {
        allow_uid: ids(&a.uid, "--allow-uid", IdKind::User)?,
        allow_gid: ids(&a.gid, "--allow-gid", IdKind::Group)?,
        allow_tls_subject: a.tls_subject.clone(),
        allow_tls_san: a.tls_san.clone(),
        allow_anyone: a.anyone,
    };
    check_tls_lists(&policy, "--allow-tls-subject", "--allow-tls-san")?;
    Ok(policy)
}

/// SAN kinds a client certificate's names are written with.
const SAN_PREFIXES: [&str; 4] = ["DNS:", "EMAIL:", "IP:", "URI:"];

/// Subjects must be non-empty; SANs must name their kind, or they could never match.
fn check_tls_lists(p: &AccessPolicy, subject_key: &str, san_key: &str) -> Result<(), String> {
    if p.allow_tls_subject.iter().any(|s| s.trim().is_empty()) {
        return Err(format!(
            "{subject_key}: an empty subject; write it like \"CN=client1,O=Example\""
        ));
    }
    for san in &p.allow_tls_san {
        let ok = SAN_PREFIXES
            .iter()
            .any(|pre| san.len() > pre.len() && san.starts_with(pre));
        if !ok {
            return Err(format!(
                "{san_key}: {san:?} does not start with one of {}; write e.g. \
                 \"DNS:client.example.org\" or \"IP:192.0.2.7\"",
                SAN_PREFIXES.join(" ")
            ));
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum IdKind {
    User,
    Group,
}

impl IdKind {
    fn noun(self) -> &'static str {
        match self {
            IdKind::User => "user",
            IdKind::Group => "group",
        }
    }
    fn id_name(self) -> &'static str {
        match self {
            IdKind::User => "uid",
            IdKind::Group => "gid",
        }
    }
}

/// A user or group given by number or by name (looked up in the user database now).
fn resolve_id(s: &str, kind: IdKind) -> Result<u32, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u32>()
            .map_err(|_| format!("{s} is not a valid {}", kind.id_name()));
    }
    let found = match kind {
        IdKind::User => nix::unistd::User::from_name(s).map(|u| u.map(|u| u.uid.as_raw())),
        IdKind::Group => nix::unistd::Group::from_name(s).map(|g| g.map(|g| g.gid.as_raw())),
    };
    match found {
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err(format!(
            "no {} named {:?} on this host; give a name or a numeric {}",
            kind.noun(),
            s,
            kind.id_name()
        )),
        Err(e) => Err(format!("cannot look up the {} {s:?}: {e}", kind.noun())),
    }
}
