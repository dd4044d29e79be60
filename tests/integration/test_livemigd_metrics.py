"""livemigd --metrics-listen: a real Prometheus server scrapes a running
migration and reads the series back through its HTTP API; promtool finds
the exposition clean.

Each test starts its own plugins (loopback TCP), its own livemigd and its own
Prometheus (/usr/bin/prometheus on a free loopback port, its TSDB in a temp
dir), and kills them by PID at the end, also on failure (lmtest's cleanup).
Needs Debian's prometheus package (deploy/install-deps.sh installs it)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import lmtest
import pytest
from lmtest import MiB
from daemonlib import Livemigd, exports, free_port

PROMETHEUS = shutil.which("prometheus", path="/usr/bin:" + os.environ.get("PATH", ""))
PROMTOOL = shutil.which("promtool", path="/usr/bin:" + os.environ.get("PATH", ""))
pytestmark = pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None,
                                reason="prometheus and promtool are not installed (Debian's prometheus package; "
                                       "deploy/install-deps.sh installs it)")


def scrape(port):
    """livemigd's /metrics as text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


class Prometheus:
    """A Prometheus server scraping 127.0.0.1:TARGET_PORT every second."""

    def __init__(self, target_port):
        self.dir = lmtest.tmp_dir("prometheus")
        self.port = free_port()
        self.config = os.path.join(self.dir, "prometheus.yml")
        with open(self.config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: livemigd\n    static_configs:\n"
                    f"      - targets: ['127.0.0.1:{target_port}']\n")
        self.log_path = os.path.join(self.dir, "prometheus.log")
        self.proc = None

    def __enter__(self):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={os.path.join(self.dir, 'tsdb')}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        lmtest._live[self.proc.pid] = self.proc  # killed by PID, also on failure
        lmtest.wait_until(self._ready, timeout=30, what=f"Prometheus ready on port {self.port}")
        return self

    def __exit__(self, *exc):
        lmtest._kill(self.proc)
        self._log.close()
        return False

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, promql):
        """The instant vector of `promql`: [(labels, value)]."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as r:
            reply = json.load(r)
        assert reply["status"] == "success", reply
        return [(s["metric"], float(s["value"][1])) for s in reply["data"]["result"]]

    def wait_for(self, promql, pred, timeout=30, what=None):
        """Polls `promql` until pred(result) holds; returns the result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if pred(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{what or promql}: not so after {timeout} s; last result {result}\n"
                                     f"prometheus log:\n{self.log()}")
            time.sleep(0.5)


def test_prometheus_scrapes_a_migration_and_its_plugins():
    """Prometheus scraping livemigd every second sees a rate-capped precopy
    task running (state and phase labels, bytes left > 0, wire bytes > 0, a
    link rate), both plugins up, a guest's reads at the source counted with
    their bytes and latency histogram, then the task done with 0 bytes left,
    phase Done and at least half the image's size in wire bytes."""
    metrics_port = free_port()
    with exports(1, 16 * MiB) as (ex,), Livemigd(metrics_listen=f"127.0.0.1:{metrics_port}") as d:
        with Prometheus(metrics_port) as prom:
            prom.wait_for('up{job="livemigd"}', lambda r: r and r[0][1] == 1, what="livemigd scraped and up")
            task = d.submit(ex, "precopy", "--handover", "auto", "--handover-size", "64K", "--max-rate", "4M")
            sel = f'task="{task}"'
            running = prom.wait_for(f'livemig_migration_state{{{sel},state="running"}} == 1', lambda r: len(r) == 1,
                                    what="the task seen running")
            labels = running[0][0]
            assert labels["source"] == ex.source and labels["destination"] == ex.to and labels["mode"] == "precopy", \
                labels
            prom.wait_for(f'livemig_migration_phase{{{sel},phase=~"PreCopy|Sync"}}', lambda r: r and r[0][1] == 1,
                          what="phase PreCopy or Sync")
            left = prom.wait_for(f'livemig_migration_remaining_bytes{{{sel}}}', lambda r: r and r[0][1] > 0,
                                 what="bytes left > 0 while copying")
            assert left[0][1] <= 16 * MiB, left
            prom.wait_for(f'livemig_migration_wire_bytes_total{{{sel},side="source"}}', lambda r: r and r[0][1] > 0,
                          what="source wire bytes > 0")
            prom.wait_for(f'livemig_migration_link_bytes_per_second{{{sel}}}', lambda r: r and r[0][1] > 0,
                          what="a link rate > 0")
            up = prom.wait_for("livemig_plugin_up", lambda r: len(r) == 2 and all(v == 1 for _, v in r),
                               what="both plugins up")
            assert {m["plugin"] for m, _ in up} == {ex.source, ex.to}, up
            # A guest reads from the source: its requests and their latency are counted.
            h = ex.src.connect()
            for i in range(20):
                h.pread(4096, i * 4096)
            src = f'plugin="{ex.source}"'
            prom.wait_for(f'livemig_plugin_requests_total{{{src},op="pread"}}', lambda r: r and r[0][1] >= 20,
                          what="the source's 20 reads counted")
            prom.wait_for(f'livemig_plugin_request_bytes_total{{{src},op="pread"}}',
                          lambda r: r and r[0][1] >= 20 * 4096, what="the source's bytes read")
            prom.wait_for(f'livemig_plugin_request_duration_seconds_count{{{src}}}', lambda r: r and r[0][1] >= 20,
                          what="the source's latency histogram")
            inf = prom.query(f'livemig_plugin_request_duration_seconds_bucket{{{src},le="+Inf"}}')
            assert inf and inf[0][1] >= 20, inf
            ex.src.disconnect(h)

            d.wait_state(task, ("done",), timeout=60)
            prom.wait_for(f'livemig_migration_state{{{sel},state="done"}} == 1', lambda r: len(r) == 1,
                          what="the task seen done")
            prom.wait_for(f'livemig_migration_remaining_bytes{{{sel}}}', lambda r: r and r[0][1] == 0,
                          what="bytes left 0 after Done")
            prom.wait_for(f'livemig_migration_phase{{{sel},phase="Done"}}', lambda r: r and r[0][1] == 1,
                          what="phase Done")
            wire = prom.query(f'max_over_time(livemig_migration_wire_bytes_total{{{sel},side="source"}}[5m])')
            assert wire and wire[0][1] >= 16 * MiB / 2, f"wire bytes {wire} for a 16 MiB image"
            assert not prom.query(f'livemig_migration_state{{{sel},state=~"failed|cancelled"}} == 1')
        ex.assert_copied()


def test_promtool_finds_the_exposition_clean():
    """`promtool check metrics` on a scrape during a migration (every family
    there: migration, per-side counters, plugin histogram) reports nothing."""
    metrics_port = free_port()
    with exports(1, 8 * MiB) as (ex,), Livemigd(metrics_listen=f"127.0.0.1:{metrics_port}") as d:
        task = d.submit(ex, "precopy", "--handover", "auto", "--handover-size", "64K", "--max-rate", "2M")
        text = ""
        deadline = time.monotonic() + 30
        while "livemig_migration_wire_bytes_total" not in text or "livemig_plugin_request_duration_seconds" not in text:
            assert time.monotonic() < deadline, f"no migration figures after 30 s:\n{text}\n{d.log()}"
            time.sleep(0.3)
            text = scrape(metrics_port)
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), \
            f"promtool check metrics ({check.returncode}):\n{check.stdout}{check.stderr}\non:\n{text}"
        d.wait_state(task, ("done",), timeout=60)
        text = scrape(metrics_port)
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), \
            f"promtool check metrics after Done ({check.returncode}):\n{check.stdout}{check.stderr}\non:\n{text}"


def test_metrics_are_off_by_default():
    """Without --metrics-listen livemigd serves no metrics: its log says
    "metrics off"."""
    with Livemigd() as d:
        lmtest.wait_until(lambda: "metrics off" in d.log(), timeout=10, what="the start-up line")



def test_an_address_in_use_stops_livemigd_at_start_up():
    """--metrics-listen on a port something else holds: exit status 1 and a
    message naming metrics-listen and the address."""
    lmtest.test_secret()
    d = Livemigd()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        p = subprocess.run(d.argv() + ["--metrics-listen", address], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1, f"exit status {p.returncode}:\n{p.stderr}"
    assert f"metrics-listen {address}: cannot listen" in p.stderr, p.stderr

if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
