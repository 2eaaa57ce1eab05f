"""experiments/kd_vs_ce.py end to end at its smallest setting: tokenizer, prepare, teacher, two
students, table."""

import json
import random

import pytest

from conftest import CORPUS, assert_one_line_error, run_script

pytestmark = pytest.mark.slow


KD_VS_CE = "experiments/kd_vs_ce.py"


def test_kd_vs_ce_tiny(tmp_path):
    rng, corpus = random.Random(0), tmp_path / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(80):
            f.write(json.dumps({"text": "".join(rng.sample(CORPUS, 3))}, ensure_ascii=False) + "\n")
    out = tmp_path / "out" / "kd_vs_ce_tiny"  # the tiny size's own default --out
    r = run_script(KD_VS_CE, f"--corpus={corpus}", "--size=tiny", "--seeds", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for label in ("| distilled (alpha 0.5) |", "| CE only (alpha 0) |",
                  "| pruned, then distilled (lr 0.003) |"):
        assert label in r.stdout, r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["teacher_val_ce"] > 0 and set(res["arms"]) == {"kd", "ce", "prune"}
    for name in ("kd", "ce", "prune"):
        rows = res["evals"][f"{name}_seed1"]
        assert [row["iter"] for row in rows] == [0, 4, 8]
        last = rows[-1]
        assert last["val_ce"] > 0 and 0 <= last["val_top1"] <= 1 and last["val_kl"] >= 0
    # the pruned student starts from the teacher's weights: closer to it than a random start
    assert res["evals"]["prune_seed1"][0]["val_kl"] < res["evals"]["kd_seed1"][0]["val_kl"]
    assert (out / "teacher" / "hf" / "model.safetensors").exists()
    assert (out / "results.md").read_text().startswith("teacher val CE")
    # a rerun into the same OUT reuses the finished students and trains only the new arm
    r = run_script(KD_VS_CE, f"--corpus={corpus}", "--size=tiny", f"--out={out}", "--seeds", "1",
                   "--arms=kd,prune:learning_rate=1e-3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kd_seed1: reusing" in r.stdout
    assert "prune_learning_rate=1e-3_seed1: reusing" not in r.stdout
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["evals"]["kd_seed1"] == res["evals"]["kd_seed1"]
    new_arm = rerun["evals"]["prune_learning_rate=1e-3_seed1"]
    assert [row["iter"] for row in new_arm] == [0, 4, 8]
    # other settings asked for: what they change is rebuilt, not reused (and the table's label
    # follows)
    r = run_script(KD_VS_CE, f"--corpus={corpus}", "--size=tiny", f"--out={out}", "--seeds", "1",
                   "--arms=kd", "--temperature=1.0", "--alpha=0.25")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "teacher: reusing" in r.stdout and "kd_seed1: reusing" not in r.stdout, r.stdout
    assert "kd_seed1" in r.stdout, r.stdout
    assert "made with other settings: rebuilding it" in r.stdout, r.stdout
    assert "| distilled (alpha 0.25) |" in r.stdout and "T 1.0" in r.stdout
    settings = json.loads((out / "kd_seed1" / "settings.json").read_text())
    assert "--temperature=1.0" in settings["args"] and "--alpha=0.25" in settings["args"]
    # the full size has its own default --out; one that holds another size's runs is refused,
    # before any work
    (tmp_path / "out" / "kd_vs_ce").mkdir()
    (tmp_path / "out" / "kd_vs_ce" / "size.json").write_text('{"size": "tiny"}')
    before = (out / "results.json").read_text()
    for where in ([], [f"--out={out}"]):  # the first in a fresh interpreter (conftest.run_script)
        r = run_script(KD_VS_CE, f"--corpus={corpus}", "--size=full", *where, cwd=tmp_path,
                       fresh=not where)
        assert_one_line_error(r, "kd_vs_ce.py", "holds the tiny size's runs")
    assert (out / "results.json").read_text() == before  # the tiny runs' results untouched


def test_kd_vs_ce_on_policy_and_drafts(tmp_path):
    """The on-policy experiment's path at the tiny size: an on-policy arm beside kd, its cost
    (seconds per step, the generation's share), then --drafts: eval.py at T 1 and greedy on every
    student and draft_table.py's table, the on-policy arm against kd seed by seed."""
    rng, corpus = random.Random(1), tmp_path / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(80):
            f.write(json.dumps({"text": "".join(rng.sample(CORPUS, 3))}, ensure_ascii=False) + "\n")
    out = tmp_path / "out"
    r = run_script(KD_VS_CE, f"--corpus={corpus}", "--size=tiny", f"--out={out}", "--seeds=1",
                   "--arms=kd,onpolicy:onpolicy_kind=jsd", "--drafts", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    arm = "onpolicy_onpolicy_kind=jsd"
    assert set(res["arms"]) == {"kd", arm}
    assert 0 < res["costs"][f"{arm}_seed1"]["gen_share"] < 1
    assert res["costs"]["kd_seed1"]["gen_share"] is None
    assert res["costs"]["kd_seed1"]["seconds_per_step"] > 0
    table = (out / "drafts.md").read_text()
    for row in ("a at T 1 along its own samples, offset 1", "teacher NLL of its own samples",
                "repeated 4-grams in its own samples (greedy)", "seconds per training step"):
        assert row in table, table
    assert table.startswith(f"| | kd | {arm} | {arm} - kd, seed by seed |"), table
    for t in (1, 0):
        students = json.loads((out / f"eval_t{t}.json").read_text())["students"]
        assert len(students) == 2
