//! Metadata contexts: the payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`
//! and the one context this server offers, `base:allocation`.
//!
//! Query syntax (spec, "Metadata querying" and "The `base:` metadata namespace"):
//! `base:allocation` selects the context; `base:` is a wildcard for LIST only (SET ignores
//! it); any other leaf in `base:` and any other namespace is ignored. A query must be UTF-8
//! without NUL, at most 4096 bytes, and contain the colon that ends its namespace.

use super::handshake::MAX_NAME_LEN;
use super::wire::Reader;

/// The name of the `base:allocation` metadata context.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The context id this server assigns to `base:allocation` in `NBD_OPT_SET_META_CONTEXT`
/// (ids are per connection and opaque to clients; nonzero so that it never looks like the
/// reserved id 0 of `NBD_OPT_LIST_META_CONTEXT` replies).
pub const BASE_ALLOCATION_ID: u32 = 1;

/// `base:allocation` flag: the extent is not allocated in the backing store.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// A metadata context this server supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`: holes (never written / zeroed chunks) versus data.
    BaseAllocation,
}

impl MetaContext {
    /// Every supported context, in the order LIST reports them.
    pub const ALL: [MetaContext; 1] = [MetaContext::BaseAllocation];

    /// The context's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => BASE_ALLOCATION,
        }
    }

    /// The id this server assigns to the context when it is selected.
    pub fn id(self) -> u32 {
        match self {
            MetaContext::BaseAllocation => BASE_ALLOCATION_ID,
        }
    }
}

/// Which of the two options a query is evaluated for (`base:` is a wildcard for LIST only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueryMode {
    List,
    Set,
}

/// A parsed LIST/SET_META_CONTEXT payload: the export name and the contexts the queries
/// matched (deduplicated, in [`MetaContext::ALL`] order).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MetaRequest<'a> {
    pub(crate) export: &'a [u8],
    pub(crate) contexts: Vec<MetaContext>,
}

/// Parses `u32 namelen, name, u32 n, n × (u32 len, query)`, requiring every length to fit
/// and the lengths to add up exactly. With no query, LIST matches every supported context
/// and SET none. The error is a message for the client (`NBD_REP_ERR_INVALID`).
pub(crate) fn parse_meta_request(data: &[u8], mode: QueryMode) -> Result<MetaRequest<'_>, String> {
    let mut r = Reader(data);
    let name_len = r
        .u32()
        .ok_or_else(|| format!("{} bytes of data, need at least 8", data.len()))?;
    let export = usize::try_from(name_len)
        .ok()
        .and_then(|n| r.take(n))
        .ok_or_else(|| {
            format!(
                "export name length {name_len} does not fit in {} bytes of data",
                data.len()
            )
        })?;
    let count = r
        .u32()
        .ok_or_else(|| "the number of queries is missing after the export name".to_owned())?;
    // Every query takes at least its 4-byte length: check before looping over a count
    // that a client controls.
    if u64::from(count) * 4 > r.remaining() as u64 {
        return Err(format!(
            "{count} queries announced but only {} bytes follow",
            r.remaining()
        ));
    }
    let mut matched = [false; MetaContext::ALL.len()];
    for i in 0..count {
        let len = r
            .u32()
            .ok_or_else(|| format!("query {i} has no length: the data ends early"))?;
        let query = usize::try_from(len)
            .ok()
            .and_then(|n| r.take(n))
            .ok_or_else(|| format!("query {i} of {len} bytes runs past the end of the data"))?;
        let query = check_query(query).map_err(|e| format!("query {i} {e}"))?;
        for (slot, context) in matched.iter_mut().zip(MetaContext::ALL) {
            *slot |= matches(query, context, mode);
        }
    }
    if r.remaining() != 0 {
        return Err(format!(
            "{} bytes of data follow the last query",
            r.remaining()
        ));
    }
    let contexts = if count == 0 && mode == QueryMode::List {
        MetaContext::ALL.to_vec()
    } else {
        MetaContext::ALL
            .into_iter()
            .zip(matched)
            .filter_map(|(c, m)| m.then_some(c))
            .collect()
    };
    Ok(MetaRequest { export, contexts })
}

/// A query must be a string (UTF-8, no NUL, at most 4096 bytes) that starts with a
/// namespace and a colon.
fn check_query(query: &[u8]) -> Result<&str, String> {
    if query.len() > MAX_NAME_LEN {
        return Err(format!(
            "is {} bytes long, the limit is {MAX_NAME_LEN}",
            query.len()
        ));
    }
    let query = std::str::from_utf8(query).map_err(|_| "is not valid UTF-8".to_owned())?;
    if query.contains('\0') {
        return Err("contains a NUL character".to_owned());
    }
    match query.find(':') {
        Some(0) => Err("has an empty namespace".to_owned()),
        Some(_) => Ok(query),
        None => Err("has no namespace (expected NAMESPACE:LEAF, e.g. base:allocation)".to_owned()),
    }
}

/// Whether `query` selects `context`: an exact name, or for LIST the `base:` wildcard.
fn matches(query: &str, context: MetaContext, mode: QueryMode) -> bool {
    query == context.name()
        || (mode == QueryMode::List && query == "base:" && context.name().starts_with("base:"))
}

/// The `NBD_REP_META_CONTEXT` payload: u32 context id, then the name.
pub(crate) fn meta_context_payload(id: u32, context: MetaContext) -> Vec<u8> {
    let name = context.name().as_bytes();
    let mut payload = Vec::with_capacity(4 + name.len());
    payload.extend_from_slice(&id.to_be_bytes());
    payload.extend_from_slice(name);
    payload
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name);
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        d
    }

    fn contexts(data: &[u8], mode: QueryMode) -> Vec<MetaContext> {
        parse_meta_request(data, mode).unwrap().contexts
    }

    const ALLOC: [MetaContext; 1] = [MetaContext::BaseAllocation];

    #[test]
    fn exact_bytes_of_a_query() {
        // export "v", one query "base:allocation"
        let data = [
            0, 0, 0, 1, b'v', 0, 0, 0, 1, 0, 0, 0, 15, b'b', b'a', b's', b'e', b':', b'a', b'l',
            b'l', b'o', b'c', b'a', b't', b'i', b'o', b'n',
        ];
        assert_eq!(data.to_vec(), payload(b"v", &[b"base:allocation"]));
        let req = parse_meta_request(&data, QueryMode::Set).unwrap();
        assert_eq!(req.export, b"v");
        assert_eq!(req.contexts, ALLOC);
    }

    #[test]
    fn list_and_set_semantics() {
        use QueryMode::*;
        // No query: LIST lists everything, SET selects nothing.
        assert_eq!(contexts(&payload(b"", &[]), List), ALLOC);
        assert!(contexts(&payload(b"", &[]), Set).is_empty());
        // `base:` is a LIST wildcard, ignored by SET.
        assert_eq!(contexts(&payload(b"", &[b"base:"]), List), ALLOC);
        assert!(contexts(&payload(b"", &[b"base:"]), Set).is_empty());
        // Unknown leaves and namespaces are ignored; duplicates give one context.
        for mode in [List, Set] {
            assert!(contexts(
                &payload(b"e", &[b"base:nope", b"qemu:dirty-bitmap:x"]),
                mode
            )
            .is_empty());
            assert_eq!(
                contexts(
                    &payload(b"e", &[b"x-y:z", b"base:allocation", b"base:allocation"]),
                    mode
                ),
                ALLOC
            );
        }
        // Case matters.
        assert!(contexts(&payload(b"", &[b"BASE:allocation"]), Set).is_empty());
    }

    #[test]
    fn malformed_payloads_are_refused() {
        let ok = payload(b"v", &[b"base:allocation"]);
        for cut in 0..ok.len() {
            assert!(
                parse_meta_request(&ok[..cut], QueryMode::Set).is_err(),
                "truncated at {cut}"
            );
        }
        let mut trailing = ok.clone();
        trailing.push(0);
        assert!(parse_meta_request(&trailing, QueryMode::Set).is_err());
        // Count larger than the data could ever hold.
        let mut huge = payload(b"v", &[]);
        huge[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        let err = parse_meta_request(&huge, QueryMode::List).unwrap_err();
        assert!(err.contains("4294967295 queries"), "{err}");
        // Name length beyond the data.
        let mut name = ok.clone();
        name[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&name, QueryMode::Set).is_err());
        // Bad query strings.
        for bad in [&b"nocolon"[..], b":leaf", b"base:\xff", b"base:a\0b"] {
            let err = parse_meta_request(&payload(b"v", &[bad]), QueryMode::List).unwrap_err();
            assert!(err.starts_with("query 0 "), "{err}");
        }
        let long = vec![b'x'; MAX_NAME_LEN + 1];
        assert!(parse_meta_request(&payload(b"v", &[&long]), QueryMode::List).is_err());
    }

    #[test]
    fn reply_payload_layout() {
        let p = meta_context_payload(7, MetaContext::BaseAllocation);
        assert_eq!(&p[..4], &[0, 0, 0, 7]);
        assert_eq!(&p[4..], b"base:allocation");
        assert_eq!(STATE_HOLE | STATE_ZERO, 3);
    }
}
