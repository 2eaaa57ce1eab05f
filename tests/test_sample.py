"""sample.py as a user runs it: greedy output equals transformers' greedy generate on the same checkpoint."""

import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO


def run_sample(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), *args], capture_output=True,
                          text=True, env=env, cwd=os.path.dirname(REPO), timeout=120)


def test_greedy_sample_equals_transformers(model_dir):
    r = run_sample(f"--init_from={model_dir}", "--start=维基百科是", "--num_samples=1", "--max_new_tokens=24",
                   "--temperature=0", "--device=cpu")
    assert r.returncode == 0, r.stderr
    text = r.stdout.split("\n---------------")[0]
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tok.encode("维基百科是", add_special_tokens=False)])
    out = ref.generate(ids, max_new_tokens=24, do_sample=False)
    assert text == tok.decode(out[0], skip_special_tokens=True)
    assert len(text) > len("维基百科是")


def test_sampling_is_seeded(model_dir):
    args = [f"--init_from={model_dir}", "--num_samples=2", "--max_new_tokens=10", "--top_k=20", "--top_p=0.9",
            "--temperature=1.5", "--seed=3"]
    a, b = run_sample(*args), run_sample(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.count("---------------") == 2


def test_prompt_from_file(model_dir, tmp_path):
    (tmp_path / "p.txt").write_text("北京是", encoding="utf-8")
    r = run_sample(f"--init_from={model_dir}", f"--start=FILE:{tmp_path / 'p.txt'}", "--num_samples=1",
                   "--max_new_tokens=3", "--temperature=0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("北京是")


def test_bad_input_is_one_clear_line(tmp_path, model_dir):
    for args, msg in [([f"--init_from={tmp_path / 'none'}"], "no directory"),
                      ([f"--init_from={tmp_path}"], "neither ckpt.pt"),
                      ([f"--init_from={model_dir}", "--temprature=0"], "did you mean 'temperature'"),
                      ([f"--init_from={model_dir}", "--start=FILE:/no/such/file"], "cannot read the prompt")]:
        r = run_sample(*args)
        assert r.returncode != 0
        assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr
