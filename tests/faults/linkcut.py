"""tests/faults/run --link-cut-figure: issue #12's measurement of what a link
cut costs. A 1 GiB image, every byte allocated random data (seeded), is
migrated precopy (handover auto, no writer, no rate cap) over the 1 Gbit/s
test bed twice in one invocation: once uncut, once with the source's veth
down for 5 s when half of the image has been sent (mid pre-copy). The
migration must resume over a new link rather than start again: the cut
run's wire bytes (the source's migration.wire_bytes, both directions, every
link) over the uncut run's must stay <= 1.1. Both destination images must
equal the source image. Exit status 0 if all of that holds.
"""

import hashlib
import os
import random
import time

import lmtest
import migration as mig
from lmtest import MiB
from matrix import PEER_TIMEOUT, netns

SIZE = 1024 * MiB
CUT_SECONDS = 5.0
TARGET_RATIO = 1.1
SEED = 12


def make_image(path, seed=SEED, chunk=64 * MiB):
    """SIZE bytes of seeded random data: every block allocated."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(SIZE // chunk):
            f.write(rnd.randbytes(chunk))


def file_hash(path):
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(16 * MiB):
            h.update(block)
    return h.hexdigest()


def one_migration(tb, secret, src_image, cut):
    """Migrates src_image to a fresh destination; returns (the source's final
    migration status, the wall time, the phase at the cut, the destination
    image's hash)."""
    n = netns()
    dst_image = os.path.join(lmtest.tmp_dir("dst"), "dst.img")
    src, dst = n.start_pair(tb, src_image, dst_image, secret, **{"peer-timeout": PEER_TIMEOUT})
    phase_at_cut = None
    try:
        t0 = time.monotonic()
        n.migrate(tb, src, "precopy", handover="auto")
        if cut:
            st = lmtest.wait_until(
                lambda: (lambda s: s if s["migration"]["payload_bytes_sent"] >= SIZE // 2 or s["phase"] != "PreCopy"
                         else None)(mig.status(src)), timeout=120, what="half of the image sent")
            phase_at_cut = f"{st['phase']}, {st['migration']['payload_bytes_sent'] / MiB:.0f} MiB sent"
            n.link(tb, "down")
            try:
                time.sleep(CUT_SECONDS)
            finally:
                n.link(tb, "up")
        mig.wait_phase(dst, ["Done"], timeout=300)
        st = mig.wait_phase(src, ["Done"], timeout=60)
        wall = time.monotonic() - t0
    finally:
        src.stop()
        dst.stop()
    digest = file_hash(dst_image)
    os.unlink(dst_image)
    # The source handed its image over (Done, fenced): forget that, so the
    # same image can be migrated again.
    os.unlink(src_image + ".livemig-state")
    return st["migration"], wall, phase_at_cut, digest


def main(args, base):
    """Prints the figure; `base` is a temporary directory (removed at exit)."""
    n = netns()
    lmtest._tmp_root = base
    tb = n.testbed()
    try:
        secret = n.write_secret()
        src_image = os.path.join(lmtest.tmp_dir("src"), "src.img")
        print(f"link-cut figure: {SIZE // MiB} MiB image, all allocated random data (seed {SEED}), precopy over "
              f"{tb.rate}, cut {CUT_SECONDS:.0f} s at half the image", flush=True)
        make_image(src_image)
        src_hash = file_hash(src_image)
        runs = {}
        for name, cut in (("uncut", False), ("cut", True)):
            m, wall, at, digest = one_migration(tb, secret, src_image, cut)
            runs[name] = m
            print(f"  {name:>5}: wire {m['wire_bytes']} B ({m['wire_bytes'] / MiB:.1f} MiB), total "
                  f"{m['total_time_ms'] / 1000:.2f} s (wall {wall:.2f} s), reconnects {m['reconnects']}, "
                  f"blocks resynced {m['blocks_resynced']}" + (f", cut at {at}" if at else "")
                  + ("" if digest == src_hash else "  DESTINATION IMAGE DIFFERS"), flush=True)
            if digest != src_hash:
                runs[name + "-differs"] = True
    finally:
        lmtest._kill_all()
        tb.down()
    ratio = runs["cut"]["wire_bytes"] / runs["uncut"]["wire_bytes"]
    ok = ratio <= TARGET_RATIO and not any(k.endswith("-differs") for k in runs) and runs["cut"]["reconnects"] >= 1
    print(f"  ratio cut/uncut wire bytes: {ratio:.3f} (target <= {TARGET_RATIO}); time "
          f"{runs['cut']['total_time_ms'] / runs['uncut']['total_time_ms']:.2f}x; 'resume' reconnects "
          f"{runs['cut']['reconnects']}: {'OK' if ok else 'FAILED'}", flush=True)
    if runs["cut"]["reconnects"] < 1:
        print("  the cut run never reconnected: the cut did not break the link", flush=True)
    return 0 if ok else 1
