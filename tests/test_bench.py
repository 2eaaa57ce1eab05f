"""bench.py's command line: a bare call lists the sections and what each takes, instead of starting them all
(the loss's reference alone needs ~19 GB); --help is help, not an error."""

import os
import subprocess
import sys

from conftest import REPO


def bench(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_a_bare_call_lists_the_sections():
    sys.path.insert(0, REPO)
    import bench as b

    r = bench()
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "## " not in r.stdout  # no section started
    for name in b.SECTIONS:
        assert f"  {name}  " in r.stdout, r.stdout
    assert r.stdout.count("needs ") == len(b.SECTIONS) and "19 GB" in r.stdout


def test_help():
    r = bench("--help")
    assert r.returncode == 0 and "usage: python bench.py SECTION" in r.stdout, r.stdout + r.stderr
    assert "--chunk_size=256" in r.stdout and "needs ~5 min" in r.stdout and "## " not in r.stdout
    r = bench("lossy")
    assert r.returncode == 1 and r.stderr.strip().startswith("bench.py: error: unknown section 'lossy'; one of ")
