"""experiments/kd_vs_ce.py end to end at its smallest setting: tokenizer, prepare, teacher, two students, table."""

import json
import os
import random
import subprocess
import sys

from conftest import CORPUS, REPO


def test_kd_vs_ce_tiny(tmp_path):
    rng = random.Random(0)
    with open(tmp_path / "corpus.jsonl", "w", encoding="utf-8") as f:
        for _ in range(80):
            f.write(json.dumps({"text": "".join(rng.sample(CORPUS, 3))}, ensure_ascii=False) + "\n")
    out = tmp_path / "exp"
    r = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "kd_vs_ce.py"), "--size=tiny",
                        f"--corpus={tmp_path / 'corpus.jsonl'}", f"--out={out}", "--seeds", "1"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    for label in ("| distilled (alpha 0.5) |", "| CE only (alpha 0) |", "| pruned, then distilled (lr 0.003) |"):
        assert label in r.stdout, r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["teacher_val_ce"] > 0 and set(res["arms"]) == {"kd", "ce", "prune"}
    for name in ("kd", "ce", "prune"):
        rows = res["evals"][f"{name}_seed1"]
        assert [row["iter"] for row in rows] == [0, 4, 8]
        assert rows[-1]["val_ce"] > 0 and 0 <= rows[-1]["val_top1"] <= 1 and rows[-1]["val_kl"] >= 0
    # the pruned student starts from the teacher's weights: closer to it than a random start
    assert res["evals"]["prune_seed1"][0]["val_kl"] < res["evals"]["kd_seed1"][0]["val_kl"]
    assert (out / "teacher" / "hf" / "model.safetensors").exists()
    assert (out / "results.md").read_text().startswith("teacher val CE")
    # a rerun into the same OUT reuses the finished students and trains only the new arm
    r = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "kd_vs_ce.py"), "--size=tiny",
                        f"--corpus={tmp_path / 'corpus.jsonl'}", f"--out={out}", "--seeds", "1",
                        "--arms", "kd", "prune:learning_rate=1e-3"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kd_seed1: reusing" in r.stdout and "prune_learning_rate=1e-3_seed1: reusing" not in r.stdout
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["evals"]["kd_seed1"] == res["evals"]["kd_seed1"]
    assert [row["iter"] for row in rerun["evals"]["prune_learning_rate=1e-3_seed1"]] == [0, 4, 8]
