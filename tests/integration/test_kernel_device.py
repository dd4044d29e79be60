"""A kernel block device through a migration (issue #17): ext4 on a loop
device over nbdfuse stands in for /dev/nbd0 (no nbd module on these
machines): `nbdfuse DIR URI` exposes the export as DIR/nbd, `losetup` makes
it a block device, ext4 mounts it. Such a client cannot switch servers on
cue; forwarding must make that harmless.

Three scenarios, each with a file system workload (files written, renamed,
overwritten, deleted; a database-like log appended and fsynced record by
record) that must never see an I/O error nor a read-only remount:

- attached to the source through the whole migration (forwarded after
  handover);
- attached to the destination from the start of the migration (forwarded
  to the source before handover);
- moved mid-migration: unmounted and detached on the source side, attached
  and mounted on the destination side, at a random moment before or after
  handover (seeded: the seed is printed; LIVEMIG_TEST_SEED=N repeats it).

After Done: unmount, detach, `e2fsck -fn` of the destination's image file is
clean, and the image mounted read-only shows exactly the files of the
workload's manifest, each with its hash.

Runs as root (losetup, mount); skipped, with the reason, where a loop
device over nbdfuse cannot be made. Before the first test the test process
moves into a private mount namespace of its own (unshare(CLONE_NEWNS) and
mount --make-rprivate /, as `unshare --mount --propagation private` does),
so its mounts are not seen outside and vanish with it; nbdfuse dies with
the test process (parent-death signal). Every mount, loop device and
nbdfuse is undone by the test that made it, also when it fails, and at exit.

    LIVEMIG_PLUGIN=build/plugin/livemig.so LIVEMIG_BUILD_DIR=build PYTHONPATH=tests/integration \\
        /usr/bin/python3 -m pytest tests/integration/test_kernel_device.py [-k NAME]
"""

import atexit
import ctypes
import fcntl
import hashlib
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

import lmtest
import migration as mig
from lmtest import MiB

SIZE = 64 * MiB
MAX_RATE = 8 * MiB       # the migration lasts a few seconds
BEFORE_HANDOVER = 3.0    # seconds of file system work before handover, at least
AFTER_HANDOVER = 3.0     # and after it
MODE_PARAMS = {"livefs": {"monitor_period": 1, "threshold": 1}}
TOOLS = ("nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount", "fusermount3", "findmnt")


def run(argv, check=True, timeout=60):
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=timeout, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({p.returncode}): {p.stdout.strip()}")
    return p


_prctl = ctypes.CDLL(None).prctl   # looked up now: the child of a fork must not dlopen


def _die_with_parent():
    # In the child before exec: SIGTERM when the thread that started it ends.
    _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def unusable_reason():
    """Why a loop device over nbdfuse cannot be made here, or None."""
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        return f"missing {', '.join(missing)} (Debian packages: libnbd-bin for nbdfuse, util-linux, " \
               f"mount, e2fsprogs, fuse3)"
    if os.geteuid() != 0:
        return "not root: losetup and mount need it"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    d = lmtest.tmp_dir("probe")
    f = os.path.join(d, "probe.img")
    with open(f, "wb") as fh:
        fh.truncate(1 * MiB)
    p = run(["losetup", "--find", "--show", f], check=False)
    if p.returncode != 0:
        return f"losetup cannot attach a loop device: {p.stdout.strip()}"
    run(["losetup", "-d", p.stdout.strip()], check=False)
    return None


CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 0x40000


def enter_private_mount_namespace():
    """Moves the calling thread (pytest's main thread, which starts every
    process and thread of these tests) into a new mount namespace whose
    mounts propagate nowhere. Returns None, or why it could not."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        return f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}"
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return f"mount --make-rprivate /: {os.strerror(ctypes.get_errno())}"
    return None


@pytest.fixture(autouse=True, scope="module")
def loop_device_over_nbdfuse():
    why = unusable_reason()
    if why:
        pytest.skip(f"a loop device over nbdfuse cannot be made here: {why}")
    why = enter_private_mount_namespace()
    if why:
        print(f"note: cannot make a mount namespace ({why}): mounting in this one")


# --------------------------------------------------------------------------
# Loop devices that clean up after themselves

LOOP_SET_STATUS64, LOOP_GET_STATUS64 = 0x4C04, 0x4C05
LO_FLAGS_AUTOCLEAR = 4
LOOP_INFO64_SIZE, LO_FLAGS_OFFSET = 232, 52   # struct loop_info64, its lo_flags


def loop_backing(dev):
    """The file loop device `dev` is attached to, or None."""
    try:
        with open(f"/sys/block/{os.path.basename(dev)}/loop/backing_file") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def wait_loop_released(dev, backing, timeout):
    deadline = time.monotonic() + timeout
    while loop_backing(dev) == backing:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def loop_mount(a, path, losetup_options, mount_options):
    """losetup a loop device on `path` and mount its ext4 on a.mountpoint
    (sets a.loop, a.backing, a.mounted). The device is marked autoclear while
    this holds it open: it detaches itself when the mount goes, also when
    this script is killed and its mount namespace with it."""
    a.backing = os.path.realpath(path)
    a.loop = run(["losetup", "--find", "--show", *losetup_options, path]).stdout.strip()
    fd = os.open(a.loop, os.O_RDONLY)
    try:
        info = bytearray(LOOP_INFO64_SIZE)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
        flags = struct.unpack_from("<I", info, LO_FLAGS_OFFSET)[0]
        struct.pack_into("<I", info, LO_FLAGS_OFFSET, flags | LO_FLAGS_AUTOCLEAR)
        fcntl.ioctl(fd, LOOP_SET_STATUS64, bytes(info))
        run(["mount", "-t", "ext4", "-o", mount_options, a.loop, a.mountpoint])
        a.mounted = True
    finally:
        os.close(fd)   # the mount holds it now; if there is none, it detaches


# --------------------------------------------------------------------------
# ext4 on a loop device over nbdfuse

_attached = []   # every Attachment not yet detached, undone at exit


class Attachment:
    """nbdfuse of one server's export, a loop device on it, ext4 mounted:

        a = Attachment(server, "src"); a.attach(); ... a.detach()

    detach() undoes what attach() did, step by step, whatever failed."""

    def __init__(self, server, label):
        self.server, self.label = server, label
        self.dir = lmtest.tmp_dir(f"kdev-{label}")
        self.fuse_dir = os.path.join(self.dir, "fuse")
        self.mountpoint = os.path.join(self.dir, "fs")
        os.mkdir(self.fuse_dir)
        os.mkdir(self.mountpoint)
        self.log_path = os.path.join(self.dir, "nbdfuse.log")
        self.fuse = None
        self.loop = self.backing = None
        self.mounted = False

    @property
    def device_file(self):
        return os.path.join(self.fuse_dir, "nbd")

    def attach(self):
        _attached.append(self)
        try:
            with open(self.log_path, "wb") as log:
                self.fuse = subprocess.Popen(["nbdfuse", self.fuse_dir, "--unix", self.server.sock],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             preexec_fn=_die_with_parent)
            lmtest.wait_until(lambda: self.fuse.poll() is not None or os.path.ismount(self.fuse_dir),
                              timeout=20, what=f"nbdfuse on {self.label} to mount")
            if self.fuse.poll() is not None:
                log = lmtest.read_file(self.log_path).decode(errors="replace")
                raise AssertionError(f"nbdfuse exited ({self.fuse.returncode}): {log}")
            loop_mount(self, self.device_file, ["--direct-io=off"], "errors=remount-ro")
        except BaseException:
            self.detach()
            raise
        return self

    def options(self):
        """The mount's options (findmnt), e.g. "rw,relatime"."""
        return run(["findmnt", "-no", "OPTIONS", self.mountpoint]).stdout.strip()

    def detach(self, problems=None):
        """Unmounts, detaches the loop device, unmounts nbdfuse and waits for
        it to exit (by PID, SIGTERM then SIGKILL). Returns what did not go
        cleanly (an empty list when all did)."""
        problems = [] if problems is None else problems
        if self.mounted:
            for attempt in range(20):
                p = run(["umount", self.mountpoint], check=False)
                if p.returncode == 0:
                    break
                time.sleep(0.25)
            else:
                problems.append(f"umount {self.mountpoint}: {p.stdout.strip()}; lazily")
                run(["umount", "-l", self.mountpoint], check=False)
            self.mounted = False
        if self.loop:
            # Autoclear detaches it once unmounted (a moment later: udev may
            # hold it open); if it is still ours, losetup -d.
            if not wait_loop_released(self.loop, self.backing, 2):
                p = run(["losetup", "-d", self.loop], check=False)
                if p.returncode != 0 and loop_backing(self.loop) == self.backing:
                    problems.append(f"losetup -d {self.loop}: {p.stdout.strip()}")
                if not wait_loop_released(self.loop, self.backing, 10):
                    problems.append(f"{self.loop} still holds {self.backing}")
            self.loop = None
        if self.fuse is not None:
            if os.path.ismount(self.fuse_dir):
                p = run(["fusermount3", "-u", self.fuse_dir], check=False)
                if p.returncode != 0:
                    problems.append(f"fusermount3 -u {self.fuse_dir}: {p.stdout.strip()}")
                    run(["fusermount3", "-u", "-z", self.fuse_dir], check=False)
            try:
                self.fuse.wait(10)
            except subprocess.TimeoutExpired:
                problems.append(f"nbdfuse {self.fuse.pid} did not exit after unmount")
                lmtest._kill(self.fuse)
            self.fuse = None
        if self in _attached:
            _attached.remove(self)
        return problems


@atexit.register
def _detach_all():   # runs before lmtest's own exit handler removes the temp dir
    for a in list(_attached):
        a.detach()


def loop_image(path):
    """A read-only loop device on an image file, its ext4 mounted read-only
    at .mountpoint; detach() undoes both."""
    a = ImageMount(path)
    _attached.append(a)
    try:
        loop_mount(a, path, ["--read-only"], "ro,noload")
    except BaseException:
        a.detach()
        raise
    return a


class ImageMount(Attachment):
    def __init__(self, path):
        self.label = os.path.basename(path)
        self.dir = lmtest.tmp_dir("kdev-ro")
        self.mountpoint = os.path.join(self.dir, "fs")
        os.mkdir(self.mountpoint)
        self.fuse, self.loop, self.backing, self.mounted = None, None, None, False


# --------------------------------------------------------------------------
# The file system workload and its manifest

def sha(data):
    return hashlib.sha256(data).hexdigest()


class FsWorkload(threading.Thread):
    """Works in one directory of a mounted file system, at most ~150
    operations a second: new files (written in place, or written under a
    temporary name, fsynced and renamed over the old one), renames across
    subdirectories, in-place overwrites, deletes, and a log appended one
    record at a time with an fsync after each (a database's commit). The
    manifest (path -> sha256) says what every surviving file holds. Any
    OSError is recorded, never retried. pause() stops it between operations
    with no file open (so the file system can be unmounted); resume(root)
    goes on in another mount of the same file system."""

    DIRS = ("a", "b", "c")
    DB = "db/commit.log"

    def __init__(self, root, seed):
        super().__init__(daemon=True)
        self.root = root
        self.rnd = random.Random(seed)
        self.manifest = {}
        self.db = bytearray()
        self.errors = []
        self.ops = {}
        self.seq = 0
        self.running = threading.Event()
        self.idle = threading.Event()
        self.stopping = False
        self.running.set()

    def path(self, rel):
        return os.path.join(self.root, rel)

    def count(self, what):
        self.ops[what] = self.ops.get(what, 0) + 1

    def run(self):
        try:
            for d in (*self.DIRS, "db"):
                os.makedirs(self.path(d), exist_ok=True)
            self.fsync_dir("")
        except OSError as e:
            self.errors.append(("setup", repr(e)))
        while not self.stopping:
            if not self.running.is_set():
                self.idle.set()
                self.running.wait()
                self.idle.clear()
                continue
            try:
                self.step()
            except OSError as e:
                self.errors.append((self.seq, repr(e)))
                if len(self.errors) > 20:
                    break
            time.sleep(0.005)
        self.idle.set()

    def fsync_dir(self, rel):
        fd = os.open(self.path(rel) if rel else self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def new_name(self):
        self.seq += 1
        return f"{self.rnd.choice(self.DIRS)}/f{self.seq:06d}"

    def write_file(self, rel, data, fsync):
        with open(self.path(rel), "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    def step(self):
        r = self.rnd
        total = sum(size for _, size in self.manifest.values())
        files = sorted(f for f in self.manifest if f != self.DB)   # the log is only appended to
        op = r.random()
        if op < 0.3 or not files:
            data = r.randbytes(r.choice((512, 4096, 10000, 65536, 200000)))
            if r.random() < 0.5 and files:    # replace an existing file atomically
                rel = r.choice(files)
                tmp = rel + ".tmp"
                self.write_file(tmp, data, fsync=True)
                os.rename(self.path(tmp), self.path(rel))
                self.fsync_dir(os.path.dirname(rel))
                self.count("replace")
            else:
                rel = self.new_name()
                self.write_file(rel, data, fsync=r.random() < 0.5)
                self.count("create")
            self.manifest[rel] = (sha(data), len(data))
        elif op < 0.45:
            old = r.choice(files)
            new = self.new_name()
            os.rename(self.path(old), self.path(new))
            self.manifest[new] = self.manifest.pop(old)
            self.count("rename")
        elif op < 0.55 or total > 12 * MiB:
            rel = r.choice(files)
            os.unlink(self.path(rel))
            del self.manifest[rel]
            self.count("delete")
        elif op < 0.65:
            rel = r.choice(files)
            with open(self.path(rel), "r+b") as f:
                data = bytearray(f.read())
                off = r.randrange(0, len(data))
                patch = r.randbytes(min(len(data) - off, r.choice((100, 4096, 9000))))
                f.seek(off)
                f.write(patch)
                f.flush()
                os.fsync(f.fileno())
            data[off:off + len(patch)] = patch
            self.manifest[rel] = (sha(bytes(data)), len(data))
            self.count("overwrite")
        elif op < 0.95:
            record = f"{len(self.db):012d} ".encode() + r.randbytes(r.randint(50, 400)).hex().encode() + b"\n"
            with open(self.path(self.DB), "ab") as f:
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
            self.db += record
            self.manifest[self.DB] = (sha(bytes(self.db)), len(self.db))
            self.count("commit")
        else:
            rel = r.choice(files)
            with open(self.path(rel), "rb") as f:
                got = f.read()
            if sha(got) != self.manifest[rel][0]:
                self.errors.append((self.seq, f"{rel}: read back {len(got)} bytes that differ from what was written"))
            self.count("read")

    def pause(self, timeout=60):
        self.running.clear()
        if not self.idle.wait(timeout):
            raise AssertionError(f"the workload did not pause in {timeout} s (stuck in I/O?)")

    def resume(self, root):
        self.root = root
        self.running.set()

    def stop(self, timeout=60):
        self.stopping = True
        self.running.set()
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"the workload did not stop in {timeout} s (stuck in I/O?)")

    def summary(self):
        return ", ".join(f"{n} {k}" for k, n in sorted(self.ops.items())) + f"; {len(self.manifest)} files"


def check_tree(root, manifest):
    """Problems of the tree under `root` against the manifest: files missing,
    unexpected, or holding other bytes."""
    problems = []
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root and "lost+found" in dirnames:
            dirnames.remove("lost+found")
        for name in filenames:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                found[os.path.relpath(full, root)] = sha(f.read())
    for rel in sorted(set(manifest) - set(found)):
        problems.append(f"{rel}: missing")
    for rel in sorted(set(found) - set(manifest)):
        problems.append(f"{rel}: not in the manifest")
    for rel in sorted(set(found) & set(manifest)):
        if found[rel] != manifest[rel][0]:
            problems.append(f"{rel}: holds other bytes than were written")
    return problems


# --------------------------------------------------------------------------
# Kernel messages

def uptime():
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def kernel_complaints(devices, since):
    """dmesg lines since `since` (seconds of uptime) about one of `devices`
    (loopN) that say error or read-only; None if dmesg cannot be read."""
    p = run(["dmesg"], check=False)
    if p.returncode != 0:
        return None
    names = {os.path.basename(d) for d in devices}
    out = []
    for line in p.stdout.splitlines():
        m = re.match(r"\[\s*(\d+\.\d+)\]\s*(.*)", line)
        if not m or float(m.group(1)) < since - 1:
            continue
        text = m.group(2)
        if any(re.search(rf"\b{n}\b", text) for n in names) and re.search(r"error|read-only|abort", text, re.I):
            out.append(line)
    return out


# --------------------------------------------------------------------------
# The scenarios

def make_fs_image(size):
    """A source image holding a fresh ext4 (metadata written now, not lazily
    in the background while the test runs)."""
    path = lmtest.make_image(size, name="src.img", dir=lmtest.tmp_dir("src"))
    run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", path])
    return path


class Scenario:
    """A source plugin on an ext4 image, a destination on a missing one, the
    file system attached to one of them, the workload in it. Everything is
    undone at the end of the `with` block."""

    def __init__(self, name, mode, seed):
        self.name, self.mode, self.seed = name, mode, seed
        self.servers = []
        self.attachment = None
        self.devices = []
        self.workload = None

    def __enter__(self):
        self.t0 = uptime()
        self.src_image = make_fs_image(SIZE)
        self.dst_image = os.path.join(lmtest.tmp_dir("dst"), "dst.img")
        self.src = lmtest.Server(control=True, image=self.src_image, listen="127.0.0.1:0")
        self.servers.append(self.src.start())
        self.dst = lmtest.Server(control=True, image=self.dst_image, listen="127.0.0.1:0")
        self.servers.append(self.dst.start())
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.workload is not None and self.workload.is_alive():
            self.workload.stopping = True
            self.workload.running.set()
        if self.attachment is not None:
            self.attachment.detach()
        for s in self.servers:
            s.stop()
        return False

    def attach(self, server, label):
        self.attachment = Attachment(server, label).attach()
        self.devices.append(self.attachment.loop)
        return self.attachment

    def start_workload(self):
        self.workload = FsWorkload(self.attachment.mountpoint, seed=self.seed)
        self.workload.start()

    def check_mount(self, when):
        opts = self.attachment.options()
        assert opts.split(",")[0] == "rw", f"{self.name}: the file system is {opts} {when}"
        assert not self.workload.errors, f"{self.name}: the workload saw errors {when}: {self.workload.errors[:5]}"

    def move(self, to_server, label):
        """Unmount and detach where it is, attach and mount on `to_server`,
        go on; the files read back through the new side first."""
        self.workload.pause()
        self.check_mount(f"before the move to {label}")
        problems = self.attachment.detach()
        assert not problems, f"{self.name}: detaching was not clean: {problems}"
        self.attach(to_server, label)
        problems = check_tree(self.attachment.mountpoint, self.workload.manifest)
        assert not problems, f"{self.name}: after the move to {label}: {problems[:10]}"
        self.workload.resume(self.attachment.mountpoint)

    def migrate(self):
        mig.migrate(self.src, self.dst, self.mode, handover="explicit", max_rate=MAX_RATE,
                    **MODE_PARAMS.get(self.mode, {}))
        self.migrated_at = time.monotonic()

    def handover(self):
        mig.wait_ready(self.src, timeout=90)
        time.sleep(max(0.0, BEFORE_HANDOVER - (time.monotonic() - self.migrated_at)))
        self.fwd_dst_before = mig.status(self.dst)["migration"]["forwarded_requests"]
        self.fwd_src_before = mig.status(self.src)["migration"]["forwarded_requests"]
        reply = self.src.control({"op": "handover"})
        assert reply["ok"], reply
        self.handed_over_at = time.monotonic()

    def finish(self):
        """Stops the workload, waits for Done, unmounts, and checks the
        destination's image: fsck-clean, every file as the manifest says."""
        self.check_mount("at the end")
        self.workload.stop()
        self.check_mount("at the end")
        problems = check_tree(self.attachment.mountpoint, self.workload.manifest)
        assert not problems, f"{self.name}: the mounted file system before unmount: {problems[:10]}"
        self.st_src = mig.wait_phase(self.src, ["Done"], timeout=90)
        self.st_dst = mig.wait_phase(self.dst, ["Done"], timeout=90)
        problems = self.attachment.detach()
        assert not problems, f"{self.name}: detaching was not clean: {problems}"
        complaints = kernel_complaints(self.devices, self.t0)
        assert not complaints, f"{self.name}: the kernel logged errors for {self.devices}:\n" + "\n".join(complaints)
        fsck = run(["e2fsck", "-fn", self.dst_image], check=False)
        assert fsck.returncode == 0, f"{self.name}: e2fsck -fn of the destination's image ({fsck.returncode}):\n" \
                                     f"{fsck.stdout}"
        ro = loop_image(self.dst_image)
        try:
            problems = check_tree(ro.mountpoint, self.workload.manifest)
        finally:
            ro.detach()
        assert not problems, f"{self.name}: the destination's image against the manifest: {problems[:10]}"
        print(f"  {self.name} ({self.mode}): {self.workload.summary()}; forwarded: destination "
              f"{self.st_dst['migration']['forwarded_requests']}, source "
              f"{self.st_src['migration']['forwarded_requests']}; devices {self.devices}"
              f"{'' if complaints is not None else '; dmesg not readable'}")


def the_seed():
    seed = int(os.environ.get("LIVEMIG_TEST_SEED", "0")) or random.SystemRandom().randrange(1, 1 << 31)
    print(f"  seed {seed} (LIVEMIG_TEST_SEED={seed} repeats this run)")
    return seed


def test_ext4_attached_to_the_source_through_a_whole_migration():
    with Scenario("attached to the source", "precopy", seed=1) as s:
        s.attach(s.src, "src")
        s.start_workload()
        time.sleep(1.0)
        s.migrate()
        s.handover()
        time.sleep(AFTER_HANDOVER)
        s.finish()
        assert s.fwd_src_before == 0, s.fwd_src_before
        assert s.st_src["migration"]["forwarded_requests"] > 0, "the source forwarded nothing after handover"


def test_ext4_attached_to_the_destination_from_the_start():
    with Scenario("attached to the destination", "postcopy", seed=2) as s:
        s.migrate()
        s.attach(s.dst, "dst")
        s.start_workload()
        s.handover()
        assert s.fwd_dst_before > 0, "the destination forwarded nothing before handover"
        time.sleep(AFTER_HANDOVER)
        s.finish()


def test_ext4_moved_from_the_source_to_the_destination_mid_migration():
    seed = the_seed()
    rnd = random.Random(seed)
    mode = rnd.choice(("precopy", "postcopy", "hybrid", "livefs", "auto"))
    before_handover = rnd.random() < 0.5
    delay = rnd.uniform(0.2, 2.5)
    print(f"  {mode}; moved {delay:.2f} s after {'the migration started' if before_handover else 'handover'}")
    with Scenario("moved mid-migration", mode, seed=seed) as s:
        s.attach(s.src, "src")
        s.start_workload()
        time.sleep(1.0)
        s.migrate()
        if before_handover:
            time.sleep(delay)
            s.move(s.dst, "dst")
            s.handover()
        else:
            s.handover()
            time.sleep(delay)
            s.move(s.dst, "dst")
        time.sleep(AFTER_HANDOVER)
        s.finish()
        # Whichever side it was on while that side was not authoritative
        # forwarded its requests.
        side = s.st_dst if before_handover else s.st_src
        assert side["migration"]["forwarded_requests"] > 0, side["migration"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
