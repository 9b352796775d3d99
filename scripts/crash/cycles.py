#!/usr/bin/python3
"""kill -9 cycles under verified I/O (run through scripts/crash-test.sh).

Each cycle: `cryptvol serve` a thin and a thick volume (with a control socket),
run crashclient.py against both (two connections each), and kill -9 the daemon
once the clients have made a random amount of progress; in some variants the
kill lands during an online re-encryption or a served snapshot, or the daemon
is killed and then an offline rekey or resize of the crashed volume is killed
too. Then restart the daemon (the headers must open), verify every block of
both volumes against the clients' journals, stop the daemon cleanly and run
`cryptvol check` on both files.

Exit status: 0 when every cycle passed; 1 on the first failure (its files are
kept in the work directory); 2 when the run could not start.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT = os.path.join(HERE, "crashclient.py")
PYTHON = "/usr/bin/python3"
VARIANTS = ["plain", "reencrypt", "snapshot", "rekey", "resize"]
VOLUMES = ["thin", "thick"]
SIZE = "16M"
CONNS = "2"
WAIT = 300  # seconds: a failure bound only, every wait is on an event
REKEY_POINTS = ["after-unwrap", "after-wrap", "header-copy-1-torn", "header-copy-1",
                "header-copy-2-torn", "header-copy-2"]
RESIZE_POINTS = ["resize-after-extend", "resize-before-header", "header-copy-1-torn",
                 "header-copy-1", "header-copy-2"]


class CycleFailure(Exception):
    pass


def read_text(path):
    with open(path) as f:
        return f.read()


def wait_for(what, predicate, bound=WAIT, poll=0.02):
    deadline = time.monotonic() + bound
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CycleFailure("timed out after %ds waiting for %s" % (bound, what))
        time.sleep(poll)


class Run:
    def __init__(self, binary, work, seed):
        self.bin = binary
        self.work = work
        self.rng = random.Random(seed)
        self.env = dict(os.environ, CRYPTVOL_KEYSTORE=self.path("keys"), RUST_LOG="info")
        self.env.pop("CRYPTVOL_FAULT_INJECTION", None)
        self.env.pop("CRYPTVOL_TEST_CRASH_AT", None)
        self.daemon = None
        self.keys = []
        self.durations = {"rekey": 0.3, "resize": 0.3}
        self.totals = {"acked": 0, "flushes": 0, "blocks_verified": 0}

    def path(self, *parts):
        return os.path.join(self.work, *parts)

    def cv(self, args, check=True, env=None):
        out = subprocess.run([self.bin] + args, env=env or self.env, capture_output=True, text=True)
        if check and out.returncode != 0:
            raise CycleFailure("cryptvol %s failed (%d): %s%s" % (
                " ".join(args), out.returncode, out.stdout, out.stderr))
        return out

    def setup(self):
        for v in VOLUMES:
            os.makedirs(self.path("journal-" + v), exist_ok=True)
            extra = ["--preallocate"] if v == "thick" else []
            self.cv(["create", "--size", SIZE] + extra + [self.vol(v)])
            with open(self.state(v), "w") as f:
                json.dump({"blocks": {}, "next_gen": 1}, f)
        self.keys = [self.slot_key("thin"),
                     json.loads(self.cv(["key", "create", "--json"]).stdout)["key_id"]]

    def vol(self, v):
        return self.path(v + ".vol")

    def state(self, v):
        return self.path(v + ".state.json")

    def info(self, v):
        return json.loads(self.cv(["info", "--json", self.vol(v)]).stdout)

    def slot_key(self, v):
        return self.info(v)["keyslots"][0]["key_id"]

    # --- the daemon -------------------------------------------------------------

    def start_daemon(self, cycle, tag):
        for p in ("nbd.sock", "control.sock"):
            if os.path.exists(self.path(p)):
                os.unlink(self.path(p))
        self.daemon_log = self.path("serve-%d-%s.log" % (cycle, tag))
        args = [self.bin, "serve", "--unix", self.path("nbd.sock"), "--control",
                self.path("control.sock"), "--discard"] + [self.vol(v) for v in VOLUMES]
        with open(self.daemon_log, "w") as log:
            self.daemon = subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL,
                                           stderr=log)

        def ready():
            if self.daemon.poll() is not None:
                raise CycleFailure("serve exited (%s) at start; log %s" % (
                    self.daemon.returncode, self.daemon_log))
            return os.path.exists(self.path("control.sock")) and self.status() is not None
        wait_for("the daemon to answer", ready)

    def status(self):
        out = self.cv(["status", "--json", "--control", self.path("control.sock")], check=False)
        if out.returncode != 0:
            return None
        return {e["name"]: e for e in json.loads(out.stdout)["exports"]}

    def kill_daemon(self):
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait()

    def stop_daemon(self):
        self.daemon.send_signal(signal.SIGTERM)
        try:
            rc = self.daemon.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.kill_daemon()
            raise CycleFailure("serve did not stop on SIGTERM; log %s" % self.daemon_log)
        if rc != 0:
            raise CycleFailure("serve exited %d on SIGTERM; log %s" % (rc, self.daemon_log))

    def uri(self, v):
        return "nbd+unix:///%s?socket=%s" % (v, self.path("nbd.sock"))

    # --- the clients ------------------------------------------------------------

    def start_clients(self, cycle):
        self.clients = {}
        for v in VOLUMES:
            jdir = self.path("journal-" + v)
            for name in os.listdir(jdir):
                os.unlink(os.path.join(jdir, name))
            prog = self.path("progress-" + v)
            if os.path.exists(prog):
                os.unlink(prog)
            with open(self.path("client-%s.out" % v), "w") as out:
                self.clients[v] = subprocess.Popen(
                    [PYTHON, CLIENT, "work", self.uri(v), self.state(v), jdir, prog,
                     "%d-%s" % (cycle, v), CONNS, "--discard"],
                    stdout=out, stderr=subprocess.STDOUT)
        wait_for("both clients to run", lambda: all(
            p[2] == int(CONNS) and p[0] > 0 for p in map(self.progress, VOLUMES)))

    def progress(self, v):
        """(acked, flushes, running connections, done) of the client of `v`."""
        try:
            with open(self.path("progress-" + v)) as f:
                return tuple(int(x) for x in f.read().split())
        except (OSError, ValueError):
            return (0, 0, 0, 0)

    def acked(self):
        return sum(self.progress(v)[0] for v in VOLUMES)

    def wait_acked(self, more):
        goal = self.acked() + more
        for v, c in self.clients.items():
            if c.poll() is not None:
                raise CycleFailure("client of %s ended before the kill" % v)
        wait_for("%d acknowledged requests" % goal, lambda: self.acked() >= goal)

    def end_clients(self):
        for v, c in self.clients.items():
            try:
                rc = c.wait(WAIT)
            except subprocess.TimeoutExpired:
                c.kill()
                raise CycleFailure("client of %s did not notice the dead daemon" % v)
            text = read_text(self.path("client-%s.out" % v))
            if rc != 0:
                raise CycleFailure("client of %s failed: %s" % (v, text))
            acked, flushes = self.progress(v)[:2]
            self.totals["acked"] += acked
            self.totals["flushes"] += flushes

    def verify(self, label):
        figures = {}
        procs = {v: subprocess.Popen([PYTHON, CLIENT, "verify", self.uri(v), self.state(v),
                                      self.path("journal-" + v), "--discard"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for v in VOLUMES}
        for v, p in procs.items():
            out, _ = p.communicate()
            last = out.strip().splitlines()[-1] if out.strip() else ""
            if p.returncode != 0:
                raise CycleFailure("verify %s (%s): %s" % (v, label, out))
            figures[v] = json.loads(last)["figures"]
            self.totals["blocks_verified"] += figures[v]["blocks"]
        # The verified image is flushed and is now the state: later checks demand it.
        for v in VOLUMES:
            jdir = self.path("journal-" + v)
            for name in os.listdir(jdir):
                os.unlink(os.path.join(jdir, name))
        return figures

    # --- the variants: how the kill lands --------------------------------------

    def kill_plain(self, target):
        n = self.rng.randint(20, 600)
        self.wait_acked(n)
        self.kill_daemon()
        return "daemon killed after %d more acked requests" % n

    def kill_reencrypt(self, target):
        self.wait_acked(self.rng.randint(5, 100))
        self.cv(["reencrypt", "--control", self.path("control.sock"), "--no-wait", target])
        frac = self.rng.random()

        def far_enough():
            r = (self.status() or {}).get(target, {}).get("reencrypt")
            if r and (r["finished"] or r["watermark"] >= max(1, frac * r["size"])):
                return r
            return None
        r = wait_for("re-encryption progress", far_enough, poll=0.01)
        self.kill_daemon()
        if r["finished"]:
            return "daemon killed after the re-encryption finished"
        return "daemon killed during re-encryption (watermark %d of %d)" % (r["watermark"], r["size"])

    def kill_snapshot(self, target):
        self.wait_acked(self.rng.randint(5, 100))
        with open(self.path("snapshot.out"), "w") as out:
            snap = subprocess.Popen([self.bin, "snapshot", "create", "--control",
                                     self.path("control.sock"), "--store", self.path("snaps"),
                                     target], env=self.env, stdout=out, stderr=subprocess.STDOUT)
        log = self.daemon_log
        wait_for("the snapshot to start",
                 lambda: snap.poll() is not None or "snapshot started" in read_text(log))
        more = self.rng.randint(0, 150)
        goal = self.acked() + more
        wait_for("progress during the snapshot",
                 lambda: snap.poll() is not None or self.acked() >= goal)
        running = snap.poll() is None and "snapshot completed" not in read_text(log)
        if snap.poll() not in (None, 0):
            raise CycleFailure("snapshot create failed before the kill: %s" % read_text(self.path("snapshot.out")))
        self.kill_daemon()
        try:
            snap.wait(WAIT)
        except subprocess.TimeoutExpired:
            snap.kill()
            raise CycleFailure("snapshot create did not end after the daemon died")
        if running:
            return "daemon killed during a served snapshot (%d acked requests into it)" % more
        return "daemon killed after the snapshot (exit %d)" % snap.returncode

    kill_rekey = kill_plain
    kill_resize = kill_plain

    # --- offline operations killed mid-way ----------------------------------------

    def offline(self, variant, target, use_point):
        if variant == "rekey":
            before = self.slot_key(target)
            after = [k for k in self.keys if k != before][0]
            args = ["rekey", "--to-key", after, self.vol(target)]
            points = REKEY_POINTS
        else:
            before = self.info(target)["size"]
            after = before + (1 << 20)
            args = ["resize", "--size", "+1M", self.vol(target)]
            if target == "thick":
                args.append("--preallocate")
            points = RESIZE_POINTS
        how = self.run_killed(variant, args, points if use_point else None)
        now = self.slot_key(target) if variant == "rekey" else self.info(target)["size"]
        if now not in (before, after):
            raise CycleFailure("%s left %s: %r is neither the old %r nor the new %r" % (
                variant, target, now, before, after))
        return "%s %s; %s" % (variant, how, "old kept" if now == before else "new in place")

    def run_killed(self, variant, args, points):
        env = self.env
        if points:
            point = self.rng.choice(points)
            env = dict(self.env, CRYPTVOL_FAULT_INJECTION="1", CRYPTVOL_TEST_CRASH_AT=point)
        start = time.monotonic()
        proc = subprocess.Popen([self.bin] + args, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if points:
            _, err = proc.communicate()
            if proc.returncode != -signal.SIGKILL:
                raise CycleFailure("%s with crash point %s exited %d, not killed: %s" % (
                    variant, point, proc.returncode, err))
            return "killed at step %s" % point
        # A random moment within the command's usual run time: timing is the point here.
        delay = self.rng.uniform(0, 1.2 * self.durations[variant])
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        if proc.returncode == 0:
            self.durations[variant] = time.monotonic() - start
            return "finished before the kill (%.3fs)" % delay
        if proc.returncode != -signal.SIGKILL:
            raise CycleFailure("%s failed (%d): %s" % (variant, proc.returncode, err))
        return "killed -9 after %.3fs" % delay

    # --- after the crash ----------------------------------------------------------

    def wait_reencrypt_done(self, target):
        def done():
            r = (self.status() or {}).get(target, {}).get("reencrypt")
            if r and r.get("last_error"):
                raise CycleFailure("resumed re-encryption failed: %s" % r["last_error"])
            return (r is None or r["finished"]) and self.info(target)["reencrypt"] is None
        wait_for("the resumed re-encryption to finish", done, poll=0.05)

    def cycle(self, i, variant, target, use_point):
        notes = []
        self.start_daemon(i, "run")
        self.start_clients(i)
        notes.append(getattr(self, "kill_" + variant)(target))
        self.end_clients()
        if variant in ("rekey", "resize"):
            notes.append(self.offline(variant, target, use_point))
        self.start_daemon(i, "restart")
        figs = self.verify("after restart")
        if variant == "reencrypt":
            self.wait_reencrypt_done(target)
            figs = self.verify("after the resumed re-encryption")
            notes.append("resumed re-encryption finished")
        if variant == "snapshot":
            self.cv(["snapshot", "list", "--store", self.path("snaps")])
        self.stop_daemon()
        for v in VOLUMES:
            self.cv(["check", self.vol(v)])
        for v in VOLUMES:
            notes.append("%s: %d data blocks ok, %d newer than the last flush" % (
                v, figs[v]["data_blocks"], figs[v]["newer"]))
        notes.append("check clean")
        return notes

    def cleanup_processes(self):
        procs = [self.daemon] + list(getattr(self, "clients", {}).values())
        for p in procs:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="crash-test.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--short", action="store_true", help="10 cycles: each variant on each volume")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--workdir", default=None, help="default: a new directory under $TMPDIR")
    ap.add_argument("--bin", required=True)
    a = ap.parse_args(argv)
    if a.short:
        a.cycles = len(VARIANTS) * len(VOLUMES)
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(1 << 32)
    return a


def main(argv):
    a = parse_args(argv)
    work = a.workdir or tempfile.mkdtemp(prefix="cryptvol-crash-")
    os.makedirs(work, exist_ok=True)
    run = Run(a.bin, work, a.seed)
    print("crash-test: %d cycles, seed %d, binary %s, work dir %s" % (a.cycles, a.seed, a.bin, work))
    started = time.monotonic()
    tally = {v: 0 for v in VARIANTS}
    landed = {"reencrypt": 0, "snapshot": 0, "rekey": 0, "resize": 0}
    failed = 0
    try:
        run.setup()
    except CycleFailure as e:
        print("crash-test: setup failed: %s" % e)
        return 2
    for i in range(a.cycles):
        variant = VARIANTS[i % len(VARIANTS)]
        target = VOLUMES[(i // len(VARIANTS)) % len(VOLUMES)]
        use_point = (i // (len(VARIANTS) * len(VOLUMES))) % 2 == 1 or a.short and target == "thick"
        t0 = time.monotonic()
        try:
            notes = run.cycle(i, variant, target, use_point)
        except CycleFailure as e:
            run.cleanup_processes()
            failed += 1
            print("cycle %d/%d %s %s: FAIL %s" % (i + 1, a.cycles, variant, target, e))
            break
        tally[variant] += 1
        text = "; ".join(notes)
        if variant in landed and ("during" in text or "killed at step" in text
                                  or "killed -9" in text):
            landed[variant] += 1
        print("cycle %d/%d %s %s: OK %.1fs: %s" % (
            i + 1, a.cycles, variant, target, time.monotonic() - t0, text), flush=True)
    secs = time.monotonic() - started
    done = sum(tally.values())
    print("crash-test tally: cycles=%d passed=%d failed=%d %s landed-mid: %s seconds=%d seed=%d" % (
        done + failed, done, failed, " ".join("%s=%d" % kv for kv in tally.items()),
        " ".join("%s=%d" % kv for kv in landed.items()), secs, a.seed))
    print("crash-test figures: %d requests acknowledged, %d flushes completed, %d block reads verified"
          % (run.totals["acked"], run.totals["flushes"], run.totals["blocks_verified"]))
    if failed:
        print("crash-test: FAILED; files kept in %s" % work)
        return 1
    if not a.workdir:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
