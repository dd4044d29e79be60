"""The heat-driven modes (livefs, hybrid, auto) on loopback: each with the
verifying writer across handover, and the LiveFS identities: livefs with
threshold 0 and no monitoring behaves as precopy, with threshold max as
postcopy."""

import os
import sys
import time

import pytest

import lmtest
from lmtest import MiB
import migration as mig

BLOCK = 4096
SIZE = 32 * MiB
DATA = 12 * MiB
HOT = f"{16 * MiB}:{4 * MiB}"   # the writer's hot region, inside the hole half


def segments(server):
    return server.control({"op": "stats"})["migration_segments"]


def run_with_writer(mode, warmup=0.3, rate=0, **params):
    """Migrates under the verifying writer; returns the source's and the
    destination's final status, the source's segments and its status when
    it handed over."""
    with mig.Pair(SIZE, DATA, **{"segment-size": "1M"}) as (src, dst, src_image, dst_image, data):
        journal = os.path.join(lmtest.tmp_dir("j"), "journal")
        writer = mig.Writer(src.uri, HOT, journal, rate=rate, duration=6, extra=["--flush-every", "64"])
        time.sleep(warmup)
        mig.migrate(src, dst, mode, handover="auto", max_rate=8 * MiB, handover_size=512 * 1024, **params)
        at_handover = mig.wait_phase(src, ["PostCopy", "Done"], timeout=60)
        seg = segments(src)
        writer.switch(dst.uri)
        assert writer.wait() == 0, writer.log()
        st_src = mig.wait_phase(src, ["Done"], timeout=120)
        st_dst = mig.wait_phase(dst, ["Done"], timeout=120)
        rc, out = mig.verify_journal(dst.uri, journal, "--region", HOT, "--initial", "zero")
        assert rc == 0, f"{mode}: destination lost acknowledged writes:\n{out}"
        lmtest.assert_same(lmtest.read_file(dst_image, 0, DATA), data, "source data at the destination")
        rest = lmtest.read_file(dst_image, 20 * MiB, SIZE - 20 * MiB)
        lmtest.assert_same(rest, bytes(len(rest)), "the hole beyond the hot region")
        return st_src, st_dst, seg, at_handover


def test_livefs_with_monitoring_pushes_the_hot_segments_and_loses_nothing():
    # Monitoring sees only the writer's hot 4 MiB: those segments score > 0
    # and are pushed; the cold ones wait for handover.
    st_src, st_dst, seg, _ = run_with_writer("livefs", monitor_period=1, threshold=1)
    pushed = {s["segment"] for s in seg if s["set"] == "push"}
    assert pushed and pushed <= set(range(16, 20)), f"send set should be the hot segments: {seg}"
    assert st_dst["migration"]["background_pulls"] > 0, st_dst


def test_hybrid_defers_segments_written_too_often_and_loses_nothing():
    st_src, st_dst, seg, _ = run_with_writer("hybrid", threshold=50)
    deferred = [s for s in seg if s["set"] == "after-handover"]
    assert deferred, f"no segment was written 50 times? {seg}"
    assert all(s["writes_during_migration"] >= 50 for s in deferred), deferred
    assert all(s["why"].startswith("written") for s in deferred), deferred


# auto tests: 500 writes/s (2 MiB/s) into the hot 4 MiB, slower than the
# 8 MiB/s pushes, so the decisions are per segment.
def test_auto_defers_rewritten_segments_and_loses_nothing():
    st_src, st_dst, seg, _ = run_with_writer("auto", rate=500)
    m = st_src["migration"]
    deferred = [s for s in seg if s["set"] == "after-handover"]
    assert deferred, f"auto deferred nothing under a hot writer: {seg}"
    assert {s["segment"] for s in deferred} <= set(range(16, 20)), deferred
    # Deferring keeps auto from resending the hot set round after round.
    assert m["rounds"] <= 6, m


def test_auto_defers_a_segment_it_sees_written_before_pushing_it():
    # The writer runs 1.5 s before migrate: the decayed heat already shows the
    # hot 4 MiB, so auto pushes the cold data first and defers the hot
    # segments without sending them (they would be re-written before
    # handover): before handover, only the source's own data crossed.
    st_src, st_dst, seg, at_handover = run_with_writer("auto", warmup=1.5, rate=500)
    hot = {s["segment"] for s in seg if s["set"] == "after-handover"}
    assert hot == set(range(16, 20)), seg
    assert all(s["why"] == "would be re-written before handover" for s in seg if s["segment"] in hot), seg
    sent = at_handover["migration"]["data_blocks_pushed"]
    assert sent <= DATA // BLOCK + 64, f"{sent} data blocks pushed: hot blocks were pushed"


def test_auto_hands_over_early_when_the_guest_outwrites_the_pushes():
    # An unthrottled writer writes faster than the 8 MiB/s pushes drain: auto
    # stops pushing once it has measured both rates (4 MiB pushed) and the
    # rest crosses after handover, where the guest's writes need no link.
    st_src, st_dst, seg, at_handover = run_with_writer("auto", rate=0)
    why = {s["why"] for s in seg if s["set"] == "after-handover"}
    assert "the guest writes faster than the link drains" in why, seg
    pushed = at_handover["migration"]["data_blocks_pushed"]
    assert pushed < DATA // BLOCK // 2, f"{pushed} data blocks pushed: auto kept pushing under the writer"


def idle_migration(mode, **params):
    with mig.Pair(SIZE, DATA) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, mode, handover="explicit", **params)
        st = mig.wait_ready(src)
        before = dict(st["migration"])
        time.sleep(0.3)
        assert src.control({"op": "handover"})["ok"]
        st_src = mig.wait_phase(src, ["Done"])
        st_dst = mig.wait_phase(dst, ["Done"])
        lmtest.assert_same(lmtest.read_file(dst_image), lmtest.read_file(src_image), "destination image")
        return before, st_src["migration"], st_dst["migration"]


def test_livefs_with_threshold_0_and_no_monitoring_behaves_as_precopy():
    before_l, src_l, dst_l = idle_migration("livefs", threshold=0, monitor_period=0)
    before_p, src_p, dst_p = idle_migration("precopy")
    # Everything crossed before handover, nothing was pulled after.
    for before, src, dst in ((before_l, src_l, dst_l), (before_p, src_p, dst_p)):
        assert before["data_blocks_sent"] == DATA // BLOCK, before
        assert dst["background_pulls"] == 0 and dst["demand_pulls"] == 0, dst
    assert src_l["data_blocks_sent"] == src_p["data_blocks_sent"]
    assert src_l["zero_blocks_sent"] == src_p["zero_blocks_sent"]


def test_livefs_with_threshold_max_behaves_as_postcopy():
    before_l, src_l, dst_l = idle_migration("livefs", threshold="max", monitor_period=0)
    before_p, src_p, dst_p = idle_migration("postcopy")
    for before, src, dst in ((before_l, src_l, dst_l), (before_p, src_p, dst_p)):
        assert before["data_blocks_sent"] == 0 and before["zero_blocks_sent"] == 0, before
        assert dst["background_pulls"] > 0, dst
    assert src_l["data_blocks_sent"] == src_p["data_blocks_sent"] == DATA // BLOCK


def test_bad_mode_parameters_are_refused_with_the_field_named():
    with mig.Pair(SIZE, DATA) as (src, dst, *_):
        to = f"127.0.0.1:{mig.peer_port(dst)}"
        for req, word in (({"mode": "turbo"}, "mode"), ({"mode": "livefs", "threshold": -1}, "threshold"),
                          ({"mode": "livefs", "w_read": 0.7, "w_write": 0.7}, "weights"),
                          ({"mode": "livefs", "monitor_period": "soon"}, "monitor_period")):
            reply = src.control({"op": "migrate", "to": to, **req})
            assert not reply["ok"] and word in reply["error"], (req, reply)
        assert mig.status(src)["phase"] == "Idle"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
