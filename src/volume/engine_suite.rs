//! The shared backend test suite of the file engines: every [`FileEngine`] must pass
//! the same tests, run here against [`StdFileEngine`] and [`UringFileEngine`] (the
//! `engine_suite!` macro instantiates them per engine), then the volume's verified I/O
//! on thin and thick volumes with each engine, then the engine selection.

use std::fs::File;
use std::sync::Arc;

use super::engine::FileEngine;
use super::engine_select::{decide, describe, open_engine_with, EngineChoice, EngineKind};

/// A fresh read-write temporary file and the engine `make` builds over it.
fn fixture(
    make: fn(Arc<File>) -> Box<dyn FileEngine>,
) -> (tempfile::NamedTempFile, Box<dyn FileEngine>) {
    let f = tempfile::NamedTempFile::new().expect("tmp");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.path())
        .expect("open");
    (f, make(Arc::new(file)))
}

/// Bytes that differ at every offset (and between `seed`s).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            (i.wrapping_mul(31) ^ seed.wrapping_mul(0x9E37_79B9)).to_le_bytes()[0] ^ (i >> 8) as u8
        })
        .collect()
}

fn reads_past_the_end_as_zeros_and_writes_at_offsets(e: &dyn FileEngine) {
    e.write_all_at(b"abcd", 10).expect("write");
    assert_eq!(e.len().expect("len"), 14);
    let mut buf = [0xFFu8; 8];
    e.read_exact_at(&mut buf, 8).expect("read");
    assert_eq!(&buf, b"\0\0abcd\0\0");
    let mut far = [0xFFu8; 16];
    e.read_exact_at(&mut far, 1 << 20)
        .expect("read far past the end");
    assert_eq!(far, [0u8; 16]);
    e.write_all_at(b"xy", 11).expect("overwrite");
    e.read_exact_at(&mut buf[..4], 10).expect("read back");
    assert_eq!(&buf[..4], b"axyd");
}

fn punching_keeps_the_size_and_reads_zeros(e: &dyn FileEngine) {
    e.write_all_at(&[7u8; 3 * 4096], 0).expect("write");
    e.punch_hole(4096, 4096).expect("punch");
    assert_eq!(e.len().expect("len"), 3 * 4096);
    let mut buf = [0xFFu8; 3 * 4096];
    e.read_exact_at(&mut buf, 0).expect("read");
    assert!(buf[..4096].iter().all(|&b| b == 7));
    // Filesystems without hole punching leave the data: both are correct.
    let hole = &buf[4096..8192];
    assert!(hole.iter().all(|&b| b == 0) || hole.iter().all(|&b| b == 7));
    assert!(buf[8192..].iter().all(|&b| b == 7));
    assert_eq!(
        e.punch_hole(u64::MAX - 1, 4096)
            .map_err(|x| x.raw_os_error()),
        Err(Some(libc::EFBIG)),
        "an offset beyond i64 is refused"
    );
}

fn synced_writes_are_in_the_file(e: &dyn FileEngine, path: &std::path::Path) {
    let data = pattern(10_000, 1);
    e.write_all_at(&data, 3).expect("write");
    e.sync_data().expect("sync");
    let on_disk = std::fs::read(path).expect("read the file");
    assert_eq!(&on_disk[3..], &data[..]);
    assert_eq!(on_disk[..3], [0, 0, 0]);
}

fn large_buffers_and_reads_straddling_the_end(e: &dyn FileEngine) {
    let data = pattern(9 << 20, 2);
    let at = 4096 * 3 + 512;
    e.write_all_at(&data, at).expect("write 9 MiB");
    let mut back = vec![0u8; data.len()];
    e.read_exact_at(&mut back, at).expect("read 9 MiB");
    assert!(back == data, "9 MiB read back differs");
    // A read that ends 1 MiB past the end: a short read, then zeros.
    let mut tail = vec![0xEEu8; 2 << 20];
    let start = at + data.len() as u64 - (1 << 20);
    e.read_exact_at(&mut tail, start)
        .expect("read across the end");
    assert!(tail[..1 << 20] == data[data.len() - (1 << 20)..]);
    assert!(tail[1 << 20..].iter().all(|&b| b == 0));
}

fn many_threads_at_once(e: &dyn FileEngine) {
    const THREADS: u64 = 8;
    const BLOCKS: u64 = 64;
    const BLOCK: usize = 4096;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            s.spawn(move || {
                for b in 0..BLOCKS {
                    // Interleaved blocks: neighbours belong to other threads.
                    let off = (b * THREADS + t) * BLOCK as u64;
                    let data = pattern(BLOCK, off);
                    e.write_all_at(&data, off).expect("write");
                    let mut back = vec![0u8; BLOCK];
                    e.read_exact_at(&mut back, off).expect("read");
                    assert!(back == data, "thread {t} block {b} differs");
                    if b % 16 == 0 {
                        e.sync_data().expect("sync");
                    }
                }
            });
        }
    });
    let mut all = vec![0u8; (THREADS * BLOCKS) as usize * BLOCK];
    e.read_exact_at(&mut all, 0).expect("read all");
    for (i, block) in all.chunks(BLOCK).enumerate() {
        assert!(
            block == pattern(BLOCK, (i * BLOCK) as u64),
            "block {i} differs"
        );
    }
}

fn errors_are_returned_not_panics(make: fn(Arc<File>) -> Box<dyn FileEngine>) {
    let f = tempfile::NamedTempFile::new().expect("tmp");
    std::os::unix::fs::FileExt::write_all_at(f.as_file(), b"data", 0).expect("seed");
    let ro = File::open(f.path()).expect("open read-only");
    let e = make(Arc::new(ro));
    let err = e
        .write_all_at(b"x", 0)
        .expect_err("write on a read-only fd");
    assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    let mut buf = [0u8; 4];
    e.read_exact_at(&mut buf, 0)
        .expect("reads still work after an error");
    assert_eq!(&buf, b"data");
}

fn two_engines_on_one_thread(make: fn(Arc<File>) -> Box<dyn FileEngine>) {
    let (_a, ea) = fixture(make);
    let (_b, eb) = fixture(make);
    for i in 0..32u64 {
        ea.write_all_at(&[1u8; 512], i * 512).expect("write a");
        eb.write_all_at(&[2u8; 512], i * 512).expect("write b");
    }
    let mut buf = vec![0u8; 32 * 512];
    ea.read_exact_at(&mut buf, 0).expect("read a");
    assert!(buf.iter().all(|&b| b == 1));
    eb.read_exact_at(&mut buf, 0).expect("read b");
    assert!(buf.iter().all(|&b| b == 2));
}

macro_rules! engine_suite {
    ($name:ident, $make:expr) => {
        mod $name {
            use super::*;

            fn make(file: Arc<File>) -> Box<dyn FileEngine> {
                Box::new($make(file))
            }

            #[test]
            fn reads_past_the_end_as_zeros_and_writes_at_offsets() {
                let (_f, e) = fixture(make);
                super::reads_past_the_end_as_zeros_and_writes_at_offsets(e.as_ref());
            }

            #[test]
            fn punching_keeps_the_size_and_reads_zeros() {
                let (_f, e) = fixture(make);
                super::punching_keeps_the_size_and_reads_zeros(e.as_ref());
            }

            #[test]
            fn synced_writes_are_in_the_file() {
                let (f, e) = fixture(make);
                super::synced_writes_are_in_the_file(e.as_ref(), f.path());
            }

            #[test]
            fn large_buffers_and_reads_straddling_the_end() {
                let (_f, e) = fixture(make);
                super::large_buffers_and_reads_straddling_the_end(e.as_ref());
            }

            #[test]
            fn many_threads_at_once() {
                let (_f, e) = fixture(make);
                super::many_threads_at_once(e.as_ref());
            }

            #[test]
            fn errors_are_returned_not_panics() {
                super::errors_are_returned_not_panics(make);
            }

            #[test]
            fn two_engines_on_one_thread() {
                super::two_engines_on_one_thread(make);
            }
        }
    };
}

engine_suite!(std_engine, super::super::engine::StdFileEngine::new);
engine_suite!(
    uring_engine,
    super::super::engine_uring::UringFileEngine::new
);

mod volume_with_each_engine {
    use super::*;
    use crate::crypto::Dek;
    use crate::volume::header::create_with;
    use crate::volume::header::tests::{dummy_slot, new_volume};
    use crate::volume::io::test_support::Rng;
    use crate::volume::{OpenOptions, Volume, VolumeSpec};

    const SIZE: u64 = 8 << 20;

    fn open(thin: bool, engine: EngineChoice) -> (tempfile::TempDir, Volume, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, dek) = if thin {
            new_volume(dir.path(), SIZE, 4096)
        } else {
            let path = dir.path().join("thick.img");
            let uuid = uuid::Uuid::new_v4();
            let dek = Dek::generate().expect("dek");
            let spec = VolumeSpec {
                size: SIZE,
                sector_size: 4096,
            };
            let h = create_with(
                &path,
                &spec,
                uuid,
                vec![dummy_slot(&uuid, "a")],
                &dek,
                false,
            )
            .expect("create thick");
            (path, h, dek)
        };
        let opts = OpenOptions {
            engine,
            ..OpenOptions::default()
        };
        let v = Volume::open(&path, &h, dek, opts).expect("open");
        (dir, v, path)
    }

    /// Random writes of random lengths checked against a model, across a flush.
    fn verified_io(thin: bool, engine: EngineChoice, want: &str) {
        let (_d, v, path) = open(thin, engine);
        assert_eq!(v.engine_name(), want);
        let mut model = vec![0u8; SIZE as usize];
        if !thin {
            // Never-written blocks of a thick volume read as noise: start from a full write.
            v.write_at(&model, 0, false).expect("zero the thick volume");
        }
        let mut rng = Rng(0x5EED ^ u64::from(thin));
        for i in 0..100u64 {
            let len = 1 + rng.below(32 << 10) as usize;
            let off = rng.below(SIZE - len as u64);
            let data = pattern(len, i);
            v.write_at(&data, off, i % 25 == 0).expect("write");
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        v.flush().expect("flush");
        let mut back = vec![0u8; SIZE as usize];
        v.read_at(&mut back, 0).expect("read all");
        assert!(back == model, "the volume differs from the model");
        // The first write's plaintext (seed 0) is nowhere in the file.
        let raw = std::fs::read(&path).expect("raw file");
        let needle = &pattern(32, 0)[..];
        assert!(!raw.windows(32).any(|w| w == needle), "plaintext on disk");
    }

    #[test]
    fn thin_volume_with_threads() {
        verified_io(true, EngineChoice::Threads, "threads");
    }

    #[test]
    fn thin_volume_with_uring() {
        verified_io(true, EngineChoice::Uring, "io_uring");
    }

    #[test]
    fn thick_volume_with_threads() {
        verified_io(false, EngineChoice::Threads, "threads");
    }

    #[test]
    fn thick_volume_with_uring() {
        verified_io(false, EngineChoice::Uring, "io_uring");
    }

    #[test]
    fn auto_picks_threads_for_a_buffered_file() {
        let (_d, v, _) = open(true, EngineChoice::Auto);
        assert_eq!(
            v.engine_name(),
            "threads",
            "auto is the engine measured faster on buffered files"
        );
    }
}

mod selection {
    use super::*;

    fn failing_probe() -> Result<(), String> {
        Err("io_uring_setup: Operation not permitted".into())
    }

    #[test]
    fn explicit_choices() {
        let threads =
            decide(EngineChoice::Threads, || panic!("threads needs no probe")).expect("threads");
        assert_eq!(threads, EngineKind::Threads);
        let uring = decide(EngineChoice::Uring, || Ok(())).expect("uring");
        assert_eq!(uring, EngineKind::Uring);
        let auto = decide(EngineChoice::Auto, || panic!("auto needs no probe")).expect("auto");
        assert_eq!(auto, EngineKind::Threads);
        let line = describe(uring, EngineChoice::Uring, "/v.img");
        assert_eq!(line, "/v.img: file engine io_uring (--engine uring)");
    }

    #[test]
    fn a_failed_probe_refuses_uring_and_names_the_way_out() {
        let err = decide(EngineChoice::Uring, failing_probe).expect_err("uring is refused");
        assert!(
            err.contains("--engine threads") && err.contains("Operation not permitted"),
            "{err}"
        );
        let f = tempfile::NamedTempFile::new().expect("tmp");
        let file = Arc::new(f.reopen().expect("reopen"));
        let path = std::path::Path::new("/v.img");
        let err = open_engine_with(file.clone(), EngineChoice::Uring, path, failing_probe)
            .expect_err("no engine without io_uring");
        assert!(err.contains("io_uring engine is unavailable"), "{err}");
        let e = open_engine_with(file, EngineChoice::Auto, path, failing_probe).expect("auto");
        assert_eq!(e.name(), "threads");
    }

    #[test]
    fn the_real_probe_succeeds_here() {
        super::super::engine_uring::probe().expect("this kernel supports io_uring");
    }

    #[test]
    fn names_parse_and_print() {
        for name in EngineChoice::NAMES {
            let c: EngineChoice = name.parse().expect("parse");
            assert_eq!(c.to_string(), name);
        }
        assert!("fast".parse::<EngineChoice>().is_err());
        assert_eq!(EngineChoice::default(), EngineChoice::Auto);
    }
}

/// The `O_DIRECT` engines (`serve --direct`) over a fixture's file, opened again with
/// `O_DIRECT` through /proc/self/fd. The fixtures' temporary files are on ext4 here
/// (`stat -f /tmp`), which supports it.
mod direct {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;
    use crate::volume::engine_direct::{DirectFileEngine, ALIGN, BOUNCE_MAX};

    fn reopen_direct(file: &File) -> File {
        let flags =
            nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).expect("F_GETFL");
        std::fs::OpenOptions::new()
            .read(true)
            .write(flags & libc::O_ACCMODE == libc::O_RDWR)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .expect("open with O_DIRECT")
    }

    pub(super) fn threads(file: Arc<File>) -> DirectFileEngine {
        DirectFileEngine::new(EngineKind::Threads, Arc::new(reopen_direct(&file)), file)
    }

    pub(super) fn uring(file: Arc<File>) -> DirectFileEngine {
        DirectFileEngine::new(EngineKind::Uring, Arc::new(reopen_direct(&file)), file)
    }

    /// An aligned window of `len` bytes in `v`.
    fn aligned(v: &mut Vec<u8>, len: usize) -> &mut [u8] {
        v.resize(len + ALIGN, 0);
        let start = v.as_ptr().align_offset(ALIGN);
        &mut v[start..start + len]
    }

    /// Aligned ranges (aligned and unaligned buffers, bounced in pieces), unaligned
    /// ranges through the buffered descriptor, each seeing the other's writes, and a
    /// direct read across an end of file inside a block.
    fn aligned_io_goes_direct_and_stays_coherent(e: &dyn FileEngine) {
        let big = pattern(2 * BOUNCE_MAX + 3 * ALIGN, 3);
        e.write_all_at(&big, ALIGN as u64).expect("bounced write");
        let mut back = vec![0u8; big.len()];
        e.read_exact_at(&mut back, ALIGN as u64)
            .expect("bounced read");
        assert!(back == big, "bounced I/O differs");

        let mut store = Vec::new();
        let block = aligned(&mut store, 2 * ALIGN);
        block.copy_from_slice(&pattern(2 * ALIGN, 4));
        e.write_all_at(block, 0).expect("aligned write");
        // A buffered write inside the first block, read back by a direct read.
        e.write_all_at(&[0xAB; 512], 512).expect("unaligned write");
        let mut store2 = Vec::new();
        let out = aligned(&mut store2, 2 * ALIGN);
        e.read_exact_at(out, 0).expect("aligned read");
        let mut want = pattern(2 * ALIGN, 4);
        want[512..1024].fill(0xAB);
        assert!(
            out == &want[..],
            "the direct read misses the buffered write"
        );
        // A direct write, read back by a buffered (unaligned) read.
        e.write_all_at(&[0xCD; ALIGN], 0).expect("direct write");
        let mut small = [0u8; 100];
        e.read_exact_at(&mut small, 500).expect("unaligned read");
        assert_eq!(
            small, [0xCD; 100],
            "the buffered read misses the direct write"
        );

        // The end of the file 100 bytes into a block: a direct read gets them, then zeros.
        let end = 40 * ALIGN as u64;
        e.write_all_at(&pattern(2 * ALIGN, 5), end).expect("write");
        e.set_len(end + 100).expect("shorten");
        let mut tail = vec![0xEEu8; 2 * ALIGN];
        e.read_exact_at(&mut tail, end)
            .expect("read across the end");
        assert!(tail[..100] == pattern(100, 5)[..]);
        assert!(tail[100..].iter().all(|&b| b == 0));
        e.sync_data().expect("sync");
    }

    #[test]
    fn threads_direct_aligned_io() {
        let (_f, e) = fixture(|f| Box::new(threads(f)));
        assert_eq!(e.name(), "threads+direct");
        aligned_io_goes_direct_and_stays_coherent(e.as_ref());
    }

    #[test]
    fn uring_direct_aligned_io() {
        let (_f, e) = fixture(|f| Box::new(uring(f)));
        assert_eq!(e.name(), "io_uring+direct");
        aligned_io_goes_direct_and_stays_coherent(e.as_ref());
    }
}

engine_suite!(std_direct_engine, direct::threads);
engine_suite!(uring_direct_engine, direct::uring);

/// The volume's verified I/O with `O_DIRECT`, on 4096- and 512-byte sector volumes.
mod volume_direct {
    use super::*;
    use crate::volume::header::tests::new_volume;
    use crate::volume::io::test_support::Rng;
    use crate::volume::{OpenOptions, Volume};

    const SIZE: u64 = 8 << 20;

    fn verified_direct_io(sector_size: u32, engine: EngineChoice, want: &str) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, h, dek) = new_volume(dir.path(), SIZE, sector_size);
        let opts = OpenOptions {
            engine,
            direct: true,
            ..OpenOptions::default()
        };
        let v = Volume::open(&path, &h, dek, opts).expect("open with --direct");
        assert_eq!(v.engine_name(), want);
        let mut model = vec![0u8; SIZE as usize];
        let mut rng = Rng(0xD1EC7 ^ u64::from(sector_size));
        for i in 0..100u64 {
            // Half the writes 4 KiB-aligned whole blocks, half anywhere.
            let (off, len) = if i % 2 == 0 {
                let blocks = 1 + rng.below(16);
                let at = rng.below(SIZE / 4096 - blocks) * 4096;
                (at, (blocks * 4096) as usize)
            } else {
                let len = 1 + rng.below(32 << 10) as usize;
                (rng.below(SIZE - len as u64), len)
            };
            let data = pattern(len, i);
            v.write_at(&data, off, i % 25 == 0).expect("write");
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        v.flush().expect("flush");
        let mut back = vec![0u8; SIZE as usize];
        v.read_at(&mut back, 0).expect("read all");
        assert!(back == model, "the volume differs from the model");
    }

    #[test]
    fn threads_direct_4096() {
        verified_direct_io(4096, EngineChoice::Threads, "threads+direct");
    }

    #[test]
    fn threads_direct_512() {
        verified_direct_io(512, EngineChoice::Threads, "threads+direct");
    }

    #[test]
    fn uring_direct_4096() {
        verified_direct_io(4096, EngineChoice::Uring, "io_uring+direct");
    }

    #[test]
    fn uring_direct_512() {
        verified_direct_io(512, EngineChoice::Uring, "io_uring+direct");
    }

    #[test]
    fn auto_with_direct_is_threads_direct() {
        verified_direct_io(4096, EngineChoice::Auto, "threads+direct");
    }
}
