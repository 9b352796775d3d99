//! The handlers of the options that need no negotiation state: `EXPORT_NAME`,
//! `ABORT`, `LIST`, `LIST_META_CONTEXT`, `INFO`/`GO`, and the block sizes they advertise.

use super::encode::{push_info_string, push_reply, truncate_utf8};
use super::greeting::ClientFlags;
use super::lookup::{resolve_export, Unresolved};
use super::outcome::{Next, OptionOutcome};
use super::parse::{check_name, parse_info_request};
use super::{EXPORT_NAME_PADDING, MAX_HUMAN_STRING, MAX_REPLY_PAYLOAD};
use crate::nbd::consts::*;
use crate::nbd::meta::{meta_context_payload, parse_meta_request, MetaContext, QueryMode};
use crate::nbd::transmission::{transmission_flags, MAX_PAYLOAD};
use crate::nbd::{ExportCatalog, ExportInfo};

/// `NBD_OPT_EXPORT_NAME`: the whole payload is the name. No error reply is possible, so any
/// failure closes the connection without sending anything.
/// A refused export closes the connection the same way, recording the refusal.
pub(super) fn export_name(
    data: &[u8],
    client: ClientFlags,
    catalog: &dyn ExportCatalog,
) -> OptionOutcome {
    let Ok(name) = check_name(data) else {
        return OptionOutcome::close(Vec::new());
    };
    let export = match resolve_export(name, catalog) {
        Ok(export) => export,
        Err(Unresolved::Unknown(_)) => return OptionOutcome::close(Vec::new()),
        Err(Unresolved::Denied(refusal)) => {
            return OptionOutcome {
                refusal: Some(refusal),
                ..OptionOutcome::close(Vec::new())
            }
        }
    };
    let flags = transmission_flags(&export);
    let mut reply = Vec::with_capacity(10 + EXPORT_NAME_PADDING);
    reply.extend_from_slice(&export.size.to_be_bytes());
    reply.extend_from_slice(&flags.to_be_bytes());
    if !client.no_zeroes {
        reply.resize(reply.len() + EXPORT_NAME_PADDING, 0);
    }
    OptionOutcome {
        reply,
        next: Next::Transmit { export, flags },
        refusal: None,
    }
}

/// `NBD_OPT_ABORT`: acknowledge (any data is ignored, as the spec recommends), then close.
pub(super) fn abort(option: u32) -> OptionOutcome {
    let mut reply = Vec::new();
    push_reply(&mut reply, option, REP_ACK, &[]);
    OptionOutcome::close(reply)
}

/// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export, then `NBD_REP_ACK`.
///
/// An export whose name alone would not fit in a reply payload under 4096 bytes is left
/// out (names cannot be truncated); descriptions are truncated to [`MAX_HUMAN_STRING`].
pub(super) fn list(data: &[u8], catalog: &dyn ExportCatalog) -> OptionOutcome {
    if !data.is_empty() {
        let msg = format!(
            "NBD_OPT_LIST takes no data, but {} bytes were sent",
            data.len()
        );
        return OptionOutcome::error(OPT_LIST, REP_ERR_INVALID, &msg);
    }
    let mut reply = Vec::new();
    for export in catalog.list() {
        let name = export.name.as_bytes();
        let Some(room) = MAX_REPLY_PAYLOAD.checked_sub(4 + name.len()) else {
            continue;
        };
        let Ok(name_len) = u32::try_from(name.len()) else {
            continue;
        };
        let desc = truncate_utf8(&export.description, room.min(MAX_HUMAN_STRING));
        let mut payload = Vec::with_capacity(4 + name.len() + desc.len());
        payload.extend_from_slice(&name_len.to_be_bytes());
        payload.extend_from_slice(name);
        payload.extend_from_slice(desc.as_bytes());
        push_reply(&mut reply, OPT_LIST, REP_SERVER, &payload);
    }
    push_reply(&mut reply, OPT_LIST, REP_ACK, &[]);
    OptionOutcome::cont(reply)
}

/// `NBD_OPT_LIST_META_CONTEXT`: one `NBD_REP_META_CONTEXT` (id 0, as the spec asks) per
/// matching context, then `NBD_REP_ACK`. Allowed without structured replies (the spec only
/// says a client SHOULD NOT ask first; answering is harmless).
pub(super) fn list_meta_context(data: &[u8], catalog: &dyn ExportCatalog) -> OptionOutcome {
    const OPT: u32 = OPT_LIST_META_CONTEXT;
    let contexts = match meta_request(OPT, data, QueryMode::List, catalog) {
        Ok((_, contexts)) => contexts,
        Err(outcome) => return *outcome,
    };
    let mut reply = Vec::new();
    for context in contexts {
        push_reply(
            &mut reply,
            OPT,
            REP_META_CONTEXT,
            &meta_context_payload(0, context),
        );
    }
    push_reply(&mut reply, OPT, REP_ACK, &[]);
    OptionOutcome::cont(reply)
}

/// Parses a LIST/SET_META_CONTEXT payload and resolves its export: malformed data or a bad
/// name give `NBD_REP_ERR_INVALID`, an export not served `NBD_REP_ERR_UNKNOWN`, one the
/// client may not open `NBD_REP_ERR_POLICY`.
pub(super) fn meta_request(
    option: u32,
    data: &[u8],
    mode: QueryMode,
    catalog: &dyn ExportCatalog,
) -> Result<(ExportInfo, Vec<MetaContext>), Box<OptionOutcome>> {
    let invalid = |msg: String| {
        let msg = format!("malformed {} request: {msg}", option_name(option));
        Box::new(OptionOutcome::error(option, REP_ERR_INVALID, &msg))
    };
    let request = parse_meta_request(data, mode).map_err(invalid)?;
    let name = check_name(request.export).map_err(invalid)?;
    let export = resolve_export(name, catalog)
        .map_err(|e| Box::new(OptionOutcome::not_resolved(option, e)))?;
    Ok((export, request.contexts))
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`.
///
/// On success: `NBD_INFO_EXPORT`, `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION` when requested
/// (the name is omitted if it would not fit; the description if it is empty),
/// `NBD_INFO_BLOCK_SIZE` always (see [`block_size_info`]), then `NBD_REP_ACK`. `GO` then
/// enters transmission. Malformed data gives `NBD_REP_ERR_INVALID`, an unknown export
/// `NBD_REP_ERR_UNKNOWN`, one the client may not open `NBD_REP_ERR_POLICY` (with nothing
/// about the export itself); negotiation continues in all cases. Block size negotiation is
/// never required (no `NBD_REP_ERR_BLOCK_SIZE_REQD`): nbd-client never asks for it.
pub(super) fn info_or_go(option: u32, data: &[u8], catalog: &dyn ExportCatalog) -> OptionOutcome {
    let request = match parse_info_request(data) {
        Ok(request) => request,
        Err(msg) => {
            let msg = format!("malformed {} request: {msg}", option_name(option));
            return OptionOutcome::error(option, REP_ERR_INVALID, &msg);
        }
    };
    let export = match resolve_export(request.name, catalog) {
        Ok(export) => export,
        Err(e) => return OptionOutcome::not_resolved(option, e),
    };
    let flags = transmission_flags(&export);
    let wants = |info: u16| request.infos.contains(&info);
    let mut reply = Vec::new();

    let mut payload = Vec::with_capacity(12);
    payload.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    payload.extend_from_slice(&export.size.to_be_bytes());
    payload.extend_from_slice(&flags.to_be_bytes());
    push_reply(&mut reply, option, REP_INFO, &payload);

    if wants(INFO_NAME) && 2 + export.name.len() <= MAX_REPLY_PAYLOAD {
        push_info_string(&mut reply, option, INFO_NAME, &export.name);
    }
    if wants(INFO_DESCRIPTION) && !export.description.is_empty() {
        let desc = truncate_utf8(&export.description, MAX_HUMAN_STRING);
        push_info_string(&mut reply, option, INFO_DESCRIPTION, desc);
    }

    let (min, preferred, max) = block_size_info(&export, wants(INFO_BLOCK_SIZE));
    let mut payload = Vec::with_capacity(14);
    payload.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    payload.extend_from_slice(&min.to_be_bytes());
    payload.extend_from_slice(&preferred.to_be_bytes());
    payload.extend_from_slice(&max.to_be_bytes());
    push_reply(&mut reply, option, REP_INFO, &payload);

    push_reply(&mut reply, option, REP_ACK, &[]);
    let next = if option == OPT_GO {
        Next::Transmit { export, flags }
    } else {
        Next::Continue
    };
    OptionOutcome {
        reply,
        next,
        refusal: None,
    }
}

/// The `NBD_INFO_BLOCK_SIZE` values `(minimum, preferred, maximum payload)` for an export.
///
/// The minimum is the smallest alignment the export actually serves, its `min_block`: 1
/// for a cryptvol volume, which serves unaligned requests by read-modify-write, so strict
/// clients (libnbd's `nbdcopy`, `nbdfuse`, fio's nbd engine) accept any request their user
/// makes. The preferred size is the export's `preferred_block` (the volume's sector size):
/// cooperative clients (libnbd, qemu) size and align their requests to it and so avoid
/// the read-modify-write.
///
/// The spec ("Size constraints") lets a server assume its advertised constraints are
/// honoured only by a client that sent `NBD_OPT_GO` *with* an `NBD_INFO_BLOCK_SIZE` request;
/// every other client is served under the default constraints, whose minimum is 1. So a
/// `min_block` above 1 is sent only when the client requested `NBD_INFO_BLOCK_SIZE`. The same
/// rule applies to `NBD_OPT_INFO`, because the spec requires an `NBD_OPT_GO` with the same
/// parameters right after a successful `NBD_OPT_INFO` to get the same answer.
///
/// Max is the export's `max_block`, capped at [`MAX_PAYLOAD`] (larger READ/WRITE requests
/// end the connection). Values that break the spec's rules (min a power of two ≤ 64 KiB;
/// preferred a power of two ≥ max(min, 512); max ≥ preferred) are replaced by safe ones
/// rather than sent: libnbd ignores bogus constraints entirely.
pub fn block_size_info(export: &ExportInfo, client_requested: bool) -> (u32, u32, u32) {
    let min = if client_requested
        && export.min_block.is_power_of_two()
        && export.min_block <= 64 * 1024
    {
        export.min_block
    } else {
        1
    };
    let floor = min.max(512);
    let preferred = if export.preferred_block.is_power_of_two()
        && export.preferred_block >= floor
        && export.preferred_block <= MAX_PAYLOAD
    {
        export.preferred_block
    } else {
        floor.max(4096)
    };
    let max = export.max_block.min(MAX_PAYLOAD).max(preferred);
    (min, preferred, max)
}
