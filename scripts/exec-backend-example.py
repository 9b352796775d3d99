#!/usr/bin/python3
"""Example cryptvol exec backend: AES-256-GCM key wrapping with keys kept in a directory.

This is a reference for the exec protocol (docs/keys.md, "The exec backend"), not a key
service to rely on: its keys are plain files and Python cannot wipe the data key from
memory. A real site plugs in Vault, a TPM, an HSM or Tang the same way.

Needs python3-cryptography (Debian) or `pip install cryptography`.

Usage:
  exec-backend-example.py --dir DIR                 answer one request (stdin -> stdout)
  exec-backend-example.py --dir DIR create-key NAME create key NAME (32 random bytes)
  exec-backend-example.py --dir DIR disable-key NAME / enable-key NAME

Register it with cryptvol:
  cryptvol key exec add example -- /usr/bin/python3 /path/exec-backend-example.py --dir /var/lib/example-keys
and use it: cryptvol create --key exec:example:NAME ...   (exec:example = key "default",
created on first use).

Protocol summary (one JSON object each way):
  {"protocol":1,"op":"wrap","key_id":K|null,"plaintext_b64":...,"context":{...},...}
      -> {"ok":true,"key_id":K,"blob_b64":...,"params":{...}}
  {"protocol":1,"op":"unwrap","key_id":K,"blob_b64":...,"context":{...},"params":{...}}
      -> {"ok":true,"key_id":K,"plaintext_b64":...}
  {"protocol":1,"op":"describe","key_id":K|null}
      -> {"ok":true,"key_id":K,"state":"Enabled"|"Disabled"}
  errors -> {"ok":false,"error":"not_found|disabled|wrong_key|invalid|unsupported|...","message":...}
"""

import base64
import json
import os
import re
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PROTOCOL = 1
DEFAULT_KEY = "default"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
AAD_LABEL = b"cryptvol-exec-example/v1\0"
MAX_REQUEST = 64 * 1024


class Refusal(Exception):
    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind
        self.message = message


def key_path(directory, name):
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise Refusal("invalid", "key names are 1 to 64 letters, digits, '_' or '-'")
    return os.path.join(directory, name + ".key")


def create_key(directory, name):
    path = key_path(directory, name)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(AESGCM.generate_key(bit_length=256))
        f.flush()
        os.fsync(f.fileno())


def load_key(directory, name, create_default=False):
    path = key_path(directory, name)
    if not os.path.exists(path):
        if create_default and name == DEFAULT_KEY:
            try:
                create_key(directory, name)
            except FileExistsError:
                pass
        else:
            raise Refusal("not_found", "no key named %s" % name)
    if os.path.exists(path[: -len(".key")] + ".disabled"):
        raise Refusal("disabled", "key %s is disabled" % name)
    with open(path, "rb") as f:
        key = f.read()
    if len(key) != 32:
        raise Refusal("invalid", "key file of %s is damaged" % name)
    return key


def associated_data(name, context):
    if not isinstance(context, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in context.items()
    ):
        raise Refusal("invalid", "context must map strings to strings")
    bound = json.dumps({"context": context, "key_id": name}, sort_keys=True, separators=(",", ":"))
    return AAD_LABEL + bound.encode()


def b64decode(value, what):
    if not isinstance(value, str):
        raise Refusal("invalid", "%s is missing" % what)
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise Refusal("invalid", "%s is not base64" % what)


def answer(directory, req):
    if req.get("protocol") != PROTOCOL:
        raise Refusal("unsupported", "this program speaks protocol %d" % PROTOCOL)
    op = req.get("op")
    name = req.get("key_id") or DEFAULT_KEY
    if op == "describe":
        key_path(directory, name)
        if not os.path.exists(key_path(directory, name)):
            raise Refusal("not_found", "no key named %s" % name)
        disabled = os.path.exists(os.path.join(directory, name + ".disabled"))
        return {"ok": True, "key_id": name, "state": "Disabled" if disabled else "Enabled"}
    if op == "wrap":
        key = load_key(directory, name, create_default=True)
        plaintext = b64decode(req.get("plaintext_b64"), "plaintext_b64")
        nonce = os.urandom(12)
        blob = nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data(name, req.get("context")))
        return {
            "ok": True,
            "key_id": name,
            "blob_b64": base64.b64encode(blob).decode(),
            "params": {"alg": "AES-256-GCM", "example_version": "1"},
        }
    if op == "unwrap":
        key = load_key(directory, name)
        blob = b64decode(req.get("blob_b64"), "blob_b64")
        if len(blob) < 12 + 16:
            raise Refusal("invalid", "blob is too short")
        try:
            plaintext = AESGCM(key).decrypt(blob[:12], blob[12:], associated_data(name, req.get("context")))
        except InvalidTag:
            raise Refusal("wrong_key", "the data key did not authenticate under %s with this context" % name)
        return {"ok": True, "key_id": name, "plaintext_b64": base64.b64encode(plaintext).decode()}
    raise Refusal("unsupported", "unknown op %r" % (op,))


def main(argv):
    if len(argv) < 2 or argv[0] != "--dir":
        sys.stderr.write(__doc__)
        return 2
    directory, rest = argv[1], argv[2:]
    if rest:
        if len(rest) != 2 or rest[0] not in ("create-key", "disable-key", "enable-key"):
            sys.stderr.write(__doc__)
            return 2
        try:
            if rest[0] == "create-key":
                create_key(directory, rest[1])
            elif rest[0] == "disable-key":
                key_path(directory, rest[1])
                open(os.path.join(directory, rest[1] + ".disabled"), "w").close()
            else:
                key_path(directory, rest[1])
                try:
                    os.remove(os.path.join(directory, rest[1] + ".disabled"))
                except FileNotFoundError:
                    pass
        except (Refusal, OSError) as e:
            sys.stderr.write("exec-backend-example: %s\n" % e)
            return 1
        return 0
    raw = sys.stdin.buffer.read(MAX_REQUEST + 1)
    try:
        if len(raw) > MAX_REQUEST:
            raise Refusal("invalid", "request too large")
        try:
            req = json.loads(raw)
        except ValueError:
            raise Refusal("invalid", "request is not JSON")
        if not isinstance(req, dict):
            raise Refusal("invalid", "request is not a JSON object")
        resp = answer(directory, req)
    except Refusal as e:
        resp = {"ok": False, "error": e.kind, "message": e.message}
    sys.stdout.write(json.dumps(resp) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
