"""A minimal NBD client (standard library only) for the timed modes of scripts/bench.sh:
attach time (the first block read) and single-request write latency on a thin volume.

Fixed newstyle handshake, NBD_OPT_GO with no info requests, simple replies only (no
structured replies are negotiated). One request at a time; every reply is checked.
"""

import socket
import struct
import time

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
# The most option-reply payload accepted (the replies asked for here are a few bytes).
MAX_OPT_REPLY = 64 << 10


class NbdError(Exception):
    """The server broke the protocol or answered a request with an error."""


def _recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise NbdError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class Client:
    """One NBD connection to an export on a Unix socket."""

    def __init__(self, sock_path, export="", timeout=60.0, connected=None):
        """Connects (or takes an already connected socket `connected`) and negotiates.
        `t_greeting` is the monotonic time the server's greeting arrived."""
        self.s = connected or socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        if connected is None:
            self.s.connect(sock_path)
        self.cookie = 0
        self.size = None
        hello = _recv_exact(self.s, 18)
        self.t_greeting = time.monotonic()
        if hello[:8] != NBDMAGIC or hello[8:16] != IHAVEOPT:
            raise NbdError(f"not a newstyle NBD server: greeting {hello[:16]!r}")
        (sflags,) = struct.unpack(">H", hello[16:18])
        if not sflags & FLAG_FIXED_NEWSTYLE:
            raise NbdError("the server does not speak fixed newstyle")
        cflags = FLAG_FIXED_NEWSTYLE | (sflags & FLAG_NO_ZEROES)
        self.s.sendall(struct.pack(">I", cflags))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.s.sendall(IHAVEOPT + struct.pack(">II", OPT_GO, len(data)) + data)
        while True:
            magic, opt, rtype, rlen = struct.unpack(">QIII", _recv_exact(self.s, 20))
            if magic != OPT_REPLY_MAGIC or opt != OPT_GO:
                raise NbdError(f"bad option reply (magic {magic:#x}, option {opt})")
            if rlen > MAX_OPT_REPLY:
                raise NbdError(f"option reply of {rlen} bytes (at most {MAX_OPT_REPLY})")
            payload = _recv_exact(self.s, rlen)
            if rtype & (1 << 31):
                raise NbdError(f"NBD_OPT_GO for {export!r} refused (reply type {rtype:#x}): "
                               f"{payload[:200]!r}")
            if rtype == REP_INFO and len(payload) >= 12:
                (itype,) = struct.unpack(">H", payload[:2])
                if itype == INFO_EXPORT:
                    self.size, _flags = struct.unpack(">QH", payload[2:12])
            elif rtype == REP_ACK:
                break
        if self.size is None:
            raise NbdError("NBD_OPT_GO ended without NBD_INFO_EXPORT")

    def _request(self, cmd, offset, length, payload=b""):
        self.cookie += 1
        self.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self.cookie, offset,
                                   length) + payload)
        magic, err, cookie = struct.unpack(">IIQ", _recv_exact(self.s, 16))
        if magic != SIMPLE_REPLY_MAGIC or cookie != self.cookie:
            raise NbdError(f"bad reply (magic {magic:#x}, cookie {cookie} != {self.cookie})")
        if err:
            raise NbdError(f"request {cmd} at {offset}+{length} failed: NBD error {err}")
        return _recv_exact(self.s, length) if cmd == CMD_READ else b""

    def read(self, offset, length):
        return self._request(CMD_READ, offset, length)

    def write(self, offset, data):
        self._request(CMD_WRITE, offset, len(data), data)

    def flush(self):
        self._request(CMD_FLUSH, 0, 0)

    def close(self):
        try:
            self.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.s.close()
