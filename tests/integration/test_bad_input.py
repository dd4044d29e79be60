"""Bad input to livemig.so. A bad configuration stops nbdkit at start-up with
a non-zero exit and a message naming the problem. A bad control request gets
{"ok": false, "error": ...} (an oversized line: that reply, then the
connection is closed), and the plugin goes on serving control requests and
NBD I/O.

    LIVEMIG_PLUGIN=build/plugin/livemig.so PYTHONPATH=tests/integration \
        /usr/bin/python3 -m pytest tests/integration/test_bad_input.py [-k NAME]
"""

import json
import os
import random
import signal
import socket
import stat
import sys
import threading

import pytest

import lmtest
from lmtest import KiB, MiB, ControlClient, Server, make_image, run_nbdkit_expect_failure

MAX_LINE = 64 * KiB  # ControlServer::kMaxRequestBytes, newline included


def expect_startup_failure(args, *needles):
    rc, err = run_nbdkit_expect_failure(args)
    assert rc != 0, f"nbdkit {' '.join(args)}: exited 0, expected a start-up failure\n{err}"
    for n in needles:
        assert n in err, f"nbdkit {' '.join(args)}: stderr does not mention {n!r}:\n{err}"
    return err


def test_missing_image_key():
    expect_startup_failure([], "image")
    expect_startup_failure(["block-size=4K"], "image=<FILE>", "required")


def test_image_that_does_not_exist():
    path = os.path.join(lmtest.tmp_dir(), "no-such.img")
    expect_startup_failure([f"image={path}"], path, "No such file")
    expect_startup_failure([f"image={path}", "readonly=true"], path, "No such file")


def test_image_that_is_a_directory():
    d = lmtest.tmp_dir("dir")
    expect_startup_failure([f"image={d}"], d)
    expect_startup_failure([f"image={d}", "readonly=true"], d, "not a regular file")


def test_empty_image_path():
    expect_startup_failure(["image="], "image")


def test_bad_block_sizes():
    img = make_image(MiB)
    expect_startup_failure([f"image={img}", "block-size=3000"], "block-size=3000", "power of two")
    expect_startup_failure([f"image={img}", "block-size=256"], "block-size=256", "512")
    expect_startup_failure([f"image={img}", "block-size=0"], "block-size=0")
    expect_startup_failure([f"image={img}", "block-size=4Q"], "block-size=4Q")
    expect_startup_failure([f"image={img}", "block-size=99999999999999999999999"], "block-size=", "not a size")
    expect_startup_failure([f"image={img}", "block-size=20000000T"], "block-size=20000000T", "overflow")
    expect_startup_failure([f"image={img}", "block-size=2M"], "block-size=", "1M")
    expect_startup_failure([f"image={img}", "block-size=-4096"], "block-size=-4096")


def test_segment_smaller_than_block():
    img = make_image(MiB)
    expect_startup_failure([f"image={img}", "segment-size=4096", "block-size=8192"],
                           "segment-size=4096", "block-size=8192")
    # The same keys in the other order: the check waits until all are known.
    expect_startup_failure([f"image={img}", "block-size=8192", "segment-size=4096"],
                           "segment-size=4096", "block-size=8192")


def test_segment_size_not_a_size():
    img = make_image(MiB)
    expect_startup_failure([f"image={img}", "segment-size=not-a-size"], "segment-size=not-a-size", "not a size")
    expect_startup_failure([f"image={img}", "segment-size=3M"], "segment-size=3145728", "power of two")


def test_unknown_key():
    img = make_image(MiB)
    expect_startup_failure([f"image={img}", "frobnicate=1"], "frobnicate")


def test_readonly_not_a_boolean():
    img = make_image(MiB)
    expect_startup_failure([f"image={img}", "readonly=maybe"], "readonly=maybe", "boolean")


def test_heat_half_life_not_positive():
    img = make_image(MiB)
    for v in ("0", "-5", "soon", "nan"):
        expect_startup_failure([f"image={img}", f"heat-half-life={v}"], f"heat-half-life={v}")


def test_control_path_in_missing_directory():
    img = make_image(MiB)
    path = os.path.join(lmtest.tmp_dir(), "no-such-dir", "control.sock")
    expect_startup_failure([f"image={img}", f"control={path}"], f"control={path}")


def test_control_path_too_long():
    img = make_image(MiB)
    path = os.path.join(lmtest.tmp_dir(), "x" * 120)
    expect_startup_failure([f"image={img}", f"control={path}"], "control=", "107")


def test_control_path_that_is_a_regular_file():
    img = make_image(MiB)
    path = os.path.join(lmtest.tmp_dir(), "not-a-socket")
    with open(path, "w") as f:
        f.write("keep me\n")
    expect_startup_failure([f"image={img}", f"control={path}"], path, "not a socket")
    with open(path) as f:
        assert f.read() == "keep me\n", "a failed start-up clobbered the file at control="


def test_control_path_with_a_stale_socket_is_taken_over():
    img = make_image(MiB)
    first = Server(image=img, control=True).start()
    try:
        assert first.kill(signal.SIGKILL) == -signal.SIGKILL
    finally:
        first.stop()
    assert os.path.exists(first.control_path), "SIGKILL should leave the socket file behind"
    with Server(image=img, control=first.control_path) as s:
        assert s.control({"op": "status"})["ok"] is True
        assert stat.S_IMODE(os.stat(s.control_path).st_mode) == 0o600


def test_control_path_of_a_running_server():
    img = make_image(MiB)
    with Server(image=img, control=True) as s:
        expect_startup_failure([f"image={img}", f"control={s.control_path}"], s.control_path, "listening")
        # The first server keeps its socket.
        assert s.control({"op": "status"})["ok"] is True


def still_serving(s, h, rng):
    """The server answers status and does NBD I/O correctly."""
    st = s.control({"op": "status"})
    assert st["ok"] is True and st["op"] == "status", st
    data = rng.randbytes(5000)
    off = rng.randrange(MiB - len(data))
    h.pwrite(data, off)
    assert h.pread(len(data), off) == data
    assert s.alive(), "nbdkit died"


def expect_error_reply(reply, *needles):
    assert isinstance(reply, dict) and reply.get("ok") is False, reply
    assert isinstance(reply.get("error"), str) and reply["error"], reply
    for n in needles:
        assert n in reply["error"], f"error {reply['error']!r} does not mention {n!r}"


def test_bad_control_requests_get_error_replies():
    rng = random.Random(30)
    img = make_image(MiB)
    with Server(image=img, control=True) as s:
        h = s.connect()
        garbage = bytes(b for b in rng.randbytes(4000) if b not in (10, 13))
        cases = [
            (b"this is not json", ["JSON"]),
            (b'{"op": "status"', ["JSON"]),
            (b'[{"op": "status"}]', ["object"]),
            (b'"status"', ["object"]),
            (b"42", ["object"]),
            (b"null", ["object"]),
            (b"{}", ['"op"']),
            (b'{"operation": "status"}', ['"op"']),
            (b'{"op": 7}', ['"op"']),
            (b'{"op": "frobnicate"}', ["frobnicate", "status"]),
            (b'{"op": ""}', ["unknown op"]),
            (garbage, []),
            (b"\x00\x01\x02\xff\xfe", []),
            (b"\xc3\x28 invalid utf-8 \xe2\x82", []),
            (b'{"op": "status\xff"}', []),
            (b'{"op": "stats", "top": "x"}', ["top"]),
            # Deep nesting, near the line limit: refused before it is
            # parsed (a deep value would be copied and dumped recursively).
            (b"[" * 60000, ["JSON", "deeper than"]),
            (b'{"x":' + b"[" * 30000 + b"]" * 30000 + b"}", ["JSON", "deeper than"]),
            (b'{"op":' + b"{" * 20 + b"}", ["JSON"]),
        ]
        with ControlClient(s.control_path) as c:
            for line, needles in cases:
                c.send_raw(line + b"\n")
                raw = c.read_line()
                assert raw is not None, f"connection closed after {line[:40]!r}"
                reply = json.loads(raw.decode("utf-8", errors="replace"))
                try:
                    expect_error_reply(reply, *needles)
                except AssertionError as e:
                    raise AssertionError(f"request {line[:40]!r}: {e}") from None
                # The same connection still answers good requests.
                assert c.request({"op": "status"})["ok"] is True
        still_serving(s, h, rng)
        # Nothing of the above reached the NBD side as an error.
        assert s.control({"op": "stats"})["requests"]["errors"] == 0


def test_request_of_exactly_the_limit_is_served():
    img = make_image(MiB)
    with Server(image=img, control=True) as s:
        with ControlClient(s.control_path) as c:
            line = b'{"op": "status", "pad": "' + b"p" * 100 + b'"}'
            line = line[:-2] + b"p" * (MAX_LINE - 1 - len(line)) + b'"}'
            assert len(line) + 1 == MAX_LINE
            c.send_raw(line + b"\n")
            r = c.read_reply()
            assert r["ok"] is True and r["op"] == "status", r


def test_oversized_control_line_gets_error_then_close():
    rng = random.Random(31)
    img = make_image(MiB)
    with Server(image=img, control=True) as s:
        h = s.connect()
        for size in (MAX_LINE + 1, 4 * MAX_LINE, 64 * MiB):
            with ControlClient(s.control_path) as c:
                # Send from another thread: the server stops reading at the
                # limit, so a large send blocks or fails with EPIPE once it
                # has closed the connection.
                def send():
                    try:
                        c.sock.sendall(b'{"op":"status","pad":"' + b"a" * size + b'"}\n')
                    except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError):
                        pass

                t = threading.Thread(target=send)
                t.start()
                raw = c.read_line()
                assert raw is not None, f"{size}-byte line: closed without a reply"
                expect_error_reply(json.loads(raw), "longer than")
                assert c.at_eof(), f"{size}-byte line: connection still open after the error reply"
                t.join(30)
                assert not t.is_alive()
            still_serving(s, h, rng)
        # A client that sends a partial line and hangs up does no harm either.
        with ControlClient(s.control_path) as c:
            c.send_raw(b'{"op": "sta')
        with ControlClient(s.control_path) as c:
            c.send_raw(b"x" * (MAX_LINE - 10))
        still_serving(s, h, rng)


def test_many_control_connections_at_once():
    rng = random.Random(32)
    img = make_image(MiB)
    with Server(image=img, control=True) as s:
        h = s.connect()
        clients = [ControlClient(s.control_path) for _ in range(40)]
        try:
            for i, c in enumerate(clients):
                c.send_raw(b"garbage\n" if i % 2 else b'{"op":"status"}\n')
            for i, c in enumerate(clients):
                r = c.read_reply()
                assert r["ok"] is (i % 2 == 0), r
        finally:
            for c in clients:
                c.close()
        still_serving(s, h, rng)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
