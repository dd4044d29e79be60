"""Helpers for migration tests: a source and a destination plugin on loopback,
the migrate control operation, waiting for phases, and the verifying writer
(client-tools/lm-workload) run as a hypervisor would run its guest."""

import json
import os
import subprocess
import time

import lmtest
from lmtest import MiB, Server


def workload_path():
    build = os.environ.get("LIVEMIG_BUILD_DIR", "build")
    p = os.path.join(build, "client-tools", "lm-workload")
    if not os.path.isfile(p):
        raise RuntimeError(f"lm-workload not found at {p}; build the lm-workload target")
    return p


def peer_port(server):
    return server.control({"op": "status"})["peer_port"]


class Pair:
    """A source plugin on a fresh image (data_len bytes of data, then a hole)
    and a destination plugin on a missing image, both stopped on exit:

        with mig.Pair(SIZE, DATA) as (src, dst, src_image, dst_image, data):

    fixed_ports=True: each listens on a port chosen now rather than by the
    kernel, so a plugin restarted with restart() comes back on the address
    its peer knows."""

    def __init__(self, size, data_len, fixed_ports=False, **keys):
        self.size, self.data_len, self.keys = size, data_len, keys
        self.fixed_ports = fixed_ports
        self.servers = []

    def listen(self):
        return f"127.0.0.1:{free_port() if self.fixed_ports else 0}"

    def __enter__(self):
        src_image, data = make_source_image(self.size, self.data_len)
        dst_image = os.path.join(lmtest.tmp_dir("dst"), "dst.img")  # missing: takes the source's size
        src = Server(control=True, image=src_image, listen=self.listen(), **self.keys)
        self.servers.append(src)
        src.start()
        dst = Server(control=True, image=dst_image, listen=self.listen(), **self.keys)
        self.servers.append(dst)
        dst.start()
        return src, dst, src_image, dst_image, data

    def __exit__(self, *exc):
        for server in self.servers:
            server.stop()
        return False


def migrate(src, dst, mode, **params):
    req = {"op": "migrate", "mode": mode,
           "to": f"127.0.0.1:{peer_port(dst)}", "from": f"127.0.0.1:{peer_port(src)}"}
    req.update(params)
    reply = src.control(req)
    if not reply.get("ok"):
        raise AssertionError(f"migrate refused: {reply}")
    return reply


def free_port():
    """A TCP port on loopback that nothing listens on now (for a plugin that
    must come back on the same address after a restart)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def restart(server, env=None):
    """Starts a server again after it died (kill -9, a crash point): same
    image, state file and keys; `env` replaces its test hooks."""
    if server.alive():
        server.kill(__import__("signal").SIGKILL)
    lmtest._live.pop(server.proc.pid, None)
    if os.path.exists(server.sock):
        os.unlink(server.sock)  # nbdkit does not replace a stale socket
    if env is not None:
        server.env = dict(env)
    server.start()
    return server


def status(server):
    return server.control({"op": "status"})


def wait_phase(server, phases, timeout=60.0):
    """Waits until the server's phase is one of `phases`; returns the status."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(server)
        if st["phase"] in phases:
            return st
        if st["phase"] == "Failed" and "Failed" not in phases:
            raise AssertionError(f"migration failed: {json.dumps(st.get('migration', st))}")
        if time.monotonic() > deadline:
            raise AssertionError(f"phase still {st['phase']} after {timeout}s, wanted {phases}: "
                                 f"{json.dumps(st.get('migration', {}))}")
        time.sleep(0.05)


def wait_ready(server, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        st = status(server)
        if st.get("migration", {}).get("ready"):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"source not ready after {timeout}s: {json.dumps(st)}")
        time.sleep(0.05)


class Writer:
    """lm-workload write in the background; switch() moves it to another
    server the way a hypervisor does at handover."""

    def __init__(self, uri, region, journal, rate=0, duration=None, count=None, extra=()):
        self.dir = lmtest.tmp_dir("writer")
        self.journal = journal
        self.switch_file = os.path.join(self.dir, "switch")
        self.log_path = os.path.join(self.dir, "writer.log")
        argv = [workload_path(), "write", "--uri", uri, "--journal", journal, "--region", region,
                "--pattern", "random", "--rate", str(rate), "--switch-file", self.switch_file,
                "--queue-depth", "8", "--seed", "42", "--stats-interval", "0", "--overwrite", *extra]
        if duration is not None:
            argv += ["--duration", str(duration)]
        if count is not None:
            argv += ["--count", str(count)]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        lmtest._live[self.proc.pid] = self.proc

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def switch(self, uri):
        tmp = self.switch_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(uri + "\n")
        os.rename(tmp, self.switch_file)

    def wait(self, timeout=120):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            lmtest._kill(self.proc)
            raise AssertionError(f"writer did not finish in {timeout}s:\n{self.log()}")
        lmtest._live.pop(self.proc.pid, None)
        self._log.close()
        return rc


def writer_across_handover(src, dst, region, initial, mode="auto", **params):
    """Migrates src -> dst (handover auto) while lm-workload writes to
    `region` of the source, moves the writer to the destination at handover
    as a hypervisor would, and checks every acknowledged write there
    (verify --initial `initial`). Returns (the migrate reply, the source's
    status, the destination's status) once both are Done."""
    journal = os.path.join(lmtest.tmp_dir("j"), "journal")
    writer = Writer(src.uri, region, journal, duration=5, extra=["--flush-every", "64"])
    reply = migrate(src, dst, mode, handover="auto", **params)
    wait_phase(src, ["PostCopy", "Done"], timeout=60)
    writer.switch(dst.uri)
    assert writer.wait() == 0, writer.log()
    st_src = wait_phase(src, ["Done"], timeout=120)
    st_dst = wait_phase(dst, ["Done"], timeout=120)
    rc, out = verify_journal(dst.uri, journal, "--region", region, "--initial", initial)
    assert rc == 0, f"the destination lost acknowledged writes:\n{out}"
    return reply, st_src, st_dst


def verify_journal(uri, journal, *extra):
    """lm-workload verify; returns (exit code, output)."""
    p = subprocess.run([workload_path(), "verify", "--uri", uri, "--journal", journal, *extra],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    return p.returncode, p.stdout.decode(errors="replace")


def make_source_image(size, data_len, seed=7, dir=None):
    """An image whose first data_len bytes are pseudo-random data and the rest
    a hole (in a new temporary directory, or in dir). Returns (path, the data)."""
    rnd = __import__("random").Random(seed)
    data = rnd.randbytes(data_len)
    path = lmtest.make_image(size, name="src.img", dir=dir or lmtest.tmp_dir("src"), data=data)
    return path, data
