"""livemigd refuses bad submissions with a clear error and exit status 1
(2 for a bad command line), and queues nothing for them.

Each test starts its own plugins (loopback TCP) and its own livemigd, and
kills them by PID at the end, also on failure."""

import socket
import sys
import threading

import pytest

import lmtest
from lmtest import MiB
from daemonlib import Export, Livemigd, free_port


def refused(d, *args, status=1):
    """Runs submit, checks its exit status and returns its stderr."""
    r = d.cli("submit", *args)
    assert r.returncode == status, f"exit {r.returncode}, expected {status}: {r.stdout} {r.stderr}"
    assert r.stderr.startswith("migrate-nbd: "), r.stderr
    return r.stderr


def queued_count(d):
    return len(d.request({"op": "list"})["tasks"])


class Garbage:
    """A TCP listener that answers anything with bytes that are not livemig
    frames (an unrelated service on the port)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                c.sendall(b"SSH-2.0-OpenSSH_9.2 not a livemig plugin\r\n" * 4)
                c.close()
            except OSError:
                pass

    def close(self):
        self.sock.close()


def test_bad_submissions_are_refused():
    ex = Export(4 * MiB)
    garbage = Garbage()
    try:
        with Livemigd() as d:
            common = ("--mode", "precopy", "--handover", "auto")
            # unknown host: does not resolve
            err = refused(d, "--from", "no-such-host.invalid:10809", "--to", ex.to, *common)
            assert "unknown host" in err and "no-such-host.invalid" in err and "does not resolve" in err, err
            # unknown host: nothing listens there
            dead = f"127.0.0.1:{free_port()}"
            err = refused(d, "--from", ex.source, "--to", dead, *common)
            assert "unknown host" in err and "destination" in err and dead in err, err
            # unknown export: something listens, but not a livemig plugin
            other = f"127.0.0.1:{garbage.port}"
            err = refused(d, "--from", ex.source, "--to", other, *common)
            assert "unknown export" in err and other in err and "livemig" in err, err
            err = refused(d, "--from", other, "--to", ex.to, *common)
            assert "unknown export" in err and "source" in err, err
            # bad mode: migrate-nbd refuses it before asking (exit 2) ...
            err = refused(d, "--from", ex.source, "--to", ex.to, "--mode", "teleport", status=2)
            assert "--mode 'teleport'" in err, err
            # ... and so does livemigd, for a client that sends it anyway.
            reply = d.request({"op": "submit", "request": {"from": ex.source, "to": ex.to, "mode": "teleport"}})
            assert not reply["ok"] and "teleport" in reply["error"] and "bad migration" in reply["error"], reply
            reply = d.request({"op": "submit", "request": {"from": ex.source, "to": ex.to, "mode": "precopy",
                                                           "transfer_unit": 3000}})
            assert not reply["ok"] and "transfer_unit" in reply["error"], reply
            # the same plugin twice
            err = refused(d, "--from", ex.source, "--to", ex.source, *common)
            assert "same plugin" in err, err
            assert queued_count(d) == 0, "a refused submission was queued"

            # a second migration of the same export while the first is queued or running
            first = d.submit(ex, "precopy", "--handover", "explicit")
            err = refused(d, "--from", ex.source, "--to", ex.to, *common)
            assert "already has a migration" in err and f"task {first}" in err, err
            assert queued_count(d) == 1
            # cancel: the task ends cancelled, and the export can be submitted again
            r = d.cli("cancel", first)
            assert r.returncode == 0, r.stderr
            assert d.task(first)["state"] == "cancelled"
            r = d.cli("cancel", first)
            assert r.returncode == 1 and "ended already" in r.stderr, r.stderr
            again = d.submit(ex, "precopy", "--handover", "auto")
            d.wait_state(again, ("done",), timeout=30)
            # no daemon at all
            r = lmtest_cli_without_daemon()
            assert r.returncode == 1 and "livemigd running" in r.stderr, r.stderr
    finally:
        garbage.close()
        ex.stop()


def lmtest_cli_without_daemon():
    from daemonlib import migrate_nbd
    return migrate_nbd("list", "--daemon", lmtest.tmp_dir("none") + "/absent.sock")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
