//! The data path without sockets: the XTS engine alone, and 4 KiB / 1 MiB reads and
//! writes through the volume layer (`Volume::read_at`, `Volume::write_at_mut`) on a
//! volume in a temporary directory.
//!
//! `cargo bench --bench datapath` (all), `cargo bench --bench datapath -- xts` (the
//! engine only; `scripts/bench.sh` compares it with `openssl speed -evp aes-256-xts`).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use cryptvol::crypto::{Dek, SectorSize, XtsEngine};
use cryptvol::keys::{EncryptionContext, WrappedDek};
use cryptvol::volume::{self, OpenOptions, Volume, VolumeSpec};

const SECTOR: usize = 4096;
const MIB: usize = 1 << 20;
/// Volume size: large enough that random 4 KiB offsets rarely repeat in the CPU caches,
/// small enough to prefill in about a second and to stay in the page cache.
const VOLUME_SIZE: u64 = 256 << 20;

/// A small deterministic generator for offsets (xorshift64*); no extra crate needed.
struct Offsets(u64);

impl Offsets {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A random offset aligned to `unit` such that `[offset, offset + unit)` fits.
    fn aligned(&mut self, unit: u64) -> u64 {
        (self.next() % (VOLUME_SIZE / unit)) * unit
    }
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("datapath bench: {what}: {e}");
    std::process::exit(1)
}

/// Creates a volume in `dir` (a keyslot that no backend could unwrap: the bench holds
/// the DEK itself), opens it, and fills its data area so reads hit real ciphertext in
/// the page cache rather than holes.
fn bench_volume(dir: &Path) -> Volume {
    let path = dir.join("bench.img");
    let uuid = uuid::Uuid::new_v4();
    let dek = Dek::generate().unwrap_or_else(|e| fail("generate a DEK", e));
    let slot = WrappedDek {
        backend: "local".into(),
        key_id: "bench-dummy".into(),
        blob: vec![0xA5; 60],
        context: EncryptionContext::for_volume(&uuid),
        params: BTreeMap::new(),
    };
    let spec = VolumeSpec {
        size: VOLUME_SIZE,
        sector_size: SECTOR as u32,
    };
    let header = volume::create(&path, &spec, uuid, vec![slot], &dek)
        .unwrap_or_else(|e| fail("create the volume", e));
    let vol = Volume::open(&path, &header, dek, OpenOptions::default())
        .unwrap_or_else(|e| fail("open the volume", e));
    let mut chunk = vec![0u8; MIB];
    let mut rng = Offsets(0x9E37_79B9_7F4A_7C15);
    for off in (0..VOLUME_SIZE).step_by(MIB) {
        for w in chunk.chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next().to_le_bytes());
        }
        vol.write_at(&chunk, off, false)
            .unwrap_or_else(|e| fail("prefill the volume", e));
    }
    vol
}

fn xts(c: &mut Criterion) {
    let dek = Dek::generate().unwrap_or_else(|e| fail("generate a DEK", e));
    let engine = XtsEngine::new(
        &dek,
        SectorSize::try_from(SECTOR).expect("benchmark sector size is valid"),
    )
    .unwrap_or_else(|e| fail("key the engine", e));
    let mut buf = vec![0x5Au8; MIB];
    let mut g = c.benchmark_group("xts");
    g.throughput(Throughput::Bytes(MIB as u64));
    // 1 MiB = 256 sectors of 4096 bytes per iteration, as one call (a 1 MiB request).
    g.bench_function("encrypt_4096B_sectors_1MiB", |b| {
        b.iter(|| {
            engine
                .encrypt_sectors(black_box(&mut buf), 12345)
                .unwrap_or_else(|e| fail("encrypt", e))
        })
    });
    g.bench_function("decrypt_4096B_sectors_1MiB", |b| {
        b.iter(|| {
            engine
                .decrypt_sectors(black_box(&mut buf), 12345)
                .unwrap_or_else(|e| fail("decrypt", e))
        })
    });
    // One 4096-byte sector per call (a 4 KiB request), 256 calls per iteration.
    g.bench_function("encrypt_4096B_one_call_per_sector_1MiB", |b| {
        b.iter(|| {
            for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
                engine
                    .encrypt_sectors(black_box(s), i as u64)
                    .unwrap_or_else(|e| fail("encrypt", e))
            }
        })
    });
    g.finish();
}

fn volume_io(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| fail("create a temporary directory", e));
    let vol = bench_volume(dir.path());
    let mut rng = Offsets(0x2545_F491_4F6C_DD1D);

    let mut g = c.benchmark_group("volume_4KiB_random");
    g.throughput(Throughput::Elements(1));
    let mut buf = vec![0u8; SECTOR];
    g.bench_function("read_at", |b| {
        b.iter(|| {
            let off = rng.aligned(SECTOR as u64);
            vol.read_at(black_box(&mut buf), off)
                .unwrap_or_else(|e| fail("read", e))
        })
    });
    g.bench_function("write_at_mut", |b| {
        // The buffer holds ciphertext after each call; its content does not matter here.
        let mut data = vec![0x33u8; SECTOR];
        b.iter(|| {
            let off = rng.aligned(SECTOR as u64);
            vol.write_at_mut(black_box(&mut data), off, false)
                .unwrap_or_else(|e| fail("write", e))
        })
    });
    g.bench_function("write_at", |b| {
        let data = vec![0x33u8; SECTOR];
        b.iter(|| {
            let off = rng.aligned(SECTOR as u64);
            vol.write_at(black_box(&data), off, false)
                .unwrap_or_else(|e| fail("write", e))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("volume_1MiB_random");
    g.throughput(Throughput::Bytes(MIB as u64));
    let mut buf = vec![0u8; MIB];
    g.bench_function("read_at", |b| {
        b.iter(|| {
            let off = rng.aligned(MIB as u64);
            vol.read_at(black_box(&mut buf), off)
                .unwrap_or_else(|e| fail("read", e))
        })
    });
    g.bench_function("write_at_mut", |b| {
        // The buffer holds ciphertext after each call; its content does not matter here.
        let mut data = vec![0x33u8; MIB];
        b.iter(|| {
            let off = rng.aligned(MIB as u64);
            vol.write_at_mut(black_box(&mut data), off, false)
                .unwrap_or_else(|e| fail("write", e))
        })
    });
    g.finish();
    drop(vol);
    if let Err(e) = dir.close() {
        eprintln!("datapath bench: could not remove the temporary directory: {e}");
    }
}

criterion_group!(benches, xts, volume_io);
criterion_main!(benches);
