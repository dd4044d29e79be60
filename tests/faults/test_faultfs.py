"""faultfs's own tests: what the fault tests built on it rely on. Each test
mounts a fresh faultfs (tests/faults/faultfs.py) and unmounts it, also on
failure.

    LIVEMIG_BUILD_DIR=build /usr/bin/python3 tests/faults/test_faultfs.py [NAME...]

or `ctest -R faults`. Tests run in file order; each prints PASS or FAIL; the
exit status is non-zero if any failed.
"""

import ctypes
import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import faultfs  # noqa: E402
from faultfs import FaultFS  # noqa: E402

KiB = 1024
MiB = 1024 * KiB

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd, mode, offset, length):
    """fallocate(2), which Python's os module lacks (it has posix_fallocate)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def expect_errno(err, fn, *args):
    """Calls fn(*args) and fails unless it raises OSError with errno `err`."""
    try:
        fn(*args)
    except OSError as e:
        if e.errno != err:
            raise AssertionError(f"{fn.__name__}: expected {errno.errorcode[err]}, got {e!r}") from e
        return
    raise AssertionError(f"{fn.__name__}: expected {errno.errorcode[err]}, but it succeeded")


def assert_eq(actual, expected, what):
    if actual != expected:
        raise AssertionError(f"{what}: expected {expected!r}, got {actual!r}")


def read_all(path):
    with open(path, "rb") as f:
        return f.read()


def write_file(path, data, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC):
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def open_rw(fs, name, data=b""):
    """An fd of file `name` under the mount, created if need be, with `data`
    written at offset 0."""
    fd = os.open(fs.path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    if data:
        os.pwrite(fd, data, 0)
    return fd


def extents(fd, size):
    """[(data_start, data_end), ...] of an fd, by SEEK_DATA / SEEK_HOLE."""
    out, pos = [], 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        out.append((data, hole))
        pos = hole
    return out


_tests = []


def test(fn):
    _tests.append(fn)
    return fn


# ---------------------------------------------------------------------------


@test
def data_round_trip_rename_over_and_unlink():
    with FaultFS() as fs:
        data = os.urandom(3 * MiB + 123)
        write_file(fs.path("disk.img"), data, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC)
        assert_eq(read_all(fs.path("disk.img")), data, "read back through the mount")
        assert_eq(read_all(os.path.join(fs.backing_dir, "disk.img")), data, "the backing file")
        expect_errno(errno.EEXIST, os.open, fs.path("disk.img"), os.O_RDWR | os.O_CREAT | os.O_EXCL)

        # The state file's pattern: write X.tmp, fsync, rename over X, fsync the directory.
        write_file(fs.path("state"), b"old")
        fd = os.open(fs.path("state.tmp"), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.pwrite(fd, b"new state", 0)
        os.fsync(fd)
        os.rename(fs.path("state.tmp"), fs.path("state"))
        dfd = os.open(fs.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.fdatasync(dfd)
        os.close(dfd)
        os.pwrite(fd, b"NEW", 0)  # the fd follows the file to its new name
        os.fdatasync(fd)
        assert_eq(os.fstat(fd).st_size, 9, "fstat of the renamed file")
        os.close(fd)
        assert_eq(read_all(fs.path("state")), b"NEW state", "the renamed file")
        assert_eq(sorted(os.listdir(fs.mountpoint)), ["disk.img", "state"], "listing after rename")

        # O_TRUNC, ftruncate, truncate by path, chmod, utime, statfs.
        write_file(fs.path("state"), b"xy")
        assert_eq(read_all(fs.path("state")), b"xy", "after O_TRUNC")
        os.truncate(fs.path("state"), 10)
        assert_eq(read_all(fs.path("state")), b"xy" + bytes(8), "after truncate")
        os.chmod(fs.path("state"), 0o640)
        os.utime(fs.path("state"), ns=(1_000_000_000, 2_000_000_000))
        st = os.stat(os.path.join(fs.backing_dir, "state"))
        assert_eq((st.st_mode & 0o777, st.st_mtime_ns), (0o640, 2_000_000_000), "mode and mtime")
        assert_eq(os.statvfs(fs.mountpoint).f_blocks, os.statvfs(fs.backing_dir).f_blocks, "statfs")

        # An unlinked file stays usable through its open fd.
        fd = os.open(fs.path("disk.img"), os.O_RDWR)
        os.unlink(fs.path("disk.img"))
        assert_eq(os.pread(fd, 5, 1000), data[1000:1005], "read of an unlinked open file")
        os.pwrite(fd, b"z", 0)
        os.fsync(fd)
        os.close(fd)
        assert_eq(os.listdir(fs.backing_dir), ["state"], "backing dir after unlink")

        os.mkdir(fs.path("sub"))
        write_file(fs.path("sub/f"), b"1")
        expect_errno(errno.ENOTEMPTY, os.rmdir, fs.path("sub"))
        os.unlink(fs.path("sub/f"))
        os.rmdir(fs.path("sub"))
        assert_eq(os.listdir(fs.mountpoint), ["state"], "listing after rmdir")


@test
def seek_data_and_seek_hole_match_the_backing_file():
    with FaultFS() as fs:
        size = 64 * MiB
        fd = open_rw(fs, "sparse.img")
        os.ftruncate(fd, size)
        for off, n in ((1 * MiB, 4 * KiB), (8 * MiB, 64 * KiB), (8 * MiB + 64 * KiB, 4 * KiB), (size - 4 * KiB, 4 * KiB)):
            os.pwrite(fd, b"d" * n, off)
        os.fsync(fd)
        got = extents(fd, size)
        bfd = os.open(os.path.join(fs.backing_dir, "sparse.img"), os.O_RDONLY)
        want = extents(bfd, size)
        os.close(bfd)
        assert_eq(got, want, "extents through the mount vs the backing file")
        if len(want) < 3:
            raise AssertionError(f"the backing file system reports no holes ({want}); "
                                 "set LIVEMIG_TEST_TMPDIR to ext4, xfs, btrfs or tmpfs")
        assert_eq(os.lseek(fd, 0, os.SEEK_HOLE), 0, "SEEK_HOLE at 0")
        assert_eq(os.lseek(fd, 0, os.SEEK_DATA), 1 * MiB, "SEEK_DATA from 0")
        expect_errno(errno.ENXIO, os.lseek, fd, size, os.SEEK_DATA)
        os.close(fd)


@test
def punch_hole_and_zero_range_read_back_zeros():
    with FaultFS() as fs:
        fd = open_rw(fs, "img")
        os.write(fd, b"\xaa" * (2 * MiB))
        os.fsync(fd)
        blocks_before = os.stat(os.path.join(fs.backing_dir, "img")).st_blocks
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 256 * KiB, 256 * KiB)
        assert_eq(os.fstat(fd).st_size, 2 * MiB, "size after punch")
        data = os.pread(fd, 2 * MiB, 0)
        assert_eq(data[256 * KiB:512 * KiB], bytes(256 * KiB), "punched range")
        assert_eq(data[:256 * KiB] + data[512 * KiB:], b"\xaa" * (2 * MiB - 256 * KiB), "the rest")
        assert_eq(os.lseek(fd, 0, os.SEEK_HOLE), 256 * KiB, "the hole is a hole")
        blocks_after = os.stat(os.path.join(fs.backing_dir, "img")).st_blocks
        assert_eq(blocks_before - blocks_after, 256 * KiB // 512, "blocks freed by the punch")

        # ZERO_RANGE: faultfs forwards it, so it works where the backing file
        # system has it (ext4, xfs) and fails honestly where not (tmpfs).
        probe = os.open(os.path.join(fs.backing_dir, "probe"), os.O_RDWR | os.O_CREAT)
        try:
            fallocate(probe, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, 4096)
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            expect_errno(errno.EOPNOTSUPP, fallocate, fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 1 * MiB, 4096)
            assert_eq(os.pread(fd, 4096, 1 * MiB), b"\xaa" * 4096, "data after a refused ZERO_RANGE")
            os.close(fd)
            return
        finally:
            os.close(probe)
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 1 * MiB, 128 * KiB)
        assert_eq(os.pread(fd, 128 * KiB, 1 * MiB), bytes(128 * KiB), "zeroed range")
        assert_eq(os.pread(fd, 1, 1 * MiB + 128 * KiB), b"\xaa", "after the zeroed range")
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 2 * MiB, 64 * KiB)  # extends the file
        assert_eq(os.fstat(fd).st_size, 2 * MiB + 64 * KiB, "size after ZERO_RANGE past the end")
        os.posix_fallocate(fd, 0, 4 * MiB)
        assert_eq(os.fstat(fd).st_size, 4 * MiB, "size after posix_fallocate")
        os.close(fd)


@test
def flock_exclusive_blocks_a_second_open_file():
    with FaultFS() as fs:
        fd1 = os.open(fs.path("state.tmp"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fd2 = os.open(fs.path("state.tmp"), os.O_RDWR | os.O_CLOEXEC)
        fcntl.flock(fd1, fcntl.LOCK_EX | fcntl.LOCK_NB)
        expect_errno(errno.EWOULDBLOCK, fcntl.flock, fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The lock stays with the file across the rename over the final name,
        # and another process sees it.
        os.rename(fs.path("state.tmp"), fs.path("state"))
        probe = ("import fcntl, os, sys\n"
                 "fd = os.open(sys.argv[1], os.O_RDWR)\n"
                 "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(11)\n")
        r = subprocess.run([sys.executable, "-c", probe, fs.path("state")])
        assert_eq(r.returncode, 11, "exit status of a process trying the lock (11: EWOULDBLOCK)")
        os.close(fd1)  # releases the lock
        fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = subprocess.run([sys.executable, "-c", probe, fs.path("state")])
        assert_eq(r.returncode, 11, "the lock taken by the second fd, seen by another process")
        os.close(fd2)
        r = subprocess.run([sys.executable, "-c", probe, fs.path("state")])
        assert_eq(r.returncode, 0, "no lock once both are closed")


@test
def fsync_eio_fails_every_fsync_until_cleared():
    with FaultFS() as fs:
        fd = open_rw(fs, "img", b"x" * 4096)
        os.fsync(fd)
        fs.set_faults("# every fsync\nfsync eio\n")
        expect_errno(errno.EIO, os.fsync, fd)
        expect_errno(errno.EIO, os.fdatasync, fd)
        expect_errno(errno.EIO, os.fsync, fd)
        dfd = os.open(fs.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)  # directories are not affected
        os.close(dfd)
        os.write(fd, b"y")  # nor writes
        fs.clear_faults()
        os.fsync(fd)
        os.fdatasync(fd)
        os.close(fd)
        assert_eq(fs.stats()["fsync-eio"], 3, "fsync-eio count")


@test
def fsync_eio_once_fails_exactly_once():
    with FaultFS() as fs:
        fd = open_rw(fs, "img", b"x" * 4096)
        fs.set_faults("fsync eio-once\n")
        expect_errno(errno.EIO, os.fdatasync, fd)
        for _ in range(3):
            os.fdatasync(fd)
            os.fsync(fd)
        assert_eq(fs.stats()["fsync-eio-once"], 1, "count after one failure")
        fs.set_faults("fsync eio-once\n")  # the same text again re-arms it
        expect_errno(errno.EIO, os.fsync, fd)
        os.fsync(fd)
        os.close(fd)
        assert_eq(fs.stats()["fsync-eio-once"], 2, "count after re-arming")


@test
def space_cap_fails_writes_with_enospc_until_space_is_freed():
    with FaultFS() as fs:
        fs.set_faults("space 1M\n")
        vfs = os.statvfs(fs.mountpoint)
        assert_eq(vfs.f_blocks * vfs.f_frsize, 1 * MiB, "statfs size under the cap")
        fd = open_rw(fs, "img")
        chunk = b"s" * (64 * KiB)
        written = 0
        try:
            while written < 2 * MiB:
                written += os.write(fd, chunk)
            raise AssertionError("wrote 2 MiB under a 1 MiB cap")
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
        if not 512 * KiB <= written <= 1 * MiB:
            raise AssertionError(f"ENOSPC after {written} bytes; expected between 512 KiB and 1 MiB")
        used = os.stat(os.path.join(fs.backing_dir, "img")).st_blocks * 512
        if used > 1 * MiB:
            raise AssertionError(f"backing file holds {used} bytes under a 1 MiB cap")
        assert_eq(os.pread(fd, written, 0), b"s" * written, "what was written before ENOSPC")
        os.pwrite(fd, b"o" * (64 * KiB), 0)  # overwriting allocated blocks needs no space
        expect_errno(errno.ENOSPC, os.posix_fallocate, fd, 0, 2 * MiB)
        n = fs.stats()["space"]
        if n < 2:
            raise AssertionError(f"space count {n}, expected at least 2")

        os.ftruncate(fd, 0)  # frees the blocks
        os.lseek(fd, 0, os.SEEK_SET)
        for _ in range(8):
            os.write(fd, chunk)
        os.fsync(fd)
        assert_eq(os.fstat(fd).st_size, 512 * KiB, "size after writing again")
        fs.clear_faults()
        os.pwrite(fd, chunk, 2 * MiB)
        os.close(fd)


@test
def write_eio_fails_the_write_itself():
    with FaultFS() as fs:
        fd = open_rw(fs, "img", b"a" * 4096)
        fs.set_faults("write eio\n")
        expect_errno(errno.EIO, os.pwrite, fd, b"b" * 4096, 0)
        expect_errno(errno.EIO, os.pwrite, fd, b"b" * 4096, 8192)
        os.fsync(fd)  # fsync is not affected
        assert_eq(read_all(os.path.join(fs.backing_dir, "img")), b"a" * 4096, "backing file after failed writes")
        fs.clear_faults()
        os.pwrite(fd, b"c" * 4096, 0)
        os.close(fd)
        assert_eq(read_all(fs.path("img")), b"c" * 4096, "after clearing")
        assert_eq(fs.stats()["write-eio"], 2, "write-eio count")


@test
def path_filter_applies_only_to_matching_names():
    with FaultFS() as fs:
        img = open_rw(fs, "disk.img")
        tmp = open_rw(fs, "disk.img.livemig-state.tmp")
        fs.set_faults("fsync eio path=.livemig-state\nwrite eio path=.log\n")
        os.write(img, b"i")
        os.fsync(img)
        os.write(tmp, b"t")
        os.fsync(tmp)  # ".tmp" does not match
        os.rename(fs.path("disk.img.livemig-state.tmp"), fs.path("disk.img.livemig-state"))
        expect_errno(errno.EIO, os.fsync, tmp)  # the same fd under its new name does
        os.fsync(img)
        write_file(fs.path("other.log.1"), b"ok")
        expect_errno(errno.EIO, write_file, fs.path("x.log"), b"no")
        os.close(img)
        os.close(tmp)
        s = fs.stats()
        assert_eq((s["fsync-eio"], s["write-eio"]), (1, 1), "counts")


@test
def stats_and_log_count_each_injected_fault():
    with FaultFS() as fs:
        assert_eq(fs.stats(), {"fsync-eio": 0, "fsync-eio-once": 0, "write-eio": 0, "space": 0,
                               "delay-fsync": 0, "bad-faults-file": 0}, "stats at start")
        fd = open_rw(fs, "img")
        fs.set_faults("delay-fsync 200\nfsync eio-once\n")
        t0 = time.monotonic()
        expect_errno(errno.EIO, os.fsync, fd)
        os.fsync(fd)
        elapsed = time.monotonic() - t0
        if elapsed < 0.4:
            raise AssertionError(f"two fsyncs delayed 200 ms each took {elapsed:.3f}s")
        fs.set_faults("write eio\n")
        expect_errno(errno.EIO, os.write, fd, b"x")
        os.close(fd)
        assert_eq(fs.stats(), {"fsync-eio": 0, "fsync-eio-once": 1, "write-eio": 1, "space": 0,
                               "delay-fsync": 2, "bad-faults-file": 0}, "stats")
        injected = [line for line in fs.log().splitlines() if line.startswith("faultfs: injected ")]
        assert_eq(len(injected), 4, f"log lines of injected faults in {fs.log()!r}")


@test
def a_bad_faults_file_is_refused_and_means_no_faults():
    with FaultFS() as fs:
        for bad in ("fsync sometimes\n", "space lots\n", "write eio path=\n", "delay-fsync 5M\n",
                    "fsync eio path=a path=b\n", "fsync\n"):
            try:
                fs.set_faults(bad)
            except ValueError:
                continue
            raise AssertionError(f"set_faults accepted {bad!r}")
        # A bad file written behind the helper's back: logged, counted, no faults.
        with open(fs.faults_path, "w") as f:
            f.write("fsync eio\nfsync never\n")
        fd = open_rw(fs, "img")
        os.fsync(fd)
        os.close(fd)
        assert_eq(fs.stats()["bad-faults-file"], 1, "bad-faults-file count")
        if "line 2: unknown fault 'fsync never'" not in fs.log():
            raise AssertionError(f"no error in the log: {fs.log()!r}")


@test
def unmount_leaves_no_process_and_no_mount():
    fs = FaultFS()
    with fs:
        pid, mnt = fs.pid, fs.mountpoint
        assert_eq(faultfs.mount_type(mnt), "fuse.faultfs", "mount type while up")
        assert_eq(faultfs.pid_running(pid), True, "faultfs running while mounted")
    assert_eq((faultfs.pid_running(pid), faultfs.mount_type(mnt)), (False, None), "after a clean exit")

    # A file still open (the mount is busy) and an exception in the block.
    try:
        with FaultFS() as fs:
            pid, mnt = fs.pid, fs.mountpoint
            fd = open_rw(fs, "busy")
            raise KeyError("boom")
    except KeyError:
        pass
    assert_eq((faultfs.pid_running(pid), faultfs.mount_type(mnt)), (False, None), "after an exception, busy")
    expect_errno(errno.ENOTCONN, os.write, fd, b"x")  # the file system is gone
    try:
        os.close(fd)  # closes the fd, though its flush fails with ENOTCONN
    except OSError:
        pass
    assert_eq(os.path.exists(mnt), False, "temporary directory removed")


@test
def faultfs_exits_and_unmounts_when_its_test_is_killed():
    # A test process killed with SIGKILL runs no cleanup: --exit-with-parent
    # makes faultfs unmount and exit by itself.
    child = ("import os, sys, time\n"
             f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
             "import faultfs\n"
             "fs = faultfs.FaultFS(); fs.start()\n"
             "print(fs.pid, fs.mountpoint, flush=True)\n"
             "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        pid, mnt = p.stdout.readline().split()
        pid = int(pid)
        assert_eq(faultfs.mount_type(mnt), "fuse.faultfs", "mounted by the child")
    finally:
        p.kill()
        p.wait()
    deadline = time.monotonic() + 10
    while (faultfs.pid_running(pid) or faultfs.mount_type(mnt)) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert_eq((faultfs.pid_running(pid), faultfs.mount_type(mnt)), (False, None), "after SIGKILL of the parent")
    finally:
        if faultfs.pid_running(pid):
            os.kill(pid, signal.SIGKILL)
        if faultfs.mount_type(mnt) is None:
            shutil.rmtree(os.path.dirname(mnt), ignore_errors=True)


def main():
    only = sys.argv[1:]
    passed = failed = 0
    for fn in _tests:
        if only and fn.__name__ not in only:
            continue
        t0 = time.monotonic()
        try:
            fn()
        except Exception:
            failed += 1
            print(f"FAIL {fn.__name__} ({time.monotonic() - t0:.2f}s)")
            traceback.print_exc(file=sys.stdout)
        else:
            passed += 1
            print(f"PASS {fn.__name__} ({time.monotonic() - t0:.2f}s)")
        sys.stdout.flush()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed or not passed else 0)


if __name__ == "__main__":
    main()
