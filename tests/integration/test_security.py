"""Who may control a plugin (issue #13): there is no fixed or shared key.
A plugin listening on loopback without secret= makes a random key in a 0600
file beside its state; whoever cannot read that file cannot authenticate,
so cannot steer the plugin or receive its disk.

    LIVEMIG_PLUGIN=build/plugin/livemig.so LIVEMIG_BUILD_DIR=build PYTHONPATH=tests/integration \\
        /usr/bin/python3 -m pytest tests/integration/test_security.py [-k NAME]
"""

import os
import resource
import socket
import stat
import subprocess
import sys
import time

import pytest

import lmtest
import migration as mig
from lmtest import MiB, Server, make_image
from wire import AUTH, AUTH_FAILED, INTERNAL, START, client_mac, frame, handshake, start_handshake, start_payload

# The key every plugin without secret= used before issue #13: public knowledge.
OLD_FIXED_KEY = b"livemig-loopback-without-secret"


def migrate_nbd():
    return os.path.join(os.environ.get("LIVEMIG_BUILD_DIR", "build"), "client-tools", "migrate-nbd")


def test_a_plugin_without_secret_makes_a_private_random_key_and_the_old_fixed_key_is_refused():
    image = make_image(4 * MiB)
    with Server(control=True, image=image, listen="127.0.0.1:0", secret=None) as s:
        st = s.control({"op": "status"})
        key_path = st["secret_file"]
        assert key_path == image + ".livemig-key", st
        mode = stat.S_IMODE(os.stat(key_path).st_mode)
        assert mode == 0o600, f"{key_path} has mode {mode:o}"
        key = open(key_path, "rb").read().rstrip(b"\n")
        assert len(key) == 64 and key != OLD_FIXED_KEY, key
        port = st["peer_port"]
        # Anyone who knew the old built-in key could control the plugin.
        c, nonce_c, sh = start_handshake(port, "control")
        with c:
            c.send(frame(AUTH, client_mac(OLD_FIXED_KEY, sh.nonce, nonce_c)))
            c.expect_error(AUTH_FAILED, what="the old fixed loopback key")
        # The file's key works (for whoever can read it: root, here).
        p = subprocess.run([migrate_nbd(), "status", "--from", f"127.0.0.1:{port}", "--secret", key_path, "--json"],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
    # The same key after a restart: the file is kept, not replaced.
    with Server(control=True, image=image, listen="127.0.0.1:0", secret=None) as s:
        assert open(s.control({"op": "status"})["secret_file"], "rb").read().rstrip(b"\n") == key


def test_a_local_user_who_cannot_read_the_key_cannot_control_the_plugin():
    victim = mig.make_source_image(4 * MiB, 1 * MiB)[0]
    with Server(control=True, image=victim, listen="127.0.0.1:0", secret=None) as s:
        st = s.control({"op": "status"})
        port, key_path = st["peer_port"], st["secret_file"]
        as_nobody = ["runuser", "-u", "nobody", "--"]
        env = {k: v for k, v in os.environ.items() if k != "LIVEMIG_SECRET_FILE"}
        # Pointing at the plugin's key file does not help: it is 0600 root.
        p = subprocess.run([*as_nobody, migrate_nbd(), "status", "--from", f"127.0.0.1:{port}", "--secret", key_path],
                           capture_output=True, text=True, timeout=30, env=env)
        assert p.returncode == 1, p
        assert "Permission denied" in p.stderr or "cannot" in p.stderr, p.stderr
        # Nor does starting a migration of the victim's disk to a listener of
        # one's own: without a key, nothing is sent.
        p = subprocess.run([*as_nobody, migrate_nbd(), "start", "--from", f"127.0.0.1:{port}",
                            "--to", "127.0.0.1:9", "--mode", "precopy"],
                           capture_output=True, text=True, timeout=30, env=env)
        assert p.returncode == 1 and "no key" in p.stderr, p
        st = s.control({"op": "status"})
        assert st["phase"] == "Idle" and st["authoritative"] and not st["fenced"], st


def test_a_start_for_an_impossible_size_is_refused_and_leaves_the_destination_as_it_was():
    """Issue #13: a resize to a peer-chosen size whose heat-map allocation
    threw left the old geometry's counters indexed out of bounds."""
    key_path = lmtest.test_secret()
    key = open(key_path, "rb").read().rstrip(b"\n")
    dst_image = os.path.join(lmtest.tmp_dir("dst"), "d.img")  # missing: any size is taken
    src_image, data = mig.make_source_image(8 * MiB, 4 * MiB)
    with Server(control=True, image=dst_image, listen="127.0.0.1:0") as dst, \
            Server(control=True, image=src_image, listen="127.0.0.1:0") as src:
        port = mig.peer_port(dst)
        c, _ = handshake(port, key, purpose="peer")
        with c:
            params = {"to": f"127.0.0.1:{port}", "from": "127.0.0.1:9"}
            c.send(frame(START, start_payload(1 << 60, params=params, migration_id="huge"), request_id=7))
            msg = c.expect_error(INTERNAL, request_id=7, what="START for a 1 EiB image")
            # Refused by the explicit cap, before any allocation (an allocator
            # need not report failure: overcommit, ASan).
            assert "out of memory" in msg and "MiB allowed" in msg, msg
        st = dst.control({"op": "status"})
        assert st["size"] == 0 and st["phase"] == "Idle" and st["authoritative"], st
        h = dst.connect()
        assert h.get_size() == 0
        dst.disconnect(h)
        mig.migrate(src, dst, "precopy", handover="auto")  # a sane START still works
        mig.wait_phase(dst, ["Done"], timeout=60)
        lmtest.assert_same(lmtest.read_file(dst_image), lmtest.read_file(src_image), "destination image")


def cpu_seconds(pid):
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_eleven_hundred_idle_connections_neither_exhaust_nor_spin_the_plugin():
    """Issue #13: ~1,000 idle TCP connections exhausted the plugin's 1,024
    descriptors, and its accept loops then spun on EMFILE: status and NBD
    reads got no answer, nbdkit used 199% CPU."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))  # the attacker holds more
    s = Server(control=True, image=make_image(4 * MiB), listen="127.0.0.1:0").start()
    # The default limit of 1,024 descriptors (nbdkit raises its soft limit
    # to the hard one at start-up, so both are set, after that).
    resource.prlimit(s.pid, resource.RLIMIT_NOFILE, (1024, 1024))
    idle = []
    try:
        port = s.control({"op": "status"})["peer_port"]
        h = s.connect()
        for _ in range(1100):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break  # the listen backlog is full: the attacker cannot even queue more
        assert len(idle) >= 200, f"only {len(idle)} connections could be opened"
        time.sleep(1)
        cpu0 = cpu_seconds(s.pid)
        t0 = time.monotonic()
        st = s.control({"op": "status"})
        assert st["ok"] and time.monotonic() - t0 < 1.0, f"status took {time.monotonic() - t0:.2f} s"
        assert h.pread(4096, 0) == bytes(4096)
        time.sleep(2)
        used = (cpu_seconds(s.pid) - cpu0) / (time.monotonic() - t0)
        assert used < 0.05, f"nbdkit used {used:.0%} of a CPU with {len(idle)} idle connections"
        # And a real peer still gets through once strangers give up (the
        # plugin sees their handshakes end as it drains its accept queue).
        for c in idle:
            c.close()
        idle.clear()
        time.sleep(1)
        p = subprocess.run([migrate_nbd(), "status", "--from", f"127.0.0.1:{port}", "--json"],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        s.disconnect(h)
    finally:
        for c in idle:
            c.close()
        s.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
