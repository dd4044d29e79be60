"""The fault matrix of issue #12: one migration per run between two livemig
plugins in two network namespaces, a verifying writer on the source that
follows the handover like a hypervisor, exactly one fault injected at a
random moment, then the outcome checks of docs/handover.md. tests/faults/run
is the command; this module is the case table, one run, and its checks.

Each run (Run.execute):
  - a source and a destination nbdkit (livemig.so, peer-timeout=2, a shared
    secret) in the two namespaces of one test bed (deploy/testbed.sh, reused
    by every run of one invocation); the source image is 64 MiB with 32 MiB
    of seeded random data then a hole, the destination image a missing path
    (on a faultfs mount for the disk faults);
  - lm-workload write over 16 MiB..48 MiB of the source (flushes every N
    writes, some FUA), switched to the destination's socket once the
    destination is authoritative, back to the source if the source is;
  - migrate with a random mode and handover policy; with handover=explicit
    the runner calls handover once the source is ready (for post-copy after
    a random delay), again after a handover that did not commit;
  - one fault (CASES), then the checks (Run.settle, Run.teardown):
      1 outcome: within Timing.settle of the fault's end (120 s; --quick 60 s),
        Done at both sides, or the source authoritative and writable
        (none/Failed|Cancelled|Idle/local) with the destination not
        authoritative; then a probe write at the other side is refused or
        lands at the authoritative side (forwarded). Never both
        authoritative (watched all along), never neither;
      2 durable writes: lm-workload verify --durable-only of the journal
        through the authoritative plugin, then on the final image file served
        by a plain `nbdkit file`: 0 mismatches (else LOST WRITES);
      3 untouched blocks: every block the writer did not write equals the
        original image (its data, zeros in the hole), read from the file;
      4 time to writable: from the fault's end (restart, link up, fault
        cleared) until a probe write + flush to the image's last block (not
        data, not the writer's region, excluded from check 3) succeeds at the
        side that says it is authoritative, tried every 100 ms: at most
        TTW_BOUND;
      5 nothing left behind: every nbdkit, writer and faultfs of the run has
        exited (by PID) and both namespaces are empty.

The test bed helpers (Testbed, NsServer, start_pair, link, write_secret,
make_source_image) live in tests/integration/netns_helpers.py, shared with
the integration tests rather than copied.
"""

import contextlib
import ctypes
import fnmatch
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field

import nbd

import faultfs
import lmtest
import migration as mig
import wire
from lmtest import MiB

BLOCK = 4096
PEER_TIMEOUT = 2                       # seconds: a dead peer is noticed within seconds
KEYS = {"peer-timeout": PEER_TIMEOUT}
TTW_BOUND = 4.0 * PEER_TIMEOUT         # seconds from the fault's end to a writable side
PHASE_TIMEOUT = 60.0                   # seconds to reach the phase a fault waits for
WRITER_RETRY = 300                     # lm-workload --retry-timeout: rides through every fault
MODES = ("precopy", "postcopy", "hybrid", "auto")
CRASH_POINTS = ("source-before-fence", "source-after-fence", "source-after-handover-reply",
                "destination-before-commit", "destination-after-presence-synced", "destination-after-commit",
                "destination-after-done")


_netns = None


def netns():
    """tests/integration/netns_helpers.py (imported on first use: it needs
    nothing of a run that only lists the cases)."""
    global _netns
    if _netns is None:
        import netns_helpers
        _netns = netns_helpers
    return _netns


# --------------------------------------------------------------------------
# The matrix

@dataclass(frozen=True)
class Case:
    name: str
    kind: str            # kill, crash, cut, disk-full, fsync, peer-error
    phase: str = ""      # where the fault goes: Monitoring, PreCopy, Sync, Handover, PostCopy
    side: str = ""       # source / destination (kill, crash)
    point: str = ""      # crash point (LIVEMIG_TEST_CRASH_AT)
    modes: tuple = MODES
    handovers: tuple = ("auto", "explicit")
    faultfs: bool = False

    @property
    def describe(self):
        what = {"kill": f"kill -9 of the {self.side} in {self.phase}, restarted after 0-3 s",
                "crash": f"the {self.side} kills itself at {self.point}, restarted without the hook",
                "cut": f"link cut (ip link down) for 1-8 s in {self.phase}"
                       + (" (right after calling handover)" if self.phase == "Handover" else ""),
                "disk-full": f"destination disk full (faultfs space cap) in {self.phase}, cleared after 1-8 s",
                "fsync": f"destination image fsync fails (eio or eio-once) in {self.phase}",
                "peer-error": "a fake destination answers HANDOVER with ERROR"}[self.kind]
        return what


# Modes in which a phase lasts long enough to inject into, and the handover
# policies that keep it (Sync lasts only while an explicit handover waits).
_PHASE_MODES = {
    "Monitoring": (("livefs",), ("auto", "explicit")),
    "PreCopy": (("precopy", "hybrid", "auto"), ("auto", "explicit")),
    "Sync": (("precopy", "hybrid", "auto"), ("explicit",)),
    "PostCopy": (("postcopy",), ("auto", "explicit")),
}


def _cases():
    out = []
    for side in ("source", "destination"):
        for phase in ("Monitoring", "PreCopy", "Sync", "PostCopy"):
            modes, handovers = _PHASE_MODES[phase]
            out.append(Case(f"kill-{side}-{phase.lower()}", "kill", phase, side, modes=modes, handovers=handovers))
    for point in CRASH_POINTS:
        side = point.split("-", 1)[0]
        out.append(Case(f"crash-{point}", "crash", "Handover", side, point))
    for phase in ("PreCopy", "Sync", "Handover", "PostCopy"):
        modes, handovers = _PHASE_MODES.get(phase, (MODES, ("explicit",)))
        out.append(Case(f"cut-{phase.lower()}", "cut", phase, modes=modes, handovers=handovers))
    for phase in ("PreCopy", "PostCopy"):
        modes, handovers = _PHASE_MODES[phase]
        out.append(Case(f"disk-full-{phase.lower()}", "disk-full", phase, modes=modes, handovers=handovers,
                        faultfs=True))
    out.append(Case("fsync-eio-precopy", "fsync", "PreCopy", modes=_PHASE_MODES["PreCopy"][0], faultfs=True))
    out.append(Case("fsync-eio-handover", "fsync", "Handover", handovers=("explicit",), faultfs=True))
    out.append(Case("peer-error-handover", "peer-error", "Handover", modes=("postcopy",)))
    return out


CASES = _cases()


def select_cases(globs):
    """The cases whose names match any of `globs` (all if none), in table order."""
    if not globs:
        return list(CASES)
    picked = [c for c in CASES if any(fnmatch.fnmatchcase(c.name, g) for g in globs)]
    unknown = [g for g in globs if not any(fnmatch.fnmatchcase(c.name, g) for c in CASES)]
    if unknown:
        raise ValueError(f"no case matches {unknown} (see --list)")
    return picked


@dataclass(frozen=True)
class Timing:
    """Random ranges of one profile (seconds unless named otherwise)."""
    name: str
    max_rates_mib: tuple    # migration max_rate choices, MiB/s: how long pre-copy and post-copy last
    restart_delay: tuple
    cut: tuple
    clear_delay: tuple
    monitor_period: tuple
    writer_rates: tuple     # writes/s
    sync_delay: tuple       # in Sync before the fault
    postcopy_handover: tuple  # explicit post-copy: handover this long after migrate
    settle: float           # check 1's bound: seconds from the fault's end to an outcome


FULL = Timing("full", (6, 8, 12), (0, 3), (1, 8), (1, 8), (3, 6), (300, 500, 1000), (0, 2), (0.5, 3), 120.0)
QUICK = Timing("quick", (16,), (0, 1), (1, 3), (0.5, 2), (1.5, 2.5), (500,), (0, 0.5), (0.2, 1), 60.0)


# --------------------------------------------------------------------------
# Small helpers

def side_status(server):
    """The server's status, or None if it does not answer (dead, restarting)."""
    if server is None or not server.alive():
        return None
    try:
        with lmtest.ControlClient(server.control_path, timeout=3) as c:
            return c.request({"op": "status"})
    except (OSError, AssertionError, ValueError):
        return None


def is_dst_authoritative(st):
    return bool(st) and st.get("role") == "destination" and bool(st.get("authoritative"))


def is_src_authoritative(st):
    return bool(st) and bool(st.get("authoritative"))


def brief(st):
    """role/phase/io_mode of a status (or 'down')."""
    if not st:
        return "down"
    s = f"{st.get('role')}/{st.get('phase')}/{st.get('io_mode')}"
    if "needs_resolution" in st:
        s += " (needs resolution)"
    return s


def _aio_wait(h, done, deadline):
    while not done():
        left = deadline - time.monotonic()
        if left <= 0 or h.aio_is_dead() or h.aio_is_closed():
            raise TimeoutError("probe timed out")
        h.poll(int(min(left, 0.1) * 1000) + 1)


def probe_write(uri, payload, offset, timeout=1.0):
    """A write + flush of `payload` at `offset` through a fresh NBD
    connection, within `timeout`; True if both succeeded."""
    return _probe(uri, offset, payload, timeout) is not None


def probe_read(uri, offset, length, timeout=5.0):
    """`length` bytes at `offset` through a fresh NBD connection, or None."""
    return _probe(uri, offset, bytes(length), timeout, write=False)


def _probe(uri, offset, payload, timeout, write=True):
    h = nbd.NBD()
    try:
        deadline = time.monotonic() + timeout
        h.aio_connect_uri(uri)
        _aio_wait(h, h.aio_is_ready, deadline)
        buf = nbd.Buffer.from_bytearray(bytearray(payload))
        c = h.aio_pwrite(buf, offset) if write else h.aio_pread(buf, offset)
        _aio_wait(h, lambda: h.aio_command_completed(c), deadline)
        if write:
            c = h.aio_flush()
            _aio_wait(h, lambda: h.aio_command_completed(c), deadline)
        return bytes(buf.to_bytearray())
    except (nbd.Error, TimeoutError):
        return None
    finally:
        if hasattr(h, "_o"):
            nbd.libnbdmod.close(h._o)
            del h._o


_plugin_help = None


def plugin_knows(key):
    """True if livemig.so's --help lists `key` (e.g. "tls="): the plugin
    under test may predate a key."""
    global _plugin_help
    if _plugin_help is None:
        p = subprocess.run(["nbdkit", lmtest.plugin_path(), "--help"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=30)
        _plugin_help = p.stdout.decode(errors="replace")
    return key in _plugin_help


_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_netns(ns):
    """Runs the block in network namespace `ns` (this thread only): sockets
    made inside stay in it."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            yield
        finally:
            if libc.setns(own, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


def fake_destination(tb, key):
    """wire.FakeDestination listening on the destination's peer address in
    its namespace; it answers HANDOVER with ERROR (the destination refuses)."""

    def refuse(c, f):
        message = "handover refused: fault matrix peer-error"
        c.send(wire.frame(wire.ERROR, struct.pack(">I", wire.INTERNAL) + wire.string(message),
                          request_id=f.request_id))

    real = socket.create_server
    socket.create_server = lambda addr, **kw: real((tb.dst_addr, netns().PEER_PORT), **kw)
    try:
        with in_netns(tb.dst_ns):
            return wire.FakeDestination(key, refuse)
    finally:
        socket.create_server = real


def close_fake(fake, tb):
    """Closes a fake_destination(). One the source never reached still
    waits in accept(), which keeps the port bound: a connection of our own
    ends that first. True if it had to."""
    poked = fake.client is None and fake.thread.is_alive()
    if poked:
        with in_netns(tb.dst_ns), contextlib.suppress(OSError):
            socket.create_connection((tb.dst_addr, netns().PEER_PORT), timeout=2).close()
    fake.close()
    return poked


_MISMATCHED = re.compile(r"checked \d+ blocks .*: (\d+) ok, (\d+) mismatched")


def parse_verify(rc, out):
    """(mismatched blocks, error text or None) from lm-workload verify's output."""
    m = _MISMATCHED.search(out)
    if not m:
        return None, f"verify did not report (exit {rc}): {out.strip()[-400:]}"
    bad = int(m.group(2))
    return bad, (None if rc == 0 and bad == 0 else out.strip()[-1500:])


def verify_file(path, journal, region):
    """lm-workload verify --durable-only against `path` served read-only by
    a plain `nbdkit file`; returns (exit code, output)."""
    cmd = " ".join(shlex.quote(a) for a in [mig.workload_path(), "verify", "--journal", journal,
                                            "--durable-only", "--region", region, "--initial", "any"])
    p = subprocess.run(["nbdkit", "-U", "-", "-r", "file", f"file={path}", "--run", cmd + ' --uri "$uri"'],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    return p.returncode, p.stdout.decode(errors="replace")


def untouched_errors(path, original, region_off, region_len, skip):
    """Blocks of the image file that differ from `original` though the
    writer never wrote them: outside its region, or inside it without
    lm-workload's block magic. Blocks in `skip` are not checked."""
    image = lmtest.read_file(path)
    if len(image) != len(original):
        return [f"image is {len(image)} bytes, not {len(original)}"]
    magic = netns().MAGIC
    bad = []
    step = 1 * MiB
    for chunk in range(0, len(original), step):
        if image[chunk:chunk + step] == original[chunk:chunk + step]:
            continue
        for off in range(chunk, chunk + step, BLOCK):
            blk = image[off:off + BLOCK]
            if off // BLOCK in skip or blk == original[off:off + BLOCK]:
                continue
            if region_off <= off < region_off + region_len and blk.startswith(magic):
                continue
            bad.append(off)
    if not bad:
        return []
    return [f"{len(bad)} untouched blocks differ from the original, first at offsets "
            + ", ".join(str(o) for o in bad[:8])]


def save_backtraces(server):
    """Every thread's stack of a live nbdkit (gdb, if installed), into
    nbdkit.backtrace in its directory: what a stuck plugin waits for."""
    if server is None or not server.alive() or not shutil.which("gdb"):
        return
    with open(os.path.join(server.dir, "nbdkit.backtrace"), "wb") as f:
        subprocess.run(["gdb", "-p", str(server.pid), "-batch", "-ex", "thread apply all bt"],
                       stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, timeout=120, check=False)


def live_pids(pids):
    """Those of `pids` (pid -> name) still running as that program."""
    out = []
    for pid, name in pids.items():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if not lmtest._pid_alive(pid):
                continue
        except FileNotFoundError:
            continue
        if any(name.encode() in a for a in argv[:6]):
            out.append(f"{name} pid {pid}")
    return out


# --------------------------------------------------------------------------
# The supervisor: the hypervisor's side of the pair

class Supervisor(threading.Thread):
    """Polls both plugins every 100 ms and acts like the hypervisor: moves
    the writer to the authoritative side, calls handover when the policy is
    explicit and the source is ready, and runs the time-to-writable probe.
    Watches invariant 1 (never both authoritative) all along."""

    def __init__(self, run):
        super().__init__(daemon=True)
        self.run_ = run
        self.stop_event = threading.Event()
        self.drive_handover = False
        self.handover_not_before = 0.0
        self.handover_thread = None
        self.last_handover_call = 0.0
        self.handover_calls = 0
        self.writer_on = "source"
        self.last = (None, None)
        self.last_brief = (None, None)
        self.saw_needs_resolution = False
        self.unwritable_since = None
        self.max_unwritable = 0.0
        self.error = None

    def run(self):
        try:
            while not self.stop_event.wait(0.1):
                self.tick()
        except Exception:  # reported as a harness error, not lost in the thread
            self.error = traceback.format_exc()

    def stop(self):
        self.stop_event.set()
        self.join(30)
        self.note_writable(True, time.monotonic())
        if self.handover_thread is not None:
            self.handover_thread.join(60)

    def tick(self):
        r = self.run_
        sd = side_status(r.dst)   # the destination first: its authority, once
        ss = side_status(r.src)   # gained, lasts (see check_outcome)
        now = time.monotonic()
        self.last = (ss, sd)
        b = (brief(ss), brief(sd))
        if b != self.last_brief:
            r.event(f"source {b[0]}, destination {b[1]}")
            self.last_brief = b
        if ss and "needs_resolution" in ss:
            self.saw_needs_resolution = True
        dst_auth, src_auth = is_dst_authoritative(sd), is_src_authoritative(ss)
        self.note_writable(dst_auth or src_auth, now)
        if dst_auth and src_auth:
            r.fail("1 outcome", f"BOTH AUTHORITATIVE: source {brief(ss)}, destination {brief(sd)}")
        want = "destination" if dst_auth else "source" if src_auth else None
        if want and want != self.writer_on and r.writer is not None:
            r.writer.switch((r.dst if want == "destination" else r.src).uri)
            r.event(f"writer switched to the {want}")
            self.writer_on = want
        if (self.drive_handover and ss and ss.get("phase") in ("PreCopy", "Sync")
                and ss.get("migration", {}).get("ready") and now >= self.handover_not_before
                and now - self.last_handover_call >= 1.0
                and (self.handover_thread is None or not self.handover_thread.is_alive())):
            self.call_handover()
        if r.probe_from is not None and r.ttw is None:
            for name, server, ok in (("destination", r.dst, dst_auth), ("source", r.src, src_auth)):
                if ok and probe_write(server.uri, r.probe_payload, r.probe_offset):
                    r.ttw = time.monotonic() - r.probe_from
                    r.event(f"probe write accepted by the {name}: time to writable {r.ttw:.2f} s")
                    break

    def note_writable(self, writable, now):
        """Keeps the longest stretch in which no side said it was
        authoritative (a dead side counts as not)."""
        if writable and self.unwritable_since is not None:
            self.max_unwritable = max(self.max_unwritable, now - self.unwritable_since)
            self.unwritable_since = None
        elif not writable and self.unwritable_since is None:
            self.unwritable_since = now

    def call_handover(self):
        r = self.run_
        self.last_handover_call = time.monotonic()
        self.handover_calls += 1
        n = self.handover_calls

        def call():
            try:
                with lmtest.ControlClient(r.src.control_path, timeout=60) as c:
                    reply = c.request({"op": "handover"})
            except Exception as e:  # the source died under the call
                reply = f"no reply ({e})"
            r.event(f"handover #{n}: {reply}")

        r.event(f"handover #{n} called")
        self.handover_thread = threading.Thread(target=call, daemon=True)
        self.handover_thread.start()
        return self.handover_thread


# --------------------------------------------------------------------------
# One run

@dataclass
class Result:
    index: int
    case: str
    seed: int
    mode: str = ""
    handover: str = ""
    outcome: str = "FAILED"   # done / source-writable / FAILED
    ttw: float = None
    unwritable: float = None  # the longest stretch with no authoritative side, as polled
    phase_at_fault: str = ""  # source/destination phase when the fault was injected
    lost: int = 0
    seconds: float = 0.0
    fault: str = ""
    failures: list = field(default_factory=list)
    artifacts: str = ""

    @property
    def failed(self):
        return bool(self.failures)


class Run:
    REGION_OFF, REGION_LEN = 16 * MiB, 32 * MiB

    def __init__(self, index, case, seed, timing, tb, secret):
        self.case, self.seed, self.timing, self.tb, self.secret = case, seed, timing, tb, secret
        self.rng = random.Random(seed)
        self.result = Result(index, case.name, seed)
        self.t0 = time.monotonic()
        self.events = []
        self.src = self.dst = self.writer = self.fs = self.fake = None
        self.sup = None
        self.pids = {}
        self.probe_from = None
        self.ttw = None
        self.size = netns().SIZE
        self.probe_offset = self.size - BLOCK
        self.probe_payload = (b"LMFAULTPROBE %d\n" % seed).ljust(BLOCK, b".")
        self.region = f"{self.REGION_OFF}:{self.REGION_LEN}"
        self.journal = None
        self.fault_end = None
        self.outcome = None
        self._choose()

    # ---- bookkeeping

    def event(self, text):
        line = f"{time.monotonic() - self.t0:8.2f}  {text}"
        self.events.append(line)

    def fail(self, check, text):
        msg = f"[{check}] {text}"
        if msg not in self.result.failures:
            self.result.failures.append(msg)
            self.event("FAIL " + msg)

    def _choose(self):
        """Every random choice of the run but the timings, from its seed."""
        c, t, rng = self.case, self.timing, self.rng
        self.mode = rng.choice(c.modes)
        self.handover = rng.choice(c.handovers)
        self.max_rate = rng.choice(t.max_rates_mib) * MiB
        self.writer_rate = rng.choice(t.writer_rates)
        self.flush_every = rng.choice((16, 64, 256))
        self.fua_every = rng.choice((0, 25, 100))
        self.monitor_period = round(rng.uniform(*t.monitor_period), 2)
        self.result.mode, self.result.handover = self.mode, self.handover

    def seconds_of_data(self):
        """How long a pass over the data takes at max_rate."""
        return netns().DATA / self.max_rate

    def started(self, server):
        self.pids[server.pid] = "nbdkit"

    def restart(self, server, env=None):
        """migration.restart, keeping the last incarnation's stderr."""
        k = 1
        while os.path.exists(f"{server.stderr_path}.{k}"):
            k += 1
        if os.path.exists(server.stderr_path):
            os.rename(server.stderr_path, f"{server.stderr_path}.{k}")
        mig.restart(server, env=env)
        self.started(server)
        self.event(f"restarted ({server.pid})")

    # ---- waiting

    def wait_state(self, pred, what, timeout=PHASE_TIMEOUT):
        """Polls both statuses until pred(src_status, dst_status); returns them."""
        deadline = time.monotonic() + timeout
        while True:
            ss, sd = side_status(self.src), side_status(self.dst)
            if pred(ss, sd):
                return ss, sd
            if time.monotonic() > deadline:
                raise HarnessError(f"{what} not reached in {timeout:.0f} s: source {brief(ss)}, "
                                   f"destination {brief(sd)}")
            time.sleep(0.05)

    def wait_phase(self, phase):
        """Until the fault's phase: the source's for phases before handover,
        the destination's for PostCopy."""
        if phase == "PostCopy":
            return self.wait_state(lambda ss, sd: sd and sd.get("phase") == "PostCopy", "destination PostCopy")
        return self.wait_state(lambda ss, sd: ss and ss.get("phase") == phase, f"source {phase}")

    def wait_ready(self):
        return self.wait_state(lambda ss, sd: ss and ss.get("phase") in ("PreCopy", "Sync")
                               and ss.get("migration", {}).get("ready"), "source ready")

    def sleep(self, lo_hi, scale=1.0):
        d = self.rng.uniform(*lo_hi) * scale
        time.sleep(d)
        return d

    def phase_delay(self, phase):
        """A random delay into `phase` (short enough that it still lasts)."""
        t = self.timing
        if phase == "Monitoring":
            return self.sleep((0.1, 0.7), self.monitor_period)
        if phase in ("PreCopy", "PostCopy"):
            return self.sleep((0.1, 0.5), self.seconds_of_data())
        if phase == "Sync":
            return self.sleep(t.sync_delay)
        return 0.0

    def at_fault(self, what):
        ss, sd = side_status(self.src), side_status(self.dst)
        self.result.fault = f"{what} at source {brief(ss)}, destination {brief(sd)}"
        self.result.phase_at_fault = "/".join(st.get("phase", "?") if st else "down" for st in (ss, sd))
        self.event("FAULT " + self.result.fault)

    def fault_over(self, at=None):
        self.fault_end = at or time.monotonic()
        self.probe_from = self.fault_end
        self.event("fault over")

    # ---- the run

    def execute(self):
        try:
            self.setup()
            self.inject()
            self.settle()
        except HarnessError as e:
            self.fail("harness", str(e))
        except Exception:
            self.fail("harness", traceback.format_exc().strip().splitlines()[-1])
            self.event(traceback.format_exc())
        finally:
            try:
                self.teardown()
            except Exception:
                self.fail("harness", "teardown: " + traceback.format_exc().strip().splitlines()[-1])
                self.event(traceback.format_exc())
        self.result.ttw = self.ttw
        if self.sup is not None:
            self.result.unwritable = self.sup.max_unwritable
        self.result.seconds = time.monotonic() - self.t0
        if not self.result.failures:
            self.result.outcome = self.outcome
        return self.result

    def setup(self):
        n = netns()
        c = self.case
        self.event(f"case {c.name} seed {self.seed} mode {self.mode} handover {self.handover} "
                   f"max_rate {self.max_rate // MiB} MiB/s writer {self.writer_rate}/s "
                   f"flush-every {self.flush_every} fua-every {self.fua_every}")
        n.link(self.tb, "up")
        self.src_image, data = n.make_source_image()
        self.original = data + bytes(self.size - len(data))
        if c.faultfs:
            self.fs = faultfs.FaultFS()
            self.fs.start()
            self.pids[self.fs.pid] = "faultfs"
            self.dst_image = self.fs.path("dst.img")
        else:
            self.dst_image = os.path.join(lmtest.tmp_dir("dst"), "dst.img")
        env = {"LIVEMIG_TEST_CRASH_AT": c.point} if c.kind == "crash" else None
        if c.kind == "peer-error":
            self.fake = self.start_fake()
            # The fake speaks the peer protocol without TLS.
            tls = {"tls": "off"} if plugin_knows("tls=") else {}
            self.src = n.NsServer(self.tb.src_ns, control=True, image=self.src_image,
                                  listen=f"{self.tb.src_addr}:{n.PEER_PORT}", secret=self.secret, **tls,
                                  **KEYS).start()
        else:
            self.src, self.dst = n.start_pair(self.tb, self.src_image, self.dst_image, self.secret, env=env, **KEYS)
            self.started(self.dst)
        self.started(self.src)
        self.journal = os.path.join(lmtest.tmp_dir("journal"), "journal")
        self.writer = mig.Writer(self.src.uri, self.region, self.journal, rate=self.writer_rate,
                                 extra=["--flush-every", str(self.flush_every), "--fua-every", str(self.fua_every),
                                        "--retry-timeout", str(WRITER_RETRY)])
        self.pids[self.writer.proc.pid] = "lm-workload"
        self.sup = Supervisor(self)
        # Before handover phases the fault comes first: the runner's explicit
        # handover waits until it has been injected.
        self.sup.drive_handover = self.handover == "explicit" and (
            c.kind in ("crash", "peer-error") or c.phase == "PostCopy")
        time.sleep(0.3)  # the guest is running before the migration starts
        params = {"handover": self.handover, "max_rate": self.max_rate}
        if self.mode == "livefs":
            params["monitor_period"] = self.monitor_period
        if self.mode == "postcopy" and self.handover == "explicit":
            delay = self.rng.uniform(*(self.timing.postcopy_handover if c.kind != "peer-error" else (0, 0.5)))
            self.sup.handover_not_before = time.monotonic() + delay
        self.sup.start()
        self.migrate_at = time.monotonic()
        try:
            reply = n.migrate(self.tb, self.src, self.mode, **params)
        except AssertionError as e:
            # A source that hands over at once (post-copy, auto) may reach
            # its crash point before it answers.
            if not (c.kind == "crash" and c.side == "source" and self.dies(self.src)):
                raise
            reply = f"no reply, the source crashed ({e})"
        self.event(f"migrate: {reply}")

    def dies(self, server, timeout=5.0):
        """True if `server` is dead or dies within `timeout`."""
        try:
            lmtest.wait_until(lambda: not server.alive(), timeout=timeout, what="nbdkit to die")
        except AssertionError:
            return False
        return True

    def start_fake(self):
        with open(self.secret, "rb") as f:
            key = f.read()
        return fake_destination(self.tb, key)

    def inject(self):
        getattr(self, "inject_" + self.case.kind.replace("-", "_"))()
        self.sup.drive_handover = self.handover == "explicit"

    def inject_kill(self):
        c = self.case
        self.wait_phase(c.phase)
        self.phase_delay(c.phase)
        server = self.src if c.side == "source" else self.dst
        self.at_fault(f"kill -9 {c.side} ({server.pid})")
        server.kill(signal.SIGKILL)
        delay = self.sleep(self.timing.restart_delay)
        self.event(f"restart after {delay:.2f} s")
        self.fault_over()
        self.restart(server)

    def inject_crash(self):
        c = self.case
        server = self.src if c.side == "source" else self.dst
        try:
            lmtest.wait_until(lambda: not server.alive(), timeout=PHASE_TIMEOUT, what=f"the {c.side} to crash")
        except AssertionError:
            raise HarnessError(f"crash point {c.point} never reached in {PHASE_TIMEOUT:.0f} s") from None
        self.at_fault(f"{c.side} crashed at {c.point}")
        delay = self.sleep(self.timing.restart_delay)
        self.event(f"restart without the hook after {delay:.2f} s")
        self.fault_over()
        self.restart(server, env={})

    def inject_cut(self):
        c = self.case
        n = netns()
        # Inside the handover: the cut right after the call, or (the window
        # is a few ms; a Python thread rarely lands in it) right before it,
        # while the source still believes the link is up.
        cut_first = c.phase == "Handover" and self.rng.random() < 0.5
        if c.phase == "Handover":
            self.wait_ready()
            if not cut_first:
                self.sup.call_handover()
                time.sleep(self.rng.uniform(0, 0.01))
        else:
            self.wait_phase(c.phase)
            self.phase_delay(c.phase)
        self.at_fault("link down" + (" (then handover)" if cut_first else ""))
        n.link(self.tb, "down")
        if cut_first:
            time.sleep(self.rng.uniform(0, 0.05))
            self.sup.call_handover()
        try:
            self.sleep(self.timing.cut)
        finally:
            self.fault_over()
            n.link(self.tb, "up")

    def inject_disk_full(self):
        c = self.case
        self.wait_phase(c.phase)
        self.phase_delay(c.phase)
        cap = self.rng.randint(4, 24)
        self.at_fault(f"destination disk full at {cap} MiB")
        self.fs.set_faults(f"space {cap}M\n")
        self.sleep(self.timing.clear_delay)
        self.fs.clear_faults()
        self.fault_over()

    def inject_fsync(self):
        c = self.case
        kind = self.rng.choice(("eio", "eio-once"))
        if c.phase == "Handover":
            self.wait_ready()
        else:
            self.wait_phase(c.phase)
            self.phase_delay(c.phase)
        self.at_fault(f"fsync {kind} path=dst.img")
        self.fs.set_faults(f"fsync {kind} path=dst.img\n")
        if c.phase == "Handover":
            self.sup.call_handover()
        if kind == "eio":
            self.sleep(self.timing.clear_delay)
            self.fs.clear_faults()
        self.fault_over()

    def inject_peer_error(self):
        """The fault is the handover itself: the runner's call (explicit) or
        the source's own (auto, at once in post-copy)."""
        if self.handover == "explicit":
            lmtest.wait_until(lambda: self.sup.handover_calls > 0, timeout=PHASE_TIMEOUT, what="the handover call")
        self.at_fault("the destination answers HANDOVER with ERROR")
        self.fault_over(self.sup.last_handover_call if self.handover == "explicit" else self.migrate_at)

    # ---- the outcome

    def classify(self, ss, sd):
        if ss is None or (self.dst is not None and sd is None):
            return None
        if self.dst is not None and ss.get("phase") == "Done" and sd.get("phase") == "Done" \
                and is_dst_authoritative(sd):
            return "done"
        if (ss.get("role") == "none" and ss.get("phase") in ("Failed", "Cancelled", "Idle")
                and ss.get("io_mode") == "local" and not is_dst_authoritative(sd)):
            return "source-writable"
        return None

    def settle(self):
        """Check 1 (and 4): an outcome within timing.settle of the fault's end."""
        deadline = self.fault_end + self.timing.settle
        self.outcome = None
        while time.monotonic() < deadline:
            ss, sd = side_status(self.src), side_status(self.dst)
            self.outcome = self.classify(ss, sd)
            if self.outcome:
                break
            time.sleep(0.1)
        if not self.outcome:
            for name, st in (("source", ss), ("destination", sd)):
                self.event(f"{name} status: {json.dumps(st)}")
            for server in (self.src, self.dst):
                save_backtraces(server)
            neither = not is_src_authoritative(ss) and not is_dst_authoritative(sd)
            self.fail("1 outcome", ("NO WRITABLE SIDE" if neither else "no outcome")
                      + f" {self.timing.settle:.0f} s after the fault: source {brief(ss)}, "
                      f"destination {brief(sd)}"
                      + (f"; source needs resolution: {ss['needs_resolution'].get('why')}"
                         if ss and "needs_resolution" in ss else ""))
            return
        self.event(f"outcome {self.outcome} after {time.monotonic() - self.fault_end:.2f} s")
        side = "destination" if self.outcome == "done" else "source"
        for what, pred in (("the probe", lambda: self.ttw is not None),
                           (f"the writer to follow the {side}", lambda: self.sup.writer_on == side)):
            try:
                lmtest.wait_until(pred, timeout=30, what=what)
            except AssertionError:
                pass  # reported below
        self.wait_switched(side)
        self.check_other_side(side)
        time.sleep(1.5)  # writes refused before the outcome are retried (backoff <= 1 s) and land
        if self.ttw is None:
            self.fail("4 time to writable", f"no probe write accepted at the {side} within "
                      f"{time.monotonic() - self.fault_end:.1f} s of the fault's end")
        elif self.ttw > TTW_BOUND:
            self.fail("4 time to writable", f"{self.ttw:.2f} s > {TTW_BOUND:.0f} s")

    def check_other_side(self, side):
        """Invariant 1 the other way: the side that is not authoritative
        refuses a write, or (a plugin that forwards writes to the
        authoritative side) the write is there, read through the
        authoritative side. A destination that never got data (none/local)
        is a separate empty disk and is not asked."""
        auth, other, name = ((self.dst, self.src, "source") if side == "destination"
                             else (self.src, self.dst, "destination"))
        st = side_status(other)
        if st is None or (other is self.dst and st.get("role") != "destination"):
            return
        payload = (b"LMFAULTOTHER %d\n" % self.seed).ljust(BLOCK, b",")
        if not probe_write(other.uri, payload, self.probe_offset):
            self.event(f"the {name} ({brief(st)}) refused a write, as it should")
            return
        got = probe_read(auth.uri, self.probe_offset, BLOCK)
        if got != payload:
            self.fail("1 outcome", f"SPLIT BRAIN: the {name} ({brief(st)}) accepted a write that the {side} "
                      f"(authoritative) does not hold: it reads {got[:24] if got else got!r}")
        else:
            self.event(f"the {name} ({brief(st)}) forwarded a write to the {side}")

    def wait_switched(self, side):
        """Until the writer is connected to `side` (its switch file's .done)."""
        if side == "source" and self.sup.writer_on == "source" and not os.path.exists(self.writer.switch_file):
            return
        uri = (self.dst if side == "destination" else self.src).uri
        done = self.writer.switch_file + ".done"

        def switched():
            try:
                with open(done) as f:
                    lines = f.read().splitlines()
            except FileNotFoundError:
                return False
            return bool(lines) and lines[-1] == f"switched {uri}"

        try:
            lmtest.wait_until(switched, timeout=60, what="the writer's switch")
        except AssertionError as e:
            self.fail("2 durable writes", f"{e}: {self.writer.log()[-600:]}")

    # ---- the end: stop, check

    def teardown(self):
        if self.sup is not None:
            self.sup.stop()
            if self.sup.error:
                self.fail("harness", "supervisor: " + self.sup.error.strip().splitlines()[-1])
                self.event(self.sup.error)
        self.stop_writer()
        auth = None
        if self.outcome == "done":
            auth, image = self.dst, self.dst_image
        elif self.outcome == "source-writable":
            auth, image = self.src, self.src_image
        if auth is not None:
            self.check_journal("through the authoritative plugin", *mig.verify_journal(
                auth.uri, self.journal, "--durable-only", "--region", self.region, "--initial", "any"))
        for s in (self.src, self.dst):
            if s is not None:
                s.stop()
        if auth is not None:
            self.check_journal("on the final image (nbdkit file)", *verify_file(image, self.journal, self.region))
            for e in untouched_errors(image, self.original, self.REGION_OFF, self.REGION_LEN,
                                      {self.probe_offset // BLOCK}):
                self.fail("3 untouched blocks", e)
        if self.fake is not None:
            poked = close_fake(self.fake, self.tb)
            if self.fake.error is not None and not poked:
                self.fail("harness", f"fake destination: {self.fake.error!r}")
        if self.fs is not None:
            try:
                self.fs.close()
            except RuntimeError as e:
                self.fail("5 left behind", str(e))
        n = netns()
        n.link(self.tb, "up")
        left = live_pids(self.pids)
        for ns in (self.tb.src_ns, self.tb.dst_ns):
            left += [f"pid {p} in {ns}" for p in n.ns_pids(ns)]
        if left:
            self.fail("5 left behind", ", ".join(left))

    def stop_writer(self):
        """SIGINT, as a guest shuts down: in-flight writes complete, a last
        flush. The writer gives up on its own only when a write was refused
        for WRITER_RETRY s or no server took it (an error line): a failure.
        Writes still held for retry at the SIGINT are abandoned, never
        acknowledged (exit status 1, not a failure)."""
        if self.writer is None:
            return
        gave_up = self.writer.proc.poll() is not None
        if not gave_up:
            os.kill(self.writer.proc.pid, signal.SIGINT)
        try:
            rc = self.writer.wait(timeout=60)
        except AssertionError as e:
            self.fail("2 durable writes", f"writer: {str(e)[-600:]}")
            return
        errors = [line for line in self.writer.log().splitlines() if "error:" in line]
        if gave_up or errors:
            self.fail("2 durable writes", f"the writer gave up (exit {rc}): {(errors or ['?'])[-1]}")

    def check_journal(self, where, rc, out):
        bad, err = parse_verify(rc, out)
        if bad:
            self.result.lost = max(self.result.lost, bad)
            self.fail("2 durable writes", f"LOST WRITES {where}: {bad} mismatched blocks\n{err}")
        elif err:
            self.fail("2 durable writes", f"verify {where}: {err}")

    def log_text(self):
        return "\n".join(self.events) + "\n"


class HarnessError(Exception):
    """The run could not be driven as the case says (a phase never reached,
    a crash point never hit): the run fails, with this reason."""
