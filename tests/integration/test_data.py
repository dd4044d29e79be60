"""Data written through livemig.so reads back byte for byte, through NBD and
in the image file; the plugin advertises what it implements; readonly=true
refuses writes.

    LIVEMIG_PLUGIN=build/plugin/livemig.so PYTHONPATH=tests/integration \
        /usr/bin/python3 -m pytest tests/integration/test_data.py [-k NAME]
"""

import errno
import random
import sys

import nbd
import pytest

from lmtest import KiB, MiB, Server, assert_same, expect_nbd_error, make_image, nbd_read_all, read_file

SIZE = 8 * MiB + 1000  # the last 4K block is partial
SEG = 64 * KiB


def test_whole_image_random_data_reads_back():
    rng = random.Random(1)
    img = make_image(SIZE)
    expected = bytearray(rng.randbytes(SIZE))
    with Server(image=img, **{"segment-size": "64K"}) as s:
        h = s.connect()
        assert h.get_size() == SIZE, f"export size {h.get_size()} != image size {SIZE}"
        # Write in uneven chunks so request edges fall everywhere.
        off = 0
        while off < SIZE:
            n = min(rng.randrange(1, 600 * KiB), SIZE - off)
            h.pwrite(bytes(expected[off:off + n]), off)
            off += n
        h.flush()
        assert_same(nbd_read_all(h, SIZE), expected, "whole image via NBD")
        assert_same(read_file(img), expected, "whole image file")

        # The partial last block alone, and a read ending exactly at EOF.
        tail = h.pread(1000, 8 * MiB)
        assert_same(tail, expected[8 * MiB:], "partial last block via NBD")
        out_of_bounds = {errno.EINVAL, errno.ENOSPC, errno.EIO}
        expect_nbd_error(lambda: h.pread(1001, 8 * MiB), out_of_bounds, "read past the end (client check)")
        # With libnbd's own checks off, the server refuses as well and the
        # connection goes on working.
        h.set_strict_mode(0)
        expect_nbd_error(lambda: h.pread(1001, 8 * MiB), out_of_bounds, "read past the end")
        expect_nbd_error(lambda: h.pwrite(b"x" * 1001, 8 * MiB), out_of_bounds, "write past the end")
        expect_nbd_error(lambda: h.zero(4096, SIZE), out_of_bounds, "zero past the end")
        assert_same(h.pread(1000, 8 * MiB), expected[8 * MiB:], "partial last block after refused requests")
        assert read_file(img, SIZE) == b"", "a refused write past the end grew the image"


def test_unaligned_writes_across_block_and_segment_boundaries():
    rng = random.Random(2)
    img = make_image(SIZE)
    expected = bytearray(SIZE)
    with Server(image=img, **{"segment-size": "64K"}) as s:
        h = s.connect()
        writes = []
        # Straddle block (4K) and segment (64K) boundaries on purpose...
        for seg in (1, 2, 17, 63, 127):
            edge = seg * SEG
            writes += [(edge - 1, 2), (edge - 4097, 8195), (edge - 3, 1), (edge, 1), (edge - 5000, 2 * SEG + 10001)]
        for blk in (1, 3, 250, 1999):
            writes.append((blk * 4096 - 7, 14))
        # ...the very end of the image...
        writes += [(SIZE - 1, 1), (SIZE - 1001, 1001), (SIZE - 70000, 70000), (0, 1), (1, 4095)]
        # ...and random ones, which overlap each other.
        for _ in range(300):
            off = rng.randrange(SIZE)
            n = rng.randrange(1, min(200 * KiB, SIZE - off) + 1)
            writes.append((off, n))
        writes = [(off, min(n, SIZE - off)) for off, n in writes]
        for off, n in writes:
            data = rng.randbytes(n)
            h.pwrite(data, off)
            expected[off:off + n] = data
        # Unaligned reads across the same edges see the same bytes.
        for off, n in writes[:60]:
            lo = max(0, off - 3)
            hi = min(SIZE, off + n + 5)
            assert_same(h.pread(hi - lo, lo), expected[lo:hi], f"read [{lo}, {hi})")
        h.flush()
        assert_same(nbd_read_all(h, SIZE), expected, "whole image via NBD")
        assert_same(read_file(img), expected, "whole image file")


def test_fua_writes_and_flush_succeed_and_are_counted():
    rng = random.Random(3)
    img = make_image(SIZE)
    with Server(image=img, control=True, **{"segment-size": "64K"}) as s:
        h = s.connect()
        assert h.can_fua() and h.can_flush()
        before = s.control({"op": "stats"})["requests"]
        expected = {}
        nbytes = 0
        n_fua = 25
        for i in range(n_fua):
            off = rng.randrange(SIZE - 20000)
            data = rng.randbytes(rng.randrange(1, 20000))
            h.pwrite(data, off, nbd.CMD_FLAG_FUA)
            expected[off] = data
            nbytes += len(data)
            # A FUA write is in the file when it is acknowledged.
            assert_same(read_file(img, off, len(data)), data, f"FUA write at {off} in the file")
        n_flush = 7
        for _ in range(n_flush):
            h.flush()
        # FUA on trim and zero is accepted as well.
        h.zero(4096, 0, nbd.CMD_FLAG_FUA)
        h.trim(4096, 8192, nbd.CMD_FLAG_FUA)
        after = s.control({"op": "stats"})["requests"]
        assert after["pwrite"]["count"] - before["pwrite"]["count"] == n_fua, (before, after)
        assert after["pwrite"]["bytes"] - before["pwrite"]["bytes"] == nbytes, (before, after)
        assert after["flush"]["count"] - before["flush"]["count"] == n_flush, (before, after)
        assert after["zero"]["count"] - before["zero"]["count"] == 1, (before, after)
        assert after["trim"]["count"] - before["trim"]["count"] == 1, (before, after)
        assert after["errors"] == before["errors"], (before, after)


def test_advertises_capabilities_and_preferred_block_size():
    img = make_image(SIZE)
    for bs in (4096, 8192, 65536):
        with Server(image=img, **{"block-size": bs, "segment-size": "1M"}) as s:
            h = s.connect()
            caps = {name: getattr(h, name)() for name in
                    ("can_fua", "can_flush", "can_multi_conn", "can_trim", "can_zero", "can_fast_zero", "can_cache")}
            missing = [k for k, v in caps.items() if not v]
            assert not missing, f"block-size={bs}: not advertised: {missing}"
            assert not h.is_read_only(), "a read-write image is advertised read-only"
            assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not negotiated"
            pref = h.get_block_size(nbd.SIZE_PREFERRED)
            assert pref == bs, f"preferred block size {pref} != block-size={bs}"
            assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    with Server(image=img) as s:
        h = s.connect()
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096, "default block-size should be 4K"


def test_readonly_refuses_writes_and_serves_reads():
    rng = random.Random(4)
    content = rng.randbytes(SIZE)
    img = make_image(SIZE, data=content)
    with Server(image=img, readonly=True, control=True) as s:
        h = s.connect()
        assert h.is_read_only(), "readonly=true but the export is writable"
        assert_same(nbd_read_all(h, SIZE), content, "read-only image via NBD")
        refused = {errno.EPERM, errno.EROFS}
        assert not h.can_zero() and not h.can_trim(), "a read-only export advertises zero/trim"
        # libnbd refuses on the client side (zero and trim are simply not
        # offered by a read-only export: EINVAL)...
        expect_nbd_error(lambda: h.pwrite(b"x" * 512, 0), refused, "pwrite on a read-only export")
        expect_nbd_error(lambda: h.zero(512, 0), refused | {errno.EINVAL}, "zero on a read-only export")
        expect_nbd_error(lambda: h.trim(512, 0), refused | {errno.EINVAL}, "trim on a read-only export")
        # ...and with libnbd's checks off, the server refuses too.
        h.set_strict_mode(0)
        expect_nbd_error(lambda: h.pwrite(b"x" * 512, 4096), refused, "server-side pwrite on a read-only export")
        expect_nbd_error(lambda: h.zero(512, 4096), refused, "server-side zero on a read-only export")
        expect_nbd_error(lambda: h.trim(512, 4096), refused, "server-side trim on a read-only export")
        # Reads still work after the refusals, and nothing changed.
        assert_same(h.pread(8192, 0), content[:8192], "reads after refused writes")
        assert s.control({"op": "status"})["readonly"] is True
        stats = s.control({"op": "stats"})["requests"]
        assert stats["pwrite"]["count"] == 0 and stats["zero"]["count"] == 0 and stats["trim"]["count"] == 0, stats
    assert_same(read_file(img), content, "read-only image file")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
