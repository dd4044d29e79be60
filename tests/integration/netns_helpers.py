"""Two "hosts" for livemig's integration tests and tests/faults: network
namespaces joined by a veth pair capped at 1 Gbit/s with tbf
(deploy/testbed.sh, DESIGN.md "Test bed"), and nbdkit with livemig.so
inside one of them (`ip netns exec NS`), listening for its peer on its
namespace's address. NBD clients and control operations use the Unix
sockets, which every network namespace can reach.

Needs root (network namespaces), iproute2 and tc. A test bed is named
lmt-<pid>; every one made here is removed at exit too (the `testbed`
fixture of conftest.py removes it after its test).
"""

import atexit
import os
import random
import subprocess

import lmtest
import lmsupport
from lmtest import MiB

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TESTBED = os.path.join(REPO, "deploy", "testbed.sh")

BLOCK = 4096
SIZE = 64 * MiB
DATA = 32 * MiB                      # random data at the start, then a hole
REGION_OFF, REGION_LEN = 16 * MiB, 32 * MiB
REGION = f"{REGION_OFF}:{REGION_LEN}"  # the writer: half over data, half over the hole
PEER_PORT = 10809                    # a namespace of our own: a fixed port is free
MAGIC = b"LMWLBLK1"                  # lm-workload's blocks start with this


# --------------------------------------------------------------------------
# The test bed: deploy/testbed.sh, removed however the script ends

class Testbed:
    def __init__(self, name, rate="1gbit", subnet=None):
        self.name = name
        self.rate = rate
        self.subnet = subnet
        self.env = None

    def up(self):
        argv = [TESTBED, "up", "--name", self.name, "--rate", self.rate, "--print-env"]
        if self.subnet is not None:
            argv += ["--subnet", str(self.subnet)]
        try:
            p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, check=False)
        except BaseException:
            self.down()
            raise
        if p.returncode != 0:
            self.down()
            raise AssertionError(f"testbed.sh up failed ({p.returncode}):\n{p.stderr.decode(errors='replace')}")
        env = {}
        for line in p.stdout.decode().splitlines():
            k, _, v = line.partition("=")
            env[k] = v
        self.env = env
        self.src_ns, self.dst_ns = env["LM_TB_SRC_NS"], env["LM_TB_DST_NS"]
        self.src_addr, self.dst_addr = env["LM_TB_SRC_ADDR"], env["LM_TB_DST_ADDR"]
        return self

    def down(self):
        subprocess.run([TESTBED, "down", "--name", self.name], stdout=subprocess.DEVNULL, timeout=60, check=False)

    def exists(self):
        out = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE, check=True).stdout.decode()
        names = {line.split()[0] for line in out.splitlines() if line.strip()}
        return f"{self.name}-src" in names or f"{self.name}-dst" in names


_testbeds = []


def _remove_testbeds():
    # Registered after lmtest's own handler, so it runs first: stop every
    # nbdkit (they live in the namespaces), then remove the namespaces.
    lmtest._kill_all()
    for tb in _testbeds:
        tb.down()


atexit.register(_remove_testbeds)


def testbed():
    tb = Testbed(f"lmt-{os.getpid()}", subnet=os.getpid() % 256)
    _testbeds.append(tb)
    return tb.up()


def ns_pids(ns):
    out = subprocess.run(["ip", "netns", "pids", ns], stdout=subprocess.PIPE, check=False).stdout.decode()
    return [int(x) for x in out.split()]


# --------------------------------------------------------------------------
# nbdkit inside a namespace

class NsServer(lmtest.Server):
    """lmtest.Server whose nbdkit runs in network namespace `ns`. `ip netns
    exec` execs the command, so the PID lmtest waits for, signals and reaps
    is nbdkit's own (lmtest's readiness check compares it with nbdkit's
    --pidfile, and a_server_in_a_namespace_is_nbdkit_itself checks it)."""

    def __init__(self, ns, **keys):
        # A namespace address is not loopback: TLS is required (the test's
        # PSK unless the test names its own TLS keys, or tls=off).
        if not any(k.startswith("tls") for k in keys):
            keys["tls-psk"] = lmtest.test_tls_psk()
        super().__init__(**keys)
        self.ns = ns
        self.argv = ["ip", "netns", "exec", ns, *self.argv]


def write_secret(name="psk"):
    """A new peer-link key file (lmsupport.write_secret) in a fresh temp dir."""
    return lmsupport.write_secret(os.path.join(lmtest.tmp_dir("secret"), name))


def start_pair(tb, src_image, dst_image, src_secret, dst_secret=None, **keys):
    """Source in tb.src_ns, destination in tb.dst_ns, each listening for its
    peer on its namespace's address. The caller stops them."""
    src = NsServer(tb.src_ns, control=True, image=src_image, listen=f"{tb.src_addr}:{PEER_PORT}",
                   secret=src_secret, **keys).start()
    try:
        dst = NsServer(tb.dst_ns, control=True, image=dst_image, listen=f"{tb.dst_addr}:{PEER_PORT}",
                       secret=dst_secret or src_secret, **keys).start()
    except BaseException:
        src.stop()
        raise
    return src, dst


def migrate_request(tb, mode, **params):
    req = {"op": "migrate", "mode": mode, "to": f"{tb.dst_addr}:{PEER_PORT}",
           "from": f"{tb.src_addr}:{PEER_PORT}"}
    req.update(params)
    return req


def migrate(tb, src, mode, **params):
    reply = src.control(migrate_request(tb, mode, **params))
    assert reply.get("ok"), f"migrate refused: {reply}"
    return reply




def make_source_image():
    """SIZE bytes: DATA bytes of random data, then a hole. Returns (path, data)."""
    data = random.Random(11).randbytes(DATA)
    path = lmtest.make_image(SIZE, name="src.img", dir=lmtest.tmp_dir("src"), data=data)
    return path, data



def link(tb, state):
    """Takes the source's end of the veth pair down or up: a cut cable."""
    subprocess.run(["ip", "netns", "exec", tb.src_ns, "ip", "link", "set", "dev", tb.env["LM_TB_SRC_DEV"], state],
                   check=True, timeout=10)

