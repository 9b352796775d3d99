//! Unit and property tests for the handshake, by topic; the catalog and helpers they
//! share are here.

mod authorization;
mod go_info;
mod greeting;
mod meta;
mod options;
mod properties;
mod starttls;

use proptest::prelude::*;

use super::*;
use crate::nbd::client::{decode_option_replies, encode_info_data, OptionReply};
use crate::nbd::consts::*;
use crate::nbd::meta::MetaContext;
use crate::nbd::meta::BASE_ALLOCATION_ID;
use crate::nbd::{ExportCatalog, ExportInfo, LookupError};
use meta::{meta_data, opt};
use properties::{check_well_formed, prop_catalog};

const MIB: u32 = 1024 * 1024;

struct Catalog(Vec<ExportInfo>);

impl ExportCatalog for Catalog {
    fn lookup(&self, name: &str) -> Result<ExportInfo, LookupError> {
        self.0
            .iter()
            .find(|e| e.name == name)
            .cloned()
            .ok_or(LookupError::Unknown)
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.0.clone()
    }
}

fn export(name: &str, size: u64) -> ExportInfo {
    ExportInfo {
        name: name.to_owned(),
        description: String::new(),
        size,
        read_only: false,
        // As the server builds it for a 4096-byte-sector volume (server/export.rs).
        min_block: 1,
        preferred_block: 4096,
        max_block: 32 * MIB,
    }
}

fn described(name: &str, description: &str) -> ExportInfo {
    ExportInfo {
        description: description.to_owned(),
        ..export(name, 1 << 20)
    }
}

const FIXED: ClientFlags = ClientFlags {
    fixed_newstyle: true,
    no_zeroes: true,
};
const FIXED_WITH_ZEROES: ClientFlags = ClientFlags {
    fixed_newstyle: true,
    no_zeroes: false,
};
const PLAIN: ClientFlags = ClientFlags {
    fixed_newstyle: false,
    no_zeroes: false,
};

/// Transmission flags of a writable export: HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM,
/// SEND_WRITE_ZEROES, CAN_MULTI_CONN, SEND_CACHE.
const RW_FLAGS: u16 = 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0100 | 0x0400;

fn run(client: ClientFlags, option: u32, data: &[u8], catalog: &Catalog) -> OptionOutcome {
    let hdr = OptionHeader {
        option,
        len: u32::try_from(data.len()).unwrap(),
    };
    Negotiation::new(client).handle_option(&hdr, data, catalog)
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    encode_info_data(name.as_bytes(), infos).unwrap()
}

fn replies(outcome: &OptionOutcome) -> Vec<OptionReply> {
    decode_option_replies(&outcome.reply).unwrap()
}

/// Builds the bytes of one option reply independently of the code under test.
fn rep(option: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply_type.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn message(reply: &OptionReply) -> &str {
    std::str::from_utf8(&reply.payload).unwrap()
}
