"""The import graph, read from the source (ast; nothing is run): imports run one way, bottom to top.
model.py and loss.py import nothing of the project, no file imports a script, no import cycles."""

import ast
import os

from conftest import REPO

SCRIPTS = {"distill", "prepare", "sample", "eval", "plot"}  # run by users, imported by nothing
BOTTOM = {"model", "loss"}  # the numerics
FOLDERS = ("bench", "experiments")  # scripts, beside the helpers they share
HELPERS = {"bench/harness", "experiments/sizes"}


def graph():
    """{file: the project files it imports, anywhere in it}: names like "loss", "bench/harness"."""
    files = {}
    for folder in ("", *FOLDERS):
        for f in sorted(os.listdir(os.path.join(REPO, folder))):
            if f.endswith(".py"):
                files[os.path.join(folder, f[:-3])] = os.path.join(REPO, folder, f)
    by_module = {name.split("/")[-1]: name for name in files}
    edges = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        edges[name] = {by_module[m] for m in found if m in by_module}
    return edges


def test_model_and_loss_import_nothing_of_the_project():
    edges = graph()
    for name in BOTTOM:
        assert edges[name] == set(), f"{name}.py imports {sorted(edges[name])}"


def test_no_file_imports_a_script():
    edges = graph()
    scripts = SCRIPTS | {n for n in edges if "/" in n} - HELPERS
    assert SCRIPTS <= set(edges)
    for name, deps in edges.items():
        bad = sorted(deps & scripts)
        assert not bad, f"{name}.py imports the script {bad}: move what it needs into a module"


def test_no_import_cycles():
    edges, done = graph(), set()

    def visit(name, path):
        for dep in sorted(edges[name]):
            assert dep not in path, "import cycle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in done:
                visit(dep, path + [dep])
        done.add(name)

    for name in sorted(edges):
        visit(name, [name])


def test_a_cycle_or_a_script_import_would_be_found(tmp_path, monkeypatch):
    # the checks above against a graph that breaks both rules
    edges = {"model": {"loss"}, "loss": {"model"}, "cache": {"distill"}, "distill": set()}
    monkeypatch.setitem(globals(), "graph", lambda: {**{n: set() for n in SCRIPTS}, **edges})
    for check in (test_model_and_loss_import_nothing_of_the_project, test_no_file_imports_a_script,
                  test_no_import_cycles):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed a broken graph")
