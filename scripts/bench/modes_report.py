"""Medians, ratios, targets and text tables of the extended modes (scripts/bench/modes.py),
and the issue 18 targets of the main job table. Called by report.py's summarise and
render_text, so re-rendering a stored results.json shows them too.
"""

import statistics

MIB = 1 << 20
PEER = "nbdkit-file"
RSS_LIMIT_MIB = 32
ATTACH_LIMIT_MS = 20.0
P99_FACTOR = 1.1
EXPORT_MIB = 1.0
EXPORT_MS = 5.0

# Issue 18's throughput targets on the main jobs: (label, job, peer, factor).
MAIN_TARGETS = [
    ("4k randwrite qd32 >= 1.5x nbdkit luks", "randwrite-4k-qd32", "nbdkit-luks", 1.5),
    ("4k randwrite qd32 >= 0.9x nbdkit file", "randwrite-4k-qd32", "nbdkit-file", 0.9),
    ("4k randread qd32 >= 1.2x nbdkit file", "randread-4k-qd32", "nbdkit-file", 1.2),
    ("1M seq read >= 0.95x nbdkit file", "read-1m-qd8", "nbdkit-file", 0.95),
    ("1M seq read >= 3x nbdkit luks", "read-1m-qd8", "nbdkit-luks", 3.0),
    ("1M seq write >= 0.95x nbdkit file", "write-1m-qd8", "nbdkit-file", 0.95),
    ("1M seq write >= 3x nbdkit luks", "write-1m-qd8", "nbdkit-luks", 3.0),
]
MAIN_QEMU_JOBS = ["randread-4k-qd32", "randwrite-4k-qd32", "read-1m-qd8", "write-1m-qd8"]


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _ratio(x, y):
    return x / y if x is not None and y else None


def _by(runs, mode):
    return [r for r in runs if r.get("mode") == mode]


def summarise(res):
    m = res.get("modes")
    if not m:
        return res
    runs = m.get("runs", [])
    s = {}
    s["scaling"] = _scaling(_by(runs, "scaling"))
    s["latency"] = _latency(_by(runs, "latency"))
    s["rss"] = _rss(_by(runs, "rss"))
    s["attach"] = _attach(_by(runs, "attach"), m.get("kms_decrypt_s"), m.get("exec_floor_s"))
    s["exports"] = _exports(_by(runs, "exports"))
    s["thin"] = _thin(_by(runs, "thin"))
    m["summary"] = s
    m["targets"] = _targets(res, s)
    return res


def _scaling(runs):
    out = {}
    for r in runs:
        out.setdefault(r["job"], {}).setdefault(r["conns"], {}).setdefault(
            r["server"], []).append(r["iops"])
    table = {}
    for job, by_c in out.items():
        base = {}
        for c in sorted(by_c):
            row = {srv: _median(v) for srv, v in by_c[c].items()}
            for srv, v in row.items():
                base.setdefault(srv, v)
            table.setdefault(job, []).append({
                "conns": c, "cryptvol": row.get("cryptvol"), "peer": row.get(PEER),
                "ratio": _ratio(row.get("cryptvol"), row.get(PEER)),
                "cryptvol_scale": _ratio(row.get("cryptvol"), base.get("cryptvol")),
                "peer_scale": _ratio(row.get(PEER), base.get(PEER)),
                "n": len(by_c[c].get("cryptvol", [])),
            })
    return table


def _latency(runs):
    table = {}
    for job in sorted({r["job"] for r in runs}):
        row = {}
        for srv in ("cryptvol", PEER):
            rs = [r for r in runs if r["job"] == job and r["server"] == srv]
            row[srv] = {k: _median([r[k] for r in rs])
                        for k in ("clat_p50_us", "clat_p99_us", "clat_p999_us", "iops")}
            row[srv]["n"] = len(rs)
        for k in ("clat_p50_us", "clat_p99_us", "clat_p999_us"):
            row[f"ratio_{k}"] = _ratio(row["cryptvol"][k], row[PEER][k])
        table[job] = row
    return table


def _rss(runs):
    out = {}
    for srv in ("cryptvol", PEER):
        rs = [r for r in runs if r["server"] == srv]
        reps = sorted({r["repeat"] for r in rs})
        peaks = [max((r["vmhwm_kib"] or 0) for r in rs if r["repeat"] == k) for k in reps]
        per_job = {}
        for r in rs:
            per_job.setdefault(r["job"], []).append(r["vmhwm_kib"])
        out[srv] = {
            "idle_kib": _median([r.get("idle_rss_kib") for r in rs]),
            "peak_kib": _median(peaks),
            "peak_max_kib": max(peaks) if peaks else None,
            "sampled_max_kib": max((r.get("sampled_rss_max_kib") or 0 for r in rs), default=0),
            "per_job_kib": {j: _median(v) for j, v in per_job.items()},
            "n": len(reps),
        }
    out["ratio_peak"] = _ratio(out["cryptvol"]["peak_kib"], out[PEER]["peak_kib"])
    return out


def _attach(runs, kms_decrypt_s, exec_floor_s=None):
    out = {}
    for srv in sorted({r["server"] for r in runs}):
        rs = [r for r in runs if r["server"] == srv]
        out[srv] = {"greeting_ms": _median([r["greeting_s"] * 1e3 for r in rs]),
                    "first_block_ms": _median([r["first_block_s"] * 1e3 for r in rs]),
                    "min_first_block_ms": min(r["first_block_s"] * 1e3 for r in rs),
                    "n": len(rs)}
        for k in ("first_log_s", "opened_s", "listening_s"):
            out[srv][k.replace("_s", "_ms")] = _median(
                [r[k] * 1e3 for r in rs if r.get(k) is not None])
    peer = out.get(PEER, {}).get("first_block_ms")
    for srv, v in out.items():
        v["ratio"] = _ratio(v["first_block_ms"], peer) if srv != PEER else None
    if kms_decrypt_s is not None:
        out["kms_decrypt_ms"] = kms_decrypt_s * 1e3
    if exec_floor_s is not None:
        out["exec_floor_ms"] = exec_floor_s * 1e3
    return out


def _exports(runs):
    rows = []
    for n in sorted({r["exports"] for r in runs}):
        rs = [r for r in runs if r["exports"] == n]
        rows.append({"exports": n, "ready_ms": _median([r["ready_s"] * 1e3 for r in rs]),
                     "rss_mib": _median([r["rss_kib"] / 1024 for r in rs]), "n": len(rs)})
    if len(rows) >= 2:
        lo = rows[0]
        for row in rows[1:]:
            dn = row["exports"] - lo["exports"]
            row["ms_per_export"] = (row["ready_ms"] - lo["ready_ms"]) / dn
            row["mib_per_export"] = (row["rss_mib"] - lo["rss_mib"]) / dn
    return rows


def _thin(runs):
    if not runs:
        return {}

    def med_of(key, scale=1.0):
        return _median([_median(r[key]) * scale for r in runs if r.get(key)])

    def p99_of(key, scale=1.0):
        vals = []
        for r in runs:
            xs = sorted(r.get(key) or [])
            if xs:
                vals.append(xs[min(len(xs) - 1, int(0.99 * len(xs)))] * scale)
        return _median(vals)

    out = {
        "size_bytes": runs[0]["size_bytes"],
        "create_ms": _median([r["create_s"] * 1e3 for r in runs]),
        "ready_ms": _median([r["ready_s"] * 1e3 for r in runs]),
        "base_ready_ms": _median([r["base_ready_s"] * 1e3 for r in runs]),
        "rss_mib": _median([r["rss_kib"] / 1024 for r in runs]),
        "base_rss_mib": _median([r["base_rss_kib"] / 1024 for r in runs]),
        "rss_after_writes_mib": _median([r["rss_after_writes_kib"] / 1024 for r in runs]),
        "file_mib_after_create": _median([r["file_blocks_after_create"] / MIB for r in runs]),
        "first_us": med_of("first_write_s", 1e6),
        "later_us": med_of("later_write_s", 1e6),
        "rewrite_us": med_of("rewrite_s", 1e6),
        "first_p99_us": p99_of("first_write_s", 1e6),
        "peer_first_us": med_of("peer_first_write_s", 1e6),
        "peer_later_us": med_of("peer_later_write_s", 1e6),
        "writes": len(runs[0].get("first_write_s") or []),
        "n": len(runs),
    }
    out["map_mib"] = out["rss_mib"] - out["base_rss_mib"]
    out["first_vs_later"] = _ratio(out["first_us"], out["later_us"])
    out["peer_first_vs_later"] = _ratio(out["peer_first_us"], out["peer_later_us"])
    out["first_vs_peer_first"] = _ratio(out["first_us"], out["peer_first_us"])
    return out


def _t(label, measured, ok, text, why=None):
    if measured is None:
        return {"target": label, "status": "n/a", "why": why or "not run"}
    return {"target": label, "status": "met" if ok else "missed", "measured": measured,
            "text": text}


def _targets(res, s):
    ts = []
    ratios = res.get("ratios") or {}
    main_ran = bool(res.get("runs"))
    why_main = "the main mode was not run (--modes)"
    for label, job, peer, f in MAIN_TARGETS:
        v = (ratios.get(job, {}).get(peer) or {}).get("throughput")
        ts.append(_t(label, v, v is not None and v >= f, f"{v:.2f}x" if v else "",
                     why_main if not main_ran else f"{job} not run against {peer}"))
    qemu = [(j, (ratios.get(j, {}).get("qemu-nbd") or {}).get("throughput"))
            for j in MAIN_QEMU_JOBS]
    qemu = [(j, v) for j, v in qemu if v]
    worst = min(qemu, key=lambda x: x[1]) if qemu else None
    ts.append(_t("every job >= 3x qemu-nbd (luks)", worst[1] if worst else None,
                 worst is not None and worst[1] >= 3.0,
                 f"lowest {worst[1]:.2f}x ({worst[0]})" if worst else "",
                 why_main if not main_ran else "qemu-nbd not run"))
    for job, row in (s.get("latency") or {}).items():
        v = row.get("ratio_clat_p99_us")
        ts.append(_t(f"{job} p99 latency <= {P99_FACTOR}x nbdkit file", v,
                     v is not None and v <= P99_FACTOR,
                     f"{v:.2f}x ({row['cryptvol']['clat_p99_us']:.0f} vs "
                     f"{row[PEER]['clat_p99_us']:.0f} us)" if v else ""))
    if not s.get("latency"):
        ts.append(_t(f"qd1 p99 latency <= {P99_FACTOR}x nbdkit file", None, False, "",
                     "the latency mode was not run (--modes)"))
    rss = (s.get("rss") or {}).get("cryptvol") or {}
    v = rss.get("peak_kib")
    src = "VmHWM, rss mode"
    if not v:
        # Without the rss mode: the main table's peaks (VmHWM per job) of cryptvol.
        main = [r.get("peak_rss_kib") for r in res.get("runs", [])
                if r.get("server") == "cryptvol" and r.get("peak_rss_kib")]
        v, src = (max(main), "VmHWM, main jobs") if main else (None, src)
    ts.append(_t(f"daemon peak RSS under the benchmark <= {RSS_LIMIT_MIB} MiB",
                 v / 1024 if v else None, bool(v) and v / 1024 <= RSS_LIMIT_MIB,
                 f"{v / 1024:.1f} MiB ({src})" if v else "",
                 "neither the rss mode nor the main table ran cryptvol"))
    at = (s.get("attach") or {}).get("cryptvol-local") or {}
    v = at.get("first_block_ms")
    ts.append(_t(f"attach with the local keystore <= {ATTACH_LIMIT_MS:.0f} ms", v,
                 v is not None and v <= ATTACH_LIMIT_MS, f"{v:.1f} ms" if v else "",
                 "the attach mode was not run"))
    rows = [r for r in (s.get("exports") or []) if "ms_per_export" in r]
    last = rows[-1] if rows else None
    ts.append(_t(f"per served export <= {EXPORT_MIB:.0f} MiB of memory",
                 last["mib_per_export"] if last else None,
                 bool(last) and last["mib_per_export"] <= EXPORT_MIB,
                 f"{last['mib_per_export']:.3f} MiB ({last['exports']} exports)" if last else "",
                 "the exports mode was not run with two counts or more"))
    ts.append(_t(f"per served export <= {EXPORT_MS:.0f} ms of start time (local keystore)",
                 last["ms_per_export"] if last else None,
                 bool(last) and last["ms_per_export"] <= EXPORT_MS,
                 f"{last['ms_per_export']:.2f} ms ({last['exports']} exports)" if last else "",
                 "the exports mode was not run with two counts or more"))
    ts.append(_t("ublk: daemon CPU per 4k I/O below NBD's; recovery after kill -9", None,
                 False, "", "measured in the kernel VM (scripts/kernel-test.sh), not here"))
    return ts


# ---------------------------------------------------------------- text


def _f(v, spec, unit=""):
    return "-" if v is None else format(v, spec) + unit


def render(res):
    m = res.get("modes") or {}
    s = m.get("summary")
    if not s:
        return []
    o = m.get("options", {})
    out = [f"extended modes ({', '.join(m.get('selected', []))}): medians of "
           f"{o.get('repeat')} run(s); peer = plain nbdkit file in the same run", ""]
    out += _render_scaling(s["scaling"])
    out += _render_latency(s["latency"])
    out += _render_rss(s["rss"])
    out += _render_attach(s["attach"])
    out += _render_exports(s["exports"])
    out += _render_thin(s["thin"], m.get("thin_note"))
    out.append("issue 18 targets:")
    for t in m.get("targets", []):
        if t["status"] == "n/a":
            out.append(f"  [n/a ] {t['target']}: {t.get('why')}")
        else:
            tag = "MET " if t["status"] == "met" else "MISS"
            out.append(f"  [{tag}] {t['target']}: {t['text']}")
    out.append("")
    return out


def _render_scaling(sc):
    if not sc:
        return []
    out = ["multi-connection scaling: 4k qd32 per connection, fio --numjobs=N "
           "(one NBD connection each), aggregate IOPS"]
    hdr = (f"{'job':<14} {'conns':>5} {'cryptvol':>9} {'nbdkit file':>11} {'ratio':>6} "
           f"{'cv scale':>8} {'file scale':>10}")
    out += [hdr, "-" * len(hdr)]
    for job, rows in sc.items():
        for r in rows:
            out.append(f"{job:<14} {r['conns']:>5} {_f(r['cryptvol'], '.0f'):>9} "
                       f"{_f(r['peer'], '.0f'):>11} {_f(r['ratio'], '.2f', 'x'):>6} "
                       f"{_f(r['cryptvol_scale'], '.2f', 'x'):>8} "
                       f"{_f(r['peer_scale'], '.2f', 'x'):>10}")
    out += ["(ratio: cryptvol / nbdkit file; scale: IOPS / the same server's IOPS on one "
            "connection. fio's N threads and the server share the machine's cores.)", ""]
    return out


def _render_latency(lt):
    if not lt:
        return []
    out = ["qd1 completion latency (fio clat percentiles, us)"]
    hdr = (f"{'job':<17} {'server':<12} {'p50':>7} {'p99':>7} {'p99.9':>8} {'IOPS':>7}")
    out += [hdr, "-" * len(hdr)]
    for job, row in lt.items():
        for srv in ("cryptvol", PEER):
            v = row[srv]
            out.append(f"{job:<17} {srv:<12} {_f(v['clat_p50_us'], '.1f'):>7} "
                       f"{_f(v['clat_p99_us'], '.1f'):>7} {_f(v['clat_p999_us'], '.1f'):>8} "
                       f"{_f(v['iops'], '.0f'):>7}")
        out.append(f"{'':<17} {'ratio':<12} {_f(row['ratio_clat_p50_us'], '.2f', 'x'):>7} "
                   f"{_f(row['ratio_clat_p99_us'], '.2f', 'x'):>7} "
                   f"{_f(row['ratio_clat_p999_us'], '.2f', 'x'):>8}")
    out += [f"(ratio: cryptvol / nbdkit file, < 1 = cryptvol faster; the p99 ratio is a "
            f"target, <= {P99_FACTOR}x)", ""]
    return out


def _render_rss(rs):
    if not rs or not rs.get("cryptvol", {}).get("n"):
        return []
    out = ["daemon memory under load: VmRSS at idle after start, peak VmHWM over the fio jobs "
           "(4k qd32 read/write, 1M qd8 read/write, 4k randwrite on 4 connections)"]
    hdr = f"{'server':<12} {'idle':>9} {'peak':>9} {'max of runs':>11} {'sampled':>9}"
    out += [hdr, "-" * len(hdr)]
    for srv in ("cryptvol", PEER):
        v = rs[srv]
        mib = (lambda k: _f(v[k] / 1024 if v[k] else None, '.1f', ' MiB'))
        out.append(f"{srv:<12} {mib('idle_kib'):>9} {mib('peak_kib'):>9} "
                   f"{mib('peak_max_kib'):>11} {mib('sampled_max_kib'):>9}")
    out += [f"(peak: median over runs of the highest VmHWM; sampled: highest VmRSS polled every "
            f"20 ms. cryptvol / nbdkit file peak {_f(rs.get('ratio_peak'), '.2f', 'x')}; target "
            f"<= {RSS_LIMIT_MIB} MiB)", ""]
    return out


def _render_attach(at):
    if not at:
        return []
    out = ["attach: spawn of the server to the NBD greeting and to the first 4 KiB block read "
           "(socket-activated listener; the client waits in its backlog)"]
    hdr = f"{'server':<15} {'greeting':>9} {'1st block':>10} {'fastest':>9} {'vs file':>8}"
    out += [hdr, "-" * len(hdr)]
    for srv in ("cryptvol-local", "cryptvol-kms", PEER):
        v = at.get(srv)
        if not v:
            continue
        out.append(f"{srv:<15} {_f(v['greeting_ms'], '.1f', ' ms'):>9} "
                   f"{_f(v['first_block_ms'], '.1f', ' ms'):>10} "
                   f"{_f(v['min_first_block_ms'], '.1f', ' ms'):>9} "
                   f"{_f(v['ratio'], '.2f', 'x'):>8}")
    marks = [(srv, at[srv]) for srv in ("cryptvol-local", "cryptvol-kms")
             if at.get(srv, {}).get("listening_ms") is not None]
    if marks:
        out.append("where cryptvol's start-up goes (from its log's timestamps, ms after the "
                   "spawn; medians):")
        for srv, v in marks:
            out.append(f"  {srv:<15} first log line {_f(v.get('first_log_ms'), '.1f')}, export "
                       f"opened {_f(v.get('opened_ms'), '.1f')}, listening "
                       f"{_f(v.get('listening_ms'), '.1f')}, first block "
                       f"{_f(v.get('first_block_ms'), '.1f')}")
        if at.get("exec_floor_ms") is not None:
            out.append(f"  (`cryptvol --version`, spawn to exit: "
                       f"{at['exec_floor_ms']:.1f} ms: the process start every attach pays)")
    if at.get("kms_decrypt_ms") is not None:
        k = at.get("cryptvol-kms", {}).get("first_block_ms")
        lo = at.get("cryptvol-local", {}).get("first_block_ms")
        extra = (f"; kms - local {k - lo:.1f} ms" if k is not None and lo is not None else "")
        out.append(f"(cryptvol-kms: AWS KMS on moto_server over loopback HTTP; one Decrypt "
                   f"takes {at['kms_decrypt_ms']:.1f} ms (median){extra}. Target: local "
                   f"keystore <= {ATTACH_LIMIT_MS:.0f} ms.)")
    out.append("")
    return out


def _render_exports(rows):
    if not rows:
        return []
    out = ["exports: cryptvol serve with N thin 64 MiB volumes (local keystore): spawn to "
           "READY=1 (every volume unlocked, listeners open) and VmRSS after it"]
    hdr = f"{'exports':>7} {'start':>10} {'RSS':>9} {'ms/export':>10} {'MiB/export':>11}"
    out += [hdr, "-" * len(hdr)]
    for r in rows:
        out.append(f"{r['exports']:>7} {_f(r['ready_ms'], '.1f', ' ms'):>10} "
                   f"{_f(r['rss_mib'], '.1f', ' MiB'):>9} {_f(r.get('ms_per_export'), '.2f'):>10} "
                   f"{_f(r.get('mib_per_export'), '.3f'):>11}")
    out += [f"(per export: the difference to the smallest count, divided by the extra "
            f"exports; targets <= {EXPORT_MS:.0f} ms and <= {EXPORT_MIB:.0f} MiB. No peer: "
            f"nbdkit's file plugin serves one file.)", ""]
    return out


def _render_thin(t, note):
    if not t:
        return []
    out = [f"thin volume of {t['size_bytes'] >> 40} TiB: create, open, map memory, 4 KiB "
           f"write latency ({t['writes']} writes to random fresh chunks, one request at a time)"]
    rows = [
        ("create (cryptvol create)", _f(t["create_ms"], ".1f", " ms")),
        ("file on disk after create", _f(t["file_mib_after_create"], ".1f", " MiB")),
        ("serve: spawn to READY=1", _f(t["ready_ms"], ".1f", " ms") +
         f"  (1 GiB volume {_f(t['base_ready_ms'], '.1f', ' ms')})"),
        ("RSS after open", _f(t["rss_mib"], ".1f", " MiB") +
         f"  (1 GiB volume {_f(t['base_rss_mib'], '.1f', ' MiB')})"),
        ("map memory (difference)", _f(t["map_mib"], ".1f", " MiB")),
        ("RSS after the writes", _f(t["rss_after_writes_mib"], ".1f", " MiB")),
        ("first write to a fresh chunk", _f(t["first_us"], ".0f", " us") +
         f"  (p99 {_f(t['first_p99_us'], '.0f', ' us')})"),
        ("later write, same chunk", _f(t["later_us"], ".0f", " us") +
         f"  (rewrite of the first block {_f(t['rewrite_us'], '.0f', ' us')})"),
        ("first / later", _f(t["first_vs_later"], ".2f", "x")),
        ("nbdkit file, sparse file", f"first {_f(t['peer_first_us'], '.0f', ' us')}, later "
         f"{_f(t['peer_later_us'], '.0f', ' us')} ({_f(t['peer_first_vs_later'], '.2f', 'x')})"),
        ("cryptvol first / file first", _f(t["first_vs_peer_first"], ".2f", "x")),
    ]
    out += [f"  {k:<30} {v}" for k, v in rows]
    if note:
        out.append(f"  note: {note}")
    out.append("")
    return out
