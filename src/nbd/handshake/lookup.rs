//! Export lookup through the client's view of the catalog: the default export,
//! unknown and refused names, and the messages that list what is available.

use std::fmt::Write as _;

use super::encode::truncate_utf8;
use super::outcome::Refusal;
use super::{ECHOED_NAME_LEN, MAX_HUMAN_STRING};
use crate::nbd::{ExportCatalog, ExportInfo, LookupError};

/// Why [`resolve_export`] found no export to open.
pub(super) enum Unresolved {
    /// No such export (or no default export): a message for the client.
    Unknown(String),
    /// The export exists but the catalog refuses this client.
    Denied(Refusal),
}

/// What a refused client is told: that policy refuses it, nothing about the export or
/// about what would be allowed.
pub(super) fn denied_message(export: &str) -> String {
    let shown = truncate_utf8(export, ECHOED_NAME_LEN);
    format!(
        "access to export {shown:?} is not permitted for this client by the server's \
         policy; the refusal was logged on the server"
    )
}

/// Finds the export a client asked for; `""` is the default export, which exists only when
/// the server has exactly one export ([`ExportCatalog::default_export`]).
pub(super) fn resolve_export(
    name: &str,
    catalog: &dyn ExportCatalog,
) -> Result<ExportInfo, Unresolved> {
    let resolved = if name.is_empty() {
        match catalog.default_export() {
            Some(only) => only,
            None => {
                let visible = catalog.list();
                let mut msg = format!(
                    "no export name given and there is no default export ({} exports); \
                     choose one by name (e.g. nbd-client -N NAME)",
                    visible.len()
                );
                append_available(&mut msg, &visible);
                return Err(Unresolved::Unknown(msg));
            }
        }
    } else {
        name.to_owned()
    };
    match catalog.lookup(&resolved) {
        Ok(export) => Ok(export),
        Err(LookupError::Denied(reason)) => Err(Unresolved::Denied(Refusal {
            export: resolved,
            reason,
        })),
        Err(LookupError::Unknown) => {
            let shown = truncate_utf8(&resolved, ECHOED_NAME_LEN);
            let mut msg = format!("unknown export {shown:?}");
            append_available(&mut msg, &catalog.list());
            Err(Unresolved::Unknown(msg))
        }
    }
}

/// Appends `"; available: a, b"` (or a note that there are none), stopping once the
/// message is longer than any reply will carry.
pub(super) fn append_available(msg: &mut String, exports: &[ExportInfo]) {
    if exports.is_empty() {
        msg.push_str("; this server has no exports");
        return;
    }
    msg.push_str("; available: ");
    for (i, export) in exports.iter().enumerate() {
        if msg.len() > MAX_HUMAN_STRING {
            break;
        }
        if i > 0 {
            msg.push_str(", ");
        }
        let _ = write!(msg, "{}", truncate_utf8(&export.name, ECHOED_NAME_LEN));
    }
}
