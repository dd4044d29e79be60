"""Checksum resync (issue #14): a destination that already holds an older
copy is sent only the blocks that differ. Migrate-back: A -> B, writes on
B, B -> A moves about the blocks written on B, and A ends byte for byte
equal to B; a corrupted block in A's older copy is found and sent.

    LIVEMIG_PLUGIN=build/plugin/livemig.so PYTHONPATH=tests/integration \\
        /usr/bin/python3 -m pytest tests/integration/test_resync.py [-k NAME]
"""

import os
import random
import sys

import pytest

import lmtest
from lmtest import MiB
import migration as mig

BLOCK = 4096
SIZE = 64 * MiB
DATA = 48 * MiB


def write_blocks(server, blocks, seed):
    """Random data into `blocks` (block numbers) through NBD, flushed;
    returns {block: data}."""
    rng = random.Random(seed)
    h = server.connect()
    written = {}
    for b in blocks:
        written[b] = rng.randbytes(BLOCK)
        h.pwrite(written[b], b * BLOCK)
    h.flush()
    server.disconnect(h)
    return written


def migrate_and_wait(src, dst, **params):
    reply = mig.migrate(src, dst, "precopy", handover="auto", **params)
    mig.wait_phase(dst, ["Done"], timeout=120)
    return reply, mig.wait_phase(src, ["Done"], timeout=30)


def test_migrating_back_moves_only_the_blocks_written_since_and_ends_byte_for_byte_equal():
    with mig.Pair(SIZE, DATA) as (a, b, a_image, b_image, data):
        migrate_and_wait(a, b)
        # The guest runs on B a while: scattered single blocks (the worst
        # case for range checksums: one block per MiB or less) and one run.
        rng = random.Random(21)
        scattered = rng.sample(range(SIZE // BLOCK), 300)
        run = list(range(5000, 5000 + 256))
        written = write_blocks(b, sorted(set(scattered) | set(run)), seed=22)
        assert a.control({"op": "release"})["ok"]   # a former source: fenced, its copy older
        reply, st = migrate_and_wait(b, a)
        assert reply["resync"], reply
        m = st["migration"]
        payload = len(written) * BLOCK
        assert m["data_blocks_sent"] == len(written), \
            f"{m['data_blocks_sent']} blocks sent for {len(written)} written on B: {m}"
        assert m["wire_bytes"] <= 1.1 * payload, \
            f"{m['wire_bytes']} bytes crossed for {payload} bytes written on B ({m['wire_bytes'] / payload:.2f}x)"
    lmtest.assert_same(lmtest.read_file(a_image), lmtest.read_file(b_image), "A after migrating back, against B")


def test_a_corrupted_block_in_the_older_copy_is_found_and_sent():
    with mig.Pair(SIZE, DATA) as (a, b, a_image, b_image, data):
        migrate_and_wait(a, b)
        assert a.control({"op": "release"})["ok"]
        a.stop()
        with open(a_image, "r+b") as f:   # bit rot in A's copy, behind the plugin's back
            f.seek(777 * BLOCK + 100)
            f.write(b"\xff")
        os.unlink(a.sock)   # nbdkit does not replace a stale socket
        a.argv.append("accept-incoming=always")   # the operator: A's copy may be overwritten
        a.start()
        reply, st = migrate_and_wait(b, a)
        m = st["migration"]
        assert m["data_blocks_sent"] == 1, m
    lmtest.assert_same(lmtest.read_file(a_image), lmtest.read_file(b_image), "A after the resync, against B")


def test_the_verifying_writer_loses_nothing_while_migrating_back():
    """Writes racing the checksum comparison and the pushes: each sets its
    blocks owed again after they were claimed, so none is lost."""
    with mig.Pair(SIZE, DATA, **{"segment-size": "1M"}) as (a, b, a_image, b_image, data):
        migrate_and_wait(a, b)
        write_blocks(b, range(0, 2048, 7), seed=23)
        assert a.control({"op": "release"})["ok"]
        hot = f"{8 * MiB}:{24 * MiB}"   # over data both sides hold, so the comparison sees the writes land
        reply, _, st = mig.writer_across_handover(b, a, hot, "any", max_rate=16 * MiB, handover_size=512 * 1024)
        assert reply["resync"], reply
        assert st["migration"]["blocks_received"] < SIZE // BLOCK, st["migration"]   # not a full copy
    before_hot = lmtest.read_file(b_image, 0, 8 * MiB)
    lmtest.assert_same(lmtest.read_file(a_image, 0, 8 * MiB), before_hot, "the blocks before the writer's region")



def restart(server):
    server.stop()
    if os.path.exists(server.sock):
        os.unlink(server.sock)   # nbdkit does not replace a stale socket
    server.start()


def test_a_released_former_source_stays_fenced_across_a_restart_and_takes_the_migration_back():
    with mig.Pair(SIZE, DATA) as (a, b, a_image, b_image, data):
        migrate_and_wait(a, b)
        write_blocks(b, [3, 333, 3333], seed=24)
        assert a.control({"op": "release"})["ok"]
        assert a.control({"op": "release"})["ok"]   # twice: still fenced, its state file kept
        restart(a)   # before the fix: the fence was lost, A's stale copy served writable
        st = mig.status(a)
        assert st["fenced"] and not st["authoritative"], st
        h = a.connect()
        lmtest.expect_nbd_error(lambda: h.pwrite(b"x" * BLOCK, 0), {lmtest.errno.EROFS, lmtest.errno.EPERM},
                                "a write to a released former source after its restart")
        a.disconnect(h)
        # Its own stale copy: taken back without accept-incoming=always, and
        # compared rather than copied.
        reply, st = migrate_and_wait(b, a)
        assert reply["resync"], reply
        assert st["migration"]["data_blocks_sent"] == 3, st["migration"]
    lmtest.assert_same(lmtest.read_file(a_image), lmtest.read_file(b_image), "A after migrating back, against B")


def test_release_unfence_makes_a_released_former_source_a_writable_disk_and_refuses_anything_else():
    with mig.Pair(SIZE, DATA) as (a, b, a_image, b_image, data):
        migrate_and_wait(a, b)
        refused = a.control({"op": "release", "unfence": True})
        assert not refused["ok"] and "release it first" in refused["error"], refused
        assert a.control({"op": "release"})["ok"]
        refused = b.control({"op": "release", "unfence": True})
        assert not refused["ok"] and "nothing to unfence" in refused["error"], refused
        bad = a.control({"op": "release", "unfence": "yes"})
        assert not bad["ok"] and bad["error"] == 'release: "unfence" must be true or false', bad
        reply = a.control({"op": "release", "unfence": True})
        assert reply["ok"] and not reply["fenced"], reply
        restart(a)
        st = mig.status(a)
        assert st["authoritative"] and not st["fenced"], st
        h = a.connect()
        h.pwrite(b"w" * BLOCK, 0)
        h.flush()
        assert h.pread(BLOCK, 0) == b"w" * BLOCK


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
