"""The peer port under attack: a raw TCP client (stdlib only) sends malformed
frames, broken handshakes and stalls to a real nbdkit serving livemig.so,
asserts the exact answer of docs/protocol.md (one ERROR frame with the right
code, then the connection closes), and then checks that the plugin is still
alive and serving: its control socket answers status, an NBD client can read
and write, and a correct client completes the HMAC handshake.

    LIVEMIG_PLUGIN=build/plugin/livemig.so PYTHONPATH=tests/integration \
        /usr/bin/python3 -m pytest tests/integration/test_peer_protocol.py [-k NAME]
"""

import hashlib
import hmac
import json
import os
import socket
import struct
import sys
import threading
import time

import pytest

import lmtest
import migration as mig
from lmtest import KiB, MiB, Server, make_image, run_nbdkit_expect_failure
from wire import *  # noqa: F401,F403 (the wire format, written out independently of the codec)

IMAGE_SIZE = 4 * MiB


def peer_server(key_path, **keys):
    return Server(control=True, image=make_image(IMAGE_SIZE), listen="127.0.0.1:0", secret=key_path, **keys)


def peer_port(s):
    st = s.control({"op": "status"})
    assert st.get("ok") is True, f"status: {st}"
    port = st["peer_port"]
    assert isinstance(port, int) and 0 < port < 65536, f"status peer_port = {port!r}"
    return port


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


_check_counter = [0]


def assert_still_serving(s, key):
    """The plugin process is alive, its control socket answers, NBD reads and
    writes work, and a correct client completes the handshake and gets a
    CONTROL_REPLY."""
    assert s.alive(), f"nbdkit died\n  stderr:\n{s.stderr()}"
    st = s.control({"op": "status"})
    assert st.get("ok") is True, f"status after the attack: {st}"
    h = s.connect()
    _check_counter[0] += 1
    off = (_check_counter[0] * 68 * KiB + 123) % (IMAGE_SIZE - 64 * KiB)
    data = os.urandom(64 * KiB)
    h.pwrite(data, off)
    h.flush()
    got = h.pread(len(data), off)
    assert got == data, f"NBD read at {off} after the attack returned other bytes"
    s.disconnect(h)
    c, _ = handshake(st["peer_port"], key)
    with c:
        reply = control_call(c, {"op": "status"}, request_id=4242)
        assert reply.get("ok") is True, f"status over the peer port: {reply}"
    assert s.alive(), f"nbdkit died\n  stderr:\n{s.stderr()}"


def assert_no_crash_logged(s):
    err = s.stderr()
    for bad in ("terminate called", "Assertion", "Segmentation", "AddressSanitizer", "runtime error"):
        assert bad not in err, f"nbdkit logged {bad!r}:\n{err}"


# ---------------------------------------------------------------------------
# Tests: malformed headers

def test_crc32c_matches_the_known_vector():
    assert crc32c(b"123456789") == 0xE3069283
    # The example frame of docs/protocol.md: a PULL of 4096 bytes at
    # 0x0102030405060708, priority 1, request id 0x1122334455667788.
    payload = bytes.fromhex("0102030405060708") + struct.pack(">IB", 4096, 1)
    f = frame(PULL, payload, flags=FLAG_PRIORITY, request_id=0x1122334455667788)
    assert f[:24].hex() == "4c4d4947" "0002" "0008" "00000004" "1122334455667788" "0000000d"
    assert f[24:28] == struct.pack(">I", crc32c(payload))


def test_garbage_instead_of_a_frame_gets_bad_magic_then_close():
    key_path, key = make_secret()
    with peer_server(key_path) as s:
        port = peer_port(s)
        garbage = [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00",  # a stray HTTP client (28 bytes)
            b"\x00" * 28,
            b"LMIX" + os.urandom(24),
            b"GMIL" + header(HELLO, 0, 0)[4:],  # byte-swapped magic
            b"SSH-2.0-OpenSSH_9.2p1 Debi\r\n",
        ]
        for g in garbage:
            assert len(g) == 28, (g, len(g))
            with PeerClient(port) as c:
                c.send(g)  # exactly one header's worth: nothing left unread to turn the close into a reset
                msg = c.expect_error(BAD_MAGIC, request_id=0, what=f"garbage {g!r}")
                assert "magic" in msg, msg
        assert_still_serving(s, key)
        assert_no_crash_logged(s)


def test_unsupported_version_gets_bad_version():
    key_path, key = make_secret()
    with peer_server(key_path) as s:
        port = peer_port(s)
        for v in (0, 1, 3, 0x0100, 0xFFFF):
            with PeerClient(port) as c:
                p = hello_payload(os.urandom(32))
                c.send(header(HELLO, len(p), crc32c(p), version=v))
                c.expect_error(BAD_VERSION, what=f"version {v}")
        # After authentication too.
        c, _ = handshake(port, key)
        with c:
            c.send(header(CONTROL, 0, 0, version=1, request_id=9))
            c.expect_error(BAD_VERSION, what="version 1 after the handshake")
        assert_still_serving(s, key)


def test_unknown_frame_type_gets_unknown_type():
    key_path, key = make_secret()
    with peer_server(key_path) as s:
        port = peer_port(s)
        for t in (0, MAX_TYPE + 1, 0x100, 0xFFFF):
            with PeerClient(port) as c:
                c.send(header(t, 0, 0))
                c.expect_error(UNKNOWN_TYPE, what=f"type {t} before the handshake")
        c, _ = handshake(port, key, purpose="peer")
        with c:
            c.send(header(MAX_TYPE + 1, 0, 0, request_id=5))
            c.expect_error(UNKNOWN_TYPE, what=f"type {MAX_TYPE + 1} on an authenticated peer link")
        assert_still_serving(s, key)


def test_flags_a_type_does_not_allow_get_bad_frame():
    key_path, key = make_secret()
    with peer_server(key_path) as s:
        port = peer_port(s)
        nonce = os.urandom(32)
        for flags in (FLAG_ZERO, FLAG_PRIORITY, 0x80000000, 0xFFFFFFFF):
            with PeerClient(port) as c:
                p = hello_payload(nonce)
                c.send(header(HELLO, len(p), crc32c(p), flags=flags))  # the payload stays unread
                c.expect_error(BAD_FRAME, what=f"HELLO with flags {flags:#x}")
        # After authentication: PULL may carry PRIORITY only, DATA only
        # ZERO/COMPRESSED/BASE, CONTROL nothing.
        for ftype, flags in ((PULL, FLAG_ZERO), (DATA, FLAG_PRIORITY), (DATA, 16), (CONTROL, FLAG_ZERO)):
            purpose = "control" if ftype == CONTROL else "peer"
            c, _ = handshake(port, key, purpose=purpose)
            with c:
                c.send(header(ftype, 0, 0, flags=flags, request_id=77))
                c.expect_error(BAD_FRAME, what=f"{TYPE_NAMES[ftype]} with flags {flags:#x}")
        assert_still_serving(s, key)


def test_oversized_payload_length_gets_too_large_without_allocating():
    key_path, key = make_secret()
    with peer_server(key_path) as s:
        port = peer_port(s)
        rss_before = rss_kib(s.pid)
        # Before authentication: a HELLO of almost 4 GiB, a HELLO one byte
        # over its limit, and a CONTROL within its type's limit but over the
        # pre-authentication limit. Only the header is sent: the ERROR must
        # come without the plugin waiting for (or allocating) the payload.
        for ftype, length in ((HELLO, 0xFFFFFFF0), (HELLO, 0xFFFFFFFF), (HELLO, MAX_PRE_AUTH_PAYLOAD + 1),
                              (AUTH, 33), (CONTROL, MAX_CONTROL_PAYLOAD), (HANDOVER, MAX_HANDOVER_PAYLOAD)):
            with PeerClient(port) as c:
                c.send(header(ftype, length, 0))
                msg = c.expect_error(TOO_LARGE, what=f"pre-auth {TYPE_NAMES[ftype]} of {length} bytes")
                assert str(length) in msg, msg
        # After authentication, on a control and on a peer link.
        for purpose, ftype, length in (("control", CONTROL, 0xFFFFFFF0), ("control", CONTROL, MAX_CONTROL_PAYLOAD + 1),
                                       ("peer", DATA, 0xFFFFFFF0), ("peer", HANDOVER, 0xFFFFFFF0),
                                       ("peer", HANDOVER, MAX_HANDOVER_PAYLOAD + 1), ("peer", PULL, 14)):
            c, _ = handshake(port, key, purpose=purpose)
            with c:
                c.send(header(ftype, length, 0, request_id=31))
                c.expect_error(TOO_LARGE, what=f"{purpose} link: {TYPE_NAMES[ftype]} of {length} bytes")
        rss_after = rss_kib(s.pid)
        assert rss_after - rss_before < 64 * 1024, \
            f"nbdkit RSS grew from {rss_before} KiB to {rss_after} KiB after oversized length fields"
        assert_still_serving(s, key)


def test_payload_with_a_wrong_crc_gets_bad_crc():
    key_path, key = make_secret()
    with peer_server(key_path) as s:
        port = peer_port(s)
        p = hello_payload(os.urandom(32))
        good = crc32c(p)
        for crc in (good ^ 1, 0, 0xFFFFFFFF if good != 0xFFFFFFFF else 1):
            with PeerClient(port) as c:
                c.send(header(HELLO, len(p), crc) + p)
                c.expect_error(BAD_CRC, what=f"HELLO with CRC {crc:#x} (right: {good:#x})")
        # One flipped payload bit under the right header CRC.
        with PeerClient(port) as c:
            bad = bytearray(p)
            bad[10] ^= 0x40
            c.send(header(HELLO, len(p), good) + bytes(bad))
            c.expect_error(BAD_CRC, what="HELLO with a flipped bit")
        # Empty payload: the CRC must be 0.
        with PeerClient(port) as c:
            c.send(header(AUTH_OK, 0, 0x12345678))
            c.expect_error(BAD_CRC, what="empty payload with a non-zero CRC")
        # After authentication: a CONTROL {"op":"status"} whose CRC is wrong
        # is refused, not executed.
        c, _ = handshake(port, key)
        with c:
            cp = control_payload({"op": "status"})
            c.send(header(CONTROL, len(cp), crc32c(cp) ^ 0x80000000, request_id=12) + cp)
            c.expect_error(BAD_CRC, request_id=12, what="CONTROL with a wrong CRC")
        assert_still_serving(s, key)


def test_truncated_frames_then_client_close_do_not_crash():
    key_path, key = make_secret()
    with peer_server(key_path) as s:
        port = peer_port(s)
        p = hello_payload(os.urandom(32))
        full = frame(HELLO, p)
        cuts = [1, 10, 27, 28, 29, len(full) - 1]
        for cut in cuts:
            # The client closes at once.
            c = PeerClient(port)
            c.send(full[:cut])
            c.close()
            # The client half-closes: the plugin sees EOF inside a frame. It
            # may say why (an ERROR frame); then it must close its side.
            with PeerClient(port) as c:
                c.send(full[:cut])
                c.sock.shutdown(socket.SHUT_WR)
                f = c.read_frame()
                if f is not None:
                    parse_error(f)
                    c.expect_eof(f"half-closed after {cut} bytes")
        # Truncated frames after authentication, on both kinds of link.
        for purpose in ("control", "peer"):
            cp = control_payload({"op": "status"})
            for cut in (5, 28, 30):
                c, _ = handshake(port, key, purpose=purpose)
                c.send(frame(CONTROL, cp, request_id=3)[:cut])
                c.close()
                c, _ = handshake(port, key, purpose=purpose)
                with c:
                    c.send(frame(CONTROL, cp, request_id=3)[:cut])
                    c.sock.shutdown(socket.SHUT_WR)
                    while (f := c.read_frame()) is not None:
                        assert f.type == ERROR, f"after a truncated frame: {f}"
        # A frame whose payload is shorter than its own fields (a HELLO cut
        # inside its strings, with a CRC that matches what was sent).
        with PeerClient(port) as c:
            c.send(frame(HELLO, p[:40]))
            c.expect_error(BAD_FRAME, what="HELLO payload cut inside its fields")
        with PeerClient(port) as c:
            c.send(frame(HELLO, p + b"\x00"))
            c.expect_error(BAD_FRAME, what="HELLO payload with a trailing byte")
        time.sleep(0.2)
        assert_still_serving(s, key)
        assert_no_crash_logged(s)


# ---------------------------------------------------------------------------
# Tests: authentication

def test_wrong_secret_gets_auth_failed_and_no_server_mac():
    """Issue #13: the server's MAC is sent only to a client that proved it
    holds the key (an offline guessing oracle otherwise)."""
    key_path, key = make_secret()
    wrong = bytes(b ^ 0x5A for b in key)
    with peer_server(key_path) as s:
        port = peer_port(s)
        for purpose in ("control", "peer"):
            c, nonce_c, sh = start_handshake(port, purpose)  # ServerHello checks: no MAC in it
            with c:
                c.send(frame(AUTH, client_mac(wrong, sh.nonce, nonce_c)))
                c.expect_error(AUTH_FAILED, request_id=0, what=f"AUTH under a wrong key ({purpose})")
            # The right key gets the server's MAC in AUTH_OK, as documented.
            c, _ = handshake(port, key, purpose)
            c.close()
        # Wrong MACs of other shapes: all zero, the right key with the nonces
        # swapped, the server label, and the right MAC with one bit flipped.
        shapes = {
            "all zero": lambda nc, ns: bytes(32),
            "nonces swapped": lambda nc, ns: client_mac(key, nc, ns),
            "server label": lambda nc, ns: server_mac(key, ns, nc),
            "one bit flipped": lambda nc, ns: bytes([client_mac(key, ns, nc)[0] ^ 1]) + client_mac(key, ns, nc)[1:],
        }
        for name, make in shapes.items():
            c, nonce_c, sh = start_handshake(port)
            with c:
                c.send(frame(AUTH, make(nonce_c, sh.nonce)))
                c.expect_error(AUTH_FAILED, what=f"AUTH MAC {name}")
        assert_still_serving(s, key)
        assert_no_crash_logged(s)


def test_replayed_auth_from_another_session_gets_auth_failed():
    key_path, key = make_secret()
    with peer_server(key_path) as s:
        port = peer_port(s)
        # Session 1, recorded by an eavesdropper: the client HELLO and AUTH.
        c, nonce_c, sh1 = start_handshake(port)
        auth = frame(AUTH, client_mac(key, sh1.nonce, nonce_c))
        c.send(auth)
        f = c.read_frame()
        assert f is not None and f.type == AUTH_OK, f"session 1: {f}"
        c.close()
        # Session 2: the recorded HELLO (same nonce_c) and then the recorded AUTH.
        c, _, sh2 = start_handshake(port, nonce_c=nonce_c)
        with c:
            assert sh2.nonce != sh1.nonce, "the server reused its nonce across sessions"
            c.send(auth)
            c.expect_error(AUTH_FAILED, what="replayed AUTH")
        # Session 3: a fresh client HELLO, the recorded AUTH.
        c, _, _ = start_handshake(port)
        with c:
            c.send(auth)
            c.expect_error(AUTH_FAILED, what="replayed AUTH after a fresh HELLO")
        assert_still_serving(s, key)


def test_reflected_server_mac_gets_auth_failed():
    key_path, key = make_secret()
    with peer_server(key_path) as s:
        port = peer_port(s)
        # Session A: a real client's AUTH_OK gives away the server MAC for
        # (nonce_a, sha.nonce). Reflected as the client AUTH of a session B
        # whose nonces are the same ones swapped, it must not verify.
        a, nonce_a, sha = start_handshake(port)
        with a:
            a.send(frame(AUTH, client_mac(key, sha.nonce, nonce_a)))
            f = a.read_frame()
            assert f is not None and f.type == AUTH_OK, f
            server_mac_a = f.payload
        b, _, shb = start_handshake(port, nonce_c=sha.nonce)
        with b:
            b.send(frame(AUTH, server_mac_a))
            b.expect_error(AUTH_FAILED, what="a server MAC reflected as a client AUTH")
        assert_still_serving(s, key)


def test_frames_other_than_hello_before_authentication_are_refused_and_not_executed():
    key_path, key = make_secret()
    trap = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # the "destination" a migrate would dial
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    trap.settimeout(0.5)
    try:
        with peer_server(key_path) as s:
            port = peer_port(s)
            before = s.control({"op": "status"})
            migrate = {"op": "migrate", "mode": "precopy", "to": f"127.0.0.1:{trap.getsockname()[1]}"}

            # A CONTROL frame as the very first frame.
            with PeerClient(port) as c:
                c.send(frame(CONTROL, control_payload(migrate), request_id=1))
                c.expect_error(PROTOCOL, what="CONTROL before HELLO")
            # A CONTROL frame after HELLO, in place of AUTH.
            c, _, _ = start_handshake(port)
            with c:
                c.send(frame(CONTROL, control_payload(migrate), request_id=2))
                c.expect_error(PROTOCOL, what="CONTROL in place of AUTH")
            # Every other type as the first frame (valid payloads where it
            # matters; the plugin must refuse them before it parses further).
            firsts = [
                (AUTH, os.urandom(32), 0),
                (AUTH_OK, os.urandom(32), 0),
                (HEARTBEAT, struct.pack(">QQ", 1, 2), 0),
                (PULL, struct.pack(">QIB", 0, 4096, 1), FLAG_PRIORITY),
                (DATA, struct.pack(">QII", 0, 4096, FLAG_ZERO), FLAG_ZERO),
                (DONE, struct.pack(">QQ", 0, 0), 0),
                (ERROR, struct.pack(">I", 11) + string("x"), 0),
                (HANDOVER_ACK, struct.pack(">Q", 1), 0),
            ]
            for ftype, payload, flags in firsts:
                with PeerClient(port) as c:
                    c.send(frame(ftype, payload, flags=flags))
                    c.expect_error(PROTOCOL, what=f"{TYPE_NAMES[ftype]} as the first frame")
            # A zero-flag DATA write before authentication must not have
            # touched the image.
            h = s.connect()
            assert h.pread(4096, 0) == bytes(4096)
            s.disconnect(h)
            # A version-1 client HELLO (a MAC marker after the purpose), a
            # second HELLO in place of AUTH, and an unknown purpose.
            with PeerClient(port) as c:
                c.send(frame(HELLO, hello_payload(os.urandom(32)) + b"\x01" + os.urandom(32)))
                c.expect_error(BAD_FRAME, what="client HELLO with trailing bytes")
            c, _, _ = start_handshake(port)
            with c:
                c.send(frame(HELLO, hello_payload(os.urandom(32))))
                c.expect_error(PROTOCOL, what="a second HELLO in place of AUTH")
            with PeerClient(port) as c:
                c.send(frame(HELLO, hello_payload(os.urandom(32), purpose="admin")))
                c.expect_error(BAD_FRAME, what="HELLO with purpose 'admin'")

            # The migrate was never run: no connection reached the trap and
            # the status shows no migration.
            try:
                conn, _ = trap.accept()
                conn.close()
                raise AssertionError("a pre-authentication CONTROL migrate dialled the destination")
            except socket.timeout:
                pass
            after = s.control({"op": "status"})
            assert "migration" not in after, f"status shows a migration: {after}"
            for k in ("role", "phase", "io_mode", "authoritative"):
                assert after.get(k) == before.get(k), f"status {k} changed: {before.get(k)} -> {after.get(k)}"
            assert after["role"] == "none", after

            # The same request once authenticated does dial the destination,
            # so the refusals above were not vacuous.
            c, _ = handshake(port, key)
            with c:
                c.send(frame(CONTROL, control_payload(migrate), request_id=3))
                trap.settimeout(10)
                conn, _ = trap.accept()
                conn.close()  # the "destination" hangs up: the migrate fails
                c.sock.settimeout(30)
                f = c.read_frame()
                assert f is not None and f.type == CONTROL_REPLY and f.request_id == 3, f
                reply = json.loads(read_string(f.payload, 0)[0])
                assert reply.get("ok") is False, f"migrate to a hung-up destination: {reply}"
            assert_still_serving(s, key)
    finally:
        trap.close()


# ---------------------------------------------------------------------------
# Tests: an authenticated control connection

def test_control_connection_answers_control_frames():
    key_path, key = make_secret()
    with peer_server(key_path) as s:
        port = peer_port(s)
        c, _ = handshake(port, key)
        with c:
            reply = control_call(c, {"op": "status"}, request_id=0x0102030405060708)
            assert reply.get("ok") is True, reply
            assert reply.get("peer_port") == port, reply
            # Invalid JSON, a non-object, an unknown op: ok=false, same id,
            # and the connection stays open for the next request.
            for i, text in enumerate(('{"op": "status"', "not json at all", "[1,2,3]", '{"op": "frobnicate"}',
                                      "", '{"op": 7}')):
                reply = control_call(c, text, request_id=100 + i)
                assert reply.get("ok") is False, f"CONTROL {text!r} -> {reply}"
                assert isinstance(reply.get("error"), str) and reply["error"], reply
            reply = control_call(c, {"op": "stats"}, request_id=200)
            assert reply.get("ok") is True, reply
            # Two requests in flight: each reply carries its own id.
            c.send(frame(CONTROL, control_payload({"op": "status"}), request_id=301) +
                   frame(CONTROL, control_payload({"op": "stats"}), request_id=302))
            ids = set()
            for _ in range(2):
                f = c.read_frame()
                assert f is not None and f.type == CONTROL_REPLY, f
                ids.add(f.request_id)
            assert ids == {301, 302}, ids
            # A CONTROL whose string length disagrees with the payload: BadFrame.
            bad = struct.pack(">I", 100) + b'{"op":"status"}'
            c.send(frame(CONTROL, bad, request_id=400))
            c.expect_error(BAD_FRAME, request_id=400, what="CONTROL string longer than its payload")
        # A DATA frame on a control connection: ERROR(Protocol), then close.
        c, _ = handshake(port, key)
        with c:
            data = struct.pack(">QII", 0, 4096, 0) + b"\xAB" * 4096
            c.send(frame(DATA, data, request_id=77))
            c.expect_error(PROTOCOL, request_id=77, what="DATA on a control connection")
        h = s.connect()
        assert h.pread(4096, 0) == bytes(4096), "a DATA frame on a control connection wrote the image"
        s.disconnect(h)
        # Other non-CONTROL frames too.
        for ftype, payload, flags in ((PULL, struct.pack(">QIB", 0, 4096, 0), 0), (AUTH, os.urandom(32), 0),
                                      (HELLO, hello_payload(os.urandom(32)), 0)):
            c, _ = handshake(port, key)
            with c:
                c.send(frame(ftype, payload, flags=flags, request_id=78))
                c.expect_error(PROTOCOL, what=f"{TYPE_NAMES[ftype]} on a control connection")
        assert_still_serving(s, key)
        assert_no_crash_logged(s)


def test_peer_link_refuses_frames_at_the_wrong_time_with_an_error():
    key_path, key = make_secret()
    with peer_server(key_path) as s:
        port = peer_port(s)
        before = s.control({"op": "status"})
        # Frames an idle plugin does not expect on a peer link.
        for ftype, payload in ((CONTROL, control_payload({"op": "status"})), (AUTH, os.urandom(32)),
                               (HELLO, hello_payload(os.urandom(32))), (HANDOVER_ACK, struct.pack(">Q", 1))):
            c, _ = handshake(port, key, purpose="peer")
            with c:
                c.send(frame(ftype, payload, request_id=55))
                c.expect_error(PROTOCOL, request_id=55, what=f"{TYPE_NAMES[ftype]} on an idle peer link")
        # START that cannot be honoured: a resume of a migration this side
        # never had, and a geometry that does not match.
        c, _ = handshake(port, key, purpose="peer")
        with c:
            c.send(frame(START, start_payload(IMAGE_SIZE, params={"resume": True}), request_id=56))
            c.expect_error(UNKNOWN_MIGRATION, request_id=56, what="START resume of an unknown migration")
        c, _ = handshake(port, key, purpose="peer")
        with c:
            c.send(frame(START, start_payload(IMAGE_SIZE, block_size=8192), request_id=57))
            c.expect_error(SIZE_MISMATCH, request_id=57, what="START with another block size")
        c, _ = handshake(port, key, purpose="peer")
        with c:
            c.send(frame(START, start_payload(IMAGE_SIZE + 4096), request_id=58))
            c.expect_error(SIZE_MISMATCH, request_id=58, what="START with another image size")
        after = s.control({"op": "status"})
        for k in ("role", "phase", "io_mode", "authoritative"):
            assert after.get(k) == before.get(k), f"status {k} changed: {before.get(k)} -> {after.get(k)}"
        assert_still_serving(s, key)
        assert_no_crash_logged(s)


# ---------------------------------------------------------------------------
# Tests: a fake destination drives a real source

def test_a_done_handled_before_the_handover_call_returns_leaves_the_source_done():
    # A destination with nothing to fetch sends DONE right after HANDOVER_ACK.
    # The source's link thread can handle that DONE before its migration
    # thread, woken by the ACK, records the handover (seen under load in
    # tests/bench/run: the source stuck in PostCopy while the destination was
    # Done). Sending DONE before the ACK forces that order.
    key_path, key = make_secret()
    with peer_server(key_path) as s:
        def done_then_ack(c, f):
            c.send(frame(DONE, struct.pack(">QQ", 0, IMAGE_SIZE // 4096)))
            time.sleep(0.2)   # the DONE is handled first
            c.send(frame(HANDOVER_ACK, f.payload[:8], request_id=f.request_id))

        fake = FakeDestination(key, done_then_ack)
        try:
            reply = s.control({"op": "migrate", "mode": "precopy", "handover": "auto",
                               "to": f"127.0.0.1:{fake.port}", "from": f"127.0.0.1:{peer_port(s)}"})
            assert reply.get("ok") is True, f"migrate to the fake destination: {reply}"
            assert fake.handed_over.wait(30), "the source sent no HANDOVER within 30 s"
            assert fake.error is None, f"fake destination: {fake.error!r}"
            st = mig.wait_phase(s, ["Done"], timeout=5)
            assert st["migration"]["handover_pause_ms"] >= 0, st
            assert st["fenced"], f"a source that handed over must stay fenced: {st}"
            time.sleep(0.3)
            assert s.control({"op": "status"})["phase"] == "Done", "the source left Done"
        finally:
            fake.close()
        assert_no_crash_logged(s)


# ---------------------------------------------------------------------------
# Tests: start-up refusals

def test_non_loopback_listen_without_secret_refuses_to_start():
    img = make_image(IMAGE_SIZE)
    for listen in ("0.0.0.0:0", "0.0.0.0:10809", "[::]:10809"):
        rc, err = run_nbdkit_expect_failure([f"image={img}", f"listen={listen}"])
        assert rc != 0, f"listen={listen} without secret= started (rc {rc})"
        assert "listen" in err and "secret" in err, f"listen={listen}: message names neither listen nor secret:\n{err}"
        assert listen in err, f"the message does not name {listen}:\n{err}"


def test_missing_or_short_secret_file_refuses_to_start():
    img = make_image(IMAGE_SIZE)
    d = lmtest.tmp_dir("keys")
    missing = os.path.join(d, "no-such-key")
    short = os.path.join(d, "short-key")
    with open(short, "wb") as f:
        f.write(os.urandom(15).replace(b"\n", b"x"))
    short_nl = os.path.join(d, "short-key-newline")  # 16 bytes on disk, 15 after the newline is trimmed
    with open(short_nl, "wb") as f:
        f.write(b"0123456789abcde\n")
    empty = os.path.join(d, "empty-key")
    open(empty, "wb").close()
    for path in (missing, short, short_nl, empty, d):  # d: a directory, not a key file
        for listen in ("127.0.0.1:0", "0.0.0.0:0"):
            # tls=off: the secret file must be checked on a wildcard listen too,
            # not hidden behind the "non-loopback needs TLS" refusal.
            rc, err = run_nbdkit_expect_failure([f"image={img}", f"listen={listen}", f"secret={path}", "tls=off"])
            assert rc != 0, f"secret={path} started (rc {rc})"
            assert path in err, f"secret={path}: the message does not name the path:\n{err}"


# ---------------------------------------------------------------------------
# Tests: stalls

def test_slow_loris_is_closed_after_the_handshake_timeout_and_others_are_served():
    key_path, key = make_secret()
    with peer_server(key_path, **{"peer-timeout": "2"}) as s:
        port = peer_port(s)
        t0 = time.monotonic()
        silent = [PeerClient(port) for _ in range(20)]  # connect, send nothing
        partial = PeerClient(port)
        partial.send(frame(HELLO, hello_payload(os.urandom(32)))[:20])  # half a header
        stalled, _, _ = start_handshake(port)  # HELLO, then never AUTH
        loris = silent + [partial, stalled]
        try:
            # While they stall, a correct client is served at once.
            c, _ = handshake(port, key)
            with c:
                assert control_call(c, {"op": "status"}, request_id=1)["ok"] is True
            assert time.monotonic() - t0 < 1.5, "a correct client waited behind the stalled ones"
            for i, l in enumerate(loris):
                l.sock.settimeout(8)
                try:
                    while (f := l.read_frame()) is not None:
                        assert f.type == ERROR, f"stalled client {i} got {f}"
                except socket.timeout:
                    raise AssertionError(f"stalled client {i} still open {time.monotonic() - t0:.1f}s "
                                         "after connecting (peer-timeout=2)") from None
            elapsed = time.monotonic() - t0
            assert 1.5 <= elapsed < 6, f"stalled clients closed after {elapsed:.2f}s, peer-timeout=2"
        finally:
            for l in loris:
                l.close()
        # An authenticated client that goes silent (no frames, not even
        # heartbeats) is dropped too; one that sends heartbeats stays.
        quiet, _ = handshake(port, key)
        chatty, _ = handshake(port, key)
        with quiet, chatty:
            t1 = time.monotonic()
            seq = 0
            quiet.sock.settimeout(0.25)
            closed_at = None
            while time.monotonic() - t1 < 8 and closed_at is None:
                seq += 1
                chatty.send(frame(HEARTBEAT, struct.pack(">QQ", seq, time.monotonic_ns())))
                try:
                    if quiet.read_frame() is None:
                        closed_at = time.monotonic() - t1
                except socket.timeout:
                    pass
            assert closed_at is not None, "a silent authenticated client was not dropped within 8s (peer-timeout=2)"
            assert closed_at >= 1.5, f"silent client dropped after only {closed_at:.2f}s"
            assert control_call(chatty, {"op": "status"}, request_id=2)["ok"] is True
        assert_still_serving(s, key)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
