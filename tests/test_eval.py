"""eval.py as a user runs it: its teacher-forced numbers equal the same sums computed from full
logits."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hf
from conftest import assert_one_line_error, make_model_dir, run_script
from model import filtered_probs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("eval")
    teacher = make_model_dir(d / "teacher", tokenizer_dir, seed=0)
    students = [make_model_dir(d / f"student{i}", tokenizer_dir, seed=i, n_layer=1) for i in (1, 2)]
    return d, teacher, students


def test_teacher_forced_numbers_equal_full_logits(pair, data):
    d, teacher, students = pair
    block, n_windows = 16, 5
    r = run_script("eval.py", f"--teacher={teacher}", f"--student={','.join(students)}",
                   f"--data={data}", f"--block_size={block}", f"--windows={n_windows}",
                   "--batch_size=2", "--chunk_size=7", "--temperature=0.7", "--top_k=20",
                   "--top_p=0.9", "--draft_lens=1,3", "--prompts=1", "--prompt_len=4",
                   "--new_tokens=6", "--device=cpu", f"--out={d / 'eval.json'}")
    assert r.returncode == 0, r.stderr
    assert "| student | g | c |" in r.stdout and students[1] in r.stdout
    result = json.loads((d / "eval.json").read_text())

    # conftest's data: uint32
    ids = np.fromfile(os.path.join(data, "val.bin"), dtype=np.uint32).astype(np.int64)
    n = len(ids) // (block + 1)
    windows = ids[:n * (block + 1)].reshape(n, block + 1)
    win = torch.from_numpy(windows[np.arange(n_windows) * n // n_windows])
    x, y = win[:, :-1], win[:, 1:]
    t = hf.load(teacher, verbose=False)
    def mean(v):
        return v.float().mean().item()

    with torch.no_grad():
        z_t = t.lm_head(t(x)).flatten(0, 1)
        p = z_t.softmax(-1)
        ce = F.cross_entropy(z_t, y.flatten()).item()
        assert result["teacher_val_ce"] == pytest.approx(ce, rel=1e-5)
        for path in students:
            s = hf.load(path, verbose=False)
            z_s = s.lm_head(s(x)).flatten(0, 1)
            q = z_s.softmax(-1)
            got = result["students"][path]
            ce = F.cross_entropy(z_s, y.flatten()).item()
            assert got["val_ce"] == pytest.approx(ce, rel=1e-5)
            assert got["kl"] == pytest.approx(mean((p * (p.log() - q.log())).sum(-1)), rel=1e-4)
            assert got["top1"] == pytest.approx(mean(z_t.argmax(-1) == z_s.argmax(-1)))
            assert got["accept_t1"] == pytest.approx(mean(torch.minimum(p, q).sum(-1)), rel=1e-5)
            ps, qs = (filtered_probs(z, 0.7, 20, 0.9) for z in (z_t, z_s))
            assert got["accept"] == pytest.approx(mean(torch.minimum(ps, qs).sum(-1)), rel=1e-5)
            assert 0 < got["accept"] < 1
            for g in ("1", "3"):
                gen = got["generation"][g]
                assert gen["calls"] > 0 and 1 <= gen["tokens_per_call"] <= int(g) + 1
                assert gen["speedup"] > 0 and gen["predicted_speedup"] > 0


def test_text_file_and_a_student_of_another_vocabulary(pair, tmp_path):
    d, teacher, students = pair
    held = tmp_path / "held.jsonl"
    text = json.dumps({"text": "北京是中华人民共和国的首都。" * 3})
    held.write_text("\n".join([text] * 4), encoding="utf-8")
    r = run_script("eval.py", f"--teacher={teacher}", f"--student={students[0]}", f"--data={held}",
                   "--block_size=16", "--prompts=0", "--device=cpu", f"--out={tmp_path / 'e.json'}")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["students"][students[0]]["generation"] == {}
    other = make_model_dir(tmp_path / "other", vocab_size=300, seed=3)
    r = run_script("eval.py", f"--teacher={teacher}", f"--student={other}", f"--data={held}",
                   "--device=cpu", fresh=True)
    assert_one_line_error(r, "eval.py", "vocabulary rows")


def test_draft_table_groups_arms_and_seeds(tmp_path):
    """experiments/draft_table.py: students named ARM_seedN from several eval.py files become one
    row per number, mean ± sd per arm and each arm minus the base arm seed by seed."""
    def student(v):
        gen = {"4": dict(tokens_per_call=v, predicted_tokens_per_call=v, predicted_speedup=v,
                         speedup=v)}
        return dict(val_ce=v, kl=v, top1=v, accept_t1=v, c=v, generation=gen)

    files = {}
    for run in ("t1", "t0"):
        for part, seeds in (("a", (1, 2)), ("b", (3,))):
            students = {f"/x/{arm}_seed{s}": student(s * (2 if arm == "kd" else 1))
                        for arm in ("kd", "ce") for s in seeds}
            files[run, part] = tmp_path / f"{part}_{run}.json"
            files[run, part].write_text(json.dumps({"students": students}))
    r = run_script("experiments/draft_table.py", f"--t1={files['t1', 'a']},{files['t1', 'b']}",
                   f"--t0={files['t0', 'a']},{files['t0', 'b']}")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("| val CE"))
    assert row == "| val CE | 4.000 ± 2.000 | 2.000 ± 1.000 | +1.000, +2.000, +3.000 |"
    assert "| | kd | ce | kd - ce, seed by seed |" in r.stdout
