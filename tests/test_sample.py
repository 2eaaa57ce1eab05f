"""sample.py as a user runs it: greedy output equals transformers' greedy generate on the same
checkpoint."""

import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_one_line_error, make_loud_model_dir, make_model_dir, run_script

pytestmark = pytest.mark.slow


def test_greedy_sample_equals_transformers(model_dir):
    r = run_script("sample.py", f"--init_from={model_dir}", "--start=维基百科是", "--num_samples=1",
                   "--max_new_tokens=24", "--temperature=0", "--device=cpu")
    assert r.returncode == 0, r.stderr
    text = r.stdout.split("\n---------------")[0]
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tok.encode("维基百科是", add_special_tokens=False)])
    out = ref.generate(ids, max_new_tokens=24, do_sample=False)
    assert text == tok.decode(out[0], skip_special_tokens=True)
    assert len(text) > len("维基百科是")


def test_sampling_is_seeded(model_dir):
    args = [f"--init_from={model_dir}", "--num_samples=2", "--max_new_tokens=10", "--top_k=20",
            "--top_p=0.9", "--temperature=1.5", "--seed=3"]
    a, b = run_script("sample.py", *args), run_script("sample.py", *args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.count("---------------") == 2


def test_prompt_from_file(model_dir, tmp_path):
    (tmp_path / "p.txt").write_text("北京是", encoding="utf-8")
    r = run_script("sample.py", f"--init_from={model_dir}", f"--start=FILE:{tmp_path / 'p.txt'}",
                   "--num_samples=1", "--max_new_tokens=3", "--temperature=0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("北京是")


def test_a_float16_model_keeps_a_float32_residual_stream(tmp_path, tokenizer_dir):
    """--dtype=float16 (what a T4 gets by default) on a model whose residual stream outgrows
    float16: sample.py keeps that stream in float32, as distill.py's teacher, so no inf/NaN reaches
    the sampler."""
    loud = make_loud_model_dir(tmp_path / "loud", tokenizer_dir)
    r = run_script("sample.py", f"--init_from={loud}", "--dtype=float16", "--device=cpu",
                   "--num_samples=1", "--max_new_tokens=8", "--temperature=0.8")
    assert r.returncode == 0, r.stderr
    assert "float16" in r.stderr and r.stdout.count("---------------") == 1


@pytest.fixture(scope="module")
def odd(tmp_path_factory, model_dir, tokenizer_dir):
    """Bad inputs, built once: a run whose ckpt.pt is not even a zip, a model without tokenizer
    files, a model whose weights were cut short, a long prompt."""
    d = tmp_path_factory.mktemp("odd_sample")
    (d / "cut_run").mkdir()
    shutil.copy(os.path.join(model_dir, "model.safetensors"), d / "cut_run" / "ckpt.pt")
    no_tokenizer = make_model_dir(d / "no_tokenizer")
    cut_model = make_model_dir(d / "cut_model", tokenizer_dir)
    with open(os.path.join(cut_model, "model.safetensors"), "r+b") as f:
        f.truncate(1000)
    (d / "long.txt").write_text("维基百科是一个自由内容的百科全书。" * 20, encoding="utf-8")
    return dict(cut_run=d / "cut_run", no_tokenizer=no_tokenizer, cut_model=cut_model,
                long=d / "long.txt")


BAD = {  # settings -> the one line's words
    "no directory": (["--init_from={missing}"], "no directory"),
    "not a model": (["--init_from={empty}"], "neither ckpt.pt"),
    "misspelt": (["--temprature=0"], "did you mean 'temperature'"),
    "prompt file": (["--start=FILE:/no/such/file"], "cannot read the prompt"),
    "empty prompt": (["--start="], "the prompt is empty"),
    "long prompt": (["--start=FILE:{long}"], "and the model takes 128 in all: shorten it"),
    "top_k": (["--top_k=0"], "top_k=0: must be >= 1 or None"),
    "top_p": (["--top_p=0"], "top_p=0: must be in (0, 1] or None"),
    "temperature": (["--temperature=-1"], "temperature=-1.0: must be >= 0"),
    "num_samples": (["--num_samples=0"], "num_samples=0: must be >= 1"),
    "max_new_tokens": (["--max_new_tokens=-5"], "max_new_tokens=-5: must be >= 1"),
    "dtype": (["--dtype=float64"], "dtype='float64': must be one of auto, float32"),
    "no cuda": (["--device=cuda"], "device=cuda, but this machine has no CUDA device(s)"),
    "damaged checkpoint": (["--init_from={cut_run}"], "ckpt.pt is damaged and cannot be read"),
    "damaged weights": (["--init_from={cut_model}"],
                        "model.safetensors is damaged and cannot be read"),
    "no tokenizer": (["--init_from={no_tokenizer}"], "cannot encode ordinary text"),
}
# a fresh interpreter (conftest.run_script) for one of each kind: a setting, a model, a prompt
REAL = {"misspelt", "damaged checkpoint", "long prompt"}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_line(case, tmp_path, model_dir, odd):
    args, message = BAD[case]
    (tmp_path / "empty").mkdir()
    names = dict(odd, missing=tmp_path / "none", empty=tmp_path / "empty")
    r = run_script("sample.py", f"--init_from={model_dir}", "--device=cpu",
                   *[a.format(**names) for a in args], fresh=case in REAL)
    assert_one_line_error(r, "sample.py", message)
