"""Clients connected to the wrong side on purpose, through the handover, in
every mode (issue #17; docs/handover.md, "Forwarding"): authority moves,
connections do not.

In each migration four clients run from before `migrate` until after the
handover, none of them ever switching server:

- on the destination (not authoritative before handover: its requests are
  forwarded to the source), and
- on the source (not authoritative after handover: its requests are
  forwarded to the destination; it stays there through post-copy and Done),

each side with the verifying writer (lm-workload: 8 writes in flight, FUA
and flushes, every acknowledged write journalled) and a read-back checker
(libnbd, one request at a time: partial-block writes, zeroes and trims into
the source's data, each read back at once, and reads of the source's data
that nobody writes), so reads, which take another path than writes, are
checked as they happen. Another test sends requests longer than a FORWARD
frame from the wrong side.

At the end: no client saw an error (no EROFS/EPERM, no EIO, no retry), no
read returned a byte other than the last acknowledged one, the
destination's image is byte for byte what the clients know they wrote over
the source's data, and each side's status counted forwarded requests.

    LIVEMIG_PLUGIN=build/plugin/livemig.so LIVEMIG_BUILD_DIR=build PYTHONPATH=tests/integration \\
        /usr/bin/python3 -m pytest tests/integration/test_wrong_side.py [-k NAME]

Each mode is one case of the parametrized test (`-k precopy` runs one).
"""

import errno
import json
import os
import random
import signal
import sys
import threading
import time

import nbd
import pytest

import lmtest
import migration as mig
from lmtest import MiB

BLOCK = 4096
SIZE = 64 * MiB
DATA = 16 * MiB                      # the source's data; the rest is a hole
# Each client's own area. The checkers write inside the source's data, so
# that post-copy has partly written blocks to pull; the writers in the hole.
CHECKER_AREA = {"dst": (8 * MiB, 1 * MiB), "src": (9 * MiB, 1 * MiB)}
WRITER_REGION = {"dst": (32 * MiB, 8 * MiB), "src": (40 * MiB, 8 * MiB)}
# Slow enough that the migration is still going when the handover comes,
# fast enough that post-copy ends in a few seconds.
MAX_RATE = 8 * MiB
BEFORE_HANDOVER = 2.0    # seconds of wrong-side I/O at the destination, at least
AFTER_HANDOVER = 2.0     # and at the old source

MODES = {
    "precopy": {},
    "postcopy": {},
    "hybrid": {"threshold": 4},
    "livefs": {"monitor_period": 1, "threshold": 1},
    "auto": {},
}


class Checker(threading.Thread):
    """One libnbd connection that never switches: writes random bytes (0.5 to
    8 KiB, sector aligned, often across a block boundary) into its own area,
    reads each one back at once and now and then reads a random earlier one
    or the source's untouched data; flushes, and FUA now and then. Every
    request that fails is an error: nothing is retried."""

    def __init__(self, uri, area, data, seed):
        super().__init__(daemon=True)
        self.uri, (self.off, self.len), self.data = uri, area, data
        self.rnd = random.Random(seed)
        self.model = bytearray(data[self.off:self.off + self.len])
        self.stop_event = threading.Event()
        self.writes = self.reads = self.flushes = 0
        self.errors = []        # (what, errno name, message)
        self.mismatches = []    # (what, offset, length)
        self.h = None

    def run(self):
        try:
            self.h = nbd.NBD()
            self.h.connect_uri(self.uri)
            while not self.stop_event.is_set():
                self.step()
            self.guard("final flush", self.h.flush)
        except Exception as e:  # a failure outside a request: report it too
            self.errors.append(("client", type(e).__name__, str(e)))

    def guard(self, what, fn, *args):
        try:
            return fn(*args), True
        except nbd.Error as e:
            self.errors.append((what, str(e.errno), str(e)))
            return None, False

    def check_read(self, what, off, length, expect):
        got, ok = self.guard(what, self.h.pread, length, off)
        self.reads += 1
        if ok and got != expect:
            self.mismatches.append((what, off, length, lmtest.first_difference(got, expect)))

    def step(self):
        r = self.rnd
        sectors = r.randint(1, 16)
        rel = r.randrange(0, (self.len - sectors * 512) // 512) * 512
        length = sectors * 512
        flags = nbd.CMD_FLAG_FUA if r.random() < 0.1 else 0
        op = r.random()
        if op < 0.8:
            blob = r.randbytes(length)
            _, ok = self.guard("write", self.h.pwrite, blob, self.off + rel, flags)
        elif op < 0.9:   # write zeroes: must read as zeros, with or without a hole
            blob = bytes(length)
            if r.random() < 0.5:
                flags |= nbd.CMD_FLAG_NO_HOLE
            _, ok = self.guard("zero", self.h.zero, length, self.off + rel, flags)
        else:            # trim: livemig punches a hole, which reads as zeros
            blob = bytes(length)
            _, ok = self.guard("trim", self.h.trim, length, self.off + rel, flags)
        self.writes += 1
        if ok:
            self.model[rel:rel + len(blob)] = blob
        self.check_read("read back", self.off + rel, len(blob), bytes(self.model[rel:rel + len(blob)]))
        if r.random() < 0.3:   # an earlier write, whole blocks around it
            rel = r.randrange(0, self.len // BLOCK) * BLOCK
            self.check_read("read own area", self.off + rel, 2 * BLOCK if rel + 2 * BLOCK <= self.len else BLOCK,
                            bytes(self.model[rel:rel + 2 * BLOCK]))
        if r.random() < 0.3:   # the source's data, which no client writes
            length = r.choice((BLOCK, 16 * 1024, 64 * 1024))
            off = r.randrange(0, (8 * MiB - length) // BLOCK + 1) * BLOCK
            self.check_read("read source data", off, length, self.data[off:off + length])
        if r.random() < 0.05:
            self.guard("flush", self.h.flush)
            self.flushes += 1

    def finish(self):
        self.stop_event.set()
        self.join(60)
        if self.is_alive():
            raise AssertionError(f"checker on {self.uri} did not stop in 60 s")
        if self.h is not None:
            lmtest._close_handle(self.h)

    def summary(self):
        return f"{self.writes} writes, {self.reads} reads, {self.flushes} flushes"


def start_writer(side, server):
    off, length = WRITER_REGION[side]
    journal = os.path.join(lmtest.tmp_dir("j"), f"journal-{side}")
    w = mig.Writer(server.uri, f"{off}:{length}", journal, rate=400,
                   extra=["--flush-every", "64", "--fua-every", "16",
                          "--json-out", journal + ".json"])
    w.side = side
    return w


def stop_writer(w):
    """SIGINT: the writer finishes its in-flight writes, flushes and exits;
    returns its totals (--json-out)."""
    if w.proc.poll() is None:
        os.kill(w.proc.pid, signal.SIGINT)
    rc = w.wait(60)
    try:
        with open(w.journal + ".json") as f:
            totals = json.load(f)
    except FileNotFoundError:
        raise AssertionError(f"{w.side} writer (exit {rc}) wrote no totals:\n{w.log()}") from None
    assert rc == 0 and totals["ok"], f"{w.side} writer failed (exit {rc}):\n{w.log()}"
    return totals


def forwarded(server):
    return mig.status(server).get("migration", {}).get("forwarded_requests", 0)


def wrong_side_through_handover(mode, **params):
    with mig.Pair(SIZE, DATA) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, mode, handover="explicit", max_rate=MAX_RATE, **params)
        clients = []
        try:
            writers = {side: start_writer(side, s) for side, s in (("dst", dst), ("src", src))}
            clients += writers.values()
            checkers = {side: Checker(s.uri, CHECKER_AREA[side], data, seed=f"{mode}-{side}")
                        for side, s in (("dst", dst), ("src", src))}
            clients += checkers.values()
            for c in checkers.values():
                c.start()
            t0 = time.monotonic()
            mig.wait_ready(src, timeout=90)
            time.sleep(max(0.0, BEFORE_HANDOVER - (time.monotonic() - t0)))
            st_dst = mig.status(dst)
            assert not st_dst["authoritative"], st_dst
            fwd_dst = st_dst["migration"]["forwarded_requests"]
            fwd_src_before = forwarded(src)
            reply = src.control({"op": "handover"})
            assert reply["ok"], reply
            assert not mig.status(src)["authoritative"] and mig.status(dst)["authoritative"]
            left_at_handover = mig.status(dst)["migration"].get("blocks_left")
            time.sleep(AFTER_HANDOVER)
            # Post-copy may still be pulling, or be over: the old source's
            # clients are forwarded either way.
            phase_after = mig.status(dst)["phase"]
            for c in checkers.values():
                c.finish()
            totals = {side: stop_writer(w) for side, w in writers.items()}
            clients.clear()
        finally:
            for c in clients:
                if isinstance(c, Checker):
                    c.stop_event.set()
                elif c.proc.poll() is None:
                    lmtest._kill(c.proc)
        st_src = mig.wait_phase(src, ["Done"], timeout=90)
        st_dst = mig.wait_phase(dst, ["Done"], timeout=90)

        # No client saw an error, none had to retry, no read was stale.
        for side, t in totals.items():
            assert t["write_errors"] == 0 and t["retries"] == 0 and t["flush_failures"] == 0, \
                f"{mode}: the writer on {side} saw errors: {t}"
            assert t["writes_acked"] > 0, t
        for side, c in checkers.items():
            assert not c.errors, f"{mode}: the checker on {side} saw errors ({c.summary()}): {c.errors[:5]}"
            assert not c.mismatches, \
                f"{mode}: the checker on {side} read stale or wrong bytes ({c.summary()}): {c.mismatches[:5]}"
            assert c.writes > 0 and c.reads > 0, c.summary()

        # Forwarding did the work: the destination's clients before
        # handover, the source's after it.
        assert fwd_dst > 0, f"{mode}: the destination forwarded nothing before handover"
        assert fwd_src_before == 0, f"{mode}: the source forwarded {fwd_src_before} requests while authoritative"
        fwd_src = st_src["migration"]["forwarded_requests"]
        assert fwd_src > 0, f"{mode}: the old source forwarded nothing after handover: {st_src['migration']}"

        # The destination's image, byte for byte: the source's data with the
        # checkers' writes, the writers' journals, zeros elsewhere.
        expect = bytearray(data)
        for side, c in checkers.items():
            expect[c.off:c.off + c.len] = c.model
        lmtest.assert_same(lmtest.read_file(dst_image, 0, DATA), bytes(expect), f"{mode}: the data area")
        hole = lmtest.read_file(dst_image, DATA, 32 * MiB - DATA)
        lmtest.assert_same(hole, bytes(len(hole)), f"{mode}: the hole before the writers' regions")
        tail = lmtest.read_file(dst_image, 48 * MiB, SIZE - 48 * MiB)
        lmtest.assert_same(tail, bytes(len(tail)), f"{mode}: the hole after the writers' regions")
        for side, w in writers.items():
            off, length = WRITER_REGION[side]
            rc, out = mig.verify_journal(dst.uri, w.journal, "--region", f"{off}:{length}", "--initial", "zero")
            assert rc == 0, f"{mode}: the {side} writer's acknowledged writes are not at the destination:\n{out}"
        print(f"  {mode}: {left_at_handover} blocks left at handover, destination {phase_after} when the "
              f"clients stopped; forwarded {fwd_dst} requests from the destination before handover, "
              f"{fwd_src} from the old source after; writers acked "
              f"{totals['dst']['writes_acked']} (dst) + {totals['src']['writes_acked']} (src); checkers "
              f"{checkers['dst'].summary()} (dst), {checkers['src'].summary()} (src)")


def test_wrong_side_requests_longer_than_a_frame_are_applied_whole():
    """A write or zero of more than 16 MiB travels as several FORWARD frames;
    the client sees one request, applied whole. A fast zero is not
    forwarded (a zero that crosses the network is not fast): ENOTSUP."""
    big = 20 * MiB
    with mig.Pair(SIZE, DATA) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "postcopy", handover="explicit", max_rate=MAX_RATE)
        hd = dst.connect()
        blob_d = random.Random(1).randbytes(big)
        hd.pwrite(blob_d, 4 * MiB)
        hd.flush()
        lmtest.assert_same(hd.pread(big, 4 * MiB), blob_d, "a long write read back at the destination")
        lmtest.expect_nbd_error(lambda: hd.zero(BLOCK, 0, nbd.CMD_FLAG_FAST_ZERO), {errno.ENOTSUP, errno.EOPNOTSUPP},
                                "a fast zero at the destination before handover")
        assert mig.status(dst)["migration"]["forwarded_requests"] >= 2
        assert src.control({"op": "handover"})["ok"]
        hs = src.connect()
        blob_s = random.Random(2).randbytes(big)
        hs.pwrite(blob_s, 40 * MiB, nbd.CMD_FLAG_FUA)
        hs.zero(big, 12 * MiB)          # over part of both long writes and the data
        lmtest.assert_same(hs.pread(big, 40 * MiB), blob_s, "a long write read back at the old source")
        lmtest.assert_same(hs.pread(big, 12 * MiB), bytes(big), "a long zero read back at the old source")
        lmtest.expect_nbd_error(lambda: hs.zero(BLOCK, 0, nbd.CMD_FLAG_FAST_ZERO), {errno.ENOTSUP, errno.EOPNOTSUPP},
                                "a fast zero at the old source after handover")
        hs.flush()
        mig.wait_phase(dst, ["Done"], timeout=60)
        expect = bytearray(data) + bytearray(SIZE - DATA)
        expect[4 * MiB:4 * MiB + big] = blob_d
        expect[40 * MiB:40 * MiB + big] = blob_s
        expect[12 * MiB:12 * MiB + big] = bytes(big)
        lmtest.assert_same(lmtest.read_file(dst_image), bytes(expect), "the destination's image")


@pytest.mark.parametrize("mode", MODES)
def test_clients_on_the_wrong_side_through_handover_see_no_error_and_lose_nothing(mode):
    wrong_side_through_handover(mode, **MODES[mode])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
