"""Handover groups (issue #15: several disks of one VM): every disk handed
over at one switchover, or none (docs/handover.md, "Groups"). Two-phase
commit with presumed abort: the sources prepare (HANDOVER with PREPARE), the
first disk's destination records the decision, every source follows it.

Each test names the behaviour it proves; crash points (LIVEMIG_TEST_CRASH_AT)
kill a plugin, or migrate-nbd, at an exact step, as kill -9 would.

    LIVEMIG_PLUGIN=build/plugin/livemig.so LIVEMIG_BUILD_DIR=build PYTHONPATH=tests/integration \\
        /usr/bin/python3 -m pytest tests/integration/test_group_handover.py [-k NAME]
"""

import contextlib
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "faults"))

import pytest  # noqa: E402

import faultfs  # noqa: E402
import lmtest  # noqa: E402
import migration as mig  # noqa: E402
from lmtest import MiB, Server  # noqa: E402

SIZE = 32 * MiB
DATA_LEN = 8 * MiB
BLOCK = 4096
# The writers write past the source's data, where the image is a hole.
REGION = f"{16 * MiB}:{8 * MiB}"
KEYS = {"peer-timeout": 3}


def migrate_nbd(*args, env=None, timeout=180):
    """Runs migrate-nbd; returns the CompletedProcess (text)."""
    build = os.environ.get("LIVEMIG_BUILD_DIR", "build")
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([os.path.join(build, "client-tools", "migrate-nbd"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=e)


class Disk:
    """One disk of the VM: a source with data and its destination."""

    def __init__(self, src, dst, src_image, dst_image, data):
        self.src, self.dst, self.src_image, self.dst_image, self.data = src, dst, src_image, dst_image, data

    @property
    def pair(self):
        return f"127.0.0.1:{mig.peer_port(self.src)},127.0.0.1:{mig.peer_port(self.dst)}"


@contextlib.contextmanager
def vm_disks(n=2, dst_env=None, dst_dirs=None, keys=KEYS):
    """n disks (different data each), every plugin on a fixed port (a
    restarted one comes back on its address); all stopped at the end.
    dst_env / dst_dirs: per disk, the destination's test hooks and the
    directory its image lives in (a faultfs mount)."""
    servers = []
    disks = []
    try:
        for i in range(n):
            src_image, data = mig.make_source_image(SIZE, DATA_LEN, seed=7 + i)
            dst_dir = (dst_dirs or {}).get(i) or lmtest.tmp_dir("dst")
            dst_image = os.path.join(dst_dir, f"dst{i}.img")
            src = Server(control=True, image=src_image, listen=f"127.0.0.1:{mig.free_port()}", **keys)
            servers.append(src)
            src.start()
            dst = Server(control=True, image=dst_image, listen=f"127.0.0.1:{mig.free_port()}",
                         env=(dst_env or {}).get(i), **keys)
            servers.append(dst)
            dst.start()
            disks.append(Disk(src, dst, src_image, dst_image, data))
        yield disks
    finally:
        for s in servers:
            s.stop()


def start_all(disks, mode="precopy"):
    for d in disks:
        mig.migrate(d.src, d.dst, mode, handover="explicit")
    for d in disks:
        mig.wait_ready(d.src)


def settle(disks):
    """Until every push is made durable at its destination (nothing left to
    push, and the destination's once-a-second sync of pushes done): a disk
    fault injected after this hits the handover, not a push before it."""
    for d in disks:
        lmtest.wait_until(lambda: mig.status(d.src)["migration"]["blocks_left"] == 0, timeout=30,
                          what="the source to push everything")
    time.sleep(1.5)


def group_handover(disks, *extra, env=None):
    args = ["handover", "--json"]
    for d in disks:
        args += ["--disk", d.pair]
    r = migrate_nbd(*args, *extra, env=env)
    out = json.loads(r.stdout) if r.stdout.strip().startswith("{") else None
    return r, out


def expect_writable(server, what, offset=0):
    h = server.connect()
    h.pwrite(b"w" * BLOCK, offset)
    h.flush()
    server.disconnect(h)


def expect_image(path, data, what):
    lmtest.assert_same(lmtest.read_file(path, 0, len(data)), data, what)


def phase(server):
    return mig.status(server)["phase"]


def coordinator_says(disks, group):
    return disks[0].dst.control({"op": "group-outcome", "group": group})["decision"]


def wait_all_done(disks):
    for d in disks:
        mig.wait_phase(d.dst, ["Done"], timeout=120)
        mig.wait_phase(d.src, ["Done"], timeout=120)


# ---------------------------------------------------------------------------
# All or none

def test_two_disks_with_writers_are_handed_over_together_and_every_write_arrives():
    with vm_disks(2) as disks:
        start_all(disks)
        journals = [os.path.join(lmtest.tmp_dir("j"), "journal") for _ in disks]
        writers = [mig.Writer(d.src.uri, REGION, j, duration=4, extra=["--flush-every", "64"])
                   for d, j in zip(disks, journals)]
        time.sleep(1)
        r, out = group_handover(disks)
        assert r.returncode == 0, r.stdout + r.stderr
        assert out["decision"] == "commit" and out["ok"], out
        for d in disks:
            st = mig.wait_phase(d.dst, ["PostCopy", "Done"], timeout=10)
            assert st["authoritative"], st
            assert phase(d.src) in ("PostCopy", "Done")
        assert coordinator_says(disks, out["group"]) == "commit"
        for w, d in zip(writers, disks):
            w.switch(d.dst.uri)  # as the hypervisor does after the switchover
        for w in writers:
            assert w.wait() == 0, w.log()
        wait_all_done(disks)
        for i, (d, j) in enumerate(zip(disks, journals)):
            rc, verify_out = mig.verify_journal(d.dst.uri, j, "--region", REGION, "--initial", "zero")
            assert rc == 0, f"disk {i}: the destination lost acknowledged writes:\n{verify_out}"
            expect_image(d.dst_image, d.data, f"disk {i}'s data at its destination")


def test_a_destination_killed_during_prepare_aborts_the_group_and_a_retry_succeeds():
    with vm_disks(2, dst_env={1: {"LIVEMIG_TEST_CRASH_AT": "destination-before-prepare"}}) as disks:
        start_all(disks)
        r, out = group_handover(disks)
        assert r.returncode == 1, r.stdout + r.stderr
        assert out["decision"] == "abort", out
        assert not out["disks"][1]["prepared"], out
        lmtest.wait_until(lambda: not disks[1].dst.alive(), timeout=20, what="the destination to die")
        # Neither source handed over: both serve their image, writable.
        for i, d in enumerate(disks):
            st = mig.status(d.src)
            assert st["phase"] in ("PreCopy", "Sync") and st["authoritative"] and not st["fenced"], st
            expect_writable(d.src, f"disk {i}'s source after the abort", offset=DATA_LEN)
        st = mig.status(disks[0].dst)
        assert st["phase"] == "PreCopy" and not st["authoritative"], st  # prepared, never committed
        # The migration goes on: bring the destination back and try again.
        mig.restart(disks[1].dst, env={})
        for d in disks:
            mig.wait_ready(d.src, timeout=60)
        r, out = group_handover(disks)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_all_done(disks)
        for i, d in enumerate(disks):
            expect_image(d.dst_image, d.data, f"disk {i}'s data")
            assert lmtest.read_file(d.dst_image, DATA_LEN, BLOCK) == b"w" * BLOCK, \
                f"disk {i}: the write made after the abort is missing at the destination"


def test_a_refused_prepare_aborts_the_group_for_every_disk():
    with faultfs.FaultFS() as fs, vm_disks(2, dst_dirs={1: fs.mountpoint}) as disks:
        start_all(disks)
        settle(disks)
        fs.set_faults("fsync eio path=dst1.img\n")
        r, out = group_handover(disks)
        assert r.returncode == 1, r.stdout + r.stderr
        assert out["decision"] == "abort", out
        assert "refused" in out["disks"][1]["error"], out
        # The refused disk's migration failed; the other goes on. Both
        # sources are writable, neither destination took over.
        st = mig.status(disks[1].src)
        assert st["phase"] == "Failed" and st["authoritative"] and not st["fenced"], st
        st = mig.status(disks[0].src)
        assert st["phase"] in ("PreCopy", "Sync") and st["authoritative"] and not st["fenced"], st
        for i, d in enumerate(disks):
            expect_writable(d.src, f"disk {i}'s source", offset=DATA_LEN)
            assert not mig.status(d.dst)["authoritative"]
        assert coordinator_says(disks, out["group"]) == "abort"


def test_the_coordinator_killed_after_recording_commit_commits_every_disk_after_its_restart():
    with vm_disks(2, dst_env={0: {"LIVEMIG_TEST_CRASH_AT": "coordinator-after-commit"}}) as disks:
        start_all(disks)
        r, out = group_handover(disks, "--group-timeout", "1")
        assert r.returncode == 1, r.stdout + r.stderr
        assert out["decision"] == "unknown", out
        lmtest.wait_until(lambda: not disks[0].dst.alive(), timeout=20, what="the coordinator to die")
        # The sources cannot ask: commit may be recorded (it is), so they
        # stay fenced, well past the group timeout, and do not abort.
        time.sleep(3)
        for d in disks:
            st = mig.status(d.src)
            assert st["phase"] == "Handover" and st["fenced"], st
            assert "coordinator" in st["migration"]["needs_resolution"]["why"], st
        mig.restart(disks[0].dst, env={})
        for d in disks:
            mig.wait_phase(d.src, ["PostCopy", "Done"], timeout=30)
            assert mig.status(d.dst)["authoritative"]
        wait_all_done(disks)
        for i, d in enumerate(disks):
            expect_image(d.dst_image, d.data, f"disk {i}'s data")


def test_a_source_restarted_in_the_window_follows_its_group_not_its_destination():
    """Disk 1's source is killed while prepared and the coordinator is down
    with commit recorded. Restarted, the source asks its destination (alive,
    prepared, not committed): alone, that answer would send it back to Sync,
    writable, while disk 0 commits later: split. It persisted its group with
    the fence, so it stays fenced until the coordinator says commit."""
    with vm_disks(2, dst_env={0: {"LIVEMIG_TEST_CRASH_AT": "coordinator-after-commit"}}) as disks:
        start_all(disks)
        r, out = group_handover(disks, "--group-timeout", "1")
        assert out["decision"] == "unknown", out
        lmtest.wait_until(lambda: not disks[0].dst.alive(), timeout=20, what="the coordinator to die")
        mig.restart(disks[1].src)  # kill -9 and start again: same image, same state file
        time.sleep(3)
        st = mig.status(disks[1].src)
        assert st["phase"] == "Handover" and st["fenced"], st
        assert st["migration"]["group"]["id"] == out["group"], st
        mig.restart(disks[0].dst, env={})
        for d in disks:
            mig.wait_phase(d.src, ["PostCopy", "Done"], timeout=30)
        wait_all_done(disks)
        for i, d in enumerate(disks):
            expect_image(d.dst_image, d.data, f"disk {i}'s data")


def orchestrator_killed_at(disks, point):
    """migrate-nbd killed (as kill -9) at `point`, with a 2 s group timeout."""
    r, out = group_handover(disks, "--group-timeout", "2", env={"LIVEMIG_TEST_CRASH_AT": point})
    assert r.returncode == -9, r.stdout + r.stderr


def test_sources_presume_abort_after_the_group_timeout_when_the_orchestrator_dies_after_prepare():
    with vm_disks(2) as disks:
        start_all(disks)
        orchestrator_killed_at(disks, "orchestrator-after-prepare")
        for d in disks:
            assert phase(d.src) == "Handover"  # prepared, fenced, waiting
        t0 = time.monotonic()
        for d in disks:
            mig.wait_phase(d.src, ["Sync", "PreCopy"], timeout=30)
        print(f"  the sources aborted after {time.monotonic() - t0:.1f} s (group timeout 2 s)")
        for i, d in enumerate(disks):
            st = mig.status(d.src)
            assert st["authoritative"] and not st["fenced"], st
            assert "aborted" in st["migration"]["handover_outcome"], st
            expect_writable(d.src, f"disk {i}'s source", offset=DATA_LEN)
            assert phase(d.dst) == "PreCopy"
        # The migrations go on, and a new group hands them over.
        r, out = group_handover(disks)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_all_done(disks)
        for i, d in enumerate(disks):
            expect_image(d.dst_image, d.data, f"disk {i}'s data")


def test_sources_commit_without_the_orchestrator_once_commit_is_recorded():
    with vm_disks(2) as disks:
        start_all(disks)
        orchestrator_killed_at(disks, "orchestrator-after-decision")
        for d in disks:
            mig.wait_phase(d.src, ["PostCopy", "Done"], timeout=30)
        time.sleep(2.5)  # past the group timeout: nothing aborts a recorded commit
        wait_all_done(disks)
        for i, d in enumerate(disks):
            expect_image(d.dst_image, d.data, f"disk {i}'s data")


def test_a_group_member_must_run_with_handover_explicit():
    with vm_disks(1) as disks:
        d = disks[0]
        mig.migrate(d.src, d.dst, "precopy", handover="auto", max_rate=1 * MiB)
        reply = d.src.control({"op": "handover", "group": "g1", "coordinator": f"127.0.0.1:{mig.peer_port(d.dst)}"})
        assert not reply["ok"] and "handover=explicit" in reply["error"], reply


def test_a_group_timeout_that_is_not_0_1_to_86400_seconds_is_refused_by_name():
    """A group handover whose group_timeout is not a number (a string, null,
    true, a list) or out of 0.1 .. 86400 seconds is refused with an error
    naming group_timeout, and the source goes on unfenced (a non-number used
    to be taken as the default 30 s, and the source prepared)."""
    with vm_disks(1) as disks:
        d = disks[0]
        start_all(disks)
        coordinator = f"127.0.0.1:{mig.peer_port(d.dst)}"
        for bad in ("30", None, True, [30], 0, -1, 0.05, 86401, 1e30):
            reply = d.src.control({"op": "handover", "group": "g1", "coordinator": coordinator,
                                   "group_timeout": bad})
            assert not reply["ok"] and "group_timeout" in reply["error"], (bad, reply)
        st = mig.status(d.src)
        assert st["phase"] in ("PreCopy", "Sync") and not st["fenced"], st


def test_a_group_timeout_without_a_group_is_refused_and_nothing_is_handed_over():
    """group_timeout on a handover that names no group is a mistake (the
    operator meant a group): refused by name, the source not fenced (it used
    to be ignored, and the disk handed over alone)."""
    with vm_disks(1) as disks:
        d = disks[0]
        start_all(disks)
        reply = d.src.control({"op": "handover", "group_timeout": 10})
        assert not reply["ok"] and "group_timeout" in reply["error"], reply
        st = mig.status(d.src)
        assert st["phase"] in ("PreCopy", "Sync") and not st["fenced"], st


def test_the_coordinator_records_the_first_decision_only():
    with vm_disks(1) as disks:
        c = disks[0].dst
        assert c.control({"op": "group-outcome", "group": "g7"})["decision"] == "undecided"
        first = c.control({"op": "group-decide", "group": "g7", "decision": "abort"})
        assert first["ok"] and first["decision"] == "abort" and first["recorded_now"], first
        late = c.control({"op": "group-decide", "group": "g7", "decision": "commit"})
        assert not late["ok"] and late["decision"] == "abort", late
        mig.restart(c)
        assert c.control({"op": "group-outcome", "group": "g7"})["decision"] == "abort"
        assert not c.control({"op": "group-decide", "group": "a b", "decision": "abort"})["ok"]


@pytest.mark.xfail(strict=True, reason="naive orchestration: two independent handovers, one refused, split the VM's "
                                       "disks between the hosts (what groups exist to prevent)")
def test_naive_orchestration_of_two_independent_handovers_can_leave_the_disks_split():
    with faultfs.FaultFS() as fs, vm_disks(2, dst_dirs={1: fs.mountpoint}) as disks:
        start_all(disks)
        settle(disks)
        assert disks[0].src.control({"op": "handover"})["ok"]
        fs.set_faults("fsync eio path=dst1.img\n")
        assert not disks[1].src.control({"op": "handover"})["ok"]
        sides = ["destination" if mig.status(d.dst)["authoritative"] else "source" for d in disks]
        assert sides[0] == sides[1], f"the VM's disks are split: {sides}"
