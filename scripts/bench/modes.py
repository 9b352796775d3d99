"""The extended modes of scripts/bench.sh (issue 18 item 4), beside the main job table:

  scaling  4k randread / randwrite qd32 per connection over 1, 2 and 4 NBD connections
           (fio --numjobs=N, one connection each), cryptvol and plain nbdkit file
  latency  qd1 completion-latency percentiles (p50, p99, p99.9) of 4k randread and
           randwrite, cryptvol and plain nbdkit file
  attach   start of the server process to the first block read by a client (a
           socket-activated listener, so the client's connection waits in the backlog and
           nothing polls): cryptvol with the local keystore, cryptvol with AWS KMS (moto),
           and plain nbdkit file
  rss      the daemon's RSS at idle and its peak (VmHWM) under the fio jobs, cryptvol and
           plain nbdkit file
  exports  cryptvol serving 1, 10 and 200 exports: start to READY=1 (sd_notify: every
           volume unlocked, listeners open) and RSS after it; the cost per export
  thin     a 16 TiB thin volume: create time, start time, RSS after open against a 1 GiB
           volume (the map's memory), and the latency of a first 4 KiB write to a fresh
           chunk against a later write to the same chunk (nbdkit file over a sparse file of
           the same size as the peer)

Every figure is the median of --repeat runs (the repeats are the outer loop). `run_modes`
gets the bench module itself (`b`) for its Server, server_for, run, log and BenchError.
"""

import contextlib
import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request

import nbdclient

MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40
CHUNK = 64 << 10
BLOCK = 4096
MODES = ["main", "scaling", "latency", "attach", "rss", "exports", "thin"]
EXTENDED = MODES[1:]
# The peer every fio-based mode runs beside cryptvol.
PEER = "nbdkit-file"
SCALING_JOBS = [("randread-4k", "randread"), ("randwrite-4k", "randwrite")]
LATENCY_JOBS = [("randread-4k-qd1", "randread"), ("randwrite-4k-qd1", "randwrite")]
# (label, rw, bs, iodepth, connections): the load under which the rss mode samples memory.
RSS_JOBS = [
    ("randread-4k-qd32", "randread", "4k", 32, 1),
    ("randwrite-4k-qd32", "randwrite", "4k", 32, 1),
    ("read-1m-qd8", "read", "1m", 8, 1),
    ("write-1m-qd8", "write", "1m", 8, 1),
    ("randwrite-4k-qd32x4", "randwrite", "4k", 32, 4),
]
THIN_EXPORT = "big"
# Where the thin mode falls back to when the work directory's filesystem cannot hold a
# file of the thin size (ext4 stops at 16 TiB minus one block, and the volume has a header).
TMPFS = "/dev/shm"


def parse_counts(s, what, lo=1, hi=4096):
    out = []
    for raw in s.split(","):
        raw = raw.strip()
        if not raw:
            continue
        if not raw.isdigit() or not lo <= int(raw) <= hi:
            raise ValueError(f"{what}: {raw!r} is not a number from {lo} to {hi}")
        if int(raw) not in out:
            out.append(int(raw))
    if not out:
        raise ValueError(f"{what}: empty list")
    return sorted(out)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# ---------------------------------------------------------------- processes


class Proc:
    """A server started by a timed mode: optionally socket-activated (listening socket
    passed as fd 3, LISTEN_PID set in the child) and with NOTIFY_SOCKET. Stopped on exit
    whatever happens (Proc.stop_all)."""

    live = []

    def __init__(self, b, cmd, logpath, env=None, listen=None):
        self.b, self.cmd, self.logpath = b, cmd, logpath
        extra = dict(env or {})
        lfd = listen.fileno() if listen is not None else None

        def child():
            b._set_pdeathsig()
            if lfd is not None:
                if lfd != 3:
                    os.dup2(lfd, 3)
                os.set_inheritable(3, True)
                extra["LISTEN_FDS"] = "1"
                extra["LISTEN_PID"] = str(os.getpid())
            # The child's own environment (env=None below: exec uses it).
            os.environ.update(extra)

        with open(logpath, "ab") as logf:
            logf.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
            logf.flush()
            self.t_spawn = time.monotonic()
            self.t_spawn_wall = time.time()
            try:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                             stderr=subprocess.STDOUT, preexec_fn=child,
                                             close_fds=False)
            except FileNotFoundError:
                raise b.BenchError(f"{cmd[0]} not found; run scripts/install-deps.sh")
        Proc.live.append(self)

    @property
    def pid(self):
        return self.proc.pid

    def check_alive(self, what):
        if self.proc.poll() is not None:
            raise self.b.BenchError(
                f"{self.cmd[0]} exited (status {self.proc.returncode}) {what}; log "
                f"{self.logpath}:\n{self.b.tail(self.logpath)}")

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self in Proc.live:
            Proc.live.remove(self)

    @classmethod
    def stop_all(cls):
        for p in list(cls.live):
            with contextlib.suppress(Exception):
                p.stop(signal.SIGKILL)


class Notify:
    """A NOTIFY_SOCKET (sd_notify's datagram socket) in the work directory."""

    def __init__(self, path):
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.s.bind(path)

    def wait_ready(self, proc, timeout):
        """Monotonic time READY=1 arrived; fails when the server exits first."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise proc.b.BenchError(f"no READY=1 from {proc.cmd[0]} within {timeout} s; "
                                        f"log {proc.logpath}")
            self.s.settimeout(min(left, 0.5))
            try:
                msg = self.s.recv(4096)
            except socket.timeout:
                proc.check_alive("before READY=1")
                continue
            t = time.monotonic()
            if b"READY=1" in msg.split(b"\n"):
                return t

    def close(self):
        self.s.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def control(w, name):
    """A control socket of the server's own: the default (/run/cryptvol/control.sock for
    root) may be held by another server on the machine, and the fallback is logged."""
    return ["--control", os.path.join(w.root, f"ctl-{name}.sock")]


def listener(path):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(64)
    return s


# ---------------------------------------------------------------- fio


def fio_job(a, b, srv, label, rw, bs, qd, conns, rep):
    """One time-based fio run over `conns` connections (numjobs, one NBD connection
    each, aggregated by group_reporting). Returns IOPS, completion-latency percentiles
    and the server's VmHWM (peak RSS since it started) after the run."""
    fio_dir = os.path.join(a.run_dir, "fio")
    os.makedirs(fio_dir, exist_ok=True)
    out = os.path.join(fio_dir, f"{srv.name}-{label}-c{conns}-{rep}.json")
    cmd = [
        "fio", f"--name={label}", "--ioengine=nbd", f"--uri={b.server_uri(srv)}",
        f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--numjobs={conns}",
        # Threads, not processes: fio 3.33 with --numjobs > 1 processes and --group_reporting
        # counts the ramp's I/O in the total but not its time (4 jobs, 2 s ramp + 2 s: twice
        # the IOPS of the same run without a ramp; with --thread the two agree).
        "--thread", "--group_reporting", "--time_based", f"--runtime={a.runtime}",
        f"--ramp_time={a.ramp}", "--norandommap", "--randrepeat=0", "--clat_percentiles=1",
        "--percentile_list=50:99:99.9", "--output-format=json", f"--output={out}",
    ]
    peak = {"rss": 0}
    stop = threading.Event()

    def sample():
        # VmRSS every 20 ms as a cross-check of VmHWM (which the kernel keeps exactly).
        while not stop.wait(0.02):
            v = status_kib(srv.pid, "VmRSS")
            if v:
                peak["rss"] = max(peak["rss"], v)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        b.run(cmd, f"fio {label} x{conns} against {srv.name}",
              timeout=a.ramp + a.runtime + 180)
    finally:
        stop.set()
        th.join()
    hwm = status_kib(srv.pid, "VmHWM")
    if not srv.alive():
        raise b.BenchError(f"{srv.name} died during {label}; log {srv.logpath}")
    try:
        with open(out) as f:
            text = f.read()
        j = json.loads(text[text.index("{"):])["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise b.BenchError(f"fio {label} against {srv.name}: unreadable JSON {out}: {e}")
    if j.get("error"):
        raise b.BenchError(f"fio {label} against {srv.name} reported error {j['error']}")
    side = j["write"] if "write" in rw else j["read"]
    if side.get("io_bytes", 0) <= 0:
        raise b.BenchError(f"fio {label} against {srv.name} moved no data")
    pct = side.get("clat_ns", {}).get("percentile") or {}

    def p(key):
        v = pct.get(key)
        return v / 1000.0 if v is not None else None

    return {
        "server": srv.name, "job": label, "conns": conns, "repeat": rep,
        "iops": side["iops"], "bw_bytes": side["bw_bytes"],
        "clat_p50_us": p("50.000000"), "clat_p99_us": p("99.000000"),
        "clat_p999_us": p("99.900000"),
        "vmhwm_kib": hwm, "sampled_rss_max_kib": peak["rss"] or None,
    }


def _fio_mode(a, b, w, servers_jobs, mode, rep):
    """Runs (label, rw, bs, qd, conns) jobs against cryptvol and nbdkit-file for one
    repeat; the order of the two servers alternates between repeats."""
    order = ["cryptvol", PEER] if rep % 2 else [PEER, "cryptvol"]
    runs = []
    for name in order:
        srv = b.server_for(name, a, w)
        srv.start()
        try:
            idle = status_kib(srv.pid, "VmRSS")
            for label, rw, bs, qd, conns in servers_jobs:
                r = fio_job(a, b, srv, label, rw, bs, qd, conns, rep)
                r["idle_rss_kib"] = idle
                r["mode"] = mode
                runs.append(r)
                b.log(f"[{rep}/{a.repeat}] {mode:<7} {name:<12} {label:<20} x{conns} "
                      f"{r['iops']:>9.0f} IOPS  p50 {r['clat_p50_us'] or 0:>7.1f} "
                      f"p99 {r['clat_p99_us'] or 0:>7.1f} us  VmHWM "
                      f"{(r['vmhwm_kib'] or 0) / 1024:.1f} MiB")
                b.sync_file(srv.backing)
        finally:
            srv.stop()
    return runs


def scaling(a, b, w, rep):
    jobs = [(label, rw, "4k", 32, n) for label, rw in SCALING_JOBS for n in a.conns]
    return _fio_mode(a, b, w, jobs, "scaling", rep)


def latency(a, b, w, rep):
    jobs = [(label, rw, "4k", 1, 1) for label, rw in LATENCY_JOBS]
    return _fio_mode(a, b, w, jobs, "latency", rep)


def rss(a, b, w, rep):
    return _fio_mode(a, b, w, RSS_JOBS, "rss", rep)


# ---------------------------------------------------------------- attach


class Moto:
    """moto_server (AWS KMS) on a free loopback port, as the tests start it."""

    def __init__(self, b, logpath):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        py = shutil.which("python3") or "python3"
        self.p = Proc(b, [py, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                      logpath)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                self.p.check_alive("at start (is moto[server] installed? "
                                   "scripts/install-deps.sh)")
                if time.monotonic() > deadline:
                    raise b.BenchError(f"moto_server did not listen within 60 s; log {logpath}")
                time.sleep(0.1)

    def env(self, home):
        for f in ("aws-config", "aws-credentials"):
            open(os.path.join(home, f), "a").close()
        return {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing", "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_KMS": self.endpoint, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.path.join(home, "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": os.path.join(home, "aws-credentials"),
        }

    def kms(self, action, body):
        """One KMS JSON call (moto does not check signatures; the region comes from the
        credential scope of the Authorization header)."""
        req = urllib.request.Request(
            self.endpoint + "/", data=json.dumps(body).encode(), method="POST",
            headers={
                "Content-Type": "application/x-amz-json-1.1",
                "X-Amz-Target": f"TrentService.{action}",
                "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/"
                                 "kms/aws4_request, SignedHeaders=host, Signature=0",
            })
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def decrypt_latency(self, key_id, n):
        """Median seconds of one Decrypt call (the key backend's own latency)."""
        blob = self.kms("GenerateDataKey", {"KeyId": key_id, "NumberOfBytes": 64})
        ts = []
        for _ in range(n):
            t0 = time.monotonic()
            self.kms("Decrypt", {"CiphertextBlob": blob["CiphertextBlob"]})
            ts.append(time.monotonic() - t0)
        return median(ts)


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z\s+[A-Z]+\s+(.*)$")


def log_marks(path, t0_wall):
    """Seconds from the spawn (wall clock) to cryptvol's first log line, its last
    "export opened" and "listening on" (where the start-up time goes)."""
    marks = {}
    try:
        with open(path, errors="replace") as f:
            for line in f:
                m = LOG_LINE.match(line)
                if not m:
                    continue
                t = datetime.datetime.fromisoformat(m.group(1)[:26]).replace(
                    tzinfo=datetime.timezone.utc).timestamp() - t0_wall
                marks.setdefault("first_log_s", t)
                if m.group(2).startswith("export opened"):
                    marks["opened_s"] = t
                elif m.group(2).startswith("listening on"):
                    marks.setdefault("listening_s", t)
    except OSError:
        pass
    return marks


def exec_floor(a, n):
    """Median seconds to spawn `cryptvol --version` and see it exit: the process start
    (exec, dynamic loading, runtime set-up) every attach pays before any cryptvol work."""
    ts = []
    for _ in range(n):
        t0 = time.monotonic()
        subprocess.run([a.bin, "--version"], stdout=subprocess.DEVNULL, check=True)
        ts.append(time.monotonic() - t0)
    return median(ts)


def attach_once(a, b, w, name, cmd, export, env=None, rep=0):
    """Seconds from spawning the server to the greeting and to the first 4 KiB block read
    through a socket-activated listener."""
    sock = w.sock(f"attach-{name}")
    ls = listener(sock)
    logpath = os.path.join(w.logs, f"attach-{name}-{rep}.log")
    try:
        p = Proc(b, cmd, logpath, env=env, listen=ls)
        # Only the server holds the listener now: if it dies, the client's connection is
        # reset at once instead of waiting in a backlog nobody accepts from.
        ls.close()
        t0 = p.t_spawn
        try:
            c = nbdclient.Client(sock, export, timeout=120)
            data = c.read(0, BLOCK)
            t1 = time.monotonic()
            if len(data) != BLOCK:
                raise b.BenchError(f"attach {name}: short read")
            c.close()
        except (OSError, nbdclient.NbdError) as e:
            p.check_alive("during the attach")
            raise b.BenchError(f"attach {name}: {e}; log {p.logpath}")
        finally:
            p.stop()
        r = {"server": name, "greeting_s": c.t_greeting - t0, "first_block_s": t1 - t0}
        if name.startswith("cryptvol"):
            r.update(log_marks(logpath, p.t_spawn_wall))
        return r
    finally:
        ls.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


def attach_setup(a, b, w):
    """The volumes of the attach mode: a thin one under the local keystore, one whose data
    key AWS KMS (moto) wraps, and the plain file for nbdkit (sparse if the main mode did
    not write one)."""
    st = {"moto": Moto(b, os.path.join(w.logs, "moto.log"))}
    home = os.path.join(w.root, "aws")
    os.makedirs(home, exist_ok=True)
    st["aws_env"] = st["moto"].env(home)
    key = st["moto"].kms("CreateKey", {})["KeyMetadata"]["KeyId"]
    st["kms_key"] = key
    st["vol_local"] = os.path.join(w.root, "attach-local.img")
    st["vol_kms"] = os.path.join(w.root, "attach-kms.img")
    for path in (st["vol_local"], st["vol_kms"]):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    b.create_cryptvol(a, w, st["vol_local"], a.size)
    env = dict(os.environ, **st["aws_env"])
    b.run([a.bin, "create", "--size", f"{a.size // MIB}M", "--key", f"aws-kms:{key}",
           "--keystore", w.keystore, st["vol_kms"]], "cryptvol create (AWS KMS, moto)",
          env=env)
    if not os.path.exists(w.plain):
        with open(w.plain, "wb") as f:
            f.truncate(a.size)
    st["kms_decrypt_s"] = st["moto"].decrypt_latency(key, 5 if a.quick else 20)
    st["exec_floor_s"] = exec_floor(a, 5 if a.quick else 20)
    return st


def attach(a, b, w, st, rep):
    servers = [
        ("cryptvol-local", [a.bin, "serve", "--keystore", w.keystore, *control(w, "local"),
                            f"vol={st['vol_local']}"], "vol", None),
        ("cryptvol-kms", [a.bin, "serve", "--keystore", w.keystore, *control(w, "kms"),
                          f"vol={st['vol_kms']}"], "vol", st["aws_env"]),
        (PEER, ["nbdkit", "-f", "--exit-with-parent", "file", w.plain], "", None),
    ]
    if rep % 2 == 0:
        servers.reverse()
    runs = []
    for name, cmd, export, env in servers:
        r = attach_once(a, b, w, name, cmd, export, env, rep)
        r.update(mode="attach", repeat=rep)
        runs.append(r)
        b.log(f"[{rep}/{a.repeat}] attach  {name:<15} greeting {r['greeting_s'] * 1e3:7.1f} ms"
              f"  first block {r['first_block_s'] * 1e3:7.1f} ms")
    return runs


# ---------------------------------------------------------------- exports


def exports_setup(a, b, w):
    d = os.path.join(w.root, "exports")
    os.makedirs(d, exist_ok=True)
    vols = []
    t0 = time.monotonic()
    for i in range(max(a.export_counts)):
        path = os.path.join(d, f"e{i}.img")
        if not os.path.exists(path):
            b.create_cryptvol(a, w, path, 64 * MIB)
        vols.append(path)
    b.log(f"exports: {len(vols)} thin 64 MiB volumes ready in {time.monotonic() - t0:.1f} s")
    return vols


def serve_until_ready(a, b, w, name, vols, timeout=300):
    """Starts cryptvol serve on a Unix socket with NOTIFY_SOCKET; returns the process,
    seconds to READY=1, and VmRSS/VmHWM (KiB) right after it."""
    sock = w.sock(name)
    notify = Notify(os.path.join(w.root, f"{name}.notify"))
    try:
        cmd = [a.bin, "serve", "--unix", sock, "--keystore", w.keystore, *control(w, name)] + [
            f"{n}={path}" for n, path in vols]
        p = Proc(b, cmd, os.path.join(w.logs, f"{name}.log"), env={"NOTIFY_SOCKET": notify.path})
        t = notify.wait_ready(p, timeout)
        return p, t - p.t_spawn, status_kib(p.pid, "VmRSS"), status_kib(p.pid, "VmHWM"), sock
    finally:
        notify.close()


def exports(a, b, w, vols, rep):
    runs = []
    counts = a.export_counts if rep % 2 else list(reversed(a.export_counts))
    for n in counts:
        named = [(f"e{i}", vols[i]) for i in range(n)]
        p, ready_s, rss_kib, hwm_kib, sock = serve_until_ready(a, b, w, f"exports{n}", named)
        try:
            # The last export must serve a block: READY=1 means every volume is open.
            c = nbdclient.Client(sock, f"e{n - 1}")
            c.read(0, BLOCK)
            c.close()
        except (OSError, nbdclient.NbdError) as e:
            raise b.BenchError(f"exports {n}: export e{n - 1} does not serve: {e}")
        finally:
            p.stop()
        runs.append({"mode": "exports", "exports": n, "repeat": rep, "ready_s": ready_s,
                     "rss_kib": rss_kib, "vmhwm_kib": hwm_kib})
        b.log(f"[{rep}/{a.repeat}] exports {n:>4}: READY=1 after {ready_s * 1e3:7.1f} ms, "
              f"RSS {rss_kib / 1024:.1f} MiB")
    return runs


# ---------------------------------------------------------------- thin


def thin_setup(a, b, w):
    """Where the big thin volume can live: the work directory, else tmpfs (noted)."""
    d = a.thin_dir or os.path.join(w.root, "thin")
    os.makedirs(d, exist_ok=True)
    probe = os.path.join(d, "probe.img")
    note = None
    try:
        with open(probe, "wb") as f:
            f.truncate(a.thin_size + 256 * MIB)
    except OSError as e:
        if a.thin_dir:
            raise b.BenchError(f"{d} cannot hold a sparse file of {a.thin_size} bytes: {e}")
        if not os.path.isdir(TMPFS):
            raise b.BenchError(f"{d} cannot hold a {a.thin_size}-byte file ({e}) and there "
                               f"is no {TMPFS}; pass --thin-dir on a filesystem that can")
        note = (f"the work directory's filesystem cannot hold a {a.thin_size >> 40} TiB file "
                f"({e.strerror}); the volume lives on tmpfs ({TMPFS}), where fsync costs "
                f"nothing: first writes there show the CPU and map cost, not the disk's")
        d = tempfile.mkdtemp(prefix="cryptvol-bench-thin-", dir=TMPFS)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(probe)
    base = os.path.join(d, "base-1g.img")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(base)
    b.create_cryptvol(a, w, base, GIB)
    return {"dir": d, "note": note, "base": base, "tmp": d != (a.thin_dir or
                                                             os.path.join(w.root, "thin"))}


def timed_writes(c, offsets):
    buf = os.urandom(BLOCK)
    ts = []
    for off in offsets:
        t0 = time.monotonic()
        c.write(off, buf)
        ts.append(time.monotonic() - t0)
    return ts


def thin(a, b, w, st, rep):
    big = os.path.join(st["dir"], "big.img")
    plain = os.path.join(st["dir"], "plain-sparse.img")
    rng = random.Random(rep)
    chunks = a.thin_size // CHUNK
    offsets = [i * CHUNK for i in rng.sample(range(chunks), a.thin_writes)]
    later = [o + BLOCK for o in offsets]  # another block of the same, now allocated, chunk
    for path in (big, plain):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    r = {"mode": "thin", "repeat": rep, "size_bytes": a.thin_size}
    try:
        t0 = time.monotonic()
        b.create_cryptvol(a, w, big, a.thin_size)
        r["create_s"] = time.monotonic() - t0
        r["file_blocks_after_create"] = os.stat(big).st_blocks * 512
        p, r["ready_s"], r["rss_kib"], _, sock = serve_until_ready(
            a, b, w, "thin", [(THIN_EXPORT, big)])
        try:
            c = nbdclient.Client(sock, THIN_EXPORT)
            if c.size != a.thin_size:
                raise b.BenchError(f"thin: the export reports {c.size} bytes, not {a.thin_size}")
            r["first_write_s"] = timed_writes(c, offsets)
            r["later_write_s"] = timed_writes(c, later)
            r["rewrite_s"] = timed_writes(c, offsets)
            r["rss_after_writes_kib"] = status_kib(p.pid, "VmRSS")
            c.close()
        finally:
            p.stop(signal.SIGKILL)  # a throw-away volume: nothing to write back
        pb, r["base_ready_s"], r["base_rss_kib"], _, sockb = serve_until_ready(
            a, b, w, "thin-base", [(THIN_EXPORT, st["base"])])
        pb.stop()
        # The peer: nbdkit file over a sparse file of the same size (first write = the
        # filesystem allocating a block).
        with open(plain, "wb") as f:
            f.truncate(a.thin_size)
        sockp = w.sock("thin-plain")
        ls = listener(sockp)
        try:
            pp = Proc(b, ["nbdkit", "-f", "--exit-with-parent", "file", plain],
                      os.path.join(w.logs, "thin-nbdkit.log"), listen=ls)
            ls.close()  # only the server holds it (see attach_once)
            try:
                c = nbdclient.Client(sockp, "")
                r["peer_first_write_s"] = timed_writes(c, offsets)
                r["peer_later_write_s"] = timed_writes(c, later)
                c.close()
            finally:
                pp.stop(signal.SIGKILL)
        finally:
            ls.close()
    except (OSError, nbdclient.NbdError) as e:
        raise b.BenchError(f"thin: {e}")
    finally:
        for path in (big, plain):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    fw, lw = median(r["first_write_s"]), median(r["later_write_s"])
    b.log(f"[{rep}/{a.repeat}] thin {a.thin_size >> 40} TiB: create {r['create_s'] * 1e3:.0f} ms,"
          f" READY {r['ready_s'] * 1e3:.0f} ms, RSS {r['rss_kib'] / 1024:.1f} MiB (1 GiB volume "
          f"{r['base_rss_kib'] / 1024:.1f} MiB); 4k write first {fw * 1e6:.0f} us, later "
          f"{lw * 1e6:.0f} us")
    return [r]


# ---------------------------------------------------------------- driver


def needs(a):
    """The images of the main bench's prepare() that the selected modes use."""
    need = set()
    if set(a.modes) & {"scaling", "latency", "rss"}:
        need.add("cryptvol")
    return need


def preflight(a, b):
    """Fails at once (not after the other modes) when a mode's peer is missing."""
    if "attach" in a.modes:
        py = shutil.which("python3") or "python3"
        r = subprocess.run([py, "-c", "import moto.server, flask"], capture_output=True)
        if r.returncode != 0:
            raise b.BenchError("the attach mode's AWS KMS runs need moto[server] for "
                               f"{py}; run scripts/install-deps.sh (or leave out attach "
                               "with --modes)")


def run_modes(a, b, w):
    """Runs the selected extended modes; returns their raw runs and context."""
    sel = [m for m in EXTENDED if m in a.modes]
    out = {"selected": sel, "runs": [], "options": {
        "conns": a.conns, "export_counts": a.export_counts, "thin_size_bytes": a.thin_size,
        "thin_writes": a.thin_writes, "size_bytes": a.size, "runtime_s": a.runtime,
        "ramp_s": a.ramp, "repeat": a.repeat}}
    if not sel:
        return out
    st = {}
    try:
        if "attach" in sel:
            st["attach"] = attach_setup(a, b, w)
            out["kms_decrypt_s"] = st["attach"]["kms_decrypt_s"]
            out["exec_floor_s"] = st["attach"]["exec_floor_s"]
        if "exports" in sel:
            st["exports"] = exports_setup(a, b, w)
        if "thin" in sel:
            st["thin"] = thin_setup(a, b, w)
            out["thin_note"] = st["thin"]["note"]
            out["thin_dir"] = st["thin"]["dir"]
        for rep in range(1, a.repeat + 1):
            for m in sel:
                if m == "scaling":
                    out["runs"] += scaling(a, b, w, rep)
                elif m == "latency":
                    out["runs"] += latency(a, b, w, rep)
                elif m == "rss":
                    out["runs"] += rss(a, b, w, rep)
                elif m == "attach":
                    out["runs"] += attach(a, b, w, st["attach"], rep)
                elif m == "exports":
                    out["runs"] += exports(a, b, w, st["exports"], rep)
                elif m == "thin":
                    out["runs"] += thin(a, b, w, st["thin"], rep)
    finally:
        Proc.stop_all()
        t = st.get("thin")
        if t and t["tmp"]:
            shutil.rmtree(t["dir"], ignore_errors=True)
    return out
