#!/usr/bin/python3
"""Structured replies, metadata contexts and block status checked through libnbd.

Usage: structured.py CHECK URI [ARGS...]

Exits 0 and prints "OK CHECK" on success; any failed expectation raises (non-zero exit,
traceback on stderr). Checks hold both while every block is reported allocated and once
never-written blocks are reported as holes: whatever is reported as reading as zeros must
read as zeros, and whatever was written must be reported as data.
"""

import errno
import random
import sys

import nbd

HOLE = nbd.STATE_HOLE  # 1
ZERO = nbd.STATE_ZERO  # 2


def connect(uri, strict=True, meta=True, structured=True):
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def pattern(n, seed):
    r = random.Random(seed)
    return bytes(r.getrandbits(8) for _ in range(n))


def errnum_of(f):
    try:
        f()
    except nbd.Error as e:
        return e.errnum
    return None


def expect_err(what, f, want):
    got = errnum_of(f)
    assert got == want, "%s: expected errno %s, got %s" % (
        what,
        errno.errorcode.get(want, want),
        None if got is None else errno.errorcode.get(got, got),
    )


def extents(h, count, offset, flags=0):
    """One BLOCK_STATUS; returns [(offset, length, flags)] for base:allocation."""
    got = []

    def cb(context, off, entries, err):
        assert context == nbd.CONTEXT_BASE_ALLOCATION, context
        assert off == offset, (off, offset)
        assert len(entries) % 2 == 0 and entries, entries
        pos = off
        for i in range(0, len(entries), 2):
            got.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        return 0

    h.block_status(count, offset, cb, flags)
    assert got, "no extent for [%d, +%d)" % (offset, count)
    return got


def whole_map(h):
    """The map of the whole export, asking again from where each reply stopped."""
    size = h.get_size()
    out = []
    pos = 0
    while pos < size:
        count = min(size - pos, 1 << 30)
        ext = extents(h, count, pos)
        for off, length, flags in ext:
            assert length > 0, ext
            assert flags & ~(HOLE | ZERO) == 0, "unknown flags %#x" % flags
            out.append((off, length, flags))
        pos = ext[-1][0] + ext[-1][1]
    assert pos == size, "map ends at %d, size %d" % (pos, size)
    return out


def check_map_consistent(h, written):
    """Contiguous map; written ranges are data; zero ranges read as zeros."""
    m = whole_map(h)
    for (a_off, a_len, _), (b_off, _, _) in zip(m, m[1:]):
        assert a_off + a_len == b_off, m
    for w_off, w_len in written:
        for off, length, flags in m:
            if off < w_off + w_len and w_off < off + length:
                assert flags & HOLE == 0, "written [%d,+%d) reported as hole: %s" % (
                    w_off, w_len, m)
    for off, length, flags in m:
        if flags & ZERO:
            n = min(length, 1 << 20)
            assert h.pread(n, off) == bytes(n), "extent at %d reported zero but is not" % off
    return m


def check_negotiated(uri):
    h = connect(uri)
    assert h.get_structured_replies_negotiated(), "structured replies not negotiated"
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not negotiated"
    assert h.get_protocol() == "newstyle-fixed"
    h.pwrite(b"\x5a" * 4096, 0)
    assert h.pread(4096, 0) == b"\x5a" * 4096
    h.shutdown()
    # Simple replies only: no metadata context either (it needs structured replies).
    h = connect(uri, structured=False)
    assert not h.get_structured_replies_negotiated()
    assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert h.pread(4096, 0) == b"\x5a" * 4096
    h.shutdown()
    # Structured replies without asking for a context.
    h = connect(uri, meta=False)
    assert h.get_structured_replies_negotiated()
    assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.shutdown()


def check_list_contexts(uri):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    for queries, want in [
        ([], ["base:allocation"]),
        (["base:"], ["base:allocation"]),
        (["base:allocation"], ["base:allocation"]),
        (["base:nope"], []),
        (["qemu:dirty-bitmap:x", "x-foo:bar"], []),
    ]:
        h.clear_meta_contexts()
        for q in queries:
            h.add_meta_context(q)
        seen = []
        n = h.opt_list_meta_context(lambda name: seen.append(name) or 0)
        assert seen == want, (queries, seen)
        assert n == len(want), (queries, n)
    # Still usable afterwards.
    h.clear_meta_contexts()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.opt_go()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.shutdown()


def check_block_status(uri):
    h = connect(uri, strict=False)
    size = h.get_size()
    written = [(1 << 20, 65536), (size - 8192, 8192)]
    for off, length in written:
        h.pwrite(pattern(length, off), off)
    check_map_consistent(h, written)
    # REQ_ONE: exactly one extent, never longer than asked.
    for count, off in [(4096, 0), (100, 1 << 20), (size, 0), (5000, 1000)]:
        ext = extents(h, count, off, nbd.CMD_FLAG_REQ_ONE)
        assert len(ext) == 1, ext
        assert 0 < ext[0][1] <= count, (count, ext)
    # Unaligned queries cover at least one byte and never go past the request's end.
    ext = extents(h, 5000, 1000)
    assert sum(e[1] for e in ext) <= 5000 and ext[0][1] > 0, ext
    # Invalid ones are refused by the server (client checks are off).
    expect_err("block status past the end", lambda: extents(h, 4096, size), errno.EINVAL)
    expect_err("block status straddling the end",
               lambda: extents(h, 8192, size - 4096), errno.EINVAL)
    expect_err("zero-length block status", lambda: extents(h, 0, 0), errno.EINVAL)
    expect_err("block status with NO_HOLE",
               lambda: extents(h, 4096, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL)
    # The connection is still fine.
    assert h.pread(65536, 1 << 20) == pattern(65536, 1 << 20)
    h.shutdown()


def check_pread(uri):
    h = connect(uri, strict=False)
    size = h.get_size()
    data = pattern(3 << 20, 7)
    base = 2 << 20
    h.pwrite(data, base)
    assert h.pread(len(data), base) == data
    # Unaligned reads (strict mode off: nothing rounds them on the client side).
    for off, n in [(1, 1), (4095, 2), (12345, 77777), (1 << 20, 1), (len(data) - 3, 3)]:
        assert h.pread(n, base + off) == data[off:off + n], (off, n)
    # A large read: 8 MiB in one request (one OFFSET_DATA chunk).
    big = h.pread(8 << 20, 0)
    assert big[base:base + len(data)] == data
    # Reads that straddle written data and never-written space.
    assert h.pread(8192, base - 4096)[4096:] == data[:4096]
    # Zero-length read succeeds with no data.
    assert h.pread(0, 0) == b""
    # Errors arrive as errors, and the connection survives them.
    expect_err("read past the end", lambda: h.pread(4096, size), errno.EINVAL)
    expect_err("read straddling the end", lambda: h.pread(10, size - 5), errno.EINVAL)
    expect_err("read with REQ_ONE", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)
    expect_err("read with DF (not advertised)",
               lambda: h.pread(512, 0, nbd.CMD_FLAG_DF), errno.EINVAL)
    assert h.pread(4096, base) == data[:4096]
    # Many reads in flight, completed out of order.
    cookies = {}
    for i in range(64):
        off = random.Random(i).randrange(0, len(data) - 65536)
        buf = nbd.Buffer(65536)
        cookies[h.aio_pread(buf, base + off)] = (buf, off)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie, (buf, off) in cookies.items():
        assert h.aio_command_completed(cookie)
        assert buf.to_bytearray() == data[off:off + 65536], off
    h.shutdown()


def check_eio(uri, offset, trigger):
    """While TRIGGER exists every read of the backing file fails: reads get EIO as an
    error (a structured error chunk), the connection survives, and once the trigger is
    gone the same connection reads the data."""
    import os
    offset = int(offset)
    h = connect(uri, strict=False)
    assert h.get_structured_replies_negotiated()
    expect_err("read while the backing file fails", lambda: h.pread(65536, offset), errno.EIO)
    expect_err("unaligned read while the backing file fails",
               lambda: h.pread(100, offset + 1), errno.EIO)
    expect_err("again", lambda: h.pread(4096, 0), errno.EIO)
    assert h.pread(0, 0) == b""
    os.remove(trigger)
    assert h.pread(4096, 0) == pattern(4096, 0)
    assert h.pread(65536, offset) == pattern(1 << 20, 1)[:65536]
    h.shutdown()


def check_prepare_eio(uri, offset):
    offset = int(offset)
    h = connect(uri)
    h.pwrite(pattern(4096, 0), 0)
    h.pwrite(pattern(1 << 20, 1), offset)
    h.flush()
    h.shutdown()


def check_fresh_is_hole(uri):
    """Only with the allocation map: a fresh volume is one hole that reads as zeros."""
    h = connect(uri)
    size = h.get_size()
    m = whole_map(h)
    assert len(m) == 1 and m[0][2] == HOLE | ZERO, m
    assert h.pread(1 << 20, 0) == bytes(1 << 20)
    assert h.pread(4096, size - 4096) == bytes(4096)
    h.pwrite(b"\x01" * 4096, 4 << 20)
    m = check_map_consistent(h, [(4 << 20, 4096)])
    assert m[0] == (0, m[0][1], HOLE | ZERO) and m[0][1] <= 4 << 20, m
    assert m[-1][2] == HOLE | ZERO and m[-1][0] + m[-1][1] == size, m
    assert h.pread(8192, (4 << 20) - 4096) == bytes(4096) + b"\x01" * 4096
    h.shutdown()


CHECKS = {
    "negotiated": check_negotiated,
    "list_contexts": check_list_contexts,
    "block_status": check_block_status,
    "pread": check_pread,
    "prepare_eio": check_prepare_eio,
    "eio": check_eio,
    "fresh_is_hole": check_fresh_is_hole,
}


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in CHECKS:
        sys.exit("usage: structured.py {%s} URI [ARGS]" % ",".join(sorted(CHECKS)))
    CHECKS[sys.argv[1]](*sys.argv[2:])
    print("OK " + sys.argv[1])


if __name__ == "__main__":
    main()
