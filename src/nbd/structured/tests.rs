//! Exact-byte and property tests for structured reply chunks.

use proptest::prelude::*;

use super::*;

const COOKIE: u64 = 0x0102_0304_0506_0708;

/// The chunk header bytes, written out independently of the code under test.
fn header(flags: u16, kind: u16, len: u32) -> Vec<u8> {
    let mut v = vec![0x66, 0x8e, 0x33, 0xef];
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    v.extend_from_slice(&len.to_be_bytes());
    v
}

#[test]
fn none_chunk_is_done_with_no_payload() {
    assert_eq!(
        none(COOKIE).to_vec(),
        [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0]
    );
}

#[test]
fn offset_data_prefix_bytes() {
    let p = offset_data_prefix(COOKIE, 0x1000, 4096, true).unwrap();
    let mut want = header(1, 1, 4096 + 8);
    want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x10, 0]);
    assert_eq!(p.to_vec(), want);
    assert_eq!(&p[..4], &[0x66, 0x8e, 0x33, 0xef]);
    assert_eq!(&p[16..20], &[0, 0, 0x10, 0x08]);
    let not_done = offset_data_prefix(COOKIE, 0, 1, false).unwrap();
    assert_eq!(&not_done[4..8], &[0, 0, 0, 1]);
    assert_eq!(&not_done[16..20], &[0, 0, 0, 9]); // spec: length MUST be at least 9
    assert_eq!(offset_data_prefix(COOKIE, 0, 0, true), None);
    assert_eq!(offset_data_prefix(COOKIE, 0, u32::MAX - 7, true), None);
    assert!(offset_data_prefix(COOKIE, 0, u32::MAX - 8, true).is_some());
}

#[test]
fn offset_hole_bytes() {
    let h = offset_hole(COOKIE, 0x2_0000_0000, 65536, true).unwrap();
    let mut want = header(1, 2, 12);
    want.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 0, 0, 1, 0, 0]);
    assert_eq!(h.to_vec(), want);
    assert_eq!(offset_hole(COOKIE, 0, 0, true), None);
}

#[test]
fn error_chunks_bytes() {
    // NBD_REPLY_TYPE_ERROR, EINVAL, empty message: length exactly 6.
    let e = error(COOKIE, NbdErrno::Inval, "", true);
    let mut want = header(1, 0x8001, 6);
    want.extend_from_slice(&[0, 0, 0, 22, 0, 0]);
    assert_eq!(e, want);
    // With a message.
    let e = error(COOKIE, NbdErrno::Io, "bad", true);
    let mut want = header(1, 0x8001, 9);
    want.extend_from_slice(&[0, 0, 0, 5, 0, 3, b'b', b'a', b'd']);
    assert_eq!(e, want);
    // NBD_REPLY_TYPE_ERROR_OFFSET: length 14 + message.
    let e = error_offset(COOKIE, NbdErrno::Io, "x", 512, false);
    let mut want = header(0, 0x8002, 15);
    want.extend_from_slice(&[0, 0, 0, 5, 0, 1, b'x', 0, 0, 0, 0, 0, 0, 2, 0]);
    assert_eq!(e, want);
    let e = error_offset(COOKIE, NbdErrno::NoSpc, "", 0, true);
    assert_eq!(e.len(), 20 + 14);
}

#[test]
fn long_error_messages_are_cut_on_a_char_boundary() {
    let msg = "é".repeat(200); // 400 bytes
    let e = error(COOKIE, NbdErrno::Io, &msg, true);
    let msg_len = usize::from(u16::from_be_bytes([e[24], e[25]]));
    assert_eq!(msg_len, MAX_HUMAN_STRING);
    assert!(std::str::from_utf8(&e[26..]).is_ok());
    assert_eq!(e.len(), 26 + msg_len);
    let len = u32::from_be_bytes([e[16], e[17], e[18], e[19]]) as usize;
    assert_eq!(len, e.len() - CHUNK_HEADER_LEN);
}

#[test]
fn block_status_bytes() {
    let d = [
        BlockDescriptor {
            len: 65536,
            flags: 0,
        },
        BlockDescriptor {
            len: 0x10_0000,
            flags: STATE_HOLE_ZERO,
        },
    ];
    let c = block_status(COOKIE, 1, &d, true).unwrap();
    let mut want = header(1, 5, 4 + 16);
    want.extend_from_slice(&[0, 0, 0, 1]);
    want.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    want.extend_from_slice(&[0, 0x10, 0, 0, 0, 0, 0, 3]);
    assert_eq!(c, want);
    assert_eq!(block_status(COOKIE, 1, &[], true), None);
    let zero = [BlockDescriptor { len: 0, flags: 0 }];
    assert_eq!(block_status(COOKIE, 1, &zero, true), None);
}

const STATE_HOLE_ZERO: u32 = 3;

#[test]
fn descriptors_merge_cap_and_honour_req_one() {
    let d = |len, flags| BlockDescriptor { len, flags };
    let ext = [(4096u64, 0u32), (8192, 0), (0, 3), (65536, 3), (4096, 0)];
    assert_eq!(
        block_descriptors(ext, 81920, false),
        [d(12288, 0), d(65536, 3), d(4096, 0)]
    );
    // Capped at the requested length.
    assert_eq!(
        block_descriptors(ext, 20000, false),
        [d(12288, 0), d(7712, 3)]
    );
    // REQ_ONE: one descriptor (merged run), never longer than the request.
    assert_eq!(block_descriptors(ext, 81920, true), [d(12288, 0)]);
    assert_eq!(block_descriptors(ext, 100, true), [d(100, 0)]);
    // A 64-bit extent is cut to the (32-bit) request.
    assert_eq!(
        block_descriptors([(u64::MAX, 3)], u32::MAX, false),
        [d(u32::MAX, 3)]
    );
    assert!(block_descriptors([(4096, 0)], 0, false).is_empty());
    assert!(block_descriptors(std::iter::empty(), 4096, false).is_empty());
}

#[test]
fn descriptor_count_is_bounded() {
    // Alternating 1-byte extents: at most MAX_DESCRIPTORS descriptors.
    let ext = (0..(MAX_DESCRIPTORS as u64 + 10)).map(|i| (1u64, (i % 2) as u32));
    let d = block_descriptors(ext, u32::MAX, false);
    assert_eq!(d.len(), MAX_DESCRIPTORS);
    assert!(block_status(COOKIE, 1, &d, true).is_some());
}

#[test]
fn chunk_headers_decode() {
    let h = decode_chunk_header(&none(COOKIE)).unwrap();
    assert_eq!(
        h,
        ChunkHeader {
            flags: 1,
            reply_type: 0,
            cookie: COOKIE,
            len: 0
        }
    );
    assert!(h.done());
    let mut bad = none(COOKIE);
    bad[0] = 0x67;
    assert_eq!(decode_chunk_header(&bad), None);
}

proptest! {
    #[test]
    fn descriptors_cover_at_most_the_request_and_never_zero(
        ext in proptest::collection::vec((0u64..1 << 34, 0u32..4), 0..40),
        requested in any::<u32>(),
        req_one in any::<bool>(),
    ) {
        let d = block_descriptors(ext.iter().copied(), requested, req_one);
        let total: u64 = d.iter().map(|d| u64::from(d.len)).sum();
        let available: u64 = ext.iter().map(|e| e.0).sum();
        prop_assert!(total <= u64::from(requested));
        let coverable = available.min(u64::from(requested));
        if req_one {
            prop_assert!(total <= coverable);
            prop_assert_eq!(d.is_empty(), coverable == 0);
        } else {
            prop_assert_eq!(total, coverable);
        }
        prop_assert!(d.iter().all(|d| d.len > 0));
        prop_assert!(d.windows(2).all(|w| w[0].flags != w[1].flags));
        if req_one { prop_assert!(d.len() <= 1); }
        if let Some(chunk) = block_status(COOKIE, 7, &d, true) {
            let h = decode_chunk_header(chunk[..20].try_into().unwrap()).unwrap();
            prop_assert_eq!(h.len as usize, chunk.len() - 20);
            prop_assert_eq!((h.len - 4) % 8, 0);
        } else {
            prop_assert!(d.is_empty());
        }
    }

    #[test]
    fn error_chunks_are_self_consistent(msg in ".{0,300}", offset in any::<u64>(), with_offset in any::<bool>()) {
        let c = if with_offset {
            error_offset(COOKIE, NbdErrno::Io, &msg, offset, true)
        } else {
            error(COOKIE, NbdErrno::Io, &msg, true)
        };
        let h = decode_chunk_header(c[..20].try_into().unwrap()).unwrap();
        prop_assert_eq!(h.len as usize, c.len() - 20);
        let msg_len = usize::from(u16::from_be_bytes([c[24], c[25]]));
        prop_assert!(msg_len <= MAX_HUMAN_STRING);
        prop_assert_eq!(h.len as usize, 6 + msg_len + if with_offset { 8 } else { 0 });
        prop_assert!(std::str::from_utf8(&c[26..26 + msg_len]).is_ok());
    }
}
