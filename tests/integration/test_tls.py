"""TLS 1.3 on the peer link (issue #13): pre-shared keys in nbdkit's
--tls-psk format and x509 certificates in QEMU's tls-creds-x509 layout;
bad credentials and mismatched ends refused at once with a message that
names the problem; a frame injected on the path rejected; TLS on the NBD
side and the peer link at once.

    LIVEMIG_PLUGIN=build/plugin/livemig.so LIVEMIG_BUILD_DIR=build PYTHONPATH=tests/integration \\
        /usr/bin/python3 -m pytest tests/integration/test_tls.py [-k NAME]
"""

import contextlib
import os
import socket
import struct
import sys
import threading

import pytest

import lmtest
import migration as mig
import tlscerts
from lmtest import MiB, Server, run_nbdkit_expect_failure
from wire import DATA, frame

SIZE = 16 * MiB
DATA_LEN = 8 * MiB
BLOCK = 4096


@contextlib.contextmanager
def pair(src_keys, dst_keys, dst_image=None):
    """A source with data and a destination (on a missing image unless
    named), stopped at the end:

        with pair(src_keys, dst_keys) as (src, dst, src_image, dst_image, data):
    """
    src_image, data = mig.make_source_image(SIZE, DATA_LEN)
    dst_image = dst_image or os.path.join(lmtest.tmp_dir("dst"), "dst.img")
    src = Server(control=True, image=src_image, listen="127.0.0.1:0", **src_keys)
    dst = Server(control=True, image=dst_image, listen="127.0.0.1:0", **dst_keys)
    try:
        src.start()
        dst.start()
        yield src, dst, src_image, dst_image, data
    finally:
        src.stop()
        dst.stop()


def migrate_reply(src, dst, to=None):
    return src.control({"op": "migrate", "mode": "precopy", "handover": "auto",
                        "to": to or f"127.0.0.1:{mig.peer_port(dst)}", "from": f"127.0.0.1:{mig.peer_port(src)}"})


def expect_done(src, dst, src_image, dst_image):
    mig.wait_phase(dst, ["Done"], timeout=60)
    lmtest.assert_same(lmtest.read_file(dst_image), lmtest.read_file(src_image), "destination image")


def expect_refused(src, dst, needle_src, needle_dst=None, to=None):
    reply = migrate_reply(src, dst, to)
    assert not reply["ok"] and needle_src in reply["error"], reply
    st = mig.status(dst)
    assert st["phase"] == "Idle" and st["size"] == 0, f"the destination took something: {st}"
    if needle_dst:
        lmtest.wait_until(lambda: needle_dst in dst.stderr(), timeout=5,
                          what=f"the destination's log to say {needle_dst!r}")


def test_a_migration_over_tls_with_a_pre_shared_key_completes():
    psk = tlscerts.psk_file()
    with pair({"tls-psk": psk}, {"tls-psk": psk}) as (src, dst, src_image, dst_image, _):
        assert mig.status(src)["tls"].startswith("psk (livemig"), mig.status(src)
        reply = migrate_reply(src, dst)
        assert reply["ok"], reply
        expect_done(src, dst, src_image, dst_image)


def test_a_migration_over_tls_with_x509_certificates_completes():
    creds = tlscerts.CA().directory()
    with pair({"tls-certificates": creds}, {"tls-certificates": creds}) as (src, dst, src_image, dst_image, _):
        assert mig.status(dst)["tls"].startswith("x509"), mig.status(dst)
        assert migrate_reply(src, dst)["ok"]
        expect_done(src, dst, src_image, dst_image)


def test_expired_unknown_and_misnamed_certificates_are_refused_by_name():
    ca = tlscerts.CA()
    good = ca.directory("good")
    cases = [
        # (what, the source's credentials, the destination's, what the source hears, what the destination logs)
        ("an expired server certificate", good,
         ca.directory("expired", not_before=tlscerts.NOW - 30 * tlscerts.DAY, not_after=tlscerts.NOW - tlscerts.DAY),
         "certificate has expired", None),
        ("a client certificate no known CA signed", ca.directory("selfsigned", signer="self"), good,
         "unknown ca", "self-signed certificate"),
        ("a server certificate for another address", good, ca.directory("otherip", ips=("10.9.9.9",)),
         "IP address mismatch", None),
        ("a CA the other side does not trust", tlscerts.CA("another CA").directory("otherca"), good,
         "certificate", None),
    ]
    for what, src_creds, dst_creds, hear, log in cases:
        with pair({"tls-certificates": src_creds}, {"tls-certificates": dst_creds}) as (src, dst, *_):
            try:
                expect_refused(src, dst, hear, log)
            except AssertionError as e:
                raise AssertionError(f"{what}: {e}") from None


def test_a_wrong_pre_shared_key_is_refused():
    with pair({"tls-psk": tlscerts.psk_file()}, {"tls-psk": tlscerts.psk_file()}) as (src, dst, *_):
        expect_refused(src, dst, "TLS")


def test_a_plaintext_end_and_a_tls_end_refuse_each_other_and_say_why():
    psk = tlscerts.psk_file()
    # TLS source, plaintext destination.
    with pair({"tls-psk": psk}, {}) as (src, dst, *_):
        expect_refused(src, dst, "does not speak TLS", "the client started TLS, but this plugin runs with tls=off")
    # Plaintext source, TLS destination.
    with pair({}, {"tls-psk": psk}) as (src, dst, *_):
        expect_refused(src, dst, "requires TLS")


def test_bad_psk_files_stop_the_plugin_with_the_reason():
    image = lmtest.make_image(MiB)
    cases = [
        (tlscerts.psk_file(text="no-colon-here\n"), "line 1: expected IDENTITY:HEXKEY"),
        (tlscerts.psk_file(text="alice:abcd\n"), "line 1: the key is 2 bytes, at least 16"),
        (tlscerts.psk_file(text="alice:" + "zz" * 16 + "\n"), "line 1: the key is not hex"),
        (tlscerts.psk_file(text=f"a:{'11' * 16}\na:{'22' * 16}\n"), "line 2: identity 'a' appears twice"),
        (tlscerts.psk_file(mode=0o644), "readable by group or others"),
    ]
    for path, needle in cases:
        rc, err = run_nbdkit_expect_failure([f"image={image}", "listen=127.0.0.1:0", f"tls-psk={path}"])
        assert rc != 0 and needle in err, f"{needle!r} not in: {err}"
    rc, err = run_nbdkit_expect_failure([f"image={image}", "listen=10.1.2.3:0", f"secret={lmtest.test_secret()}"])
    assert rc != 0 and "clear text" in err and "tls=off" in err, err


class InjectingProxy:
    """A TCP relay between a source and its destination that writes one
    forged livemig DATA frame into the source->destination stream after
    `after` bytes (an attacker on the path). Only the first connection is
    tampered with."""

    def __init__(self, target_port, forged, after=256 * 1024):
        self.target_port, self.forged, self.after = target_port, forged, after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.injected = threading.Event()
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target_port))
            self.conns += [c, u]
            tamper = not self.injected.is_set()
            threading.Thread(target=self._pipe, args=(c, u, tamper), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, False), daemon=True).start()

    def _pipe(self, a, b, tamper):
        seen = 0
        try:
            while True:
                chunk = a.recv(65536)
                if not chunk:
                    break
                b.sendall(chunk)
                seen += len(chunk)
                if tamper and seen >= self.after and not self.injected.is_set():
                    b.sendall(self.forged)
                    self.injected.set()
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.listener.close()
        for s in self.conns:
            s.close()


def test_a_data_frame_injected_on_the_path_is_rejected_and_the_image_stays_right():
    psk = tlscerts.psk_file()
    evil = b"EVIL" * (BLOCK // 4)
    forged = frame(DATA, struct.pack(">QII", 0, BLOCK, 0) + evil)
    with pair({"tls-psk": psk, "peer-timeout": 3}, {"tls-psk": psk}) as (src, dst, src_image, dst_image, data):
        with contextlib.closing(InjectingProxy(mig.peer_port(dst), forged)) as proxy:
            migrate_through(src, dst, src_image, dst_image, proxy, evil)


def migrate_through(src, dst, src_image, dst_image, proxy, evil):
    """Migrates over the tampering proxy; the forged block must not land."""
    reply = src.control({"op": "migrate", "mode": "precopy", "handover": "auto", "max_rate": 4 * MiB,
                         "to": f"127.0.0.1:{proxy.port}", "from": f"127.0.0.1:{mig.peer_port(src)}"})
    assert reply["ok"], reply
    assert proxy.injected.wait(20), "the proxy never injected its frame"
    expect_done(src, dst, src_image, dst_image)  # resumed over a new link
    assert evil not in lmtest.read_file(dst_image), "the forged block reached the destination image"
    assert "bad record mac" in dst.stderr() or "decrypt" in dst.stderr() or \
        mig.status(src)["migration"]["reconnects"] >= 1, "the tampered link was not refused"


def test_a_migration_with_tls_on_the_nbd_side_and_on_the_peer_link_loses_nothing():
    psk = tlscerts.psk_file(identity="lmtest")
    nbd_tls = ["--tls=require", f"--tls-psk={psk}"]
    src_image, _ = mig.make_source_image(SIZE, DATA_LEN)
    dst_image = os.path.join(lmtest.tmp_dir("dst"), "dst.img")
    src = Server(control=True, image=src_image, listen="127.0.0.1:0", nbdkit_args=nbd_tls, **{"tls-psk": psk}).start()
    dst = Server(control=True, image=dst_image, listen="127.0.0.1:0", nbdkit_args=nbd_tls, **{"tls-psk": psk}).start()

    def uri(server):
        return f"nbds+unix://lmtest@/?socket={server.sock}&tls-psk-file={psk}"

    try:
        journal = os.path.join(lmtest.tmp_dir("j"), "journal")
        writer = mig.Writer(uri(src), f"0:{SIZE}", journal, rate=400, duration=4, extra=["--flush-every", "32"])
        mig.migrate(src, dst, "precopy", handover="explicit")
        mig.wait_ready(src)
        assert src.control({"op": "handover"})["ok"]
        writer.switch(uri(dst))
        assert writer.wait() == 0, writer.log()
        mig.wait_phase(dst, ["Done"], timeout=60)
        rc, out = mig.verify_journal(uri(dst), journal, "--region", f"0:{SIZE}", "--initial", "any")
        assert rc == 0, out
    finally:
        src.stop()
        dst.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
