"""The man pages (docs/man/*.pod) tell the truth about the programs: each
lists every subcommand, option and plugin key the program accepts (as its
real --help prints them) and none it does not; and each built page renders
with man(1) without a warning.

    LIVEMIG_BUILD_DIR=build /usr/bin/python3 tests/packaging/test_man_pages.py [TEST_NAME...]
"""

import glob
import os
import re
import subprocess

from packaging import (REPO, assert_same, build_dir, help_of, items, long_options, main, plugin, pod_sections,
                       program, run)

MAN = os.path.join(REPO, "docs", "man")


def pod(name):
    return pod_sections(os.path.join(MAN, name + ".pod"))


def subcommand_pages(sections):
    """{subcommand: its =head2 section's text} under SUBCOMMANDS."""
    return {h2: text for (h1, h2), text in sections.items() if h1 == "SUBCOMMANDS" and h2}


def options_paragraph(text, sub):
    """The long options of a migrate-nbd subcommand's "Options:" paragraph;
    the options its =items describe must be among them."""
    paras = [p for p in re.split(r"\n\s*\n", text) if p.startswith("Options:")]
    if len(paras) != 1:
        raise AssertionError(f"migrate-nbd.pod, {sub}: expected one 'Options:' paragraph, found {len(paras)}")
    listed = set(long_options(paras[0]))
    described = {o for i in items(text) for o in long_options(i)}
    assert_same(described - listed, [], f"migrate-nbd.pod, {sub}: =item options not in its 'Options:'")
    return listed


def item_options(text, sub):
    """The options of a subcommand's =items (the first B<--option> of each)."""
    return {o for i in items(text) for o in long_options(i[:i.find(">") + 1])}


def check_subcommands(name, listed):
    """The page of a program with subcommands has a SUBCOMMANDS section with
    a =head2 per subcommand, and listed(its text, subcommand) gives exactly
    the options that subcommand's --help prints; GLOBAL OPTIONS has those of
    the program's own --help. Returns every option the program accepts."""
    exe = program(name)
    top = help_of([exe])
    sections = pod(name)
    subs = subcommand_pages(sections)
    assert_same(subs, top["subcommands"], f"{name} subcommands")
    accepted = {"--help"} | set(top["options"])
    for sub in top["subcommands"]:
        real = set(help_of([exe, sub])["options"]) - {"--help"}
        accepted |= real
        assert_same(listed(subs[sub], sub), real, f"{name} {sub} options")
    global_items = {o for i in items(sections[("GLOBAL OPTIONS", "")]) for o in long_options(i)}
    assert_same(global_items, top["options"], f"{name} global options")
    return accepted


def test_migrate_nbd_page_lists_every_subcommand_and_option():
    accepted = check_subcommands("migrate-nbd", options_paragraph)
    # Nowhere in the page an option that no subcommand takes.
    text = open(os.path.join(MAN, "migrate-nbd.pod")).read()
    assert_same(set(long_options(text)) - accepted, [], "migrate-nbd options mentioned anywhere")


def test_lm_workload_page_lists_every_subcommand_and_option():
    check_subcommands("lm-workload", item_options)


def test_livemigd_page_lists_every_option_and_config_key():
    real = help_of([program("livemigd")])["options"]
    sections = pod("livemigd")
    page = {o for i in items(sections[("OPTIONS", "")]) for o in long_options(i)}
    assert_same(page, real, "livemigd options")
    # The file takes the long options but --help, --version, --config.
    keys = {o[2:] for o in real} - {"help", "version", "config"}
    page_keys = {re.sub(r"B<([a-z-]+)>", r"\1", i) for i in items(sections[("CONFIGURATION FILE", "")])}
    assert_same(page_keys, keys, "livemigd configuration file keys")
    example = os.path.join(REPO, "deploy", "livemigd.conf.example")
    example_keys = re.findall(r"^#?([a-z][a-z-]*) =", open(example).read(), re.M)
    assert_same(example_keys, keys, "livemigd configuration keys in deploy/livemigd.conf.example")


def plugin_keys():
    """The keys `nbdkit PLUGIN --help` lists (the plugin's config_help)."""
    out = run(["nbdkit", plugin(), "--help"])
    return re.findall(r"^([a-z][a-z-]*)=", out, re.M)


def test_plugin_page_lists_every_key():
    real = plugin_keys()
    if "image" not in real:
        raise AssertionError(f"nbdkit --help does not show the plugin's keys: {real}")
    params = pod("nbdkit-livemig-plugin")[("PARAMETERS", "")]
    page = [m for i in items(params) for m in re.findall(r"B<([a-z-]+)=>", i)]
    assert_same(page, real, "nbdkit-livemig-plugin keys")


def built_pages():
    pages = sorted(glob.glob(os.path.join(build_dir(), "docs", "man", "*.[18]")))
    names = {os.path.basename(p) for p in pages}
    want = {"nbdkit-livemig-plugin.1", "migrate-nbd.1", "lm-workload.1", "livemigd.8"}
    assert_same(names, want, f"built man pages in {build_dir()}/docs/man")
    return pages


def test_pages_render_without_warnings():
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8")
    for page in built_pages():
        p = subprocess.run(["man", "--warnings", "-l", page], capture_output=True, text=True, env=env)
        if p.returncode != 0 or p.stderr.strip():
            raise AssertionError(f"man --warnings -l {page}: exit status {p.returncode}: {p.stderr.strip()}")
        if "NAME" not in p.stdout or "SYNOPSIS" not in p.stdout:
            raise AssertionError(f"man -l {page}: no NAME or SYNOPSIS in:\n{p.stdout[:500]}")


def test_pod_sources_have_no_warnings():
    for source in sorted(glob.glob(os.path.join(MAN, "*.pod"))):
        p = subprocess.run(["podchecker", "-warnings", source], capture_output=True, text=True)
        complaints = [line for line in (p.stdout + p.stderr).splitlines() if "pod syntax OK" not in line]
        if p.returncode != 0 or complaints:
            raise AssertionError(f"podchecker {source}:\n" + "\n".join(complaints))


if __name__ == "__main__":
    main(globals())
