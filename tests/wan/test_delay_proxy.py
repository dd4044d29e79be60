#!/usr/bin/python3
"""lm-delay-proxy adds the delay it is told to each direction, and carries
every byte intact, both ways at once (issue #15's WAN test bed).

    LIVEMIG_BUILD_DIR=build /usr/bin/python3 -m pytest tests/wan/test_delay_proxy.py
"""

import os
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "support", "python"))
from lmsupport import serve_loopback  # noqa: E402

BUILD = os.environ.get("LIVEMIG_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
PROXY = os.path.join(BUILD, "tests", "wan", "lm-delay-proxy")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo(c):
    """Sends back what it reads."""
    with c:
        while data := c.recv(1 << 16):
            c.sendall(data)


def echo_server():
    return serve_loopback(echo).getsockname()[1]


def start_proxy(target_port, delay_ms):
    port = free_port()
    p = subprocess.Popen([PROXY, "--listen", f"127.0.0.1:{port}", "--to", f"127.0.0.1:{target_port}",
                          "--delay-ms", str(delay_ms)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = p.stdout.readline().decode()
    assert "lm-delay-proxy" in line, (line, p.stderr.read().decode() if p.poll() is not None else "")
    return p, port


def round_trips(port, n=10):
    times = []
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(n):
            t0 = time.monotonic()
            s.sendall(b"ping%04d" % i)
            got = b""
            while len(got) < 8:
                got += s.recv(8 - len(got))
            times.append(time.monotonic() - t0)
            assert got == b"ping%04d" % i, got
    return times


def test_round_trips_take_twice_the_one_way_delay():
    echo_port = echo_server()
    for delay in (0, 25, 50):
        proxy, port = start_proxy(echo_port, delay)
        try:
            rtt = statistics.median(round_trips(port))
        finally:
            proxy.kill()
            proxy.wait()
        print(f"  delay {delay} ms each way: median round trip {rtt * 1000:.1f} ms")
        assert 2 * delay / 1000 <= rtt <= 2 * delay / 1000 + 0.02, (delay, rtt)


def test_every_byte_crosses_intact_both_ways_at_once():
    proxy, port = start_proxy(echo_server(), 10)
    data = os.urandom(32 << 20)
    got = bytearray()
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            def reader():
                while len(got) < len(data):
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    got.extend(chunk)
            r = threading.Thread(target=reader)
            r.start()
            s.sendall(data)
            r.join(60)
        assert bytes(got) == data, f"{len(got)} of {len(data)} bytes came back, or they differ"
    finally:
        proxy.kill()
        proxy.wait()


if __name__ == "__main__":
    import pytest
    sys.exit(pytest.main([__file__, "-p", "no:cacheprovider", "-q", "-rfEs", *sys.argv[1:]]))
