"""`cmake --install BUILD --prefix /usr` into a DESTDIR puts every file where
Debian's nbdkit, man-db, systemd and bash-completion look for it, and
nothing else: the plugin in nbdkit's plugindir, the programs in /usr/bin, the
man pages in share/man/man1 and man8, the units in systemd's unit directory
(naming the installed programs and pages), the completion in
bash-completion's completions directory (where its loader finds it), the
examples in share/doc/livemig. The installed tree is printed.

    LIVEMIG_BUILD_DIR=build /usr/bin/python3 tests/packaging/test_install.py [TEST_NAME...]
"""

import atexit
import os
import re
import shutil
import subprocess
import tempfile

from packaging import assert_same, build_dir, completion_bash, main, run


def pkg_variable(package, variable):
    value = run(["pkg-config", f"--variable={variable}", package]).strip()
    if not value:
        raise AssertionError(f"pkg-config {package} has no {variable} (is its .pc file installed?)")
    return value


def nbdkit_plugindir():
    """Where nbdkit itself looks for plugins by name, which its .pc file must agree with."""
    dump = dict(line.split("=", 1) for line in run(["nbdkit", "--dump-config"]).splitlines() if "=" in line)
    pc = pkg_variable("nbdkit", "plugindir")
    if os.path.realpath(dump["plugindir"]) != os.path.realpath(pc):
        raise AssertionError(f"nbdkit --dump-config plugindir={dump['plugindir']}, pkg-config says {pc}")
    return pc


def expected_files():
    units = pkg_variable("systemd", "systemdsystemunitdir")
    completions = pkg_variable("bash-completion", "completionsdir")
    return {
        f"{nbdkit_plugindir()}/nbdkit-livemig-plugin.so",
        "/usr/bin/migrate-nbd",
        "/usr/bin/livemigd",
        "/usr/bin/lm-workload",
        "/usr/share/man/man1/nbdkit-livemig-plugin.1",
        "/usr/share/man/man1/migrate-nbd.1",
        "/usr/share/man/man1/lm-workload.1",
        "/usr/share/man/man8/livemigd.8",
        f"{units}/livemig@.service",
        f"{units}/livemigd.service",
        f"{completions}/migrate-nbd",
        "/usr/share/doc/livemig/README.md",
        "/usr/share/doc/livemig/livemigd.conf.example",
        "/usr/share/doc/livemig/export.conf.example",
    }


class Installed:
    """The build installed under prefix /usr into a DESTDIR: once for all the
    tests of a run, removed when the run ends."""

    _root = None

    @classmethod
    def root(cls):
        if cls._root is None:
            cls._root = tempfile.mkdtemp(prefix="livemig-install-")
            atexit.register(shutil.rmtree, cls._root, True)
            run(["cmake", "--install", build_dir(), "--prefix", "/usr"], env=dict(os.environ, DESTDIR=cls._root))
        return cls._root

    @classmethod
    def path(cls, installed):
        return cls.root() + installed

    @classmethod
    def files(cls):
        out = set()
        for d, _, names in os.walk(cls.root()):
            out |= {os.path.join(d, n)[len(cls.root()):] for n in names}
        return out


def test_every_file_lands_where_debian_looks_for_it():
    files = Installed.files()
    print("installed tree (DESTDIR=" + Installed.root() + "):")
    for f in sorted(files):
        print("  " + f)
    assert_same(files, expected_files(), "installed files")
    for exe in ("migrate-nbd", "livemigd", "lm-workload"):
        if not os.access(Installed.path(f"/usr/bin/{exe}"), os.X_OK):
            raise AssertionError(f"/usr/bin/{exe} is not executable")


def test_the_units_name_the_installed_programs_and_pages():
    units = pkg_variable("systemd", "systemdsystemunitdir")
    for unit in ("livemig@.service", "livemigd.service"):
        text = open(Installed.path(f"{units}/{unit}")).read()
        for exe in re.findall(r"^ExecStart=(\S+)", text, re.M):
            if exe != "/usr/bin/nbdkit" and not os.access(Installed.path(exe), os.X_OK):
                raise AssertionError(f"{unit}: ExecStart={exe} is not an installed program")
        pages = re.findall(r"man:([\w.-]+)\((\d)\)", text)
        ours = [(n, s) for n, s in pages if n != "nbdkit"]
        if not ours:
            raise AssertionError(f"{unit}: Documentation= names none of livemig's man pages: {pages}")
        for name, section in ours:
            if not os.path.exists(Installed.path(f"/usr/share/man/man{section}/{name}.{section}")):
                raise AssertionError(f"{unit}: Documentation=man:{name}({section}) is not installed")
        for doc in re.findall(r"file://(\S+)", text):
            if not os.path.exists(Installed.path(doc)):
                raise AssertionError(f"{unit}: Documentation=file://{doc} is not installed")


def test_man_finds_the_installed_pages():
    env = dict(os.environ, MANPATH=Installed.path("/usr/share/man"), MANWIDTH="80")
    for name in ("nbdkit-livemig-plugin", "migrate-nbd", "lm-workload", "livemigd"):
        where = run(["man", "-w", name], env=env).strip()
        if not where.startswith(Installed.root()):
            raise AssertionError(f"man -w {name}: {where}, not the installed page")


def test_bash_completion_loads_the_installed_completion():
    """bash-completion's own loader, pointed at the DESTDIR's share directory
    (as it looks in /usr/share), finds the script on the first <TAB>."""
    script = ("source /usr/share/bash-completion/bash_completion\n"
              "__load_completion migrate-nbd || exit 3\n" + completion_bash("migrate-nbd st"))
    env = dict(os.environ, XDG_DATA_DIRS=Installed.path("/usr/share"), BASH_COMPLETION_USER_DIR="/nonexistent")
    got = run(["bash", "--norc", "--noprofile", "-c", script], env=env).split()
    assert_same(got, ["start", "stats", "status"], "migrate-nbd st<TAB> after install")


if __name__ == "__main__":
    main(globals())
