"""bash completion of migrate-nbd (deploy/bash-completion/migrate-nbd): bash
sources the script and calls the function `complete -p migrate-nbd` names,
as it does on <TAB>; COMPREPLY must hold what migrate-nbd really accepts
(its --help, subcommand by subcommand), file names after a path option,
and the values of an option that takes a fixed set.

    LIVEMIG_BUILD_DIR=build /usr/bin/python3 tests/packaging/test_completion.py [TEST_NAME...]
"""

import os
import shlex
import subprocess
import tempfile

from packaging import REPO, assert_same, completion_bash, help_of, main, program

SCRIPT = os.path.join(REPO, "deploy", "bash-completion", "migrate-nbd")


def complete(line, cwd=None):
    """COMPREPLY for `line` with the cursor at its end."""
    bash = f"source {shlex.quote(SCRIPT)}\n" + completion_bash(line)
    p = subprocess.run(["bash", "--norc", "--noprofile", "-c", bash], capture_output=True, text=True, cwd=cwd)
    if p.returncode != 0 or p.stderr.strip():
        raise AssertionError(f"completing {line!r}: exit status {p.returncode}: {p.stderr.strip()}")
    return [w for w in p.stdout.splitlines() if w]


def test_a_subcommand_prefix_completes_to_the_subcommands():
    assert_same(complete("migrate-nbd st"), ["start", "stats", "status"], "migrate-nbd st<TAB>")


def test_every_subcommand_is_offered():
    assert_same(complete("migrate-nbd "), help_of([program("migrate-nbd")])["subcommands"], "migrate-nbd <TAB>")


def test_each_subcommand_offers_exactly_its_options():
    exe = program("migrate-nbd")
    for sub in help_of([exe])["subcommands"]:
        assert_same(complete(f"migrate-nbd {sub} --"), help_of([exe, sub])["options"], f"migrate-nbd {sub} --<TAB>")


def test_the_global_options_before_a_subcommand():
    assert_same(complete("migrate-nbd --"), help_of([program("migrate-nbd")])["options"], "migrate-nbd --<TAB>")


def test_an_option_prefix_after_other_options():
    got = complete("migrate-nbd verify --from src:10809 --ra")
    assert_same(got, ["--range-size"], "migrate-nbd verify --from src:10809 --ra<TAB>")


def test_a_path_option_completes_file_names():
    with tempfile.TemporaryDirectory() as d:
        os.mkdir(os.path.join(d, "keys"))
        open(os.path.join(d, "keys", "psk"), "w").close()
        open(os.path.join(d, "keys", "tls.psk"), "w").close()
        got = complete("migrate-nbd status --secret keys/p", cwd=d)
        assert_same(got, ["keys/psk"], "migrate-nbd status --secret keys/p<TAB>")
        got = complete("migrate-nbd start --tls-certificates k", cwd=d)
        assert_same(got, ["keys"], "migrate-nbd start --tls-certificates k<TAB>")


def test_a_value_from_a_fixed_set():
    assert_same(complete("migrate-nbd start --mode p"), ["precopy", "postcopy"], "--mode p<TAB>")
    assert_same(complete("migrate-nbd submit --handover on-"), ["on-disconnect", "on-destination-io"],
                "--handover on-<TAB>")
    assert_same(complete("migrate-nbd status --tls "), ["auto", "on", "off"], "--tls <TAB>")


def test_a_free_value_offers_nothing():
    assert_same(complete("migrate-nbd start --max-rate "), [], "--max-rate <TAB>")


if __name__ == "__main__":
    main(globals())
