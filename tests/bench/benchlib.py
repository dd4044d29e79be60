"""Shared pieces of the Python benchmarks in tests/bench (migration, modes):
processes stopped by PID on any exit, the two-host test bed
(deploy/testbed.sh), nbdkit with livemig.so in a namespace and its control
socket, fio runs and their JSON, sparse images, status polling.

Python stdlib only. A bench calls set_prog() and install_cleanup() first.
Every process started through spawn() is stopped by PID on exit, error,
Ctrl-C, SIGTERM or SIGHUP; the test bed named in testbed_up() is taken down
(deploy/testbed.sh down) and the paths added to cleanup_paths are removed.
"""

import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", ".."))
TESTBED = os.path.join(REPO, "deploy", "testbed.sh")
KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3
PEER_PORT = 10809
POLL = 0.05          # seconds between status polls

_prog = "bench"


def set_prog(name):
    global _prog
    _prog = name


def log(msg):
    print(f"{_prog}: {msg}", file=sys.stderr, flush=True)


def die(msg):
    log(msg)
    sys.exit(1)


def parse_size(s):
    s = s.strip()
    mult = {"K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}
    if s and s[-1].upper() in mult:
        return int(float(s[:-1]) * mult[s[-1].upper()])
    return int(s)


# --------------------------------------------------------------------------
# Processes we start; all stopped by PID on any exit

_procs = {}          # pid -> Popen
_testbed_name = None
cleanup_paths = []


def stop(proc, sig=signal.SIGTERM, timeout=10):
    """Stops one child by PID (sig, then SIGKILL after timeout) and reaps it."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"PID {proc.pid} ({proc.args[0] if proc.args else '?'}) ignored signal {sig} "
                f"for {timeout} s: SIGKILL")
            proc.kill()
            proc.wait()
    _procs.pop(proc.pid, None)
    return proc.returncode


def forget(proc):
    _procs.pop(proc.pid, None)


def cleanup():
    for p in list(_procs.values()):
        stop(p, timeout=5)
    if _testbed_name:
        subprocess.run([TESTBED, "down", "--name", _testbed_name], stdout=subprocess.DEVNULL, check=False)
    for p in cleanup_paths:
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _on_signal(signum, frame):
    log(f"stopped by signal {signum}; cleaning up")
    raise SystemExit(128 + signum)


def install_cleanup():
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)


def spawn(argv, out_path):
    f = open(out_path, "wb")
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    f.close()
    _procs[p.pid] = p
    return p


# --------------------------------------------------------------------------
# The plugin

def control(path, obj, timeout=130):
    """One JSON request on a fresh connection to a control socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps(obj).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(1 << 20)
            if not chunk:
                raise RuntimeError(f"control socket {path} closed without a reply to {obj}")
            buf += chunk
        return json.loads(buf.split(b"\n", 1)[0])
    finally:
        s.close()


class Plugin:
    """nbdkit with livemig.so in a network namespace (ip netns exec execs,
    so the PID is nbdkit's). args needs .work, .logs and .plugin."""

    def __init__(self, args, ns, addr, image, tag, secret, extra=()):
        self.dir = os.path.join(args.work, tag)
        os.makedirs(self.dir, exist_ok=True)
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.ctl = os.path.join(self.dir, "control.sock")
        self.pidfile = os.path.join(self.dir, "nbdkit.pid")
        self.log = os.path.join(args.logs, f"{tag}.nbdkit.log")
        self.image = image
        argv = ["ip", "netns", "exec", ns, "nbdkit", "-f", "--exit-with-parent", "-U", self.sock,
                "--pidfile", self.pidfile, args.plugin, f"image={image}", f"control={self.ctl}",
                f"listen={addr}:{PEER_PORT}", f"secret={secret}", *extra]
        self.proc = spawn(argv, self.log)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                die(f"nbdkit exited with {self.proc.returncode} during start-up:\n{open(self.log).read()}")
            try:
                with open(self.pidfile) as f:
                    if f.read().strip() == str(self.proc.pid):
                        break
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                die(f"nbdkit not ready after 20 s: {self.log}")
            time.sleep(0.02)

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def control(self, obj):
        return control(self.ctl, obj)

    def status(self):
        return self.control({"op": "status"})

    def stop(self):
        stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def write_secret(path):
    """A 32-byte pre-shared key, mode 0600 (no trailing newline byte)."""
    key = bytearray(os.urandom(32))
    while key[-1] in (10, 13):
        key[-1] = os.urandom(1)[0]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)


# --------------------------------------------------------------------------
# fio

class Fio:
    """One fio run (nbd engine through a Unix socket) with the options given;
    JSON output to DIR/raw/TAG.fio.json (args needs .raw and .logs).
    time_based=False: runtime only caps the run (e.g. a loops= job)."""

    def __init__(self, args, uri, tag, options, runtime, ramp=0, time_based=True):
        self.json_path = os.path.join(args.raw, f"{tag}.fio.json")
        self.log_path = os.path.join(args.logs, f"{tag}.fio.log")
        argv = ["fio", f"--name={tag}", "--ioengine=nbd", f"--uri={uri}", *options,
                *(["--time_based"] if time_based else []), f"--runtime={runtime}", "--output-format=json",
                f"--output={self.json_path}"]
        if ramp:
            argv.append(f"--ramp_time={ramp}")
        self.argv = argv
        self.started = time.monotonic()
        self.proc = spawn(argv, self.log_path)
        self.ended = None

    def running(self):
        if self.proc.poll() is None:
            return True
        if self.ended is None:
            self.ended = time.monotonic()
        return False

    def interrupt(self):
        """Stops fio as a user would (SIGINT: it ends its jobs and writes its report)."""
        if self.running():
            stop(self.proc, signal.SIGINT, timeout=20)
        self.running()
        forget(self.proc)

    def wait(self, timeout):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.interrupt()
        self.running()
        forget(self.proc)

    def json(self):
        return load_fio_json(self.json_path)


def load_fio_json(path):
    """fio's JSON report, or None (missing, or fio stopped before writing it)."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    # fio prints notes ("fio: terminating on signal 2") before the JSON.
    start = text.find("\n{")
    text = text[start + 1:] if not text.startswith("{") and start >= 0 else text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


# --------------------------------------------------------------------------
# The test bed

def tc_bytes(ns, dev):
    p = subprocess.run(["ip", "netns", "exec", ns, "tc", "-s", "-j", "qdisc", "show", "dev", dev],
                       stdout=subprocess.PIPE, check=True)
    return sum(q.get("bytes", 0) for q in json.loads(p.stdout or b"[]") if q.get("root"))


def testbed_up(name, rate, subnet=None):
    """deploy/testbed.sh up; returns its LM_TB_* assignments. The test bed is
    taken down on exit."""
    global _testbed_name
    _testbed_name = name
    subnet = os.getpid() % 256 if subnet is None else subnet
    p = subprocess.run([TESTBED, "up", "--name", name, "--rate", rate, "--subnet", str(subnet),
                        "--print-env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if p.returncode != 0:
        die(f"testbed.sh up failed:\n{p.stderr.decode(errors='replace')}")
    env = dict(line.split("=", 1) for line in p.stdout.decode().splitlines() if "=" in line)
    return env


# --------------------------------------------------------------------------
# Images

def make_pristine(path, size, data):
    """A sparse image of `size` bytes with `data` bytes of random data in
    1 MiB pieces spread evenly over it, holes between them."""
    piece = MiB
    n = data // piece
    stride = size // n if n else size
    rnd = random.Random(1)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(n):
            f.seek(i * stride)
            f.write(rnd.randbytes(piece))
        f.flush()
        os.fsync(f.fileno())


def allocated_bytes(path):
    total, off = 0, 0
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        while off < size:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            total += h - d
            off = h
    return total


def fresh_copy(args, name, pristine=None):
    path = os.path.join(args.work, name)
    subprocess.run(["cp", "--sparse=always", pristine or args.pristine, path], check=True)
    return path


def remove_image(path):
    """The image and the state file the plugin keeps beside it."""
    for p in (path, path + ".livemig-state"):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------
# Status polling

def wait_for(pred, timeout, what, samples=None, servers=()):
    """Polls the servers' status every POLL s until pred(*statuses) holds;
    dies on Failed/Cancelled or after timeout. samples: a list that gets one
    timeline entry per server and poll."""
    deadline = time.monotonic() + timeout
    while True:
        sts = [s.status() for s in servers]
        if samples is not None:
            t = time.monotonic()
            for role, st in zip(("src", "dst"), sts):
                m = st.get("migration", {})
                samples.append({"t": round(t, 3), "side": role, "phase": st["phase"],
                                "blocks_left": m.get("blocks_left"), "wire_bytes": m.get("wire_bytes"),
                                "rounds": m.get("rounds"), "blocks_dirtied": m.get("blocks_dirtied"),
                                "ready": m.get("ready")})
        r = pred(*sts)
        if r:
            return sts
        for st in sts:
            if st["phase"] in ("Failed", "Cancelled"):
                die(f"migration {st['phase']} while waiting for {what}: {json.dumps(st)}")
        if time.monotonic() > deadline:
            die(f"timed out after {timeout} s waiting for {what}: {json.dumps(sts)}")
        time.sleep(POLL)


# --------------------------------------------------------------------------
# Report helpers

def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
