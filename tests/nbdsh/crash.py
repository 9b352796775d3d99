#!/usr/bin/python3
"""Crash-consistency workload and verifier for thin volumes (python3-libnbd).

Usage:
  crash.py work   URI STATE LOG SEED   # run writes/zeroes/trims/flushes until the
                                       # connection dies (the server is killed)
  crash.py verify URI STATE LOG        # after a restart: check every block, write
                                       # the observed image as the new STATE

The volume is seen as BLOCKS 4096-byte blocks. Every written block holds a
self-describing record (magic, block index, generation, filler derived from
both), so any read can be classified as zeros, a valid record for this block,
or garbage.

STATE (JSON) is the image as last verified: block -> generation (0 = zeros).
LOG gets one line per operation *before* it is sent ("W first count gen",
"Z first count", "T first count") and "F" once a flush has returned. The
allowed contents of a block after a crash are: its state at the last
completed flush, or any value an operation after that flush gave it (the last
one possibly half-done). Anything else (garbage, a wrong block's record, a
flushed generation lost to zeros) fails the check.
"""

import json
import os
import random
import sys

import nbd

# The block encoding is scripts/crash/blocks.py's (crash-test.sh's client uses it too).
sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts", "crash"))
from blocks import BS, classify, connect, record  # noqa: E402


def work(uri, state_path, log_path, seed):
    rng = random.Random(int(seed))
    h = connect(uri)
    blocks = h.get_size() // BS
    with open(state_path) as f:
        gen = max(json.load(f).values(), default=0) + 1
    log = open(log_path, "w")

    def note(line):
        log.write(line + "\n")
        log.flush()

    try:
        while True:
            r = rng.random()
            first = rng.randrange(blocks)
            # Mostly small writes (first writes to chunks allocate them); some
            # multi-chunk ones, zeroes and trims over whole and partial chunks.
            count = min(blocks - first, rng.choice([1, 1, 2, 3, 8, 16, 17, 40]))
            if r < 0.70:
                data = b"".join(record(first + i, gen) for i in range(count))
                note("W %d %d %d" % (first, count, gen))
                h.pwrite(data, first * BS)
                gen += 1
            elif r < 0.80:
                note("Z %d %d" % (first, count))
                h.zero(count * BS, first * BS)
            elif r < 0.87:
                note("T %d %d" % (first, count))
                h.trim(count * BS, first * BS)
            else:
                h.flush()
                note("F")
    except nbd.Error as e:
        print("connection ended: %s" % e)
        return 0


def verify(uri, state_path, log_path, discard):
    h = connect(uri)
    blocks = h.get_size() // BS
    with open(state_path) as f:
        base = {int(k): v for k, v in json.load(f).items()}
    flushed = dict(base)  # block -> generation at the last completed flush
    current = dict(base)
    later = {}  # block -> set of values given after the last flush
    with open(log_path) as f:
        lines = [l.split() for l in f.read().splitlines() if l.strip()]
    ops = 0
    for p in lines:
        ops += 1
        if p[0] == "F":
            flushed = dict(current)
            later = {}
            continue
        first, count = int(p[1]), int(p[2])
        for i in range(count):
            b = first + i
            if p[0] == "W":
                v = int(p[3])
            elif p[0] == "Z" or discard:
                v = 0
            else:
                continue  # TRIM without --discard is a no-op
            current[b] = v
            later.setdefault(b, set()).add(v)
    bad = []
    observed = {}
    data_blocks = 0
    for off in range(0, blocks * BS, 1 << 20):
        n = min(1 << 20, blocks * BS - off)
        buf = h.pread(n, off)
        for i in range(n // BS):
            b = off // BS + i
            got = classify(b, buf[i * BS:(i + 1) * BS])
            allowed = {flushed.get(b, 0)} | later.get(b, set())
            if got is None or got not in allowed:
                bad.append((b, got, sorted(allowed)))
            if got:
                data_blocks += 1
                observed[b] = got
    if bad:
        print("FAIL %d blocks: %s" % (len(bad), bad[:10]))
        return 1
    with open(state_path, "w") as f:
        json.dump(observed, f)
    print("OK verify: %d ops in log, %d blocks hold data, all as allowed" % (ops, data_blocks))
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "work":
        sys.exit(work(*sys.argv[2:6]))
    if cmd == "verify":
        sys.exit(verify(sys.argv[2], sys.argv[3], sys.argv[4], os.environ.get("DISCARD") == "1"))
    sys.exit("unknown command " + cmd)
