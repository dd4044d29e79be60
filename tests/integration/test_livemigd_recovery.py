"""livemigd survives its own kill -9 and notices plugins that stop answering.

Each test starts its own plugins (loopback TCP) and its own livemigd, and
kills them by PID at the end, also on failure."""

import signal
import sys
import time

import pytest

import lmtest
import migration as mig
from lmtest import MiB
from daemonlib import Export, Livemigd, active_phase


def test_kill9_of_livemigd_mid_migration_loses_nothing():
    """kill -9 of livemigd while a capped migration is half-way and another
    task is queued: the restarted livemigd re-attaches to the running one (the
    same plugin migration, not a new one), runs the queued one, both end
    done, and the destination images equal the sources byte for byte."""
    exports = []
    try:
        exports = [Export(16 * MiB), Export(8 * MiB)]
        d = Livemigd(max_concurrent=1)
        try:
            d.start()
            first = d.submit(exports[0], "precopy", "--handover", "auto", "--handover-size", "64K",
                             "--max-rate", "8M")
            second = d.submit(exports[1], "precopy", "--handover", "auto", "--handover-size", "64K")
            # Half-way: the source reports a quarter to three quarters left.
            def halfway():
                st = mig.status(exports[0].src)
                m = st.get("migration", {})
                total, left = m.get("blocks_total", 0), m.get("blocks_left", 0)
                return st["phase"] in ("PreCopy", "Sync") and total and total / 4 < left < total * 3 / 4
            lmtest.wait_until(halfway, timeout=20, what="the first migration half-way")
            migration_id = d.task(first)["migration_id"]
            assert migration_id, d.task(first)
            d.kill9()
            assert active_phase(exports[0].src), "the plugin-side migration stopped with livemigd"
            time.sleep(0.5)
            d.start()
            t = d.wait_state(first, ("done",), timeout=60)
            assert t["migration_id"] == migration_id, \
                f"re-attached to {t['migration_id']}, not to the running {migration_id}"
            assert t["attempts"] == 1, f"migrate was issued {t['attempts']} times; it should have re-attached"
            d.wait_state(second, ("done",), timeout=60)
            for ex in exports:
                ex.assert_copied()
        finally:
            d.stop()
    finally:
        for ex in exports:
            ex.stop()


def test_stopped_destination_is_marked_down_within_the_heartbeat_timeout():
    """SIGSTOP of the destination nbdkit mid-migration: the task shows the
    destination down, detected no later than heartbeat-timeout (+ one
    scheduler tick and one poll of ours) after the stop; after SIGCONT it is
    up again and the migration ends done with an equal image."""
    timeout = 2.0
    ex = Export(16 * MiB)
    try:
        with Livemigd(heartbeat_interval=0.25, heartbeat_timeout=timeout) as d:
            task = d.submit(ex, "precopy", "--handover", "auto", "--handover-size", "64K", "--max-rate", "4M")
            lmtest.wait_until(lambda: d.task(task)["phase"] in ("PreCopy", "Sync"), timeout=20,
                              what="the migration running")
            time.sleep(0.5)  # a few heartbeats answered
            stopped = time.time()
            ex.dst.kill(signal.SIGSTOP)
            try:
                t = lmtest.wait_until(lambda: (lambda t: t if t["destination_down_since"] else None)(d.task(task)),
                                      timeout=timeout + 5, what="the destination marked down")
                noticed = time.time()
                assert noticed - stopped <= timeout + 1.0, \
                    f"marked down {noticed - stopped:.2f} s after the stop (heartbeat-timeout {timeout})"
                assert noticed - stopped >= timeout - 0.3, \
                    f"marked down {noticed - stopped:.2f} s after the stop: before heartbeat-timeout {timeout}"
                assert t["destination_down_since"] - stopped <= timeout + 0.5, t
                assert t["source_down_since"] == 0, t
                assert t["state"] == "running", t
                shown = d.cli("show", task)
                assert "dest down" in shown.stdout, shown.stdout
            finally:
                ex.dst.kill(signal.SIGCONT)
            lmtest.wait_until(lambda: d.task(task)["destination_down_since"] == 0, timeout=timeout + 5,
                              what="the destination up again")
            d.wait_state(task, ("done",), timeout=60)
            ex.assert_copied()
    finally:
        ex.stop()


def test_failed_receiver_resumes_the_migration():
    """kill -9 of the destination nbdkit before handover, then a restart on
    the same address: livemigd marks the destination down, the source keeps
    the migration and resumes it once the destination is back (the same
    attempt, not a restart from pre-copy); the task ends done and the images
    are equal."""
    ex = Export(16 * MiB, dst_port=0)
    try:
        with Livemigd(heartbeat_interval=0.25, heartbeat_timeout=1.5) as d:
            dst_port = mig.peer_port(ex.dst)
            task = d.submit(ex, "precopy", "--handover", "auto", "--handover-size", "64K", "--max-rate", "4M")
            lmtest.wait_until(lambda: d.task(task)["phase"] in ("PreCopy", "Sync"), timeout=20,
                              what="the migration running")
            time.sleep(0.5)
            ex.dst.kill(signal.SIGKILL)
            lmtest.wait_until(lambda: d.task(task)["destination_down_since"], timeout=10,
                              what="the destination marked down")
            ex.start_destination(dst_port)
            t = d.wait_state(task, ("done",), timeout=60)
            assert t["attempts"] == 1, f"attempts {t['attempts']}: expected the migration resumed, not restarted"
            st = mig.status(ex.src)
            assert st["migration"]["reconnects"] >= 1, st["migration"]
            ex.assert_copied()
    finally:
        ex.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
