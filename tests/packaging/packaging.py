"""What the packaging tests share: where the build and its programs are, the
options a CLI11 program's --help lists, a POD page's sections, and a runner
that runs a file's test_* functions (plain functions, so pytest runs them
too).
"""

import os
import re
import shlex
import subprocess
import sys
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


def build_dir():
    return os.environ.get("LIVEMIG_BUILD_DIR", os.path.join(REPO, "build"))


PROGRAMS = {
    "migrate-nbd": ("client-tools", "migrate-nbd"),
    "lm-workload": ("client-tools", "lm-workload"),
    "livemigd": ("server", "livemigd"),
}


def program(name):
    return os.path.join(build_dir(), *PROGRAMS[name])


def plugin():
    return os.environ.get("LIVEMIG_PLUGIN", os.path.join(build_dir(), "plugin", "livemig.so"))


def run(argv, **kw):
    """Runs argv; its stdout. Fails on a non-zero exit status."""
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit status {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def help_of(argv):
    """A CLI11 --help output as {"options": [long options], "subcommands": [names]}.
    An entry starts two spaces in; its description, when it does not fit,
    goes on lines indented further, which are skipped."""
    out = {"options": [], "subcommands": []}
    block = None
    for line in run(argv + ["--help"]).splitlines():
        if re.match(r"^[A-Z][a-z]*:$", line):
            block = line[:-1].lower()
            continue
        m = re.match(r"^  (?:-\w,)?(--[a-z0-9-]+)", line)
        if block == "options" and m:
            out["options"].append(m.group(1))
        m = re.match(r"^  ([a-z][a-z0-9-]*)\s", line)
        if block == "subcommands" and m:
            out["subcommands"].append(m.group(1))
    return out


def pod_sections(path):
    """A POD file as {(head1, head2 or ""): text}, in order."""
    sections = {}
    head1 = head2 = ""
    for para in re.split(r"\n\s*\n", open(path).read()):
        m = re.match(r"=head([12])\s+(.*)", para.strip())
        if m:
            if m.group(1) == "1":
                head1, head2 = m.group(2).strip(), ""
            else:
                head2 = m.group(2).strip()
            sections.setdefault((head1, head2), "")
            continue
        sections[(head1, head2)] = sections.get((head1, head2), "") + para + "\n\n"
    return sections


def items(text):
    """The =item lines of a POD text."""
    return [line[len("=item"):].strip() for line in text.splitlines() if line.startswith("=item")]


def long_options(text):
    """The B<--option> names a POD text mentions."""
    return re.findall(r"B<(--[a-z0-9-]+)>", text)


def assert_same(page, program, what):
    """Two collections of names are the same set; the message says which side lacks what."""
    page, program = set(page), set(program)
    missing, extra = sorted(program - page), sorted(page - program)
    if missing or extra:
        raise AssertionError(f"{what}: lacks {missing}; has what the program does not: {extra}")


def completion_bash(line):
    """bash text that completes `line` (cursor at its end; a trailing space
    starts a new word) as bash does on <TAB>: it calls the function that
    `complete -p migrate-nbd` names and prints COMPREPLY, a word a line. The
    completion must be loaded before it."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    return ("fn=$(complete -p migrate-nbd | sed -n 's/.*-F \\([^ ]*\\).*/\\1/p')\n"
            f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
            f"COMP_CWORD={len(words) - 1}\n"
            f"COMP_LINE={shlex.quote(line)}; COMP_POINT=${{#COMP_LINE}}\n"
            '$fn migrate-nbd "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"\n'
            "printf '%s\\n' \"${COMPREPLY[@]}\"\n")


def main(namespace):
    """Runs the test_* functions of a module (those named on the command line,
    else all, in file order); PASS or FAIL for each; exit status 1 if any failed."""
    tests = [(n, f) for n, f in namespace.items() if n.startswith("test_") and callable(f)]
    wanted = sys.argv[1:]
    failed = 0
    for name, fn in tests:
        if wanted and name not in wanted:
            continue
        try:
            fn()
            print(f"PASS {name}", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name}", flush=True)
            traceback.print_exc()
    print(f"{failed} failed" if failed else "all passed")
    sys.exit(1 if failed else 0)
