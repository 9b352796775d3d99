//! Hostile and broken clients over raw sockets, and handshake edge cases. After each
//! scenario the same server must still be alive and serve a well-behaved client with
//! the data written before intact.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;

/// Failure bound for the server to close a connection it must drop (it does so at once;
/// generous for a loaded machine, nothing waits for it to pass).
const CLOSE: Duration = PATIENCE;

/// A 16 MiB volume with 0x77 in its first MiB.
fn setup() -> (Env, Server) {
    let env = Env::new();
    let vol = env.create("v.img", "16M", &[]);
    let srv = env.serve(&[s(&vol)], &[], false);
    qemu_io(&srv.uri("v"), &["write -P 0x77 0 1M"]);
    (env, srv)
}

/// The server is alive, accepts a new well-behaved client, and the data is intact.
fn still_serves(srv: &mut Server) {
    assert!(srv.alive(), "server died:\n{}", srv.log_text());
    qemu_io(
        &srv.uri("v"),
        &[
            "read -P 0x77 0 1M",
            "write -P 0x78 2M 64k",
            "read -P 0x78 2M 64k",
        ],
    );
    let (mut r, size, _) = Raw::open(srv, "v");
    assert!(size >= 16 << 20, "export size {size}");
    assert_eq!(r.read(1, 4096, 4096).expect("read"), vec![0x77u8; 4096]);
    r.disconnect();
    assert!(srv.alive(), "server died:\n{}", srv.log_text());
    let log = srv.log_text();
    assert!(!log.contains("panicked"), "server panicked:\n{log}");
}

#[test]
fn garbage_before_and_during_handshake() {
    let (_env, mut srv) = setup();
    // Garbage as client flags (unknown flag bits): the server must drop the connection.
    let mut r = Raw::connect(&srv);
    r.greeting();
    r.send(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8])
        .expect("send");
    r.expect_closed(CLOSE);
    // An HTTP request instead of NBD, without reading the greeting.
    let mut r = Raw::connect(&srv);
    r.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    r.expect_closed(CLOSE);
    // Valid flags, then an option with bad magic.
    let mut r = Raw::start(&srv);
    r.send(&pattern(64, 3)).expect("send");
    r.expect_closed(CLOSE);
    // An unknown client flag bit alone.
    let mut r = Raw::connect(&srv);
    r.greeting();
    r.send(&(1u32 | 0x80).to_be_bytes()).expect("send");
    r.expect_closed(CLOSE);
    // Megabytes of random garbage.
    let mut r = Raw::connect(&srv);
    let _ = r.s.write_all(&pattern(4 << 20, 9));
    r.expect_closed(CLOSE);
    still_serves(&mut srv);
}

#[test]
fn garbage_after_handshake() {
    let (_env, mut srv) = setup();
    let (mut r, _, _) = Raw::open(&srv, "v");
    r.send(&pattern(28, 5)).expect("send");
    r.expect_closed(CLOSE);
    // A valid request, then garbage: the first is answered, then the connection closes.
    let (mut r, _, _) = Raw::open(&srv, "v");
    assert_eq!(r.read(7, 0, 512).expect("read"), vec![0x77u8; 512]);
    r.send(&pattern(1000, 6)).expect("send");
    r.expect_closed(CLOSE);
    still_serves(&mut srv);
}

#[test]
fn truncated_header_then_close() {
    let (_env, mut srv) = setup();
    for n in [1usize, 4, 10, 27] {
        let (mut r, _, _) = Raw::open(&srv, "v");
        let mut h = Vec::new();
        h.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&[0u8; 24]);
        r.send(&h[..n]).expect("send");
        drop(r);
    }
    // A truncated header kept open does not block other clients.
    let (mut stuck, _, _) = Raw::open(&srv, "v");
    stuck
        .send(&proto::REQUEST_MAGIC.to_be_bytes())
        .expect("send");
    still_serves(&mut srv);
    drop(stuck);
    still_serves(&mut srv);
}

#[test]
fn huge_lengths_close_the_connection() {
    let (_env, mut srv) = setup();
    // READ of 4 GiB - 1: closed, and no data is sent.
    let (mut r, _, _) = Raw::open(&srv, "v");
    r.request(0, proto::CMD_READ, 1, 0, u32::MAX, &[])
        .expect("send");
    let got = r.expect_closed(CLOSE);
    assert!(
        got.len() <= 16,
        "server sent {} bytes for a 4 GiB READ",
        got.len()
    );
    // WRITE of 4 GiB - 1 with the start of a payload.
    let (mut r, _, _) = Raw::open(&srv, "v");
    r.request(0, proto::CMD_WRITE, 2, 0, u32::MAX, &[0x99; 65536])
        .expect("send");
    r.expect_closed(CLOSE);
    // Just over the 32 MiB limit.
    let (mut r, _, _) = Raw::open(&srv, "v");
    r.request(
        0,
        proto::CMD_WRITE,
        3,
        0,
        32 * 1024 * 1024 + 1,
        &[0x99; 4096],
    )
    .expect("send");
    r.expect_closed(CLOSE);
    // Exactly 32 MiB is within the limit: on this 16 MiB export it is out of range (EINVAL)
    // and the connection stays; the whole export in one READ works.
    let (mut r, _, _) = Raw::open(&srv, "v");
    assert_eq!(r.read(4, 0, 32 * 1024 * 1024), Err(proto::EINVAL));
    let all = r.read(40, 0, 16 << 20).expect("16 MiB read");
    assert_eq!(&all[..1 << 20], &vec![0x77u8; 1 << 20][..]);
    // TRIM and WRITE_ZEROES carry no payload: a 4 GiB length is just out of range.
    r.request(0, 4, 5, 0, u32::MAX, &[]).expect("send trim");
    assert_eq!(r.reply().expect("trim reply"), (proto::EINVAL, 5));
    r.request(0, 6, 6, 0, u32::MAX, &[]).expect("send zeroes");
    assert_eq!(r.reply().expect("zeroes reply"), (proto::ENOSPC, 6));
    // An unknown command: EINVAL, the connection stays.
    r.request(0, 99, 7, 0, 0, &[]).expect("send");
    assert_eq!(
        r.reply().expect("unknown command reply"),
        (proto::EINVAL, 7)
    );
    // A refused WRITE's payload is skipped, not parsed as requests.
    let evil = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
            v.extend_from_slice(&[0, 0, 0, 1]); // a WRITE...
            v.extend_from_slice(&[0u8; 20]);
        }
        v
    };
    r.request(0, proto::CMD_WRITE, 8, 16 << 20, evil.len() as u32, &evil)
        .expect("send");
    assert_eq!(r.reply().expect("reply"), (proto::ENOSPC, 8));
    assert_eq!(r.read(9, 0, 4096).expect("read after"), vec![0x77u8; 4096]);
    r.disconnect();
    still_serves(&mut srv);
}

#[test]
fn disconnect_in_the_middle_of_a_write_payload() {
    let (_env, mut srv) = setup();
    for partial in [0usize, 1, 4095, 100_000] {
        let (mut r, _, _) = Raw::open(&srv, "v");
        r.request(0, proto::CMD_WRITE, 1, 0, 1 << 20, &vec![0x55; partial])
            .expect("send");
        drop(r);
    }
    // Once the server has ended those sessions (setup's qemu-io and the 4 above), the
    // first MiB must be untouched.
    srv.wait_log("client disconnected", 5, PATIENCE);
    qemu_io(&srv.uri("v"), &["read -P 0x77 0 1M"]);
    still_serves(&mut srv);
}

#[test]
fn a_thousand_connections_dropped_at_every_stage() {
    let (_env, mut srv) = setup();
    let start = Instant::now();
    std::thread::scope(|sc| {
        for t in 0..8u64 {
            let srv = &srv;
            sc.spawn(move || {
                for i in 0..125u64 {
                    match (t * 125 + i) % 6 {
                        // Connect and drop.
                        0 => drop(Raw::connect(srv)),
                        // Read the greeting, drop.
                        1 => {
                            let mut r = Raw::connect(srv);
                            r.greeting();
                        }
                        // Flags, then drop.
                        2 => drop(Raw::start(srv)),
                        // Half an option.
                        3 => {
                            let mut r = Raw::start(srv);
                            let _ = r.send(&proto::IHAVEOPT.to_be_bytes()[..5]);
                        }
                        // A full handshake, then drop without NBD_CMD_DISC.
                        4 => drop(Raw::open(srv, "v")),
                        // A handshake and a request whose reply is never read.
                        _ => {
                            let (mut r, _, _) = Raw::open(srv, "v");
                            let _ = r.request(0, proto::CMD_READ, 1, 0, 1 << 20, &[]);
                        }
                    }
                }
            });
        }
    });
    eprintln!("1000 connections took {:?}", start.elapsed());
    still_serves(&mut srv);
    // The connection slots were released: 100 more simultaneous connections are served.
    let mut open: Vec<Raw> = (0..100).map(|_| Raw::open(&srv, "v").0).collect();
    for (i, r) in open.iter_mut().enumerate() {
        assert_eq!(r.read(i as u64, 0, 512).expect("read"), vec![0x77u8; 512]);
    }
    drop(open);
    still_serves(&mut srv);
}

#[test]
fn idle_half_open_connections_do_not_block_others() {
    let (_env, mut srv) = setup();
    let mut idle = Vec::new();
    for i in 0..50 {
        let mut r = Raw::connect(&srv);
        if i % 2 == 0 {
            r.greeting();
        }
        idle.push(r);
    }
    still_serves(&mut srv);
    drop(idle);
    still_serves(&mut srv);
}

#[test]
fn pipelined_requests_all_answered() {
    let (_env, mut srv) = setup();
    let (mut r, _, _) = Raw::open(&srv, "v");
    let mut w = Raw {
        s: r.s.try_clone().expect("clone"),
    };
    let n = 256u64;
    let writer = std::thread::spawn(move || {
        for i in 0..n {
            let data = pattern(8192, i);
            w.request(
                0,
                proto::CMD_WRITE,
                1000 + i,
                (4 << 20) + i * 8192,
                8192,
                &data,
            )
            .expect("send");
        }
    });
    let mut cookies: Vec<u64> = (0..n)
        .map(|_| {
            let (err, c) = r.reply().expect("reply");
            assert_eq!(err, 0, "write {c} failed");
            c
        })
        .collect();
    writer.join().expect("writer");
    cookies.sort_unstable();
    assert_eq!(
        cookies,
        (1000..1000 + n).collect::<Vec<_>>(),
        "each cookie answered exactly once"
    );
    for i in (0..n).step_by(17) {
        assert_eq!(
            r.read(5000 + i, (4 << 20) + i * 8192, 8192).expect("read"),
            pattern(8192, i)
        );
    }
    r.disconnect();
    still_serves(&mut srv);
}

#[test]
fn handshake_options() {
    let (_env, mut srv) = setup();
    let mut r = Raw::start(&srv);
    // Unknown option with a payload: ERR_UNSUP, payload skipped, negotiation continues.
    r.option(0x00ab_cdef, &pattern(300, 1)).expect("send");
    let rep = r.opt_reply().expect("reply");
    assert_eq!(
        (rep.option, rep.kind),
        (0x00ab_cdef, proto::REP_ERR_UNSUP),
        "{rep:?}"
    );
    // An option longer than the server reads: answered with an error, stream stays in sync.
    r.option(0x0000_0077, &vec![0x41; 200_000]).expect("send");
    let rep = r.opt_reply().expect("reply");
    assert_eq!(rep.option, 0x77);
    assert!(
        rep.kind & (1 << 31) != 0,
        "oversized option not refused: {rep:?}"
    );
    // NBD_OPT_LIST: one SERVER reply per export, then ACK.
    r.option(proto::OPT_LIST, &[]).expect("send");
    let mut names = Vec::new();
    loop {
        let rep = r.opt_reply().expect("reply");
        assert_eq!(rep.option, proto::OPT_LIST);
        match rep.kind {
            proto::REP_SERVER => {
                let len = be32(&rep.data) as usize;
                names.push(String::from_utf8(rep.data[4..4 + len].to_vec()).expect("utf8"));
            }
            proto::REP_ACK => break,
            k => panic!("unexpected reply {k:#x} to NBD_OPT_LIST"),
        }
    }
    assert_eq!(names, vec!["v".to_string()]);
    // NBD_OPT_INFO on the export: INFO_EXPORT with the size, then ACK; still negotiating.
    let mut d = Vec::new();
    d.extend_from_slice(&1u32.to_be_bytes());
    d.push(b'v');
    d.extend_from_slice(&0u16.to_be_bytes());
    r.option(proto::OPT_INFO, &d).expect("send");
    let mut size = None;
    loop {
        let rep = r.opt_reply().expect("reply");
        match rep.kind {
            proto::REP_INFO
                if u16::from_be_bytes([rep.data[0], rep.data[1]]) == proto::INFO_EXPORT =>
            {
                size = Some(be64(&rep.data[2..10]));
            }
            proto::REP_INFO => {}
            proto::REP_ACK => break,
            k => panic!("unexpected reply {k:#x} to NBD_OPT_INFO"),
        }
    }
    assert_eq!(size, Some(16 << 20));
    // Then GO and transmission.
    let (size, flags) = r.go("v").expect("GO");
    assert_eq!(size, 16 << 20);
    assert_eq!(flags & 1, 1, "HAS_FLAGS");
    assert_eq!(flags & proto::TFLAG_READ_ONLY, 0);
    assert_eq!(r.read(1, 0, 4096).expect("read"), vec![0x77u8; 4096]);
    r.disconnect();

    // NBD_OPT_ABORT: ACK, then the server closes.
    let mut r = Raw::start(&srv);
    r.option(proto::OPT_ABORT, &[]).expect("send");
    let rep = r.opt_reply().expect("abort reply");
    assert_eq!((rep.option, rep.kind), (proto::OPT_ABORT, proto::REP_ACK));
    r.expect_closed(CLOSE);

    // NBD_OPT_EXPORT_NAME (old clients) without NO_ZEROES: size, flags, 124 zero bytes.
    let mut r = Raw::connect(&srv);
    r.greeting();
    r.send(&1u32.to_be_bytes()).expect("flags");
    r.option(proto::OPT_EXPORT_NAME, b"v").expect("send");
    let b = r.recv(8 + 2 + 124).expect("EXPORT_NAME reply");
    assert_eq!(be64(&b[0..8]), 16 << 20);
    assert!(b[10..].iter().all(|&x| x == 0));
    assert_eq!(r.read(2, 4096, 4096).expect("read"), vec![0x77u8; 4096]);
    r.disconnect();
    // With NO_ZEROES: no padding.
    let mut r = Raw::start(&srv);
    r.option(proto::OPT_EXPORT_NAME, b"v").expect("send");
    let b = r.recv(10).expect("EXPORT_NAME reply");
    assert_eq!(be64(&b[0..8]), 16 << 20);
    assert_eq!(r.read(3, 8192, 512).expect("read"), vec![0x77u8; 512]);
    r.disconnect();
    // EXPORT_NAME of an unknown export: the server closes (it cannot send an error).
    let mut r = Raw::start(&srv);
    r.option(proto::OPT_EXPORT_NAME, b"nope").expect("send");
    r.expect_closed(CLOSE);
    still_serves(&mut srv);
}

#[test]
fn offsets_near_u64_max_are_refused_without_overflow() {
    let (_env, mut srv) = setup();
    let (mut r, _, _) = Raw::open(&srv, "v");
    let high = [
        u64::MAX,
        u64::MAX - 4095,
        u64::MAX - 511,
        1u64 << 63,
        u64::MAX - (16 << 20) + 1,
    ];
    let mut cookie = 100;
    for &off in &high {
        // (command, expected errno) for a 4 KiB range at `off`.
        for (cmd, want) in [
            (0u16, proto::EINVAL),
            (1, proto::ENOSPC),
            (4, proto::EINVAL),
            (5, proto::EINVAL),
            (6, proto::ENOSPC),
        ] {
            cookie += 1;
            let payload = if cmd == proto::CMD_WRITE {
                vec![0x66u8; 4096]
            } else {
                Vec::new()
            };
            r.request(0, cmd, cookie, off, 4096, &payload)
                .expect("send");
            let (err, c) = r.reply().expect("reply");
            assert_eq!(c, cookie);
            assert_eq!(
                err, want,
                "command {cmd} at offset {off:#x}: errno {err}, want {want}"
            );
        }
    }
    assert_eq!(r.read(1, 0, 4096).expect("read"), vec![0x77u8; 4096]);
    r.disconnect();
    still_serves(&mut srv);
}

#[test]
fn disc_after_pipelined_writes_completes_them() {
    let (_env, mut srv) = setup();
    let (mut r, _, _) = Raw::open(&srv, "v");
    // 64 writes and a DISC in one burst, without reading any reply first.
    let mut burst = Vec::new();
    for i in 0..64u64 {
        let data = pattern(16384, 500 + i);
        let mut h = Vec::new();
        h.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&proto::CMD_WRITE.to_be_bytes());
        h.extend_from_slice(&i.to_be_bytes());
        h.extend_from_slice(&((8 << 20) + i * 16384).to_be_bytes());
        h.extend_from_slice(&16384u32.to_be_bytes());
        burst.extend_from_slice(&h);
        burst.extend_from_slice(&data);
    }
    let mut disc = Vec::new();
    disc.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
    disc.extend_from_slice(&0u16.to_be_bytes());
    disc.extend_from_slice(&proto::CMD_DISC.to_be_bytes());
    disc.extend_from_slice(&[0u8; 20]);
    burst.extend_from_slice(&disc);
    let mut w = Raw {
        s: r.s.try_clone().expect("clone"),
    };
    let writer = std::thread::spawn(move || w.send(&burst));
    // The server answers every write sent before DISC, then closes.
    let tail = r.expect_closed(CLOSE);
    writer.join().expect("writer").expect("send burst");
    assert_eq!(
        tail.len(),
        64 * 16,
        "expected 64 simple replies before the close"
    );
    for rep in tail.chunks(16) {
        assert_eq!(be32(&rep[0..4]), proto::SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&rep[4..8]), 0, "a write before DISC failed");
    }
    let (mut r, _, _) = Raw::open(&srv, "v");
    for i in 0..64u64 {
        let got = r.read(i, (8 << 20) + i * 16384, 16384).expect("read");
        assert!(
            got == pattern(16384, 500 + i),
            "write {i} sent before DISC was lost"
        );
    }
    r.disconnect();
    still_serves(&mut srv);
}

#[test]
fn multi_conn_coherence() {
    let (_env, mut srv) = setup();
    let (mut a, _, fa) = Raw::open(&srv, "v");
    let (mut b, _, _) = Raw::open(&srv, "v");
    assert!(fa & (1 << 8) != 0, "CAN_MULTI_CONN not advertised");
    for i in 0..32u64 {
        let data = pattern(4096 + (i as usize) * 100, 900 + i);
        let off = (3 << 20) + i * 20000 + 3;
        assert_eq!(a.write(i, off, &data), 0);
        // Visible to the other connection as soon as the write is acknowledged.
        assert!(
            b.read(i, off, data.len() as u32).expect("read") == data,
            "connection B saw stale data"
        );
        // And after a FLUSH on B, still.
        b.request(0, proto::CMD_FLUSH, 1000 + i, 0, 0, &[])
            .expect("flush");
        assert_eq!(b.reply().expect("flush reply"), (0, 1000 + i));
    }
    a.disconnect();
    b.disconnect();
    still_serves(&mut srv);
}

#[test]
fn max_size_requests_under_a_small_budget() {
    let env = Env::new();
    let vol = env.create("v.img", "64M", &[]);
    let mut srv = env.serve(&[s(&vol)], &["--max-inflight", "1M"], false);
    qemu_io(&srv.uri("v"), &["write -P 0x77 0 1M"]);
    let big = pattern(32 << 20, 1);
    std::thread::scope(|sc| {
        for t in 0..3u64 {
            let srv = &srv;
            let big = &big;
            sc.spawn(move || {
                let (mut r, _, _) = Raw::open(srv, "v");
                // Each thread its own 8 MiB region (unaligned start), all larger than the budget.
                let off = (16 << 20) + t * ((8 << 20) + 4096) + 512;
                let mine = &big[(t as usize) << 20..((t as usize) << 20) + (8 << 20)];
                assert_eq!(r.write(1, off, mine), 0, "8 MiB write");
                assert!(
                    r.read(2, off, 8 << 20).expect("8 MiB read") == mine,
                    "8 MiB read back"
                );
                assert!(r.read(3, 0, 32 << 20).expect("32 MiB read").len() == 32 << 20);
                r.disconnect();
            });
        }
    });
    let (mut r, _, _) = Raw::open(&srv, "v");
    assert_eq!(r.write(9, 0, &big), 0, "32 MiB write");
    assert!(r.read(10, 0, 32 << 20).expect("read") == big);
    r.disconnect();
    assert!(srv.alive());
    qemu_io(&srv.uri("v"), &["write -P 0x77 0 1M"]);
    still_serves(&mut srv);
}

#[test]
fn malformed_options_are_refused_and_negotiation_continues() {
    let (_env, mut srv) = setup();
    let mut r = Raw::start(&srv);
    let go = |name_len: u32, name: &[u8], n_info: u16, infos: &[u8]| {
        let mut d = Vec::new();
        d.extend_from_slice(&name_len.to_be_bytes());
        d.extend_from_slice(name);
        d.extend_from_slice(&n_info.to_be_bytes());
        d.extend_from_slice(infos);
        d
    };
    let cases: Vec<(u32, Vec<u8>, &str)> = vec![
        (
            proto::OPT_GO,
            go(u32::MAX, b"v", 0, &[]),
            "name length beyond the option",
        ),
        (
            proto::OPT_GO,
            go(1, b"v", 5, &[0, 3]),
            "info count beyond the option",
        ),
        (proto::OPT_GO, go(1, b"v", 1, &[0, 3, 9]), "trailing byte"),
        (proto::OPT_GO, vec![0, 0], "shorter than a name length"),
        (
            proto::OPT_INFO,
            go(2, b"\xff\xfe", 0, &[]),
            "name not UTF-8",
        ),
        (
            proto::OPT_GO,
            go(5000, &[b'x'; 5000], 0, &[]),
            "5000-byte unknown name",
        ),
        (proto::OPT_LIST, b"junk".to_vec(), "LIST with data"),
        (5, Vec::new(), "STARTTLS (no TLS configured)"),
        (10, go(1, b"v", 0, &[]), "SET_META_CONTEXT (malformed)"),
        (11, b"x".to_vec(), "EXTENDED_HEADERS with data"),
    ];
    for (opt, data, what) in &cases {
        r.option(*opt, data).expect("send");
        // Any number of informational replies, then exactly one final error reply.
        loop {
            let rep = r
                .opt_reply()
                .unwrap_or_else(|e| panic!("{what}: no reply ({e})"));
            assert_eq!(rep.option, *opt, "{what}: reply does not echo the option");
            if rep.kind == proto::REP_INFO || rep.kind == proto::REP_SERVER {
                continue;
            }
            assert!(
                rep.kind & (1 << 31) != 0,
                "{what}: accepted ({:#x})",
                rep.kind
            );
            assert!(
                rep.data.len() < 4096,
                "{what}: error message of {} bytes",
                rep.data.len()
            );
            break;
        }
    }
    // Negotiation still works after all of that.
    let (size, _) = r.go("v").expect("GO after malformed options");
    assert_eq!(size, 16 << 20);
    assert_eq!(r.read(1, 0, 4096).expect("read"), vec![0x77u8; 4096]);
    r.disconnect();
    still_serves(&mut srv);
}

/// Many clients (and many pipelined requests per client) write disjoint sub-sector bytes
/// of the same sectors at once: every byte must end up with its writer's value (no lost
/// update in the read-modify-write of partial sectors). Rounds are separated by waiting
/// for all replies, since the protocol does not order requests that are in flight together.
fn concurrent_partial_sector_writes(sector: &str) {
    let env = Env::new();
    let vol = env.create("v.img", "8M", &["--sector-size", sector]);
    let srv = env.serve(&[s(&vol)], &[], false);
    const THREADS: u64 = 6;
    const REGION: u64 = 2 * 4096; // spans several sectors
    const BASE: u64 = 1 << 20;
    const ROUNDS: u8 = 3;
    let value = |round: u8, t: u64| round.wrapping_mul(31).wrapping_add(t as u8 + 1);
    std::thread::scope(|sc| {
        for t in 0..THREADS {
            let srv = &srv;
            sc.spawn(move || {
                let (mut r, _, _) = Raw::open(srv, "v");
                for round in 1..=ROUNDS {
                    let mut w = Raw {
                        s: r.s.try_clone().expect("clone"),
                    };
                    // Thread t owns the bytes at offsets ≡ t (mod THREADS).
                    let writer = std::thread::spawn(move || {
                        let mut sent = 0u64;
                        let mut off = t;
                        while off < REGION {
                            w.request(0, proto::CMD_WRITE, off, BASE + off, 1, &[value(round, t)])
                                .expect("send");
                            sent += 1;
                            off += THREADS;
                        }
                        sent
                    });
                    let n = (REGION - t).div_ceil(THREADS);
                    for _ in 0..n {
                        let (err, _) = r.reply().expect("reply");
                        assert_eq!(err, 0);
                    }
                    assert_eq!(writer.join().expect("writer"), n);
                }
                r.disconnect();
            });
        }
    });
    let (mut r, _, _) = Raw::open(&srv, "v");
    let got = r.read(1, BASE, REGION as u32).expect("read");
    for (i, &b) in got.iter().enumerate() {
        let t = i as u64 % THREADS;
        assert_eq!(b, value(ROUNDS, t), "byte {i} (owner {t}) lost an update");
    }
    r.disconnect();
}

#[test]
fn concurrent_partial_sector_writes_4096() {
    concurrent_partial_sector_writes("4096");
}

#[test]
fn concurrent_partial_sector_writes_512() {
    concurrent_partial_sector_writes("512");
}
