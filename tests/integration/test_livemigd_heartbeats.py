"""livemigd's heartbeats (issue #15): one loop polls every plugin, so a hung
plugin delays no other plugin's answers, and the daemon's threads do not
grow with the number of plugins it watches.

Each test starts its own plugins (loopback TCP) and its own livemigd, and
kills them by PID at the end, also on failure."""

import os
import signal
import sys
import time

import pytest

import lmtest
from lmtest import MiB
from daemonlib import Livemigd, exports


def statuses_known(d, task_id):
    """Both plugins of the task answered a heartbeat: their status ages."""
    r = d.request({"op": "show", "id": task_id})
    assert r.get("ok"), r
    ages = [r.get("source_status_age"), r.get("destination_status_age")]
    return ages if None not in ages else None


def settled_threads(pid, samples=10):
    """The fewest threads livemigd had over `samples` looks 0.1 s apart (a
    control request has a short-lived thread of its own)."""
    fewest = None
    for _ in range(samples):
        n = len(os.listdir(f"/proc/{pid}/task"))
        fewest = n if fewest is None else min(fewest, n)
        time.sleep(0.1)
    return fewest


def test_a_hung_plugin_never_delays_the_other_plugins_heartbeats():
    """Two running tasks (pre-copy done, waiting for an explicit handover);
    SIGSTOP of the first task's source: its connections are still accepted
    by the kernel but never answered. For three heartbeat-timeouts the other
    task's statuses stay fresh (at most 3/4 of the timeout old, heartbeats
    every 1/8 of it; a loop that waits out the hung plugin's calls lets them
    age to the timeout), the other task is never marked down, and the stopped plugin is
    marked down after the timeout, as before."""
    interval, timeout = 0.25, 2.0
    with exports(2, 4 * MiB) as (hung, live):
        with Livemigd(max_concurrent=2, heartbeat_interval=interval, heartbeat_timeout=timeout) as d:
            hung_id, live_id = (d.submit(ex, "precopy", "--handover", "explicit") for ex in (hung, live))
            for i in (hung_id, live_id):
                lmtest.wait_until(lambda: statuses_known(d, i), timeout=20, what=f"task {i}'s plugins answering")
            stopped = time.monotonic()
            hung.src.kill(signal.SIGSTOP)
            try:
                worst = 0.0
                while time.monotonic() - stopped < 3 * timeout:
                    ages = statuses_known(d, live_id)
                    worst = max(worst, *ages)
                    t = d.task(live_id)
                    assert t["state"] == "running" and not t["source_down_since"] and \
                        not t["destination_down_since"], f"the live task suffers from the hung plugin: {t}"
                    time.sleep(0.05)
                # A loop that waits for the hung plugin lets them age to the
                # timeout and past it; a busy machine may delay one answer.
                assert worst <= 0.75 * timeout, \
                    f"the live plugins' status aged {worst:.2f} s while another plugin hung (heartbeat every " \
                    f"{interval} s, timeout {timeout} s)"
                t = d.task(hung_id)
                assert t["source_down_since"] > 0, f"the stopped source is not marked down: {t}"
                assert not t["destination_down_since"], t
            finally:
                hung.src.kill(signal.SIGCONT)
            lmtest.wait_until(lambda: d.task(hung_id)["source_down_since"] == 0, timeout=timeout + 5,
                              what="the stopped source up again")


def test_livemigd_threads_do_not_grow_with_the_plugins_it_watches():
    """One running task (2 plugins), then ten (20 plugins): livemigd has no
    more threads with 20 plugins than with 2."""
    with exports(10, 1 * MiB) as exs:
        with Livemigd(max_concurrent=10) as d:
            first = d.submit(exs[0], "precopy", "--handover", "explicit")
            lmtest.wait_until(lambda: statuses_known(d, first), timeout=20, what="the first task's plugins answering")
            few = settled_threads(d.proc.pid)
            ids = [d.submit(ex, "precopy", "--handover", "explicit") for ex in exs[1:]]
            for i in ids:
                lmtest.wait_until(lambda: statuses_known(d, i), timeout=30, what=f"task {i}'s plugins answering")
            assert all(d.task(i)["state"] == "running" for i in [first, *ids])
            many = settled_threads(d.proc.pid)
            assert many <= few, f"livemigd has {many} threads watching 20 plugins, {few} watching 2"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
