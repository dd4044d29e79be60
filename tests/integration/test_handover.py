"""The handover as an atomic commit, and the defects of issue #12 that broke
"whatever fails, the VM keeps a writable disk and no acknowledged write is
lost" (docs/handover.md). Each test names the behaviour it proves; each
failed on the engine before the commit protocol.

Crash points (LIVEMIG_TEST_CRASH_AT) make a plugin kill itself with SIGKILL
at an exact step of the handover, as kill -9 at that instant would.

    LIVEMIG_PLUGIN=build/plugin/livemig.so LIVEMIG_BUILD_DIR=build PYTHONPATH=tests/integration \\
        /usr/bin/python3 -m pytest tests/integration/test_handover.py [-k NAME]
"""

import contextlib
import errno
import os
import random
import signal
import struct
import sys
import threading
import time

import pytest

import lmtest
import migration as mig
from lmtest import MiB, Server
from wire import ERROR, INTERNAL, START, START_OK, HANDOVER, DATA, FORWARD, FORWARD_REPLY, FakeDestination, frame, \
    handshake, make_secret, \
    start_payload, string, BAD_FRAME, PROTOCOL, SIZE_MISMATCH

SIZE = 32 * MiB
DATA_LEN = 8 * MiB
BLOCK = 4096
EROFS_ERRNOS = {errno.EROFS, errno.EPERM}  # NBD carries EROFS as EPERM
# Short peer timeouts: a dead peer is noticed within seconds.
KEYS = {"peer-timeout": 3}


@contextlib.contextmanager
def plugins(src_env=None, dst_env=None, data_len=DATA_LEN, size=SIZE, keys=KEYS):
    """A source with data and a destination on a missing image, each on a
    fixed port (a restarted plugin comes back on the same address); both
    stopped at the end.

        with plugins() as (src, dst, src_image, dst_image, data):
    """
    src_image, data = mig.make_source_image(size, data_len)
    dst_image = os.path.join(lmtest.tmp_dir("dst"), "dst.img")
    src = Server(control=True, image=src_image, listen=f"127.0.0.1:{mig.free_port()}", env=src_env, **keys)
    dst = Server(control=True, image=dst_image, listen=f"127.0.0.1:{mig.free_port()}", env=dst_env, **keys)
    try:
        src.start()
        dst.start()
        yield src, dst, src_image, dst_image, data
    finally:
        stop_all(src, dst)


def stop_all(*servers):
    for s in servers:
        s.stop()


def wait_dead(server, timeout=20):
    lmtest.wait_until(lambda: not server.alive(), timeout=timeout, what=f"nbdkit {server.pid} to die")


def expect_write_refused(server, what):
    h = server.connect()
    lmtest.expect_nbd_error(lambda: h.pwrite(b"x" * BLOCK, 0), EROFS_ERRNOS, what)
    server.disconnect(h, ignore_errors=True)


def expect_image(path, data, changes=(), what="destination image"):
    expect = bytearray(data)
    for off, blob in changes:
        expect[off:off + len(blob)] = blob
    lmtest.assert_same(lmtest.read_file(path, 0, len(expect)), bytes(expect), what)


# ---------------------------------------------------------------------------
# The destination's answer decides

def test_a_confirmation_that_arrives_while_the_puller_starts_is_not_lost():
    """The puller read "not confirmed" from the record, the source's
    confirmation landed, then the puller stored its stale false over it: the
    destination stayed in PostCopy for ever. The hook holds the puller
    between its read and its store for 1 s (the confirmation arrives within
    milliseconds of the commit)."""
    with plugins(dst_env={"LIVEMIG_TEST_PULLER_START_DELAY_MS": "1000"}) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "postcopy", handover="auto")
        st = mig.wait_phase(dst, ["Done"], timeout=30)
        assert st["migration"]["blocks_left"] == 0, st
        mig.wait_phase(src, ["Done"], timeout=30)
        expect_image(dst_image, data)


def test_a_source_learns_the_migration_is_done_when_the_done_frame_never_came():
    """The destination recorded Done and died before it said DONE (a link
    cut as DONE is sent loses it the same way: the fault matrix's
    cut-handover, seed 305550996). A destination that is done never dials
    again, so the source stayed in PostCopy for ever, and livemigd with it.
    Now a source without a link after the commit asks where it stands."""
    with plugins(dst_env={"LIVEMIG_TEST_CRASH_AT": "destination-after-done"}) as \
            (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "postcopy", handover="auto")
        wait_dead(dst)
        mig.restart(dst, env={})
        assert mig.status(dst)["phase"] == "Done", mig.status(dst)
        t0 = time.monotonic()
        st = mig.wait_phase(src, ["Done"], timeout=30)
        print(f"  the source knew after {time.monotonic() - t0:.1f} s (peer-timeout {KEYS['peer-timeout']} s)")
        assert st["fenced"] and not st["authoritative"], st
        # The link it made forwards its clients' requests.
        h = src.connect()
        h.pwrite(b"D" * BLOCK, 3 * BLOCK)
        h.flush()
        assert h.pread(BLOCK, 3 * BLOCK) == b"D" * BLOCK
        src.disconnect(h)
        expect_image(dst_image, data, [(3 * BLOCK, b"D" * BLOCK)])


def test_a_destination_that_refuses_the_handover_leaves_the_source_writable_at_once():
    key_path, key = make_secret()
    src_image, data = mig.make_source_image(SIZE, DATA_LEN)

    def refuse(c, f):
        message = "handover refused: syncing dst.img: Input/output error"
        c.send(frame(ERROR, struct.pack(">I", INTERNAL) + string(message), request_id=f.request_id))

    with Server(control=True, image=src_image, listen="127.0.0.1:0", secret=key_path) as s:
        fake = FakeDestination(key, refuse)
        try:
            reply = s.control({"op": "migrate", "mode": "postcopy", "handover": "explicit",
                               "to": f"127.0.0.1:{fake.port}", "from": f"127.0.0.1:{mig.peer_port(s)}"})
            assert reply["ok"], reply
            reply = s.control({"op": "handover"})
            assert not reply["ok"] and "refused" in reply["error"], reply
            assert fake.error is None, f"fake destination: {fake.error!r}"
            st = mig.status(s)
            assert st["phase"] == "Failed" and st["authoritative"] and not st["fenced"], st
            assert "Input/output error" in st["last_error"], st
            h = s.connect()
            h.pwrite(b"W" * BLOCK, 0)  # the guest writes again at once
            h.flush()
            assert h.pread(BLOCK, 0) == b"W" * BLOCK
            assert not os.path.exists(src_image + ".livemig-state"), "a refused handover leaves nothing to recover"
        finally:
            fake.close()


def test_a_destination_killed_after_it_committed_makes_the_handover_count_once_it_is_back():
    with plugins(dst_env={"LIVEMIG_TEST_CRASH_AT": "destination-after-commit"}) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "precopy", handover="explicit")
        mig.wait_ready(src)
        reply = src.control({"op": "handover"})
        assert not reply["ok"] and "unresolved" in reply["error"], reply
        wait_dead(dst)
        st = mig.status(src)
        assert st["phase"] == "Handover" and st["fenced"] and not st["authoritative"], st
        assert "migrate-nbd resolve --abort" in st["needs_resolution"]["command"], st
        # A write at the source while the commit is unresolved waits (the
        # fence holds it), and goes on to the destination once it is back:
        # authority moved, the connection did not have to (issue #17).
        hs = src.connect()
        outcome = []

        def write_held():
            t0 = time.monotonic()
            try:
                hs.pwrite(b"H" * BLOCK, 2 * BLOCK)
                outcome.append("ok")
            except Exception as e:  # noqa: BLE001 -- reported below
                outcome.append(e)
            outcome.append(time.monotonic() - t0)

        held = threading.Thread(target=write_held, daemon=True)
        held.start()
        time.sleep(0.5)
        assert held.is_alive(), f"a write in the handover window did not wait for the resolution: {outcome}"
        mig.restart(dst, env={})  # it committed: it comes back authoritative
        held.join(20)
        assert outcome[0] == "ok", f"the held write: {outcome}\nSRC:{src.stderr()[-3000:]}\nDST:{dst.stderr()[-3000:]}"
        mig.wait_phase(src, ["PostCopy", "Done"], timeout=30)
        hs.pwrite(b"A" * BLOCK, 4 * BLOCK)  # after the commit: forwarded to the destination
        hs.flush()
        src.disconnect(hs)
        mig.wait_phase(dst, ["Done"], timeout=60)
        expect_image(dst_image, data, [(2 * BLOCK, b"H" * BLOCK), (4 * BLOCK, b"A" * BLOCK)])


def test_a_destination_killed_before_it_committed_lets_the_source_resume():
    with plugins(dst_env={"LIVEMIG_TEST_CRASH_AT": "destination-before-commit"}) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "precopy", handover="explicit")
        mig.wait_ready(src)
        reply = src.control({"op": "handover"})
        assert not reply["ok"], reply
        wait_dead(dst)
        mig.restart(dst, env={})
        # The destination did not commit: the source unfences and goes on.
        st = mig.wait_phase(src, ["Sync", "PreCopy"], timeout=30)
        assert st["authoritative"] and not st["fenced"], st
        h = src.connect()
        h.pwrite(b"S" * BLOCK, 3 * BLOCK)  # written after the failed attempt
        h.flush()
        src.disconnect(h)
        mig.wait_ready(src)
        reply = src.control({"op": "handover"})
        assert reply["ok"], reply
        mig.wait_phase(dst, ["Done"], timeout=60)
        expect_image(dst_image, data, [(3 * BLOCK, b"S" * BLOCK)])


def test_blocks_written_after_a_commit_that_failed_are_pulled_by_a_destination_restarted_after_the_retry():
    """A commit that failed after its presence bits were synced (the record
    still PreCopy) must not leave those bits for the next attempt: blocks
    pushed before attempt 1, written again at the source and still owed by
    the retry, read as present from the state file by a destination
    restarted in PostCopy, were never pulled and kept their old contents
    (acknowledged writes lost). 16 MiB written at 4 MiB/s just before the
    retry: most of it is owed by the retry's handover."""
    region = (DATA_LEN, 16 * MiB)  # zeros at first, pushed before attempt 1
    with plugins(dst_env={"LIVEMIG_TEST_CRASH_AT": "destination-after-presence-synced"}) as \
            (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "precopy", handover="explicit", max_rate=4 * MiB)
        mig.wait_ready(src)
        assert not src.control({"op": "handover"})["ok"]
        wait_dead(dst)
        mig.restart(dst, env={"LIVEMIG_TEST_CRASH_AT": "destination-after-commit"})
        st = mig.wait_phase(src, ["Sync", "PreCopy"], timeout=30)
        assert st["authoritative"] and not st["fenced"], st
        h = src.connect()
        written = bytes(random.Random(3).randbytes(region[1]))
        for off in range(0, region[1], MiB):
            h.pwrite(written[off:off + MiB], region[0] + off)
        h.flush()
        src.disconnect(h)
        owed = mig.status(src)["migration"]["blocks_left"]
        assert owed * BLOCK >= region[1] // 2, f"only {owed} blocks owed at the retry: the test proves nothing"
        threading.Thread(target=lambda: src.control({"op": "handover"}), daemon=True).start()
        wait_dead(dst)  # committed, then killed before its ACK
        mig.restart(dst, env={})
        mig.wait_phase(dst, ["Done"], timeout=60)
        expect_image(dst_image, data + bytes(sum(region) - len(data)), [(region[0], written)])


def set_listen(server, listen):
    """Makes the server's next start listen on `listen` (HOST:PORT)."""
    server.argv = [f"listen={listen}" if a.startswith("listen=") else a for a in server.argv]


def test_a_destination_that_failed_before_committing_lets_an_unresolved_source_unfence():
    """Found by the fault matrix (fsync-eio-handover): the destination's
    fsync failed on a push while HANDOVER was on its way; it failed the
    migration and dropped the link, and the source stayed fenced, asking it
    for ever. A destination that ended the migration before any commit says
    so (NotCommitted), and the source serves its image again."""
    with plugins(dst_env={"LIVEMIG_TEST_CRASH_AT": "destination-before-commit"}) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "precopy", handover="explicit", resume_timeout=1)
        mig.wait_ready(src)
        assert not src.control({"op": "handover"})["ok"]
        wait_dead(dst)
        st = mig.status(src)
        assert st["phase"] == "Handover" and st["fenced"], st
        # The destination comes back where the source cannot reach it, and
        # gives up waiting (resume_timeout + two peer timeouts): it ends the
        # migration Failed, before any commit.
        address = dst.keys["listen"]
        set_listen(dst, f"127.0.0.1:{mig.free_port()}")
        mig.restart(dst, env={})
        st = mig.wait_phase(dst, ["Failed"], timeout=30)
        assert st["io_mode"] == "fenced", st
        # Back at its address: the source asks, hears NotCommitted, unfences.
        set_listen(dst, address)
        mig.restart(dst)
        st = mig.wait_phase(src, ["Failed"], timeout=30)
        assert st["authoritative"] and not st["fenced"] and "NotCommitted" in st["last_error"], st
        h = src.connect()
        h.pwrite(b"U" * BLOCK, 5 * BLOCK)
        h.flush()
        assert h.pread(BLOCK, 5 * BLOCK) == b"U" * BLOCK
        src.disconnect(h)
        assert mig.status(dst)["phase"] == "Failed"


def test_a_source_killed_after_the_commit_comes_back_forwarding_reads_to_the_destination():
    with plugins(src_env={"LIVEMIG_TEST_CRASH_AT": "source-after-handover-reply"}) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "postcopy", handover="explicit", max_rate=4 * MiB)
        threading.Thread(target=lambda: src.control({"op": "handover"}), daemon=True).start()
        wait_dead(src)
        st = mig.wait_phase(dst, ["PostCopy"], timeout=10)
        assert st["authoritative"], st
        hd = dst.connect()
        hd.pwrite(b"N" * BLOCK, 0)  # written at the destination after its commit
        hd.flush()
        mig.restart(src, env={})
        st = mig.wait_phase(src, ["PostCopy", "Done"], timeout=30)
        assert st["fenced"], st
        # No stale read: the source answers with the destination's block.
        hs = src.connect()
        assert hs.pread(BLOCK, 0) == b"N" * BLOCK, "the restarted source served its own (stale) block"
        src.disconnect(hs)
        mig.wait_phase(dst, ["Done"], timeout=60)
        expect_image(dst_image, data, [(0, b"N" * BLOCK)])


def test_a_source_killed_after_the_fence_resumes_and_compares_instead_of_copying_again():
    with plugins(src_env={"LIVEMIG_TEST_CRASH_AT": "source-after-fence"}) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "precopy", handover="auto")
        wait_dead(src)
        mig.restart(src, env={})
        # Not committed (no HANDOVER was sent): the source resumes, compares
        # checksums for what the destination holds, and hands over again.
        mig.wait_phase(dst, ["Done"], timeout=60)
        st = mig.wait_phase(src, ["Done"], timeout=10)
        assert st["migration"]["blocks_resynced"] > 0, st["migration"]
        expect_image(dst_image, data)


def test_resolve_abort_unfences_the_source_and_a_returning_destination_is_told_it_lost():
    with plugins(dst_env={"LIVEMIG_TEST_CRASH_AT": "destination-after-commit"}) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "precopy", handover="explicit")
        mig.wait_ready(src)
        assert not src.control({"op": "handover"})["ok"]
        wait_dead(dst)
        reply = src.control({"op": "resolve"})
        assert not reply["ok"] and "abort" in reply["error"], reply
        reply = src.control({"op": "resolve", "abort": True})
        assert reply["ok"] and "lost" in reply["warning"], reply
        st = mig.status(src)
        assert st["authoritative"] and not st["fenced"], st
        h = src.connect()
        h.pwrite(b"A" * BLOCK, 0)
        h.flush()
        src.disconnect(h)
        mig.restart(dst, env={})
        st = mig.wait_phase(dst, ["Failed"], timeout=30)
        assert st["io_mode"] == "stale" and not st["authoritative"], st
        assert "lost the handover" in st["last_error"], st
        hd = dst.connect()
        lmtest.expect_nbd_error(lambda: hd.pread(BLOCK, 0), {errno.EIO}, "a read at the lost destination")
        lmtest.expect_nbd_error(lambda: hd.pwrite(b"x" * BLOCK, 0), EROFS_ERRNOS, "a write at the lost destination")
        dst.disconnect(hd, ignore_errors=True)
        # Still lost after its own restart.
        mig.restart(dst, env={})
        assert mig.status(dst)["io_mode"] == "stale"
        assert dst.control({"op": "release"})["ok"]
        expect_image(src_image, data, [(0, b"A" * BLOCK)], what="source image")


def test_a_destination_whose_source_never_comes_back_gives_up_and_keeps_its_copy_for_the_next_migration():
    with plugins() as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "precopy", handover="explicit", max_rate=4 * MiB, resume_timeout=1)
        time.sleep(1.0)
        src.kill(signal.SIGKILL)  # and it stays away
        # resume_timeout (1 s) plus two peer timeouts (3 s each) later:
        st = mig.wait_phase(dst, ["Failed"], timeout=30)
        assert st["io_mode"] == "fenced" and "did not resume" in st["last_error"], st
        # A new migration (from the restarted source, a new id) takes the
        # partial copy and compares instead of copying it again.
        os.unlink(src_image + ".livemig-state")  # the source's own record: start afresh
        mig.restart(src)
        reply = mig.migrate(src, dst, "precopy", handover="auto")
        assert reply["resync"], reply
        mig.wait_phase(dst, ["Done"], timeout=60)
        st = mig.wait_phase(src, ["Done"], timeout=10)
        assert st["migration"]["blocks_resynced"] > 0, st["migration"]
        expect_image(dst_image, data)


# ---------------------------------------------------------------------------
# Reads of any size, durability, exclusion

def test_proxied_reads_larger_than_a_frame_succeed_on_both_sides():
    size, data_len = 64 * MiB, 48 * MiB
    with plugins(size=size, data_len=data_len) as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "postcopy", handover="explicit", max_rate=2 * MiB)
        hd = dst.connect()
        got = hd.pread(32 * MiB, 4 * MiB)  # before the commit: through the source
        lmtest.assert_same(got, data[4 * MiB:36 * MiB], "32 MiB read at the destination before handover")
        assert mig.status(dst)["phase"] == "PreCopy"
        assert src.control({"op": "handover"})["ok"]
        hs = src.connect()
        got = hs.pread(32 * MiB, 12 * MiB)  # after it: through the destination
        lmtest.assert_same(got, data[12 * MiB:44 * MiB], "32 MiB read at the source after handover")
        assert mig.status(dst)["phase"] in ("PostCopy", "Done")
        assert mig.status(src)["phase"] in ("PostCopy", "Done")
        src.disconnect(hs)
        dst.disconnect(hd)


def test_a_block_made_present_during_a_flush_is_durable_after_kill_9():
    # The test hook holds mark() between setting a block's bit and adding
    # it to the persist batch: a flush in that window must still cover it.
    # Every mark takes 1.5 s under one lock, background pulls' too: a demand
    # read may wait behind a few of them, so reads get more than 2 x 3 s.
    with plugins(dst_env={"LIVEMIG_TEST_MARK_DELAY_MS": "1500"}, keys={"peer-timeout": 10}) as \
            (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "postcopy", handover="explicit", max_rate=2 * MiB)
        assert src.control({"op": "handover"})["ok"]
        x = DATA_LEN - 8 * BLOCK  # far from where the background pulls start
        hd = dst.connect()
        assert hd.pread(BLOCK, x) == data[x:x + BLOCK]  # a demand pull: the bit is set
        hd.pwrite(b"F" * BLOCK, x)
        hd.flush()                                       # acknowledged: must survive
        dst.kill(signal.SIGKILL)
        mig.restart(dst, env={})
        mig.wait_phase(dst, ["Done"], timeout=120)
        expect_image(dst_image, data, [(x, b"F" * BLOCK)])


def test_of_two_concurrent_migrates_exactly_one_wins():
    for attempt in range(5):
        src_image, data = mig.make_source_image(SIZE, DATA_LEN)
        src = Server(control=True, image=src_image, listen="127.0.0.1:0").start()
        dsts = [Server(control=True, image=os.path.join(lmtest.tmp_dir("dst"), "d.img"), listen="127.0.0.1:0").start()
                for _ in range(2)]
        try:
            replies = [None, None]

            def go(i):
                replies[i] = src.control({"op": "migrate", "mode": "precopy", "max_rate": 1 * MiB,
                                          "to": f"127.0.0.1:{mig.peer_port(dsts[i])}",
                                          "from": f"127.0.0.1:{mig.peer_port(src)}"})

            threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            oks = [r for r in replies if r and r.get("ok")]
            assert len(oks) == 1, f"attempt {attempt}: {replies}"
            loser = 1 - replies.index(oks[0])
            assert "already running" in replies[loser]["error"], replies
            time.sleep(0.3)
            phases = [mig.status(d)["phase"] for d in dsts]
            assert phases[loser] == "Idle" and mig.status(dsts[loser])["authoritative"], phases
            assert phases[1 - loser] == "PreCopy", phases
        finally:
            stop_all(src, *dsts)


def test_a_plugin_serving_a_guest_refuses_to_become_a_destination():
    a_image, a_data = mig.make_source_image(SIZE, DATA_LEN, seed=11)
    b_image, _ = mig.make_source_image(SIZE, DATA_LEN, seed=12)
    with Server(control=True, image=a_image, listen="127.0.0.1:0") as a, \
            Server(control=True, image=b_image, listen="127.0.0.1:0") as b:
        guest = a.connect()
        guest.pwrite(b"G" * BLOCK, 0)  # a guest is using A
        # --from and --to swapped: B would overwrite A's image.
        reply = b.control({"op": "migrate", "mode": "precopy", "to": f"127.0.0.1:{mig.peer_port(a)}",
                           "from": f"127.0.0.1:{mig.peer_port(b)}"})
        assert not reply["ok"], reply
        assert "accept-incoming=always" in reply["error"] and "NotEmpty" in reply["error"], reply
        st = mig.status(a)
        assert st["role"] == "none" and st["authoritative"], st
        for i in range(50):  # the guest goes on writing
            guest.pwrite(bytes([i]) * BLOCK, (i + 1) * BLOCK)
        guest.flush()
        assert mig.status(b)["authoritative"], "B must not stay fenced after the refusal"
    # An empty image is accepted as before; so is any image with accept-incoming=always.
    c_image, _ = mig.make_source_image(SIZE, DATA_LEN, seed=13)
    with Server(control=True, image=b_image, listen="127.0.0.1:0") as b, \
            Server(control=True, image=c_image, listen="127.0.0.1:0", **{"accept-incoming": "always"}) as c:
        mig.migrate(b, c, "precopy", handover="auto")
        mig.wait_phase(c, ["Done"], timeout=60)


def test_release_refuses_to_drop_an_incomplete_authoritative_destination():
    with plugins() as (src, dst, src_image, dst_image, data):
        mig.migrate(src, dst, "postcopy", handover="explicit", max_rate=2 * MiB)
        assert src.control({"op": "handover"})["ok"]
        reply = dst.control({"op": "release"})
        assert not reply["ok"] and "authoritative" in reply["error"], reply
        assert os.path.exists(dst_image + ".livemig-state")
        dst.kill(signal.SIGKILL)  # the map must still be there after a restart
        mig.restart(dst)
        mig.wait_phase(dst, ["Done"], timeout=120)
        expect_image(dst_image, data)


def test_a_migrate_the_source_cannot_start_leaves_the_destination_writable():
    src_image, data = mig.make_source_image(SIZE, DATA_LEN)
    unwritable = os.path.join(lmtest.tmp_dir("ro"), "no-such-dir", "state")
    with Server(control=True, image=src_image, listen="127.0.0.1:0", **{"state-file": unwritable}) as src, \
            Server(control=True, image=os.path.join(lmtest.tmp_dir("dst"), "d.img"), listen="127.0.0.1:0") as dst:
        reply = src.control({"op": "migrate", "mode": "precopy", "to": f"127.0.0.1:{mig.peer_port(dst)}",
                             "from": f"127.0.0.1:{mig.peer_port(src)}"})
        assert not reply["ok"], reply
        st = lmtest.wait_until(lambda: (lambda s: s if s["phase"] != "PreCopy" else None)(mig.status(dst)),
                               timeout=10, what="the destination to drop the migration")
        assert st["authoritative"] and st["io_mode"] == "local", st
        h = dst.connect()
        h.pwrite(b"x" * BLOCK, 0)


# ---------------------------------------------------------------------------
# Bad input on the peer link

def test_bad_handover_ranges_and_foreign_links_are_refused_with_the_image_untouched():
    key_path, key = make_secret()
    dst_image = os.path.join(lmtest.tmp_dir("dst"), "d.img")
    with Server(control=True, image=dst_image, listen="127.0.0.1:0", secret=key_path) as dst:
        port = mig.peer_port(dst)
        params = {"to": f"127.0.0.1:{port}", "from": "127.0.0.1:9"}
        c, _ = handshake(port, key, purpose="peer")
        with c:
            c.send(frame(START, start_payload(SIZE, params=params, migration_id="m-bad"), request_id=1))
            f = c.read_frame()
            assert f.type == START_OK, f
            blocks = SIZE // BLOCK

            def handover(gen, remaining, ranges, rid):
                body = struct.pack(">QQI", gen, remaining, len(ranges))
                for first, count in ranges:
                    body += struct.pack(">QQI", first, count, 0)
                c.send(frame(HANDOVER, body, request_id=rid))

            # Two frames whose ranges overlap across the frame boundary.
            handover(1, 20, [(0, 10)], 2)
            handover(1, 20, [(5, 10)], 3)
            c.expect_error(BAD_FRAME, request_id=3, what="HANDOVER ranges overlapping across frames")
        st = mig.status(dst)
        assert st["phase"] == "PreCopy" and not st["authoritative"], st  # nothing committed
        c, _ = handshake(port, key, purpose="peer")
        with c:
            c.send(frame(START, start_payload(SIZE, params={**params, "resume": True}, migration_id="m-bad"),
                         request_id=4))
            assert c.read_frame().type == START_OK
            handover(1, 1, [(blocks - 1, 5)], 5)
            c.expect_error(BAD_FRAME, request_id=5, what="HANDOVER range beyond the image")
        c, _ = handshake(port, key, purpose="peer")
        with c:
            c.send(frame(START, start_payload(SIZE + 4096, params={**params, "resume": True}, migration_id="m-bad"),
                         request_id=6))
            c.expect_error(SIZE_MISMATCH, request_id=6, what="a resume START for another image size")
        # DATA on a link that is not the migration's own.
        c, _ = handshake(port, key, purpose="peer")
        with c:
            c.send(frame(DATA, struct.pack(">QII", 0, BLOCK, 0) + b"Z" * BLOCK, request_id=0))
            c.expect_error(PROTOCOL, what="DATA on a link that is not the migration's")
        # A client's write (FORWARD) on a link that is not the migration's own.
        forward_write = struct.pack(">IIQI", 1, 0, 0, BLOCK) + b"F" * BLOCK
        c, _ = handshake(port, key, purpose="peer")
        with c:
            c.send(frame(FORWARD, forward_write, request_id=7))
            f = c.read_frame()   # not applied; ESTALE: a link the peer adopted first is not closed for it
            assert f.type == FORWARD_REPLY and f.request_id == 7, f
            assert struct.unpack(">I", f.payload) == (errno.ESTALE,), f
        # On the migration's own link, at a destination before the commit: it
        # is not authoritative either, so it answers ESTALE and writes nothing.
        c, _ = handshake(port, key, purpose="peer")
        with c:
            c.send(frame(START, start_payload(SIZE, params={**params, "resume": True}, migration_id="m-bad"),
                         request_id=8))
            assert c.read_frame().type == START_OK
            c.send(frame(FORWARD, forward_write, request_id=9))
            f = c.read_frame()
            assert f.type == FORWARD_REPLY and f.request_id == 9, f
            assert struct.unpack(">I", f.payload) == (errno.ESTALE,), f
        assert lmtest.read_file(dst_image) == bytes(SIZE), "the destination image was written"
        assert mig.status(dst)["phase"] == "PreCopy"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
