"""Live migration between two livemig plugins on two "hosts": network
namespaces joined by a veth pair capped at 1 Gbit/s with tbf
(deploy/testbed.sh, DESIGN.md "Test bed"). Each nbdkit runs under
`ip netns exec NS` and listens for its peer on its namespace's address, so
the peer protocol crosses a real (shaped) link and must authenticate with
a secret file; the NBD clients (lm-workload, libnbd) and the control
operations use the Unix sockets, which every network namespace can reach.

Needs root (network namespaces), iproute2 and tc. The test bed (the
`testbed` fixture, netns_helpers.py) is named lmt-<pid> and is removed after
each test and again at exit.

    LIVEMIG_PLUGIN=build/plugin/livemig.so LIVEMIG_BUILD_DIR=build PYTHONPATH=tests/integration \\
        /usr/bin/python3 -m pytest tests/integration/test_migration_netns.py [-k NAME]
"""

import os
import sys
import time

import pytest

import lmtest
import migration as mig
from lmsupport import allocated_bytes
from lmtest import MiB
from netns_helpers import (BLOCK, DATA, MAGIC, PEER_PORT, REGION, REGION_LEN, REGION_OFF, SIZE, NsServer, link,
                           make_source_image, migrate, migrate_request, ns_pids, start_pair, write_secret)
# Protocol overhead allowed on top of the payload: frame headers, zero notes,
# pull requests, progress and heartbeat frames, the handshake.
OVERHEAD_FIXED = 256 * 1024
OVERHEAD_FRACTION = 0.01


def check_untouched(dst_image, data):
    """Every block the writer never touched holds the source's bytes: its
    data, or zeros where the source had a hole. Written blocks (they start
    with lm-workload's magic; the journal check proved their contents) lie
    inside the writer's region."""
    image = lmtest.read_file(dst_image)
    assert len(image) == SIZE, f"destination image is {len(image)} bytes, not {SIZE}"
    original = data + bytes(SIZE - DATA)
    for b in range(SIZE // BLOCK):
        off = b * BLOCK
        blk = image[off:off + BLOCK]
        if blk.startswith(MAGIC) and REGION_OFF <= off < REGION_OFF + REGION_LEN:
            continue
        if blk != original[off:off + BLOCK]:
            lmtest.assert_same(blk, original[off:off + BLOCK], f"untouched block {b} at the destination")


def check_wire(m, allocated):
    """Bytes on wire at most what had to move: the allocated bytes, plus the
    blocks written at the source during the migration, plus a little
    protocol overhead."""
    payload_bound = allocated + m["blocks_dirtied"] * BLOCK
    bound = payload_bound + OVERHEAD_FIXED + int(OVERHEAD_FRACTION * payload_bound)
    assert m["payload_bytes_sent"] <= payload_bound, \
        f"payload {m['payload_bytes_sent']} > allocated {allocated} + dirtied {m['blocks_dirtied']} blocks: {m}"
    assert m["wire_bytes"] <= bound, \
        (f"{m['wire_bytes']} bytes on wire > {bound} (allocated {allocated} + {m['blocks_dirtied']} "
         f"dirtied blocks + overhead): {m}")
    assert m["wire_bytes"] >= m["payload_bytes_sent"], m
    assert m["zero_blocks_sent"] > 0, f"no zero notes: did the hole cross as data? {m}"


def run_migration(tb, mode, **params):
    secret = write_secret()
    src_image, data = make_source_image()
    allocated = allocated_bytes(src_image)
    assert DATA <= allocated <= DATA + 1 * MiB, f"source image has {allocated} allocated bytes"
    dst_image = os.path.join(lmtest.tmp_dir("dst"), "dst.img")  # missing: takes the source's size
    src = dst = None
    try:
        src, dst = start_pair(tb, src_image, dst_image, secret)
        journal = os.path.join(lmtest.tmp_dir("j"), "journal")
        migrate(tb, src, mode, handover="explicit", **params)
        # Started after migrate: every block it writes at the source counts
        # in blocks_dirtied (the bound check_wire checks).
        writer = mig.Writer(src.uri, REGION, journal, rate=1000, duration=5, extra=["--flush-every", "64"])
        if mode == "precopy":
            st = mig.wait_ready(src, timeout=30)
            assert st["migration"]["converged"], st["migration"]
        time.sleep(1.0)  # the writer dirties blocks already sent
        reply = src.control({"op": "handover"})
        assert reply["ok"], reply
        assert 0 <= reply["handover_pause_ms"] < 5000, reply
        assert not mig.status(src)["authoritative"] and mig.status(dst)["authoritative"]
        writer.switch(dst.uri)
        rc = writer.wait(timeout=60)
        assert rc == 0, f"writer failed ({rc}):\n{writer.log()}"
        assert "switch" in writer.log(), writer.log()
        st_dst = mig.wait_phase(dst, ["Done"], timeout=60)
        st_src = mig.wait_phase(src, ["Done"], timeout=60)
        rc, out = mig.verify_journal(dst.uri, journal, "--region", REGION, "--initial", "any")
        assert rc == 0, f"destination lost acknowledged writes:\n{out}"
        src.stop()
        dst.stop()
        check_untouched(dst_image, data)
        m = st_src["migration"]
        check_wire(m, allocated)
        assert m["total_time_ms"] > 0 and m["handover_pause_ms"] >= 0, m
        print(f"  {mode}: total {m['total_time_ms']} ms, pause {m['handover_pause_ms']} ms, "
              f"wire {m['wire_bytes']} B (allocated {allocated}, dirtied {m['blocks_dirtied']} blocks), "
              f"rounds {m['rounds']}")
        return st_src, st_dst
    finally:
        for s in (src, dst):
            if s is not None:
                s.stop()


def idle_migration(tb, secret, cut_seconds=0, cut_after=1.5):
    """A precopy migration of make_source_image() with no writer, at 8 MiB/s
    so that pre-copy lasts a few seconds; optionally the link cut for
    `cut_seconds` after `cut_after` seconds. Returns the source's final
    migration status."""
    src_image, data = make_source_image()
    dst_image = os.path.join(lmtest.tmp_dir("dst"), "dst.img")
    src = dst = None
    try:
        # A short peer timeout: the cut kills the link, so the migration
        # must resume over a new one (a cut shorter than the timeout is
        # only a TCP stall).
        src, dst = start_pair(tb, src_image, dst_image, secret, **{"peer-timeout": 2})
        migrate(tb, src, "precopy", handover="auto", max_rate=8 * MiB)
        if cut_seconds:
            time.sleep(cut_after)
            assert mig.status(src)["phase"] in ("PreCopy", "Sync"), "pre-copy ended before the cut"
            link(tb, "down")
            try:
                time.sleep(cut_seconds)
            finally:
                link(tb, "up")
        mig.wait_phase(dst, ["Done"], timeout=120)
        st = mig.wait_phase(src, ["Done"], timeout=30)
        src.stop()
        dst.stop()
        lmtest.assert_same(lmtest.read_file(dst_image), lmtest.read_file(src_image), "destination image")
        return st["migration"]
    finally:
        for s in (src, dst):
            if s is not None:
                s.stop()


def test_a_link_cut_in_precopy_resumes_and_moves_little_more_than_an_uncut_run(testbed):
    tb = testbed
    secret = write_secret()
    uncut = idle_migration(tb, secret)
    cut = idle_migration(tb, secret, cut_seconds=5)
    ratio = cut["wire_bytes"] / uncut["wire_bytes"]
    print(f"  wire bytes: uncut {uncut['wire_bytes']}, cut 5 s {cut['wire_bytes']} ({ratio:.3f}x), "
          f"reconnects {cut['reconnects']}, time {uncut['total_time_ms']} / {cut['total_time_ms']} ms")
    assert cut["reconnects"] >= 1, f"the link never dropped: {cut}"
    # What was in flight when the cable was cut crosses again: at most
    # the push window (8 MiB) and the pushes not yet synced and
    # acknowledged (8 MiB), far less than the image (a restart would
    # copy all of it again). The 1 GiB figure of issue #12 (<= 1.1x) is
    # measured by tests/faults/run --link-cut.
    allowance = 16 * MiB
    assert cut["wire_bytes"] <= uncut["wire_bytes"] + allowance, \
        f"a cut link copied {ratio:.2f}x the bytes of an uncut run: restarted, not resumed"


# --------------------------------------------------------------------------

def test_a_server_in_a_namespace_is_nbdkit_itself_and_stops_by_its_pid(testbed):
    tb = testbed
    src = None
    try:
        secret = write_secret()
        image = lmtest.make_image(1 * MiB)
        src = NsServer(tb.src_ns, control=True, image=image, listen=f"{tb.src_addr}:{PEER_PORT}",
                       secret=secret).start()
        exe = os.path.basename(os.readlink(f"/proc/{src.pid}/exe"))
        assert exe == "nbdkit", f"PID {src.pid} is {exe}, not nbdkit: ip netns exec did not exec"
        assert ns_pids(tb.src_ns) == [src.pid], (ns_pids(tb.src_ns), src.pid)
        st = src.control({"op": "status"})
        assert st["peer_port"] == PEER_PORT, st
        h = src.connect()
        h.pwrite(b"n" * BLOCK, 0)
        lmtest.assert_same(h.pread(BLOCK, 0), b"n" * BLOCK, "read back through the Unix socket")
        src.stop()
        assert src.returncode == 0 and not src.needed_sigkill, (src.returncode, src.stderr())
        assert ns_pids(tb.src_ns) == [], f"processes left in {tb.src_ns}: {ns_pids(tb.src_ns)}"
    finally:
        if src is not None:
            src.stop()
        tb.down()
    assert not tb.exists(), f"testbed.sh down left namespaces of {tb.name} behind"


def test_precopy_over_a_1gbit_link_with_a_writer_across_handover_loses_nothing(testbed):
    st_src, _ = run_migration(testbed, "precopy", handover_size=1 * MiB)
    assert st_src["migration"]["rounds"] >= 1, st_src


def test_postcopy_over_a_1gbit_link_with_a_writer_across_handover_loses_nothing(testbed):
    _, st_dst = run_migration(testbed, "postcopy")
    assert st_dst["migration"]["background_pulls"] > 0, st_dst


def test_a_wrong_secret_fails_migrate_with_an_authentication_error_and_the_source_keeps_serving(testbed):
    tb = testbed
    src = dst = None
    try:
        src_image, data = make_source_image()
        dst_image = os.path.join(lmtest.tmp_dir("dst"), "dst.img")
        src, dst = start_pair(tb, src_image, dst_image, write_secret("a"), write_secret("b"))
        reply = src.control(migrate_request(tb, "precopy", handover="auto"))
        assert reply.get("ok") is False, f"migrate with mismatched secrets was accepted: {reply}"
        assert "authenticat" in reply.get("error", ""), f"not an authentication error: {reply}"
        print(f"  migrate: {reply['error']}")
        st = mig.status(src)
        assert st["phase"] in ("Idle", "Cancelled", "Failed"), st
        assert st["authoritative"] is True and st["fenced"] is False, st
        st_dst = mig.status(dst)
        assert st_dst["phase"] == "Idle" and st_dst["role"] in ("none", "None"), st_dst
        h = src.connect()
        h.pwrite(b"w" * BLOCK, 0)
        h.flush()
        lmtest.assert_same(h.pread(BLOCK, 0), b"w" * BLOCK, "write at the source after the failed migrate")
        lmtest.assert_same(h.pread(BLOCK, BLOCK), data[BLOCK:2 * BLOCK], "source data after the failed migrate")
    finally:
        for s in (src, dst):
            if s is not None:
                s.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
