"""Trim and zero through livemig.so: the range reads back as zeros and its
neighbours keep their data; trimming frees file blocks, which base:allocation
block status (and nbdinfo --map) then report as holes; data is reported
exactly where it was written.

Hole reporting needs a file system with SEEK_DATA/SEEK_HOLE (ext4, xfs,
btrfs, tmpfs); the test checks that the temp dir has it and works at that
file system's block size (4K on ext4 and tmpfs).

    LIVEMIG_PLUGIN=build/plugin/livemig.so PYTHONPATH=tests/integration \
        /usr/bin/python3 -m pytest tests/integration/test_trim_zero_extents.py [-k NAME]
"""

import ctypes
import errno
import json
import os
import random
import subprocess
import sys

import nbd
import pytest

import lmtest
from lmtest import (KiB, MiB, Server, assert_same, block_status_map, make_image, nbd_read_all, read_file,
                    require_seek_hole)

HOLE = nbd.STATE_HOLE | nbd.STATE_ZERO
SIZE = 4 * MiB


def fs_granularity():
    return require_seek_hole(lmtest.tmp_root())


def filled_server(rng, size=SIZE, **keys):
    """A server over an image full of random data (written through NBD and
    flushed, so every block is allocated); returns (server, handle, expected)."""
    img = make_image(size)
    s = Server(image=img, control=True, **keys).start()
    h = s.connect()
    expected = bytearray(rng.randbytes(size))
    for off in range(0, size, MiB):
        h.pwrite(bytes(expected[off:off + MiB]), off)
    h.flush()
    return s, h, expected


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def extents_of(h, size):
    return block_status_map(h, size)


def expected_map(size, data_ranges):
    """The merged extent list for an image holding data exactly in the
    (sorted, disjoint, non-adjacent) `data_ranges` and holes elsewhere."""
    out = []
    pos = 0
    for off, n in data_ranges:
        if off > pos:
            out.append((pos, off - pos, HOLE))
        out.append((off, n, 0))
        pos = off + n
    if pos < size:
        out.append((pos, size - pos, HOLE))
    return out


def nbdinfo_map(uri):
    out = subprocess.run(["nbdinfo", "--map", "--json", uri], check=True, capture_output=True, text=True,
                         timeout=60).stdout
    ext = []
    for e in json.loads(out):
        if ext and ext[-1][2] == e["type"] and ext[-1][0] + ext[-1][1] == e["offset"]:
            o, l, t = ext[-1]
            ext[-1] = (o, l + e["length"], t)
        else:
            ext.append((e["offset"], e["length"], e["type"]))
    return ext


def zero_range_supported(dir):
    """True if the file system under `dir` has fallocate(FALLOC_FL_ZERO_RANGE)
    (ext4 and xfs do; tmpfs does not)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE = 0x01, 0x10
    path = os.path.join(dir, ".zero-range-probe")
    with open(path, "wb") as f:
        f.write(b"x" * 8192)
        f.flush()
        ok = libc.fallocate(f.fileno(), FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, 4096) == 0
    os.unlink(path)
    return ok


def test_trim_and_zero_read_back_as_zeros_with_neighbours_untouched():
    rng = random.Random(10)
    s, h, expected = filled_server(rng, **{"segment-size": "64K"})
    # A fast zero must fail with ENOTSUP, changing nothing, where zeroing
    # would be slow: with NO_HOLE that is where the file system cannot
    # FALLOC_FL_ZERO_RANGE (tmpfs). A client then zeroes the slow way.
    zero_range = zero_range_supported(lmtest.tmp_root())
    fast_refused = []

    def fast_zero(n, off, flags):
        try:
            h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO | flags)
        except nbd.Error as e:
            if lmtest.nbd_errno(e) != errno.ENOTSUP:
                raise
            assert_same(h.pread(n, off), expected[off:off + n], f"range of a refused fast zero [{off}, +{n})")
            fast_refused.append((flags, off))
            h.zero(n, off, flags)

    try:
        ops = [
            ("trim", lambda n, off: h.trim(n, off)),
            ("zero (may trim)", lambda n, off: h.zero(n, off)),
            ("zero NO_HOLE", lambda n, off: h.zero(n, off, nbd.CMD_FLAG_NO_HOLE)),
            ("zero FAST_ZERO", lambda n, off: fast_zero(n, off, 0)),
            ("zero FAST_ZERO|NO_HOLE", lambda n, off: fast_zero(n, off, nbd.CMD_FLAG_NO_HOLE)),
            ("zero FUA", lambda n, off: h.zero(n, off, nbd.CMD_FLAG_FUA)),
        ]
        base = 0
        for name, op in ops:
            # Per op: one block-aligned range, one unaligned range inside a
            # block, and one unaligned range across a segment boundary.
            for off, n in ((base + 64 * KiB, 16 * KiB),
                           (base + 200 * KiB + 100, 1000),
                           (base + 512 * KiB - 5000, 70000)):
                op(n, off)
                expected[off:off + n] = bytes(n)
                lo, hi = max(0, off - 8192), min(SIZE, off + n + 8192)
                got = h.pread(hi - lo, lo)
                assert got[off - lo:off - lo + n] == bytes(n), f"{name} [{off}, {off + n}) does not read as zeros"
                assert_same(got, expected[lo:hi], f"{name} [{off}, {off + n}) and its neighbours")
            base += 600 * KiB
        assert base <= SIZE
        # Punching holes is always fast here; ZERO_RANGE only where supported.
        want_refused = [] if zero_range else [nbd.CMD_FLAG_NO_HOLE] * 3
        assert [f for f, _ in fast_refused] == want_refused, (fast_refused, zero_range)
        h.flush()
        assert_same(nbd_read_all(h, SIZE), expected, "whole image via NBD")
        assert_same(read_file(s.keys["image"]), expected, "whole image file")
        req = s.control({"op": "stats"})["requests"]
        assert req["trim"]["count"] == 3 and req["zero"]["count"] == 3 * (len(ops) - 1), req
        assert req["errors"] == 0, req
    finally:
        s.stop()


def test_trim_and_zero_may_trim_free_blocks_and_report_holes():
    gran = fs_granularity()
    rng = random.Random(11)
    s, h, expected = filled_server(rng)
    img = s.keys["image"]
    try:
        full = allocated_bytes(img)
        assert full >= SIZE, f"a fully written image has only {full} bytes allocated"
        assert extents_of(h, SIZE) == [(0, SIZE, 0)], extents_of(h, SIZE)

        # Trim 1 MiB: those blocks are freed and reported as a hole.
        h.trim(MiB, MiB)
        h.flush()
        after_trim = allocated_bytes(img)
        assert full - after_trim >= MiB, f"trim freed {full - after_trim} bytes, expected >= {MiB}"
        assert extents_of(h, SIZE) == expected_map(SIZE, [(0, MiB), (2 * MiB, 2 * MiB)]), extents_of(h, SIZE)

        # Zero without NO_HOLE may trim: 512K more freed, another hole.
        h.zero(512 * KiB, 3 * MiB)
        h.flush()
        after_zero = allocated_bytes(img)
        assert after_trim - after_zero >= 512 * KiB, \
            f"zero (may trim) freed {after_trim - after_zero} bytes, expected >= {512 * KiB}"
        want = expected_map(SIZE, [(0, MiB), (2 * MiB, MiB), (3 * MiB + 512 * KiB, 512 * KiB)])
        assert extents_of(h, SIZE) == want, (extents_of(h, SIZE), want)
        assert nbdinfo_map(s.uri) == want, (nbdinfo_map(s.uri), want)

        # Zero with NO_HOLE must not punch: the blocks stay allocated.
        h.zero(256 * KiB, 0, nbd.CMD_FLAG_NO_HOLE)
        h.flush()
        assert allocated_bytes(img) >= after_zero, \
            f"zero NO_HOLE freed {after_zero - allocated_bytes(img)} bytes"
        assert h.pread(256 * KiB, 0) == bytes(256 * KiB)

        # An unaligned trim frees only the whole fs blocks inside it; the
        # partial blocks at its edges read as zeros but hold data.
        off, n = 2 * MiB + 100, 5 * gran
        h.trim(n, off)
        h.flush()
        first_full = (off + gran - 1) // gran * gran
        last_full = (off + n) // gran * gran
        m = extents_of(h, SIZE)
        holes = [(o, l) for o, l, f in m if f == HOLE and o < 3 * MiB and o + l > 2 * MiB]
        assert holes == [(first_full, last_full - first_full)], (holes, first_full, last_full)
        assert h.pread(n, off) == bytes(n)
        for r_off, r_n in ((2 * MiB, 100), (off + n, 4096)):
            assert_same(h.pread(r_n, r_off), expected[r_off:r_off + r_n], f"neighbour [{r_off}, +{r_n})")
    finally:
        s.stop()


def test_fresh_sparse_image_is_one_hole():
    fs_granularity()
    for size in (SIZE, 3 * MiB + 1000):
        img = make_image(size)
        with Server(image=img) as s:
            h = s.connect()
            raw = []
            h.block_status(size, 0, lambda ctx, off, entries, err: raw.extend(entries) or 0)
            assert raw == [size, HOLE], f"size {size}: extents {raw}, expected one hole"
            assert nbdinfo_map(s.uri) == [(0, size, HOLE)], nbdinfo_map(s.uri)
            assert h.pread(size, 0) == bytes(size)


def test_partly_written_image_reports_data_exactly_where_written():
    gran = fs_granularity()
    size = 4 * MiB + 1000  # the last block is partial
    img = make_image(size)
    rng = random.Random(12)
    # Aligned to the fs block size (4K on ext4/tmpfs), so the file system
    # allocates exactly these ranges. One crosses a segment boundary.
    ranges = [(16 * gran, 3 * gran), (MiB + gran, gran), (2 * MiB - gran, 2 * gran),
              (3 * MiB, 64 * KiB), (size - 1000, 1000)]
    with Server(image=img, **{"segment-size": "1M"}) as s:
        h = s.connect()
        for off, n in ranges:
            h.pwrite(rng.randbytes(n), off)
        assert all(off % gran == 0 for off, n in ranges)
        want = expected_map(size, ranges)
        for flush in (False, True):
            if flush:
                h.flush()
            got = extents_of(h, size)
            assert got == want, f"flush={flush}: block status {got}, expected {want}"
            assert nbdinfo_map(s.uri) == want, f"flush={flush}: nbdinfo --map {nbdinfo_map(s.uri)}"

        # A query that starts and ends mid-extent is clipped to the query.
        q_off, q_len = 16 * gran - 100, 3 * gran + 200
        assert block_status_map(h, q_len, q_off) == [(q_off, 100, HOLE), (16 * gran, 3 * gran, 0),
                                                      (19 * gran, 100, HOLE)], block_status_map(h, q_len, q_off)
        # REQ_ONE: one extent, the first.
        raw = []
        h.block_status(size, 0, lambda ctx, off, entries, err: raw.extend(entries) or 0, nbd.CMD_FLAG_REQ_ONE)
        assert raw == [16 * gran, HOLE], raw
        # Holes read back as zeros.
        assert h.pread(16 * gran, 0) == bytes(16 * gran)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
