"""A QEMU VM with two disks live-migrated by `migrate-nbd qemu-migrate --disk
A --disk B` (issue #15): two real qemu-system-x86_64 processes (TCG, no guest
OS), each disk the NBD export of its own livemig plugin on loopback, both
disks handed over as one group at QEMU's one pre-switchover pause
(docs/handover.md, "Groups"). Data written through the source QEMU to both
disks before the migration must read back through the destination QEMU, and
each destination plugin's image must equal what was written, byte for byte.

Skipped when qemu-system-x86_64 is not installed.

    LIVEMIG_PLUGIN=build/plugin/livemig.so LIVEMIG_BUILD_DIR=build PYTHONPATH=tests/integration \\
        /usr/bin/python3 -m pytest tests/integration/test_qemu_group_migration.py
"""

import json
import os
import random

import pytest

import lmtest
import migration as mig
import test_qemu_migration as tq
from lmtest import MiB

SIZE = tq.SIZE
ORIG = tq.ORIG
SLOT = tq.SLOT
DEVS = ["/machine/peripheral/vd0/virtio-backend", "/machine/peripheral/vd1/virtio-backend"]
ORIG_BYTES = [0x5A, 0x3C]


@pytest.fixture(autouse=True, scope="module")
def qemu_installed():
    if tq.QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed (deploy/install-deps.sh installs it)")


def qemu_io(vm, dev, command):
    before = os.path.getsize(vm.stdout_path)
    reply = vm.qmp.execute("human-monitor-command", **{"command-line": f'qemu-io -d {dev} "{command}"'})
    with open(vm.stdout_path, "rb") as f:
        f.seek(before)
        return reply + f.read().decode(errors="replace")


def second_disk(sock):
    return ["-blockdev", f"driver=nbd,server.type=unix,server.path={sock},node-name=disk1",
            "-device", "virtio-blk-pci,drive=disk1,id=vd1"]


def test_a_vm_with_two_disks_moves_both_at_one_switchover():
    cleanup = []
    try:
        d = lmtest.tmp_dir("vm2")
        srcs, dsts, dst_images = [], [], []
        for i in range(2):
            img = lmtest.make_image(SIZE, name=f"src{i}.img", dir=d, data=bytes([ORIG_BYTES[i]]) * ORIG)
            dst_images.append(lmtest.make_image(SIZE, name=f"dst{i}.img", dir=d))
            src = lmtest.Server(control=True, image=img, listen="127.0.0.1:0")
            cleanup.append(src.stop)
            src.start()
            dst = lmtest.Server(control=True, image=dst_images[i], listen="127.0.0.1:0")
            cleanup.append(dst.stop)
            dst.start()
            srcs.append(src)
            dsts.append(dst)
        ram_src = os.path.join(d, "ram-src")
        with open(ram_src, "wb") as f:
            f.write(random.Random(1).randbytes(tq.RAM))
        ram_dst = lmtest.make_image(tq.RAM, name="ram-dst", dir=d)
        vm_src = tq.Qemu("src", srcs[0].sock, ram_src, extra=second_disk(srcs[1].sock))
        cleanup.append(vm_src.stop)
        vm_dst = tq.Qemu("dst", dsts[0].sock, ram_dst, incoming=True, extra=second_disk(dsts[1].sock))
        cleanup.append(vm_dst.stop)
        assert vm_src.status() == "running" and vm_dst.status() == "inmigrate"

        # Writes through the source QEMU to both disks, each to its own slot.
        rnd = random.Random(42)
        models = [bytearray([ORIG_BYTES[i]]) * ORIG + bytearray(SIZE - ORIG) for i in range(2)]
        writes = []
        slots = list(range(SIZE // SLOT))
        rnd.shuffle(slots)
        for n in range(32):
            i = n % 2
            off = slots.pop() * SLOT  # a slot of its own: each write reads back as written
            length = rnd.choice([4096, 16384, SLOT])
            pattern = 1 + n
            out = qemu_io(vm_src, DEVS[i], f"write -P 0x{pattern:02x} {off} {length}")
            assert f"wrote {length}/{length} bytes" in out and "failed" not in out, out
            models[i][off:off + length] = bytes([pattern]) * length
            writes.append((i, off, length, pattern))

        argv = [tq.migrate_nbd_path(), "qemu-migrate", "--json", "--mode", "precopy",
                "--disk", f"127.0.0.1:{mig.peer_port(srcs[0])},127.0.0.1:{mig.peer_port(dsts[0])}",
                "--disk", f"127.0.0.1:{mig.peer_port(srcs[1])},127.0.0.1:{mig.peer_port(dsts[1])}",
                "--qmp-src", vm_src.qmp_path, "--qmp-dst", vm_dst.qmp_path,
                "--migrate-uri", f"tcp:127.0.0.1:{mig.free_port()}", "--interval", "0.5"]
        rc, out, err = tq.run_tool(argv, timeout=180)
        assert rc == 0, f"qemu-migrate failed ({rc}):\n{out}\n{err}"
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert lines[-1]["result"] == "completed", lines[-1]
        handovers = [line for line in lines if line.get("step") == "hand the storage over" and "group" in line]
        assert len(handovers) == 1 and len(handovers[0]["disks"]) == 2, handovers
        assert all(dk["phase"] in ("PostCopy", "Done") for dk in handovers[0]["disks"]), handovers
        assert vm_dst.status() == "running", vm_dst.status()

        # Both disks at the destination: through its QEMU, and byte for byte.
        for i, off, length, pattern in writes:
            got = qemu_io(vm_dst, DEVS[i], f"read -P 0x{pattern:02x} {off} {length}")
            assert f"read {length}/{length} bytes" in got and "failed" not in got, (i, off, length, got)
        for i in range(2):
            mig.wait_phase(dsts[i], ["Done"], timeout=120)
            assert mig.status(dsts[i])["authoritative"]
            assert mig.status(srcs[i])["fenced"]
            lmtest.assert_same(lmtest.read_file(dst_images[i], 0, SIZE), bytes(models[i]),
                               f"disk {i} at its destination")
    finally:
        for fn in reversed(cleanup):
            fn()
