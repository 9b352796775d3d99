#!/usr/bin/python3
"""Medians, ratios, targets, the text table and the PNG chart of a bench run.

Also usable alone to re-render a stored run:
    /usr/bin/python3 scripts/bench/report.py bench/results/latest/results.json [chart.png]
"""

import json
import os
import statistics
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree (run alone)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modes_report  # noqa: E402  (the extended modes' tables and issue 18 targets)

MIB = 1 << 20
PEERS = ["nbdkit-file", "nbdkit-luks", "qemu-nbd"]
# cryptvol's own variants (bench.py): the no-map baseline and the fresh-volume runs.
NOMAP = "cryptvol-nomap"
FRESH = "cryptvol-fresh"
TLS = "cryptvol-tls"
TLS_FACTOR = 0.7
THIN_FACTOR = 0.95
QD32 = ["randread-4k-qd32", "randwrite-4k-qd32"]
RSS_LIMIT_MIB = 64

# (label, job, peer, kind, factor): kind "tput" means cryptvol / peer >= factor,
# "p50" means cryptvol p50 latency / peer p50 <= factor.
TARGETS = [
    ("1M seq read >= 0.9x nbdkit file", "read-1m-qd8", "nbdkit-file", "tput", 0.9),
    ("1M seq read >= 2.5x nbdkit luks", "read-1m-qd8", "nbdkit-luks", "tput", 2.5),
    ("1M seq write >= 0.9x nbdkit file", "write-1m-qd8", "nbdkit-file", "tput", 0.9),
    ("1M seq write >= 2.5x nbdkit luks", "write-1m-qd8", "nbdkit-luks", "tput", 2.5),
    ("4k randread qd32 >= 1.5x nbdkit luks", "randread-4k-qd32", "nbdkit-luks", "tput", 1.5),
    ("4k randread qd32 >= 3x qemu-nbd", "randread-4k-qd32", "qemu-nbd", "tput", 3.0),
    ("4k randread qd32 >= 0.8x nbdkit file", "randread-4k-qd32", "nbdkit-file", "tput", 0.8),
    ("4k randwrite qd32 >= 1.5x nbdkit luks", "randwrite-4k-qd32", "nbdkit-luks", "tput", 1.5),
    ("4k randwrite qd32 >= 3x qemu-nbd", "randwrite-4k-qd32", "qemu-nbd", "tput", 3.0),
    ("4k qd1 read p50 latency <= 1.2x nbdkit file", "randread-4k-qd1", "nbdkit-file", "p50", 1.2),
    # Issue 7: no regression beyond 5% on random writes once every chunk is allocated.
    (f"4k randwrite qd32 thin >= {THIN_FACTOR}x no-map", "randwrite-4k-qd32", NOMAP, "tput",
     THIN_FACTOR),
    # Issue 14: "tls" means cryptvol-tls / cryptvol >= factor (TLS against plaintext).
    (f"4k randread qd32 over TLS >= {TLS_FACTOR}x plaintext", "randread-4k-qd32", TLS, "tls",
     TLS_FACTOR),
]

COLOURS = {
    "cryptvol": "#1f77b4",
    "nbdkit-file": "#7f7f7f",
    "nbdkit-luks": "#ff7f0e",
    "qemu-nbd": "#2ca02c",
    NOMAP: "#aec7e8",
    TLS: "#98df8a",
}
EXTRA_COLOURS = ["#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#d62728"]


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(res):
    """Adds medians, ratios and targets to a results dict (from its raw runs)."""
    med = {}
    for r in res["runs"]:
        med.setdefault(r["server"], {}).setdefault(r["job"], []).append(r)
    medians = {}
    for server, jobs in med.items():
        for job, runs in jobs.items():
            rss = [r["peak_rss_kib"] for r in runs if r.get("peak_rss_kib") is not None]
            medians.setdefault(server, {})[job] = {
                "n": len(runs),
                "iops": _median([r["iops"] for r in runs]),
                "iops_min": min(r["iops"] for r in runs),
                "iops_max": max(r["iops"] for r in runs),
                "bw_bytes": _median([r["bw_bytes"] for r in runs]),
                "lat_p50_us": _median([r["lat_p50_us"] for r in runs]),
                "lat_p99_us": _median([r["lat_p99_us"] for r in runs]),
                "cpu_s_per_gib": _median([r["cpu_s_per_gib"] for r in runs]),
                "server_cpu_cores": _median([r["server_cpu_cores"] for r in runs]),
                "peak_rss_kib_max": max(rss) if rss else None,
            }
            if server == FRESH:
                medians[server][job].update({
                    "backing_growth_bytes": _median(
                        [r.get("backing_growth_bytes") for r in runs]),
                    "write_amplification": _median(
                        [r.get("write_amplification") for r in runs]),
                    "backing_bw_bytes": _median([r.get("backing_bw_bytes") for r in runs]),
                    "io_bytes": _median([r.get("io_bytes") for r in runs]),
                    "runtime_s": _median([r.get("runtime_s") for r in runs]),
                })
    res["medians"] = medians

    ratios = {}
    cv = medians.get("cryptvol", {})
    for job, m in cv.items():
        for peer, pm in medians.items():
            # The fresh runs are not a peer (another workload); see res["thin"].
            if peer in ("cryptvol", FRESH) or job not in pm:
                continue
            p = pm[job]
            entry = {"throughput": m["iops"] / p["iops"] if p["iops"] else None}
            if m["lat_p50_us"] and p["lat_p50_us"]:
                entry["lat_p50"] = m["lat_p50_us"] / p["lat_p50_us"]
            if m["lat_p99_us"] and p["lat_p99_us"]:
                entry["lat_p99"] = m["lat_p99_us"] / p["lat_p99_us"]
            if m["cpu_s_per_gib"] and p["cpu_s_per_gib"]:
                entry["cpu_per_gib"] = m["cpu_s_per_gib"] / p["cpu_s_per_gib"]
            ratios.setdefault(job, {})[peer] = entry
    res["ratios"] = ratios
    res["thin"] = _thin(res)

    targets = []
    for label, job, peer, kind, factor in TARGETS:
        t = {"target": label, "job": job, "peer": peer, "factor": factor}
        r = ratios.get(job, {}).get(peer)
        key = "lat_p50" if kind == "p50" else "throughput"
        if r is None or not r.get(key):
            t.update(status="n/a", why=f"{job} not run against both cryptvol and {peer}")
        else:
            v = 1.0 / r[key] if kind == "tls" else r[key]
            t["measured"] = v
            ok = v <= factor if kind == "p50" else v >= factor
            t["status"] = "met" if ok else "missed"
        targets.append(t)

    rss = [
        r["peak_rss_kib"]
        for r in res["runs"]
        if r["server"] == "cryptvol" and r["job"] in QD32 and r.get("peak_rss_kib") is not None
    ]
    t = {"target": f"cryptvol peak RSS under the qd32 jobs <= {RSS_LIMIT_MIB} MiB"}
    if rss:
        t["measured_mib"] = max(rss) / 1024.0
        t["status"] = "met" if t["measured_mib"] <= RSS_LIMIT_MIB else "missed"
    else:
        t.update(status="n/a", why="no qd32 job run against cryptvol")
    targets.append(t)

    x = res.get("xts", {})
    t = {"target": "XTS engine >= 90% of openssl speed -evp aes-256-xts (4096-byte units)"}
    if "encrypt_ratio" in x:
        t["measured"] = x["encrypt_ratio"]
        t["status"] = "met" if x["encrypt_ratio"] >= 0.9 else "missed"
    else:
        t.update(status="n/a", why=x.get("skipped") or x.get("error") or "not run")
    targets.append(t)
    res["targets"] = targets
    modes_report.summarise(res)
    return res


def _thin(res):
    """Thin volumes: cryptvol (allocation map, all chunks allocated) against cryptvol-nomap
    per job, as the ratio of medians and the range of per-repeat paired ratios; and the
    fresh runs (first writes) against cryptvol's steady state."""
    medians = res["medians"]
    cv, nm, fr = (medians.get(s, {}) for s in ("cryptvol", NOMAP, FRESH))
    by_rep = {}
    for r in res["runs"]:
        by_rep.setdefault((r["server"], r["job"]), {})[r["repeat"]] = r["iops"]
    vs_nomap = {}
    for job in res["jobs"]:
        if job not in cv or job not in nm or not nm[job]["iops"]:
            continue
        a, b = by_rep.get(("cryptvol", job), {}), by_rep.get((NOMAP, job), {})
        paired = [a[k] / b[k] for k in sorted(a) if k in b and b[k]]
        vs_nomap[job] = {
            "ratio": cv[job]["iops"] / nm[job]["iops"],
            "paired_min": min(paired) if paired else None,
            "paired_max": max(paired) if paired else None,
        }
    fresh = {}
    for job, m in fr.items():
        e = {k: m.get(k) for k in ("iops", "bw_bytes", "write_amplification",
                                     "backing_growth_bytes", "backing_bw_bytes", "io_bytes",
                                     "runtime_s", "lat_p50_us", "lat_p99_us", "cpu_s_per_gib")}
        s = cv.get(job)
        e["vs_steady_state"] = m["iops"] / s["iops"] if s and s["iops"] else None
        fresh[job] = e
    return {"vs_nomap": vs_nomap, "fresh": fresh}


def _fmt_num(v):
    if v is None:
        return "-"
    if v >= 100000:
        return f"{v / 1000:.0f}k"
    if v >= 10000:
        return f"{v / 1000:.1f}k"
    return f"{v:.0f}"


def _fmt_size(b):
    return f"{b / (1 << 30):.0f} GiB" if b >= 1 << 30 else f"{b / MIB:.0f} MiB"


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _short(meta):
    """A two-line job label for narrow axes: "4k randread\nqd32"."""
    return f"{meta['bs'].upper() if meta['bs'] == '1m' else meta['bs']} {meta['rw']}\nqd{meta['iodepth']}"


def server_order(res):
    """The servers of the main table and chart: everything but the fresh runs, which are
    a different workload and get their own section."""
    seen = [s for s in res["medians"].keys() if s != FRESH]
    order = [s for s in ["cryptvol", NOMAP, TLS, "nbdkit-file", "nbdkit-luks", "qemu-nbd"]
             if s in seen]
    return order + [s for s in seen if s not in order]


def render_text(res):
    out = []
    o = res["options"]
    env = res.get("environment", {})
    out.append("")
    out.append(
        f"cryptvol benchmark {res['timestamp']}: {o['size_bytes'] // MIB} MiB volumes, "
        f"fio --ioengine=nbd over Unix sockets, {o['ramp_s']} s ramp + {o['runtime_s']} s "
        f"per run, median of {o['repeat']} run(s)"
    )
    out.append(
        f"machine: {env.get('cpu')}, {env.get('nproc')} CPUs, load at start "
        f"{', '.join(f'{x:.1f}' for x in env.get('loadavg_at_start', []))}; "
        f"cryptvol {env.get('git')}"
    )
    out.append("")
    if not res["runs"]:  # only extended modes (--modes without main)
        return "\n".join(out + modes_report.render(res))
    servers = server_order(res)
    sw = max([14] + [len(s) for s in servers])
    hdr = (f"{'job':<30} {'server':<{sw}} {'IOPS':>8} {'MB/s':>8} {'p50 us':>8} {'p99 us':>8} "
           f"{'CPU s/GiB':>9} {'peak RSS':>9}")
    out.append(hdr)
    out.append("-" * len(hdr))
    for job, meta in res["jobs"].items():
        first = True
        for s in servers:
            m = res["medians"].get(s, {}).get(job)
            if m is None:
                continue
            rss = m["peak_rss_kib_max"]
            out.append(
                f"{meta['title'] if first else '':<30} {s:<{sw}} {_fmt_num(m['iops']):>8} "
                f"{_fmt(m['bw_bytes'] / 1e6, '.0f'):>8} {_fmt(m['lat_p50_us'], '.0f'):>8} "
                f"{_fmt(m['lat_p99_us'], '.0f'):>8} {_fmt(m['cpu_s_per_gib'], '.2f'):>9} "
                f"{(_fmt(rss / 1024.0, '.0f') + ' MiB') if rss else '-':>9}"
            )
            first = False
    out.append("")
    peers = [s for s in servers if s not in ("cryptvol", NOMAP, TLS)]
    if "cryptvol" in servers and peers:
        out.append("cryptvol / peer (medians): throughput, >1 = cryptvol faster; "
                   "for qd1 also p50 latency, <1 = cryptvol faster")
        hdr = f"{'job':<30} " + " ".join(f"{'vs ' + p:>22}" for p in peers)
        out.append(hdr)
        out.append("-" * len(hdr))
        for job, meta in res["jobs"].items():
            cells = []
            for p in peers:
                r = res["ratios"].get(job, {}).get(p)
                if r is None or r.get("throughput") is None:
                    cells.append(f"{'-':>22}")
                    continue
                c = f"{r['throughput']:.2f}x"
                if job.endswith("qd1") and r.get("lat_p50") is not None:
                    c += f" (p50 {r['lat_p50']:.2f}x)"
                cells.append(f"{c:>22}")
            out.append(f"{meta['title']:<30} " + " ".join(cells))
        out.append("")
    out.extend(_render_thin(res))
    out.extend(_render_tls(res))
    if "cryptvol" in servers:
        out.append("targets:")
    for t in res.get("targets", []) if "cryptvol" in servers else []:
        if t["status"] == "n/a":
            out.append(f"  [n/a ] {t['target']}: {t.get('why')}")
            continue
        tag = "MET " if t["status"] == "met" else "MISS"
        if "measured_mib" in t:
            val = f"{t['measured_mib']:.1f} MiB"
        elif t["target"].startswith("XTS"):
            x = res.get("xts", {})
            val = (f"{t['measured'] * 100:.0f}% (cryptvol "
                   f"{x['cryptvol_encrypt_bytes_per_s'] / 1e9:.2f} GB/s, openssl "
                   f"{x['openssl_encrypt_bytes_per_s'] / 1e9:.2f} GB/s; decrypt "
                   f"{x['decrypt_ratio'] * 100:.0f}%)")
        else:
            val = f"{t['measured']:.2f}x"
        out.append(f"  [{tag}] {t['target']}: {val}")
    out.append("")
    out.extend(modes_report.render(res))
    out.append("IOPS/MB/s: fio's figures for the whole run after the ramp (MB = 10^6 bytes). "
               "Latency: fio total latency (submit to completion). CPU s/GiB: the server "
               "process's user+system CPU (all threads) per GiB moved. Peak RSS: VmHWM "
               "during the job (max over runs).")
    return "\n".join(out)


def _render_tls(res):
    """cryptvol-tls / cryptvol per job (same volume, same run)."""
    out = []
    rows = []
    for job, meta in res["jobs"].items():
        r = res["ratios"].get(job, {}).get(TLS)
        if r and r.get("throughput"):
            plain = res["medians"]["cryptvol"][job]["iops"]
            tls = res["medians"][TLS][job]["iops"]
            note = "  (target)" if job == "randread-4k-qd32" else ""
            rows.append(f"{meta['title']:<30} {_fmt_num(plain):>9} {_fmt_num(tls):>9} "
                        f"{1.0 / r['throughput']:>6.2f}x{note}")
    if rows:
        out.append("TLS: cryptvol --tls require (fio over nbds+unix://) / cryptvol plaintext, "
                   "same volume, medians")
        hdr = f"{'job':<30} {'plain':>9} {'TLS':>9} {'ratio':>7}"
        out.append(hdr)
        out.append("-" * len(hdr))
        out.extend(rows)
        out.append(f"(IOPS; the 4k random read ratio is a target, >= {TLS_FACTOR}x.)")
        out.append("")
    return out


def _render_thin(res):
    out = []
    th = res.get("thin") or {}
    if th.get("vs_nomap"):
        out.append("thin volumes, steady state: cryptvol (allocation map; the prefill allocated "
                   "every chunk) / cryptvol-nomap (--no-allocation-map), medians")
        hdr = (f"{'job':<30} {'cryptvol':>9} {'no-map':>9} {'ratio':>7} "
               f"{'per-run ratios':>15}")
        out.append(hdr)
        out.append("-" * len(hdr))
        for job, meta in res["jobs"].items():
            v = th["vs_nomap"].get(job)
            if v is None:
                continue
            cv = res["medians"]["cryptvol"][job]["iops"]
            nm = res["medians"][NOMAP][job]["iops"]
            rng = ("-" if v["paired_min"] is None else
                   f"{v['paired_min']:.2f}-{v['paired_max']:.2f}"
                   if v["paired_min"] != v["paired_max"] else f"{v['paired_min']:.2f}")
            note = "  (target)" if job == "randwrite-4k-qd32" else ""
            out.append(f"{meta['title']:<30} {_fmt_num(cv):>9} {_fmt_num(nm):>9} "
                       f"{v['ratio']:>6.2f}x {rng:>15}{note}")
        out.append("(IOPS; ratio > 1: the thin volume is faster. Only the 4k random write "
                   f"ratio is a target, >= {THIN_FACTOR}x; the others are for information.)")
        out.append("")
    if th.get("fresh"):
        f = res.get("fresh") or {}
        size = f.get("size_bytes") or res["options"].get("fresh_size_bytes") or 0
        cap = f.get("max_growth_bytes") or res["options"].get("fresh_max_bytes") or 0
        out.append(f"first write to a chunk: cryptvol-fresh = a new, never-written "
                   f"{_fmt_size(size)} thin volume per run, no ramp, at most "
                   f"{_fmt_size(cap)} of backing-file growth or the runtime, medians")
        hdr = (f"{'job':<30} {'IOPS':>8} {'MB/s':>7} {'p50 us':>7} {'CPU s/GiB':>9} "
               f"{'file grew':>10} {'write ampl.':>11} {'vs steady':>10}")
        out.append(hdr)
        out.append("-" * len(hdr))
        for job, meta in res["jobs"].items():
            e = th["fresh"].get(job)
            if e is None:
                continue
            g = e.get("backing_growth_bytes")
            wa = e.get("write_amplification")
            vs = e.get("vs_steady_state")
            out.append(
                f"{meta['title'] + ' fresh':<30} {_fmt_num(e['iops']):>8} "
                f"{_fmt(e['bw_bytes'] / 1e6, '.0f'):>7} {_fmt(e['lat_p50_us'], '.0f'):>7} "
                f"{_fmt(e['cpu_s_per_gib'], '.2f'):>9} "
                f"{(_fmt(g / MIB, '.0f') + ' MiB') if g is not None else '-':>10} "
                f"{(_fmt(wa, '.2f') + 'x') if wa is not None else '-':>11} "
                f"{(_fmt(vs, '.2f') + 'x') if vs is not None else '-':>10}"
            )
        out.append("(MB/s: client data. file grew: st_blocks of the backing file after - before "
                   "the run. write ampl.: file growth / client bytes (16x = one 64 KiB chunk per "
                   "4 KiB write). vs steady: IOPS / cryptvol's IOPS on the same job over its "
                   "prefilled volume.)")
        out.append("")
    return out


def chart(res, png):
    """Writes the PNG chart. Returns None, or why no chart was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib is not importable ({e}); install python3-matplotlib"

    servers = server_order(res)
    if not servers:
        return "nothing to chart (only the cryptvol-fresh runs, shown in the text report)"
    jobs = list(res["jobs"].keys())
    titles = [res["jobs"][j]["title"].replace(" (latency)", "") for j in jobs]
    colours = {}
    extra = iter(EXTRA_COLOURS)
    for s in servers:
        colours[s] = COLOURS.get(s) or next(extra, "#333333")
    base = "nbdkit-file" if "nbdkit-file" in servers else servers[0]

    fig = plt.figure(figsize=(13, 9.5))
    gs = fig.add_gridspec(2, 2, height_ratios=[1.25, 1], hspace=0.42, wspace=0.22)
    ax = fig.add_subplot(gs[0, :])
    width = 0.8 / max(len(servers), 1)
    ymax = 0
    for i, s in enumerate(servers):
        xs, ys, lo, hi, labels = [], [], [], [], []
        for k, j in enumerate(jobs):
            m = res["medians"].get(s, {}).get(j)
            b = res["medians"].get(base, {}).get(j)
            if not m or not b or not b["iops"]:
                continue
            x = k - 0.4 + width * (i + 0.5)
            y = m["iops"] / b["iops"]
            xs.append(x)
            ys.append(y)
            lo.append(y - m["iops_min"] / b["iops"])
            hi.append(m["iops_max"] / b["iops"] - y)
            if res["jobs"][j]["bs"] == "1m":
                labels.append(f"{m['bw_bytes'] / 1e9:.2f}\nGB/s")
            else:
                labels.append(_fmt_num(m["iops"]) + "\nIOPS")
            ymax = max(ymax, y + hi[-1])
        ax.bar(xs, ys, width * 0.92, color=colours[s], label=s,
               yerr=[lo, hi] if res["options"]["repeat"] > 1 else None,
               error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#333333"})
        tops = [y + h for y, h in zip(ys, hi)] if res["options"]["repeat"] > 1 else ys
        for x, top, t in zip(xs, tops, labels):
            ax.text(x, top + 0.02 * max(ymax, 1), t, ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="#444444", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(jobs)))
    ax.set_xticklabels(titles)
    ax.set_ylim(0, max(ymax, 1.0) * 1.25)
    ax.set_ylabel(f"throughput relative to {base} (= 1.0)")
    rep = res["options"]["repeat"]
    ax.set_title(
        f"Throughput per job, normalised to {base} (labels: absolute medians"
        f"{'; whiskers: min-max of ' + str(rep) + ' runs' if rep > 1 else ''})",
        fontsize=10,
    )
    ax.legend(ncol=len(servers), loc="upper right", fontsize=9)

    ax2 = fig.add_subplot(gs[1, 0])
    for i, s in enumerate(servers):
        xs, ys = [], []
        for k, j in enumerate(jobs):
            m = res["medians"].get(s, {}).get(j)
            if m and m["cpu_s_per_gib"] is not None:
                xs.append(k - 0.4 + width * (i + 0.5))
                ys.append(m["cpu_s_per_gib"])
        ax2.bar(xs, ys, width * 0.92, color=colours[s], label=s)
    ax2.set_xticks(range(len(jobs)))
    ax2.set_xticklabels([_short(res["jobs"][j]) for j in jobs], fontsize=8)
    ax2.set_ylabel("server CPU seconds per GiB")
    ax2.set_yscale("log")
    ax2.set_title("Server CPU per GiB moved (lower is better; log scale)", fontsize=10)
    ax2.grid(axis="y", which="both", alpha=0.3)

    ax3 = fig.add_subplot(gs[1, 1])
    qd1 = "randread-4k-qd1"
    names, p50, p99 = [], [], []
    for s in servers:
        m = res["medians"].get(s, {}).get(qd1)
        if m and m["lat_p50_us"] is not None:
            names.append(s)
            p50.append(m["lat_p50_us"])
            p99.append(m["lat_p99_us"] or 0)
    if names:
        xs = range(len(names))
        ax3.bar([x - 0.2 for x in xs], p50, 0.38, color=[colours[n] for n in names],
                label="p50")
        ax3.bar([x + 0.2 for x in xs], p99, 0.38, color=[colours[n] for n in names],
                alpha=0.45, hatch="//", label="p99")
        for x, a, b in zip(xs, p50, p99):
            ax3.text(x - 0.2, a, f"{a:.0f}", ha="center", va="bottom", fontsize=7)
            ax3.text(x + 0.2, b, f"{b:.0f}", ha="center", va="bottom", fontsize=7)
        ax3.set_xticks(list(xs))
        ax3.set_xticklabels(names, fontsize=8)
        # Log axis with headroom above the tallest bar for the legend.
        ax3.set_yscale("log")
        ax3.set_ylim(min(x for x in p50 + p99 if x > 0) * 0.5, max(p50 + p99) * 4)
        ax3.legend(fontsize=8, loc="upper left", ncol=2)
    else:
        ax3.text(0.5, 0.5, "4k qd1 job not run", ha="center", va="center",
                 transform=ax3.transAxes)
    ax3.set_ylabel("latency (µs, log scale)")
    ax3.set_title("4k random read qd1 latency: p50 (solid), p99 (hatched)", fontsize=10)
    ax3.grid(axis="y", which="both", alpha=0.3)

    o = res["options"]
    env = res.get("environment", {})
    fig.suptitle(
        f"cryptvol vs NBD peers - {o['size_bytes'] // MIB} MiB volumes, fio nbd engine over "
        f"Unix sockets, {o['runtime_s']} s runs, median of {o['repeat']}\n"
        f"{env.get('cpu')} x{env.get('nproc')}, {res['timestamp']}, cryptvol {env.get('git')}",
        fontsize=11,
    )
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    with open(argv[0]) as f:
        res = json.load(f)
    summarise(res)
    print(render_text(res))
    png = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(argv[0]), "chart.png")
    err = chart(res, png)
    if err:
        print(f"report: no chart: {err}", file=sys.stderr)
        return 1
    print(f"chart: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
