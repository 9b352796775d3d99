//! Reading every counter at scrape time and encoding it with `prometheus-client` (a
//! custom collector: the counters are the daemon's own atomics, see the module above).

use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::errno_label;
use crate::keys::stats::{self as key_stats, BackendSnapshot};
use crate::latency::HistogramSnapshot;
use crate::server::export::Export;
use crate::server::Shared;

type Fmt = Result<(), std::fmt::Error>;

/// The registry of a running daemon: every metric name is prefixed `cryptvol_`.
pub(crate) fn registry(shared: Arc<Shared>) -> Registry {
    let mut registry = Registry::with_prefix("cryptvol");
    registry.register_collector(Box::new(ServerCollector { shared }));
    registry
}

/// Encodes the exports' and the key backends' counters on each scrape.
pub(crate) struct ServerCollector {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for ServerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCollector").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for ServerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Fmt {
        // A snapshot of the export list: exports added or removed live (server::live)
        // show up on the next scrape.
        let held: Vec<Arc<Export>> = self.shared.exports.iter().collect();
        let exports: Vec<&Export> = held.iter().map(|e| &**e).collect();
        encode_requests(&mut encoder, &exports)?;
        encode_connections(&mut encoder, &exports)?;
        encode_volumes(&mut encoder, &exports)?;
        encode_reencryption(&mut encoder, &exports)?;
        encode_snapshots(&mut encoder, &exports)?;
        encode_key_backends(&mut encoder, &key_stats::snapshot())
    }
}

/// One sample per label set of a counter or gauge family.
fn family<L, V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, V)>,
) -> Fmt
where
    L: prometheus_client::encoding::EncodeLabelSet,
    V: prometheus_client::encoding::EncodeGaugeValue
        + prometheus_client::encoding::EncodeCounterValue,
{
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let mut m = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => m.encode_counter::<NoLabelSet, _, u64>(&value, None)?,
            _ => m.encode_gauge(&value)?,
        }
    }
    Ok(())
}

/// A histogram family: one histogram per label set.
fn histograms<L: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, HistogramSnapshot)>,
) -> Fmt {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in samples {
        let mut m = metric.encode_family(&labels)?;
        m.encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, None)?;
    }
    Ok(())
}

fn encode_requests(encoder: &mut DescriptorEncoder, exports: &[&Export]) -> Fmt {
    let per_command: Vec<_> = exports
        .iter()
        .flat_map(|e| {
            let name = e.info.name.as_str();
            e.metrics
                .commands()
                .into_iter()
                .map(move |c| ([("export", name), ("command", c.command.label())], c))
        })
        .collect();
    family(
        encoder,
        "nbd_requests",
        "NBD requests served, by export and command (failed ones included).",
        MetricType::Counter,
        per_command.iter().map(|(l, c)| (*l, c.requests)),
    )?;
    family(
        encoder,
        "nbd_request_bytes",
        "Bytes covered by NBD requests (their length; 0 for flush), by export and command.",
        MetricType::Counter,
        per_command.iter().map(|(l, c)| (*l, c.bytes)),
    )?;
    histograms(
        encoder,
        "nbd_request_duration_seconds",
        "Time from a request read to its reply sent, by export and command.",
        per_command.iter().map(|(l, c)| (*l, c.latency.clone())),
    )?;
    let errors = exports.iter().flat_map(|e| {
        let name = e.info.name.as_str();
        e.metrics
            .errors()
            .into_iter()
            .map(move |(errno, n)| ([("export", name), ("errno", errno_label(errno))], n))
    });
    family(
        encoder,
        "nbd_errors",
        "NBD requests answered with an error, by export and NBD error value.",
        MetricType::Counter,
        errors,
    )
}

fn encode_connections(encoder: &mut DescriptorEncoder, exports: &[&Export]) -> Fmt {
    family(
        encoder,
        "connections_open",
        "NBD connections in transmission now, by export.",
        MetricType::Gauge,
        exports
            .iter()
            .map(|e| ([("export", e.info.name.as_str())], e.connections() as u64)),
    )?;
    family(
        encoder,
        "connections",
        "NBD connections that entered transmission since the daemon started, by export.",
        MetricType::Counter,
        exports.iter().map(|e| {
            (
                [("export", e.info.name.as_str())],
                e.metrics.connections_total(),
            )
        }),
    )
}

fn encode_volumes(encoder: &mut DescriptorEncoder, exports: &[&Export]) -> Fmt {
    family(
        encoder,
        "volume_size_bytes",
        "Size of the export's volume.",
        MetricType::Gauge,
        exports
            .iter()
            .map(|e| ([("export", e.info.name.as_str())], e.volume.size())),
    )?;
    family(
        encoder,
        "volume_allocated_bytes",
        "Allocated bytes of the volume's data area (thin volumes; the whole size otherwise).",
        MetricType::Gauge,
        exports.iter().map(|e| {
            (
                [("export", e.info.name.as_str())],
                e.volume.allocated_bytes(),
            )
        }),
    )
}

fn encode_reencryption(encoder: &mut DescriptorEncoder, exports: &[&Export]) -> Fmt {
    let reenc: Vec<_> = exports
        .iter()
        .map(|e| {
            let s = e.volume.reencrypt_status();
            let (done, total) = s.map(|s| (s.watermark, s.size)).unwrap_or((0, 0));
            ([("export", e.info.name.as_str())], s.is_some(), done, total)
        })
        .collect();
    family(
        encoder,
        "reencrypt_in_progress",
        "1 while the export's volume is being re-encrypted (also while paused).",
        MetricType::Gauge,
        reenc.iter().map(|r| (r.0, u64::from(r.1))),
    )?;
    family(
        encoder,
        "reencrypt_done_bytes",
        "Bytes of the volume already re-encrypted (0 when none is in progress).",
        MetricType::Gauge,
        reenc.iter().map(|r| (r.0, r.2)),
    )?;
    family(
        encoder,
        "reencrypt_total_bytes",
        "Bytes the re-encryption in progress covers (0 when none is in progress).",
        MetricType::Gauge,
        reenc.iter().map(|r| (r.0, r.3)),
    )
}

fn encode_snapshots(encoder: &mut DescriptorEncoder, exports: &[&Export]) -> Fmt {
    let snaps: Vec<_> = exports
        .iter()
        .map(|e| {
            (
                [("export", e.info.name.as_str())],
                e.metrics.snapshot_state(),
            )
        })
        .collect();
    family(
        encoder,
        "snapshot_in_progress",
        "1 while a snapshot of the export is being taken through the daemon.",
        MetricType::Gauge,
        snaps.iter().map(|s| (s.0, u64::from(s.1 .0))),
    )?;
    family(
        encoder,
        "snapshot_done_bytes",
        "Bytes of the export the current (or last) snapshot has covered.",
        MetricType::Gauge,
        snaps.iter().map(|s| (s.0, s.1 .1)),
    )?;
    family(
        encoder,
        "snapshot_total_bytes",
        "Bytes the current (or last) snapshot of the export covers.",
        MetricType::Gauge,
        snaps.iter().map(|s| (s.0, s.1 .2)),
    )
}

pub(super) fn encode_key_backends(
    encoder: &mut DescriptorEncoder,
    backends: &[BackendSnapshot],
) -> Fmt {
    family(
        encoder,
        "key_backend_calls",
        "Calls to a key backend (wrap, unwrap, generate, re-encrypt), by backend.",
        MetricType::Counter,
        backends.iter().map(|b| ([("backend", b.backend)], b.calls)),
    )?;
    family(
        encoder,
        "key_backend_failures",
        "Key backend calls that failed, by backend.",
        MetricType::Counter,
        backends
            .iter()
            .map(|b| ([("backend", b.backend)], b.failures)),
    )?;
    histograms(
        encoder,
        "key_backend_call_duration_seconds",
        "Duration of key backend calls, by backend.",
        backends
            .iter()
            .map(|b| ([("backend", b.backend)], b.latency.clone())),
    )
}

/// The Prometheus text (exposition format 0.0.4) of `registry`.
pub(crate) fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}
