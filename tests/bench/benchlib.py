"""Shared pieces of the Python benchmarks in tests/bench (migration, modes,
run): processes stopped by PID on any exit, the two-host test bed
(deploy/testbed.sh), nbdkit with livemig.so in a namespace and its control
socket, qemu-storage-daemon and its QMP monitor, fio runs and their JSON,
the modes bench's workloads, sparse images, status polling, peak RSS, link
throughput, report cells.

Python stdlib only. What the integration tests share with the benchmarks
(nbdkit's command line and readiness, key files, allocated bytes, the QMP
client) is tests/support/python/lmsupport.py. A bench calls set_prog() and install_cleanup() first.
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
sys.path.insert(0, os.path.join(REPO, "tests", "support", "python"))
from lmsupport import Qmp, allocated_bytes, nbdkit_argv, wait_for_pidfile, write_secret, write_tls_psk  # noqa: E402,F401

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


# CPU pinning (tests/bench/run --pin): testbed namespace -> CPU list. With
# it each "host" runs on its own CPUs, its servers and the guest attached to
# them, as on two machines; without it both hosts and the guest share every
# CPU, and the destination's receive work slows the guest on the source.
host_cpus = {}


def pinned(argv, host=None):
    """argv under taskset on HOST's CPUs when pinning is on. HOST defaults
    to the namespace of an `ip netns exec NS ...` argv."""
    if host is None and argv[:3] == ["ip", "netns", "exec"]:
        host = argv[3]
    if host in host_cpus:
        return ["taskset", "-c", host_cpus[host], *argv]
    return argv


def spawn(argv, out_path, host=None):
    argv = pinned(argv, host)
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
    so the PID is nbdkit's), its peer port on addr:port. args needs .work,
    .logs and .plugin."""

    def __init__(self, args, ns, addr, image, tag, secret, extra=(), port=PEER_PORT):
        self.dir = os.path.join(args.work, tag)
        os.makedirs(self.dir, exist_ok=True)
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.ctl = os.path.join(self.dir, "control.sock")
        self.pidfile = os.path.join(self.dir, "nbdkit.pid")
        self.log = os.path.join(args.logs, f"{tag}.nbdkit.log")
        self.image = image
        self.peer = f"{addr}:{port}"
        argv = nbdkit_argv(args.plugin, [f"image={image}", f"control={self.ctl}", f"listen={addr}:{port}",
                                         f"secret={secret}", *tls_keys(args), *extra],
                           sock=self.sock, pidfile=self.pidfile, ns=ns)
        self.proc = spawn(argv, self.log)
        why = wait_for_pidfile(self.proc, self.pidfile, 20)
        if why:
            die(f"nbdkit {why} during start-up:\n{open(self.log).read()}")

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def control(self, obj):
        return control(self.ctl, obj)

    def status(self):
        return self.control({"op": "status"})

    def guest_requests(self):
        """The requests this server's NBD clients (the guest) made so far:
        the plugin's request counters (stats), every operation summed."""
        st = self.control({"op": "stats", "top": 0})
        return sum(c.get("count", 0) for c in st.get("requests", {}).values() if isinstance(c, dict))

    def cpu_seconds(self):
        """utime + stime of nbdkit so far, all its threads (None once it is gone)."""
        return cpu_seconds(self.proc.pid)

    def stop(self):
        stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def make_work_dir(args, parent, name, longest_tag):
    """args.work = PARENT/NAME, for this run's images and sockets (removed on
    exit), with the pre-shared key args.secret in it. longest_tag: the
    longest server tag, to check Unix socket paths fit."""
    args.work = os.path.join(os.path.realpath(parent), name)
    os.makedirs(args.work)
    cleanup_paths.append(args.work)
    if len(os.path.join(args.work, longest_tag, "control.sock")) > 100:
        die(f"path too long for Unix socket names: {parent}")
    args.secret = os.path.join(args.work, "psk")
    write_secret(args.secret)


def tls_keys(args):
    """The plugin keys for TLS on the peer link: a pre-shared TLS key (made
    once in args.work), unless args.tls is "off" (TLS is required on the
    namespaces' addresses, so plaintext must be said)."""
    if getattr(args, "tls", "psk") == "off":
        return ["tls=off"]
    if not getattr(args, "tls_psk", None):
        args.tls_psk = write_tls_psk(os.path.join(args.work, "tls.psk"), "bench")
    return [f"tls-psk={args.tls_psk}"]


# --------------------------------------------------------------------------
# fio

class Fio:
    """One fio run (nbd engine through a Unix socket) with the options given;
    JSON output to DIR/raw/TAG.fio.json (args needs .raw and .logs).
    time_based=False: runtime only caps the run (e.g. a loops= job)."""

    def __init__(self, args, uri, tag, options, runtime, ramp=0, time_based=True, host=None):
        self.json_path = os.path.join(args.raw, f"{tag}.fio.json")
        self.log_path = os.path.join(args.logs, f"{tag}.fio.log")
        argv = ["fio", f"--name={tag}", "--ioengine=nbd", f"--uri={uri}", *options,
                *(["--time_based"] if time_based else []), f"--runtime={runtime}", "--output-format=json",
                f"--output={self.json_path}"]
        if ramp:
            argv.append(f"--ramp_time={ramp}")
        self.argv = argv
        self.started = time.monotonic()
        self.proc = spawn(argv, self.log_path, host)
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
    # fio prints notes ("fio: terminating on signal 2") before the JSON, or
    # after it when the signal came as it ended on its own.
    start = 0 if text.startswith("{") else text.find("\n{") + 1
    try:
        return json.JSONDecoder().raw_decode(text, start)[0]
    except json.JSONDecodeError:
        return None


# --------------------------------------------------------------------------
# The test bed

def tc_bytes(ns, dev):
    p = subprocess.run(["ip", "netns", "exec", ns, "tc", "-s", "-j", "qdisc", "show", "dev", dev],
                       stdout=subprocess.PIPE, check=True)
    return sum(q.get("bytes", 0) for q in json.loads(p.stdout or b"[]") if q.get("root"))


def wire_bytes(env):
    """Bytes the test bed's link carried so far, both veth ends (tc)."""
    return tc_bytes(env["LM_TB_SRC_NS"], env["LM_TB_SRC_DEV"]) + tc_bytes(env["LM_TB_DST_NS"], env["LM_TB_DST_DEV"])


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


def copy_usr_files(dest, limit, skip=0):
    """Regular files of /usr, in directory order, into `dest` until `limit`
    bytes, after passing over the first `skip` bytes of them (so that two
    calls can take different files). Returns the bytes copied."""
    total = passed = 0
    for root, dirs, files in os.walk("/usr"):
        dirs.sort()
        for name in sorted(files):
            src = os.path.join(root, name)
            if os.path.islink(src) or not os.path.isfile(src):
                continue
            size = os.path.getsize(src)
            if passed < skip:
                passed += size
                continue
            if total + size > limit:
                continue
            target = os.path.join(dest, os.path.relpath(src, "/usr"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(src, target)
            total += size
            if total >= limit * 0.99:
                return total
    return total


def make_usr_image(path, size, files, staging):
    """A realistic disk: an ext4 file system of `size` bytes (mkfs.ext4 -d)
    holding about `files` bytes of this machine's /usr files (binaries,
    libraries, text), staged in `staging` (removed after)."""
    os.makedirs(staging)
    copied = copy_usr_files(staging, files)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    "-d", staging, path, str(size // 1024) + "k"], check=True)
    shutil.rmtree(staging)
    log(f"realistic image: ext4, {size / MiB:.0f} MiB, {copied / MiB:.0f} MiB of /usr files, "
        f"{allocated_bytes(path) / MiB:.0f} MiB allocated")


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


def writer_argv(lm_workload, uri, journal, region, rate, switch, json_out, duration):
    """The verifying writer (lm-workload write): random 4 KiB writes at
    `rate` per second over region (offset, length), journalled, moving to
    the URI written into `switch`; its summary in json_out."""
    return [lm_workload, "write", "--uri", uri, "--journal", journal, "--region", f"{region[0]}:{region[1]}",
            "--pattern", "random", "--rate", str(rate), "--queue-depth", "8", "--flush-every", "1000",
            "--switch-file", switch, "--stats-interval", "0", "--overwrite", "--json-out", json_out,
            "--duration", str(duration)]


def switch_writer(switch, uri):
    """Moves a verifying writer to uri (atomically, as it polls the file)."""
    tmp = switch + ".tmp"
    with open(tmp, "w") as f:
        f.write(uri + "\n")
    os.rename(tmp, switch)


def verify_journal(lm_workload, journal, image, region, log_path, timeout=600):
    """lm-workload verify of an image file (nbdkit file, read-only) against
    the writer's journal: every block the writer acknowledged must hold what
    it wrote. True when it does; the verifier's output goes to log_path."""
    with open(log_path, "wb") as f:
        p = subprocess.run(["nbdkit", "-r", "-U", "-", "file", image, "--run",
                            f"{lm_workload} verify --uri \"$uri\" --journal {journal} "
                            f"--region {region[0]}:{region[1]} --initial any"],
                           stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    return p.returncode == 0


def forget_migration(image):
    """The plugin's state file beside `image` goes, the image stays (a source
    image migrated again by the next contender would otherwise start fenced)."""
    try:
        os.unlink(image + ".livemig-state")
    except FileNotFoundError:
        pass


def add_contender_option(ap):
    ap.add_argument("--contender", action="append", default=[], metavar="NAME=PLUGIN",
                    help="a plugin to measure (repeatable; default: this build's, as 'this')")


def contenders(args):
    """--contender NAME=PATH options as (name, real path) pairs; this build's
    plugin as 'this' when none is given."""
    given = args.contender or [f"this={os.path.join(args.build, 'plugin', 'livemig.so')}"]
    out = []
    for c in given:
        name, sep, path = c.partition("=")
        if not sep or not os.path.exists(path):
            die(f"--contender {c!r}: want NAME=PATH to an existing livemig.so")
        out.append((name, os.path.realpath(path)))
    return out


def link_bytes_per_second(rate):
    """tc's rate words (10gbit, 500mbit, 100kbit: decimal) in bytes/s."""
    for unit, mult in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1)):
        if rate.endswith(unit):
            return float(rate[:-len(unit)]) * mult / 8
    die(f"--link {rate!r}: want a tc rate such as 1gbit or 500mbit")


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


def fmt_num(x):
    if x is None:
        return "-"
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def cell(xs, fmt="{:.2f}", f=None):
    """Median of the values (None skipped), with min-max when more than one."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    show = f or (lambda v: fmt.format(v))
    med = median(xs)
    if len(xs) == 1:
        return show(med)
    return f"{show(med)} ({show(min(xs))}-{show(max(xs))})"


# --------------------------------------------------------------------------
# Workloads of the modes bench and tests/bench/run (fio, nbd engine)

class Workload:
    """name, kind ("read": recurring reads; "write": the write workloads),
    the fio options of one run and the number of NBD connections fio opens."""

    def __init__(self, name, kind, options, jobs=1, time_based=True, label=""):
        self.name, self.kind, self.options, self.jobs, self.time_based = name, kind, options, jobs, time_based
        self.label = label or name


def make_workloads(args):
    size = args.size_b
    wls = {}
    blocks = args.reread_set // MiB
    stride = size // blocks
    for rate in args.reread_rates:
        name = "reread" if not rate else f"reread-{rate}"
        opts = ["--rw=randread", "--bs=1M", f"--blockalign={stride}", "--offset=0", f"--size={size}",
                f"--numjobs={args.readers}", "--iodepth=1", "--norandommap", "--randrepeat=0", "--group_reporting"]
        if rate:
            opts.append(f"--rate_iops={rate}")
        wls[name] = Workload(name, "read", opts, jobs=args.readers,
                             label=f"recurring reads: {args.readers} readers of 1M randread, "
                                   f"{f'{rate} IOPS each' if rate else 'unthrottled'}, "
                                   f"{blocks} x 1 MiB working set")
        wls[name].stride = stride
        wls[name].blocks = blocks
    for rate in args.hotset_rates:
        name = "hotset" if not rate else f"hotset-{rate}"
        opts = ["--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=1", f"--offset={args.hot_offset}",
                f"--size={args.hot_size}", "--randrepeat=0"]
        if rate:
            opts.append(f"--rate_iops={rate}")
        wls[name] = Workload(name, "write", opts,
                             label=f"hot-set 4k randwrite over {args.hot_size // MiB} MiB, "
                                   f"{f'{rate} IOPS' if rate else 'unthrottled'}")
    # time_based would keep fio writing forever and never read back: the
    # loop is loops= with runtime as the cap.
    opts = ["--rw=write", "--bs=1M", "--iodepth=1", "--numjobs=1", f"--offset={args.ior_offset}",
            f"--size={args.ior_size}", "--verify=crc32c", "--do_verify=1", "--loops=1000000",
            "--verify_state_save=0"]
    wls["ior"] = Workload("ior", "write", opts, time_based=False,
                          label=f"IOR-like 1M write then read of {args.ior_size // MiB} MiB, looped")
    return wls


def start_fio(args, wl, uri, tag, runtime, ramp, extra=(), host=None):
    """host: the namespace whose CPUs fio runs on when pinning is on (the
    host of the server it attaches to, as a guest runs where its disk is served)."""
    opts = [*wl.options, *extra]
    return Fio(args, uri, tag, opts, runtime, ramp, time_based=wl.time_based, host=host)


def fio_summary(fio, wl):
    """I/Os, IOPS, per direction mean/p50/p99 completion latency (ms), fio's
    runtime (s) and error; None if fio wrote no report."""
    j = fio.json()
    if j is None or not j.get("jobs"):
        return None
    job = j["jobs"][0]
    # group_reporting sums job_runtime over the jobs of the group.
    runtime = job.get("job_runtime", 0) / 1000 / max(1, wl.jobs)
    out = {"runtime_s": runtime, "error": job.get("error", 0), "ios": 0}
    for ddir in ("read", "write"):
        d = job.get(ddir, {})
        n = d.get("total_ios", 0)
        out["ios"] += n
        if not n:
            continue
        clat = d.get("clat_ns", {})
        pct = clat.get("percentile", {})
        out[ddir] = {"ios": n, "iops": d.get("iops", 0), "mean_ms": clat.get("mean", 0) / 1e6,
                     "p50_ms": pct.get("50.000000", 0) / 1e6, "p99_ms": pct.get("99.000000", 0) / 1e6,
                     "max_ms": clat.get("max", 0) / 1e6}
    if out["ios"] and not any(out[d]["mean_ms"] for d in ("read", "write") if d in out):
        # Stopped during its ramp: fio reports the ramp's I/Os without latencies.
        out = {"runtime_s": 0, "error": out["error"], "ios": 0, "ramp_only": True}
    out["iops"] = out["ios"] / runtime if runtime > 0 and out["ios"] else None
    return out


def overall(pre, post):
    """Time-weighted IOPS of the two pieces."""
    ios = sum(x["ios"] for x in (pre, post) if x)
    t = sum(x["runtime_s"] for x in (pre, post) if x)
    return ios / t if t > 0 and ios else None


def mode_params(args, mode):
    p = {"mode": mode, "handover": "auto", "handover_size": args.handover_size}
    if mode == "livefs":
        p.update(threshold=args.threshold, monitor_period=args.monitor_period, w_read=args.w_read)
    elif mode == "hybrid":
        p.update(threshold=args.hybrid_threshold)
    elif mode == "auto" and args.max_resends is not None:
        p.update(max_resends=args.max_resends)
    if args.max_rounds:
        p["max_rounds"] = args.max_rounds
    return p


# --------------------------------------------------------------------------
# QEMU's side (tests/bench/run): qemu-storage-daemon and its QMP monitor

class StorageDaemon:
    """qemu-storage-daemon in a network namespace serving image (file +
    raw, or fmt="qcow2" with its backing chain, node disk0) as the writable
    NBD export "disk0", on a Unix socket (listen=None) or on HOST:PORT, with
    a QMP monitor on a Unix socket. args needs .work and .logs."""

    EXPORT = "disk0"

    def __init__(self, args, ns, image, tag, listen=None, fmt="raw"):
        self.dir = os.path.join(args.work, tag)
        os.makedirs(self.dir, exist_ok=True)
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        self.log = os.path.join(args.logs, f"{tag}.qsd.log")
        self.image = image
        addr = (f"addr.type=inet,addr.host={listen[0]},addr.port={listen[1]}" if listen
                else f"addr.type=unix,addr.path={self.sock}")
        argv = ["ip", "netns", "exec", ns, "qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file0,filename={image}",
                "--blockdev", f"driver={fmt},node-name=disk0,file=file0",
                "--nbd-server", addr,
                "--export", f"type=nbd,id=exp0,node-name=disk0,name={self.EXPORT},writable=on",
                "--chardev", f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
                "--monitor", "chardev=qmp0"]
        self.proc = spawn(argv, self.log)
        try:
            self.qmp = Qmp(self.qmp_path)
        except RuntimeError as e:
            die(f"qemu-storage-daemon did not start ({e}):\n{open(self.log).read()}")

    @property
    def uri(self):
        return f"nbd+unix:///{self.EXPORT}?socket={self.sock}"

    def stop(self):
        """quit through QMP (it flushes and closes its NBD client), else SIGTERM."""
        if self.proc.poll() is None:
            try:
                self.qmp.execute("quit")
            except (RuntimeError, OSError):
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        self.qmp.close()
        stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class NbdkitFile:
    """nbdkit's file plugin serving image read-write in a namespace on HOST:PORT."""

    def __init__(self, args, ns, image, tag, listen):
        self.log = os.path.join(args.logs, f"{tag}.nbdkit-file.log")
        self.pidfile = os.path.join(args.work, f"{tag}.pid")
        argv = nbdkit_argv("file", [image], pidfile=self.pidfile, nbdkit_args=["-i", listen[0], "-p", str(listen[1])],
                           ns=ns)
        self.proc = spawn(argv, self.log)
        why = wait_for_pidfile(self.proc, self.pidfile, 20)
        if why:
            die(f"nbdkit file {why} during start-up:\n{open(self.log).read()}")

    def stop(self):
        stop(self.proc)
        try:
            os.unlink(self.pidfile)
        except FileNotFoundError:
            pass


def cpu_seconds(pid):
    """utime + stime of a live process in seconds, or None: /proc/PID/stat
    of the thread group, every thread's time (the exited ones' too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss(pid):
    """VmHWM of a live process in bytes, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * KiB
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


_STREAM_RX = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); n = 0; t0 = None; buf = bytearray(1 << 20)
while True:
    k = c.recv_into(buf)
    if not k: break
    if t0 is None: t0 = time.monotonic()
    n += k
print(n, time.monotonic() - t0, flush=True)
"""

_STREAM_TX = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2]))); left = int(sys.argv[3]); b = bytes(1 << 20)
while left > 0:
    c.sendall(b[:min(left, len(b))]); left -= len(b)
c.close()
"""


def link_throughput(env, nbytes, port=PEER_PORT + 7, via=None):
    """Bytes/s of one TCP stream of nbytes from the source namespace to the
    destination's address (the receiver times first byte -> end); via:
    (addr, port) the sender dials instead, a proxy on the way to it."""
    rx = subprocess.Popen(pinned(["ip", "netns", "exec", env["LM_TB_DST_NS"], sys.executable, "-c", _STREAM_RX,
                                  env["LM_TB_DST_ADDR"], str(port)]), stdout=subprocess.PIPE, text=True)
    _procs[rx.pid] = rx
    try:
        rx.stdout.readline()
        subprocess.run(pinned(["ip", "netns", "exec", env["LM_TB_SRC_NS"], sys.executable, "-c", _STREAM_TX,
                               *(map(str, via) if via else (env["LM_TB_DST_ADDR"], str(port))), str(nbytes)]),
                       check=True, timeout=300)
        n, secs = rx.stdout.readline().split()
        rx.wait(10)
    finally:
        stop(rx)
    return int(n) / float(secs)
