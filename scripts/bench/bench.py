#!/usr/bin/python3
"""Side-by-side NBD benchmark: cryptvol against plain nbdkit, nbdkit's LUKS filter and
qemu-nbd over LUKS, with the same fio jobs over Unix sockets; and cryptvol's thin volumes
against a volume without an allocation map (cryptvol-nomap) and on never-written volumes
(cryptvol-fresh: first writes, write amplification).

Run through scripts/bench.sh (which installs the peers and builds the release binary);
`scripts/bench.sh --help` lists the options. Standard library only; the chart uses
matplotlib when it is importable (scripts/bench/report.py).
"""

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402  (scripts/bench/report.py)
import modes  # noqa: E402  (scripts/bench/modes.py: the extended modes)

MIB = 1 << 20
GIB = 1 << 30
PASSPHRASE = "cryptvol-bench-throwaway-passphrase"

# name, fio --rw, block size, queue depth, title
JOBS = [
    ("randread-4k-qd32", "randread", "4k", 32, "4k random read qd32"),
    ("randwrite-4k-qd32", "randwrite", "4k", 32, "4k random write qd32"),
    ("read-1m-qd8", "read", "1m", 8, "1M sequential read qd8"),
    ("write-1m-qd8", "write", "1m", 8, "1M sequential write qd8"),
    ("randread-4k-qd1", "randread", "4k", 1, "4k random read qd1 (latency)"),
]
JOB_ALIASES = {
    "randread": "randread-4k-qd32",
    "randwrite": "randwrite-4k-qd32",
    "seqread": "read-1m-qd8",
    "read": "read-1m-qd8",
    "seqwrite": "write-1m-qd8",
    "write": "write-1m-qd8",
    "qd1": "randread-4k-qd1",
    "latency": "randread-4k-qd1",
}

# qemu-nbd configurations over the same LUKS image. "qemu-nbd" is the one reported as
# the peer; the others can be selected with --servers to re-check which is fastest.
QEMU_VARIANTS = {
    "qemu-nbd": ["--cache=writeback", "--aio=io_uring"],
    "qemu-nbd-none-threads": ["--cache=none", "--aio=threads"],
    "qemu-nbd-none-native": ["--cache=none", "--aio=native"],
    "qemu-nbd-none-io_uring": ["--cache=none", "--aio=io_uring"],
    "qemu-nbd-writeback-threads": ["--cache=writeback", "--aio=threads"],
    "qemu-nbd-writeback-io_uring": ["--cache=writeback", "--aio=io_uring"],
}
# cryptvol's own variants (docs/performance.md, "Thin volumes"):
# - cryptvol-nomap: a volume made with `create --no-allocation-map` (the layout before thin
#   volumes), prefilled and served like `cryptvol`: the baseline for "no regression after
#   the first write to each chunk";
# - cryptvol-fresh: the first-write cost. Only the write jobs, each on a new, never-written
#   thin volume of --fresh-size (64 GiB), so nearly every 4 KiB write allocates a chunk.
# - cryptvol-tls: the `cryptvol` volume served with `--tls require` (rustls), read by fio
#   over nbds+unix:// (libnbd's GnuTLS; tls-verify-peer=false, the certificate is a
#   throw-away one): the cost of TLS against plaintext in the same run.
CRYPTVOL_VARIANTS = ["cryptvol-nomap", "cryptvol-fresh", "cryptvol-tls"]
DEFAULT_SERVERS = ["cryptvol"] + CRYPTVOL_VARIANTS + ["nbdkit-file", "nbdkit-luks", "qemu-nbd"]
# The file engines (docs/performance.md, "io_uring engine"): the `cryptvol` volume served
# with `--engine threads` (pread/pwrite) and `--engine uring` (io_uring); `cryptvol` itself
# runs with the default, auto (io_uring where the kernel allows it).
ENGINE_VARIANTS = {"cryptvol-threads": "threads", "cryptvol-uring": "uring"}
ALL_SERVERS = ["cryptvol"] + CRYPTVOL_VARIANTS + ["nbdkit-file", "nbdkit-luks"] + list(
    QEMU_VARIANTS
) + list(ENGINE_VARIANTS)
# O_DIRECT on the backing file (docs/performance.md, "O_DIRECT backing file"): the
# `cryptvol` volume served with `--direct`, with the engine given.
DIRECT_VARIANTS = {"cryptvol-direct": "auto", "cryptvol-uring-direct": "uring"}
ALL_SERVERS += list(DIRECT_VARIANTS)
# Allocation-map chunk (docs/format.md section 7a): a first write to a chunk writes all of it.
CHUNK = 64 << 10

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A failure with a message that says what happened and what to do."""


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def parse_size(s):
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", s, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {s!r}: use e.g. 512M, 1G, 4G")
    n = int(m.group(1)) * {"": 1, "K": 1 << 10, "M": MIB, "G": GIB, "T": 1 << 40}[
        m.group(2).upper()
    ]
    if n < 64 * MIB or n % MIB:
        raise argparse.ArgumentTypeError(f"size {s!r}: use a multiple of 1M, at least 64M")
    return n


def bs_bytes(bs):
    return int(bs[:-1]) * {"k": 1 << 10, "m": MIB}[bs[-1]]


def parse_list(s, known, aliases=None, what="item"):
    out = []
    for raw in s.split(","):
        name = raw.strip()
        if not name:
            continue
        name = (aliases or {}).get(name, name)
        if name not in known:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {raw!r}; choose from {', '.join(known)}"
            )
        if name not in out:
            out.append(name)
    if not out:
        raise argparse.ArgumentTypeError(f"empty {what} list")
    return out


def parse_thin_size(p, s):
    """The thin mode's volume size: any multiple of 1 GiB from 1 GiB to 64 TiB."""
    m = re.fullmatch(r"\s*(\d+)\s*([GT])(i?B)?\s*", s, re.IGNORECASE)
    n = int(m.group(1)) << (30 if m.group(2).upper() == "G" else 40) if m else 0
    if not GIB <= n <= 64 << 40:
        p.error(f"--thin-size {s!r}: use e.g. 16T or 512G (1G to 64T)")
    return n


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="scripts/bench.sh",
        usage="scripts/bench.sh [options]  (scripts/bench.sh --help lists them)",
        description=__doc__,
    )
    p.add_argument("--bin", required=True, help="the cryptvol release binary")
    p.add_argument("--repo", required=True, help="the repository root")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--size", type=parse_size, default=None)
    p.add_argument("--runtime", type=int, default=None)
    p.add_argument("--ramp", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--jobs", default=None)
    p.add_argument("--servers", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--xts", dest="xts", action="store_true", default=None)
    p.add_argument("--no-xts", dest="xts", action="store_false")
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--fresh-size", type=parse_size, default=None)
    p.add_argument("--fresh-max", type=parse_size, default=None)
    p.add_argument("--modes", default=None)
    p.add_argument("--conns", default=None)
    p.add_argument("--export-counts", default=None)
    p.add_argument("--thin-size", default=None)
    p.add_argument("--thin-dir", default=None)
    p.add_argument("--thin-writes", type=int, default=None)
    a = p.parse_args(argv)
    try:
        a.jobs = parse_list(a.jobs, [j[0] for j in JOBS], JOB_ALIASES, "job") if a.jobs else [
            j[0] for j in JOBS
        ]
        a.servers = parse_list(a.servers, ALL_SERVERS, None, "server") if a.servers else list(
            DEFAULT_SERVERS
        )
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    try:
        a.modes = parse_list(a.modes, modes.MODES, None, "mode") if a.modes else list(modes.MODES)
        a.conns = modes.parse_counts(a.conns or "1,2,4", "--conns", 1, 64)
        a.export_counts = modes.parse_counts(a.export_counts or "1,10,200", "--export-counts")
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e))
    a.thin_size = parse_thin_size(p, a.thin_size or "16T")
    a.thin_writes = a.thin_writes or (16 if a.quick else 64)
    if not 1 <= a.thin_writes <= 4096:
        p.error("--thin-writes must be from 1 to 4096")
    a.thin_dir = os.path.abspath(a.thin_dir) if a.thin_dir else None
    a.size = a.size or GIB
    a.runtime = a.runtime or (2 if a.quick else 5)
    a.ramp = a.ramp if a.ramp is not None else (1 if a.quick else 2)
    a.repeat = a.repeat or (1 if a.quick else 3)
    if a.xts is None:
        a.xts = not a.quick
    if a.runtime < 1 or a.repeat < 1 or a.ramp < 0:
        p.error("--runtime and --repeat must be at least 1, --ramp at least 0")
    a.out = os.path.abspath(a.out or os.path.join(a.repo, "bench", "results"))
    a.fresh_size = a.fresh_size or 64 * GIB
    a.fresh_max = a.fresh_max or (512 * MIB if a.quick else 2 * GIB)
    if a.fresh_max > a.fresh_size:
        p.error("--fresh-max must not exceed --fresh-size")
    return a


# ---------------------------------------------------------------- processes


def _set_pdeathsig():
    """Runs in the child before exec: die with the driver even if it is SIGKILLed."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run(cmd, what, timeout=600, env=None, capture=True):
    try:
        r = subprocess.run(
            cmd,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            text=True,
            timeout=timeout,
            env=env,
        )
    except FileNotFoundError:
        raise BenchError(f"{what}: {cmd[0]} not found; run scripts/install-deps.sh as root")
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: timed out after {timeout} s: {' '.join(cmd)}")
    if r.returncode != 0:
        detail = (r.stderr or "").strip()[-2000:] if capture else ""
        raise BenchError(f"{what} failed (exit {r.returncode}): {' '.join(cmd)}\n{detail}")
    return r.stdout if capture else ""


def proc_cpu_seconds(pid):
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def proc_status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def reset_peak_rss(pid):
    """Resets VmHWM to the current RSS (Linux >= 4.0). False when not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Server:
    """One NBD server process on a Unix socket; stopped on exit whatever happens."""

    live = []

    def __init__(self, name, cmd, sock, logpath, backing):
        self.name, self.cmd, self.sock, self.logpath, self.backing = (
            name,
            cmd,
            sock,
            logpath,
            backing,
        )
        self.proc = None

    def start(self, timeout=60):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)
        logf = open(self.logpath, "ab")
        logf.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(self.cmd)}\n".encode())
        logf.flush()
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                preexec_fn=_set_pdeathsig,
            )
        except FileNotFoundError:
            raise BenchError(f"{self.name}: {self.cmd[0]} not found; run scripts/install-deps.sh")
        finally:
            logf.close()
        Server.live.append(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited at start (status {self.proc.returncode}); "
                    f"its log {self.logpath} says:\n{tail(self.logpath)}"
                )
            if os.path.exists(self.sock):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(self.sock)
                    # Read the NBD greeting so the server is really serving.
                    s.settimeout(5)
                    if s.recv(8) == b"NBDMAGIC":
                        return
                except OSError:
                    pass
                finally:
                    s.close()
            time.sleep(0.05)
        raise BenchError(
            f"{self.name} did not accept NBD connections on {self.sock} within {timeout} s; "
            f"log {self.logpath}:\n{tail(self.logpath)}"
        )

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.proc.pid}) ignored SIGTERM for 15 s; killing it")
                self.proc.kill()
                self.proc.wait()
        if self in Server.live:
            Server.live.remove(self)
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)

    def kill(self):
        """SIGKILL: for a throwaway volume whose dirty pages need not reach the disk
        (SIGTERM would make the server flush them first)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self in Server.live:
            Server.live.remove(self)
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)

    @classmethod
    def stop_all(cls):
        for s in list(cls.live):
            with contextlib.suppress(Exception):
                s.stop()


def tail(path, n=20):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- setup


class Work:
    """The scratch directory: keystore, images, sockets, logs."""

    def __init__(self, root, logs):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.keystore = os.path.join(root, "keystore")
        self.vol = os.path.join(root, "vol.img")
        self.vol_nomap = os.path.join(root, "vol-nomap.img")
        self.vol_fresh = os.path.join(root, "vol-fresh.img")
        self.plain = os.path.join(root, "plain.img")
        self.luks = os.path.join(root, "luks.img")
        self.passfile = os.path.join(root, "luks.pass")
        self.tls_cert = os.path.join(root, "tls-cert.pem")
        self.tls_key = os.path.join(root, "tls-key.pem")
        self.logs = logs
        os.makedirs(self.logs, exist_ok=True)

    def sock(self, name):
        return os.path.join(self.root, f"{name}.sock")


def server_for(name, a, w):
    sock = w.sock(name)
    logpath = os.path.join(w.logs, f"{name}.log")
    if name in ("cryptvol", "cryptvol-nomap", "cryptvol-fresh"):
        backing = {"cryptvol": w.vol, "cryptvol-nomap": w.vol_nomap,
                   "cryptvol-fresh": w.vol_fresh}[name]
        cmd = [a.bin, "serve", "--unix", sock, "--keystore", w.keystore, f"vol={backing}"]
    elif name in DIRECT_VARIANTS:
        backing = w.vol
        cmd = [a.bin, "serve", "--unix", sock, "--keystore", w.keystore,
               "--engine", DIRECT_VARIANTS[name], "--direct", f"vol={backing}"]
    elif name in ENGINE_VARIANTS:
        backing = w.vol
        cmd = [a.bin, "serve", "--unix", sock, "--keystore", w.keystore,
               "--engine", ENGINE_VARIANTS[name], f"vol={backing}"]
    elif name == "cryptvol-tls":
        backing = w.vol
        cmd = [a.bin, "serve", "--unix", sock, "--keystore", w.keystore,
               "--tls", "require", "--tls-cert", w.tls_cert, "--tls-key", w.tls_key,
               f"vol={backing}"]
    elif name == "nbdkit-file":
        cmd = ["nbdkit", "-f", "--exit-with-parent", "--unix", sock, "file", w.plain]
        backing = w.plain
    elif name == "nbdkit-luks":
        cmd = [
            "nbdkit", "-f", "--exit-with-parent", "--unix", sock,
            "--filter=luks", "file", w.luks, f"passphrase=+{w.passfile}",
        ]
        backing = w.luks
    elif name in QEMU_VARIANTS:
        cmd = (
            ["qemu-nbd", "-t", "-e", "16", "-k", sock]
            + QEMU_VARIANTS[name]
            + [
                "--object", f"secret,id=sec0,file={w.passfile}",
                "--image-opts", f"driver=luks,key-secret=sec0,file.filename={w.luks}",
            ]
        )
        backing = w.luks
    else:
        raise BenchError(f"unknown server {name}")
    return Server(name, cmd, sock, logpath, backing)


def uri(sock):
    return f"nbd+unix:///?socket={sock}"


def server_uri(srv):
    """The URI fio uses for a server: TLS (not verified: a throw-away certificate on a
    local socket) for cryptvol-tls."""
    if srv.name == "cryptvol-tls":
        return f"nbds+unix:///?socket={srv.sock}&tls-verify-peer=false"
    return uri(srv.sock)


def make_tls_cert(w):
    """A self-signed certificate for cryptvol-tls (EC P-256, as a real deployment would
    likely use)."""
    run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", w.tls_key,
         "-out", w.tls_cert],
        "openssl req (bench TLS certificate)",
    )
    os.chmod(w.tls_key, 0o600)
    return "self-signed EC P-256 certificate; rustls (aws-lc-rs) server, libnbd (GnuTLS) client"


def fill_random(path, size):
    """Writes `size` random bytes to a new file (the plain image, and the prefill source)."""
    chunk = 8 * MIB
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def check_luks_image(path):
    with open(path, "rb") as f:
        hdr = f.read(208)
    if hdr[:6] != b"LUKS\xba\xbe" or int.from_bytes(hdr[6:8], "big") != 1:
        raise BenchError(f"{path} is not a LUKSv1 image (nbdkit's luks filter needs LUKSv1)")
    cipher = hdr[8:40].rstrip(b"\0").decode()
    mode = hdr[40:72].rstrip(b"\0").decode()
    key_bytes = int.from_bytes(hdr[108:112], "big")
    spec = f"{cipher}-{mode}"
    if spec != "aes-xts-plain64" or key_bytes != 64:
        raise BenchError(
            f"{path}: cipher {spec} with a {key_bytes * 8}-bit key, expected "
            f"aes-xts-plain64 with 512 bits (aes-256-xts-plain64)"
        )
    return f"LUKS1 {spec}, {key_bytes * 8}-bit key (AES-256-XTS), 512-byte IV sectors"


def prepare(a, w, need):
    """Creates and prefills the images the selected servers need."""
    t0 = time.monotonic()
    size = a.size
    info = {}
    if need & {"cryptvol", "cryptvol-nomap", "cryptvol-fresh"}:
        os.makedirs(w.keystore, mode=0o700, exist_ok=True)
        os.chmod(w.keystore, 0o700)
    if "cryptvol-tls" in need:
        info["cryptvol-tls"] = make_tls_cert(w)
    if "cryptvol" in need:
        create_cryptvol(a, w, w.vol, size)
        info["cryptvol"] = ("cryptvol v1, AES-256-XTS, 4096-byte sectors, local keystore, "
                            "thin (allocation map), every chunk allocated by the prefill")
    if "cryptvol-nomap" in need:
        create_cryptvol(a, w, w.vol_nomap, size, ["--no-allocation-map"])
        info["cryptvol-nomap"] = ("cryptvol v1, AES-256-XTS, 4096-byte sectors, local keystore, "
                                  "created with --no-allocation-map (no map, not thin)")
    if "cryptvol-fresh" in need:
        info["cryptvol-fresh"] = (
            f"cryptvol v1 thin volume of {a.fresh_size // GIB} GiB, created afresh "
            f"(never written) for every fresh run and deleted after it"
        )
    if "luks" in need:
        with open(w.passfile, "w") as f:
            f.write(PASSPHRASE)
        os.chmod(w.passfile, 0o600)
        # iter-time only sets the PBKDF2 cost of unlocking (kept short so servers start
        # fast); it has no effect on the data path.
        run(
            [
                "qemu-img", "create", "-q", "-f", "luks",
                "--object", f"secret,id=sec0,file={w.passfile}",
                "-o", "key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,"
                "ivgen-alg=plain64,hash-alg=sha256,iter-time=100",
                w.luks, str(size),
            ],
            "qemu-img create -f luks",
        )
        info["luks"] = check_luks_image(w.luks)
    prefill = [(name, key) for name, key in (("cryptvol", "cryptvol"),
                                             ("cryptvol-nomap", "cryptvol-nomap"),
                                             ("nbdkit-luks", "luks")) if key in need]
    if prefill or "nbdkit-file" in a.servers:
        log(f"writing {size // MIB} MiB of random data to {w.plain}")
        fill_random(w.plain, size)
    # Prefill the encrypted images through their servers so the data areas hold real
    # ciphertext of random plaintext (nothing sparse, nothing that reads as zeros).
    for name, _key in prefill:
        srv = server_for(name, a, w)
        log(f"prefilling {name} with the random data (nbdcopy)")
        try:
            srv.start()
            run(["nbdcopy", "--flush", w.plain, uri(srv.sock)], f"nbdcopy into {name}")
        finally:
            srv.stop()
    if "cryptvol" in need:
        info["cryptvol_allocation"] = check_fully_allocated(a, w.vol, size)
    if "cryptvol-nomap" in need:
        check_no_map(a, w.vol_nomap)
    if "nbdkit-file" not in a.servers:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(w.plain)
    log(f"images ready in {time.monotonic() - t0:.1f} s")
    return info


def create_cryptvol(a, w, path, size, extra=()):
    run(
        [a.bin, "create", "--size", f"{size // MIB}M", "--keystore", w.keystore, *extra, path],
        f"cryptvol create {os.path.basename(path)}",
    )


def volume_info(a, path):
    out = run([a.bin, "info", "--json", path], f"cryptvol info --json {path}")
    try:
        return json.loads(out)
    except ValueError as e:
        raise BenchError(f"cryptvol info --json {path}: not JSON ({e}):\n{out[-800:]}")


def check_fully_allocated(a, path, size):
    """The steady-state comparison is only meaningful if the prefill allocated every chunk
    of the thin volume: `cryptvol info` must report allocated_bytes == size."""
    al = volume_info(a, path).get("allocation")
    if not isinstance(al, dict):
        raise BenchError(
            f"{path} has no allocation map (cryptvol info --json shows allocation: null); "
            f"the cryptvol volume must be a thin volume: is {a.bin} older than the allocation map?"
        )
    allocated = al.get("allocated_bytes")
    if allocated != size or not al.get("map_healthy"):
        raise BenchError(
            f"after the nbdcopy prefill, cryptvol info reports {allocated} of {size} bytes "
            f"allocated (map: {al.get('map')}): the prefill did not allocate every chunk, so "
            f"the random-write job would include first writes. Check the nbdcopy prefill "
            f"(random source, --flush) and the server log."
        )
    log(f"cryptvol volume: {allocated} of {size} bytes allocated after the prefill (all)")
    return {"allocated_bytes": allocated, "chunks": al.get("chunks"),
            "chunk_size": al.get("chunk_size"), "map": al.get("map")}


def check_no_map(a, path):
    al = volume_info(a, path).get("allocation")
    if al is not None:
        raise BenchError(
            f"{path} was created with --no-allocation-map but cryptvol info shows an "
            f"allocation map ({al}); the no-map baseline would not be one"
        )


def backing_bytes(path):
    """Bytes the file occupies (st_blocks; on ext4/xfs this includes delayed allocation,
    so it grows as soon as the server writes, before writeback)."""
    return os.stat(path).st_blocks * 512


def fresh_io_size(a, bs):
    """Client bytes for one fresh run: at most --fresh-max of backing-file growth, as a
    first write allocates whole chunks (a 4 KiB write can grow the file by 64 KiB)."""
    b = bs_bytes(bs)
    n = a.fresh_max * b // max(b, CHUNK)
    return max(b, n - n % b)


def check_space(w, need_bytes):
    free = shutil.disk_usage(w.root).free
    if free < need_bytes + GIB:
        raise BenchError(
            f"only {free / GIB:.1f} GiB free in {w.root}; the fresh thin-volume runs need "
            f"{need_bytes / GIB:.1f} GiB plus 1 GiB of headroom. Free some space, lower "
            f"--fresh-max, or leave out --servers cryptvol-fresh"
        )


def sync_file(path):
    """Writes back a backing file's dirty pages between jobs (outside any measurement),
    so one job's writeback does not steal CPU from the next."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- one fio job


def run_job(a, w, srv, job, rep, io_size=None):
    """One fio run. With io_size (the fresh thin-volume runs): no ramp, and fio stops
    after io_size client bytes or --runtime seconds, whichever comes first; the growth
    of the backing file over the run is recorded."""
    name, rw, bs, qd, _title = job
    fio_dir = os.path.join(a.run_dir, "fio")
    os.makedirs(fio_dir, exist_ok=True)
    out = os.path.join(fio_dir, f"{srv.name}-{name}-{rep}.json")
    ramp = a.ramp if io_size is None else 0
    limit = ["--time_based"] if io_size is None else [f"--io_size={io_size}"]
    cmd = [
        "fio", f"--name={name}", "--ioengine=nbd", f"--uri={server_uri(srv)}",
        f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", "--numjobs=1",
        *limit, f"--runtime={a.runtime}", f"--ramp_time={ramp}",
        "--norandommap", "--randrepeat=0", "--lat_percentiles=1",
        "--percentile_list=50:99:99.9", "--output-format=json", f"--output={out}",
    ]
    blocks0 = backing_bytes(srv.backing) if io_size is not None else None
    rss_reset = reset_peak_rss(srv.pid)
    load = os.getloadavg()[0]
    t_start = time.monotonic()
    fio = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           preexec_fn=_set_pdeathsig)
    # Server CPU is sampled over fio's measured window (after the ramp) and scaled to
    # the runtime fio reports, so ramp and setup do not count.
    try:
        if ramp:
            time.sleep(ramp)
        cpu0, t0 = proc_cpu_seconds(srv.pid), time.monotonic()
        _, err = fio.communicate(timeout=ramp + a.runtime + 120)
    except subprocess.TimeoutExpired:
        fio.kill()
        fio.communicate()
        raise BenchError(f"fio {name} against {srv.name} hung (> {a.runtime + 120} s)")
    except BaseException:
        fio.kill()
        fio.wait()
        raise
    cpu1, t1 = proc_cpu_seconds(srv.pid), time.monotonic()
    peak_rss = proc_status_kib(srv.pid, "VmHWM")
    blocks1 = backing_bytes(srv.backing) if io_size is not None else None
    if not srv.alive():
        raise BenchError(f"{srv.name} died during {name}; log {srv.logpath}:\n{tail(srv.logpath)}")
    if fio.returncode != 0:
        raise BenchError(
            f"fio {name} against {srv.name} failed (exit {fio.returncode}):\n{err.strip()[-2000:]}"
        )
    try:
        with open(out) as f:
            text = f.read()
        # fio may print notes before the JSON document.
        d = json.loads(text[text.index("{"):])
        j = d["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise BenchError(f"fio {name} against {srv.name}: unreadable JSON output {out}: {e}")
    if j.get("error"):
        raise BenchError(f"fio {name} against {srv.name} reported error {j['error']}")
    side = j["write"] if rw in ("write", "randwrite") else j["read"]
    runtime_s = side["runtime"] / 1000.0
    if runtime_s <= 0 or side["io_bytes"] <= 0:
        raise BenchError(f"fio {name} against {srv.name} moved no data")
    lat = side.get("lat_ns", {})
    pct = lat.get("percentile") or side.get("clat_ns", {}).get("percentile") or {}

    def p(key):
        v = pct.get(key)
        return v / 1000.0 if v is not None else None

    wall = max(t1 - t0, 1e-6)
    cpu_rate = (cpu1 - cpu0) / wall  # server cores busy, on average
    gib_per_s = side["io_bytes"] / GIB / runtime_s
    r = {
        "server": srv.name,
        "job": name,
        "repeat": rep,
        "iops": side["iops"],
        "bw_bytes": side["bw_bytes"],
        "io_bytes": side["io_bytes"],
        "runtime_s": runtime_s,
        "lat_mean_us": lat.get("mean", 0) / 1000.0,
        "lat_p50_us": p("50.000000"),
        "lat_p99_us": p("99.000000"),
        "lat_p999_us": p("99.900000"),
        "server_cpu_s": cpu1 - cpu0,
        "server_cpu_wall_s": wall,
        "server_cpu_cores": cpu_rate,
        "cpu_s_per_gib": cpu_rate / gib_per_s,
        "peak_rss_kib": peak_rss,
        "peak_rss_scope": "job" if rss_reset else "since server start",
        "fio_usr_cpu_pct": j.get("usr_cpu"),
        "fio_sys_cpu_pct": j.get("sys_cpu"),
        "loadavg_1m_before": load,
        "elapsed_s": time.monotonic() - t_start,
    }
    if io_size is not None:
        # Client bytes over the whole run (no ramp, so fio's io_bytes are all of them).
        growth = blocks1 - blocks0
        r.update({
            "io_size_cap": io_size,
            "ios": side.get("total_ios"),
            "backing_growth_bytes": growth,
            "write_amplification": growth / side["io_bytes"],
            "backing_bw_bytes": growth / runtime_s,
        })
    return r


# The jobs cryptvol-fresh runs: the first write to a chunk costs something only for writes.
FRESH_JOBS = ["randwrite-4k-qd32", "write-1m-qd8"]


def run_fresh(a, w, job, rep):
    """One fresh run: a new, never-written thin volume of --fresh-size, served, written
    by the job for at most --fresh-max of backing-file growth, then the server is killed
    (its dirty pages need not be written back) and the image deleted."""
    io_size = fresh_io_size(a, job[2])
    check_space(w, a.fresh_max)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(w.vol_fresh)
    srv = server_for("cryptvol-fresh", a, w)
    try:
        create_cryptvol(a, w, w.vol_fresh, a.fresh_size)
        al = volume_info(a, w.vol_fresh).get("allocation")
        if not isinstance(al, dict) or al.get("allocated_bytes") != 0:
            raise BenchError(
                f"a new volume {w.vol_fresh} should be thin with nothing allocated; "
                f"cryptvol info shows allocation {al}"
            )
        srv.start()
        r = run_job(a, w, srv, job, rep, io_size=io_size)
        r["fresh_size_bytes"] = a.fresh_size
        return r
    finally:
        srv.kill()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(w.vol_fresh)


def pass_order(servers, rep):
    """The servers of one pass. cryptvol and cryptvol-nomap swap places on every other
    pass, so that neither always runs first (their ratio is held to 5%)."""
    order = list(servers)
    if rep % 2 == 0 and "cryptvol" in order and "cryptvol-nomap" in order:
        i, j = order.index("cryptvol"), order.index("cryptvol-nomap")
        order[i], order[j] = order[j], order[i]
    return order


def log_run(a, rep, sname, job, r):
    log(f"[{rep}/{a.repeat}] {sname:<14} {job[0]:<18} "
        f"{r['iops']:>10.0f} IOPS {r['bw_bytes'] / 1e6:>8.1f} MB/s "
        f"p50 {r['lat_p50_us'] or 0:>8.1f} us  "
        f"cpu {r['cpu_s_per_gib']:.2f} s/GiB  load {r['loadavg_1m_before']:.1f}")


# ---------------------------------------------------------------- XTS vs openssl


def xts_check(a):
    log("XTS: openssl speed -evp aes-256-xts -bytes 4096 -seconds 3 (encrypt, then decrypt)")
    res = {}
    for direction, extra in (("encrypt", []), ("decrypt", ["-decrypt"])):
        out = run(
            ["openssl", "speed", "-evp", "aes-256-xts", "-bytes", "4096", "-seconds", "3"]
            + extra,
            "openssl speed",
            timeout=120,
        )
        m = re.search(r"^aes-256-xts\s+([\d.]+)k\s*$", out, re.IGNORECASE | re.MULTILINE)
        if not m:
            raise BenchError(f"cannot read the figure from openssl speed's output:\n{out[-800:]}")
        res[f"openssl_{direction}_bytes_per_s"] = float(m.group(1)) * 1000.0
    crit_home = os.path.join(a.run_dir, "criterion")
    log("XTS: cargo bench --bench datapath -- '^xts/' (builds the bench on first use)")
    env = dict(os.environ, CRITERION_HOME=crit_home)
    run(
        ["cargo", "bench", "--quiet", "--bench", "datapath", "--",
         "--warm-up-time", "1", "--measurement-time", "3", "^xts/"],
        "cargo bench --bench datapath",
        timeout=3600,
        env=env,
    )
    for direction in ("encrypt", "decrypt"):
        est = os.path.join(crit_home, "xts", f"{direction}_4096B_sectors_1MiB", "new",
                           "estimates.json")
        try:
            with open(est) as f:
                e = json.load(f)
            ns = e["median"]["point_estimate"]
        except (OSError, ValueError, KeyError) as err:
            raise BenchError(f"cannot read criterion's result {est}: {err}")
        res[f"cryptvol_{direction}_bytes_per_s"] = MIB / (ns / 1e9)
    for direction in ("encrypt", "decrypt"):
        res[f"{direction}_ratio"] = (
            res[f"cryptvol_{direction}_bytes_per_s"] / res[f"openssl_{direction}_bytes_per_s"]
        )
    return res


# ---------------------------------------------------------------- main


def environment(a):
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None

    cpu = None
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    rev = first_line(["git", "-C", a.repo, "describe", "--always", "--dirty"])
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "cryptvol": first_line([a.bin, "--version"]),
        "git": rev,
        "fio": first_line(["fio", "--version"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "qemu-nbd": first_line(["qemu-nbd", "--version"]),
        "openssl": first_line(["openssl", "version"]),
    }


def main(argv):
    a = parse_args(argv)
    ts = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    a.run_dir = os.path.join(a.out, ts)
    os.makedirs(a.run_dir, exist_ok=True)
    # Images and sockets go in work/ (removed at the end); server logs stay in logs/.
    w = Work(os.path.join(a.run_dir, "work"), os.path.join(a.run_dir, "logs"))
    jobs = [j for j in JOBS if j[0] in a.jobs]
    need = set()
    main_servers = a.servers if "main" in a.modes else []
    a.servers = main_servers  # prepare() writes plain.img only for nbdkit-file
    for s in main_servers:
        if s == "cryptvol" or s in CRYPTVOL_VARIANTS:
            need.add(s)
        if s in DIRECT_VARIANTS:
            need.add("cryptvol")  # the same (prefilled) volume, served with --direct
        if s == "cryptvol-tls" or s in ENGINE_VARIANTS:
            need.add("cryptvol")  # the same (prefilled) volume, served with TLS / an engine
        elif s == "nbdkit-luks" or s.startswith("qemu-nbd"):
            need.add("luks")
    if "luks" in need:
        need.add("nbdkit-luks")  # the LUKS image is prefilled through nbdkit-luks
    need |= modes.needs(a)
    if modes.needs(a) and "nbdkit-file" not in a.servers:
        a.servers = a.servers + ["nbdkit-file"]  # the extended modes' peer needs plain.img

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # Explicitly, also for SIGINT: a shell starts background jobs with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    started = time.monotonic()
    results = {
        "version": 1,
        "timestamp": ts,
        "options": {
            "quick": a.quick, "size_bytes": a.size, "runtime_s": a.runtime, "ramp_s": a.ramp,
            "repeat": a.repeat, "jobs": a.jobs, "servers": a.servers,
            "fresh_size_bytes": a.fresh_size, "fresh_max_bytes": a.fresh_max,
            "modes": a.modes,
        },
        "environment": environment(a),
        "jobs": {j[0]: {"rw": j[1], "bs": j[2], "iodepth": j[3], "title": j[4]} for j in jobs},
        "runs": [],
    }
    fresh_jobs = [j for j in jobs if j[0] in FRESH_JOBS]
    if "cryptvol-fresh" in main_servers:
        if fresh_jobs:
            results["fresh"] = {
                "size_bytes": a.fresh_size,
                "max_growth_bytes": a.fresh_max,
                "io_size": {j[0]: fresh_io_size(a, j[2]) for j in fresh_jobs},
            }
        else:
            log("cryptvol-fresh runs only the write jobs "
                f"({', '.join(FRESH_JOBS)}); none is selected, so it is skipped")
    try:
        log(f"results in {a.run_dir}; modes {','.join(a.modes)}; {len(main_servers)} servers "
            f"x {len(jobs)} jobs x {a.repeat} repeat(s), {a.ramp} s ramp + {a.runtime} s each")
        modes.preflight(a, sys.modules[__name__])
        results["images"] = prepare(a, w, need)
        results["servers"] = {s: " ".join(server_for(s, a, w).cmd) for s in main_servers}
        # Repeats are the outer loop so that a burst of load from elsewhere on the
        # machine spreads over all servers rather than hitting one.
        for rep in range(1, a.repeat + 1):
            for sname in pass_order(main_servers, rep):
                if sname == "cryptvol-fresh":
                    for job in fresh_jobs:
                        r = run_fresh(a, w, job, rep)
                        results["runs"].append(r)
                        log_run(a, rep, sname, job, r)
                        log(f"  fresh: backing file grew {r['backing_growth_bytes'] / MIB:.0f} "
                            f"MiB for {r['io_bytes'] / MIB:.0f} MiB of client data "
                            f"(write amplification {r['write_amplification']:.2f}x)")
                    continue
                srv = server_for(sname, a, w)
                srv.start()
                try:
                    for job in jobs:
                        r = run_job(a, w, srv, job, rep)
                        results["runs"].append(r)
                        log_run(a, rep, sname, job, r)
                        ts0 = time.monotonic()
                        sync_file(srv.backing)
                        if time.monotonic() - ts0 > 1:
                            log(f"  (writeback of {os.path.basename(srv.backing)} took "
                                f"{time.monotonic() - ts0:.1f} s, outside the measurement)")
                finally:
                    srv.stop()
        results["modes"] = modes.run_modes(a, sys.modules[__name__], w)
        if a.xts and "main" in a.modes:
            try:
                results["xts"] = xts_check(a)
            except BenchError as e:
                log(f"XTS comparison failed: {e}")
                results["xts"] = {"error": str(e)}
        else:
            results["xts"] = {"skipped": "--quick (pass --xts to include it)" if a.quick
                              else "--modes without main"}
    except KeyboardInterrupt:
        log("interrupted; stopping servers")
        modes.Proc.stop_all()
        Server.stop_all()
        return 130
    except BenchError as e:
        Server.stop_all()
        log(f"error: {e}")
        save(a, results, partial=True)
        return 1
    finally:
        Server.stop_all()
        if not a.keep_work:
            shutil.rmtree(w.root, ignore_errors=True)
    results["elapsed_s"] = time.monotonic() - started
    report.summarise(results)
    print(report.render_text(results))
    save(a, results)
    if not a.no_chart and results["runs"]:  # the chart draws the main job table
        png = os.path.join(a.run_dir, "chart.png")
        err = report.chart(results, png)
        if err:
            log(f"no chart: {err}")
        else:
            print(f"chart:   {png}")
    print(f"results: {os.path.join(a.run_dir, 'results.json')}")
    log(f"done in {results['elapsed_s']:.0f} s")
    return 0


def save(a, results, partial=False):
    path = os.path.join(a.run_dir, "results.json")
    if partial:
        results["partial"] = True
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    if not partial:
        latest = os.path.join(a.out, "latest")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(latest)
        os.symlink(os.path.basename(a.run_dir), latest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
