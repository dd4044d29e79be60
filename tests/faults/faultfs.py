"""Mounts faultfs (tests/faults/faultfs.cpp), a passthrough FUSE file system
whose disk fails on command, for tests that need a destination disk to fail:

    import faultfs
    with faultfs.FaultFS() as fs:
        path = os.path.join(fs.mountpoint, "disk.img")
        ...
        fs.set_faults("fsync eio-once\\n")    # the next fsync fails with EIO
        ...
        assert fs.stats()["fsync-eio-once"] == 1
        fs.clear_faults()

Fault syntax: `faultfs --help`. The faultfs binary is
$LIVEMIG_BUILD_DIR/tests/faults/faultfs (CTest sets LIVEMIG_BUILD_DIR).

Each FaultFS lives in a fresh directory under $LIVEMIG_TEST_TMPDIR (default:
the system temp dir) holding the mount point, the backing directory (unless
one is given), the faults file, its .stats file and faultfs's log. It is
unmounted and its faultfs process stopped by PID when the `with` block ends,
also on an exception, and at interpreter exit for any left open. faultfs runs
with --exit-with-parent, so it exits and unmounts itself even if this
process is killed (the thread that starts it must outlive it: Linux sends the
parent-death signal when that thread ends).
"""

import atexit
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

START_TIMEOUT = 10.0  # seconds for the mount to appear
STOP_TIMEOUT = 10.0   # seconds for faultfs to exit after unmount, then after SIGTERM


def faultfs_binary():
    """The faultfs executable: $LIVEMIG_BUILD_DIR/tests/faults/faultfs."""
    build = os.environ.get("LIVEMIG_BUILD_DIR")
    if not build:
        raise RuntimeError("LIVEMIG_BUILD_DIR is not set (ctest sets it; or point it at the build directory)")
    path = os.path.join(build, "tests", "faults", "faultfs")
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{path}: no faultfs executable there; build the faultfs target")
    return path


def _unescape_mountinfo(field):
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_type(mountpoint):
    """The file system type mounted at `mountpoint` (e.g. "fuse.faultfs") per
    /proc/self/mountinfo, or None if nothing is mounted there."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if _unescape_mountinfo(fields[4]) == target:
                found = fields[sep + 1]  # the last mount there is the visible one
    return found


def pid_running(pid):
    """True if process `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def check_faults(text, binary=None):
    """Raises ValueError with faultfs's message unless `text` parses as a
    faults file."""
    with tempfile.NamedTemporaryFile("w", prefix="faultfs-check-", dir=os.environ.get("LIVEMIG_TEST_TMPDIR")) as f:
        f.write(text)
        f.flush()
        r = subprocess.run([binary or faultfs_binary(), "--check-faults", f.name],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise ValueError(r.stdout.strip())


_live = set()


@atexit.register
def _close_all():
    for fs in list(_live):
        try:
            fs.close()
        except Exception as e:  # keep closing the others
            print(f"faultfs: cleanup of {fs.mountpoint} failed: {e}")


class FaultFS:
    """One faultfs mount. Attributes: mountpoint, backing_dir, faults_path,
    stats_path, log_path, pid (of the faultfs process)."""

    def __init__(self, backing_dir=None, fuse_options=(), binary=None):
        self._binary = binary or faultfs_binary()
        self._fuse_options = list(fuse_options)
        self._dir = tempfile.mkdtemp(prefix="faultfs-", dir=os.environ.get("LIVEMIG_TEST_TMPDIR"))
        self.mountpoint = os.path.join(self._dir, "mnt")
        os.mkdir(self.mountpoint)
        if backing_dir is None:
            backing_dir = os.path.join(self._dir, "backing")
            os.mkdir(backing_dir)
        self.backing_dir = os.path.abspath(backing_dir)
        self.faults_path = os.path.join(self._dir, "faults")
        self.stats_path = self.faults_path + ".stats"
        self.log_path = os.path.join(self._dir, "faultfs.log")
        self.pid = None
        self._proc = None
        self._generation = 0

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        """Starts faultfs and waits until its mount is up."""
        _live.add(self)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [self._binary, self.backing_dir, self.mountpoint, "--faults", self.faults_path,
                 "--exit-with-parent", "-f"] + self._fuse_options,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        self.pid = self._proc.pid
        deadline = time.monotonic() + START_TIMEOUT
        while mount_type(self.mountpoint) != "fuse.faultfs":
            if self._proc.poll() is not None or time.monotonic() > deadline:
                status, log = self._proc.poll(), self.log()
                self.close()
                what = f"exited with status {status}" if status is not None else f"did not mount in {START_TIMEOUT}s"
                raise RuntimeError(f"faultfs {what}: {log}")
            time.sleep(0.01)

    def path(self, name):
        """`name` under the mount point."""
        return os.path.join(self.mountpoint, name)

    def set_faults(self, text):
        """Makes `text` (faultfs's fault syntax) the active faults, from the
        next operation on. Raises ValueError if it does not parse. Setting
        the same text again re-arms "eio-once" faults."""
        check_faults(text, self._binary)
        # Replace atomically, with an mtime of our own: faultfs notices a new
        # file by inode, size and mtime, and a quick rewrite of the same size
        # can reuse the inode within one tick of the file system's clock.
        self._generation += 1
        tmp = self.faults_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        mtime_ns = max(time.time_ns(), self._generation)
        try:
            mtime_ns = max(mtime_ns, os.stat(self.faults_path).st_mtime_ns + 1)
        except FileNotFoundError:
            pass
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.rename(tmp, self.faults_path)

    def clear_faults(self):
        """No faults from the next operation on (removes the faults file)."""
        try:
            os.unlink(self.faults_path)
        except FileNotFoundError:
            pass

    def stats(self):
        """Counts of injected faults by kind: {"fsync-eio": 0,
        "fsync-eio-once": 0, "write-eio": 0, "space": 0, "delay-fsync": 0,
        "bad-faults-file": 0}."""
        counts = {}
        with open(self.stats_path) as f:
            for line in f:
                name, count = line.split()
                counts[name] = int(count)
        return counts

    def log(self):
        """What faultfs wrote to stderr so far (one line per injected fault)."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def close(self):
        """Unmounts, stops faultfs (by PID) and removes the temporary
        directory; idempotent. Raises RuntimeError if the mount or the
        process could not be removed."""
        _live.discard(self)
        if self._proc is not None:
            self._unmount()
            self._stop()
            self._proc = None
        if mount_type(self.mountpoint) is not None:
            # Never remove a directory with a mount below it: rmtree would
            # reach into the mount.
            raise RuntimeError(f"{self.mountpoint} is still mounted")
        shutil.rmtree(self._dir, ignore_errors=True)

    def _unmount(self):
        if mount_type(self.mountpoint) is None:
            return
        r = subprocess.run(["fusermount3", "-u", self.mountpoint], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        if r.returncode != 0 and os.geteuid() == 0:
            subprocess.run(["umount", self.mountpoint], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _stop(self):
        # After an unmount faultfs exits by itself. If the unmount failed
        # (the mount was busy), SIGTERM makes faultfs detach its mount and
        # exit; SIGKILL as a last resort, then a lazy unmount.
        steps = [signal.SIGTERM, signal.SIGKILL]
        if mount_type(self.mountpoint) is None:
            steps.insert(0, None)
        for sig in steps:
            if sig is not None:
                try:
                    os.kill(self._proc.pid, sig)
                except ProcessLookupError:
                    pass
            try:
                self._proc.wait(timeout=STOP_TIMEOUT)
                break
            except subprocess.TimeoutExpired:
                continue
        if mount_type(self.mountpoint) is not None:
            r = subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", self.mountpoint], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        if self._proc.poll() is None:
            raise RuntimeError(f"faultfs (pid {self._proc.pid}) did not exit")
