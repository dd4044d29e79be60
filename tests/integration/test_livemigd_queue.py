"""livemigd runs its queue in FIFO order within max-concurrent.

Each test starts its own plugins (loopback TCP) and its own livemigd, and
kills them by PID at the end, also on failure."""

import signal
import sys
import threading
import time

import pytest

import lmtest
import migration as mig
from lmtest import MiB
from daemonlib import Livemigd, active_phase, exports


def test_fifo_order_with_max_concurrent_1():
    """Three tasks with max-concurrent 1 start in submission order, each
    after the one before it ended, and all end done with equal images."""
    with exports(3, 8 * MiB) as exs:
        with Livemigd(max_concurrent=1) as d:
            # A rate cap keeps the first running while the others queue.
            ids = [d.submit(ex, "precopy", "--handover", "auto", "--handover-size", "64K", "--max-rate", "16M")
                   for ex in exs]
            tasks = [d.wait_state(i, ("done",), timeout=60) for i in ids]
            starts = [t["started_at"] for t in tasks]
            assert starts == sorted(starts) and len(set(starts)) == 3, f"not FIFO: start times {starts}"
            for before, after in zip(tasks, tasks[1:]):
                assert after["started_at"] >= before["finished_at"], \
                    f"task {after['id']} started at {after['started_at']} before task {before['id']} ended " \
                    f"at {before['finished_at']} (max-concurrent 1)"
            for ex in exs:
                ex.assert_copied()


def test_never_more_than_max_concurrent_running():
    """max-concurrent 2 with three tasks: the plugins never show more than
    two migrations at once, two do run together, and the third runs too."""
    with exports(3, 8 * MiB) as exs:
        with Livemigd(max_concurrent=2) as d:
            ids = [d.submit(ex, "precopy", "--handover", "auto", "--handover-size", "64K", "--max-rate", "4M")
                   for ex in exs]
            most = 0
            seen = set()
            deadline = time.monotonic() + 60
            while True:
                active = [i for i, ex in enumerate(exs) if active_phase(ex.src)]
                most = max(most, len(active))
                seen.update(active)
                assert len(active) <= 2, f"{len(active)} migrations running at once (max-concurrent 2)"
                states = [d.task(i)["state"] for i in ids]
                if all(s == "done" for s in states):
                    break
                assert not any(s in ("failed", "cancelled") for s in states), f"states {states}\n{d.log()}"
                assert time.monotonic() < deadline, f"not done after 60 s: {states}"
                time.sleep(0.05)
            assert most == 2, f"at most {most} ran at once; expected 2 to run together"
            assert seen == {0, 1, 2}, f"saw only {seen} running"
            third = d.task(ids[2])
            first_end = min(d.task(i)["finished_at"] for i in ids[:2])
            assert third["started_at"] >= first_end, "the third task started before a slot was free"
            for ex in exs:
                ex.assert_copied()


def test_an_urgent_task_starts_before_earlier_normal_ones():
    """max-concurrent 1: while a capped task runs, a normal task and then
    one submitted with --priority 1 queue; the urgent one starts next, the
    normal one after it, and all end done with equal images (issue #15)."""
    with exports(3, 8 * MiB) as exs:
        with Livemigd(max_concurrent=1) as d:
            first = d.submit(exs[0], "precopy", "--handover", "auto", "--handover-size", "64K", "--max-rate", "4M")
            d.wait_state(first, ("running",), timeout=20)
            normal = d.submit(exs[1], "precopy", "--handover", "auto", "--handover-size", "64K")
            urgent = d.submit(exs[2], "precopy", "--handover", "auto", "--handover-size", "64K", "--priority", "1")
            assert d.task(urgent)["priority"] == 1
            tasks = {i: d.wait_state(i, ("done",), timeout=60) for i in (first, normal, urgent)}
            assert tasks[first]["started_at"] < tasks[urgent]["started_at"] < tasks[normal]["started_at"], \
                f"start order {sorted(tasks, key=lambda i: tasks[i]['started_at'])}; want {[first, urgent, normal]}"
            shown = d.cli("show", urgent)
            assert "priority      1" in shown.stdout, shown.stdout
            for ex in exs:
                ex.assert_copied()


def test_host_bandwidth_is_never_exceeded():
    """--host-bandwidth 8M with max-concurrent 2 and three tasks on one host
    (loopback): every migration the plugins run has a cap (max_rate), and the
    caps of the migrations running at once never add up to more than 8M."""
    limit = 8 * MiB
    with exports(3, 4 * MiB) as exs:
        with Livemigd(max_concurrent=2, host_bandwidth="8M") as d:
            ids = [d.submit(ex, "precopy", "--handover", "auto", "--handover-size", "64K") for ex in exs]
            deadline = time.monotonic() + 60
            while not all(d.task(i)["state"] == "done" for i in ids):
                caps = []
                for ex in exs:
                    st = mig.status(ex.src)
                    if st["phase"] in ("Monitoring", "PreCopy", "Sync", "Handover", "PostCopy"):
                        caps.append(st["migration"]["params"]["max_rate"])
                assert all(0 < c <= limit for c in caps), f"caps {caps}: every one must be set, at most {limit}"
                assert sum(caps) <= limit, f"caps {caps} add up to more than the host's {limit}"
                assert time.monotonic() < deadline, [d.task(i) for i in ids]
                time.sleep(0.05)
            for i in ids:
                assert 0 < d.task(i)["rate_cap"] <= limit, d.task(i)
            for ex in exs:
                ex.assert_copied()



def test_a_finished_task_leaves_its_bandwidth_to_the_one_still_running():
    """--host-bandwidth 8M with max-concurrent 2: a large and a small task
    share the host at 4M each; once the small one is done, the large one's
    running migration is raised to all 8M (set-rate), at its source plugin,
    and its caps never add up to more than the limit (issue #15: the budget
    follows the running set, not only each task's start)."""
    limit = 8 * MiB
    with exports(1, 48 * MiB) as (large,), exports(1, 4 * MiB) as (small,):
        with Livemigd(max_concurrent=2, host_bandwidth="8M") as d:
            big = d.submit(large, "precopy", "--handover", "auto", "--handover-size", "64K")
            little = d.submit(small, "precopy", "--handover", "auto", "--handover-size", "64K")
            caps_seen = set()
            deadline = time.monotonic() + 60
            def cap(ex):
                return mig.status(ex.src)["migration"]["params"]["max_rate"] if active_phase(ex.src) else None
            while d.task(little)["state"] != "done":
                # The large one read before and after the small one: the
                # lower of the two was its cap while the small one's held.
                first, other, second = cap(large), cap(small), cap(large)
                caps = [c for c in (min(first or 0, second or 0) or first or second, other) if c]
                assert sum(caps) <= limit, f"caps {caps} add up to more than the host's {limit}"
                if len(caps) == 2:
                    caps_seen.update(caps)
                assert time.monotonic() < deadline, d.task(little)
                time.sleep(0.05)
            assert caps_seen == {limit // 2}, f"two tasks together ran with caps {caps_seen}, not half each"
            def raised():
                st = mig.status(large.src)
                return active_phase(large.src) and st["migration"]["params"]["max_rate"] == limit
            lmtest.wait_until(raised, timeout=10, what="the large task's source raised to the whole 8M")
            # The daemon records the new cap once both sides answered set-rate:
            # the source may show it a moment before the task does.
            lmtest.wait_until(lambda: d.task(big)["rate_cap"] == limit, timeout=10,
                              what="the large task's record to show the whole 8M")
            assert "rate cap 4194304 -> 8388608" in d.log(), d.log()
            d.wait_state(big, ("done",), timeout=60)
            large.assert_copied()
            small.assert_copied()


def test_a_hung_plugin_does_not_stall_the_queue_and_keeps_its_cap_within_the_host_limit():
    """--host-bandwidth 8M, max-concurrent 2: a task held to 6M by its own
    --max-rate runs; its source nbdkit is stopped (SIGSTOP: the kernel still
    takes connections, nothing answers) and a second task is submitted.
    Sharing would lower the first to 4M, but its plugin cannot take set-rate:
    as far as livemigd can know the first goes on at 6M, so the second starts
    within a few seconds with the 2M left (the caps never add up to more than
    8M), and livemigd answers list at once meanwhile. Once the plugin goes
    on, the first is lowered to 4M, and both end done with equal images.
    (livemigd used to wait 30 s for the hung plugin's set-rate reply on every
    scheduler tick and started nothing while it was hung.)"""
    limit, timeout = 8 * MiB, 2.0
    with exports(1, 32 * MiB) as (hung,), exports(1, 24 * MiB) as (late,):
        with Livemigd(max_concurrent=2, host_bandwidth="8M", heartbeat_interval=0.25,
                      heartbeat_timeout=timeout) as d:
            first = d.submit(hung, "precopy", "--handover", "auto", "--handover-size", "64K", "--max-rate", "6M")
            lmtest.wait_until(lambda: active_phase(hung.src) and d.task(first)["rate_cap"] == 6 * MiB,
                              timeout=20, what="the first task running at 6M")
            hung.src.kill(signal.SIGSTOP)
            try:
                stopped = time.monotonic()
                second = d.submit(late, "precopy", "--handover", "auto", "--handover-size", "64K")
                submitted = time.monotonic()
                started = None
                slowest = 0.0
                while started is None or time.monotonic() - stopped < 3 * timeout:
                    t0 = time.monotonic()
                    reply = d.request({"op": "list", "active": True})
                    slowest = max(slowest, time.monotonic() - t0)
                    assert reply["ok"], reply
                    tasks = {t["id"]: t for t in reply["tasks"]}
                    assert tasks[first]["rate_cap"] == 6 * MiB, \
                        f"the stopped plugin's task has cap {tasks[first]['rate_cap']}: it cannot have taken a change"
                    if started is None and tasks[second]["state"] == "running" and active_phase(late.src):
                        started = time.monotonic() - submitted
                    if started is not None:
                        cap = mig.status(late.src)["migration"]["params"]["max_rate"]
                        assert 0 < cap and 6 * MiB + cap <= limit and tasks[second]["rate_cap"] == cap, \
                            f"the second task runs with cap {cap} (task: {tasks[second]['rate_cap']}) beside the " \
                            f"stopped one's 6M: more than the host's {limit}"
                    assert started is not None or time.monotonic() - submitted < 4 * timeout, \
                        f"the second task is still {tasks[second]['state']} ({tasks[second]['note']!r}) " \
                        f"{time.monotonic() - submitted:.1f} s after its submission, the first task's source " \
                        f"stopped (heartbeat-timeout {timeout} s)\n{d.log()}"
                    time.sleep(0.05)
                print(f"  the second task started {started:.2f} s after its submission; slowest list {slowest:.3f} s")
                assert slowest < 1.0, f"livemigd took {slowest:.2f} s to answer list while a plugin hung"
            finally:
                hung.src.kill(signal.SIGCONT)
            lmtest.wait_until(lambda: d.task(first)["rate_cap"] < 6 * MiB, timeout=timeout + 10,
                              what="the first task lowered once its plugin answers again")
            assert "rate cap 6291456 -> 4194304" in d.log(), d.log()
            def cap(ex):
                return mig.status(ex.src)["migration"]["params"]["max_rate"] if active_phase(ex.src) else None
            deadline = time.monotonic() + 90
            while not all(d.task(i)["state"] == "done" for i in (first, second)):
                a, b, a2 = cap(hung), cap(late), cap(hung)
                caps = [c for c in (min(a or 0, a2 or 0) or a or a2, b) if c]
                assert sum(caps) <= limit, f"caps {caps} add up to more than the host's {limit}"
                assert time.monotonic() < deadline, [d.task(i) for i in (first, second)]
                time.sleep(0.05)
            hung.assert_copied()
            late.assert_copied()


def test_a_cancel_hung_at_its_source_does_not_stall_the_other_tasks():
    """max-concurrent 2: tasks A and B run (pre-copy done, waiting for an
    explicit handover), C is queued. A's source is stopped (SIGSTOP: the
    kernel takes the connection, nothing answers) and A is cancelled at once,
    before the heartbeats call its source down: livemigd sends cancel to the
    stopped plugin. Meanwhile B is handed over: livemigd records it done
    within a few seconds of its source ending, and C starts at once in the
    slot B left. (livemigd used to send cancel on its scheduler thread and
    wait for it, connect 10 s and reply 120 s: nothing else was tended, and
    nothing started, while the stopped plugin held the call.)"""
    timeout = 4.0
    with exports(3, 8 * MiB) as (hung, live, late):
        with Livemigd(max_concurrent=2, heartbeat_interval=0.25, heartbeat_timeout=timeout) as d:
            a, b = (d.submit(ex, "precopy", "--handover", "explicit") for ex in (hung, live))
            for ex in (hung, live):
                mig.wait_ready(ex.src, timeout=30)
            def seen(i):
                t = d.task(i)
                return t["migration_id"] and t["phase"] not in ("", "?")
            lmtest.wait_until(lambda: all(seen(i) for i in (a, b)), timeout=10,
                              what="both tasks' migrations seen by livemigd's heartbeats")
            c = d.submit(late, "precopy", "--handover", "auto", "--handover-size", "64K")
            assert d.task(c)["state"] == "queued", d.task(c)
            hung.src.kill(signal.SIGSTOP)
            try:
                stopped = time.monotonic()
                # A cancel request waits for its task to end: ask from a thread.
                threading.Thread(target=lambda: d.cli("cancel", str(a), timeout=300), daemon=True).start()
                lmtest.wait_until(lambda: d.task(a)["cancel_requested"], timeout=2, what="A's cancel asked for")
                time.sleep(0.5)  # a few scheduler ticks: livemigd's cancel is at the stopped plugin
                assert live.src.control({"op": "handover"})["ok"]
                lmtest.wait_until(lambda: not active_phase(live.src), timeout=20, what="B's source ending")
                ended = time.monotonic()
                b_done = c_started = None
                while c_started is None:
                    now = time.monotonic() - ended
                    tasks = {t["id"]: t for t in d.request({"op": "list", "active": False})["tasks"]}
                    if b_done is None and tasks[b]["state"] == "done":
                        b_done = now
                    if c_started is None and tasks[c]["state"] == "running":
                        c_started = now
                    assert now < 30, f"B {tasks[b]['state']}, C {tasks[c]['state']} {now:.1f} s after B's source " \
                                     f"ended, A's source stopped\n{d.log()}"
                    time.sleep(0.05)
                print(f"  A's source stopped {ended - stopped:.2f} s before B's source ended; B done after "
                      f"{b_done:.2f} s, C running after {c_started:.2f} s")
                assert b_done < 3.0 and c_started < 3.0, \
                    f"B done {b_done:.2f} s and C running {c_started:.2f} s after B's source ended, while A's " \
                    f"cancel hung at its stopped source\n{d.log()}"
            finally:
                hung.src.kill(signal.SIGCONT)
            d.wait_state(c, ("done",), timeout=60)
            d.wait_state(a, ("cancelled",), timeout=60)
            live.assert_copied()
            late.assert_copied()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
