"""
nanoGPT's configurator, made strict. A script defines its settings as plain globals, then calls

    config = configure(globals())

which applies, in order, config files given as plain arguments (`config/t4.py`, found from the
working directory or else from this repository) and `--key=value` flags (or `--key value`; a bare
`--key` sets a True/False setting to True). Unknown keys are an error that names the nearest known
key; an int is accepted for a float; `None` can be given to any key, and any value to a key whose
default is None; values may contain `=`. Returns the final settings as a dict. `--help` prints the
script's settings block, comments and all.

    check(config, {"alpha": between(0, 1), "kd_kind": one_of("forward_kl", "jsd"), ...})

then checks the values, before anything is loaded: the first setting out of range stops the script
with one line that names it, its value and what is allowed.
"""

import ast
import difflib
import glob
import os
import re
import sys

from common import error

REPO = os.path.dirname(os.path.abspath(__file__))


def configure(g, argv=None, plain=None):
    """plain: the name of a string setting that collects the plain arguments, comma-separated
    (plot.py's run directories), where they would otherwise be config files."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script = os.path.basename(sys.argv[0]) or "config"
    kinds = (int, float, str, type(None))
    keys = [k for k, v in g.items() if not k.startswith("_") and isinstance(v, kinds)]

    def fail(msg):
        error(f"{script}: error: {msg}")

    if "-h" in argv or "--help" in argv:  # the settings document themselves: print that part
        with open(g["__file__"], encoding="utf-8") as f:
            lines = f.read().splitlines()
        end = next(i for i, line in enumerate(lines) if line.startswith("config = configure("))
        start = max(i for i in range(end) if lines[i].startswith("# ---")) + 1
        print(f"usage: python {script} [config/FILE.py ...] [--key=value ...]\n")
        print("\n".join(lines[start:end]))
        raise SystemExit(0)

    def check(key, value, where):
        if key not in keys:
            near = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(sorted(keys))}"
            fail(f"unknown setting {key!r} in {where}" + hint)
        default = g[key]
        if value is None or default is None or type(value) is type(default):
            return value
        if isinstance(default, float) and type(value) is int:
            return float(value)
        kind = type(default).__name__
        article = "an" if kind[0] in "aeiou" else "a"
        fail(f"{key} takes {article} {kind} (default {default!r}), got {value!r} in {where}")

    while argv:
        arg = argv.pop(0)
        if not arg.startswith("--") and plain:  # collected: plot.py's runs
            g[plain] = ",".join(filter(None, [g[plain], arg]))
        elif not arg.startswith("--"):  # a config file
            if not arg.endswith(".py"):  # --t1 a b: b would be run as Python, and silently lost
                fail(f"{arg}: a config file is a .py file; give a setting as --key=VALUE "
                     "(several values comma-separated, where a setting takes several)")
            path = arg if os.path.exists(arg) else os.path.join(REPO, arg)
            if not os.path.exists(path):
                here_is_repo = os.path.realpath(os.getcwd()) == os.path.realpath(REPO)
                looked = [os.getcwd()] + ([] if here_is_repo else [REPO])
                shipped = [os.path.relpath(p, REPO)
                           for p in glob.glob(os.path.join(REPO, "config", "*.py"))]
                near = difflib.get_close_matches(arg, shipped, n=1, cutoff=0.5)
                fail(f"no config file {arg} (looked in {' and '.join(looked)})"
                     + (f"; did you mean {near[0]}?" if near else ""))
            file_globals = {}
            with open(path) as f:
                exec(compile(f.read(), path, "exec"), file_globals)
            for k, v in file_globals.items():
                if not k.startswith("_") and isinstance(v, (int, float, str, type(None))):
                    g[k] = check(k, v, arg)
        else:
            key, eq, raw = arg[2:].partition("=")
            if not eq:  # --key value; a bare --key sets a True/False setting to True
                flag = isinstance(g.get(key), bool)
                given = argv and not argv[0].startswith("--") and \
                    (not flag or argv[0] in ("True", "False"))
                if not given and not flag:
                    fail(f"{arg}: give it a value, as --{key}=VALUE")
                raw = argv.pop(0) if given else "True"
            if raw == "None":
                value = None
            elif isinstance(g.get(key), str):
                value = raw  # strings are taken as written: --device=cpu, --start=维基百科
            else:
                try:
                    value = ast.literal_eval(raw)
                except (ValueError, SyntaxError):
                    value = raw
            g[key] = check(key, value, arg)
    return {k: g[k] for k in keys}


# -----------------------------------------------------------------------------
# rules: (test, what is allowed); a test that raises (None compared with a number, say) fails


def one_of(*values):
    return (lambda v: v in values), "one of " + ", ".join(map(str, values))


def at_least(lo, or_none=False):
    allowed = f">= {lo}" + (" or None" if or_none else "")
    return (lambda v: (or_none and v is None) or v >= lo), allowed


def between(lo, hi, ends="[]"):  # ends: "[]" closed, "()" open, "[)" ...
    low = (lambda v: v >= lo) if ends[0] == "[" else (lambda v: v > lo)
    high = (lambda v: v <= hi) if ends[1] == "]" else (lambda v: v < hi)
    return (lambda v: low(v) and high(v)), f"in {ends[0]}{lo}, {hi}{ends[1]}"


def check(settings, rules):
    script = os.path.basename(sys.argv[0]) or "config"
    for key, (test, allowed) in rules.items():
        try:
            ok = test(settings[key])
        except (TypeError, ValueError):
            ok = False
        if not ok:
            error(f"{script}: error: {key}={settings[key]!r}: must be {allowed}")


# the device setting of every script: the rule for check(), then check_device once torch is imported
DEVICE = ((lambda v: re.fullmatch(r"cpu|cuda(:\d+)?", v)),
          "cpu, cuda or cuda:N (mps and others are not supported)")
