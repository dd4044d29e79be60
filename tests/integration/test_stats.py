"""The control socket of livemig.so: "status" describes the image and its
geometry, "stats" counts exactly the requests that were made (and their latency)
and attributes heat to the segments they touched, "top" ranks the hottest, and the socket
is private to its owner (mode 0600).

    LIVEMIG_PLUGIN=build/plugin/livemig.so PYTHONPATH=tests/integration \
        /usr/bin/python3 -m pytest tests/integration/test_stats.py [-k NAME]
"""

import os
import random
import signal
import stat
import subprocess
import sys

import nbd
import pytest

import lmtest
from lmtest import KiB, MiB, ControlClient, Server, make_image, read_file

SEG = 64 * KiB


def ceil_div(a, b):
    return (a + b - 1) // b


def test_status_describes_image_and_geometry():
    for size, bs, seg in ((8 * MiB + 1000, 8 * KiB, 128 * KiB), (3 * MiB, 4 * KiB, 1 * MiB), (5000, 512, 4096)):
        img = make_image(size)
        with Server(image=img, control=True, **{"block-size": bs, "segment-size": seg}) as s:
            st = s.control({"op": "status"})
            assert st["ok"] is True and st["op"] == "status", st
            assert st["size"] == size and st["image"] == img, st
            assert st["block_size"] == bs and st["segment_size"] == seg, st
            assert st["blocks"] == ceil_div(size, bs) and st["segments"] == ceil_div(size, seg), st
            assert st["phase"] == "Idle" and st["readonly"] is False, st
            assert st["connections"] == 0, st
            h = s.connect()
            assert h.get_size() == st["size"]
            assert s.control({"op": "status"})["connections"] == 1


def test_stats_latency_is_a_histogram_of_the_requests_made():
    """stats' "latency" counts each read and write once; its buckets are
    cumulative (never fewer at a higher bound) and none exceeds the count."""
    img = make_image(MiB)
    with Server(image=img, control=True) as s:
        before = s.control({"op": "stats", "top": 0})["latency"]
        h = s.connect()
        for i in range(10):
            h.pread(4096, i * 4096)
        for i in range(5):
            h.pwrite(b"x" * 4096, i * 4096)
        lat = s.control({"op": "stats", "top": 0})["latency"]
        assert lat["count"] - before["count"] == 15, (before, lat)
        assert lat["sum_seconds"] > 0, lat
        bounds = [b["le_seconds"] for b in lat["buckets"]]
        counts = [b["count"] for b in lat["buckets"]]
        assert bounds == sorted(bounds) and bounds[0] == 0.0001 and bounds[-1] == 10, bounds
        assert counts == sorted(counts) and counts[-1] <= lat["count"], lat


def test_control_socket_is_mode_0600():
    img = make_image(MiB)
    with Server(image=img, control=True) as s:
        st = os.stat(s.control_path)
        assert stat.S_ISSOCK(st.st_mode), "control path is not a socket"
        mode = stat.S_IMODE(st.st_mode)
        assert mode == 0o600, f"control socket mode {oct(mode)}, expected 0o600"
    assert not os.path.exists(s.control_path), "control socket left behind after nbdkit exited"


def test_control_socket_works_when_nbdkit_runs_in_the_background():
    # Without -f nbdkit forks: the parent exits and the child, which serves,
    # changes directory to /. The socket must stay, answer, and be removed
    # when the serving process exits; relative paths are relative to where
    # nbdkit was started.
    for relative in (False, True):
        d = lmtest.tmp_dir("bg")
        img = make_image(MiB, dir=d)
        ctl = os.path.join(d, "ctl.sock")
        keys = {"image": "disk.img", "control": "ctl.sock"} if relative else {"image": img, "control": ctl}
        s = Server(background=True, cwd=d, **keys)
        with s:
            assert s.control_path == ctl
            assert stat.S_ISSOCK(os.stat(ctl).st_mode), f"relative={relative}: no control socket"
            h = s.connect()
            h.pwrite(b"z" * 4096, 8192)
            st = s.control({"op": "status"})
            assert st["ok"] is True and st["connections"] == 1, st
            assert os.path.isabs(st["image"]) and os.path.samefile(st["image"], img), st
            assert s.control({"op": "stats"})["requests"]["pwrite"]["count"] == 1
        assert s.returncode == 0, f"relative={relative}: exit status {s.returncode}"
        assert not os.path.exists(ctl), f"relative={relative}: control socket left behind"
        assert read_file(img, 8192, 4096) == b"z" * 4096


def test_stats_count_exactly_what_was_done():
    rng = random.Random(20)
    size = 16 * MiB
    img = make_image(size)
    with Server(image=img, control=True, **{"segment-size": "64K"}) as s:
        h = s.connect()
        zero_counts = s.control({"op": "stats"})["requests"]
        for k, v in zero_counts.items():
            assert (v if k == "errors" else v["count"]) == 0, f"{k} counted before any request: {zero_counts}"

        done = {k: [0, 0] for k in ("pread", "pwrite", "flush", "trim", "zero", "extents", "cache")}

        def do(kind, n=0):
            done[kind][0] += 1
            done[kind][1] += n

        ops = (["pwrite"] * rng.randrange(20, 60) + ["pread"] * rng.randrange(20, 60) + ["flush"] * rng.randrange(3, 9)
               + ["trim"] * rng.randrange(3, 9) + ["zero"] * rng.randrange(3, 9) + ["extents"] * rng.randrange(2, 5)
               + ["cache"] * rng.randrange(2, 5))
        rng.shuffle(ops)
        for kind in ops:
            n = rng.randrange(1, 256 * KiB)
            off = rng.randrange(size - n)
            if kind == "pwrite":
                h.pwrite(rng.randbytes(n), off, rng.choice((0, nbd.CMD_FLAG_FUA)))
                do(kind, n)
            elif kind == "pread":
                h.pread(n, off)
                do(kind, n)
            elif kind == "flush":
                h.flush()
                do(kind)
            elif kind == "trim":
                h.trim(n, off)
                do(kind, n)
            elif kind == "zero":
                h.zero(n, off, rng.choice((0, nbd.CMD_FLAG_NO_HOLE)))
                do(kind, n)
            elif kind == "extents":
                h.block_status(n, off, lambda *a: 0)
                do(kind)
            elif kind == "cache":
                h.cache(n, off)
                do(kind, n)

        stats = s.control({"op": "stats"})
        assert stats["ok"] is True and stats["op"] == "stats", stats
        req = stats["requests"]
        for kind, (count, nbytes) in done.items():
            assert req[kind]["count"] == count, f"{kind}: counted {req[kind]['count']}, did {count}"
            if "bytes" in req[kind]:
                assert req[kind]["bytes"] == nbytes, f"{kind}: counted {req[kind]['bytes']} bytes, did {nbytes}"
        assert req["errors"] == 0, req
        assert stats["connections"] == 1


def test_heat_goes_to_the_segments_touched():
    rng = random.Random(21)
    img = make_image(16 * SEG)
    with Server(image=img, control=True, **{"segment-size": SEG, "heat-half-life": 3600}) as s:
        h = s.connect()
        # Writes only inside segment 3, reads only inside segment 5.
        n_w, w_bytes = rng.randrange(5, 15), 0
        for _ in range(n_w):
            n = rng.randrange(1, SEG)
            h.pwrite(rng.randbytes(n), 3 * SEG + rng.randrange(SEG - n + 1))
            w_bytes += n
        n_r, r_bytes = n_w + rng.randrange(5, 15), 0
        for _ in range(n_r):
            n = rng.randrange(1, SEG)
            h.pread(n, 5 * SEG + rng.randrange(SEG - n + 1))
            r_bytes += n

        heat = s.control({"op": "stats"})["heat"]
        assert heat["segment_size"] == SEG
        segs = {e["segment"]: e for e in heat["segments"]}
        assert sorted(segs) == [3, 5], f"heat in segments {sorted(segs)}, expected only 3 and 5"
        s3, s5 = segs[3], segs[5]
        assert s3["offset"] == 3 * SEG and s5["offset"] == 5 * SEG
        assert (s3["writes"], s3["write_bytes"], s3["reads"], s3["read_bytes"]) == (n_w, w_bytes, 0, 0), s3
        assert (s5["reads"], s5["read_bytes"], s5["writes"], s5["write_bytes"]) == (n_r, r_bytes, 0, 0), s5
        # Reads outnumber writes here, so segment 5 is the hottest.
        top = s.control({"op": "stats", "top": 1})["heat"]["segments"]
        assert [e["segment"] for e in top] == [5], top
        assert top[0]["score"] > s3["score"] > 0, (top, s3)

        # One request across segments 6 and 7 counts once in each, with its
        # bytes split at the boundary.
        h.pwrite(bytes(3000), 7 * SEG - 1000)
        segs = {e["segment"]: e for e in s.control({"op": "stats"})["heat"]["segments"]}
        assert (segs[6]["writes"], segs[6]["write_bytes"]) == (1, 1000), segs[6]
        assert (segs[7]["writes"], segs[7]["write_bytes"]) == (1, 2000), segs[7]

        # Make segment 9 the hottest by far; trim and zero count as writes.
        for _ in range(3 * n_r):
            h.pwrite(b"x", 9 * SEG + 17)
        h.trim(4096, 9 * SEG)
        h.zero(4096, 9 * SEG + 8192)
        stats = s.control({"op": "stats", "top": 3})
        top = stats["heat"]["segments"]
        assert [e["segment"] for e in top] == [9, 5, 3], top
        assert top[0]["writes"] == 3 * n_r + 2, top[0]
        assert [e["score"] for e in top] == sorted((e["score"] for e in top), reverse=True), top
        assert s.control({"op": "stats", "top": 0})["heat"]["segments"] == []
        # top larger than the number of segments lists them all, hottest first.
        all_ = s.control({"op": "stats", "top": 1000})["heat"]["segments"]
        assert len(all_) == 16 and all_[0]["segment"] == 9, all_
        for bad in (-1, "1", 1.5, None):
            r = s.control({"op": "stats", "top": bad})
            assert r["ok"] is False and "top" in r["error"], (bad, r)


def test_one_control_connection_serves_many_requests():
    img = make_image(MiB)
    with Server(image=img, control=True) as s:
        h = s.connect()
        with ControlClient(s.control_path) as c:
            for i in range(50):
                h.pread(512, 0)
                r = c.request({"op": "stats"})
                assert r["requests"]["pread"]["count"] == i + 1, r["requests"]
            # Several requests in one write are answered in order.
            c.send_raw(b'{"op":"status"}\n{"op":"stats"}\r\n{"op":"status"}\n')
            assert [c.read_reply()["op"] for _ in range(3)] == ["status", "stats", "status"]


def test_sigterm_with_open_connections_exits_cleanly():
    # nbdkit answers SIGTERM by failing new requests (ESHUTDOWN) and exits
    # once its NBD clients hang up; open control connections, idle or with a
    # partial request, must not hold it up, and the socket file goes away.
    img = make_image(MiB)
    s = Server(image=img, control=True).start()
    idle = partial = None
    try:
        handles = [s.connect() for _ in range(3)]
        for h in handles:
            h.pwrite(b"y" * 4096, 0)
        idle = ControlClient(s.control_path)           # connected, no request
        partial = ControlClient(s.control_path)        # mid-line
        partial.send_raw(b'{"op": "sta')
        assert s.control({"op": "status"})["connections"] == 3
        os.kill(s.pid, signal.SIGTERM)
        for h in list(handles):  # nbdkit may already have closed them
            s.disconnect(h, ignore_errors=True)
        try:
            s.proc.wait(lmtest.STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"nbdkit still running {lmtest.STOP_TIMEOUT}s after SIGTERM with every "
                                 f"NBD client gone:\n{s.stderr()}") from None
    finally:
        s.stop()
        for c in (idle, partial):
            if c:
                c.close()
    assert not s.needed_sigkill
    assert s.returncode == 0, f"nbdkit exited with {s.returncode} on SIGTERM:\n{s.stderr()}"
    assert not os.path.exists(s.control_path), "control socket left behind"
    assert s.stderr() == "", s.stderr()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
