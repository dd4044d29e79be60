"""Faults around forwarded requests (issue #17): a client on the side that is
not authoritative keeps its connection when the other side dies, so this
side must keep the durability promises a local client of the other side
would get from losing its connection. Found by the issue's tests (helper
repro_issue17.py); each failed on 51ddfc3:

1. A flush at the old source after the destination was killed -9 and
   restarted succeeded, though the writes it covered were acknowledged by
   the dead process (presence in memory only) and the restarted one pulled
   those blocks again over them. Now that flush fails with EIO, and so does
   every later one until the old source's clients have disconnected
   (ForwardedWrites, plugin/write_forward.h).
2. The same under the verifying writer, durable-only verification.
3. Reads at the old source failed after the destination restarted in Done
   (no presence map there, the PULL was refused as NotAuthoritative).
4. A FORWARD arriving on a resume link the source had not adopted yet closed
   the link: a restarted source could not resume while a client of the
   destination wrote. Now it is answered ESTALE and sent again.
"""

import json
import os
import signal
import sys
import time

import nbd
import pytest

import lmtest
import migration as mig
from lmtest import MiB

BLOCK = 4096
SIZE = 32 * MiB
DATA = 8 * MiB
KEYS = {"peer-timeout": 3}   # a dead peer is noticed in seconds


def plugins(size=SIZE, data_len=DATA):
    """Each plugin on a fixed port: a restarted one comes back on the same
    address."""
    return mig.Pair(size, data_len, fixed_ports=True, **KEYS)


def test_a_flush_at_the_old_source_covers_writes_forwarded_before_a_destination_restart():
    with plugins() as (src, dst, src_image, dst_image, data):
        # A slow post-copy: the blocks written below are still missing at
        # the destination when it dies.
        mig.migrate(src, dst, "postcopy", handover="explicit", max_rate=1 * MiB)
        assert src.control({"op": "handover"})["ok"]
        hs = src.connect()
        in_data, in_hole = 7 * MiB, 20 * MiB
        hs.pwrite(b"W" * BLOCK, in_data)     # acknowledged, not yet flushed
        hs.pwrite(b"H" * BLOCK, in_hole)
        dst.kill(signal.SIGKILL)
        mig.restart(dst)
        for attempt in range(2):   # told, and told again: a later OK would claim the lost writes
            try:
                hs.flush()
            except nbd.Error as e:
                assert e.errno == "EIO", e
            else:                  # a flush may succeed only if the writes are there
                lmtest.assert_same(hs.pread(BLOCK, in_data), b"W" * BLOCK, f"read after flush {attempt}")
                lmtest.assert_same(hs.pread(BLOCK, in_hole), b"H" * BLOCK, f"read after flush {attempt}")
        assert mig.status(src)["migration"].get("forwarded_flushes_fail"), mig.status(src)
        hs.shutdown()
        del hs
        deadline = time.monotonic() + 10   # nbdkit closes the connection after the reply
        while mig.status(src)["migration"].get("forwarded_flushes_fail"):
            assert time.monotonic() < deadline, "the last client went, and flushes still fail"
            time.sleep(0.1)
        hs = src.connect()         # a new connection starts afresh
        hs.pwrite(b"N" * BLOCK, in_hole)
        hs.flush()
        mig.wait_phase(dst, ["Done"], timeout=90)
        lmtest.assert_same(lmtest.read_file(dst_image, in_hole, BLOCK), b"N" * BLOCK, "write after reconnecting")


def test_a_client_on_the_old_source_keeps_its_durable_writes_across_a_kill_9_of_the_destination():
    region = f"{16 * MiB}:{8 * MiB}"
    for attempt in range(3):   # the window is narrow: a few tries
        with plugins() as (src, dst, src_image, dst_image, data):
            mig.migrate(src, dst, "postcopy", handover="explicit", max_rate=4 * MiB)
            assert src.control({"op": "handover"})["ok"]
            journal = os.path.join(lmtest.tmp_dir("j"), "journal")
            w = mig.Writer(src.uri, region, journal, rate=300,
                           extra=["--flush-every", "16", "--fua-every", "8", "--retry-timeout", "60"])
            time.sleep(1.5)
            dst.kill(signal.SIGKILL)
            time.sleep(1.0)
            mig.restart(dst)
            time.sleep(2.0)
            os.kill(w.proc.pid, signal.SIGINT)
            assert w.wait(90) == 0, w.log()
            mig.wait_phase(dst, ["Done"], timeout=90)
            rc, out = mig.verify_journal(dst.uri, journal, "--durable-only", "--region", region, "--initial", "zero")
            assert rc == 0, f"attempt {attempt + 1}: durable writes lost:\n{out}"


def test_reads_at_the_old_source_work_after_the_destination_restarted_in_done():
    with plugins() as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "precopy", handover="auto")
        mig.wait_phase(dst, ["Done"], timeout=60)
        mig.wait_phase(src, ["Done"], timeout=30)
        hs = src.connect()
        hs.pwrite(b"a" * BLOCK, 0)
        hs.flush()
        lmtest.assert_same(hs.pread(BLOCK, 0), b"a" * BLOCK, "read at the old source before the restart")
        dst.kill(signal.SIGKILL)
        mig.restart(dst)
        hs.pwrite(b"b" * BLOCK, BLOCK, nbd.CMD_FLAG_FUA)   # forwarded: works
        lmtest.assert_same(hs.pread(2 * BLOCK, 0), b"a" * BLOCK + b"b" * BLOCK,
                           "read at the old source after the destination restarted")


def test_a_restarted_source_resumes_while_a_client_of_the_destination_writes():
    with plugins() as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "postcopy", handover="explicit", max_rate=4 * MiB)
        journal = os.path.join(lmtest.tmp_dir("j"), "journal")
        w = mig.Writer(dst.uri, f"{16 * MiB}:{8 * MiB}", journal, rate=300,
                       extra=["--flush-every", "16", "--retry-timeout", "30", "--json-out", journal + ".json"])
        try:
            time.sleep(1.5)
            src.kill(signal.SIGKILL)
            time.sleep(1.0)
            mig.restart(src)
            refused = set()
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:   # what the source says while it resumes
                err = str(mig.status(src).get("last_error"))
                if "FORWARD frame" in err:
                    refused.add(err)
                time.sleep(0.2)
            with lmtest.ControlClient(src.control_path, timeout=30) as c:
                t0 = time.monotonic()
                reply = c.request({"op": "handover"})
            took = time.monotonic() - t0
        finally:
            os.kill(w.proc.pid, signal.SIGINT)
            w.wait(60)
        with open(journal + ".json") as f:
            totals = json.load(f)
        assert not refused, f"the resume link was closed for a FORWARD frame: {sorted(refused)}"
        assert reply["ok"] and took < 5, f"handover took {took:.1f} s: {reply}"
        assert totals["write_errors"] == 0, f"the destination's client saw errors: {totals}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
