"""Helpers for livemig's integration tests: real nbdkit processes serving
livemig.so, driven through libnbd's Python binding and the control socket.

The tests are pytest tests (conftest.py beside this file holds the
fixtures). Run a test file with Debian's interpreter, which has the `nbd`
module and pytest (python3-pytest):

    LIVEMIG_PLUGIN=build/plugin/livemig.so PYTHONPATH=tests/integration \
        /usr/bin/python3 -m pytest tests/integration/test_data.py [-k NAME]

(or `/usr/bin/python3 tests/integration/test_data.py [-k NAME]`, which runs
pytest on that file), or through CTest (`ctest -R integration`), which sets
the environment and writes JUnit XML into the build directory.

Every nbdkit this module starts is killed by PID (SIGTERM, then SIGKILL)
when its `with Server(...)` block ends (after its libnbd handles are closed:
nbdkit waits for its NBD clients to hang up before it exits on SIGTERM), when
the script exits (atexit) or when the script is terminated (SIGTERM). A
foreground nbdkit also runs with --exit-with-parent, so not even a SIGKILL
of the test leaves it behind. Temporary files live under one mkdtemp
directory ($LIVEMIG_TEST_TMPDIR or the system temp dir), removed at exit.
"""

import atexit
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support", "python"))
import lmsupport  # noqa: E402  (shared with tests/bench)

NBDKIT = os.environ.get("NBDKIT", "nbdkit")
START_TIMEOUT = 20.0  # seconds for nbdkit to become ready (write its pidfile)
STOP_TIMEOUT = 10.0   # seconds between SIGTERM and SIGKILL

KiB = 1024
MiB = 1024 * KiB


def plugin_path():
    """The livemig.so under test, from $LIVEMIG_PLUGIN (set by CTest)."""
    p = os.environ.get("LIVEMIG_PLUGIN")
    if not p:
        build = os.environ.get("LIVEMIG_BUILD_DIR")
        if build:
            p = os.path.join(build, "plugin", "livemig.so")
    if not p or not os.path.isfile(p):
        raise RuntimeError(f"livemig.so not found (LIVEMIG_PLUGIN={p!r}); "
                           "set LIVEMIG_PLUGIN or run through ctest")
    return os.path.abspath(p)


# --------------------------------------------------------------------------
# Temporary files

_tmp_root = None


def tmp_root():
    """One directory per test script, removed at exit. $LIVEMIG_TEST_TMPDIR
    chooses its parent (default: the system temp dir)."""
    global _tmp_root
    if _tmp_root is None:
        _tmp_root = tempfile.mkdtemp(prefix="livemig-it-", dir=os.environ.get("LIVEMIG_TEST_TMPDIR"))
    return _tmp_root


def tmp_dir(prefix="t"):
    """A fresh directory under tmp_root()."""
    return tempfile.mkdtemp(prefix=prefix + "-", dir=tmp_root())


def make_image(size, name="disk.img", dir=None, data=None):
    """Creates a sparse raw image of `size` bytes (optionally with `data` at
    offset 0) and returns its path."""
    path = os.path.join(dir or tmp_dir("img"), name)
    with open(path, "wb") as f:
        if data:
            f.write(data)
        f.truncate(size)
    return path


_test_secret = None


def test_secret():
    """The key file every plugin of this test script listens with (a Server
    with listen= and no secret= gets it), created once (mode 0600, 64 hex
    digits). $LIVEMIG_SECRET_FILE points at it, so migrate-nbd and livemigd
    started by the tests find it: there is no built-in key."""
    global _test_secret
    if _test_secret is None:
        path = os.path.join(tmp_root(), "test-psk")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex() + "\n")
        _test_secret = path
        os.environ["LIVEMIG_SECRET_FILE"] = path
    return _test_secret


_test_tls_psk = None


def test_tls_psk():
    """A TLS pre-shared key file in nbdkit's --tls-psk format (one
    "lmtest:HEX" line, mode 0600), made once: plugins listening on a
    non-loopback address (TLS is required there) use it."""
    global _test_tls_psk
    if _test_tls_psk is None:
        _test_tls_psk = lmsupport.write_tls_psk(os.path.join(tmp_root(), "test-tls.psk"), "lmtest")
    return _test_tls_psk


def read_file(path, offset=0, length=None):
    """The bytes of a file as they are now, read with plain file I/O."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)


def require_seek_hole(dir):
    """Fails unless the file system under `dir` reports holes with SEEK_DATA /
    SEEK_HOLE (ext4, xfs, btrfs and tmpfs do, at block or page granularity).
    Returns that granularity: the file system's block size."""
    path = os.path.join(dir, ".seek-hole-probe")
    gran = os.statvfs(dir).f_bsize
    try:
        with open(path, "wb") as f:
            f.truncate(64 * gran)
            f.seek(32 * gran)
            f.write(b"x" * gran)
            f.flush()
            os.fsync(f.fileno())
            fd = f.fileno()
            data = os.lseek(fd, 0, os.SEEK_DATA)
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        if data != 32 * gran or hole != 33 * gran:
            raise AssertionError(f"{dir}: SEEK_DATA/SEEK_HOLE do not report holes "
                                 f"(data at {data}, hole at {hole}); set LIVEMIG_TEST_TMPDIR "
                                 "to a directory on ext4, xfs, btrfs or tmpfs")
    finally:
        os.unlink(path)
    return gran


# --------------------------------------------------------------------------
# nbdkit processes

_live = {}  # pid -> Popen (or Daemon) of every nbdkit this script started and not yet reaped


class Daemon:
    """A Popen-like handle on a process that forked itself into the
    background (nbdkit without -f). The test process is made a child
    subreaper first, so the daemon is re-parented to it and can be waited for
    and its exit status read, like a child's."""

    def __init__(self, pid):
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not ours to reap: just check it is gone
                if not _pid_alive(self.pid):
                    self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode


def _children_with_arg(arg):
    """PIDs of this process's children whose command line includes `arg`."""
    me = os.getpid()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != me:
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if arg.encode() in f.read().split(b"\0"):
                    out.append(int(d))
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return out


def _pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def become_subreaper():
    """Makes orphaned descendants (daemonized nbdkit) children of this
    process (prctl PR_SET_CHILD_SUBREAPER), so they can be reaped here."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_CHILD_SUBREAPER = 36
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _kill(proc, timeout=STOP_TIMEOUT):
    """SIGTERM, then SIGKILL after `timeout`; always reaps. By PID only.
    Returns True if SIGKILL was needed (the process ignored SIGTERM)."""
    hard = False
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            hard = True
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    _live.pop(proc.pid, None)
    return hard


def _kill_all():
    for proc in list(_live.values()):
        _kill(proc, timeout=3)


def _at_exit():
    _kill_all()  # first, so no nbdkit still has a file open in the temp dir
    if _tmp_root:
        shutil.rmtree(_tmp_root, ignore_errors=True)


atexit.register(_at_exit)


def _on_sigterm(signum, frame):
    # Turn a termination (e.g. a CTest timeout) into SystemExit so that the
    # finally blocks and atexit handlers kill our nbdkit processes.
    raise SystemExit(128 + signum)


signal.signal(signal.SIGTERM, _on_sigterm)


class ServerDied(RuntimeError):
    pass


class Server:
    """One nbdkit serving livemig.so on a Unix socket in a fresh temp dir.

        with Server(image=path, control=True, **{"segment-size": "64K"}) as s:
            h = s.connect()
            s.control({"op": "status"})

    Keys are passed as key=value (None values are left out; True/False become
    true/false). control=True puts the control socket in the temp dir;
    control="/some/path" uses that path (a relative one is relative to
    `cwd`, default the server's temp dir). `args` are extra raw arguments
    after the plugin (e.g. ["frobnicate=1"]); `nbdkit_args` go before it.

    background=True runs nbdkit the way a daemon is run: without -f, so it
    forks, the parent exits and the child changes directory to /. The child
    is still killed by PID (from --pidfile) and reaped here.

    env: extra environment variables for nbdkit (the plugin's test hooks,
    e.g. {"LIVEMIG_TEST_CRASH_AT": "destination-after-commit"}); a restart
    with start() uses the current value of .env. pass_fds: descriptors
    nbdkit inherits (for secret=-FD).
    """

    def __init__(self, control=False, args=(), nbdkit_args=(), background=False, cwd=None, env=None, pass_fds=(),
                 **keys):
        self.dir = tmp_dir("srv")
        self.cwd = cwd or self.dir
        self.background = background
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.pidfile = os.path.join(self.dir, "nbdkit.pid")
        self.stderr_path = os.path.join(self.dir, "nbdkit.stderr")
        # A listening plugin gets the test's shared key unless the test
        # names one (secret=PATH) or wants none (secret=None: the plugin
        # then makes its own random key file).
        if keys.get("listen") and "secret" not in keys:
            keys["secret"] = test_secret()
        if control is True:
            self.control_path = os.path.join(self.dir, "control.sock")
        else:
            self.control_path = control or None
        if self.control_path:
            keys["control"] = self.control_path
            self.control_path = os.path.join(self.cwd, self.control_path)
        self.keys = keys
        self.argv = lmsupport.nbdkit_argv(plugin_path(), [*lmsupport.key_args(keys), *args], sock=self.sock,
                                          pidfile=self.pidfile, nbdkit=NBDKIT, foreground=not background,
                                          nbdkit_args=nbdkit_args)
        self.env = dict(env or {})
        self.pass_fds = tuple(pass_fds)
        self.proc = None
        self.returncode = None
        self.needed_sigkill = False
        self._handles = []

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    @property
    def pid(self):
        return self.proc.pid

    def stderr(self):
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def start(self):
        self._err = open(self.stderr_path, "wb")
        if self.background:
            become_subreaper()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._err,
                                     stderr=self._err, cwd=self.cwd, env={**os.environ, **self.env},
                                     pass_fds=self.pass_fds)
        _live[self.proc.pid] = self.proc
        try:
            if self.background:
                self._wait_daemon()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_daemon(self):
        # The parent exits right after the fork, maybe before the child has
        # written the pidfile. As a subreaper we are the child's parent now:
        # find it among our children (by its socket path), then wait for the
        # pidfile like in the foreground case.
        launcher = self.proc
        try:
            rc = launcher.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise ServerDied(f"nbdkit did not fork into the background within {START_TIMEOUT}s\n"
                             f"  command: {' '.join(self.argv)}\n  stderr:\n{self.stderr()}") from None
        _live.pop(launcher.pid, None)
        children = _children_with_arg(self.sock)
        if rc != 0 or len(children) != 1:
            for pid in children:  # ours, by PID: do not leave them behind
                d = Daemon(pid)
                _live[pid] = d
                _kill(d, timeout=3)
        if rc != 0:
            raise ServerDied(f"nbdkit exited with status {rc} during start-up\n"
                             f"  command: {' '.join(self.argv)}\n  stderr:\n{self.stderr()}")
        if len(children) != 1:
            raise ServerDied(f"cannot find the background nbdkit among our children: {children}\n"
                             f"  stderr:\n{self.stderr()}")
        self.proc = Daemon(children[0])
        _live[self.proc.pid] = self.proc

    def _wait_ready(self):
        # .get_ready binds the control socket before nbdkit writes --pidfile.
        why = lmsupport.wait_for_pidfile(self.proc, self.pidfile, START_TIMEOUT)
        if why:
            raise ServerDied(f"nbdkit {why} during start-up\n"
                             f"  command: {' '.join(self.argv)}\n  stderr:\n{self.stderr()}")
        missing = [p for p in (self.sock, self.control_path) if p and not os.path.exists(p)]
        if missing:
            raise ServerDied(f"nbdkit is ready but {missing} do not exist\n  stderr:\n{self.stderr()}")

    def stop(self, close_handles=True):
        """Stops nbdkit (SIGTERM, SIGKILL if it has not exited after
        STOP_TIMEOUT). Afterwards .returncode is its exit status and
        .needed_sigkill tells whether SIGTERM was ignored."""
        if close_handles:
            for h in self._handles:
                _close_handle(h)
            self._handles.clear()
        if self.proc is not None:
            self.needed_sigkill = _kill(self.proc)
            self.returncode = self.proc.returncode
            for h in self._handles:
                _close_handle(h)
            self._handles.clear()
        if getattr(self, "_err", None):
            self._err.close()
            self._err = None

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        self.stop()
        if exc_type is None and self.needed_sigkill:
            raise AssertionError(f"nbdkit ignored SIGTERM for {STOP_TIMEOUT}s after its clients "
                                 f"disconnected (killed with SIGKILL)\n  stderr:\n{self.stderr()}")
        return False

    def kill(self, sig):
        """Sends `sig` to this nbdkit (by PID) and, unless it is SIGSTOP or
        SIGCONT, waits for it to exit; returns the exit status."""
        os.kill(self.proc.pid, sig)
        if sig in (signal.SIGSTOP, signal.SIGCONT):
            return None
        self.proc.wait(STOP_TIMEOUT)
        _live.pop(self.proc.pid, None)
        return self.proc.returncode

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def connect(self, meta_contexts=("base:allocation",)):
        """A connected libnbd handle; closed when the server stops."""
        h = nbd.NBD()
        for m in meta_contexts:
            h.add_meta_context(m)
        h.connect_uri(self.uri)
        self._handles.append(h)
        return h

    def disconnect(self, h, ignore_errors=False):
        """Shuts one handle down cleanly (NBD_CMD_DISC) and closes it. A
        failed shutdown raises unless ignore_errors (e.g. when the server
        may have closed the connection already)."""
        self._handles.remove(h)
        try:
            h.shutdown()
        except nbd.Error:
            if not ignore_errors:
                raise
        finally:
            _close_handle(h)

    def control(self, obj):
        """Sends one JSON request line on a fresh control connection and
        returns the parsed reply."""
        with ControlClient(self.control_path) as c:
            return c.request(obj)


def _close_handle(h):
    """Disconnects and closes a libnbd handle now rather than at garbage
    collection (this libnbd's Python binding has no close())."""
    try:
        h.shutdown()
    except nbd.Error:
        pass
    if hasattr(h, "_o"):
        nbd.libnbdmod.close(h._o)
        del h._o


class SocketClient:
    """A connection (self.sock) closed at the end of a `with` block."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        self.sock.close()


class ControlClient(SocketClient):
    """One connection to a control socket; a request per line, a reply per line."""

    def __init__(self, path, timeout=10):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        # With a timeout the socket is non-blocking, and a Unix socket's
        # connect fails with EAGAIN (rather than waiting) while the server's
        # listen backlog is full: retry until the deadline.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise
                time.sleep(0.01)
        self.buf = b""

    def send_raw(self, data):
        self.sock.sendall(data)

    def read_line(self):
        """The next reply line (without the newline), or None at EOF."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def read_reply(self):
        line = self.read_line()
        if line is None:
            raise AssertionError("control socket closed without a reply")
        return json.loads(line)

    def request(self, obj):
        self.send_raw(json.dumps(obj).encode() + b"\n")
        return self.read_reply()

    def at_eof(self):
        """True if the server has closed the connection (nothing more to read)."""
        if self.buf:
            return False
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def run_nbdkit_expect_failure(args, timeout=20):
    """Runs `nbdkit -f -U <sock> livemig.so ARGS...`, which must exit by itself
    (a start-up failure). Returns (returncode, stderr). If nbdkit is still
    running after `timeout`, it is killed and the test fails."""
    d = tmp_dir("fail")
    argv = [NBDKIT, "-f", "--exit-with-parent", "-U", os.path.join(d, "nbd.sock"), plugin_path(), *args]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _live[proc.pid] = proc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise AssertionError(f"nbdkit did not exit within {timeout}s (it started serving?): {' '.join(argv)}")
    _live.pop(proc.pid, None)
    return proc.returncode, err.decode(errors="replace")


# --------------------------------------------------------------------------
# Helpers for tests

def nbd_read_all(h, size, chunk=4 * MiB):
    """The whole export, read through NBD."""
    out = bytearray()
    off = 0
    while off < size:
        n = min(chunk, size - off)
        out += h.pread(n, off)
        off += n
    return bytes(out)


def first_difference(a, b):
    """Offset of the first byte where a and b differ, or None if equal."""
    if a == b:
        return None
    n = min(len(a), len(b))
    step = 4096
    for off in range(0, n, step):
        if a[off:off + step] != b[off:off + step]:
            for i in range(off, min(off + step, n)):
                if a[i] != b[i]:
                    return i
    return n


def assert_same(actual, expected, what):
    off = first_difference(actual, expected)
    if off is not None:
        raise AssertionError(
            f"{what}: differs from what was written at offset {off} (of {len(expected)} bytes; "
            f"got length {len(actual)}): got {actual[off:off + 16].hex()} "
            f"expected {expected[off:off + 16].hex()}")


def block_status_map(h, size, offset=0, flags=0):
    """base:allocation extents of [offset, offset+size) as a list of
    (offset, length, flags), adjacent extents with equal flags merged."""
    extents = []
    end = offset + size
    pos = offset
    while pos < end:
        got = []

        def cb(metacontext, off, entries, err):
            if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(entries)
            return 0

        h.block_status(end - pos, pos, cb, flags)
        if not got:
            raise AssertionError(f"block_status at {pos} returned no extents")
        for i in range(0, len(got), 2):
            length, fl = got[i], got[i + 1]
            length = min(length, end - pos)
            if length == 0:
                break
            if extents and extents[-1][2] == fl and extents[-1][0] + extents[-1][1] == pos:
                o, l, f = extents[-1]
                extents[-1] = (o, l + length, f)
            else:
                extents.append((pos, length, fl))
            pos += length
            if pos >= end:
                break
    return extents


def nbd_errno(e):
    """The numeric errno of an nbd.Error (its .errno attribute is the name)."""
    if len(e.args) > 1 and isinstance(e.args[1], int):
        return e.args[1]
    return getattr(errno, str(e.errno), None)


def expect_nbd_error(fn, errnos, what):
    """Calls fn(); it must raise nbd.Error with an errno in `errnos`."""
    try:
        fn()
    except nbd.Error as e:
        if nbd_errno(e) not in errnos:
            raise AssertionError(f"{what}: failed with errno {e.errno}, expected one of "
                                 f"{sorted(errno.errorcode[x] for x in errnos)}: {e}") from None
        return e
    raise AssertionError(f"{what}: succeeded, expected an error")


def wait_until(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
