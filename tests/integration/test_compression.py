"""Compression of DATA on the link (issue #14): data that compresses crosses
as zstd and arrives byte for byte, pushed and pulled; random data crosses
plain whatever was asked; auto compresses when max_rate caps the link; an
older destination (no "decompress" in START_OK) gets plain data; a
COMPRESSED frame that is not exactly its length of zstd is refused and
writes nothing.

    LIVEMIG_PLUGIN=build/plugin/livemig.so PYTHONPATH=tests/integration \\
        /usr/bin/python3 -m pytest tests/integration/test_compression.py [-k NAME]
"""

import os
import random
import struct
import sys

import pytest

import lmtest
from lmtest import KiB, MiB, Server
import migration as mig
from wire import BAD_FRAME, DATA, FLAG_COMPRESSED, START, START_OK, FakeDestination, frame, handshake, make_secret, \
    start_payload

SIZE = 32 * MiB
DATA_LEN = 24 * MiB


def text_data(n, seed=3):
    """Data that compresses about 3-4x, like text and binaries."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"etaoinshrdlu cmfwyp", k=rng.randrange(2, 12))) for _ in range(500)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words)
    return bytes(out[:n])


def migrate_data(data, mode="precopy", **params):
    """Migrates an image holding `data` (then a hole) with `params`; checks
    every byte at the destination; returns (source status, destination
    status) when both are Done."""
    src_image = lmtest.make_image(SIZE, name="src.img", dir=lmtest.tmp_dir("src"), data=data)
    dst_image = os.path.join(lmtest.tmp_dir("dst"), "dst.img")
    with Server(control=True, image=src_image, listen="127.0.0.1:0") as src, \
            Server(control=True, image=dst_image, listen="127.0.0.1:0") as dst:
        mig.migrate(src, dst, mode, handover="auto", **params)
        st_src = mig.wait_phase(src, ["Done"], timeout=120)
        st_dst = mig.wait_phase(dst, ["Done"], timeout=120)
    lmtest.assert_same(lmtest.read_file(dst_image, 0, len(data)), data, "the data at the destination")
    rest = lmtest.read_file(dst_image, len(data), SIZE - len(data))
    lmtest.assert_same(rest, bytes(len(rest)), "the hole after the data")
    return st_src, st_dst


def compression(st):
    return st["migration"].get("compression", {})


def test_pushed_data_that_compresses_crosses_compressed_and_arrives_byte_for_byte():
    st_src, st_dst = migrate_data(text_data(DATA_LEN), "precopy", compression="zstd")
    c_src, c_dst = compression(st_src), compression(st_dst)
    assert c_src["setting"] == "zstd:1" and c_src["active"], c_src
    assert c_src["plain_bytes"] >= DATA_LEN * 0.95, c_src   # every frame shrank
    assert c_src["wire_bytes"] * 2 < c_src["plain_bytes"], c_src
    for key in ("frames", "plain_bytes", "wire_bytes"):
        assert c_dst[key] == c_src[key], f"{key}: the destination decompressed {c_dst}, the source sent {c_src}"
    wire = st_src["migration"]["wire_bytes"]
    assert wire < DATA_LEN * 0.6, f"{wire} bytes crossed for {DATA_LEN} of data"


def test_pulled_data_after_handover_crosses_compressed_too():
    st_src, st_dst = migrate_data(text_data(DATA_LEN, seed=4), "postcopy", compression="zstd:3")
    c_dst = compression(st_dst)
    assert st_dst["migration"]["background_pulls"] > 0, st_dst
    assert c_dst["frames"] > 0 and c_dst["wire_bytes"] * 2 < c_dst["plain_bytes"], c_dst
    assert compression(st_src)["setting"] == "zstd:3"


def test_the_verifying_writer_loses_nothing_across_handover_with_compression_on():
    data = text_data(16 * MiB, seed=9)
    hot = f"{20 * MiB}:{4 * MiB}"   # in the hole after the data: the data stays the original
    src_image = lmtest.make_image(SIZE, name="src.img", dir=lmtest.tmp_dir("src"), data=data)
    dst_image = os.path.join(lmtest.tmp_dir("dst"), "dst.img")
    with Server(control=True, image=src_image, listen="127.0.0.1:0", **{"segment-size": "1M"}) as src, \
            Server(control=True, image=dst_image, listen="127.0.0.1:0", **{"segment-size": "1M"}) as dst:
        _, st_src, st_dst = mig.writer_across_handover(src, dst, hot, "zero", compression="zstd", max_rate=8 * MiB,
                                                       handover_size=512 * KiB)
    assert compression(st_dst)["frames"] > 0 and compression(st_src)["frames"] == compression(st_dst)["frames"], \
        (compression(st_src), compression(st_dst))
    lmtest.assert_same(lmtest.read_file(dst_image, 0, len(data)), data, "the data the writer did not touch")


def test_random_data_crosses_plain_even_when_compression_is_asked_for():
    data = random.Random(5).randbytes(8 * MiB)
    st_src, st_dst = migrate_data(data, "precopy", compression="zstd")
    assert compression(st_src).get("frames", 0) == 0, compression(st_src)
    assert compression(st_dst).get("frames", 0) == 0, compression(st_dst)


def test_auto_compresses_when_max_rate_caps_the_link_and_off_never_does():
    data = text_data(8 * MiB, seed=6)
    st_src, _ = migrate_data(data, "precopy", max_rate=8 * MiB)  # auto is the default
    c = compression(st_src)
    assert c["setting"] == "auto" and c.get("frames", 0) > 0, c
    assert "max_rate" in c["reason"], c
    st_src, st_dst = migrate_data(data, "precopy", compression="off", max_rate=8 * MiB)
    assert compression(st_src) == {"setting": "off", "active": False}, compression(st_src)
    assert "compression" not in st_dst["migration"], st_dst["migration"]


def test_a_bad_compression_setting_is_refused_by_name():
    with mig.Pair(4 * MiB, 1 * MiB) as (src, dst, *_):
        reply = src.control({"op": "migrate", "mode": "precopy", "to": f"127.0.0.1:{mig.peer_port(dst)}",
                             "compression": "gzip"})
        assert not reply["ok"] and "compression \"gzip\"" in reply["error"], reply
        assert mig.status(src)["phase"] == "Idle", mig.status(src)


def test_a_destination_that_does_not_say_it_decompresses_gets_plain_data():
    key_path, key = make_secret()
    data = text_data(4 * MiB, seed=8)
    src_image = lmtest.make_image(SIZE, name="src.img", dir=lmtest.tmp_dir("src"), data=data)
    with Server(control=True, image=src_image, listen="127.0.0.1:0", secret=key_path) as s:
        fake = FakeDestination(key, lambda c, f: None)   # an older livemig: START_OK without "decompress"
        try:
            reply = s.control({"op": "migrate", "mode": "precopy", "handover": "explicit", "compression": "zstd",
                               "to": f"127.0.0.1:{fake.port}", "from": f"127.0.0.1:{mig.peer_port(s)}"})
            assert reply["ok"], reply
            lmtest.wait_until(lambda: len(fake.data_flags) >= 16 or fake.error, timeout=30,
                              what="the 16 frames of data at the fake destination")
            assert fake.error is None, f"fake destination: {fake.error!r}"
            assert not any(flags & FLAG_COMPRESSED for flags in fake.data_flags), fake.data_flags
            c = mig.status(s)["migration"]["compression"]
            assert c["setting"] == "off" and "frames" not in c, c
        finally:
            s.control({"op": "cancel"})
            fake.close()


def zstd_frame(content, declared=None):
    """One zstd frame of raw blocks holding `content`, stating `declared` as
    its size (RFC 8878: single segment, 4-byte content size, no checksum);
    written here so that the test does not share the codec it checks."""
    declared = len(content) if declared is None else declared
    out = struct.pack("<IBI", 0xFD2FB528, (2 << 6) | (1 << 5), declared)
    blocks = [content[i:i + 128 * KiB] for i in range(0, len(content), 128 * KiB)] or [b""]
    for i, block in enumerate(blocks):
        last = 1 if i == len(blocks) - 1 else 0
        out += struct.pack("<I", last | (len(block) << 3))[:3] + block   # block type 0: raw
    return out


def test_a_compressed_frame_that_is_not_its_length_of_zstd_is_refused_and_writes_nothing():
    key_path, key = make_secret()
    dst_image = os.path.join(lmtest.tmp_dir("dst"), "d.img")
    with Server(control=True, image=dst_image, listen="127.0.0.1:0", secret=key_path) as dst:
        port = mig.peer_port(dst)
        params = {"to": f"127.0.0.1:{port}", "from": "127.0.0.1:9"}

        def start(c, rid, resume):
            p = {**params, "resume": True} if resume else params
            c.send(frame(START, start_payload(SIZE, params=p, migration_id="m-z"), request_id=rid))
            f = c.read_frame()
            assert f.type == START_OK, f
            return f

        def data(offset, length, zbytes):
            return frame(DATA, struct.pack(">QII", offset, length, FLAG_COMPRESSED) + zbytes, flags=FLAG_COMPRESSED)

        c, _ = handshake(port, key, purpose="peer")
        with c:
            ok = start(c, 1, resume=False)
            assert b'"decompress":["zstd"]' in ok.payload, ok.payload   # what a source looks for
            # A well-formed frame (made by hand, not by the plugin's codec) is written.
            c.send(data(0, 8192, zstd_frame(b"Q" * 8192)))
            lmtest.wait_until(lambda: lmtest.read_file(dst_image, 0, 8192) == b"Q" * 8192, timeout=10,
                              what="the compressed DATA to be written")
            # States 8192 bytes for a 4096-byte DATA: refused, the link closed.
            c.send(data(8192, 4096, zstd_frame(b"R" * 8192)))
            c.expect_error(BAD_FRAME, what="a zstd frame larger than the DATA")
        for rid, (length, z, what) in enumerate([
                (8192, zstd_frame(b"S" * 4096), "a zstd frame smaller than the DATA"),
                (8192, zstd_frame(b"T" * 8192)[:-100], "a truncated zstd frame"),
                (8192, zstd_frame(b"U" * 8192) + b"junk", "bytes after the zstd frame"),
                (8192, b"\x00" * 64, "bytes that are not zstd")], start=2):
            c, _ = handshake(port, key, purpose="peer")
            with c:
                start(c, rid, resume=True)
                c.send(data(8192, length, z))
                c.expect_error(BAD_FRAME, what=what)
        assert lmtest.read_file(dst_image, 8192, SIZE - 8192) == bytes(SIZE - 8192), \
            "a refused compressed frame was written"
        assert mig.status(dst)["phase"] == "PreCopy"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
