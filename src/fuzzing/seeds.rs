//! Seed inputs: one or more valid inputs per target, built with the crate's own
//! encoders, so that the fuzzer starts from what the parsers accept. `scripts/fuzz.sh`
//! writes them into `fuzz/corpus/TARGET/` before a run; `tests/fuzz_corpus.rs` checks
//! that each is accepted. Also the key and the headers and manifests the key checks of
//! [`super::volume_header`] and [`super::snapshot_manifest`] compare against.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use crate::attach::netlink::{encode_connect, encode_status, ConnectConfig};
use crate::crypto::Dek;
use crate::keys::{EncryptionContext, WrappedDek};
use crate::nbd::client::{encode_info_data, encode_option};
use crate::nbd::consts::*;
use crate::nbd::{encode_request, server_greeting, Command, Request};
use crate::server::control::{ExportAdd, ExportsRequest, Request as ControlRequest};
use crate::snapshot::{Manifest, SnapshotId, MANIFEST_VERSION};
use crate::volume::fuzz_hooks::{
    compute_kcv, encode_cbt, encode_header_copy, encode_map_page, header_mac,
};
use crate::volume::{Header, MapLayout, Reencryption, CIPHER, DEFAULT_DATA_OFFSET};

/// The snapshot id every manifest input is read as.
pub const SEED_SNAPSHOT_ID: &str = "snap-00000000000000001";

const UUID: [u8; 16] = [7; 16];

/// The key the seed headers and manifests are made with.
pub fn seed_dek() -> Dek {
    key(0x42)
}

/// A key no seed is made with.
pub fn other_dek() -> Dek {
    key(0x5a)
}

/// A 64-byte key of distinct bytes from `start` (XTS refuses equal halves).
fn key(start: u8) -> Dek {
    let bytes: Vec<u8> = (0..64u8)
        .map(|i| start.wrapping_add(i.wrapping_mul(3)))
        .collect();
    Dek::from_slice(&bytes).expect("a 64-byte key of distinct halves")
}

/// Seed inputs, by target name.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, inputs: Vec<Vec<u8>>| {
        out.extend(inputs.into_iter().map(|i| (target, i)));
    };
    add("nbd_handshake", handshake_seeds());
    add(
        "nbd_transmission",
        vec![[7u8].iter().copied().chain(requests()).collect()],
    );
    add("nbd_client", vec![server_stream()]);
    add("netlink_reply", netlink_seeds());
    add("nbd_uri", uri_seeds());
    add(
        "volume_header",
        seed_headers().iter().map(header_input).collect(),
    );
    add("alloc_map", vec![map_input()]);
    add("cbt_sidecar", vec![cbt_input()]);
    add(
        "snapshot_manifest",
        seed_manifests()
            .iter()
            .map(|m| m.to_json().expect("a seed manifest encodes"))
            .collect(),
    );
    add("control_protocol", control_seeds());
    add("import_journal", vec![journal_seed()]);
    add("keystore_record", keystore_seeds());
    add("exec_reply", exec_seeds());
    out
}

fn slot(context: &EncryptionContext) -> WrappedDek {
    WrappedDek {
        backend: "passphrase".into(),
        key_id: String::new(),
        blob: (1..=60).collect(),
        context: context.clone(),
        params: BTreeMap::from([
            ("kdf".to_string(), "argon2id".to_string()),
            ("salt".into(), "c2FsdA==".into()),
        ]),
    }
}

/// A thin volume, a volume without a map, and a thin volume being re-encrypted.
pub(super) fn seed_headers() -> &'static [Header] {
    static HEADERS: OnceLock<Vec<Header>> = OnceLock::new();
    HEADERS.get_or_init(|| {
        let dek = seed_dek();
        let uuid = uuid::Uuid::from_bytes(UUID);
        let context = EncryptionContext::for_volume(&uuid);
        let size = 8 << 20;
        let (layout, data_offset) = MapLayout::for_size(size);
        let thin = Header {
            format_version: 1,
            sequence: 3,
            uuid,
            size,
            sector_size: 4096,
            data_offset,
            cipher: CIPHER.into(),
            keyslots: vec![slot(&context)],
            iv_unit: 4096,
            required_features: vec!["allocation-map".into()],
            compatible_features: Vec::new(),
            allocation_map: Some(layout),
            reencrypt: None,
            key_check: compute_kcv(&dek, &uuid).expect("kcv"),
            header_mac: [0; 32],
        };
        let plain = Header {
            sector_size: 512,
            iv_unit: 512,
            data_offset: DEFAULT_DATA_OFFSET,
            required_features: Vec::new(),
            allocation_map: None,
            ..thin.clone()
        };
        let next = key(0x17);
        let reencrypting = Header {
            required_features: vec!["allocation-map".into(), "reencrypt".into()],
            reencrypt: Some(Reencryption {
                watermark: 1 << 20,
                keyslots: vec![slot(&context)],
                key_check: compute_kcv(&next, &uuid).expect("kcv"),
                hotzone: None,
            }),
            ..thin.clone()
        };
        [thin, plain, reencrypting]
            .into_iter()
            .map(|mut h| {
                h.header_mac = header_mac(&dek, &h).expect("mac");
                h
            })
            .collect()
    })
}

/// The `volume_header` input of a header: flags (set the length, seal, mirror), the
/// primary's binary prefix, its metadata JSON.
fn header_input(h: &Header) -> Vec<u8> {
    let copy = encode_header_copy(h, 0).expect("a seed header encodes");
    let meta_len = u32::from_le_bytes(copy[56..60].try_into().expect("4 bytes")) as usize;
    let mut out = vec![7u8];
    out.extend_from_slice(&copy[..128]);
    out.extend_from_slice(&copy[4096..4096 + meta_len]);
    out
}

/// A sealed manifest with every optional part (as `snapshot/manifest.rs` tests build it).
pub(super) fn seed_manifests() -> &'static [Manifest] {
    static MANIFESTS: OnceLock<Vec<Manifest>> = OnceLock::new();
    MANIFESTS.get_or_init(|| {
        let uuid = uuid::Uuid::from_bytes(UUID);
        let mut m = Manifest {
            version: MANIFEST_VERSION,
            id: SnapshotId::parse(SEED_SNAPSHOT_ID).expect("id"),
            volume_uuid: uuid,
            volume_size: 4 << 20,
            sector_size: 4096,
            chunk_size: crate::snapshot::CHUNK_SIZE,
            cipher: CIPHER.into(),
            chunks: [(0u64, [1u8; 32]), (5, [2u8; 32])].into_iter().collect(),
            parent: Some(SnapshotId::parse("snap-0000000000000000a").expect("id")),
            created_at: "2026-01-02T03:04:05.000006Z".into(),
            description: "nightly".into(),
            encryption_context: EncryptionContext::for_volume(&uuid),
            keyslots: vec![slot(&EncryptionContext::for_volume(&uuid))],
            key_check: [0; 32],
            mac: [0; 32],
        };
        m.seal(&seed_dek()).expect("seal");
        vec![m]
    })
}

fn option(option: u32, data: &[u8]) -> Vec<u8> {
    encode_option(option, data).expect("a short option")
}

/// `NBD_OPT_SET_META_CONTEXT` / `LIST_META_CONTEXT` data: export, queries.
fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

fn request(command: Command, flags: u16, offset: u64, len: u32) -> Vec<u8> {
    let cookie = offset ^ u64::from(len);
    encode_request(&Request {
        flags,
        command,
        cookie,
        offset,
        len,
    })
    .to_vec()
}

/// One of each command, a WRITE with its payload among them.
fn requests() -> Vec<u8> {
    let mut r = request(Command::Write, CMD_FLAG_FUA, 4096, 16);
    r.extend_from_slice(b"0123456789abcdef");
    for (command, flags, offset, len) in [
        (Command::Read, 0, 4096, 16),
        (Command::BlockStatus, 0, 0, 65536),
        (Command::BlockStatus, CMD_FLAG_REQ_ONE, 0, 8192),
        (Command::Trim, 0, 4096, 4096),
        (Command::WriteZeroes, CMD_FLAG_NO_HOLE, 8192, 4096),
        (Command::WriteZeroes, 0, 0, 512),
        (Command::Cache, 0, 0, 4096),
        (Command::Flush, 0, 0, 0),
        (Command::Disc, 0, 0, 0),
    ] {
        r.extend(request(command, flags, offset, len));
    }
    r
}

/// Sessions: every option then GO and requests; EXPORT_NAME; TLS required, STARTTLS, GO.
fn handshake_seeds() -> Vec<Vec<u8>> {
    let flags = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes();
    let mut full = vec![0u8];
    full.extend_from_slice(&flags);
    full.extend(option(OPT_LIST, &[]));
    full.extend(option(OPT_STRUCTURED_REPLY, &[]));
    full.extend(option(
        OPT_LIST_META_CONTEXT,
        &meta_data("disk", &["base:"]),
    ));
    full.extend(option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    ));
    let info = encode_info_data(b"disk", &[INFO_EXPORT, INFO_BLOCK_SIZE]).expect("info data");
    full.extend(option(OPT_INFO, &info));
    full.extend(option(
        OPT_GO,
        &encode_info_data(b"secret", &[]).expect("info data"),
    ));
    full.extend(option(OPT_GO, &info));
    full.extend(requests());
    let mut export_name = vec![1u8];
    export_name.extend_from_slice(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    export_name.extend(option(OPT_EXPORT_NAME, b"ro"));
    export_name.extend(request(Command::Read, 0, 0, 512));
    let mut tls = vec![2u8];
    tls.extend_from_slice(&flags);
    tls.extend(option(OPT_LIST, &[]));
    tls.extend(option(OPT_STARTTLS, &[]));
    tls.extend(option(OPT_GO, &info));
    tls.extend(request(Command::Flush, 0, 0, 0));
    vec![full, export_name, tls]
}

fn option_reply(option: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut r = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&option.to_be_bytes());
    r.extend_from_slice(&reply_type.to_be_bytes());
    r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    r.extend_from_slice(payload);
    r
}

fn simple_reply(cookie: u64) -> Vec<u8> {
    crate::nbd::encode_simple_reply(cookie, None).to_vec()
}

/// A server: greeting, GO answered with the export's size and block sizes, then the
/// replies to a 4 KiB READ, a WRITE, a WRITE_ZEROES and a FLUSH.
fn server_stream() -> Vec<u8> {
    let mut s = server_greeting().to_vec();
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&4096u64.to_be_bytes());
    export.extend_from_slice(
        &(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_WRITE_ZEROES).to_be_bytes(),
    );
    s.extend(option_reply(OPT_GO, REP_INFO, &export));
    let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [1u32, 4096, 32 << 20] {
        sizes.extend_from_slice(&v.to_be_bytes());
    }
    s.extend(option_reply(OPT_GO, REP_INFO, &sizes));
    s.extend(option_reply(OPT_GO, REP_ACK, &[]));
    s.extend(simple_reply(1));
    s.extend(std::iter::repeat_n(0xa5, 4096));
    for cookie in 2..=4 {
        s.extend(simple_reply(cookie));
    }
    s
}

fn netlink_seeds() -> Vec<Vec<u8>> {
    let connect = ConnectConfig {
        index: Some(3),
        size_bytes: 1 << 30,
        block_size: 4096,
        timeout: 30,
        dead_conn_timeout: 60,
        server_flags: 0x5ed,
        client_flags: 1,
        fds: vec![7, 8],
    };
    let mut ack = Vec::new();
    ack.extend_from_slice(&36u32.to_ne_bytes());
    ack.extend_from_slice(&2u16.to_ne_bytes());
    ack.extend_from_slice(&0u16.to_ne_bytes());
    ack.extend_from_slice(&9u32.to_ne_bytes());
    ack.extend_from_slice(&0u32.to_ne_bytes());
    ack.extend_from_slice(&0i32.to_ne_bytes());
    ack.extend_from_slice(&[0u8; 16]);
    vec![
        encode_connect(27, 9, &connect),
        encode_status(27, 10, None),
        ack,
    ]
}

fn uri_seeds() -> Vec<Vec<u8>> {
    [
        "nbd://localhost:10809/disk",
        "nbd+unix:///disk?socket=/run/cryptvol/nbd.sock",
        "nbd://[::1]/a%20b",
        "nbd://192.0.2.1",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// One page per copy, sealed by the body: copy 1 newer.
fn map_input() -> Vec<u8> {
    let uuid = uuid::Uuid::from_bytes(UUID);
    let mut out = vec![1u8, 0];
    out.extend_from_slice(&(100u64 << 20).to_le_bytes());
    for (copy, seq, word) in [(0, 1, 0b1011u64), (1, 2, 0b1111)] {
        let page = encode_map_page(&uuid, 0, copy, seq, &[word, 0, 0, 0]);
        out.extend_from_slice(&page[..128]);
    }
    out
}

/// A sidecar of two words, its checksum left to the body.
fn cbt_input() -> Vec<u8> {
    let uuid = uuid::Uuid::from_bytes(UUID);
    let sidecar =
        encode_cbt(&uuid, false, Some(SEED_SNAPSHOT_ID), &[5, 1 << 63]).expect("a sidecar");
    let mut out = vec![1u8, 2];
    out.extend_from_slice(&sidecar[..sidecar.len() - 32]);
    out
}

fn control_seeds() -> Vec<Vec<u8>> {
    let add = ExportAdd {
        name: "vol".into(),
        path: "/srv/vol.img".into(),
        read_only: true,
        allow_uid: vec!["1000".into()],
        ..ExportAdd::default()
    };
    [
        ControlRequest::Status,
        ControlRequest::Reencrypt {
            export: "vol".into(),
            wait: true,
        },
        ControlRequest::ReencryptStatus {
            export: "vol".into(),
        },
        ControlRequest::Snapshot {
            export: "vol".into(),
            store: "/srv/snapshots".into(),
            description: "nightly".into(),
            parent: Some(SEED_SNAPSHOT_ID.into()),
        },
        ControlRequest::Exports(ExportsRequest::Add(add)),
        ControlRequest::Exports(ExportsRequest::Remove {
            name: "vol".into(),
            force: true,
        }),
        ControlRequest::Exports(ExportsRequest::List),
    ]
    .iter()
    .map(|r| r.to_line().into_bytes())
    .chain([
        br#"{"event":"progress","op":"reencrypt","export":"vol","done":1,"total":2}"#.to_vec(),
        br#"{"ok":false,"error":"no such export"}"#.to_vec(),
    ])
    .collect()
}

fn journal_seed() -> Vec<u8> {
    concat!(
        r#"{"event":"start","version":1,"source":{"kind":"file","location":"/srv/disk.raw","size":1048576,"mtime":[1700000000,5],"inode":[2049,77]},"key":"default","sector_size":4096,"volume_size":1048576,"uuid":"07070707-0707-0707-0707-070707070707"}"#,
        "\n",
        r#"{"event":"checkpoint","done":524288,"sha256_state":"00ff","written":4096,"skipped":520192}"#,
        "\n",
        r#"{"event":"resume","from":524288}"#,
        "\n",
        r#"{"event":"copied","sha256":"abcd","written":8192,"skipped":1040384}"#,
        "\n",
    )
    .as_bytes()
    .to_vec()
}

fn keystore_seeds() -> Vec<Vec<u8>> {
    let id = crate::keys::keystore_fuzz_hooks::FUZZ_KEY_ID;
    let material = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVowMTIzNDU=";
    vec![
        format!(
            r#"{{"version":2,"key_id":"{id}","spec":"AES_256","state":"Enabled","created_at":"2026-01-01T00:00:00Z","creator_uid":1000,"materials":[{{"version":1,"created_at":"2026-01-01T00:00:00Z","material":"{material}"}},{{"version":2,"created_at":"2026-02-01T00:00:00Z","material":"{material}"}}]}}"#
        )
        .into_bytes(),
        format!(
            r#"{{"version":1,"key_id":"{id}","spec":"AES_256","state":"PendingDeletion","created_at":"2026-01-01T00:00:00Z","deletion_unix":1790000000,"material":"{material}"}}"#
        )
        .into_bytes(),
    ]
}

fn exec_seeds() -> Vec<Vec<u8>> {
    let dek =
        "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQg==";
    vec![
        format!(
            r#"{{"ok":true,"key_id":"fuzz-key","blob_b64":"AQIDBA==","plaintext_b64":"{dek}","params":{{"alg":"x"}},"state":"Enabled","created_at":"2026-01-01T00:00:00Z","aliases":["prod"]}}"#
        )
        .into_bytes(),
        br#"{"ok":false,"error":"access_denied","message":"not for you"}"#.to_vec(),
    ]
}
