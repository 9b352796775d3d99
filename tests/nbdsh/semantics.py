#!/usr/bin/python3
"""NBD request semantics checked through libnbd (python3-libnbd).

Usage: semantics.py CHECK URI [URI2]

Each CHECK connects with libnbd's client-side strictness turned off
(set_strict_mode(0)), so that out-of-range, zero-length, unaligned and
unadvertised requests really reach the server and the server's own answer
is what is checked. Exits 0 and prints "OK CHECK" on success; any failed
expectation raises (non-zero exit, traceback on stderr).
"""

import errno
import random
import sys

import nbd


def connect(uri):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(uri)
    return h


def errnum_of(f):
    """Runs f(); returns None on success, else the errno the server sent."""
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


def expect_ok(what, f):
    try:
        return f()
    except nbd.Error as e:
        raise AssertionError("%s: expected success, got %s" % (what, e))


def pattern(n, seed):
    r = random.Random(seed)
    return bytearray(r.getrandbits(8) for _ in range(n))


def read(h, n, off):
    return bytearray(h.pread(n, off))


def check_bounds(uri):
    h = connect(uri)
    size = h.get_size()
    assert size > 65536, size
    # Known data at the end, so that a refused straddling write can be seen to change nothing.
    tail = pattern(8192, 1)
    expect_ok("write the last 8 KiB", lambda: h.pwrite(tail, size - 8192))
    expect_err("read straddling the end", lambda: h.pread(10, size - 5), errno.EINVAL)
    expect_err("read at the end", lambda: h.pread(1, size), errno.EINVAL)
    expect_err("read far past the end", lambda: h.pread(4096, size + (1 << 30)), errno.EINVAL)
    expect_err("read with offset+len overflowing u64",
               lambda: h.pread(4096, (1 << 64) - 2048), errno.EINVAL)
    expect_err("write straddling the end", lambda: h.pwrite(b"x" * 10, size - 5), errno.ENOSPC)
    expect_err("write at the end", lambda: h.pwrite(b"x", size), errno.ENOSPC)
    expect_err("write far past the end",
               lambda: h.pwrite(b"y" * 4096, size + (1 << 30)), errno.ENOSPC)
    expect_err("write_zeroes straddling the end",
               lambda: h.zero(8192, size - 4096), errno.ENOSPC)
    expect_err("trim past the end", lambda: h.trim(8192, size - 4096), errno.EINVAL)
    expect_err("cache past the end", lambda: h.cache(8192, size - 4096), errno.EINVAL)
    # A refused request has no partial effect.
    got = read(h, 8192, size - 8192)
    assert got == tail, "a refused request changed the last 8 KiB"
    # The connection is still usable after the errors.
    expect_ok("read after errors", lambda: h.pread(4096, 0))
    h.shutdown()


def check_bad_flags(uri):
    h = connect(uri)
    before = read(h, 4096, 0)
    # An unknown command flag must be refused, not ignored.
    expect_err("write with an unknown flag", lambda: h.pwrite(b"q" * 4096, 0, 1 << 14), errno.EINVAL)
    # NO_HOLE is meaningless on a read.
    expect_err("read with NO_HOLE", lambda: h.pread(4096, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL)
    assert read(h, 4096, 0) == before, "a refused write changed data"
    h.shutdown()


def check_zero_length(uri):
    h = connect(uri)
    size = h.get_size()
    data = pattern(4096, 2)
    h.pwrite(data, 8192)
    r = expect_ok("zero-length read", lambda: h.pread(0, 8192))
    assert len(r) == 0, r
    expect_ok("zero-length write", lambda: h.pwrite(b"", 8192))
    expect_ok("zero-length unaligned write", lambda: h.pwrite(b"", 8193))
    expect_ok("zero-length read at offset 0", lambda: h.pread(0, 0))
    expect_ok("zero-length read at the end", lambda: h.pread(0, size))
    assert read(h, 4096, 8192) == data, "a zero-length write changed data"
    h.shutdown()


def check_read_only(ro_uri):
    h = connect(ro_uri)
    assert h.is_read_only(), "export does not advertise read-only"
    before = read(h, 8192, 0)
    expect_err("write to a read-only export", lambda: h.pwrite(b"w" * 4096, 0), errno.EPERM)
    expect_err("write_zeroes to a read-only export", lambda: h.zero(4096, 0), errno.EPERM)
    expect_err("trim on a read-only export", lambda: h.trim(4096, 0), errno.EPERM)
    expect_err("unaligned write to a read-only export", lambda: h.pwrite(b"w", 3), errno.EPERM)
    expect_ok("read from a read-only export", lambda: h.pread(4096, 0))
    assert read(h, 8192, 0) == before, "a write to a read-only export changed data"
    h.shutdown()


def check_prepare_read_only(uri):
    h = connect(uri)
    h.pwrite(pattern(8192, 3), 0)
    h.flush()
    h.shutdown()


def check_verify_prepared(uri):
    h = connect(uri)
    got = read(h, 8192, 0)
    assert got == pattern(8192, 3), "data written before is not intact"
    h.shutdown()


def check_flush_fua(uri):
    h = connect(uri)
    assert h.can_flush() and h.can_fua(), "server does not advertise flush/fua"
    a = pattern(12288, 4)
    expect_ok("write with FUA", lambda: h.pwrite(a, 4096, nbd.CMD_FLAG_FUA))
    assert read(h, 12288, 4096) == a
    b = pattern(100, 5)
    expect_ok("unaligned write with FUA", lambda: h.pwrite(b, 5000, nbd.CMD_FLAG_FUA))
    a[5000 - 4096:5100 - 4096] = b
    assert read(h, 12288, 4096) == a
    expect_ok("flush", h.flush)
    expect_ok("flush again", h.flush)
    expect_ok("write_zeroes with FUA", lambda: h.zero(4096, 65536, nbd.CMD_FLAG_FUA))
    assert read(h, 4096, 65536) == bytearray(4096)
    expect_ok("trim with FUA", lambda: h.trim(4096, 131072, nbd.CMD_FLAG_FUA))
    # The spec: with SEND_FUA negotiated the server MUST accept FUA on every command.
    expect_ok("cache with FUA", lambda: h.cache(4096, 0, nbd.CMD_FLAG_FUA))
    expect_ok("flush with FUA", lambda: h.flush(nbd.CMD_FLAG_FUA))
    r = expect_ok("read with FUA", lambda: h.pread(12288, 4096, nbd.CMD_FLAG_FUA))
    assert bytearray(r) == a, "read with FUA returned wrong data"
    h.shutdown()


def check_trim(uri):
    h = connect(uri)
    assert h.can_trim(), "server does not advertise trim"
    base = 200 * 4096
    data = pattern(4 * 4096, 6)
    h.pwrite(data, base)
    # An unaligned trim in the middle: the contents of the trimmed range are unspecified,
    # but everything outside it must survive (no rounding outward).
    lo, hi = base + 4096 + 100, base + 3 * 4096 - 100
    expect_ok("unaligned trim", lambda: h.trim(hi - lo, lo))
    got = read(h, 4 * 4096, base)
    assert got[: lo - base] == data[: lo - base], "trim destroyed data before the range"
    assert got[hi - base:] == data[hi - base:], "trim destroyed data after the range"
    # An aligned trim, then a write over it reads back correctly.
    expect_ok("aligned trim", lambda: h.trim(4 * 4096, base))
    fresh = pattern(4 * 4096, 7)
    h.pwrite(fresh, base)
    assert read(h, 4 * 4096, base) == fresh, "write after trim did not read back"
    # Zero-length trim: unspecified by the protocol; success or EINVAL, never a hang or close.
    assert errnum_of(lambda: h.trim(0, base)) in (None, errno.EINVAL)
    assert read(h, 4 * 4096, base) == fresh, "zero-length trim changed data"
    h.shutdown()


def check_zero(uri):
    h = connect(uri)
    assert h.can_zero(), "server does not advertise write_zeroes"
    for i, flags in enumerate([0, nbd.CMD_FLAG_NO_HOLE]):
        base = (300 + 10 * i) * 4096
        data = pattern(4 * 4096, 8 + i)
        h.pwrite(data, base)
        # Aligned whole sectors.
        expect_ok("write_zeroes flags=%d" % flags, lambda: h.zero(4096, base, flags))
        data[0:4096] = bytearray(4096)
        assert read(h, 4 * 4096, base) == data, "aligned write_zeroes (flags %d)" % flags
        # Unaligned, straddling sector boundaries: zeros inside, data outside.
        lo, hi = base + 4096 + 333, base + 3 * 4096 + 17
        expect_ok("unaligned write_zeroes flags=%d" % flags, lambda: h.zero(hi - lo, lo, flags))
        data[lo - base:hi - base] = bytearray(hi - lo)
        assert read(h, 4 * 4096, base) == data, "unaligned write_zeroes (flags %d)" % flags
    # A large zero (8 MiB) in one request reads back as zeros.
    big = 4 << 20
    h.pwrite(pattern(65536, 10), big)
    expect_ok("8 MiB write_zeroes", lambda: h.zero(8 << 20, big))
    assert h.pread(8 << 20, big) == bytes(8 << 20), "8 MiB write_zeroes did not read back zero"
    # Zeroes after a trim also read back zero.
    h.trim(8192, big)
    h.zero(8192, big)
    assert read(h, 8192, big) == bytearray(8192), "zero after trim did not read back zero"
    h.shutdown()


def check_cache(uri):
    h = connect(uri)
    data = pattern(8192, 11)
    h.pwrite(data, 40960)
    expect_ok("cache", lambda: h.cache(8192, 40960))
    expect_ok("unaligned cache", lambda: h.cache(100, 40961))
    assert errnum_of(lambda: h.cache(0, 40960)) in (None, errno.EINVAL)
    assert read(h, 8192, 40960) == data, "cache changed data"
    h.shutdown()


def check_aio(uri):
    h = connect(uri)
    size = h.get_size()
    # Region R (read side) is prepared synchronously; region W is written asynchronously.
    rbase, wbase = 0, size // 2
    rdata = pattern(100 * 16384, 12)
    h.pwrite(rdata, rbase)
    writes, reads = [], []
    shadow = {}
    for i in range(200):
        if i % 2 == 0:
            n = 4096 + (i * 37) % 12000
            off = wbase + (i // 2) * 16384 + (i % 5)  # some unaligned
            data = pattern(n, 1000 + i)
            buf = nbd.Buffer.from_bytearray(data)
            c = h.aio_pwrite(buf, off)
            writes.append((c, buf))
            shadow[off] = data
        else:
            j = i // 2
            n = 1 + (i * 131) % 16383
            off = rbase + j * 16384
            buf = nbd.Buffer(n)
            c = h.aio_pread(buf, off)
            reads.append((c, buf, off, n))
    assert h.aio_in_flight() > 0
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c, _ in writes:
        assert h.aio_command_completed(c), "write %d not completed" % c
    for c, buf, off, n in reads:
        assert h.aio_command_completed(c), "read %d not completed" % c
        assert buf.to_bytearray() == rdata[off - rbase:off - rbase + n], "aio read at %d" % off
    for off, data in shadow.items():
        assert read(h, len(data), off) == data, "aio write at %d did not read back" % off
    h.shutdown()


def check_unaligned(uri):
    h = connect(uri)
    # The sector size is the preferred block size (the minimum is 1: any alignment).
    sector = h.get_block_size(nbd.SIZE_PREFERRED) or 512
    base = 1 << 20
    n = 8 * 4096
    shadow = pattern(n, 13)
    guard = pattern(4096, 15)
    h.pwrite(guard, base - 4096)
    h.pwrite(shadow, base)
    h.pwrite(guard, base + n)
    r = random.Random(14)
    offsets = []
    for k in range(1, 8):
        b = k * 512
        offsets += [b - 1, b, b + 1]
    offsets += [r.randrange(0, n) for _ in range(60)]
    for o in offsets:
        v = bytes([r.getrandbits(8)])
        expect_ok("1-byte write at +%d" % o, lambda: h.pwrite(v, base + o))
        shadow[o:o + 1] = v
    # 2-byte writes straddling every sector boundary of the region.
    for b in range(sector, n, sector):
        v = bytes([r.getrandbits(8), r.getrandbits(8)])
        h.pwrite(v, base + b - 1)
        shadow[b - 1:b + 1] = v
    # Odd-sized writes straddling several sectors.
    for o, ln in [(511, 1027), (4095, 4098), (7, 3 * 4096 + 5), (n - 4097, 4097)]:
        v = pattern(ln, o)
        h.pwrite(v, base + o)
        shadow[o:o + ln] = v
    assert read(h, n, base) == shadow, "unaligned writes do not read back"
    # Unaligned reads of single bytes.
    for o in offsets[:20]:
        assert read(h, 1, base + o) == shadow[o:o + 1], "1-byte read at +%d" % o
    # Neighbours untouched by the read-modify-write cycles.
    assert read(h, 4096, base - 4096) == guard, "data before the region changed"
    assert read(h, 4096, base + n) == guard, "data after the region changed"
    h.shutdown()


CHECKS = {
    "bounds": check_bounds,
    "bad_flags": check_bad_flags,
    "zero_length": check_zero_length,
    "read_only": check_read_only,
    "prepare_read_only": check_prepare_read_only,
    "verify_prepared": check_verify_prepared,
    "flush_fua": check_flush_fua,
    "trim": check_trim,
    "zero": check_zero,
    "cache": check_cache,
    "aio": check_aio,
    "unaligned": check_unaligned,
}


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in CHECKS:
        sys.exit("usage: semantics.py {%s} URI [URI2]" % ",".join(sorted(CHECKS)))
    CHECKS[sys.argv[1]](*sys.argv[2:])
    print("OK " + sys.argv[1])


if __name__ == "__main__":
    main()
