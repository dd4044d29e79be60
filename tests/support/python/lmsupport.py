"""What livemig's integration tests (tests/integration) and benchmarks
(tests/bench) both need, in one place: the nbdkit command line and its
readiness check, key files, a file's allocated bytes, and a QMP client.

Python stdlib only (the benchmarks run without libnbd's binding). Both sides
put this directory on sys.path themselves (tests/integration/lmtest.py,
tests/bench/benchlib.py), so their scripts run without PYTHONPATH.
"""

import json
import os
import socket
import threading
import time


# --------------------------------------------------------------------------
# Loopback servers a test plays the peer with

def serve_loopback(handle):
    """A TCP listener on 127.0.0.1 that calls handle(connection) on a thread
    of its own for each connection it accepts; returns the listening socket
    (close it to stop accepting; the port is .getsockname()[1])."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept_loop():
        while True:
            try:
                c, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(c,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    return listener


# --------------------------------------------------------------------------
# nbdkit

def key_args(keys):
    """key=value arguments of a plugin: None values are left out, True/False
    become true/false."""
    args = []
    for k, v in keys.items():
        if v is None:
            continue
        if isinstance(v, bool):
            v = "true" if v else "false"
        args.append(f"{k}={v}")
    return args


def nbdkit_argv(plugin, plugin_args, sock=None, pidfile=None, nbdkit="nbdkit", foreground=True, nbdkit_args=(),
                ns=None):
    """The command line of one nbdkit serving `plugin` (a path or a name such
    as "file") with `plugin_args`: on Unix socket `sock` (unless nbdkit_args
    say where), writing `pidfile`, in the foreground with --exit-with-parent
    unless foreground=False. ns: run it in that network namespace (`ip netns
    exec` execs, so the PID is nbdkit's own)."""
    argv = [nbdkit, *(["-f", "--exit-with-parent"] if foreground else []),
            *(["-U", sock] if sock else []), *(["--pidfile", pidfile] if pidfile else []),
            *nbdkit_args, plugin, *plugin_args]
    return ["ip", "netns", "exec", ns, *argv] if ns else argv


def wait_for_pidfile(proc, pidfile, timeout):
    """Waits until nbdkit (Popen-like `proc`) has written its own PID into
    `pidfile`, which it does once it accepts connections (after the plugin's
    .get_ready). Waiting for it rather than probing the socket keeps nbdkit's
    log free of handshake errors. Returns None when ready, else why not:
    "exited with status N" or "not ready within T s"."""
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            return f"exited with status {rc}"
        try:
            with open(pidfile) as f:
                if f.read().strip() == str(proc.pid):
                    return None
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            return f"not ready within {timeout} s"
        time.sleep(0.01)


# --------------------------------------------------------------------------
# Key files

def write_secret(path):
    """32 random bytes in a new file of mode 0600: a peer link's pre-shared
    key. The plugin drops one trailing newline from a key file, so the last
    byte is never CR or LF."""
    key = bytearray(os.urandom(32))
    while key[-1] in (0x0a, 0x0d):
        key[-1] = os.urandom(1)[0]
    _write_private(path, bytes(key))
    return path


def write_tls_psk(path, identity):
    """A TLS pre-shared key file in nbdkit's --tls-psk format (one
    "IDENTITY:HEX" line), mode 0600."""
    _write_private(path, f"{identity}:{os.urandom(32).hex()}\n".encode())
    return path


def _write_private(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# --------------------------------------------------------------------------
# Images

def allocated_bytes(path):
    """Bytes in data extents (SEEK_DATA/SEEK_HOLE), as a copier that skips
    holes sees them."""
    total = 0
    with open(path, "rb") as f:
        fd, size, off = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            total += hole - data
            off = hole
    return total


# --------------------------------------------------------------------------
# QEMU's monitor

class Qmp:
    """A QMP client on a Unix socket (QEMU's or qemu-storage-daemon's
    monitor). Connecting waits up to `timeout` s for the socket; each reply
    up to `reply_timeout` s. Events that arrive are kept in .events as
    (time.time(), event dict)."""

    def __init__(self, path, timeout=20, reply_timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no QMP monitor at {path} after {timeout} s")
                time.sleep(0.05)
        self.sock.settimeout(reply_timeout)
        self.buf = b""
        self.events = []
        if "QMP" not in self._line():
            raise RuntimeError(f"no QMP greeting at {path}")
        self.execute("qmp_capabilities")

    def _line(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP monitor closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, cmd, **arguments):
        """Runs one command; returns its "return", raises RuntimeError on "error"."""
        msg = {"execute": cmd}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._line()
            if "event" in r:
                self.events.append((time.time(), r))
            elif "error" in r:
                raise RuntimeError(f"QMP {cmd}: {r['error'].get('desc', r['error'])}")
            elif "return" in r:
                return r["return"]

    def event(self, name):
        """The first event called name seen so far: (time, event) or None."""
        return next(((t, e) for t, e in self.events if e["event"] == name), None)

    def close(self):
        self.sock.close()
