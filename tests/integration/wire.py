"""The peer protocol's wire format written out in plain Python (stdlib only),
independent of the C++ codec that the tests check: frame and payload
builders, a raw client (PeerClient) that does the HMAC handshake or breaks
it on purpose, and a fake destination that a real source migrates to.
docs/protocol.md is the reference; keep the three in step."""

import hashlib
import hmac
import json
import os
import socket
import struct
import threading
import time

import lmtest
from lmtest import KiB, MiB

# ---------------------------------------------------------------------------
# The wire format (docs/protocol.md), written out again here on purpose: the
# test must not share the codec it checks.

MAGIC = 0x4C4D4947  # "LMIG"
VERSION = 2
HEADER = struct.Struct(">IHHIQII")  # magic, version, type, flags, request_id, payload_length, crc32c
assert HEADER.size == 28

HELLO, AUTH, AUTH_OK, START, DATA, ACK, HANDOVER, PULL, CANCEL_PULL, PROGRESS, HEARTBEAT, ERROR, DONE, \
    CONTROL, CONTROL_REPLY, HANDOVER_ACK, PUSH_ACK, START_OK, SUMS, SUMS_REPLY, FORWARD, FORWARD_REPLY = range(1, 23)
MAX_TYPE = FORWARD_REPLY
TYPE_NAMES = {v: k for k, v in dict(
    HELLO=HELLO, AUTH=AUTH, AUTH_OK=AUTH_OK, START=START, DATA=DATA, ACK=ACK, HANDOVER=HANDOVER, PULL=PULL,
    CANCEL_PULL=CANCEL_PULL, PROGRESS=PROGRESS, HEARTBEAT=HEARTBEAT, ERROR=ERROR, DONE=DONE, CONTROL=CONTROL,
    CONTROL_REPLY=CONTROL_REPLY, HANDOVER_ACK=HANDOVER_ACK, PUSH_ACK=PUSH_ACK, START_OK=START_OK, SUMS=SUMS,
    SUMS_REPLY=SUMS_REPLY, FORWARD=FORWARD, FORWARD_REPLY=FORWARD_REPLY).items()}

FLAG_ZERO, FLAG_COMPRESSED, FLAG_PRIORITY, FLAG_BASE = 1, 2, 4, 8

# Error codes.
BAD_FRAME, BAD_MAGIC, BAD_VERSION, UNKNOWN_TYPE, TOO_LARGE, BAD_CRC, AUTH_FAILED, BUSY, SIZE_MISMATCH, \
    NOT_AUTHORITATIVE, PROTOCOL, INTERNAL, CANCELLED, HANDOVER_LOST, NOT_EMPTY, NO_SPACE, \
    UNKNOWN_MIGRATION, TLS_REQUIRED, NOT_COMMITTED, BASE_MISMATCH = range(1, 21)
CODE_NAMES = {1: "BadFrame", 2: "BadMagic", 3: "BadVersion", 4: "UnknownType", 5: "TooLarge", 6: "BadCrc",
              7: "AuthFailed", 8: "Busy", 9: "SizeMismatch", 10: "NotAuthoritative", 11: "Protocol",
              12: "Internal", 13: "Cancelled", 14: "HandoverLost", 15: "NotEmpty", 16: "NoSpace",
              17: "UnknownMigration", 18: "TlsRequired", 19: "NotCommitted", 20: "BaseMismatch"}

# Limits.
MAX_PRE_AUTH_PAYLOAD = 8234
MAX_CONTROL_PAYLOAD = 1048580  # 4 + 1 MiB
MAX_HANDOVER_PAYLOAD = 20 + 20 * 4 * MiB

SERVER_LABEL = b"livemig-v2 server"
CLIENT_LABEL = b"livemig-v2 client"


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data):
    """CRC-32C (Castagnoli): reflected polynomial 0x82F63B78, init and final
    XOR 0xFFFFFFFF."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283, "the test's own CRC-32C is wrong"
assert crc32c(b"") == 0


def header(ftype, payload_length, crc, flags=0, request_id=0, magic=MAGIC, version=VERSION):
    return HEADER.pack(magic, version, ftype, flags, request_id, payload_length, crc)


def frame(ftype, payload=b"", flags=0, request_id=0, **overrides):
    """A well-formed frame unless `overrides` (magic, version, length, crc) say otherwise."""
    length = overrides.pop("length", len(payload))
    crc = overrides.pop("crc", crc32c(payload))
    return header(ftype, length, crc, flags, request_id, **overrides) + payload


def string(s):
    if isinstance(s, str):
        s = s.encode()
    return struct.pack(">I", len(s)) + s


def hello_payload(nonce, purpose="control", name="lmtest-attacker", version=VERSION):
    return struct.pack(">H", version) + nonce + string(name) + string(purpose)


def control_payload(obj_or_text):
    text = obj_or_text if isinstance(obj_or_text, (str, bytes)) else json.dumps(obj_or_text)
    return string(text)


def server_mac(key, nonce_c, nonce_s):
    return hmac.new(key, SERVER_LABEL + nonce_c + nonce_s, hashlib.sha256).digest()


def client_mac(key, nonce_s, nonce_c):
    return hmac.new(key, CLIENT_LABEL + nonce_s + nonce_c, hashlib.sha256).digest()


class Frame:
    def __init__(self, raw_header, payload):
        (self.magic, self.version, self.type, self.flags, self.request_id, self.length,
         self.crc) = HEADER.unpack(raw_header)
        self.payload = payload

    def __repr__(self):
        return (f"<{TYPE_NAMES.get(self.type, self.type)} flags={self.flags:#x} id={self.request_id} "
                f"len={self.length} payload={self.payload[:80]!r}>")


def read_string(p, off):
    (n,) = struct.unpack_from(">I", p, off)
    off += 4
    assert off + n <= len(p), f"string of {n} bytes runs past the payload ({len(p)} bytes)"
    return p[off:off + n], off + n


def parse_error(f):
    assert f.type == ERROR, f"expected an ERROR frame, got {f}"
    (code,) = struct.unpack_from(">I", f.payload, 0)
    msg, end = read_string(f.payload, 4)
    assert end == len(f.payload), f"ERROR payload has {len(f.payload) - end} trailing bytes"
    return code, msg.decode(errors="replace")


class ServerHello:
    def __init__(self, f):
        assert f.type == HELLO, f"expected the server's HELLO, got {f}"
        assert f.request_id == 0, f"server HELLO carries request id {f.request_id}, expected 0"
        p = f.payload
        (self.version,) = struct.unpack_from(">H", p, 0)
        self.nonce = p[2:34]
        self.name, off = read_string(p, 34)
        self.purpose, off = read_string(p, off)
        # Nothing that depends on the key: the server proves itself only in
        # AUTH_OK, to a client that proved itself first.
        assert off == len(p), f"server HELLO has {len(p) - off} bytes after its purpose: {p!r}"
        assert self.version == VERSION


class PeerClient(lmtest.SocketClient):
    """A raw TCP connection to a peer port."""

    def __init__(self, port, timeout=10.0, sock=None):
        """Connects to the peer port, or (sock=) speaks on an accepted socket."""
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, n):
        """Reads until n bytes are buffered; False at EOF (or reset) before that."""
        while len(self.buf) < n:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return False
            self.buf += chunk
        return True

    def read_frame(self, skip_heartbeats=True):
        """The next frame, or None at EOF. Fails on a frame that is not
        itself well-formed (the plugin must never send one)."""
        while True:
            if not self._fill(28):
                assert not self.buf, f"connection closed inside a frame header: {self.buf!r}"
                return None
            raw = self.buf[:28]
            magic, version, ftype, flags, rid, length, crc = HEADER.unpack(raw)
            assert magic == MAGIC and version == VERSION, f"plugin sent a bad header {raw.hex()}"
            assert length <= 16 * MiB + 64, f"plugin sent payload length {length}"
            assert self._fill(28 + length), "connection closed inside a frame payload"
            payload = self.buf[28:28 + length]
            self.buf = self.buf[28 + length:]
            assert crc32c(payload) == crc, f"plugin sent a frame with a bad CRC: type {ftype}"
            f = Frame(raw, payload)
            if skip_heartbeats and f.type == HEARTBEAT:
                continue
            return f

    def expect_error(self, code, request_id=None, what=""):
        """The next frame is ERROR(code) (with `request_id` if given), and then
        the plugin closes the connection. Returns the message."""
        f = self.read_frame()
        assert f is not None, f"{what}: connection closed without an ERROR frame (expected {CODE_NAMES[code]})"
        got, msg = parse_error(f)
        assert got == code, (f"{what}: ERROR code {got} ({CODE_NAMES.get(got, '?')}), expected {code} "
                             f"({CODE_NAMES[code]}); message: {msg}")
        if request_id is not None:
            assert f.request_id == request_id, \
                f"{what}: ERROR carries request id {f.request_id}, expected {request_id} ({msg})"
        self.expect_eof(what)
        return msg

    def expect_eof(self, what="", timeout=10.0):
        """The plugin closes the connection (EOF or reset) within `timeout`,
        sending nothing but heartbeats first."""
        self.sock.settimeout(timeout)
        try:
            f = self.read_frame()
        except socket.timeout:
            raise AssertionError(f"{what}: the plugin did not close the connection within {timeout}s") from None
        assert f is None, f"{what}: expected the connection to close, got {f}"

    def request(self, ftype, payload=b"", flags=0, request_id=0):
        self.send(frame(ftype, payload, flags, request_id))
        return self.read_frame()


def start_handshake(port, purpose="control", nonce_c=None):
    """Connects and sends the client HELLO; returns (client, nonce_c, ServerHello)."""
    c = PeerClient(port)
    nonce_c = nonce_c if nonce_c is not None else os.urandom(32)
    c.send(frame(HELLO, hello_payload(nonce_c, purpose)))
    f = c.read_frame()
    assert f is not None, "the plugin closed the connection instead of answering HELLO"
    return c, nonce_c, ServerHello(f)


def handshake(port, key, purpose="control"):
    """A correct client: a full handshake; returns (client, auth frame bytes)."""
    c, nonce_c, sh = start_handshake(port, purpose)
    auth = frame(AUTH, client_mac(key, sh.nonce, nonce_c))
    c.send(auth)
    f = c.read_frame()
    assert f is not None and f.type == AUTH_OK and len(f.payload) == 32, f"expected AUTH_OK, got {f}"
    assert hmac.compare_digest(f.payload, server_mac(key, nonce_c, sh.nonce)), \
        "the server's AUTH_OK MAC does not verify under the right key"
    return c, auth


def control_call(c, obj_or_text, request_id):
    """Sends one CONTROL frame; returns the parsed JSON of its CONTROL_REPLY."""
    f = c.request(CONTROL, control_payload(obj_or_text), request_id=request_id)
    assert f is not None, "connection closed instead of a CONTROL_REPLY"
    assert f.type == CONTROL_REPLY, f"expected CONTROL_REPLY, got {f}"
    assert f.request_id == request_id, f"CONTROL_REPLY carries request id {f.request_id}, expected {request_id}"
    text, end = read_string(f.payload, 0)
    assert end == len(f.payload)
    return json.loads(text)


# ---------------------------------------------------------------------------
# Servers and the "still serving" check

def make_secret(dir=None, n=32):
    """A key file of n random bytes (mode 0600). The last byte is never a
    newline, which the plugin would trim."""
    path = os.path.join(dir or lmtest.tmp_dir("key"), "psk")
    key = os.urandom(n)
    while key[-1:] in (b"\n", b"\r"):
        key = key[:-1] + os.urandom(1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return path, key


def start_payload(image_size, block_size=4096, segment_size=64 * KiB, params=None, mode="precopy",
                  migration_id="lmtest-attack"):
    return (string(mode) + string(json.dumps(params or {})) + struct.pack(">QIQ", image_size, block_size, segment_size)
            + string(migration_id))


class FakeDestination:
    """A peer port on loopback that a real source migrates to: it completes
    the server side of the handshake, acknowledges START (as a destination
    that says nothing of compression would), swallows DATA (recording each
    frame's flags in `data_flags`) and answers HANDOVER with
    `on_handover(client, frame)`. Runs in a thread; `error` holds what went
    wrong there."""

    def __init__(self, key, on_handover):
        self.key, self.on_handover = key, on_handover
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.client = None
        self.error = None
        self.handed_over = threading.Event()
        self.data_flags = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.listener.settimeout(20)
            conn, _ = self.listener.accept()
            self.client = c = PeerClient(0, timeout=20, sock=conn)
            self._handshake(c)
            while True:
                f = c.read_frame()
                assert f is not None, "the source closed the link before HANDOVER"
                if f.type == START:
                    c.send(frame(START_OK, string(json.dumps({"phase": "PreCopy", "resync": False})),
                                 request_id=f.request_id))
                elif f.type == DATA:
                    self.data_flags.append(f.flags)
                elif f.type == HANDOVER:
                    self.on_handover(c, f)
                    self.handed_over.set()
                    return
        except Exception as e:  # reported by the test, not lost in the thread
            self.error = e
            self.handed_over.set()

    def _handshake(self, c):
        f = c.read_frame()
        assert f is not None and f.type == HELLO, f"expected the source's HELLO, got {f}"
        nonce_c = f.payload[2:34]
        nonce_s = os.urandom(32)
        c.send(frame(HELLO, hello_payload(nonce_s, "peer", "fake-destination")))
        f = c.read_frame()
        assert f is not None and f.type == AUTH, f"expected AUTH, got {f}"
        assert hmac.compare_digest(f.payload, client_mac(self.key, nonce_s, nonce_c)), "the source's AUTH MAC"
        c.send(frame(AUTH_OK, server_mac(self.key, nonce_c, nonce_s)))

    def close(self):
        self.thread.join(10)
        if self.client:
            self.client.close()
        self.listener.close()


