"""The plugin reads its keys' values as every nbdkit plugin does (issue 16):
sizes with nbdkit_parse_size, booleans with nbdkit_parse_bool, secret=+FILE
and secret=-FD with nbdkit_read_password. Each value of a table is first
given to nbdkit itself, to learn how nbdkit reads it: a size to
`nbdkit null size=V`, a boolean to the exportname filter's
exportname-strict=V. The plugin must then read it the same (status shows
the value; readonly=true gives a read-only export that refuses writes), or
refuse to start with nbdkit's own message and the key named. `nbdkit -r`,
the documented way to serve read-only, refuses writes as for nbdkit's file
plugin.

    LIVEMIG_PLUGIN=build/plugin/livemig.so LIVEMIG_BUILD_DIR=build PYTHONPATH=tests/integration \\
        /usr/bin/python3 -m pytest tests/integration/test_nbdkit_helpers.py [-k NAME]
"""

import errno
import os
import subprocess
import sys

import nbd
import pytest

import lmtest
from lmtest import MiB, NBDKIT, Server, expect_nbd_error, make_image, read_file, run_nbdkit_expect_failure

SIZES = ["4k", "4K", "4096", "64K", "1M", "1m", "4s", " 8192", "0x1000", "4x", "-1", "", "1.5K", "4KiB", "4kb",
         "010", "256", "2M", "99999999999999999999999", "20000000T"]
SEGMENT_SIZES = ["2m", "4096s", "64k", "1x"]
BOOLEANS = ["on", "ON", "yes", "Y", "t", "true", "1", "off", "No", "n", "f", "FALSE", "0", "maybe", "", "2", "tru"]


def nbdkit_errors(stderr):
    """nbdkit's error messages, without the "nbdkit: ... error: " prefix."""
    return [line.split("error: ", 1)[1] for line in stderr.splitlines() if "error: " in line]


def nbdkit_reads_size(value):
    """(bytes, None) if nbdkit_parse_size takes `value`, else (None, its error)."""
    p = subprocess.run([NBDKIT, "-U", "-", "null", f"size={value}", "--run", 'nbdinfo --size "$uri"'],
                       capture_output=True, text=True, timeout=30)
    if p.returncode == 0:
        return int(p.stdout), None
    errors = nbdkit_errors(p.stderr)
    assert len(errors) == 1, f"nbdkit null size={value!r}: {p.stderr}"
    return None, errors[0]


def nbdkit_reads_bool(value):
    """(True/False, None) if nbdkit_parse_bool takes `value`, else (None, its
    error). With exportname-strict true the exportname filter refuses an
    export not listed; false lets it through to the null plugin."""
    p = subprocess.run([NBDKIT, "-U", "-", "--filter=exportname", "null", "1M", "exportname=listed",
                        f"exportname-strict={value}", "--run", 'nbdinfo --size "nbd+unix:///other?socket=$unixsocket"'],
                       capture_output=True, text=True, timeout=30)
    if p.returncode == 0:
        return False, None
    if "export 'other" in p.stderr and "not found" in p.stderr:
        return True, None
    errors = nbdkit_errors(p.stderr)
    assert len(errors) == 1, f"exportname-strict={value!r}: {p.stderr}"
    return None, errors[0]


def is_livemig_size(n, largest=MiB):
    return n >= 512 and n & (n - 1) == 0 and n <= largest


def each(values, check):
    """Runs check(value) for every value and fails with every mismatch, not
    only the first."""
    wrong = []
    for v in values:
        try:
            check(v)
        except (AssertionError, lmtest.ServerDied) as e:
            wrong.append(str(e).strip())
    assert not wrong, "\n".join(wrong)


def refused_as_by_nbdkit(image, key, value, nbdkit_error, kind):
    """The plugin refuses key=value: nbdkit's own message, then livemig's
    naming the key ("block-size=4x: not a size")."""
    rc, err = run_nbdkit_expect_failure([f"image={image}", f"{key}={value}"])
    what = f"{key}={value!r} (nbdkit: {nbdkit_error!r})"
    assert rc != 0, f"{what}: the plugin started"
    assert nbdkit_error in err, f"{what}: the plugin's stderr lacks nbdkit's message:\n{err}"
    assert f"{key}={value}: not a {kind}" in err, f"{what}: the key is not named:\n{err}"


def check_size_key(key, value, image, valid, status_field):
    n, nbdkit_error = nbdkit_reads_size(value)
    what = f"{key}={value!r} (nbdkit reads {n})"
    if nbdkit_error is not None:
        refused_as_by_nbdkit(image, key, value, nbdkit_error, "size")
    elif valid(n):
        with Server(image=image, control=True, **{key: value}) as s:
            got = s.control({"op": "status"})[status_field]
            assert got == n, f"{what}: the plugin read {got}"
    else:
        # nbdkit reads it; livemig's own limits refuse it, naming the key.
        rc, err = run_nbdkit_expect_failure([f"image={image}", f"{key}={value}"])
        assert rc != 0, f"{what}: the plugin started"
        assert f"{key}=" in err, f"{what}: the key is not named:\n{err}"


def test_block_size_is_read_as_nbdkit_parse_size_reads_it():
    image = make_image(4 * MiB)
    each(SIZES, lambda value: check_size_key("block-size", value, image, is_livemig_size, "block_size"))


def test_segment_size_is_read_as_nbdkit_parse_size_reads_it():
    image = make_image(4 * MiB)
    each(SEGMENT_SIZES, lambda value: check_size_key("segment-size", value, image,
                                                     lambda n: is_livemig_size(n, 1 << 40) and n >= 4096,
                                                     "segment_size"))


def refuses_writes(s, image):
    """The export is read-only and a write sent anyway is refused by the
    server (EPERM); the image is unchanged."""
    before = read_file(image, 0, 4096)
    h = s.connect()
    assert h.is_read_only(), "the export is not read-only"
    h.set_strict_mode(0)  # send the write: the server must refuse it, not libnbd
    expect_nbd_error(lambda: h.pwrite(b"w" * 4096, 0), {errno.EPERM}, "a write to a read-only export")
    assert read_file(image, 0, 4096) == before, "the write reached the image"
    return True


def test_readonly_is_read_as_nbdkit_parse_bool_reads_it():
    image = make_image(MiB, data=b"d" * 4096)
    each(BOOLEANS, lambda value: check_readonly(value, image))


def check_readonly(value, image):
    b, nbdkit_error = nbdkit_reads_bool(value)
    what = f"readonly={value!r} (nbdkit reads {b})"
    if nbdkit_error is not None:
        refused_as_by_nbdkit(image, "readonly", value, nbdkit_error, "boolean")
    else:
        with Server(image=image, control=True, readonly=value) as s:
            assert s.control({"op": "status"})["readonly"] is b, f"{what}: status says otherwise"
            if b:
                refuses_writes(s, image)
            else:
                h = s.connect()
                assert not h.is_read_only(), f"{what}: the export is read-only"
                h.pwrite(b"d" * 4096, 0)


def test_nbdkit_r_refuses_writes_as_for_the_file_plugin():
    image = make_image(MiB, data=b"d" * 4096)
    for plugin in ("file", lmtest.plugin_path()):
        d = lmtest.tmp_dir("ro")
        sock = os.path.join(d, "nbd.sock")
        pidfile = os.path.join(d, "pid")
        proc = subprocess.Popen([NBDKIT, "-f", "--exit-with-parent", "-r", "-U", sock, "--pidfile", pidfile, plugin,
                                 f"file={image}" if plugin == "file" else f"image={image}"],
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        lmtest._live[proc.pid] = proc
        try:
            lmtest.wait_until(lambda: os.path.exists(pidfile) or proc.poll() is not None, what="nbdkit -r")
            assert proc.poll() is None, proc.stderr.read()
            h = nbd.NBD()
            h.connect_uri(f"nbd+unix:///?socket={sock}")
            assert h.is_read_only(), f"nbdkit -r {plugin}: the export is not read-only"
            h.set_strict_mode(0)
            expect_nbd_error(lambda: h.pwrite(b"w" * 4096, 0), {errno.EPERM}, f"nbdkit -r {plugin}: a write")
            expect_nbd_error(lambda: h.zero(4096, 0), {errno.EPERM}, f"nbdkit -r {plugin}: a zero")
            h.shutdown()
            del h
            assert read_file(image, 0, 4096) == b"d" * 4096, f"nbdkit -r {plugin}: the image changed"
        finally:
            lmtest._kill(proc)


def key_file(key):
    path = os.path.join(lmtest.tmp_dir("key"), "psk")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return path


def authenticates(port, path):
    p = subprocess.run([os.path.join(os.environ.get("LIVEMIG_BUILD_DIR", "build"), "client-tools", "migrate-nbd"),
                        "status", "--from", f"127.0.0.1:{port}", "--secret", path, "--json"],
                       capture_output=True, text=True, timeout=30)
    return p.returncode == 0


def test_secret_takes_nbdkit_read_password_forms_and_plain_files():
    key = os.urandom(24).hex()
    shared = key_file(key)  # what migrate-nbd reads
    stranger = key_file(os.urandom(24).hex())
    # -FD: the first line of an inherited descriptor.
    r, w = os.pipe()
    os.write(w, (key + "\n").encode())
    os.close(w)
    try:
        with Server(control=True, image=make_image(MiB), listen="127.0.0.1:0", secret=f"-{r}", pass_fds=[r]) as s:
            st = s.control({"op": "status"})
            assert st["secret_file"] == "", st
            assert authenticates(st["peer_port"], shared), "secret=-FD: the key read is not the shared key"
            assert not authenticates(st["peer_port"], stranger), "secret=-FD: another key authenticates"
    finally:
        os.close(r)
    # +FILE: the first line of a file; FILE: the key file as migrate-nbd reads it.
    for value in (f"+{shared}", shared):
        with Server(control=True, image=make_image(MiB), listen="127.0.0.1:0", secret=value) as s:
            st = s.control({"op": "status"})
            assert st["secret_file"] == shared, st
            assert authenticates(st["peer_port"], shared), f"secret={value}: the key read is not the shared key"
            assert not authenticates(st["peer_port"], stranger), f"secret={value}: another key authenticates"


def test_a_secret_nbdkit_cannot_read_or_too_short_names_the_key():
    image = make_image(MiB)
    rc, err = run_nbdkit_expect_failure([f"image={image}", "listen=127.0.0.1:0", "secret=-1000"])
    assert rc != 0 and "secret=-1000: cannot read the key" in err, err
    missing = os.path.join(lmtest.tmp_dir("nokey"), "psk")
    rc, err = run_nbdkit_expect_failure([f"image={image}", "listen=127.0.0.1:0", f"secret=+{missing}"])
    assert rc != 0 and f"open {missing}: No such file" in err and f"secret=+{missing}" in err, err
    short = key_file("short")
    rc, err = run_nbdkit_expect_failure([f"image={image}", "listen=127.0.0.1:0", f"secret=+{short}"])
    assert rc != 0 and f"secret=+{short}: the key is 5 bytes" in err, err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
