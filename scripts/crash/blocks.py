"""Self-describing 4096-byte blocks for the crash tests (python3-libnbd).

Shared by scripts/crash/crashclient.py (scripts/crash-test.sh's journaling
client) and tests/nbdsh/crash.py (tests/thin.rs's crash workload). A block
written with generation GEN holds a record: a magic, the block's index, GEN,
and a filler derived from both, so any read can be classified as zeros, a
record of this block (which generation), or garbage (anything else, including
another block's record).
"""

import struct

import nbd

BS = 4096
MAGIC = b"CVCRASH2"


def record(block, gen):
    head = MAGIC + struct.pack("<QQ", block, gen)
    filler = bytes(((block * 131 + gen * 7 + i) & 0xFF) for i in range(256))
    body = head + filler * ((BS - len(head)) // 256 + 1)
    return body[:BS]


def classify(block, data):
    """0 for zeros, the generation for a valid record of `block`, None for garbage."""
    if data == bytes(BS):
        return 0
    if data[:8] != MAGIC:
        return None
    b, gen = struct.unpack("<QQ", data[8:24])
    if b != block or gen == 0 or data != record(block, gen):
        return None
    return gen


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h
