"""eval.py as a user runs it: its teacher-forced numbers equal the same sums computed from full logits."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hf
from conftest import REPO, make_model_dir
from model import Transformer, filtered_probs


def run_eval(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=os.path.dirname(REPO), timeout=120)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("eval")
    teacher = make_model_dir(d / "teacher", tokenizer_dir, seed=0)
    students = [make_model_dir(d / f"student{i}", tokenizer_dir, seed=i, n_layer=1) for i in (1, 2)]
    return d, teacher, students


def test_teacher_forced_numbers_equal_full_logits(pair, data):
    d, teacher, students = pair
    block, n_windows = 16, 5
    r = run_eval(f"--teacher={teacher}", f"--student={','.join(students)}", f"--data={data}",
                 f"--block_size={block}", f"--windows={n_windows}", "--batch_size=2", "--chunk_size=7",
                 "--temperature=0.7", "--top_k=20", "--top_p=0.9", "--draft_lens=1,3", "--prompts=1",
                 "--prompt_len=4", "--new_tokens=6", "--device=cpu", f"--out={d / 'eval.json'}")
    assert r.returncode == 0, r.stderr
    assert "| student | g | c |" in r.stdout and students[1] in r.stdout
    result = json.loads((d / "eval.json").read_text())

    ids = np.fromfile(os.path.join(data, "val.bin"), dtype=np.uint32).astype(np.int64)  # conftest's meta dtype
    n = len(ids) // (block + 1)
    win = torch.from_numpy(ids[:n * (block + 1)].reshape(n, block + 1)[np.arange(n_windows) * n // n_windows])
    x, y = win[:, :-1], win[:, 1:]
    t = hf.load(teacher, verbose=False)
    with torch.no_grad():
        z_t = t.lm_head(t(x)).flatten(0, 1)
        p = z_t.softmax(-1)
        assert result["teacher_val_ce"] == pytest.approx(F.cross_entropy(z_t, y.flatten()).item(), rel=1e-5)
        for path in students:
            s = hf.load(path, verbose=False)
            z_s = s.lm_head(s(x)).flatten(0, 1)
            q = z_s.softmax(-1)
            got = result["students"][path]
            assert got["val_ce"] == pytest.approx(F.cross_entropy(z_s, y.flatten()).item(), rel=1e-5)
            assert got["kl"] == pytest.approx((p * (p.log() - q.log())).sum(-1).mean().item(), rel=1e-4)
            assert got["top1"] == pytest.approx((z_t.argmax(-1) == z_s.argmax(-1)).float().mean().item())
            assert got["accept_t1"] == pytest.approx(torch.minimum(p, q).sum(-1).mean().item(), rel=1e-5)
            ps, qs = (filtered_probs(z, 0.7, 20, 0.9) for z in (z_t, z_s))
            assert got["accept"] == pytest.approx(torch.minimum(ps, qs).sum(-1).mean().item(), rel=1e-5)
            assert 0 < got["accept"] < 1
            for g in ("1", "3"):
                gen = got["generation"][g]
                assert gen["calls"] > 0 and 1 <= gen["tokens_per_call"] <= int(g) + 1
                assert gen["speedup"] > 0 and gen["predicted_speedup"] > 0


def test_text_file_and_a_student_of_another_vocabulary(pair, tmp_path):
    d, teacher, students = pair
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(json.dumps({"text": "北京是中华人民共和国的首都。" * 3}) for _ in range(4)),
                    encoding="utf-8")
    r = run_eval(f"--teacher={teacher}", f"--student={students[0]}", f"--data={held}", "--block_size=16",
                 "--prompts=0", "--device=cpu", f"--out={tmp_path / 'e.json'}")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e.json").read_text())["students"][students[0]]["generation"] == {}
    other = make_model_dir(tmp_path / "other", vocab_size=300, seed=3)
    r = run_eval(f"--teacher={teacher}", f"--student={other}", f"--data={held}", "--device=cpu")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[-1].startswith("eval.py: error: ") and "vocabulary rows" in lines[-1], r.stderr


def test_draft_table_groups_arms_and_seeds(tmp_path):
    """experiments/draft_table.py: students named ARM_seedN from several eval.py files become one row per number,
    mean ± sd per arm and each arm minus the base arm seed by seed."""
    def student(v):
        gen = {"4": dict(tokens_per_call=v, predicted_tokens_per_call=v, predicted_speedup=v, speedup=v)}
        return dict(val_ce=v, kl=v, top1=v, accept_t1=v, c=v, generation=gen)

    files = {}
    for run in ("t1", "t0"):
        for part, seeds in (("a", (1, 2)), ("b", (3,))):
            students = {f"/x/{arm}_seed{s}": student(s * (2 if arm == "kd" else 1)) for arm in ("kd", "ce")
                        for s in seeds}
            files[run, part] = tmp_path / f"{part}_{run}.json"
            files[run, part].write_text(json.dumps({"students": students}))
    out = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "draft_table.py"),
                          "--t1", files["t1", "a"], files["t1", "b"], "--t0", files["t0", "a"], files["t0", "b"]],
                         capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("| val CE"))
    assert row == "| val CE | 4.000 ± 2.000 | 2.000 ± 1.000 | +1.000, +2.000, +3.000 |"
    assert "| | kd | ce | kd - ce, seed by seed |" in out
