//! Every command served against the in-memory device: READ/WRITE, FLUSH and FUA,
//! TRIM and WRITE_ZEROES, structured READ and BLOCK_STATUS.

use super::*;

#[test]
fn read_write_round_trip_then_disc_ends_the_connection() {
    let mut s = start(false, false);
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    s.write(1, 8192 + 100, &data);
    assert_eq!(s.simple(), (0, 1));
    s.send(Command::Read, 0, 2, 8192 + 100, 4096);
    assert_eq!(s.simple(), (0, 2));
    let mut back = vec![0u8; 4096];
    s.client.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
    s.send(Command::Disc, 0, 3, 0, 0);
    assert!(s.finish().contains("NBD_CMD_DISC"));
}

#[test]
fn flush_and_fua_reach_the_device() {
    let mut s = start(false, false);
    s.send(Command::Flush, 0, 1, 0, 0);
    assert_eq!(s.simple(), (0, 1));
    assert_eq!(s.dev.flushes(), 1);
    s.send(Command::Write, CMD_FLAG_FUA, 2, 0, 512);
    s.client.write_all(&[1u8; 512]).unwrap();
    assert_eq!(s.simple(), (0, 2));
    assert_eq!(s.dev.flushes(), 2);
    s.send(Command::Trim, CMD_FLAG_FUA, 3, 0, 512);
    assert_eq!(s.simple(), (0, 3));
    assert_eq!(s.dev.flushes(), 3);
}

#[test]
fn trim_and_write_zeroes_zero_the_range_and_punch_only_without_no_hole() {
    let mut s = start(false, false);
    s.write(1, 0, &[0xaa; 8192]);
    assert_eq!(s.simple(), (0, 1));
    s.send(Command::Trim, 0, 2, 0, 4096);
    assert_eq!(s.simple(), (0, 2));
    s.send(Command::WriteZeroes, CMD_FLAG_NO_HOLE, 3, 4096, 1024);
    assert_eq!(s.simple(), (0, 3));
    s.send(Command::WriteZeroes, 0, 4, 6144, 1024);
    assert_eq!(s.simple(), (0, 4));
    let ext: Vec<(u64, bool)> = s
        .dev
        .extents(0, 8192)
        .unwrap()
        .iter()
        .map(|e| (e.len, e.allocated))
        .collect();
    assert_eq!(
        ext,
        vec![(4096, false), (2048, true), (1024, false), (1024, true)]
    );
    let mut back = vec![0u8; 8192];
    s.dev.read_at(&mut back, 0).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert!(back[4096..5120].iter().all(|&b| b == 0));
    assert!(back[5120..6144].iter().all(|&b| b == 0xaa));
    assert!(back[6144..7168].iter().all(|&b| b == 0));
    assert!(back[7168..].iter().all(|&b| b == 0xaa));
}

#[test]
fn structured_reads_and_block_status_report_holes() {
    let mut s = start(false, true);
    s.write(1, 512, &[5u8; 512]);
    // Success of a command other than READ: a simple reply, as before.
    assert_eq!(s.simple(), (0, 1));
    // BLOCK_STATUS: context id, then (length, flags) descriptors.
    s.send(Command::BlockStatus, 0, 2, 0, 4096);
    let (h, p) = s.chunk();
    assert_eq!(
        (h.reply_type, h.cookie, h.done()),
        (REPLY_TYPE_BLOCK_STATUS, 2, true)
    );
    let hole = STATE_HOLE | STATE_ZERO;
    let words: Vec<u32> = p.chunks(4).map(be32).collect();
    assert_eq!(words, vec![1, 512, hole, 512, 0, 3072, hole]);
    // An unallocated range reads as one OFFSET_HOLE chunk.
    s.send(Command::Read, 0, 3, 8192, 1024);
    let (h, p) = s.chunk();
    assert_eq!(
        (h.reply_type, h.cookie, h.done()),
        (REPLY_TYPE_OFFSET_HOLE, 3, true)
    );
    assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), 8192);
    assert_eq!(be32(&p[8..]), 1024);
    // Data comes back in one OFFSET_DATA chunk.
    s.send(Command::Read, 0, 4, 512, 512);
    let (h, p) = s.chunk();
    assert_eq!((h.reply_type, h.cookie), (REPLY_TYPE_OFFSET_DATA, 4));
    assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), 512);
    assert_eq!(&p[8..], &[5u8; 512][..]);
}

#[test]
fn cache_is_acknowledged_without_touching_the_data() {
    let mut s = start(false, false);
    s.write(1, 4096, &[7u8; 512]);
    assert_eq!(s.simple(), (0, 1));
    s.send(Command::Cache, 0, 2, 0, 8192);
    assert_eq!(s.simple(), (0, 2));
    s.send(Command::Read, 0, 3, 4096, 512);
    assert_eq!(s.simple(), (0, 3));
    let mut back = [0u8; 512];
    s.client.read_exact(&mut back).unwrap();
    assert_eq!(back, [7u8; 512]);
}
