"""Helpers for livemigd's integration tests: the daemon as a child process
(killed by PID, also on failure: it is registered with lmtest's cleanup),
exports (a source plugin with data and a destination plugin on a missing
image, both on loopback TCP), and migrate-nbd's daemon subcommands.

    with Livemigd(max_concurrent=2) as d:
        ex = Export(16 * MiB)
        d.submit(ex, "precopy", "--handover", "auto")
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import time

import lmtest
import migration as mig
from lmtest import MiB, Server


def build_dir():
    return os.environ.get("LIVEMIG_BUILD_DIR", "build")


def binary(*parts):
    p = os.path.join(build_dir(), *parts)
    if not os.path.isfile(p):
        raise RuntimeError(f"{p} not found; build it first")
    return p


def migrate_nbd(*args, timeout=120):
    """Runs migrate-nbd; returns the CompletedProcess (text)."""
    return subprocess.run([binary("client-tools", "migrate-nbd"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


free_port = mig.free_port


class Export:
    """An image served by a source plugin, and a destination plugin for it.
    `port`/`dst_port` fix the peer ports (so that a restarted plugin comes
    back on the same address); 0 lets the kernel choose."""

    def __init__(self, size=16 * MiB, data_len=None, port=0, dst_port=0, **keys):
        self.size = size
        self.src_image, self.data = mig.make_source_image(size, data_len or size)
        self.dst_image = os.path.join(lmtest.tmp_dir("dst"), "dst.img")
        self.keys = keys
        self.src = Server(control=True, image=self.src_image, listen=f"127.0.0.1:{port}", **keys).start()
        self.dst = self.start_destination(dst_port)

    def start_destination(self, port=0):
        self.dst = Server(control=True, image=self.dst_image, listen=f"127.0.0.1:{port}", **self.keys).start()
        self.to = f"127.0.0.1:{mig.peer_port(self.dst)}"
        return self.dst

    @property
    def source(self):
        return f"127.0.0.1:{mig.peer_port(self.src)}"

    def stop(self):
        for s in (self.src, self.dst):
            if s.proc is not None and s.alive():
                try:
                    os.kill(s.pid, signal.SIGCONT)  # a stopped nbdkit cannot take SIGTERM
                except ProcessLookupError:
                    pass
            s.stop()

    def assert_copied(self):
        """The destination image equals the source image byte for byte."""
        lmtest.assert_same(lmtest.read_file(self.dst_image), lmtest.read_file(self.src_image), "destination image")


@contextlib.contextmanager
def exports(n, size):
    """n Exports of `size` bytes, stopped on exit (also on failure)."""
    made = []
    try:
        for _ in range(n):
            made.append(Export(size))
        yield made
    finally:
        for ex in made:
            ex.stop()


class Livemigd:
    """livemigd on a database and socket in a temp dir. Options are its long
    options with _ for -, e.g. max_concurrent=2, host_bandwidth="8M"."""

    def __init__(self, db=None, **opts):
        self.dir = lmtest.tmp_dir("livemigd")
        self.db = db or os.path.join(self.dir, "livemigd.db")
        self.sock = os.path.join(self.dir, "livemigd.sock")
        self.opts = {"heartbeat_interval": 0.5, "heartbeat_timeout": 3, "retry_delay": 1}
        self.opts.update(opts)
        self.proc = None
        self.log_path = os.path.join(self.dir, "livemigd.log")

    def argv(self):
        args = [binary("server", "livemigd"), "--database", self.db, "--socket", self.sock]
        for k, v in self.opts.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        return args

    def start(self):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        lmtest._live[self.proc.pid] = self.proc
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"livemigd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.request({"op": "status"})
                return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"livemigd did not answer on {self.sock} within 10 s:\n{self.log()}")
            time.sleep(0.05)

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self):
        if self.proc is not None:
            lmtest._kill(self.proc)
            self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def kill9(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        lmtest._live.pop(self.proc.pid, None)
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def request(self, obj):
        with lmtest.ControlClient(self.sock) as c:
            return c.request(obj)

    def cli(self, *args, timeout=120):
        """migrate-nbd SUBCOMMAND --daemon SOCK ARGS..."""
        return migrate_nbd(args[0], "--daemon", self.sock, *args[1:], timeout=timeout)

    def submit(self, ex, mode="precopy", *args):
        r = self.cli("submit", "--json", "--from", ex.source, "--to", ex.to, "--mode", mode, *args)
        if r.returncode != 0:
            raise AssertionError(f"submit failed ({r.returncode}): {r.stderr}\n{self.log()}")
        return json.loads(r.stdout)["task"]["id"]

    def task(self, task_id):
        reply = self.request({"op": "show", "id": task_id})
        assert reply.get("ok"), reply
        return reply["task"]

    def wait_state(self, task_id, states, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            t = self.task(task_id)
            if t["state"] in states:
                return t
            if t["state"] in ("done", "failed", "cancelled"):
                raise AssertionError(f"task {task_id} ended {t['state']}, wanted {states}: {json.dumps(t)}\n"
                                     f"{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"task {task_id} still {t['state']} after {timeout}s: {json.dumps(t)}\n"
                                     f"{self.log()}")
            time.sleep(0.1)


def active_phase(server):
    try:
        return mig.status(server)["phase"] in ("Monitoring", "PreCopy", "Sync", "Handover", "PostCopy")
    except OSError:
        return False
