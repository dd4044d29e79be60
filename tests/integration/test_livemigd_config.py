"""livemigd's configuration file (--config FILE): every mistake in it stops
livemigd with exit status 2 and a message naming the file, the line and the
key and what is wrong (an unknown key, a bad value, a line without =), not
the INI library. A good file's values are applied, and the command line
wins over them.

    LIVEMIG_PLUGIN=build/plugin/livemig.so LIVEMIG_BUILD_DIR=build PYTHONPATH=tests/integration \\
        /usr/bin/python3 -m pytest tests/integration/test_livemigd_config.py [-k NAME]
"""

import os
import subprocess
import sys

import pytest

import lmtest
from lmtest import MiB
from daemonlib import Livemigd, binary

# (file text, what the message must say besides the file's path)
BAD_CONFIGS = [
    ("bogus\n", ["line 1", "'bogus'", "no '='"]),
    ("# the queue\ndatabase\n", ["line 2", "'database'", "no '='"]),
    ("frobnicate = 3\n", ["line 1", "unknown key 'frobnicate'", "max-concurrent"]),
    ("max_concurrent = 2\n", ["line 1", "unknown key 'max_concurrent'"]),
    ("# how many\n\nmax-concurrent = zero\n", ["line 3", "max-concurrent = zero", "expected a whole number of at least 1"]),
    ("max-concurrent = 0\n", ["line 1", "max-concurrent = 0", "expected a whole number of at least 1"]),
    ("max-concurrent = 2 3\n", ["line 1", "max-concurrent = 2 3"]),
    ("heartbeat-interval = -1\n", ["line 1", "heartbeat-interval = -1", "expected a positive number of seconds"]),
    ("retry-delay = soon\n", ["line 1", "retry-delay = soon", "expected a non-negative number of seconds"]),
    ("max-attempts = 2\nhost-bandwidth = 1Qbit\n", ["line 2", "host-bandwidth '1Qbit'", "expected bytes/s"]),
    ("tls = maybe\n", ["line 1", "tls = maybe", "expected auto, on or off"]),
    ("[daemon]\nmax-concurrent = 2\n", ["line 1", "[daemon]", "no sections"]),
    ("retry-delay = 1\nretry-delay = 2\n", ["line 2", "retry-delay", "given twice (first on line 1)"]),
    ("max-concurrent =\n", ["line 1", "max-concurrent", "no value after '='"]),
    ("= 3\n", ["line 1", "no key before '='"]),
]


def write_config(text):
    path = os.path.join(lmtest.tmp_dir("conf"), "livemigd.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


def run_livemigd(*args):
    d = lmtest.tmp_dir("livemigd")
    return subprocess.run([binary("server", "livemigd"), "--database", os.path.join(d, "q.db"), "--socket",
                           os.path.join(d, "s.sock"), *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=20)


def test_every_bad_config_names_the_file_the_line_and_the_key():
    lmtest.test_secret()
    wrong = []  # every case that fails, not only the first
    for text, needles in BAD_CONFIGS:
        path = write_config(text)
        r = run_livemigd("--config", path)
        what = f"config {text!r}: exit {r.returncode}: {r.stderr.strip()!r}"
        if r.returncode != 2:
            wrong.append(f"{what}: expected exit 2")
        elif not r.stderr.startswith(f"livemigd: {path} line ") or "INI" in r.stderr:
            wrong.append(f"{what}: the file and line are not named")
        else:
            wrong += [f"{what}: lacks {n!r}" for n in needles if n not in r.stderr]
    assert not wrong, "\n".join(wrong)


def test_a_missing_config_file_is_named():
    path = os.path.join(lmtest.tmp_dir("conf"), "no-such.conf")
    r = run_livemigd("--config", path)
    assert r.returncode == 2, r
    assert r.stderr == f"livemigd: configuration file {path}: No such file or directory\n", r.stderr


def test_a_good_config_is_applied_and_the_command_line_wins():
    lmtest.test_secret()
    path = write_config("# livemigd\n"
                        "max-concurrent = 3\n"
                        "  max-attempts=7\n"
                        "host-bandwidth = \"8M\"\n"
                        "heartbeat-interval = 2\n")
    # Livemigd passes --heartbeat-interval 0.5 on the command line.
    with Livemigd(config=path) as d:
        st = d.request({"op": "status"})
        assert st["max_concurrent"] == 3, st
        assert st["max_attempts"] == 7, st
        assert st["host_bandwidth"] == 8 * MiB, st
        assert st["heartbeat_interval"] == 0.5, st


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
