"""A QEMU VM live-migrated with its disk by `migrate-nbd qemu-migrate`: two
real qemu-system-x86_64 processes (TCG, no guest OS), each with its disk
attached as the NBD export of its own livemig plugin on loopback.

Data is written through the source QEMU's block layer (HMP `qemu-io` on the
virtio-blk device's backend, over QMP human-monitor-command) before and
during the migration; afterwards the destination QEMU must read back every
write with `qemu-io "read -P"`, and the destination plugin's export must
equal, byte for byte, what the writer knows it wrote.

What QEMU does here (7.2), and what the test relies on:
- qemu-io prints to QEMU's stdout, not into the HMP reply: the test reads the
  lines each command adds to the QEMU's stdout file ("wrote ...", "read ...",
  "Pattern verification failed ...", "write failed: ...").
- Both QEMUs open their disk with the node inactive while they are not the
  running side (-incoming at the destination; after migrate-continue at the
  source). A qemu-io *write* on an inactive node aborts QEMU (assertion
  `!(bs->open_flags & BDRV_O_INACTIVE)` in bdrv_co_write_req_prepare), so the
  writer must stop before migrate-continue: migrate-nbd talks to the source
  QEMU through a small QMP proxy here that holds `migrate-continue` until the
  writer thread has finished its last command.
- Between the storage handover and migrate-continue the source plugin sends
  a qemu-io write there on to the destination (issue #17): it counts like
  any other. (A write refused with EPERM, as by a fenced plugin, would not.)

Skipped when qemu-system-x86_64 is not installed.

    LIVEMIG_PLUGIN=build/plugin/livemig.so LIVEMIG_BUILD_DIR=build PYTHONPATH=tests/integration \\
        /usr/bin/python3 -m pytest tests/integration/test_qemu_migration.py [-k NAME]
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import lmtest
import migration as mig
from lmsupport import Qmp
from lmtest import MiB

QEMU = shutil.which("qemu-system-x86_64")
SIZE = 32 * MiB            # the disk
ORIG = 16 * MiB            # the source image's first 16 MiB hold ORIG_BYTE; the rest is a hole
ORIG_BYTE = 0x5A
SLOT = 64 * 1024           # every write goes to its own 64 KiB slot
RAM = 64 * MiB
DEV = "/machine/peripheral/vd0/virtio-backend"   # the virtio-blk device's BlockBackend


def migrate_nbd_path():
    p = os.path.join(os.environ.get("LIVEMIG_BUILD_DIR", "build"), "client-tools", "migrate-nbd")
    if not os.path.isfile(p):
        raise RuntimeError(f"migrate-nbd not found at {p}")
    return p


free_port = mig.free_port


@pytest.fixture(autouse=True, scope="module")
def qemu_installed():
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed (deploy/install-deps.sh installs it)")


def _die_with_parent():
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Qemu:
    """One qemu-system-x86_64 whose virtio-blk disk is the NBD export at
    `nbd_sock`, with two QMP sockets: `qmp_path` for migrate-nbd and one for
    the test. Its RAM is a private mapping of `ram_file` (random bytes at the
    source, so the RAM migration takes a while). Killed by PID on stop()."""

    def __init__(self, name, nbd_sock, ram_file, incoming=False, extra=()):
        self.dir = lmtest.tmp_dir("qemu-" + name)
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        self.test_qmp_path = os.path.join(self.dir, "test-qmp.sock")
        self.stdout_path = os.path.join(self.dir, "stdout")
        self.argv = [QEMU, "-machine", "q35,memory-backend=ram0", "-accel", "tcg", "-nodefaults",
                     "-display", "none", "-m", str(RAM // MiB),
                     "-object", f"memory-backend-file,id=ram0,size={RAM},mem-path={ram_file},share=off",
                     "-blockdev", f"driver=nbd,server.type=unix,server.path={nbd_sock},node-name=disk0",
                     "-device", "virtio-blk-pci,drive=disk0,id=vd0",
                     "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                     "-qmp", f"unix:{self.test_qmp_path},server=on,wait=off"]
        if incoming:
            self.argv += ["-incoming", "defer"]
        self.argv += list(extra)
        self._out = open(self.stdout_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        lmtest._live[self.proc.pid] = self.proc
        try:
            self.qmp = Qmp(self.test_qmp_path, reply_timeout=20)
            lmtest.wait_until(lambda: os.path.exists(self.qmp_path), 10, "the QMP socket")
        except BaseException:
            self.stop()
            raise

    def output(self):
        with open(self.stdout_path, errors="replace") as f:
            return f.read()

    def status(self):
        return self.qmp.execute("query-status")["status"]

    def migration_status(self):
        return self.qmp.execute("query-migrate").get("status", "none")

    def qemu_io(self, command):
        """Runs qemu-io on the disk; returns what it printed (on QEMU's stdout)."""
        before = os.path.getsize(self.stdout_path)
        reply = self.qmp.execute("human-monitor-command", **{"command-line": f'qemu-io -d {DEV} "{command}"'})
        with open(self.stdout_path, "rb") as f:
            f.seek(before)
            return reply + f.read().decode(errors="replace")

    def write(self, off, length, pattern):
        """True if qemu-io wrote it; False if the write failed."""
        out = self.qemu_io(f"write -P 0x{pattern:02x} {off} {length}")
        if f"wrote {length}/{length} bytes" in out and "failed" not in out:
            return True
        if "write failed: Operation not permitted" in out:   # EROFS from a fenced plugin, as NBD carries it
            return False
        raise AssertionError(f"unexpected qemu-io output for write {off}+{length}: {out!r}")

    def check_read(self, off, length, pattern, what):
        out = self.qemu_io(f"read -P 0x{pattern:02x} {off} {length}")
        if f"read {length}/{length} bytes" not in out or "failed" in out:
            raise AssertionError(f"{what}: qemu-io read -P 0x{pattern:02x} {off} {length}: {out!r}")

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if getattr(self, "qmp", None):
            self.qmp.close()
            self.qmp = None
        lmtest._kill(self.proc)
        self._out.close()


class QmpGate:
    """A QMP proxy for migrate-nbd in front of the source QEMU. It passes
    every line through, but calls hold() before it passes `migrate-continue`
    on (the writer must stop first: a qemu-io write after it would abort
    QEMU), and on_status(line) before it passes on a line from QEMU that
    reports the migration status 'pre-switchover'."""

    def __init__(self, upstream, hold=None, on_pre_switchover=None):
        self.path = os.path.join(lmtest.tmp_dir("gate"), "qmp.sock")
        self.upstream = upstream
        self.hold, self.on_pre_switchover = hold, on_pre_switchover
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.held = False
        self.socks = [self.listener]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.socket(socket.AF_UNIX)
        server.connect(self.upstream)
        self.socks += [client, server]
        threading.Thread(target=self._pump, args=(server, client, self._from_qemu), daemon=True).start()
        self._pump(client, server, self._to_qemu)

    def _to_qemu(self, line):
        if self.hold and b'"migrate-continue"' in line:
            self.hold()
            self.held = True

    def _from_qemu(self, line):
        if self.on_pre_switchover and b'"pre-switchover"' in line:
            self.on_pre_switchover()
            self.on_pre_switchover = None

    def _pump(self, a, b, look):
        buf = b""
        try:
            while True:
                chunk = a.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    look(line)
                    b.sendall(line + b"\n")
        except OSError:
            pass
        finally:
            for sock in (a, b):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        for sock in self.socks:
            sock.close()


class Writer(threading.Thread):
    """Writes through the source QEMU (qemu-io on its own QMP connection),
    each write to a fresh slot with its own pattern, until stopped; records
    the writes qemu-io reported done and the migration status before each."""

    def __init__(self, vm, rnd, slots, first_pattern):
        super().__init__(daemon=True)
        self.vm, self.rnd, self.slots = vm, rnd, slots
        self.pattern = first_pattern
        self.done = []          # (off, len, pattern)
        self.failed = []        # (off, len, pattern, migration status after the failure)
        self.statuses = {}      # migration status -> writes issued then
        self.error = None
        self.stop_event = threading.Event()

    def run(self):
        try:
            while not self.stop_event.is_set() and self.slots:
                status = self.vm.migration_status()
                w = take_write(self.rnd, self.slots, next_pattern(self))
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if self.vm.write(*w):
                    self.done.append(w)
                else:
                    self.failed.append((*w, self.vm.migration_status()))
                time.sleep(0.01)
        except Exception as e:  # reported by the test
            self.error = e

    def stop(self):
        self.stop_event.set()
        self.join(30)
        assert not self.is_alive(), "the writer did not stop"


def next_pattern(state):
    """Patterns 0x01..0xff but never the original byte (nor 0)."""
    while True:
        p = state.pattern
        state.pattern = p % 255 + 1
        if p != ORIG_BYTE:
            return p


def take_write(rnd, slots, pattern):
    """A write (off, len, pattern) inside a random unused slot."""
    slot = slots.pop(rnd.randrange(len(slots)))
    length = rnd.choice([4096, 8192, 16384, 32768, SLOT]) if rnd.random() < 0.7 else rnd.randrange(1, 128) * 512
    start = rnd.randrange(0, (SLOT - length) // 512 + 1) * 512
    return slot * SLOT + start, length, pattern


def orig_byte(off):
    """The byte the source image held at `off` before any write."""
    return ORIG_BYTE if off < ORIG else 0


class Setup:
    """Two plugins, two QEMUs (the destination with -incoming defer and
    `dst_args`)."""

    def __init__(self, dst_args=()):
        self.dst_args = dst_args

    def __enter__(self):
        self.cleanup = []
        try:
            return self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _start(self):
        d = lmtest.tmp_dir("vm")
        self.src_image = lmtest.make_image(SIZE, name="src.img", dir=d, data=bytes([ORIG_BYTE]) * ORIG)
        # The destination image exists with the source's size, so the
        # destination QEMU sees the right disk size at -incoming.
        self.dst_image = lmtest.make_image(SIZE, name="dst.img", dir=d)
        ram_src = os.path.join(d, "ram-src")
        with open(ram_src, "wb") as f:
            f.write(random.Random(1).randbytes(RAM))   # not zero pages: the RAM migration takes time
        ram_dst = lmtest.make_image(RAM, name="ram-dst", dir=d)
        self.src = lmtest.Server(control=True, image=self.src_image, listen="127.0.0.1:0")
        self.cleanup.append(self.src.stop)
        self.src.start()
        self.dst = lmtest.Server(control=True, image=self.dst_image, listen="127.0.0.1:0")
        self.cleanup.append(self.dst.stop)
        self.dst.start()
        self.vm_src = Qemu("src", self.src.sock, ram_src)
        self.cleanup.append(self.vm_src.stop)
        self.vm_dst = Qemu("dst", self.dst.sock, ram_dst, incoming=True, extra=self.dst_args)
        self.cleanup.append(self.vm_dst.stop)
        assert self.vm_src.status() == "running", self.vm_src.status()
        assert self.vm_dst.status() == "inmigrate", self.vm_dst.status()
        return self

    def migrate_argv(self, qmp_src, *extra):
        return [migrate_nbd_path(), "qemu-migrate",
                "--from", f"127.0.0.1:{mig.peer_port(self.src)}", "--to", f"127.0.0.1:{mig.peer_port(self.dst)}",
                "--qmp-src", qmp_src, "--qmp-dst", self.vm_dst.qmp_path,
                "--migrate-uri", f"tcp:127.0.0.1:{free_port()}", "--interval", "0.5", *extra]

    def __exit__(self, *exc):
        for fn in reversed(self.cleanup):
            fn()
        return False


def run_tool(argv, timeout=90):
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lmtest._live[p.pid] = p
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        lmtest._kill(p)
        raise AssertionError(f"migrate-nbd did not finish in {timeout}s: {' '.join(argv)}")
    lmtest._live.pop(p.pid, None)
    return p.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def migrate_a_writing_vm(mode, *extra, json_output=False):
    """Writes through the source QEMU, before and while `migrate-nbd
    qemu-migrate --mode MODE` runs, then checks every byte at the
    destination (through its QEMU and through its plugin's export)."""
    rnd = random.Random(42)
    slots = list(range(SIZE // SLOT))
    with Setup() as s:
        model = bytearray([ORIG_BYTE]) * ORIG + bytearray(SIZE - ORIG)
        state = type("P", (), {"pattern": 1})()
        before = []
        for _ in range(24):   # before the migration
            w = take_write(rnd, slots, next_pattern(state))
            assert s.vm_src.write(*w), f"write {w} before the migration failed"
            before.append(w)
        writer = Writer(s.vm_src, rnd, slots, state.pattern)
        at_continue = {}

        def hold():   # migrate-continue is on its way: storage is handed over, QEMU paused
            writer.stop()
            at_continue["dst_stats"] = s.dst.control({"op": "stats"})
            at_continue["dst_status"] = mig.status(s.dst)

        gate = QmpGate(s.vm_src.qmp_path, hold=hold)
        s.cleanup.append(gate.close)
        writer.start()
        argv = s.migrate_argv(gate.path, "--mode", mode, "--max-bandwidth", "24M", *extra)
        rc, out, err = run_tool(argv + (["--json"] if json_output else []))
        writer.stop()
        print("  " + out.replace("\n", "\n  ").rstrip())
        assert writer.error is None, f"the writer failed: {writer.error!r}"
        assert rc == 0, f"qemu-migrate failed ({rc}):\n{out}\n{err}\nsrc QEMU:\n{s.vm_src.output()[-2000:]}"
        assert gate.held, "migrate-continue never passed the gate"
        assert writer.statuses.get("active", 0) > 0, f"no write while the RAM migration ran: {writer.statuses}"
        # A write fails only while the source plugin is fenced and QEMU waits
        # at pre-switchover (between the handover and migrate-continue).
        for f in writer.failed:
            assert f[3] == "pre-switchover", f"a write failed outside the handover window: {f}"
        # Before migrate-continue the destination QEMU had its disk open but
        # wrote nothing (its node is inactive until the migration ends), so
        # nothing was refused. It read one sector at start-up: virtio-blk
        # guesses the CHS geometry from the partition table in sector 0.
        req = at_continue["dst_stats"]["requests"]
        assert req["errors"] == 0, req
        for op in ("pwrite", "zero", "trim", "flush"):
            assert req[op]["count"] == 0, (op, req)
        assert req["pread"]["bytes"] <= 512, req
        assert at_continue["dst_status"]["authoritative"], at_continue["dst_status"]

        writes = before + writer.done
        for off, length, pat in writes:
            model[off:off + length] = bytes([pat]) * length
        assert s.vm_dst.status() == "running", s.vm_dst.status()
        assert s.vm_src.status() == "postmigrate", s.vm_src.status()
        # The destination QEMU reads every write back...
        for off, length, pat in writes:
            s.vm_dst.check_read(off, length, pat, "a write read back at the destination")
        # ...and the slots nobody wrote hold the original bytes.
        for slot in sorted(slots)[::4]:
            s.vm_dst.check_read(slot * SLOT, SLOT, orig_byte(slot * SLOT), "an untouched slot")
        # The destination QEMU's disk is writable.
        assert s.vm_dst.write(0, 4096, 0xEE), "a write at the destination after the migration failed"
        s.vm_dst.check_read(0, 4096, 0xEE, "a write at the destination after the migration")
        model[0:4096] = b"\xee" * 4096
        # The destination plugin's export holds exactly what was written.
        st = mig.wait_phase(s.dst, ["Done"], timeout=60)
        assert st["authoritative"], st
        h = s.dst.connect()
        lmtest.assert_same(lmtest.nbd_read_all(h, SIZE), bytes(model), "the destination export")
        print(f"  {len(before)} writes before, {len(writer.done)} during the migration "
              f"({writer.statuses}), {len(writer.failed)} refused after the handover")
        return out, st


def test_a_vm_writing_through_qemu_is_live_migrated_with_its_disk_precopy():
    out, _ = migrate_a_writing_vm("precopy")
    for step in ("pre-switchover", "handed over", "migration completed", "VM migrated", "storage Done"):
        assert step in out, f"no '{step}' in the progress:\n{out}"


def test_a_postcopy_vm_runs_at_the_destination_while_its_disk_is_pulled():
    # --json, and the tool returns before the disk has arrived: the
    # destination QEMU's reads below pull blocks on demand. (Compression
    # off: this disk is mostly one repeated byte per slot, and compressed
    # it would cross the 4M/s cap in a blink, leaving nothing to pull.)
    out, st = migrate_a_writing_vm("postcopy", "--max-rate", "4M", "--compression", "off", "--no-wait-storage",
                                   json_output=True)
    lines = [json.loads(line) for line in out.splitlines()]
    steps = [j.get("step") for j in lines[:-1]]
    for step in ("connect QMP", "start the storage migration", "hand the storage over",
                 "wait for the QEMU migration to complete"):
        assert step in steps, (step, steps)
    assert lines[-1]["result"] == "completed", lines[-1]
    assert lines[-1]["storage_phase"] == "PostCopy", lines[-1]
    assert st["migration"]["demand_pulls"] > 0, st["migration"]


def test_a_destination_started_with_dash_s_is_resumed_after_the_migration():
    with Setup(dst_args=["-S"]) as s:
        assert s.vm_src.write(ORIG, 4096, 0x21)
        rc, out, err = run_tool(s.migrate_argv(s.vm_src.qmp_path, "--mode", "precopy", "--max-bandwidth", "64M"))
        print("  " + out.replace("\n", "\n  ").rstrip())
        assert rc == 0, f"qemu-migrate failed ({rc}):\n{out}\n{err}"
        assert "destination VM resumed" in out, out
        assert s.vm_dst.status() == "running", s.vm_dst.status()
        s.vm_dst.check_read(ORIG, 4096, 0x21, "a write before the migration")


def test_a_missing_monitor_fails_at_connect_qmp_and_starts_nothing():
    with mig.Pair(8 * MiB, 1 * MiB) as (src, dst, src_image, dst_image, data):
        d = lmtest.tmp_dir("no-qmp")
        argv = [migrate_nbd_path(), "qemu-migrate", "--from", f"127.0.0.1:{mig.peer_port(src)}",
                "--to", f"127.0.0.1:{mig.peer_port(dst)}", "--qmp-src", os.path.join(d, "src.qmp"),
                "--qmp-dst", os.path.join(d, "dst.qmp"), "--migrate-uri", "tcp:127.0.0.1:1"]
        rc, out, err = run_tool(argv + ["--mode", "precopy"])
        assert rc == 1, (rc, out, err)
        assert "failed at step 'connect QMP': source QEMU: QMP " in err and "No such file or directory" in err, err
        assert mig.status(src)["phase"] == "Idle" and mig.status(dst)["phase"] == "Idle"
        rc, out, err = run_tool(argv)   # no --mode
        assert rc == 2 and "--mode is required" in err, (rc, err)


def kill_destination_and_expect_rollback(s, p, steps):
    """migrate-nbd (Popen p) must fail at one of `steps`, cancel both
    migrations and leave the source VM running on its writable disk."""
    try:
        out, err = p.communicate(timeout=60)
    finally:
        lmtest._kill(p)
    out, err = out.decode(errors="replace"), err.decode(errors="replace")
    print("  " + (out + err).replace("\n", "\n  ").rstrip())
    assert p.returncode == 1, f"exit {p.returncode}:\n{out}\n{err}"
    assert any(f"failed at step '{step}'" in err for step in steps), err
    assert "destination QEMU" in err or "QEMU migration failed" in err, err
    assert "storage migration" in out and "cancelled" in out, out
    # The source VM runs on, its disk writable and still its own.
    lmtest.wait_until(lambda: s.vm_src.status() == "running", 10, "the source VM to run")
    st = mig.status(s.src)
    assert st["phase"] == "Cancelled" and st["authoritative"], st
    rnd = random.Random(7)
    slots = list(range(SIZE // SLOT))
    w = take_write(rnd, slots, 0x42)
    assert s.vm_src.write(*w), "the source disk is not writable after the failed migration"
    s.vm_src.check_read(w[0], w[1], 0x42, "a write after the failed migration")
    s.vm_src.check_read(slots[0] * SLOT, SLOT, orig_byte(slots[0] * SLOT), "old data")


def start_tool(argv):
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lmtest._live[p.pid] = p
    return p


def test_the_destination_qemu_dying_during_the_ram_migration_leaves_the_source_running():
    with Setup() as s:
        p = start_tool(s.migrate_argv(s.vm_src.qmp_path, "--mode", "precopy", "--max-bandwidth", "4M"))
        try:
            lmtest.wait_until(lambda: s.vm_src.migration_status() == "active" or p.poll() is not None, 60,
                              "the RAM migration to start")
            assert p.poll() is None, f"migrate-nbd exited early: {p.communicate()}"
        except BaseException:
            lmtest._kill(p)
            raise
        os.kill(s.vm_dst.proc.pid, signal.SIGKILL)
        kill_destination_and_expect_rollback(s, p, ["wait for QEMU to reach pre-switchover"])


def test_the_destination_qemu_dying_at_pre_switchover_stops_the_handover():
    with Setup() as s:
        def kill_destination():
            os.kill(s.vm_dst.proc.pid, signal.SIGKILL)
            s.vm_dst.proc.wait(10)

        # migrate-nbd learns of pre-switchover only after the destination died.
        gate = QmpGate(s.vm_src.qmp_path, on_pre_switchover=kill_destination)
        s.cleanup.append(gate.close)
        p = start_tool(s.migrate_argv(gate.path, "--mode", "precopy", "--max-bandwidth", "24M"))
        kill_destination_and_expect_rollback(
            s, p, ["wait for QEMU to reach pre-switchover", "hand the storage over"])
        assert mig.status(s.dst)["authoritative"] is False


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
