//! Throughput of the AES-256-XTS sector engine.
//!
//! `cargo bench --bench xts`. Compare with
//! `openssl speed -evp aes-256-xts -bytes 4096` (and `-bytes 512`), which encrypts one
//! data unit per call like the `xts_one_call_one_unit` group here.
//!
//! Time is measured as the benchmark thread's CPU time by default, like `openssl speed`
//! (which divides by CPU user time), so that figures stay comparable on a shared,
//! busy machine. Set `XTS_BENCH_WALL_CLOCK=1` to measure wall-clock time instead.

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BenchmarkId, Criterion, Throughput};
use cryptvol::crypto::{Dek, SectorSize, XtsEngine};

/// CPU time consumed by the calling thread (`CLOCK_THREAD_CPUTIME_ID`).
struct ThreadCpuTime;

fn thread_cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID is supported
    // on Linux, and on failure `ts` simply stays zero.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu_now()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu_now().saturating_sub(start)
    }
    fn add(&self, v1: &Duration, v2: &Duration) -> Duration {
        *v1 + *v2
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        // Values are nanoseconds, exactly as for wall-clock time.
        WallTime.formatter()
    }
}

fn engine(sector_size: usize) -> XtsEngine {
    let key: Vec<u8> = (0u8..64).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
    let dek = Dek::from_slice(&key).expect("benchmark key is valid");
    XtsEngine::new(
        &dek,
        SectorSize::try_from(sector_size).expect("benchmark sector size is valid"),
    )
    .expect("benchmark sector size is valid")
}

/// Encrypt and decrypt `len`-byte buffers in place, one call per buffer.
fn group<M: Measurement>(c: &mut Criterion<M>, name: &str, len_for: impl Fn(usize) -> usize) {
    let mut group = c.benchmark_group(name);
    for sector_size in [512usize, 4096] {
        let len = len_for(sector_size);
        group.throughput(Throughput::Bytes(len as u64));
        let engine = engine(sector_size);
        let mut buf = vec![0x3cu8; len];
        // Beyond 2^32 so that the upper tweak bytes are exercised too.
        let first_sector = (1u64 << 33) + 7;
        group.bench_function(BenchmarkId::new("encrypt", sector_size), |b| {
            b.iter(|| {
                engine
                    .encrypt_sectors(black_box(&mut buf), black_box(first_sector))
                    .expect("whole sectors")
            })
        });
        group.bench_function(BenchmarkId::new("decrypt", sector_size), |b| {
            b.iter(|| {
                engine
                    .decrypt_sectors(black_box(&mut buf), black_box(first_sector))
                    .expect("whole sectors")
            })
        });
    }
    group.finish();
}

fn bench_xts<M: Measurement>(c: &mut Criterion<M>) {
    // Large I/O: 1 MiB, many sectors per call.
    group(c, "xts_1MiB", |_| 1 << 20);
    // A 4 KiB NBD request: 8 sectors of 512 bytes, or one of 4096.
    group(c, "xts_4KiB_request", |_| 4096);
    // One data unit per call, like `openssl speed -bytes <unit>`.
    group(c, "xts_one_call_one_unit", |sector_size| sector_size);
}

fn main() {
    if std::env::var_os("XTS_BENCH_WALL_CLOCK").is_some() {
        bench_xts(&mut Criterion::default().configure_from_args());
    } else {
        bench_xts(
            &mut Criterion::default()
                .with_measurement(ThreadCpuTime)
                .configure_from_args(),
        );
    }
    Criterion::default().configure_from_args().final_summary();
}
