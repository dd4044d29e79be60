"""Live migration between two livemig plugins on loopback, with the verifying
writer (lm-workload) running across the handover as a guest would: every
acknowledged write must be at the destination, every other byte must be the
source's, and what crossed the link must obey invariant 3."""

import os
import signal
import sys
import time

import pytest

import lmtest
from lmtest import MiB
import migration as mig

BLOCK = 4096
SIZE = 32 * MiB
DATA = 12 * MiB          # allocated data at the start of the source image
REGION = f"{16 * MiB}:{16 * MiB}"   # the writer writes the second half (a hole at first)


def check_untouched_data(dst_image, data):
    """The data the writer never touched arrived byte for byte."""
    lmtest.assert_same(lmtest.read_file(dst_image, 0, len(data)), data, "source data at the destination")
    hole = lmtest.read_file(dst_image, len(data), 16 * MiB - len(data))
    lmtest.assert_same(hole, bytes(len(hole)), "the source's hole at the destination")


def check_wire(st_src):
    """Invariant 3 and sparseness: data blocks sent <= allocated blocks + block
    writes at the source during the migration; holes crossed as zero notes."""
    m = st_src["migration"]
    allowed = DATA // BLOCK + m["blocks_dirtied"]
    assert m["data_blocks_sent"] <= allowed, \
        f"{m['data_blocks_sent']} data blocks sent, but only {allowed} were allocated or written: {m}"
    assert m["zero_blocks_sent"] > 0, f"no zero notes: holes crossed as data? {m}"
    assert m["payload_bytes_sent"] <= allowed * BLOCK, m
    assert m["wire_bytes"] >= m["payload_bytes_sent"], m


def run_migration(mode, writer_rate, **params):
    with mig.Pair(SIZE, DATA) as (src, dst, src_image, dst_image, data):
        journal = os.path.join(lmtest.tmp_dir("j"), "journal")
        # The writer starts after the migration, so every block it allocates
        # counts in blocks_dirtied (the bound check_wire checks).
        mig.migrate(src, dst, mode, handover="explicit", **params)
        writer = mig.Writer(src.uri, REGION, journal, rate=writer_rate, duration=6,
                            extra=["--flush-every", "32"])
        if mode == "precopy":
            mig.wait_ready(src)
        time.sleep(0.5)
        reply = src.control({"op": "handover"})
        assert reply["ok"], reply
        assert reply["handover_pause_ms"] >= 0, reply
        # Both sides agree who is authoritative.
        assert not mig.status(src)["authoritative"] and mig.status(dst)["authoritative"]
        writer.switch(dst.uri)
        rc = writer.wait()
        assert rc == 0, f"writer failed ({rc}):\n{writer.log()}"
        assert "switched" in writer.log() or "switch" in writer.log(), writer.log()
        st_dst = mig.wait_phase(dst, ["Done"])
        st_src = mig.wait_phase(src, ["Done"])
        rc, out = mig.verify_journal(dst.uri, journal, "--region", REGION, "--initial", "zero")
        assert rc == 0, f"destination lost acknowledged writes:\n{out}"
        check_untouched_data(dst_image, data)
        check_wire(st_src)
        assert st_src["migration"]["total_time_ms"] > 0, st_src
        return st_src, st_dst


def test_precopy_with_a_writer_across_handover_loses_nothing():
    st_src, _ = run_migration("precopy", writer_rate=500, max_rate=8 * MiB)
    assert st_src["migration"]["rounds"] >= 1


def test_postcopy_with_a_writer_across_handover_loses_nothing():
    _, st_dst = run_migration("postcopy", writer_rate=500, max_rate=8 * MiB)
    assert st_dst["migration"]["background_pulls"] > 0, st_dst


def test_an_idle_precopy_migration_copies_the_image_exactly():
    with mig.Pair(SIZE, DATA) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "precopy", handover="auto")
        st = mig.wait_phase(src, ["Done"])
        mig.wait_phase(dst, ["Done"])
        lmtest.assert_same(lmtest.read_file(dst_image), lmtest.read_file(src_image), "destination image")
        m = st["migration"]
        # Nothing was written: every allocated block crossed exactly once.
        assert m["data_blocks_sent"] == DATA // BLOCK, m
        assert m["data_blocks_sent"] + m["zero_blocks_sent"] == SIZE // BLOCK, m
        # The hole stayed a hole at the destination.
        assert os.stat(dst_image).st_blocks * 512 <= DATA + 1 * MiB, os.stat(dst_image)
        v_src = src.control({"op": "verify"})
        v_dst = dst.control({"op": "verify"})
        assert v_src["ok"] and v_src["hashes"] == v_dst["hashes"], (v_src, v_dst)


def test_writes_on_the_side_that_is_not_authoritative_are_applied_by_the_side_that_is():
    """Issue #17: authority moves, connections do not have to. Before
    handover a write at the destination is the source's; after it a write at
    the source is the destination's. Reads on either side see them."""
    with mig.Pair(SIZE, DATA) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "postcopy", handover="explicit")
        hd = dst.connect()
        hd.pwrite(b"x" * BLOCK, 0)
        hd.flush()
        assert mig.status(dst)["authoritative"] is False
        assert lmtest.read_file(src_image, 0, BLOCK) == b"x" * BLOCK, "the forwarded write is not on the source's disk"
        assert hd.pread(BLOCK, 0) == b"x" * BLOCK
        assert src.control({"op": "handover"})["ok"]
        hs = src.connect()
        hs.pwrite(b"y" * BLOCK, BLOCK)
        hs.flush()
        assert hs.pread(BLOCK, BLOCK) == b"y" * BLOCK
        hd.pwrite(b"z" * BLOCK, 0)
        # The old source answers reads through the destination: no stale block.
        lmtest.assert_same(hs.pread(BLOCK, 0), b"z" * BLOCK, "read at the old source after handover")
        mig.wait_phase(dst, ["Done"])
        st = mig.status(src)["migration"]
        assert st["forwarded_requests"] >= 2, st  # the write and its flush
        expect = bytearray(data)
        expect[0:2 * BLOCK] = b"z" * BLOCK + b"y" * BLOCK
        lmtest.assert_same(lmtest.read_file(dst_image, 0, DATA), bytes(expect), "destination image")


def test_a_vm_started_on_the_destination_takes_the_disk_without_a_handover_command():
    """handover=on-destination-io (issue #17): a probe write at the destination
    while the source still writes hands nothing over; once the destination's
    clients write and the source's have been quiet for 1 s, the source hands
    over by itself. Every write, on either side, is in the final image."""
    with mig.Pair(SIZE, DATA) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "hybrid", handover="on-destination-io")
        hs, hd = src.connect(), dst.connect()
        expect = bytearray(data)
        hd.pwrite(b"p" * BLOCK, 0)       # a probe at the destination...
        expect[0:BLOCK] = b"p" * BLOCK
        for i in range(20):              # ...while the VM still writes at the source
            hs.pwrite(bytes([i + 1]) * BLOCK, (i + 1) * BLOCK)
            expect[(i + 1) * BLOCK:(i + 2) * BLOCK] = bytes([i + 1]) * BLOCK
            time.sleep(0.1)
        time.sleep(2)                    # the source is quiet, the destination wrote before it
        st = mig.status(src)
        assert st["phase"] in ("PreCopy", "Sync"), f"handed over on a probe older than the source's writes: {st}"
        assert st["migration"]["destination_io"]["forwarded_requests"] == 1, st
        hd.pwrite(b"d" * BLOCK, 30 * BLOCK)   # the VM now runs on the destination
        hd.flush()
        expect[30 * BLOCK:31 * BLOCK] = b"d" * BLOCK
        deadline = time.time() + 20
        while not mig.status(dst)["authoritative"]:
            assert time.time() < deadline, f"no handover: {mig.status(src)}"
            time.sleep(0.1)
        hd.pwrite(b"e" * BLOCK, 31 * BLOCK)
        hd.flush()
        expect[31 * BLOCK:32 * BLOCK] = b"e" * BLOCK
        mig.wait_phase(dst, ["Done"], timeout=60)
        assert mig.status(src)["migration"]["handover_outcome"] == "committed"
        lmtest.assert_same(lmtest.read_file(dst_image, 0, DATA), bytes(expect), "destination image")


def capped_idle_migration_seconds(mode, size, data_len, rate):
    with mig.Pair(size, data_len) as (src, dst, src_image, dst_image, data):
        t0 = time.monotonic()
        mig.migrate(src, dst, mode, handover="auto", max_rate=rate)
        st = mig.wait_phase(dst, ["Done"], timeout=60)
        lmtest.assert_same(lmtest.read_file(dst_image), lmtest.read_file(src_image), "destination image")
        return time.monotonic() - t0, st["migration"]["wire_bytes"]


def test_max_rate_caps_what_crosses_the_wire_in_postcopy_as_in_precopy():
    """Found with issue #17's tests: post-copy's background pulls charged
    max_rate the length of every range they pulled, holes included, so a
    sparse 64 MiB image with 1 MiB of data took 16 s at 4 MiB/s (pre-copy:
    0.3 s). Holes cost their zero notes; data still obeys the cap."""
    rate = 4 * MiB
    pre, pre_wire = capped_idle_migration_seconds("precopy", 64 * MiB, 1 * MiB, rate)
    post, post_wire = capped_idle_migration_seconds("postcopy", 64 * MiB, 1 * MiB, rate)
    bound = 4 * MiB / rate + 2   # about 1 MiB crosses either way: 0.25 s at the cap
    assert pre < bound, f"precopy took {pre:.1f} s ({pre_wire} wire bytes)"
    assert post < bound, f"postcopy took {post:.1f} s for {post_wire} wire bytes (precopy: {pre:.1f} s): holes charged"
    dense, dense_wire = capped_idle_migration_seconds("postcopy", 16 * MiB, 12 * MiB, rate)
    assert dense >= 0.7 * 12 * MiB / rate, f"12 MiB of data in {dense:.1f} s at {rate // MiB} MiB/s: the cap leaks"


def test_a_destination_read_before_handover_returns_the_sources_current_data():
    with mig.Pair(SIZE, DATA) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "postcopy", handover="explicit", max_rate=1 * MiB)
        hs, hd = src.connect(), dst.connect()
        lmtest.assert_same(hd.pread(64 * 1024, 100), data[100:100 + 64 * 1024], "proxied read")
        for gen in range(3):
            blob = bytes([gen + 1]) * 5000
            hs.pwrite(blob, 3 * BLOCK + 10)
            lmtest.assert_same(hd.pread(5000, 3 * BLOCK + 10), blob, f"destination read after source write {gen}")
        src.control({"op": "cancel"})


def test_a_partial_write_into_a_missing_block_keeps_the_rest_of_the_block():
    with mig.Pair(SIZE, DATA) as (src, dst, src_image, dst_image, data):
        # A slow post-copy, so the blocks written below are still missing.
        mig.migrate(src, dst, "postcopy", handover="explicit", max_rate=4 * MiB)
        assert src.control({"op": "handover"})["ok"]
        hd = dst.connect()
        off = DATA - 3 * BLOCK + 100           # near the end: pulled last
        hd.pwrite(b"P" * 200, off)
        expect = bytearray(data[DATA - 3 * BLOCK:DATA - 2 * BLOCK])
        expect[100:300] = b"P" * 200
        lmtest.assert_same(hd.pread(BLOCK, DATA - 3 * BLOCK), bytes(expect), "partially written block")
        hd.flush()
        st = mig.wait_phase(dst, ["Done"], timeout=60)
        lmtest.assert_same(lmtest.read_file(dst_image, DATA - 3 * BLOCK, BLOCK), bytes(expect),
                           "the block after post-copy finished")
        assert st["migration"]["demand_pulls"] >= 1, st


def test_a_write_rate_faster_than_the_capped_link_still_completes():
    """The guest dirties faster than a 2 MiB/s link drains: pre-copy must stop
    resending (bounded rounds), hand over, and finish post-copy (invariant 4)."""
    size, data_len, region = 8 * MiB, 2 * MiB, f"{4 * MiB}:{4 * MiB}"
    with mig.Pair(size, data_len) as (src, dst, src_image, dst_image, data):
        journal = os.path.join(lmtest.tmp_dir("j"), "journal")
        mig.migrate(src, dst, "precopy", handover="auto", max_rate=2 * MiB, max_rounds=8,
                    handover_size=256 * 1024)
        writer = mig.Writer(src.uri, region, journal, rate=0, duration=25, extra=["--flush-every", "64"])
        mig.wait_phase(src, ["PostCopy", "Done"], timeout=90)
        writer.switch(dst.uri)
        assert writer.wait() == 0, writer.log()
        st_src = mig.wait_phase(src, ["Done"], timeout=120)
        mig.wait_phase(dst, ["Done"], timeout=120)
        m = st_src["migration"]
        assert m["ready"] and not m["converged"], m
        assert m["rounds"] <= 8, m
        assert m["blocks_dirtied"] * BLOCK > m["payload_bytes_sent"], \
            f"the writer did not outrun the link, the test proves nothing: {m}"
        rc, out = mig.verify_journal(dst.uri, journal, "--region", region, "--initial", "zero")
        assert rc == 0, out
        lmtest.assert_same(lmtest.read_file(dst_image, 0, data_len), data, "source data at the destination")


def test_the_last_client_disconnecting_hands_over_with_handover_on_disconnect():
    with mig.Pair(SIZE, DATA) as (src, dst, src_image, dst_image, data):
        hs = src.connect()
        mig.migrate(src, dst, "precopy", handover="on-disconnect")
        mig.wait_ready(src)
        hs.pwrite(b"D" * BLOCK, 5 * BLOCK)
        time.sleep(0.3)
        assert mig.status(src)["phase"] in ("PreCopy", "Sync"), "handed over while a client was connected"
        src.disconnect(hs)
        mig.wait_phase(src, ["PostCopy", "Done"], timeout=30)
        mig.wait_phase(dst, ["Done"], timeout=60)
        lmtest.assert_same(lmtest.read_file(dst_image, 5 * BLOCK, BLOCK), b"D" * BLOCK, "the last write")


def test_a_cancelled_migration_leaves_the_source_serving_and_the_partial_destination_fenced():
    with mig.Pair(SIZE, DATA) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "precopy", handover="explicit", max_rate=4 * MiB)
        time.sleep(1.5)
        reply = src.control({"op": "cancel"})
        assert reply["ok"], reply
        st_src = mig.status(src)
        assert st_src["phase"] == "Cancelled" and st_src["authoritative"], st_src
        hs = src.connect()
        hs.pwrite(b"S" * BLOCK, 0)  # the source goes on serving writes
        st_dst = mig.wait_phase(dst, ["Cancelled"], timeout=10)
        assert not st_dst["authoritative"], st_dst
        hd = dst.connect()
        lmtest.expect_nbd_error(lambda: hd.pwrite(b"x" * BLOCK, 0), {lmtest.errno.EROFS, lmtest.errno.EPERM},
                                "write to the incomplete image of a cancelled migration")
        # The partial copy is kept (fenced, also across a restart) for the
        # next migration to compare with.
        assert os.path.exists(dst_image + ".livemig-state")
        dst.disconnect(hd)
        # A new migration to the same destination compares checksums and
        # sends only what differs.
        reply = mig.migrate(src, dst, "precopy", handover="auto")
        assert reply["resync"], reply
        mig.wait_phase(dst, ["Done"], timeout=60)
        st = mig.wait_phase(src, ["Done"], timeout=10)
        assert st["migration"]["blocks_resynced"] > 0, st["migration"]
        expect = bytearray(data)
        expect[0:BLOCK] = b"S" * BLOCK
        lmtest.assert_same(lmtest.read_file(dst_image, 0, DATA), bytes(expect), "image after the second migration")
        # Release forgets the migration: the image is served writable again.
        assert dst.control({"op": "release"})["ok"]
        assert mig.status(dst)["authoritative"]


def test_kill_9_of_the_destination_in_postcopy_loses_no_acknowledged_write():
    with mig.Pair(SIZE, DATA) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "postcopy", handover="explicit", max_rate=2 * MiB)
        assert src.control({"op": "handover"})["ok"]
        journal = os.path.join(lmtest.tmp_dir("j"), "journal")
        # Every write FUA: each acknowledged write is durable on its own.
        writer = mig.Writer(dst.uri, f"0:{16 * MiB}", journal, rate=300, duration=4,
                            extra=["--fua-every", "1", "--retry-timeout", "60"])
        time.sleep(1.5)
        assert mig.status(dst)["phase"] == "PostCopy"
        dst.kill(signal.SIGKILL)
        os.unlink(dst.sock)  # nbdkit does not replace a stale socket
        dst.start()          # same image, same state file, new peer port
        assert writer.wait() == 0, writer.log()
        mig.wait_phase(dst, ["Done"], timeout=120)
        rc, out = mig.verify_journal(dst.uri, journal, "--durable-only", "--region", f"0:{16 * MiB}",
                                     "--initial", "any")
        assert rc == 0, f"acknowledged writes lost across kill -9:\n{out}"
        # Blocks the writer never touched hold the source's data. (The
        # writer's blocks start with its magic and were checked above.)
        image = lmtest.read_file(dst_image, 0, DATA)
        for b in range(DATA // BLOCK):
            blk = image[b * BLOCK:(b + 1) * BLOCK]
            if not blk.startswith(b"LMWLBLK1"):
                lmtest.assert_same(blk, data[b * BLOCK:(b + 1) * BLOCK], f"untouched block {b}")


def test_the_handover_pause_does_not_grow_with_the_image():
    """Invariant 5: the pause is bounded by handover-size, not by image size.
    The same light writer, the same handover-size, images 8x apart."""
    pauses = {}
    # Twice per size, keeping the shorter pause: a real dependence on image
    # size shows every time, a busy machine's hiccup does not.
    for size in (32 * MiB, 256 * MiB, 32 * MiB, 256 * MiB):
        with mig.Pair(size, size - 4 * MiB) as (src, dst, src_image, dst_image, data):
            journal = os.path.join(lmtest.tmp_dir("j"), "journal")
            writer = mig.Writer(src.uri, f"0:{4 * MiB}", journal, rate=200, duration=30)
            mig.migrate(src, dst, "precopy", handover="explicit", handover_size=1 * MiB)
            mig.wait_ready(src, timeout=120)
            reply = src.control({"op": "handover"})
            assert reply["ok"], reply
            pauses[size] = min(pauses.get(size, reply["handover_pause_ms"]), reply["handover_pause_ms"])
            writer.switch(dst.uri)
            writer.proc.terminate()
            writer.wait()
            mig.wait_phase(dst, ["Done"], timeout=120)
    small, large = pauses[32 * MiB], pauses[256 * MiB]
    assert large <= 4 * max(small, 25), f"pause {large} ms for 256 MiB against {small} ms for 32 MiB"


def test_a_source_killed_after_handover_serves_pulls_again_after_restart():
    src_image, data = mig.make_source_image(SIZE, DATA)
    dst_image = os.path.join(lmtest.tmp_dir("dst"), "dst.img")
    # A fixed port: the destination reconnects to the address it was given.
    src = lmtest.Server(control=True, image=src_image, listen=f"127.0.0.1:{mig.free_port()}").start()
    dst = lmtest.Server(control=True, image=dst_image, listen="127.0.0.1:0").start()
    try:
        mig.migrate(src, dst, "postcopy", handover="explicit", max_rate=2 * MiB)
        assert src.control({"op": "handover"})["ok"]
        hd = dst.connect()
        hd.pwrite(b"W" * BLOCK, 0)   # a local write after handover
        hd.flush()
        time.sleep(0.5)
        src.kill(signal.SIGKILL)
        assert mig.status(dst)["phase"] == "PostCopy"
        os.unlink(src.sock)
        src.start()                  # same image, same state file, same port
        st = mig.status(src)
        assert st["role"] == "source" and st["fenced"], st
        # A read of a block that is still missing is served once the source is back.
        last = DATA - BLOCK
        lmtest.assert_same(hd.pread(BLOCK, last), data[last:last + BLOCK], "a pulled block after the restart")
        mig.wait_phase(dst, ["Done"], timeout=120)
        expect = bytearray(data)
        expect[0:BLOCK] = b"W" * BLOCK
        lmtest.assert_same(lmtest.read_file(dst_image, 0, DATA), bytes(expect), "destination after the restart")
        # A write at the restarted source goes to the destination, which
        # holds the truth (issue #17).
        hs = src.connect()
        hs.pwrite(b"x" * BLOCK, 0)
        hs.flush()
        assert lmtest.read_file(dst_image, 0, BLOCK) == b"x" * BLOCK, "the write at the restarted source was lost"
    finally:
        src.stop()
        dst.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
