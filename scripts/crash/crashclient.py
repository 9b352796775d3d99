#!/usr/bin/python3
"""Verified-I/O client for scripts/crash-test.sh (python3-libnbd).

  crashclient.py work   URI STATE JOURNAL_DIR PROGRESS SEED CONNS [--discard]
  crashclient.py verify URI STATE JOURNAL_DIR [--discard]

`work` opens CONNS connections to one export. Connection k owns a contiguous
region of the export's 4096-byte blocks and, one request at a time, writes
records, writes zeroes, trims (with --discard) and flushes in it until the
connection dies (the daemon is killed). Each connection keeps a journal
JOURNAL_DIR/conn-K.log:

  W FIRST COUNT GEN   written before the write is sent
  Z FIRST COUNT       before a write-zeroes is sent
  T FIRST COUNT       before a trim is sent
  A                   the request just journaled was acknowledged
  F                   a flush completed (then the journal is fsynced)
  E MESSAGE           the connection ended

PROGRESS is rewritten (atomically) with the number of acknowledged requests,
so whoever kills the daemon can wait on progress instead of on time.

A block written with generation GEN holds a record encoding (block, GEN, a
filler derived from both), so any read is classified: zeros, a record of this
block (which generation), or garbage.

`verify` (after the daemon was restarted) reads every block and checks it
against STATE (the image as last verified, block -> generation) and the
journals: a block must hold its value as of the last completed flush of its
connection, or a value a request after that flush gave it. Acked writes before
a completed flush that read back older or as zeros are LOST; anything that is
not a record of this block (or zeros where allowed) is GARBAGE. On success
the observed image is flushed and becomes the new STATE; one JSON line of
figures is printed. Exit status: 0 ok, 1 violations, 2 cannot run.
"""

import json
import os
import random
import sys
import threading

import nbd

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
# The block encoding, shared with tests/nbdsh/crash.py (tests/crash_cycles.rs uses
# crashclient.record).
from blocks import BS, classify, connect, record  # noqa: E402

READ_PIECE = 1 << 20


def load_state(path):
    with open(path) as f:
        st = json.load(f)
    return {int(k): v for k, v in st.get("blocks", {}).items()}, st.get("next_gen", 1)


class Journal:
    """One connection's journal: lines appended unbuffered, fsynced at flushes."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)

    def note(self, line, sync=False):
        os.write(self.fd, (line + "\n").encode())
        if sync:
            os.fsync(self.fd)

    def close(self):
        os.fsync(self.fd)
        os.close(self.fd)


class Counter:
    def __init__(self):
        self.lock = threading.Lock()
        self.acked = 0
        self.flushes = 0
        self.running = 0

    def add(self, flush=False):
        with self.lock:
            self.acked += 1
            if flush:
                self.flushes += 1


def one_op(h, rng, lo, hi, gen, discard, journal):
    """Sends one request in [lo, hi); returns (is_flush, used_gen)."""
    r = rng.random()
    first = rng.randrange(lo, hi)
    count = min(hi - first, rng.choice([1, 1, 2, 3, 8, 16, 17, 40]))
    if r < 0.72:
        data = b"".join(record(first + i, gen) for i in range(count))
        journal.note("W %d %d %d" % (first, count, gen))
        h.pwrite(data, first * BS)
        return False, True
    if r < 0.80:
        journal.note("Z %d %d" % (first, count))
        h.zero(count * BS, first * BS)
        return False, False
    if r < 0.86 and discard:
        journal.note("T %d %d" % (first, count))
        h.trim(count * BS, first * BS)
        return False, False
    h.flush()
    return True, False


def conn_worker(uri, k, conns, lo, hi, gen0, seed, discard, jdir, counter, errors):
    journal = Journal(os.path.join(jdir, "conn-%d.log" % k))
    rng = random.Random("%s-%d" % (seed, k))
    gen = gen0 + k
    try:
        h = connect(uri)
        with counter.lock:
            counter.running += 1
        while True:
            flushed, used_gen = one_op(h, rng, lo, hi, gen, discard, journal)
            if flushed:
                journal.note("F", sync=True)
            else:
                journal.note("A")
            if used_gen:
                gen += conns
            counter.add(flush=flushed)
    except nbd.Error as e:
        journal.note("E %s" % str(e).replace("\n", " "))
    except Exception as e:  # a bug in this client, not a dead connection
        errors.append("connection %d: %r" % (k, e))
    finally:
        journal.close()


def write_progress(path, counter, done):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d %d %d %d\n" % (counter.acked, counter.flushes, counter.running, done))
    os.replace(tmp, path)


def work(uri, state_path, jdir, progress, seed, conns, discard):
    conns = int(conns)
    _, next_gen = load_state(state_path)
    h = connect(uri)
    blocks = h.get_size() // BS
    h.shutdown()
    counter, errors, threads = Counter(), [], []
    for k in range(conns):
        lo, hi = blocks * k // conns, blocks * (k + 1) // conns
        t = threading.Thread(
            target=conn_worker,
            args=(uri, k, conns, lo, hi, next_gen, seed, discard, jdir, counter, errors),
        )
        t.start()
        threads.append(t)
    while any(t.is_alive() for t in threads):
        write_progress(progress, counter, 0)
        threads[0].join(0.02)
    for t in threads:
        t.join()
    write_progress(progress, counter, 1)
    print("work: %d requests acknowledged, %d flushes" % (counter.acked, counter.flushes))
    if errors:
        print("client error: %s" % "; ".join(errors))
        return 1
    return 0


def replay(path, discard):
    """(durable, later, acked_after_flush, last_gen) of one journal."""
    current, durable, later = {}, {}, {}
    pending, unflushed_acked, last_gen = None, {}, 0
    with open(path) as f:
        for line in f.read().splitlines():
            p = line.split()
            if not p:
                continue
            if p[0] == "F":
                durable.update(current)
                later, unflushed_acked = {}, {}
            elif p[0] == "A" and pending:
                unflushed_acked.update(pending)
            elif p[0] in ("W", "Z", "T"):
                first, count = int(p[1]), int(p[2])
                v = int(p[3]) if p[0] == "W" else 0
                if p[0] == "W":
                    last_gen = max(last_gen, v)
                if p[0] == "T" and not discard:
                    pending = None
                    continue
                pending = {}
                for b in range(first, first + count):
                    current[b] = v
                    later.setdefault(b, set()).add(v)
                    pending[b] = v
    return durable, later, unflushed_acked, last_gen


def expectations(base, jdir, discard):
    durable, later, acked, last_gen = dict(base), {}, {}, 0
    for name in sorted(os.listdir(jdir)):
        if not name.startswith("conn-") or not name.endswith(".log"):
            continue
        d, l, a, g = replay(os.path.join(jdir, name), discard)
        durable.update(d)
        later.update(l)
        acked.update(a)
        last_gen = max(last_gen, g)
    return durable, later, acked, last_gen


def verify(uri, state_path, jdir, discard):
    base, next_gen = load_state(state_path)
    durable, later, acked, last_gen = expectations(base, jdir, discard)
    h = connect(uri)
    size = h.get_size()
    blocks = size // BS
    figures = {"blocks": blocks, "durable_exact": 0, "newer": 0, "acked_unflushed_not_latest": 0,
               "lost": 0, "garbage": 0, "data_blocks": 0}
    bad, observed = [], {}
    for off in range(0, blocks * BS, READ_PIECE):
        buf = h.pread(min(READ_PIECE, blocks * BS - off), off)
        for i in range(len(buf) // BS):
            b = off // BS + i
            got = classify(b, buf[i * BS:(i + 1) * BS])
            want = durable.get(b, 0)
            allowed = {want} | later.get(b, set())
            if got is None:
                figures["garbage"] += 1
                bad.append(("garbage", b, sorted(allowed)))
                continue
            if got not in allowed:
                figures["lost"] += 1
                bad.append(("lost", b, got, sorted(allowed)))
                continue
            if got == want:
                figures["durable_exact"] += 1
            else:
                figures["newer"] += 1
            if b in acked and got != acked[b]:
                figures["acked_unflushed_not_latest"] += 1
            if got:
                observed[b] = got
                figures["data_blocks"] += 1
    stale = [b for b in base if b >= blocks]
    if stale:
        bad.append(("shrunk", blocks, stale[:5]))
    if bad:
        print(json.dumps({"result": "FAIL", "figures": figures, "first": bad[:20]}))
        return 1
    h.flush()
    h.shutdown()
    next_gen = max(next_gen, last_gen + 1, max(observed.values(), default=0) + 1)
    tmp = state_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"blocks": observed, "next_gen": next_gen}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state_path)
    print(json.dumps({"result": "OK", "figures": figures}))
    return 0


def main(argv):
    discard = "--discard" in argv
    args = [a for a in argv[1:] if a != "--discard"]
    if args[:1] == ["work"] and len(args) == 7:
        return work(*args[1:], discard)
    if args[:1] == ["verify"] and len(args) == 4:
        return verify(*args[1:], discard)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
