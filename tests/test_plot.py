"""plot.py on synthetic log.jsonl files writes one valid PNG."""

import json
import os

import pytest

from conftest import assert_one_line_error, run_script

pytestmark = pytest.mark.slow


def write_log(d, seed):
    d.mkdir()
    with open(d / "log.jsonl", "w") as f:
        for it in range(0, 50, 5):
            f.write(json.dumps({"iter": it, "loss": 5 - it / 20 + seed, "ce": 4.0,
                                "kl": 1.0 / (it + 1), "lr": 1e-3}) + "\n")
            if it % 10 == 0:
                f.write(json.dumps({"iter": it, "val_ce": 4.5 - it / 50, "val_ppl": 90.0,
                                    "val_kl": 2.0, "val_top1": it / 100,
                                    "teacher_val_ce": 3.0 if it == 0 else None}) + "\n")


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_log(tmp_path / "kd", 0)
    write_log(tmp_path / "ce", 1)
    out = tmp_path / "curves.png"
    r = run_script("plot.py", tmp_path / "kd", tmp_path / "ce", f"--out={out}")
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image
    h, w = matplotlib.image.imread(str(out)).shape[:2]
    assert (w, h) == (1500, 800)
    assert not list(tmp_path.glob("*.tmp*"))


def test_plot_writes_beside_the_first_run_by_default(tmp_path):
    pytest.importorskip("matplotlib")
    write_log(tmp_path / "kd", 0)
    write_log(tmp_path / "ce", 1)
    (tmp_path / "cwd").mkdir()
    r = run_script("plot.py", "../kd", "../ce", cwd=tmp_path / "cwd")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "kd" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(tmp_path / "cwd") == []


def test_plot_bad_input(tmp_path):
    assert_one_line_error(run_script("plot.py", tmp_path, fresh=True), "plot.py", "no log.jsonl")
