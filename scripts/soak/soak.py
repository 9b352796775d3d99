#!/usr/bin/python3
"""Soak under concurrency (issue 17, item 4); run through scripts/soak.sh.

One `cryptvol serve` daemon with a control socket serves the volume `main` (thin,
--discard, multi-connection). Four client connections do verified mixed I/O on it:
writes of self-describing blocks (block index + generation + checksum, the rest derived
from both), reads, trims, write-zeroes and periodic flushes. Each client owns its own
stripes of the volume (64 KiB, a whole allocation chunk, so that trims punch holes) and
knows exactly what each of its blocks must read back; reads of other clients' blocks
must find one of the generations written there (or zeros where one of them was a trim
or nothing was ever written) between the read's start and end.

Meanwhile a control loop repeats, one step at a time:
  * snapshot `main` through the daemon, restore it into a new volume file, add that as
    a live export, read it whole and check every block against what the snapshot may
    hold (every write completed before the snapshot started, nothing issued after it
    ended), remove the export, delete the restored file and older snapshots;
  * re-encrypt `main` online (new data key) through the control socket;
  * rotate the master key, rewrap (rekey) the second volume under its newest material
    while it is not served, add it as a live export, verify and extend its contents,
    remove it.
At the end the daemon is stopped with SIGTERM (it must exit 0), `main` is decrypted
offline and every block must equal its last completed write, and `cryptvol check` must
be clean. Prints a summary (also WORKDIR/summary.json); exits 1 on any failure.

A watchdog fails the run when no I/O completes for STALL_LIMIT seconds (a deadlock).
"""

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import nbd

BLOCK = 4096
STRIPE_BLOCKS = 16  # 64 KiB: the allocation chunk of a thin volume
CLIENTS = 4
MAIN_SIZE = 64 << 20
SECOND_SIZE = 16 << 20
MAGIC = b"SOAKBLK1"
HEADER = struct.Struct("<8sQQ")
DIGEST = 8
FLUSH_EVERY = 200
STALL_LIMIT = 180.0
CMD_TIMEOUT = 300.0
STARTUP_LIMIT = 60.0
STOP_LIMIT = 120.0
MAX_MATERIAL_VERSIONS = 90  # a local key refuses a rotation past 100 versions
JOIN_LIMIT = 120.0  # clients and control finish their operation in flight within this


def block_bytes(b, gen):
    """The contents of block `b` at generation `gen` (gen 0: zeros)."""
    if gen == 0:
        return bytes(BLOCK)
    head = HEADER.pack(MAGIC, b, gen)
    body = hashlib.shake_128(head).digest(BLOCK - HEADER.size - DIGEST)
    return head + body + hashlib.blake2b(head + body, digest_size=DIGEST).digest()


def decode(b, data):
    """The generation a block's contents show, or a string saying what is wrong."""
    if data == bytes(BLOCK):
        return 0
    magic, idx, gen = HEADER.unpack_from(data)
    if magic != MAGIC:
        return "no block header (garbage)"
    if idx != b:
        return f"block {idx}'s data at block {b}"
    if hashlib.blake2b(data[:-DIGEST], digest_size=DIGEST).digest() != data[-DIGEST:]:
        return f"checksum mismatch (gen {gen})"
    if data != block_bytes(b, gen):
        return f"contents differ from gen {gen}"
    return gen


class Failure(Exception):
    pass


class Model:
    """What each block of `main` may read back. hist[b]: the values written to b in
    order (absolute index = base[b] + list index); done[b]: absolute index of the last
    completed one. Only the owner of a block writes it, so its history is sequential."""

    def __init__(self, blocks):
        self.lock = threading.Lock()
        self.hist = [[0] for _ in range(blocks)]
        self.base = [0] * blocks
        self.done = [0] * blocks
        self.pins = [0] * blocks
        self.snapshot_pin = False
        self.gen = 0

    def issue(self, blocks, zero):
        with self.lock:
            vals = []
            for b in blocks:
                if zero:
                    v = 0
                else:
                    self.gen += 1
                    v = self.gen
                self.hist[b].append(v)
                vals.append(v)
            return vals

    def complete(self, blocks):
        with self.lock:
            for b in blocks:
                h = self.hist[b]
                self.done[b] = self.base[b] + len(h) - 1
                if len(h) > 32 and not self.pins[b] and not self.snapshot_pin:
                    keep = self.done[b] - self.base[b]
                    del h[:keep]
                    self.base[b] += keep

    def exact(self, b):
        with self.lock:
            return self.hist[b][self.done[b] - self.base[b]]

    def pin(self, blocks):
        with self.lock:
            lo = []
            for b in blocks:
                self.pins[b] += 1
                lo.append(self.done[b])
            return lo

    def unpin(self, blocks, lo):
        with self.lock:
            out = []
            for b, a in zip(blocks, lo):
                self.pins[b] -= 1
                out.append(set(self.hist[b][a - self.base[b]:]))
            return out

    def snapshot_start(self):
        with self.lock:
            self.snapshot_pin = True
            return list(self.done)

    def snapshot_end(self, lo):
        with self.lock:
            self.snapshot_pin = False
            return [set(h[a - base:]) for h, a, base in zip(self.hist, lo, self.base)]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = {}

    def add(self, key, n=1):
        with self.lock:
            self.c[key] = self.c.get(key, 0) + n

    def get(self, key):
        with self.lock:
            return self.c.get(key, 0)

    def snap(self):
        with self.lock:
            return dict(self.c)


class Soak:
    def __init__(self, args):
        self.bin = args.bin
        self.work = os.path.abspath(args.workdir)
        self.minutes = args.minutes
        self.rng = random.Random(args.seed)
        self.seed = args.seed
        self.sock = os.path.join(self.work, "nbd.sock")
        self.ctl = os.path.join(self.work, "control.sock")
        self.vols = os.path.join(self.work, "vols")
        self.store = os.path.join(self.work, "snapshots")
        self.main = os.path.join(self.vols, "main.img")
        self.second = os.path.join(self.vols, "second.img")
        self.env = dict(os.environ)
        self.env["CRYPTVOL_KEYSTORE"] = os.path.join(self.work, "keys")
        self.env["CRYPTVOL_SNAPSHOT_STORE"] = self.store
        self.env["CRYPTVOL_CONFIG"] = os.path.join(self.work, "cryptvol.toml")
        self.env.setdefault("RUST_LOG", "info")
        self.model = Model(MAIN_SIZE // BLOCK)
        self.second_model = {}
        self.second_gen = 10**12  # distinct from main's generations
        self.stats = Stats()
        self.failures = []
        self.stop = threading.Event()
        self.finished = threading.Event()
        self.daemon = None

    # ---- helpers ----
    def fail(self, what):
        msg = f"FAIL: {what}"
        print(msg, flush=True)
        with self.stats.lock:
            self.failures.append(what)
        self.stop.set()

    def cv(self, *args, check=True):
        """Runs a cryptvol command (bounded); returns stdout."""
        try:
            p = subprocess.run(
                [self.bin, *args], env=self.env, capture_output=True, text=True,
                timeout=CMD_TIMEOUT,
            )
        except subprocess.TimeoutExpired as e:
            raise Failure(f"cryptvol {' '.join(args)}: no answer in {CMD_TIMEOUT}s") from e
        if check and p.returncode != 0:
            raise Failure(f"cryptvol {' '.join(args)}: exit {p.returncode}: {p.stderr.strip()[-2000:]}")
        return p

    def connect(self, export):
        h = nbd.NBD()
        h.set_export_name(export)
        h.connect_unix(self.sock)
        return h

    # ---- setup and teardown ----
    def setup(self):
        os.makedirs(self.vols, exist_ok=True)
        os.makedirs(self.store, exist_ok=True)
        with open(self.env["CRYPTVOL_CONFIG"], "w") as f:
            f.write("# soak: empty on purpose (no system config)\n")
        self.cv("create", "--size", str(MAIN_SIZE), self.main)
        self.cv("create", "--size", str(SECOND_SIZE), self.second)
        keys = json.loads(self.cv("key", "list", "--json").stdout)
        self.key = self.default_key(keys)
        log = open(os.path.join(self.work, "serve.log"), "w")
        self.daemon = subprocess.Popen(
            [self.bin, "serve", "--unix", self.sock, "--control", self.ctl, "--discard",
             f"main={self.main}"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        for path in (self.sock, self.ctl):
            self.wait_socket(path)
        h = self.connect("main")
        try:
            if not (h.can_multi_conn() and h.can_trim() and h.can_zero()):
                raise Failure("main does not advertise multi-conn, trim and write-zeroes")
        finally:
            h.shutdown()

    @staticmethod
    def default_key(keys):
        items = keys.get("keys", keys) if isinstance(keys, dict) else keys
        for k in items:
            if any("default" in str(a) for a in k.get("aliases", [])):
                return k.get("id") or k.get("key_id")
        if len(items) == 1:
            return items[0].get("id") or items[0].get("key_id")
        raise Failure(f"no default key in `key list`: {keys}")

    def wait_socket(self, path):
        deadline = time.monotonic() + STARTUP_LIMIT
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise Failure(f"daemon exited {self.daemon.returncode} at start (serve.log)")
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                return
            except OSError:
                time.sleep(0.05)  # polling a socket that is not there yet
            finally:
                s.close()
        raise Failure(f"{path} did not answer within {STARTUP_LIMIT}s")

    def stop_daemon(self):
        self.daemon.send_signal(signal.SIGTERM)
        try:
            rc = self.daemon.wait(timeout=STOP_LIMIT)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()
            raise Failure(f"daemon did not stop within {STOP_LIMIT}s of SIGTERM")
        if rc != 0:
            raise Failure(f"daemon exited {rc} on SIGTERM (serve.log)")

    # ---- the four clients ----
    def client(self, cid):
        rng = random.Random(self.seed * 100 + cid)
        blocks = MAIN_SIZE // BLOCK
        stripes = [s for s in range(blocks // STRIPE_BLOCKS) if s % CLIENTS == cid]
        h = None
        try:
            h = self.connect("main")
            n = 0
            while not self.stop.is_set():
                n += 1
                self.one_op(h, rng, stripes, blocks)
                if n % FLUSH_EVERY == 0:
                    h.flush()
                    self.stats.add("flush")
            h.flush()
            self.stats.add("flush")
        except Failure as e:
            self.fail(f"client {cid}: {e}")
        except Exception as e:  # noqa: BLE001 -- any client error is a soak failure
            self.fail(f"client {cid}: {type(e).__name__}: {e}")
        finally:
            if h is not None:
                try:
                    h.shutdown()
                except Exception:  # noqa: BLE001
                    pass

    def one_op(self, h, rng, stripes, blocks):
        m = self.model
        s = rng.choice(stripes)
        first = s * STRIPE_BLOCKS
        r = rng.random()
        if r < 0.45:  # write 1..16 blocks in one of our stripes
            k = rng.randint(1, STRIPE_BLOCKS)
            a = first + rng.randint(0, STRIPE_BLOCKS - k)
            bs = list(range(a, a + k))
            vals = m.issue(bs, zero=False)
            h.pwrite(b"".join(block_bytes(b, g) for b, g in zip(bs, vals)), a * BLOCK)
            m.complete(bs)
            self.stats.add("write")
            self.stats.add("bytes_written", k * BLOCK)
        elif r < 0.70:  # read our own blocks: exact
            k = rng.randint(1, STRIPE_BLOCKS)
            a = first + rng.randint(0, STRIPE_BLOCKS - k)
            data = h.pread(k * BLOCK, a * BLOCK)
            for i, b in enumerate(range(a, a + k)):
                got = decode(b, data[i * BLOCK:(i + 1) * BLOCK])
                want = m.exact(b)
                if got != want:
                    raise Failure(f"own read of block {b}: got {got!r}, want gen {want}")
            self.stats.add("read")
            self.stats.add("bytes_read", k * BLOCK)
        elif r < 0.92:  # read anyone's blocks: one of the generations written meanwhile
            k = rng.randint(1, 2 * STRIPE_BLOCKS)
            a = rng.randint(0, blocks - k)
            bs = list(range(a, a + k))
            lo = m.pin(bs)
            try:
                data = h.pread(k * BLOCK, a * BLOCK)
            finally:
                valid = m.unpin(bs, lo)
            for i, b in enumerate(bs):
                got = decode(b, data[i * BLOCK:(i + 1) * BLOCK])
                if got in valid[i]:
                    continue
                if len(valid[i]) > 1 and isinstance(got, str):
                    # The owner's write of this block was in flight during the read: NBD
                    # leaves such a read undefined, and cryptvol documents that it may see
                    # a mix of both versions of the sector (buffered pread and pwrite of a
                    # page are not atomic to each other), which decrypts to garbage. Such
                    # reads are counted; the owner's own reads and the final and restore
                    # checks stay exact.
                    self.stats.add("torn_reads_during_a_write")
                    continue
                raise Failure(f"shared read of block {b}: got {got!r}, valid {sorted(valid[i])[:8]}")
            self.stats.add("read_shared")
            self.stats.add("bytes_read", k * BLOCK)
        elif r < 0.97:  # trim: a whole stripe (punches the chunk) or one block
            bs = list(range(first, first + STRIPE_BLOCKS)) if rng.random() < 0.5 else [
                first + rng.randrange(STRIPE_BLOCKS)]
            m.issue(bs, zero=True)
            h.trim(len(bs) * BLOCK, bs[0] * BLOCK)
            m.complete(bs)
            self.stats.add("trim")
            self.stats.add("bytes_trimmed", len(bs) * BLOCK)
        else:  # write-zeroes of 1..16 blocks
            k = rng.randint(1, STRIPE_BLOCKS)
            a = first + rng.randint(0, STRIPE_BLOCKS - k)
            bs = list(range(a, a + k))
            m.issue(bs, zero=True)
            h.zero(k * BLOCK, a * BLOCK)
            m.complete(bs)
            self.stats.add("write_zeroes")
            self.stats.add("bytes_zeroed", k * BLOCK)

    # ---- the control loop ----
    def control(self):
        steps = [self.snapshot_and_restore, self.reencrypt, self.rotate_and_second_export]
        i = 0
        try:
            while not self.stop.is_set():
                steps[i % len(steps)]()
                i += 1
        except Failure as e:
            self.fail(f"control: {e}")
        except Exception as e:  # noqa: BLE001
            self.fail(f"control: {type(e).__name__}: {e}")

    def snapshot_and_restore(self):
        lo = self.model.snapshot_start()
        try:
            out = self.cv("snapshot", "create", "main", "--control", self.ctl,
                          "--store", self.store, "--json").stdout
        finally:
            valid = self.model.snapshot_end(lo)
        sid = json.loads(out)["snapshot"]["id"]
        self.stats.add("snapshots")
        restored = os.path.join(self.vols, "restore.img")
        self.cv("create", "--from-snapshot", sid, "--store", self.store, restored)
        self.stats.add("restores")
        self.cv("exports", "add", f"restore={restored}", "--control", self.ctl)
        self.stats.add("export_adds")
        try:
            h = self.connect("restore")
            try:
                self.verify_volume(h, MAIN_SIZE, lambda b: valid[b], f"restore of {sid}")
            finally:
                h.shutdown()
        finally:
            self.cv("exports", "remove", "restore", "--control", self.ctl)
            self.stats.add("export_removes")
        self.stats.add("restores_verified")
        os.unlink(restored)
        # Its changed-chunk sidecar goes with it (`check` flags an orphaned one).
        if os.path.exists(restored + ".cbt"):
            os.unlink(restored + ".cbt")
        prev = getattr(self, "last_snapshot", None)
        if prev:
            self.cv("snapshot", "delete", prev, "--store", self.store)
        self.last_snapshot = sid

    def verify_volume(self, h, size, valid_of, what):
        step = 256  # blocks a read
        for a in range(0, size // BLOCK, step):
            data = h.pread(step * BLOCK, a * BLOCK)
            for i in range(step):
                b = a + i
                got = decode(b, data[i * BLOCK:(i + 1) * BLOCK])
                ok = valid_of(b)
                if got not in ok:
                    raise Failure(f"{what}: block {b}: got {got!r}, valid {sorted(ok)[:8]}")
            self.stats.add("bytes_verified", step * BLOCK)

    def reencrypt(self):
        self.cv("reencrypt", "main", "--control", self.ctl, "--json")
        self.stats.add("reencryptions")

    def rotate_and_second_export(self):
        # A key keeps at most MAX_MATERIAL_VERSIONS; before that, move to a new key
        # (the documented way: create a key, rekey the volume to it).
        self.key_versions = getattr(self, "key_versions", 1)
        if self.key_versions >= MAX_MATERIAL_VERSIONS:
            self.key_serial = getattr(self, "key_serial", 0) + 1
            self.key = f"alias/soak-{self.key_serial}"
            self.cv("key", "create", "--alias", self.key)
            self.stats.add("keys_created")
            self.key_versions = 1
        else:
            self.cv("key", "rotate", self.key)
            self.stats.add("key_rotations")
            self.key_versions += 1
        self.cv("rekey", self.second, "--to-key", self.key)
        self.stats.add("rewraps")
        self.cv("exports", "add", f"second={self.second}", "--control", self.ctl)
        self.stats.add("export_adds")
        try:
            h = self.connect("second")
            try:
                blocks = SECOND_SIZE // BLOCK
                self.verify_volume(h, SECOND_SIZE, lambda b: {self.second_model.get(b, 0)},
                                   "second export")
                for _ in range(32):
                    b = self.rng.randrange(blocks)
                    self.second_gen += 1
                    h.pwrite(block_bytes(b, self.second_gen), b * BLOCK)
                    self.second_model[b] = self.second_gen
                h.flush()
                self.stats.add("second_writes", 32)
            finally:
                h.shutdown()
        finally:
            self.cv("exports", "remove", "second", "--control", self.ctl)
            self.stats.add("export_removes")

    # ---- the run ----
    def watchdog(self):
        """Runs until the end (also while the threads are joined): a stall is a failure."""
        last, since = -1, time.monotonic()
        while not self.finished.wait(5):
            s = self.stats.snap()
            n = sum(s.get(k, 0) for k in ("write", "read", "read_shared", "trim", "write_zeroes"))
            if n != last:
                last, since = n, time.monotonic()
            elif not self.stop.is_set() and time.monotonic() - since > STALL_LIMIT:
                self.fail(f"no I/O completed for {STALL_LIMIT}s (deadlock?)")

    def progress(self, start):
        s = self.stats.snap()
        ops = sum(s.get(k, 0) for k in ("write", "read", "read_shared", "trim", "write_zeroes"))
        print(f"[{(time.monotonic() - start) / 60:5.1f} min] ops {ops} snapshots "
              f"{s.get('snapshots', 0)} reencryptions {s.get('reencryptions', 0)} rotations "
              f"{s.get('key_rotations', 0)} exports +{s.get('export_adds', 0)}/-"
              f"{s.get('export_removes', 0)} failures {len(self.failures)}", flush=True)

    def run(self):
        start = time.monotonic()
        t0 = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        load0 = os.getloadavg()
        self.setup()
        threads = [threading.Thread(target=self.client, args=(c,), name=f"client {c}",
                                    daemon=True) for c in range(CLIENTS)]
        threads.append(threading.Thread(target=self.control, name="control", daemon=True))
        dog = threading.Thread(target=self.watchdog, name="watchdog", daemon=True)
        for t in [*threads, dog]:
            t.start()
        end = start + self.minutes * 60
        while not self.stop.is_set() and time.monotonic() < end:
            self.stop.wait(min(60, max(0.1, end - time.monotonic())))
            self.progress(start)
        self.stop.set()
        # A command in flight is bounded by CMD_TIMEOUT, an NBD request is not: a client
        # still in its request after JOIN_LIMIT is stuck in a daemon that stopped answering.
        deadline = time.monotonic() + JOIN_LIMIT
        for t in threads:
            limit = CMD_TIMEOUT + JOIN_LIMIT if t.name == "control" else JOIN_LIMIT
            t.join(timeout=max(0.0, deadline - JOIN_LIMIT + limit - time.monotonic()))
            if t.is_alive():
                self.fail(f"{t.name} did not finish (stuck in I/O: deadlock?)")
        self.finished.set()
        loadavg = os.getloadavg()
        if any(t.is_alive() for t in threads):
            self.daemon.kill()
            return self.summary(start, t0, load0, loadavg, "not run (stuck threads)")
        self.stop_daemon()
        self.final_verify()
        check = self.cv("check", self.vols, check=False)
        check_result = f"exit {check.returncode}: {check.stdout.strip()} {check.stderr.strip()}"
        if check.returncode != 0:
            self.fail(f"cryptvol check: {check_result}")
        return self.summary(start, t0, load0, loadavg, check_result)

    def final_verify(self):
        raw = os.path.join(self.work, "main.raw")
        self.cv("export", self.main, raw)
        try:
            with open(raw, "rb") as f:
                for b in range(MAIN_SIZE // BLOCK):
                    got = decode(b, f.read(BLOCK))
                    want = self.model.exact(b)
                    if got != want:
                        raise Failure(f"final: block {b}: got {got!r}, want gen {want}")
            self.stats.add("bytes_verified", MAIN_SIZE)
        finally:
            os.unlink(raw)

    def summary(self, start, t0, load0, load1, check_result):
        s = self.stats.snap()
        ops = {k: s.get(k, 0) for k in ("write", "read", "read_shared", "trim", "write_zeroes", "flush")}
        out = {
            "started": t0,
            "minutes": round((time.monotonic() - start) / 60, 1),
            "seed": self.seed,
            "loadavg_start": [round(x, 2) for x in load0],
            "loadavg_end": [round(x, 2) for x in load1],
            "clients": CLIENTS,
            "ops": ops,
            "ops_total": sum(ops.values()),
            "bytes": {k: s.get(k, 0) for k in ("bytes_written", "bytes_read", "bytes_trimmed",
                                               "bytes_zeroed", "bytes_verified")},
            "snapshots": s.get("snapshots", 0),
            "restores_verified": s.get("restores_verified", 0),
            "reencryptions": s.get("reencryptions", 0),
            "key_rotations": s.get("key_rotations", 0),
            "torn_reads_during_a_write": s.get("torn_reads_during_a_write", 0),
            "rewraps": s.get("rewraps", 0),
            "keys_created": s.get("keys_created", 0),
            "export_adds": s.get("export_adds", 0),
            "export_removes": s.get("export_removes", 0),
            "check": check_result,
            "failures": len(self.failures),
            "failure_list": self.failures[:20],
        }
        with open(os.path.join(self.work, "summary.json"), "w") as f:
            json.dump(out, f, indent=1)
        print("== soak summary ==")
        print(json.dumps(out, indent=1))
        return 1 if self.failures else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    soak = Soak(ap.parse_args())
    try:
        rc = soak.run()
    except Failure as e:
        soak.fail(str(e))
        if soak.daemon is not None and soak.daemon.poll() is None:
            soak.daemon.kill()
        rc = 1
    sys.stdout.flush()
    # Threads stuck in a dead daemon's I/O must not hold the exit.
    os._exit(rc)


if __name__ == "__main__":
    main()
