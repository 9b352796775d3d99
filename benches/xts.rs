//! Throughput of the AES-256-XTS sector engine.
//!
//! `cargo bench --bench xts`. Compare with `openssl speed -evp aes-256-xts -bytes 4096`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cryptvol::crypto::{Dek, XtsEngine};

const BUF_LEN: usize = 1 << 20;

fn engine(sector_size: usize) -> XtsEngine {
    let key: Vec<u8> = (0u8..64).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
    let dek = Dek::from_slice(&key).expect("benchmark key is valid");
    XtsEngine::new(&dek, sector_size).expect("benchmark sector size is valid")
}

fn bench_xts(c: &mut Criterion) {
    // Large buffers: many sectors per call.
    let mut group = c.benchmark_group("xts_1MiB");
    group.throughput(Throughput::Bytes(BUF_LEN as u64));
    for sector_size in [512usize, 4096] {
        let engine = engine(sector_size);
        let mut buf = vec![0x3cu8; BUF_LEN];
        group.bench_with_input(
            BenchmarkId::new("encrypt", sector_size),
            &sector_size,
            |b, _| {
                b.iter(|| {
                    engine
                        .encrypt_sectors(black_box(&mut buf), black_box(1 << 33))
                        .expect("aligned")
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("decrypt", sector_size),
            &sector_size,
            |b, _| {
                b.iter(|| {
                    engine
                        .decrypt_sectors(black_box(&mut buf), black_box(1 << 33))
                        .expect("aligned")
                })
            },
        );
    }
    group.finish();

    // One sector per call, as a 512-byte or 4 KiB random write would do.
    let mut group = c.benchmark_group("xts_one_sector");
    for sector_size in [512usize, 4096] {
        group.throughput(Throughput::Bytes(sector_size as u64));
        let engine = engine(sector_size);
        let mut buf = vec![0x3cu8; sector_size];
        group.bench_with_input(
            BenchmarkId::new("encrypt", sector_size),
            &sector_size,
            |b, _| {
                b.iter(|| {
                    engine
                        .encrypt_sectors(black_box(&mut buf), black_box(12345))
                        .expect("aligned")
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("decrypt", sector_size),
            &sector_size,
            |b, _| {
                b.iter(|| {
                    engine
                        .decrypt_sectors(black_box(&mut buf), black_box(12345))
                        .expect("aligned")
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench_xts);
criterion_main!(benches);
