"""pytest fixtures for livemig's integration tests (the helpers themselves
are in lmtest.py, migration.py, wire.py and daemonlib.py).

- The session needs livemig.so ($LIVEMIG_PLUGIN or $LIVEMIG_BUILD_DIR): without
  it the run stops before the first test, with the reason.
- After each test, any nbdkit (or other process registered with lmtest) the
  test left running is killed by PID, and named in the output.
- SIGTERM (a CTest timeout, a kill) ends the session, not just the test that
  was running: the fixtures' teardown and lmtest's exit handlers then stop
  every process by PID and remove the temp dir.
- `testbed`: two network namespaces joined by a shaped veth pair
  (deploy/testbed.sh, netns.py), taken down after the test.
"""

import signal

import pytest

import lmtest


def _on_sigterm(signum, frame):
    # Replaces lmtest's handler (SystemExit), which pytest would report as
    # one failed test before going on with the next.
    pytest.exit(f"terminated by signal {signum}", returncode=128 + signum)


signal.signal(signal.SIGTERM, _on_sigterm)


@pytest.fixture(scope="session", autouse=True)
def livemig_plugin():
    """The livemig.so under test."""
    try:
        return lmtest.plugin_path()
    except RuntimeError as e:
        pytest.exit(f"setup: {e}", returncode=1)


@pytest.fixture(autouse=True)
def reap_leftover_processes():
    yield
    leaked = [p for p in lmtest._live.values() if p.poll() is None]
    if leaked:
        print(f"  (test left nbdkit running: pids {[p.pid for p in leaked]}; killing)")
        lmtest._kill_all()


@pytest.fixture
def testbed():
    """Two network namespaces joined by a 1 Gbit/s veth pair (netns_helpers.testbed()),
    removed after the test."""
    import netns_helpers
    tb = netns_helpers.testbed()
    try:
        yield tb
    finally:
        tb.down()
