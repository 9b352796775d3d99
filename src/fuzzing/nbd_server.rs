//! The server's side of NBD: a whole session (greeting, option negotiation, then the
//! transmission phase) driven by the fuzz input as the client's byte stream, against
//! an in-memory device, as `server/conn/` drives `nbd::Negotiation` and serves requests.

use super::input::Input;
use crate::blockdev::{BlockDevice, MemDevice};
use crate::nbd::client::decode_option_replies;
use crate::nbd::consts::{OPT_EXPORT_NAME, REP_ERR_POLICY};
use crate::nbd::structured::{self, BlockDescriptor};
use crate::nbd::{
    encode_simple_reply, parse_client_flags, parse_option_header, parse_request, server_greeting,
    validate_negotiated, Command, ExportCatalog, ExportInfo, LookupError, Negotiated, Negotiation,
    Next, OptionHeader, OptionOutcome, TlsMode, ValidRequest, MAX_OPTION_LEN, MAX_PAYLOAD,
    MAX_REPLY_PAYLOAD, REQUEST_HEADER_LEN, STATE_HOLE, STATE_ZERO,
};

/// The writable export.
const DISK: &str = "disk";
/// The read-only export.
const READ_ONLY: &str = "ro";
/// The export this client may not open.
const DENIED: &str = "secret";

/// Three exports: one writable, one read-only, one this client is refused.
struct FuzzCatalog(Vec<ExportInfo>);

impl FuzzCatalog {
    fn new() -> FuzzCatalog {
        let export = |name: &str, size: u64, read_only: bool| ExportInfo {
            name: name.to_owned(),
            description: format!("fuzz export {name}"),
            size,
            read_only,
            min_block: 1,
            preferred_block: 512,
            max_block: MAX_PAYLOAD,
        };
        FuzzCatalog(vec![
            export(DISK, 1 << 20, false),
            export(READ_ONLY, 64 << 10, true),
            export(DENIED, 4096, false),
        ])
    }
}

impl ExportCatalog for FuzzCatalog {
    fn lookup(&self, name: &str) -> Result<ExportInfo, LookupError> {
        match self.0.iter().find(|e| e.name == name) {
            Some(e) if e.name == DENIED => Err(LookupError::Denied("fuzz policy".into())),
            Some(e) => Ok(e.clone()),
            None => Err(LookupError::Unknown),
        }
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.0
            .iter()
            .filter(|e| e.name != DENIED)
            .cloned()
            .collect()
    }
    fn default_export(&self) -> Option<String> {
        None
    }
}

/// A whole session: `data[0]` chooses the TLS mode (off, on, require), the rest is what
/// the client sends: its flags, options, and after a successful `NBD_OPT_GO` or
/// `NBD_OPT_EXPORT_NAME` its requests.
pub fn nbd_handshake(data: &[u8]) -> bool {
    let mut input = Input(data);
    let tls = match input.byte() % 3 {
        1 => TlsMode::On,
        2 => TlsMode::Require,
        _ => TlsMode::Off,
    };
    assert_eq!(server_greeting().len(), 18);
    let catalog = FuzzCatalog::new();
    let Some((export, negotiated)) = negotiate(&mut input, tls, &catalog) else {
        return false;
    };
    let Ok(device) = MemDevice::new(export.size, 512, export.read_only) else {
        panic!(
            "the in-memory device of export {} cannot be made",
            export.name
        );
    };
    serve_requests(&mut input, &export, &negotiated, &device);
    true
}

/// The transmission phase alone: `data[0]` chooses a read-only export, structured
/// replies and `base:allocation`; the rest is the request stream.
pub fn nbd_transmission(data: &[u8]) -> bool {
    let mut input = Input(data);
    let mode = input.byte();
    let read_only = mode & 1 != 0;
    let export = ExportInfo {
        name: "mem".into(),
        description: String::new(),
        size: 1 << 20,
        read_only,
        min_block: 1,
        preferred_block: 512,
        max_block: MAX_PAYLOAD,
    };
    let negotiated = Negotiated {
        structured_replies: mode & 2 != 0,
        base_allocation: (mode & 4 != 0).then_some(1),
    };
    let Ok(device) = MemDevice::new(export.size, 512, read_only) else {
        panic!("the in-memory device cannot be made");
    };
    serve_requests(&mut input, &export, &negotiated, &device) > 0
}

/// The option phase as `server/conn/handshake.rs` runs it; the export and what was
/// negotiated when it ends in transmission.
fn negotiate(
    input: &mut Input<'_>,
    tls: TlsMode,
    catalog: &FuzzCatalog,
) -> Option<(ExportInfo, Negotiated)> {
    let client = parse_client_flags(input.array()?).ok()?;
    let mut neg = Negotiation::with_tls(client, tls);
    loop {
        let hdr = parse_option_header(&input.array()?).ok()?;
        let outcome = if hdr.len > MAX_OPTION_LEN {
            // The server discards the data; a client that ends first has closed.
            input.take(hdr.len as usize)?;
            neg.handle_oversized(&hdr)
        } else {
            let data = input.take(hdr.len as usize)?;
            neg.handle_option(&hdr, data, catalog)
        };
        check_outcome(&hdr, &outcome, &neg, tls);
        match outcome.next {
            Next::Continue => {}
            Next::StartTls => neg.tls_started(),
            Next::Close => return None,
            Next::Transmit { export, .. } => return Some((export, neg.negotiated())),
        }
    }
}

/// What every option's outcome must satisfy.
fn check_outcome(hdr: &OptionHeader, outcome: &OptionOutcome, neg: &Negotiation, tls: TlsMode) {
    let entering = matches!(outcome.next, Next::Transmit { .. });
    if let Next::Transmit { export, .. } = &outcome.next {
        assert_ne!(
            export.name, DENIED,
            "transmission on an export the client may not open"
        );
        assert!(
            tls != TlsMode::Require || neg.tls_active(),
            "transmission without TLS although TLS is required"
        );
    }
    if hdr.option == OPT_EXPORT_NAME && entering {
        // Size, flags, and the padding unless NO_ZEROES: no option reply framing.
        assert!(
            matches!(outcome.reply.len(), 10 | 134),
            "EXPORT_NAME reply of {} bytes",
            outcome.reply.len()
        );
        return;
    }
    let replies = match decode_option_replies(&outcome.reply) {
        Ok(r) => r,
        Err(e) => panic!("option {} answered with malformed replies: {e}", hdr.option),
    };
    for r in &replies {
        assert_eq!(r.option, hdr.option, "a reply names another option");
        assert!(
            r.payload.len() <= MAX_REPLY_PAYLOAD,
            "option reply payload of {} bytes",
            r.payload.len()
        );
    }
    if outcome.refusal.is_some() {
        assert!(
            replies.iter().any(|r| r.reply_type == REP_ERR_POLICY),
            "a refused export was not answered NBD_REP_ERR_POLICY"
        );
    }
}

/// Requests until the stream ends, a framing error or `NBD_CMD_DISC`: each is validated
/// and performed on `device` as `server/conn/commands.rs` does, and what it did is
/// checked by reading back. Returns how many requests were performed.
fn serve_requests(
    input: &mut Input<'_>,
    export: &ExportInfo,
    negotiated: &Negotiated,
    device: &MemDevice,
) -> usize {
    let mut performed = 0;
    while let Some(hdr) = input.array::<REQUEST_HEADER_LEN>() {
        let Ok(req) = parse_request(&hdr) else {
            break;
        };
        let Some(payload) = input.take(req.payload_len() as usize) else {
            break;
        };
        let reply_header = encode_simple_reply(req.cookie, None);
        assert_eq!(reply_header.len(), 16);
        match validate_negotiated(&req, export, negotiated) {
            Err(rejection) => {
                assert_ne!(req.command, Command::Disc);
                let _ = encode_simple_reply(req.cookie, Some(rejection.errno));
            }
            Ok(ValidRequest::Disc) => break,
            Ok(valid) => {
                perform(valid, payload, negotiated, device);
                performed += 1;
            }
        }
    }
    performed
}

/// Performs one valid request on the device and checks its effect.
fn perform(req: ValidRequest, payload: &[u8], negotiated: &Negotiated, device: &MemDevice) {
    match req {
        ValidRequest::Read { offset, len } => {
            assert!(len <= MAX_PAYLOAD && offset + u64::from(len) <= device.size());
            let mut buf = vec![0u8; len as usize];
            device
                .read_at(&mut buf, offset)
                .expect("a valid READ failed");
            if negotiated.structured_replies && len > 0 {
                assert!(structured::offset_data_prefix(1, offset, len, true).is_some());
                assert!(structured::offset_hole(1, offset, len, true).is_some());
            }
        }
        ValidRequest::Write { offset, len, fua } => {
            assert_eq!(
                payload.len(),
                len as usize,
                "a WRITE's payload is its length"
            );
            let mut data = payload.to_vec();
            device
                .write_at(&mut data, offset, fua)
                .expect("a valid WRITE failed");
            assert_eq!(
                read_back(device, offset, len),
                payload,
                "a WRITE did not read back"
            );
        }
        ValidRequest::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
        } => {
            let done = if no_hole {
                device.write_zeroes_no_hole(offset, u64::from(len), fua)
            } else {
                device.write_zeroes(offset, u64::from(len), fua)
            };
            done.expect("a valid WRITE_ZEROES failed");
            assert!(
                read_back(device, offset, len).iter().all(|&b| b == 0),
                "WRITE_ZEROES left data"
            );
        }
        ValidRequest::Trim { offset, len, .. } => {
            device
                .discard(offset, u64::from(len))
                .expect("a valid TRIM failed");
        }
        ValidRequest::Flush => device.flush().expect("FLUSH failed"),
        ValidRequest::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            let context = negotiated
                .base_allocation
                .expect("BLOCK_STATUS without a context");
            block_status(device, context, offset, len, req_one);
        }
        ValidRequest::Cache { .. } | ValidRequest::Disc => {}
    }
}

fn read_back(device: &MemDevice, offset: u64, len: u32) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    device
        .read_at(&mut buf, offset)
        .expect("reading back failed");
    buf
}

/// The descriptors of a BLOCK_STATUS reply cover at most the request, none is empty,
/// `REQ_ONE` gives one, and they encode.
fn block_status(device: &MemDevice, context: u32, offset: u64, len: u32, req_one: bool) {
    let extents = device
        .extents(offset, u64::from(len))
        .expect("extents of a valid range");
    let status = |allocated: bool| {
        if allocated {
            0
        } else {
            STATE_HOLE | STATE_ZERO
        }
    };
    let descriptors: Vec<BlockDescriptor> = structured::block_descriptors(
        extents.iter().map(|e| (e.len, status(e.allocated))),
        len,
        req_one,
    );
    let covered: u64 = descriptors.iter().map(|d| u64::from(d.len)).sum();
    assert!(
        covered <= u64::from(len),
        "descriptors cover {covered} of {len} bytes"
    );
    assert!(descriptors.iter().all(|d| d.len > 0));
    assert!(!req_one || descriptors.len() <= 1);
    if !descriptors.is_empty() {
        assert!(structured::block_status(1, context, &descriptors, true).is_some());
    }
}
