//! Structured replies, metadata contexts (`base:allocation`) and `NBD_CMD_BLOCK_STATUS`:
//! on the wire (hand-driven raw client), through libnbd (tests/nbdsh/structured.py,
//! nbdinfo --map, nbdcopy) and qemu (qemu-img map).
//!
//! Unless marked otherwise, the assertions hold both while `Volume::extents` reports every
//! block allocated and once never-written chunks are reported as holes: written ranges must
//! be reported as data, and whatever is reported as reading zero must read zero.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

// ----- Wire constants (from the specification, independent of the code under test) -----

const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const REPLY_FLAG_DONE: u16 = 1;
const TYPE_NONE: u16 = 0;
const TYPE_OFFSET_DATA: u16 = 1;
const TYPE_BLOCK_STATUS: u16 = 5;
const TYPE_ERROR: u16 = (1 << 15) + 1;
const CMD_BLOCK_STATUS: u16 = 7;
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
const HOLE: u32 = 1;
const ZERO: u32 = 2;

// ----- Helpers -----

/// Runs `tests/nbdsh/structured.py CHECK ARGS...` and asserts it passed.
fn check(name: &str, args: &[&str]) {
    require_python_nbd();
    let out = run(Command::new("/usr/bin/python3")
        .arg(scripts_dir().join("structured.py"))
        .arg(name)
        .args(args));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("OK {name}")),
        "libnbd check `{name}` failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn no_panic(srv: &Server) {
    let log = srv.log_text();
    assert!(!log.contains("panicked"), "server panicked:\n{log}");
}

/// One volume of `size` served alone on a Unix socket (and TCP when asked).
fn setup(size: &str, tcp: bool) -> (Env, PathBuf, Server) {
    let env = Env::new();
    let vol = env.create("v.img", size, &[]);
    let srv = env.serve(&[s(&vol)], &[], tcp);
    (env, vol, srv)
}

/// `LIST`/`SET_META_CONTEXT` data: export name and queries.
fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Sends an option and collects its replies up to the final one (ACK or error).
fn option_replies(r: &mut Raw, option: u32, data: &[u8]) -> Vec<OptReply> {
    r.option(option, data).expect("send option");
    let mut out = Vec::new();
    loop {
        let rep = r.opt_reply().expect("option reply");
        assert_eq!(rep.option, option, "reply does not echo the option");
        let last = rep.kind == proto::REP_ACK || rep.kind & (1 << 31) != 0;
        out.push(rep);
        if last {
            return out;
        }
    }
}

/// NBD_OPT_STRUCTURED_REPLY, which must be acknowledged with an empty ACK.
fn negotiate_sr(r: &mut Raw) {
    let reps = option_replies(r, proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(reps.len(), 1);
    assert_eq!(reps[0].kind, proto::REP_ACK, "{reps:?}");
    assert!(reps[0].data.is_empty());
}

/// NBD_OPT_SET_META_CONTEXT for base:allocation on `export`; returns the context id.
fn select_base_allocation(r: &mut Raw, export: &str) -> u32 {
    let reps = option_replies(
        r,
        OPT_SET_META_CONTEXT,
        &meta_data(export, &["base:allocation"]),
    );
    assert_eq!(reps.len(), 2, "{reps:?}");
    assert_eq!(reps[0].kind, REP_META_CONTEXT);
    assert_eq!(&reps[0].data[4..], b"base:allocation");
    assert_eq!(reps[1].kind, proto::REP_ACK);
    be32(&reps[0].data[..4])
}

/// One structured reply chunk: (flags, type, cookie, payload).
fn chunk(r: &mut Raw) -> (u16, u16, u64, Vec<u8>) {
    let h = r.recv(20).expect("chunk header");
    assert_eq!(
        be32(&h[0..4]),
        STRUCTURED_MAGIC,
        "not a structured reply: {h:02x?}"
    );
    let flags = u16::from_be_bytes([h[4], h[5]]);
    let kind = u16::from_be_bytes([h[6], h[7]]);
    let cookie = be64(&h[8..16]);
    let len = be32(&h[16..20]);
    assert!(len < 64 << 20, "chunk of {len} bytes");
    let payload = r.recv(len as usize).expect("chunk payload");
    (flags, kind, cookie, payload)
}

/// Expects a final `NBD_REPLY_TYPE_ERROR` chunk for `cookie`; returns (errno, message).
fn error_chunk(r: &mut Raw, cookie: u64) -> (u32, String) {
    let (flags, kind, c, p) = chunk(r);
    assert_eq!(
        (flags, kind, c),
        (REPLY_FLAG_DONE, TYPE_ERROR, cookie),
        "{p:02x?}"
    );
    assert!(p.len() >= 6);
    let msg_len = usize::from(u16::from_be_bytes([p[4], p[5]]));
    assert_eq!(p.len(), 6 + msg_len, "error chunk length");
    let msg = String::from_utf8(p[6..].to_vec()).expect("UTF-8 message");
    (be32(&p[0..4]), msg)
}

/// Sends BLOCK_STATUS and decodes the final BLOCK_STATUS chunk: (context id, descriptors).
fn block_status(
    r: &mut Raw,
    cookie: u64,
    flags: u16,
    offset: u64,
    len: u32,
) -> (u32, Vec<(u32, u32)>) {
    r.request(flags, CMD_BLOCK_STATUS, cookie, offset, len, &[])
        .expect("send BLOCK_STATUS");
    let (f, kind, c, p) = chunk(r);
    assert_eq!(
        (f, kind, c),
        (REPLY_FLAG_DONE, TYPE_BLOCK_STATUS, cookie),
        "{p:02x?}"
    );
    assert!(
        p.len() >= 12 && (p.len() - 4) % 8 == 0,
        "block status length {}",
        p.len()
    );
    let d = p[4..]
        .chunks(8)
        .map(|c| (be32(&c[0..4]), be32(&c[4..8])))
        .collect();
    (be32(&p[0..4]), d)
}

/// Asserts descriptors are nonzero, in the base:allocation flag set, and cover at most
/// `len` bytes (this server never reports past the request).
fn check_descriptors(d: &[(u32, u32)], len: u32) {
    assert!(!d.is_empty());
    assert!(
        d.iter()
            .all(|&(l, f)| l > 0 && (f == 0 || f == HOLE | ZERO)),
        "{d:?}"
    );
    let total: u64 = d.iter().map(|&(l, _)| u64::from(l)).sum();
    assert!(total <= u64::from(len), "{d:?} covers more than {len}");
}

/// Extents as (offset, length, flags) from a JSON map, checked to be contiguous from 0 to
/// `size`.
fn contiguous(extents: &[(u64, u64, u64)], size: u64) {
    let mut pos = 0;
    for &(off, len, _) in extents {
        assert_eq!(off, pos, "map not contiguous: {extents:?}");
        assert!(len > 0);
        pos += len;
    }
    assert_eq!(pos, size, "map does not cover the export: {extents:?}");
}

/// Asserts every written range lies in extents with the hole bit clear.
fn written_is_data(extents: &[(u64, u64, bool)], written: &[(u64, u64)]) {
    for &(w_off, w_len) in written {
        for &(off, len, data) in extents {
            if off < w_off + w_len && w_off < off + len {
                assert!(
                    data,
                    "written [{w_off}, +{w_len}) reported as a hole: {extents:?}"
                );
            }
        }
    }
}

// ----- On the wire -----

#[test]
fn raw_structured_reads_block_status_and_errors() {
    let (_env, _vol, mut srv) = setup("16M", false);
    let mut r = Raw::start(&srv);
    negotiate_sr(&mut r);
    let id = select_base_allocation(&mut r, "v");
    assert_ne!(id, 0, "SET_META_CONTEXT must assign a real id");
    let (size, _) = r.go("v").expect("GO");
    assert_eq!(size, 16 * MIB);

    // WRITE still gets a simple reply (allowed: no payload).
    let data = pattern(64 * 1024, 3);
    assert_eq!(r.write(1, 0, &data), 0);

    // READ: one final OFFSET_DATA chunk with the data, sent right after the offset.
    r.request(0, proto::CMD_READ, 2, 4096, 8192, &[])
        .expect("send READ");
    let (flags, kind, cookie, p) = chunk(&mut r);
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, TYPE_OFFSET_DATA, 2)
    );
    assert_eq!(p.len(), 8 + 8192);
    assert_eq!(be64(&p[..8]), 4096);
    assert_eq!(&p[8..], &data[4096..12288]);
    // Unaligned.
    r.request(0, proto::CMD_READ, 3, 4095, 3, &[])
        .expect("send READ");
    let (_, kind, _, p) = chunk(&mut r);
    assert_eq!(kind, TYPE_OFFSET_DATA);
    assert_eq!((be64(&p[..8]), &p[8..]), (4095, &data[4095..4098]));
    // Zero length: just NONE with DONE.
    r.request(0, proto::CMD_READ, 4, 4096, 0, &[])
        .expect("send READ");
    let (flags, kind, cookie, p) = chunk(&mut r);
    assert_eq!(
        (flags, kind, cookie, p.len()),
        (REPLY_FLAG_DONE, TYPE_NONE, 4, 0)
    );
    // Errors of READ are structured (never a simple reply), with a message.
    r.request(0, proto::CMD_READ, 5, size - 5, 10, &[])
        .expect("send READ");
    let (errno, msg) = error_chunk(&mut r, 5);
    assert_eq!(errno, proto::EINVAL);
    assert!(msg.contains("beyond the end"), "{msg}");
    r.request(CMD_FLAG_REQ_ONE, proto::CMD_READ, 6, 0, 512, &[])
        .expect("send READ");
    assert_eq!(error_chunk(&mut r, 6).0, proto::EINVAL);

    // BLOCK_STATUS: written data is reported allocated (status 0).
    let (ctx, d) = block_status(&mut r, 7, 0, 0, 65536);
    assert_eq!(ctx, id);
    check_descriptors(&d, 65536);
    assert_eq!(d[0].1, 0, "written data reported as a hole: {d:?}");
    let (_, d) = block_status(&mut r, 8, CMD_FLAG_REQ_ONE, 4096, 100);
    assert_eq!(d, vec![(100, 0)], "REQ_ONE over written data");
    let (_, d) = block_status(&mut r, 9, CMD_FLAG_REQ_ONE, 0, size as u32);
    assert_eq!(d.len(), 1);
    check_descriptors(&d, size as u32);
    let (_, d) = block_status(&mut r, 10, 0, 0, size as u32);
    check_descriptors(&d, size as u32);
    // Unaligned query.
    let (_, d) = block_status(&mut r, 11, 0, 1000, 5000);
    check_descriptors(&d, 5000);
    // Invalid BLOCK_STATUS requests: structured EINVAL.
    for (cookie, flags, offset, len) in [
        (12, 0, 0, 0),
        (13, 0, size, 4096),
        (14, 0, size - 4096, 8192),
        (15, 1 << 1, 0, 4096), // NO_HOLE
        (16, 1 << 2, 0, 4096), // DF
    ] {
        r.request(flags, CMD_BLOCK_STATUS, cookie, offset, len, &[])
            .expect("send BLOCK_STATUS");
        assert_eq!(
            error_chunk(&mut r, cookie).0,
            proto::EINVAL,
            "cookie {cookie}"
        );
    }
    // Other commands keep simple replies on success.
    r.request(0, proto::CMD_FLUSH, 17, 0, 0, &[])
        .expect("send FLUSH");
    assert_eq!(r.reply().expect("FLUSH reply"), (0, 17));
    // Unknown command: structured error.
    r.request(0, 99, 18, 0, 0, &[]).expect("send");
    assert_eq!(error_chunk(&mut r, 18).0, proto::EINVAL);
    // Still in sync.
    r.request(0, proto::CMD_READ, 19, 0, 16, &[])
        .expect("send READ");
    let (_, kind, _, p) = chunk(&mut r);
    assert_eq!((kind, &p[8..]), (TYPE_OFFSET_DATA, &data[..16]));
    r.disconnect();
    assert!(srv.alive());
    no_panic(&srv);
}

#[test]
fn raw_without_structured_replies_everything_stays_simple() {
    let (_env, _vol, mut srv) = setup("8M", false);
    let (mut r, size, _) = Raw::open(&srv, "v");
    let data = pattern(8192, 5);
    assert_eq!(r.write(1, 0, &data), 0);
    // READ: a 16-byte simple reply header, then exactly the data.
    r.request(0, proto::CMD_READ, 2, 0, 8192, &[])
        .expect("send READ");
    let h = r.recv(16).expect("reply");
    let mut want = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    assert_eq!(h, want);
    assert_eq!(r.recv(8192).expect("data"), data);
    // Errors: a simple reply, no payload.
    assert_eq!(r.read(3, size - 4096, 8192), Err(proto::EINVAL));
    // BLOCK_STATUS without any context: simple EINVAL.
    r.request(0, CMD_BLOCK_STATUS, 4, 0, 4096, &[])
        .expect("send");
    assert_eq!(r.reply().expect("reply"), (proto::EINVAL, 4));
    r.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 5, 0, 4096, &[])
        .expect("send");
    assert_eq!(r.reply().expect("reply"), (proto::EINVAL, 5));
    // Zero-length READ: success, no data.
    r.request(0, proto::CMD_READ, 6, 0, 0, &[]).expect("send");
    assert_eq!(r.reply().expect("reply"), (0, 6));
    // Still in sync.
    assert_eq!(r.read(7, 0, 4096).expect("read"), data[..4096]);
    r.disconnect();
    assert!(srv.alive());
    no_panic(&srv);
}

#[test]
fn raw_meta_context_negotiation_rules() {
    let env = Env::new();
    let a = env.create("a.img", "8M", &[]);
    let b = env.create("b.img", "8M", &[]);
    let mut srv = env.serve(&[s(&a), s(&b)], &[], false);
    let mut r = Raw::start(&srv);

    // SET before STRUCTURED_REPLY is refused.
    let reps = option_replies(
        &mut r,
        OPT_SET_META_CONTEXT,
        &meta_data("a", &["base:allocation"]),
    );
    assert_eq!(reps.len(), 1);
    assert_eq!(reps[0].kind, REP_ERR_INVALID, "{reps:?}");
    let msg = String::from_utf8_lossy(&reps[0].data);
    assert!(msg.contains("STRUCTURED_REPLY"), "{msg}");

    // LIST works; context id 0 in LIST replies.
    for queries in [&[][..], &["base:"][..]] {
        let reps = option_replies(&mut r, OPT_LIST_META_CONTEXT, &meta_data("a", queries));
        assert_eq!(reps.len(), 2, "{queries:?}: {reps:?}");
        assert_eq!(reps[0].kind, REP_META_CONTEXT);
        assert_eq!(reps[0].data, b"\0\0\0\0base:allocation");
        assert_eq!(reps[1].kind, proto::REP_ACK);
    }
    let reps = option_replies(&mut r, OPT_LIST_META_CONTEXT, &meta_data("a", &["qemu:x"]));
    assert_eq!(reps.len(), 1);
    assert_eq!(reps[0].kind, proto::REP_ACK);
    // Malformed and unknown exports.
    let reps = option_replies(&mut r, OPT_LIST_META_CONTEXT, &[0, 0, 0, 9, b'a']);
    assert_eq!(reps[0].kind, REP_ERR_INVALID);
    let reps = option_replies(&mut r, OPT_LIST_META_CONTEXT, &meta_data("zz", &[]));
    assert_eq!(reps[0].kind, proto::REP_ERR_UNKNOWN);
    // STRUCTURED_REPLY with data is invalid.
    let reps = option_replies(&mut r, proto::OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(reps[0].kind, REP_ERR_INVALID);

    negotiate_sr(&mut r);
    select_base_allocation(&mut r, "a");
    // A failed SET (unknown export) replaces the selection with nothing.
    let reps = option_replies(
        &mut r,
        OPT_SET_META_CONTEXT,
        &meta_data("zz", &["base:allocation"]),
    );
    assert_eq!(reps[0].kind, proto::REP_ERR_UNKNOWN);
    r.go("a").expect("GO");
    r.request(0, CMD_BLOCK_STATUS, 1, 0, 4096, &[])
        .expect("send");
    assert_eq!(error_chunk(&mut r, 1).0, proto::EINVAL);
    r.disconnect();

    // Contexts selected for one export do not carry over to another.
    let mut r = Raw::start(&srv);
    negotiate_sr(&mut r);
    select_base_allocation(&mut r, "a");
    r.go("b").expect("GO b");
    r.request(0, CMD_BLOCK_STATUS, 1, 0, 4096, &[])
        .expect("send");
    assert_eq!(error_chunk(&mut r, 1).0, proto::EINVAL);
    r.disconnect();

    // And for the same export they do.
    let mut r = Raw::start(&srv);
    negotiate_sr(&mut r);
    let id = select_base_allocation(&mut r, "b");
    r.go("b").expect("GO b");
    let (ctx, d) = block_status(&mut r, 2, 0, 0, 4096);
    assert_eq!(ctx, id);
    check_descriptors(&d, 4096);
    r.disconnect();
    assert!(srv.alive());
    no_panic(&srv);
}

// ----- libnbd -----

#[test]
fn libnbd_negotiates_structured_replies_and_base_allocation() {
    let (_env, _vol, srv) = setup("16M", false);
    check("negotiated", &[&srv.uri("v")]);
    no_panic(&srv);
}

#[test]
fn libnbd_lists_meta_contexts_in_option_mode() {
    let (_env, _vol, srv) = setup("16M", false);
    check("list_contexts", &[&srv.uri("v")]);
    no_panic(&srv);
}

#[test]
fn libnbd_block_status() {
    let (_env, _vol, srv) = setup("32M", false);
    check("block_status", &[&srv.uri("v")]);
    no_panic(&srv);
}

#[test]
fn libnbd_structured_reads() {
    let (_env, _vol, srv) = setup("32M", false);
    check("pread", &[&srv.uri("v")]);
    no_panic(&srv);
}

#[test]
fn nbdinfo_map_and_totals() {
    require("nbdinfo");
    require("qemu-io");
    let (_env, _vol, srv) = setup("16M", false);
    let uri = srv.uri("v");
    let written = [(MIB, 64 * KIB), (16 * MIB - 8 * KIB, 8 * KIB)];
    qemu_io(&uri, &["write -P 0x11 1M 64k", "write -P 0x22 16376k 8k"]);

    let out = run_ok(Command::new("nbdinfo").args(["--map", "--json", &uri]));
    let j: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo --map JSON");
    let extents: Vec<(u64, u64, u64)> = j
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
                e["type"].as_u64().expect("type"),
            )
        })
        .collect();
    contiguous(&extents, 16 * MIB);
    assert!(extents.iter().all(|e| e.2 == 0 || e.2 == 3), "{extents:?}");
    let data: Vec<(u64, u64, bool)> = extents
        .iter()
        .map(|&(o, l, t)| (o, l, t & 1 == 0))
        .collect();
    written_is_data(&data, &written);
    // Extents described as zero read as zero.
    for &(off, len, t) in &extents {
        if t & 2 != 0 {
            let n = len.min(MIB);
            qemu_io(&uri, &[&format!("read -P 0 {off} {n}")]);
        }
    }

    let out = run_ok(Command::new("nbdinfo").args(["--map", "--totals", "--json", &uri]));
    let j: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo --totals JSON");
    let totals = j.as_array().expect("array");
    let sum: u64 = totals
        .iter()
        .map(|t| t["size"].as_u64().expect("size"))
        .sum();
    assert_eq!(sum, 16 * MIB, "{j}");
    let data_bytes: u64 = totals
        .iter()
        .filter(|t| t["type"].as_u64() == Some(0))
        .map(|t| t["size"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        data_bytes >= 72 * KIB,
        "written bytes not counted as data: {j}"
    );
    no_panic(&srv);
}

#[test]
fn nbdinfo_content_lists_base_allocation() {
    require("nbdinfo");
    let (_env, _vol, srv) = setup("8M", false);
    let out = run_ok(Command::new("nbdinfo").args(["--list", "--content", "--json", &srv.uri("")]));
    let j: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo JSON");
    assert_eq!(j["structured"], true, "{j}");
    let e = &j["exports"][0];
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .unwrap_or_else(|| panic!("no contexts: {j}"))
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert_eq!(contexts, ["base:allocation"], "{j}");
}

#[test]
fn qemu_img_map_over_tcp() {
    require("qemu-img");
    let (_env, _vol, srv) = setup("16M", true);
    let uri = srv.tcp_uri("v");
    let written = [(2 * MIB, 128 * KIB), (9 * MIB, 4 * KIB)];
    qemu_io(&uri, &["write -P 0x33 2M 128k", "write -P 0x44 9M 4k"]);
    let out = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let j: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map JSON");
    let entries: Vec<(u64, u64, bool, bool)> = j
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().expect("start"),
                e["length"].as_u64().expect("length"),
                e["data"].as_bool().expect("data"),
                e["zero"].as_bool().expect("zero"),
            )
        })
        .collect();
    let flat: Vec<(u64, u64, u64)> = entries.iter().map(|e| (e.0, e.1, 0)).collect();
    contiguous(&flat, 16 * MIB);
    let data: Vec<(u64, u64, bool)> = entries.iter().map(|e| (e.0, e.1, e.2)).collect();
    written_is_data(&data, &written);
    for &(start, len, _, zero) in &entries {
        if zero {
            let n = len.min(MIB);
            qemu_io(&uri, &[&format!("read -P 0 {start} {n}")]);
        }
    }
    no_panic(&srv);
}

#[test]
fn nbdcopy_round_trip_is_byte_identical() {
    require("nbdcopy");
    let (env, _vol, srv) = setup("24M", false);
    let uri = srv.uri("v");
    // A source with data, zero runs and a hole.
    let src = env.path("src.raw");
    let mut img = vec![0u8; 24 * MIB as usize];
    img[..3 * MIB as usize].copy_from_slice(&pattern(3 * MIB as usize, 1));
    img[10 * MIB as usize..10 * MIB as usize + 12345].copy_from_slice(&pattern(12345, 2));
    img[(24 * MIB - 4 * KIB) as usize..].copy_from_slice(&pattern(4096, 3));
    std::fs::write(&src, &img).expect("write source");
    run_ok(Command::new("nbdcopy").arg(&src).arg(&uri));
    let back = env.path("back.raw");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&back));
    assert!(read(&back) == img, "nbdcopy round trip changed the data");
    // And to a pipe (no sparseness possible): same bytes.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "nbdcopy '{uri}' - | sha256sum; sha256sum < '{}'",
            s(&src)
        ))
        .output()
        .expect("sh");
    let text = String::from_utf8_lossy(&out.stdout);
    let sums: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(sums.len(), 2, "{text}");
    assert_eq!(sums[0], sums[1], "nbdcopy to a pipe differs");
    no_panic(&srv);
}

// ----- Read errors (EIO) as structured error chunks -----

/// nbdfuse exposing `file` through nbdkit's error filter: once `trigger` exists, every
/// read of the FUSE file fails with EIO. Unmounted and stopped on drop.
struct FailingFile {
    dir: PathBuf,
    child: Option<Child>,
}

impl FailingFile {
    fn new(dir: &Path, file: &Path, trigger: &Path, size: u64) -> FailingFile {
        require("nbdfuse");
        require("nbdkit");
        std::fs::create_dir_all(dir).expect("mkdir");
        let target = dir.join("disk");
        let child = Command::new("nbdfuse")
            .arg(&target)
            .args([
                "--command",
                "nbdkit",
                "-s",
                "--exit-with-parent",
                "--filter=error",
                "file",
            ])
            .arg(file)
            .args(["error-pread=EIO", "error-pread-rate=1"])
            .arg(format!("error-file={}", s(trigger)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nbdfuse");
        let mut f = FailingFile {
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0) != size {
            if let Some(Ok(Some(st))) = f.child.as_mut().map(|c| c.try_wait()) {
                panic!("nbdfuse exited early: {st}");
            }
            assert!(Instant::now() < deadline, "nbdfuse did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        f
    }
    fn path(&self) -> PathBuf {
        self.dir.join("disk")
    }
}

impl Drop for FailingFile {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status();
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !matches!(c.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn read_errors_arrive_as_structured_errors() {
    let env = Env::new();
    let vol = env.create("v.img", "8M", &[]);
    let at = 4 * MIB;
    // Write the data first on the real file, so that the chunks are allocated (with an
    // allocation map, unallocated chunks would be answered without touching the file).
    let srv = env.serve(&[s(&vol)], &[], false);
    check("prepare_eio", &[&srv.uri("v"), &at.to_string()]);
    srv.stop();

    let trigger = env.path("fail-reads");
    let file_len = std::fs::metadata(&vol).expect("stat").len();
    let fuse = FailingFile::new(&env.path("fuse"), &vol, &trigger, file_len);
    let export = format!("v={}", s(&fuse.path()));
    let mut srv = env.serve(&[&export], &[], false);
    // The server read the header at start; from now on reads of the data fail.
    std::fs::write(&trigger, b"").expect("create trigger");
    // The check removes the trigger half-way and reads successfully on the same connection.
    check("eio", &[&srv.uri("v"), &at.to_string(), s(&trigger)]);
    assert!(!trigger.exists());
    assert!(srv.alive());
    let log = srv.log_text();
    assert!(log.contains("failed (Io)"), "EIO not logged:\n{log}");
    no_panic(&srv);
    drop(srv);
    drop(fuse);
}

// ----- Only with the allocation map -----

/// Needs the allocation map (issue 7 part 1): a fresh volume is reported as one hole that
/// reads as zeros (OFFSET_HOLE), and only written chunks become data.
#[test]
fn fresh_volume_is_one_hole_with_the_allocation_map() {
    require("nbdinfo");
    let (_env, _vol, srv) = setup("16M", true);
    let out = run_ok(Command::new("nbdinfo").args(["--map", "--json", &srv.uri("v")]));
    let j: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let m = j.as_array().expect("array");
    assert_eq!(m.len(), 1, "{j}");
    assert_eq!(m[0]["type"].as_u64(), Some(3), "{j}");
    assert_eq!(m[0]["length"].as_u64(), Some(16 * MIB), "{j}");
    let out = run_ok(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "-f",
        "raw",
        &srv.tcp_uri("v"),
    ]));
    let j: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(j[0]["data"], false, "{j}");
    assert_eq!(j[0]["zero"], true, "{j}");
    check("fresh_is_hole", &[&srv.uri("v")]);
    // A structured READ of a hole is one OFFSET_HOLE chunk.
    let mut r = Raw::start(&srv);
    negotiate_sr(&mut r);
    r.go("v").expect("GO");
    r.request(0, proto::CMD_READ, 1, 12 * MIB, 65536, &[])
        .expect("send READ");
    let (flags, kind, cookie, p) = chunk(&mut r);
    assert_eq!((flags, kind, cookie), (REPLY_FLAG_DONE, 2, 1));
    assert_eq!(
        p,
        [&(12 * MIB).to_be_bytes()[..], &65536u32.to_be_bytes()[..]].concat()
    );
    r.disconnect();
    no_panic(&srv);
}
