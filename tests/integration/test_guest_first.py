#!/usr/bin/env python3
"""Guest first (issue #18): a migration slows its background transfer while
the guest's request latency is above guest_latency_bound times its latency
before the migration, never below min_rate, and still ends."""

import json
import os
import subprocess
import sys
import time

import pytest

import daemonlib
import lmtest
import migration as mig
from lmtest import MiB

SIZE = 64 * MiB
DATA = 24 * MiB
REGION = f"{32 * MiB}:{8 * MiB}"  # the guest writes beside the data, not over it
# max_rate keeps the transfer slow enough on loopback for the pacer to see
# several 250 ms windows of the guest; min_rate is the pacing's floor.
MAX_RATE, MIN_RATE = 16 * MiB, 4 * MiB


def migrate_under_a_guest(mode, data_len=DATA, **params):
    """Migrates SIZE with data_len bytes of data while a guest writes 400
    times a second at the source, then at the destination; returns (seconds
    to Done, the source's status at handover, the destination's status at
    Done). Every byte the guest wrote is checked at the destination."""
    with mig.Pair(SIZE, data_len) as (src, dst, src_image, dst_image, data):
        journal = os.path.join(lmtest.tmp_dir("journal"), "journal")
        writer = mig.Writer(src.uri, REGION, journal, rate=400, duration=60)
        time.sleep(1.0)  # the guest's latency before the migration
        t0 = time.monotonic()
        mig.migrate(src, dst, mode, handover="auto", **params)
        st_src = mig.wait_phase(src, ["PostCopy", "Done"], timeout=90)
        writer.switch(dst.uri)
        st_dst = mig.wait_phase(dst, ["Done"], timeout=90)
        seconds = time.monotonic() - t0
        lmtest._kill(writer.proc)  # it would write for a minute: enough
        rc, out = mig.verify_journal(dst.uri, journal, "--region", REGION, "--initial", "zero")
        assert rc == 0, f"the destination lost the guest's writes:\n{out}"
        lmtest.assert_same(lmtest.read_file(dst_image, 0, data_len), data, "the source's data at the destination")
        return seconds, st_src, st_dst


def test_a_guest_over_its_latency_bound_slows_precopy_to_min_rate_and_the_migration_still_ends():
    # A 1 ns baseline: every window of the guest's requests is over the
    # bound, so the pusher must fall to min_rate (and stay there).
    paced, st_src, _ = migrate_under_a_guest("precopy", guest_latency_bound=1.2, guest_baseline_p99_ns=1,
                                             min_rate=MIN_RATE, max_rate=MAX_RATE)
    pacing = st_src["migration"]["pacing"]
    assert pacing["active"] and pacing["windows_over_bound"] >= 2, pacing
    assert pacing["rate"] == MIN_RATE, pacing
    assert paced >= 0.5 * DATA / MIN_RATE, f"{DATA // MiB} MiB in {paced:.1f} s: faster than min_rate allows"
    unpaced, st_src, _ = migrate_under_a_guest("precopy", guest_latency_bound=0, max_rate=MAX_RATE)
    pacing = st_src["migration"]["pacing"]
    assert not pacing["active"] and pacing["windows"] == 0, pacing
    assert unpaced < paced / 2, f"unpaced {unpaced:.1f} s, paced {paced:.1f} s: pacing made no difference"


def test_a_guest_within_its_bound_is_not_slowed():
    # A 10 s baseline: no window of this guest is over 1.2 x 10 s.
    seconds, st_src, _ = migrate_under_a_guest("precopy", guest_latency_bound=1.2,
                                               guest_baseline_p99_ns=10_000_000_000, min_rate=MIN_RATE,
                                               max_rate=MAX_RATE)
    pacing = st_src["migration"]["pacing"]
    assert pacing["active"] and pacing["windows"] >= 2, pacing
    assert pacing["windows_over_bound"] == 0 and pacing["rate"] == MAX_RATE, pacing
    assert seconds < 0.75 * DATA / MIN_RATE, f"{seconds:.1f} s: as slow as min_rate"


@pytest.mark.parametrize("short", [True, False], ids=["short", "long"])
def test_the_destination_paces_background_pulls_with_the_baseline_the_source_measured(short):
    # handover_size 1 MiB: all but the last MiB is paced (the tail is not).
    # Short: 8 MiB at 4-16 MiB/s, well within a probe period (16 windows,
    # 4 s). Long: 24 MiB at 2-4 MiB/s, 6 s or more.
    data_len, max_rate = (8 * MiB, MAX_RATE) if short else (DATA, MAX_RATE // 4)
    _, st_src, st_dst = migrate_under_a_guest("postcopy", data_len=data_len, guest_latency_bound=1.2,
                                              guest_baseline_p99_ns=1, min_rate=min(MIN_RATE, max_rate // 2),
                                              max_rate=max_rate, handover_size=MiB)
    src_params, dst_params = st_src["migration"]["params"], st_dst["migration"]["params"]
    assert dst_params["guest_baseline_p99_ns"] == src_params["guest_baseline_p99_ns"] == 1, (src_params, dst_params)
    pacing = st_dst["migration"]["pacing"]
    assert pacing["active"] and pacing["windows_over_bound"] >= 1, pacing
    if short:
        # Its own baseline is not worth a window at min_rate.
        assert pacing["probes"] == 0 and pacing["probes_skipped"] >= 1, pacing
    else:
        # It probes its own baseline: one window at min_rate, then the
        # guest's p99 here (the bound applies to the higher one).
        assert pacing["windows"] >= 4 and pacing["probes"] >= 1 and pacing["local_baseline_p99_ms"] > 0, pacing


def test_a_post_copy_tail_within_handover_size_is_not_held_back_by_the_guest():
    # The guest is always over its bound (a 1 ns baseline). Pulls with more
    # than handover_size left are paced down to min_rate; the tail is paced
    # by max_rate alone (it keeps the migration's most fragile phase open).
    paced, _, st_dst = migrate_under_a_guest("postcopy", guest_latency_bound=1.2, guest_baseline_p99_ns=1,
                                             min_rate=MIN_RATE, max_rate=MAX_RATE, handover_size=MiB)
    pacing = st_dst["migration"]["pacing"]
    assert pacing["windows_over_bound"] >= 2, pacing
    tail, _, st_dst = migrate_under_a_guest("postcopy", guest_latency_bound=1.2, guest_baseline_p99_ns=1,
                                            min_rate=MIN_RATE, max_rate=MAX_RATE, handover_size=SIZE)
    pacing = st_dst["migration"]["pacing"]
    assert pacing["unpaced_tail"] and pacing["windows_over_bound"] == 0, pacing
    assert tail < 0.75 * paced, f"the tail took {tail:.1f} s, paced pulls {paced:.1f} s"
    assert tail >= 0.5 * DATA / MAX_RATE, f"{DATA // MiB} MiB in {tail:.1f} s: faster than max_rate allows"


def test_auto_measures_the_guests_baseline_when_the_migration_starts():
    _, st_src, _ = migrate_under_a_guest("auto")
    params, pacing = st_src["migration"]["params"], st_src["migration"]["pacing"]
    assert params["guest_latency_bound"] == 1.2 and params["max_slowdown"] == 1.3, params
    # 400 writes a second for at least 1 s before the migrate request.
    assert params["guest_baseline_requests"] >= 300 and params["guest_baseline_p99_ns"] > 0, params
    assert pacing["baseline_requests"] == params["guest_baseline_requests"], pacing


def test_a_max_rate_below_the_default_min_rate_lowers_the_floor_instead_of_refusing():
    with mig.Pair(SIZE, 1 * MiB) as (src, dst, *_):
        mig.migrate(src, dst, "auto", handover="auto", max_rate=2 * MiB)
        params = mig.wait_phase(src, ["Done"])["migration"]["params"]
        assert params["max_rate"] == params["min_rate"] == 2 * MiB, params


def test_bad_pacing_parameters_are_refused_with_the_field_named():
    with mig.Pair(SIZE, 1 * MiB) as (src, dst, *_):
        for params, words in (({"guest_latency_bound": 0.5}, "guest_latency_bound"),
                              ({"guest_latency_bound": "fast"}, "guest_latency_bound"),
                              ({"min_rate": 0}, "min_rate"),
                              ({"max_slowdown": 0.9}, "max_slowdown"),
                              ({"min_rate": 64 * MiB, "max_rate": 8 * MiB}, "min_rate")):
            reply = src.control({"op": "migrate", "mode": "auto", "to": f"127.0.0.1:{mig.peer_port(dst)}",
                                 **params})
            assert not reply.get("ok") and words in reply.get("error", ""), (params, reply)
        assert mig.status(src)["phase"] in ("Idle", "None", None) or not mig.status(src).get("migration"), \
            mig.status(src)



def test_set_rate_changes_a_running_migrations_cap_at_once_and_a_bad_one_names_the_problem():
    """livemigd's share of a host's bandwidth changes with the migrations
    running (issue #15): the set-rate op lowers a running pre-copy's 1 MiB/s
    cap to 1 KiB/s, then lifts it; the migration then ends in a fraction of
    the time the old cap needs (a pusher that had begun a frame's wait at
    1 KiB/s, 256 s, must not sit it out)."""
    with mig.Pair(SIZE, DATA) as (src, dst, src_image, dst_image, data):
        reply = src.control({"op": "set-rate", "max_rate": MiB})
        assert not reply["ok"] and "no migration to pace" in reply["error"], reply
        mig.migrate(src, dst, "precopy", handover="auto", max_rate=1 * MiB)
        time.sleep(1.0)
        for bad in ({}, {"max_rate": -1}, {"max_rate": "fast"}, {"max_rate": 1.5}):
            reply = src.control({"op": "set-rate", **bad})
            assert not reply["ok"] and "max_rate" in reply["error"], (bad, reply)
        st = mig.status(src)
        assert st["migration"]["params"]["max_rate"] == MiB, st["migration"]["params"]
        left = st["migration"]["blocks_left"] * 4096
        assert left > 8 * MiB, f"only {left} bytes left: the cap did not hold"
        reply = src.control({"op": "set-rate", "max_rate": 1024})
        assert reply["ok"] and reply["max_rate"] == 1024, reply
        time.sleep(1.5)
        st = mig.status(src)
        assert st["migration"]["params"]["max_rate"] == 1024, st["migration"]["params"]
        left = st["migration"]["blocks_left"] * 4096
        t0 = time.monotonic()
        # As an operator would: migrate-nbd set-rate (0 lifts the cap).
        out = daemonlib.migrate_nbd("set-rate", "--from", f"127.0.0.1:{mig.peer_port(src)}", "--json", "0")
        assert out.returncode == 0 and json.loads(out.stdout)["from"]["max_rate"] == 0, out
        st = mig.status(src)
        if st["phase"] != "Done":
            assert st["migration"]["params"]["max_rate"] == 0, st["migration"]["params"]
        mig.wait_phase(dst, ["Done"], timeout=60)
        seconds = time.monotonic() - t0
        assert seconds < left / MiB / 3, f"{left // MiB} MiB took {seconds:.1f} s after the cap was lifted"
        lmtest.assert_same(lmtest.read_file(dst_image, 0, DATA), data, "the source's data at the destination")


def resident_bytes(path):
    """Bytes of the file in the page cache (fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
def test_pushed_and_background_pulled_data_do_not_fill_the_destinations_page_cache(mode):
    # Pushed data (precopy) and background pulls (postcopy with no guest)
    # are written around the cache: a page-cache copy and its writeback cost
    # the destination several times the CPU per byte, and evict what its
    # guest has cached.
    with mig.Pair(SIZE, DATA) as (src, dst, src_image, dst_image, data):
        fs = subprocess.run(["stat", "-f", "-c", "%T", os.path.dirname(dst_image)], check=True,
                            capture_output=True, text=True).stdout.strip()
        if fs in ("tmpfs", "ramfs"):
            pytest.skip(f"the destination's directory is on {fs}: every page of it is resident")
        mig.migrate(src, dst, mode, handover="auto")
        st = mig.wait_phase(dst, ["Done"], timeout=60)
        assert st["migration"]["blocks_received"] * st["block_size"] >= DATA, st["migration"]
        cached = resident_bytes(dst_image)
        assert cached <= DATA // 8, f"{cached // MiB} MiB of the {DATA // MiB} MiB {mode} moved are in the page cache"
        lmtest.assert_same(lmtest.read_file(dst_image, 0, DATA), data, "the source's data at the destination")



def threads_nice(pid):
    """{thread name: [nice value of each thread of that name]} of process pid."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out.setdefault(name, []).append(int(fields[16]))  # field 19 of proc_pid_stat(5)
    return out


# The threads that move a migration's data, on either side.
MOVERS = ("livemig-io", "livemig-disk", "livemig-push", "livemig-pull", "livemig-persist")


def test_migration_nice_lowers_the_threads_that_move_the_data_and_not_the_guests():
    """migrate-nbd --migration-nice 7: while post-copy runs, the threads that
    move the data on both sides run at nice 7 (the source's disk pool serves
    the pulls), those that serve clients (the other side's forwarded
    requests, control) at the guest's own; released, the io thread is back
    at the guest's."""
    data_len = 24 * MiB  # 6 s at 4 MiB/s
    with mig.Pair(SIZE, data_len) as (src, dst, _, dst_image, data):
        guest = threads_nice(src.pid)["nbdkit"][0]
        r = daemonlib.migrate_nbd("start", "--from", f"127.0.0.1:{mig.peer_port(src)}",
                                  "--to", f"127.0.0.1:{mig.peer_port(dst)}", "--mode", "postcopy",
                                  "--handover", "auto", "--max-rate", str(4 * MiB), "--migration-nice", "7")
        assert r.returncode == 0, r.stderr
        assert mig.status(src)["migration"]["params"]["migration_nice"] == 7
        # Every nice value each thread name had while the migration ran
        # (the puller and the persister end with it).
        seen = {src.pid: {}, dst.pid: {}}
        while mig.status(dst)["phase"] != "Done":
            for pid in seen:
                for name, values in threads_nice(pid).items():
                    seen[pid].setdefault(name, set()).update(values)
            time.sleep(0.02)
        movers = {src.pid: ("livemig-io", "livemig-push", "livemig-disk"),
                  dst.pid: ("livemig-io", "livemig-pull", "livemig-persist")}
        for pid, names in movers.items():
            for name in names:
                assert 7 in seen[pid].get(name, ()), (pid, name, seen)
            for name, values in seen[pid].items():
                if name not in MOVERS:
                    assert values == {guest}, (pid, name, seen)
        lmtest.assert_same(lmtest.read_file(dst_image, 0, data_len), data, "the source's data at the destination")
        assert dst.control({"op": "release"})["ok"]
        if os.geteuid() == 0:  # raising a priority back needs CAP_SYS_NICE
            # Asio's resolver thread, started by the io thread, has its name too.
            lmtest.wait_until(lambda: guest in threads_nice(dst.pid)["livemig-io"] and 7 not in
                              threads_nice(dst.pid)["livemig-io"], timeout=10,
                              what="the destination's io thread back at the guest's nice value")


def test_a_migration_nice_outside_0_to_19_is_refused_by_name():
    with mig.Pair(SIZE, 1 * MiB) as (src, dst, *_):
        for bad in (20, -1, "low"):
            reply = src.control({"op": "migrate", "mode": "auto", "to": f"127.0.0.1:{mig.peer_port(dst)}",
                                 "migration_nice": bad})
            assert not reply.get("ok") and "migration_nice" in reply.get("error", ""), (bad, reply)
        r = daemonlib.migrate_nbd("start", "--from", f"127.0.0.1:{mig.peer_port(src)}",
                                  "--to", f"127.0.0.1:{mig.peer_port(dst)}", "--mode", "auto", "--migration-nice", "20")
        assert r.returncode != 0 and "--migration-nice 20: must be from 0 to 19" in r.stderr, r

if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
