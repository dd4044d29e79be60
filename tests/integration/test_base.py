"""Base images (issue #14): a VM deployed from a template both hosts hold
moves only what differs from it. Each plugin gets base= (its own copy of
the template); blocks equal to the base cross as 8-byte notes and the
destination reads them from its base, checking each against the source's
checksum. A base that is not the same template is refused; a block that
rotted in the destination's base is caught and sent plain; the verifying
writer loses nothing across handover.

    LIVEMIG_PLUGIN=build/plugin/livemig.so PYTHONPATH=tests/integration \\
        /usr/bin/python3 -m pytest tests/integration/test_base.py [-k NAME]
"""

import os
import random
import shutil
import sys

import pytest

import lmtest
from lmtest import KiB, MiB, Server
import migration as mig

BLOCK = 4096
SIZE = 64 * MiB
BASE_DATA = 40 * MiB      # the template's data; the rest of the disk a hole


def make_template(dir):
    path = lmtest.make_image(SIZE, name="template.img", dir=dir, data=random.Random(31).randbytes(BASE_DATA))
    return path


def deploy(template, changed_blocks, seed=32):
    """A VM disk made from the template, then changed: `changed_blocks`
    random blocks rewritten. Returns (image path, {block: data})."""
    path = os.path.join(lmtest.tmp_dir("vm"), "vm.img")
    shutil.copyfile(template, path)
    rng = random.Random(seed)
    changes = {b: rng.randbytes(BLOCK) for b in rng.sample(range(SIZE // BLOCK), changed_blocks)}
    with open(path, "r+b") as f:
        for b, data in changes.items():
            f.seek(b * BLOCK)
            f.write(data)
    return path, changes


def copy_of(template, name):
    """The template as the other host holds it: its own file, same bytes."""
    path = os.path.join(lmtest.tmp_dir(name), "template.img")
    shutil.copyfile(template, path)
    return path


def migrate(src_image, src_base, dst_base, mode="precopy", **params):
    dst_image = os.path.join(lmtest.tmp_dir("dst"), "dst.img")
    src_keys = {"base": src_base} if src_base else {}
    dst_keys = {"base": dst_base} if dst_base else {}
    with Server(control=True, image=src_image, listen="127.0.0.1:0", **src_keys) as src, \
            Server(control=True, image=dst_image, listen="127.0.0.1:0", **dst_keys) as dst:
        reply = src.control({"op": "migrate", "mode": mode, "handover": "auto",
                             "to": f"127.0.0.1:{mig.peer_port(dst)}", "from": f"127.0.0.1:{mig.peer_port(src)}",
                             **params})
        if not reply.get("ok"):
            return reply, None, None, dst_image
        st_src = mig.wait_phase(src, ["Done"], timeout=120)
        st_dst = mig.wait_phase(dst, ["Done"], timeout=120)
    return reply, st_src, st_dst, dst_image


def test_a_vm_deployed_from_a_shared_base_moves_only_what_differs_from_it():
    template = make_template(lmtest.tmp_dir("a"))
    vm, changes = deploy(template, 200)
    reply, st_src, st_dst, dst_image = migrate(vm, template, copy_of(template, "b"))
    assert reply["ok"], reply
    m = st_src["migration"]
    changed_bytes = len(changes) * BLOCK
    assert m["data_blocks_sent"] <= len(changes), m          # a changed block in a hole of the base is data too
    assert m["base"]["blocks"] >= BASE_DATA // BLOCK - len(changes), m
    assert m["wire_bytes"] <= 1.1 * changed_bytes + 256 * KiB, \
        f"{m['wire_bytes']} bytes crossed for {changed_bytes} bytes that differ from the base: {m}"
    assert st_dst["migration"]["base"]["blocks"] == m["base"]["blocks"], st_dst["migration"]
    lmtest.assert_same(lmtest.read_file(dst_image), lmtest.read_file(vm), "the destination against the VM's disk")


def test_post_copy_pulls_take_notes_too():
    template = make_template(lmtest.tmp_dir("a"))
    vm, changes = deploy(template, 50, seed=33)
    reply, st_src, st_dst, dst_image = migrate(vm, template, copy_of(template, "b"), mode="postcopy")
    assert reply["ok"], reply
    assert st_dst["migration"]["background_pulls"] > 0 and st_dst["migration"]["base"]["blocks"] > 0, \
        st_dst["migration"]
    lmtest.assert_same(lmtest.read_file(dst_image), lmtest.read_file(vm), "the destination against the VM's disk")


def test_a_base_that_is_not_the_same_template_is_refused_by_name():
    template = make_template(lmtest.tmp_dir("a"))
    vm, _ = deploy(template, 10)
    other = lmtest.make_image(SIZE, name="other.img", dir=lmtest.tmp_dir("o"),
                              data=random.Random(99).randbytes(BASE_DATA))
    reply, *_ = migrate(vm, template, other)
    assert not reply["ok"] and "BaseMismatch" in reply["error"] and "base image mismatch" in reply["error"], reply
    reply, *_ = migrate(vm, template, None)
    assert not reply["ok"] and "has no base=" in reply["error"], reply


def rotted_base_run(mode):
    template = make_template(lmtest.tmp_dir("a"))
    vm, changes = deploy(template, 20, seed=34)
    rotten = copy_of(template, "b")
    dst_image = os.path.join(lmtest.tmp_dir("dst"), "dst.img")
    with Server(control=True, image=vm, listen="127.0.0.1:0", base=template) as src, \
            Server(control=True, image=dst_image, listen="127.0.0.1:0", base=rotten) as dst:
        # Rot after the plugin started: the bytes change, its cached checksums do not.
        victim = next(b for b in range(100, BASE_DATA // BLOCK) if b not in changes)
        st = os.stat(rotten)
        with open(rotten, "r+b") as f:
            f.seek(victim * BLOCK + 7)
            f.write(b"\x00\x01\x02")
        os.utime(rotten, ns=(st.st_atime_ns, st.st_mtime_ns))
        reply = src.control({"op": "migrate", "mode": mode, "handover": "auto",
                             "to": f"127.0.0.1:{mig.peer_port(dst)}", "from": f"127.0.0.1:{mig.peer_port(src)}"})
        assert reply["ok"], reply
        st_src = mig.wait_phase(src, ["Done"], timeout=120)
        st_dst = mig.wait_phase(dst, ["Done"], timeout=120)
    assert st_dst["migration"]["base"]["refused_notes"] >= 1, (mode, st_dst["migration"])
    assert f"block {victim} of base image" in st_dst["migration"]["last_error"], (mode, st_dst["migration"])
    lmtest.assert_same(lmtest.read_file(dst_image), lmtest.read_file(vm), f"{mode}: the destination against the VM")
    return st_src, changes


def test_a_block_that_rotted_in_the_destinations_base_is_caught_and_sent_plain():
    st_src, changes = rotted_base_run("precopy")
    assert st_src["migration"]["data_blocks_sent"] > len(changes), st_src["migration"]   # the rest went plain


def test_a_rotted_base_block_is_caught_in_post_copy_pulls_too():
    rotted_base_run("postcopy")


def test_the_verifying_writer_loses_nothing_across_handover_with_a_base():
    template = make_template(lmtest.tmp_dir("a"))
    vm, _ = deploy(template, 100, seed=35)
    hot = f"{48 * MiB}:{8 * MiB}"   # in the hole after the template's data
    dst_image = os.path.join(lmtest.tmp_dir("dst"), "dst.img")
    before = lmtest.read_file(vm, 0, BASE_DATA)
    with Server(control=True, image=vm, listen="127.0.0.1:0", base=template, **{"segment-size": "1M"}) as src, \
            Server(control=True, image=dst_image, listen="127.0.0.1:0", base=copy_of(template, "b"),
                   **{"segment-size": "1M"}) as dst:
        _, _, st_dst = mig.writer_across_handover(src, dst, hot, "zero", max_rate=8 * MiB, handover_size=512 * KiB)
    assert st_dst["migration"]["base"]["blocks"] > 0, st_dst["migration"]
    lmtest.assert_same(lmtest.read_file(dst_image, 0, BASE_DATA), before, "the data the writer did not touch")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
