"""Several NBD connections at once through livemig.so: each writes its own
disjoint stripes of the image (synchronous and asynchronous requests, many
of each, with unaligned edges shared with other connections' stripes), and
every byte is then verified from a different connection and in the file.
The control socket counts the open connections.

    LIVEMIG_PLUGIN=build/plugin/livemig.so PYTHONPATH=tests/integration \
        /usr/bin/python3 -m pytest tests/integration/test_multiconn.py [-k NAME]
"""

import random
import sys
import threading

import nbd
import pytest

from lmtest import MiB, Server, assert_same, make_image, nbd_read_all, read_file, wait_until

CONNS = 4
SIZE = 8 * MiB + 1000
STRIPE = 12345  # not a multiple of anything: stripes of different connections share blocks
MAX_IN_FLIGHT = 16


def stripes_of(conn):
    """[offset, end) of every stripe that connection `conn` owns."""
    out = []
    for i, off in enumerate(range(0, SIZE, STRIPE)):
        if i % CONNS == conn:
            out.append((off, min(off + STRIPE, SIZE)))
    return out


class Worker(threading.Thread):
    def __init__(self, conn, h, expected, barrier):
        super().__init__(name=f"conn{conn}")
        self.conn, self.h, self.expected, self.barrier = conn, h, expected, barrier
        self.rng = random.Random(100 + conn)
        self.error = None
        self.requests = 0

    def run(self):
        try:
            self.barrier.wait(timeout=30)
            self.sync_pass()
            self.aio_pass()
            self.sync_pass(fua=True)
            self.h.flush()
        except BaseException as e:  # reported by the main thread
            self.error = e

    def pieces(self, start, end):
        """Splits [start, end) at random points into disjoint pieces."""
        cuts = sorted(self.rng.sample(range(start + 1, end), k=min(3, end - start - 1)))
        edges = [start, *cuts, end]
        return list(zip(edges, edges[1:]))

    def sync_pass(self, fua=False):
        stripes = stripes_of(self.conn)
        self.rng.shuffle(stripes)
        for start, end in stripes:
            for off, stop in self.pieces(start, end):
                data = self.rng.randbytes(stop - off)
                flags = nbd.CMD_FLAG_FUA if fua and self.rng.random() < 0.2 else 0
                self.h.pwrite(data, off, flags)
                self.expected[off:stop] = data
                self.requests += 1

    def aio_pass(self):
        # Every piece is written once, so requests in flight never overlap
        # and their order does not matter.
        h = self.h
        cookies = []
        for start, end in stripes_of(self.conn):
            for off, stop in self.pieces(start, end):
                while h.aio_in_flight() >= MAX_IN_FLIGHT:
                    h.poll(-1)
                data = self.rng.randbytes(stop - off)
                self.expected[off:stop] = data
                cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(data), off))
                self.requests += 1
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:  # raises if that write failed
            assert h.aio_command_completed(c), f"aio write {c} not complete"


class Verifier(threading.Thread):
    def __init__(self, conn, h, expected):
        super().__init__(name=f"verify{conn}")
        self.conn, self.h, self.expected = conn, h, expected
        self.error = None

    def run(self):
        try:
            for start, end in stripes_of(self.conn):
                assert_same(self.h.pread(end - start, start), self.expected[start:end],
                            f"stripe [{start}, {end}) of connection {self.conn}")
        except BaseException as e:
            self.error = e


def join_all(threads):
    for t in threads:
        t.join(timeout=240)
        assert not t.is_alive(), f"{t.name} did not finish"
    errors = [(t.name, t.error) for t in threads if t.error]
    if errors:
        raise AssertionError(f"{len(errors)} thread(s) failed: {errors[0][0]}: {errors[0][1]!r}") from errors[0][1]


def test_concurrent_connections_write_disjoint_stripes_and_verify_from_another():
    img = make_image(SIZE)
    expected = bytearray(SIZE)
    with Server(image=img, control=True, **{"segment-size": "64K"}) as s:
        assert s.control({"op": "status"})["connections"] == 0
        handles = [s.connect() for _ in range(CONNS)]
        assert all(h.can_multi_conn() for h in handles)
        assert s.control({"op": "status"})["connections"] == CONNS

        barrier = threading.Barrier(CONNS)
        workers = [Worker(i, handles[i], expected, barrier) for i in range(CONNS)]
        for w in workers:
            w.start()
        # Still all open while they work.
        assert s.control({"op": "status"})["connections"] == CONNS
        join_all(workers)
        total = sum(w.requests for w in workers)
        assert total > 1000, f"only {total} requests"

        # Every stripe is read back through a connection that did not write it.
        verifiers = [Verifier(i, handles[(i + 1) % CONNS], expected) for i in range(CONNS)]
        for v in verifiers:
            v.start()
        join_all(verifiers)
        assert_same(nbd_read_all(handles[0], SIZE), expected, "whole image via connection 0")
        assert_same(read_file(img), expected, "whole image file")

        stats = s.control({"op": "stats"})
        assert stats["requests"]["pwrite"]["count"] == total, (stats["requests"], total)
        assert stats["requests"]["pwrite"]["bytes"] == 3 * SIZE, stats["requests"]
        assert stats["requests"]["flush"]["count"] == CONNS
        assert stats["requests"]["errors"] == 0

        # Connections close one by one and the count follows.
        for n in range(CONNS, 0, -1):
            s.disconnect(handles.pop())
            wait_until(lambda: s.control({"op": "status"})["connections"] == n - 1, 10,
                       f"connections == {n - 1}")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
