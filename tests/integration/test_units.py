"""The systemd units (issue #13): hardened, and what they run works.

systemd is not PID 1 here (nor in CI), so the units cannot be started; what
can be checked is checked: systemd-analyze scores each unit file offline;
the export unit's ExecStart, with its example configuration and the key
where LoadCredential= puts it, starts the plugin with no capability, no new
privileges and umask 077 (as the unit does) and a migrate-nbd over TLS
reaches it; livemigd takes every key of its example configuration and the
unit's --secret.

    LIVEMIG_PLUGIN=build/plugin/livemig.so LIVEMIG_BUILD_DIR=build PYTHONPATH=tests/integration \\
        /usr/bin/python3 -m pytest tests/integration/test_units.py [-k NAME]
"""

import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest

import lmtest
import migration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
UNITS = os.path.join(REPO, "deploy", "systemd")
MAX_EXPOSURE = 2.0  # systemd-analyze's scale: 0 (locked down) to 10 (UNSAFE); it reported 1.7

# Directives issue #13 asks of both units, with the value each must have.
REQUIRED = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "PrivateTmp": "yes",
    "ProtectHome": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallFilter": "@system-service",
    "UMask": "0077",
    "LoadCredential": "psk:/etc/livemig/psk",
    "CapabilityBoundingSet": "",
}


def build_dir():
    return os.environ.get("LIVEMIG_BUILD_DIR", os.path.join(REPO, "build"))


def directives(path):
    """{key: [values]} of a unit file, continuation lines joined."""
    text = open(path).read().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;[" or "=" not in line:
            continue
        k, v = line.split("=", 1)
        out.setdefault(k.strip(), []).append(" ".join(v.split()))
    return out


def env_file(path):
    """KEY=VALUE lines of an EnvironmentFile."""
    env = {}
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            env[k] = v
    return env


def expand(command, env, specifiers):
    """An ExecStart line as systemd runs it: %-specifiers, then ${VAR} as one
    word and $VAR split on whitespace."""
    for spec, value in specifiers.items():
        command = command.replace(spec, value)
    argv = []
    for word in shlex.split(command):
        if re.fullmatch(r"\$[A-Z_]+", word):
            argv += env.get(word[1:], "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Z_]+)\}", lambda m: env.get(m.group(1), ""), word))
    return argv


def unprivileged(argv):
    """argv run as the units run it: no capabilities, no new privileges."""
    return ["setpriv", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", *argv]


def key_files(d):
    """The HMAC key as LoadCredential= leaves it (mode 0400 in the
    credentials directory), and a TLS PSK file made by the command the
    example configuration gives."""
    creds = os.path.join(d, "credentials")
    os.makedirs(creds)
    shutil.copyfile(lmtest.test_secret(), os.path.join(creds, "psk"))
    os.chmod(os.path.join(creds, "psk"), 0o400)
    example = open(os.path.join(REPO, "deploy", "export.conf.example")).read()
    make_psk = re.search(r"^#\s+(\(umask 077; echo .*tls\.psk\))$", example, re.M)
    assert make_psk, "export.conf.example no longer shows how to make tls.psk"
    tls_psk = os.path.join(d, "tls.psk")
    subprocess.run(["sh", "-c", make_psk.group(1).replace("/etc/livemig/tls.psk", tls_psk)], check=True)
    return creds, tls_psk


def wait_for_path(path, proc, what, timeout=20):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {path} did not appear in {timeout} s")
        time.sleep(0.05)


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_both_units_are_hardened_to_an_exposure_under_2():
    d = lmtest.tmp_dir("units")
    for unit, as_name in (("livemig@.service", "livemig@vm1.service"), ("livemigd.service", "livemigd.service")):
        found = directives(os.path.join(UNITS, unit))
        for key, value in REQUIRED.items():
            assert value in found.get(key, []), f"{unit}: {key}={value} missing (has {found.get(key)})"
        shutil.copyfile(os.path.join(UNITS, unit), os.path.join(d, as_name))
        p = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                            f"--threshold={int(MAX_EXPOSURE * 10)}", as_name],
                           cwd=d, capture_output=True, text=True, timeout=60)
        score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", p.stdout)
        assert score, f"{unit}: no score in systemd-analyze's output:\n{p.stdout}\n{p.stderr}"
        print(f"  {unit}: exposure {score.group(1)}")
        assert p.returncode == 0 and float(score.group(1)) <= MAX_EXPOSURE, \
            f"{unit}: exposure {score.group(1)} > {MAX_EXPOSURE}:\n{p.stdout}"


def test_the_export_units_command_starts_the_plugin_without_privileges_and_tls_reaches_it():
    d = lmtest.tmp_dir("export-unit")
    creds, tls_psk = key_files(d)
    port = migration.free_port()
    env = env_file(os.path.join(REPO, "deploy", "export.conf.example"))
    for k in ("IMAGE", "NBD_SOCKET", "LISTEN", "CONTROL", "TLS_ARGS"):
        assert k in env, f"export.conf.example has no {k}"
    env.update(IMAGE=os.path.join(d, "images", "vm1.img"), NBD_SOCKET=os.path.join(d, "vm1.nbd"),
               CONTROL=os.path.join(d, "vm1.sock"), LISTEN=f"127.0.0.2:{port}",
               TLS_ARGS=env["TLS_ARGS"].replace("/etc/livemig/tls.psk", tls_psk))
    os.makedirs(os.path.join(d, "images"))  # StateDirectory=livemig/images
    unit = directives(os.path.join(UNITS, "livemig@.service"))
    argv = expand(unit["ExecStart"][0], env, {"%d": creds, "%i": "vm1"})
    assert argv[0] == "/usr/bin/nbdkit" and "livemig" in argv, argv
    argv[argv.index("livemig")] = lmtest.plugin_path()
    argv[0] = lmtest.NBDKIT   # the sanitizer wrapper when tests/sanitize/run sets $NBDKIT
    proc = subprocess.Popen(unprivileged(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.umask(0o077))
    try:
        wait_for_path(env["CONTROL"], proc, "nbdkit started as livemig@.service does")
        with lmtest.ControlClient(env["CONTROL"]) as c:
            st = c.request({"op": "status"})
        assert st["ok"] and st["phase"] == "Idle" and st["tls"].startswith("psk"), st
        # UMask=0077: what the plugin creates is its own (the missing image
        # of a destination, the control socket). nbdkit sets the NBD
        # socket's mode itself (0755: only its owner can connect, as a
        # connect needs write permission).
        for path in (env["IMAGE"], env["CONTROL"]):
            mode = stat.S_IMODE(os.stat(path).st_mode)
            assert mode & 0o077 == 0, f"{path} has mode {mode:o}"
        mode = stat.S_IMODE(os.stat(env["NBD_SOCKET"]).st_mode)
        assert mode & 0o022 == 0, f"{env['NBD_SOCKET']} has mode {mode:o}: others could connect"
        p = subprocess.run([os.path.join(build_dir(), "client-tools", "migrate-nbd"), "status",
                            "--from", env["LISTEN"], "--secret", os.path.join(creds, "psk"),
                            "--tls-psk", tls_psk, "--json"], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        # Without the TLS key, the plugin on a non-loopback-only port refuses plain text.
        p = subprocess.run([os.path.join(build_dir(), "client-tools", "migrate-nbd"), "status",
                            "--from", env["LISTEN"], "--secret", os.path.join(creds, "psk")],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode != 0 and "TLS" in p.stderr, p.stderr
    finally:
        stop(proc)


def test_livemigd_takes_every_key_of_its_example_configuration_and_the_units_secret():
    d = lmtest.tmp_dir("livemigd-unit")
    creds, tls_psk = key_files(d)
    sock = os.path.join(d, "livemigd.sock")
    lines = []
    for line in open(os.path.join(REPO, "deploy", "livemigd.conf.example")):
        m = re.match(r"^#(\s*([a-z-]+)\s*=.*)$", line)  # a commented key = default
        if m and m.group(2) == "tls-certificates":
            continue  # the alternative to tls-psk: one or the other
        lines.append(m.group(1).strip() + "\n" if m else line)
    conf = "".join(lines)
    conf = re.sub(r"^database = .*$", f"database = {os.path.join(d, 'livemigd.db')}", conf, flags=re.M)
    conf = re.sub(r"^socket = .*$", f"socket = {sock}", conf, flags=re.M)
    conf = conf.replace("/etc/livemig/tls.psk", tls_psk)
    conf_path = os.path.join(d, "livemigd.conf")
    with open(conf_path, "w") as f:
        f.write(conf)
    unit = directives(os.path.join(UNITS, "livemigd.service"))
    argv = expand(unit["ExecStart"][0], {}, {"%d": creds})
    assert argv[0].endswith("/livemigd"), argv
    argv[0] = os.path.join(build_dir(), "server", "livemigd")
    argv[argv.index("/etc/livemig/livemigd.conf")] = conf_path
    proc = subprocess.Popen(unprivileged(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.umask(0o077))
    try:
        wait_for_path(sock, proc, "livemigd started as livemigd.service does")
        p = subprocess.run([os.path.join(build_dir(), "client-tools", "migrate-nbd"), "list", "--daemon", sock],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        mode = stat.S_IMODE(os.stat(os.path.join(d, "livemigd.db")).st_mode)
        assert mode & 0o077 == 0, f"the database has mode {mode:o}"
    finally:
        stop(proc)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
