#!/usr/bin/env python3
"""Socket activation stand-in for the kernel test (what systemd does with cryptvol.socket).

Usage: socket-holder.py PORT CONTROL_FIFO STATUS_FILE BIN ARGS...

Binds 127.0.0.1:PORT once and keeps it listening for its whole life; runs `BIN ARGS...`
with the socket as fd 3 and LISTEN_FDS=1, LISTEN_PID=<its pid>. Lines on CONTROL_FIFO:

    restart NEWBIN   SIGTERM the daemon, wait for it, start NEWBIN with the same ARGS
                     (NEWBIN may be another file: the "upgrade")
    stop             SIGTERM the daemon and exit

After each action one line goes to STATUS_FILE, e.g.
    restarted 3 stop_status=0 stop_secs=0.41 bin=/path pid=1234
Connections that arrive while no daemon runs wait in the listen backlog.
"""
import os
import socket
import sys
import time


def start(sock, binary, args):
    pid = os.fork()
    if pid == 0:
        os.dup2(sock.fileno(), 3)
        os.set_inheritable(3, True)
        env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
        env.pop("LISTEN_FDNAMES", None)
        try:
            os.execve(binary, [binary] + args, env)
        finally:
            os._exit(127)
    return pid


def stop(pid):
    t0 = time.monotonic()
    os.kill(pid, 15)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), time.monotonic() - t0


def main():
    port, fifo, status_file, binary = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    args = sys.argv[5:]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(port)))
    sock.listen(128)
    pid = start(sock, binary, args)
    with open(status_file, "a") as st:
        st.write(f"started 0 bin={binary} pid={pid}\n")
    n = 0
    while True:
        with open(fifo) as f:
            for line in f:
                cmd = line.split()
                if not cmd:
                    continue
                code, secs = stop(pid)
                if cmd[0] == "stop":
                    with open(status_file, "a") as st:
                        st.write(f"stopped stop_status={code} stop_secs={secs:.2f}\n")
                    return
                n += 1
                binary = cmd[1] if len(cmd) > 1 else binary
                pid = start(sock, binary, args)
                with open(status_file, "a") as st:
                    st.write(f"restarted {n} stop_status={code} stop_secs={secs:.2f} bin={binary} pid={pid}\n")


if __name__ == "__main__":
    main()
