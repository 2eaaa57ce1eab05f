"""Teachers beyond Qwen2.5-0.5B through distill.py, built with transformers' own config classes:
each family's switches distill and export; a teacher without tokenizer files is a warning; one
that model.py cannot run at distill.py's block_size, or that cannot be pruned, is refused with one
line. (The configs hf.load refuses: test_model.py; a teacher of another tokenizer:
test_tokenizers.py.)"""

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

from conftest import TINY, assert_one_line_error, make_tokenizer, read_log, run_script

pytestmark = pytest.mark.slow
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)


def teacher_dir(path, cfg, tokenizer_dir=None):
    """A random checkpoint saved by transformers, with the tokenizer's files beside it."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    for name in os.listdir(tokenizer_dir) if tokenizer_dir else ():
        shutil.copy(os.path.join(tokenizer_dir, name), path)
    return str(path)


@pytest.fixture(scope="module")
def deepseek_tokenizer(tmp_path_factory):
    # the data's vocabulary and merges, another EOS token at the same id, a BOS prepended by default
    return make_tokenizer(tmp_path_factory.mktemp("ds_tok"), eos="<｜end▁of▁sentence｜>",
                          bos="<｜begin▁of▁sentence｜>")


FAMILIES = {  # (config, tokenizer): DeepSeek-R1-Distill-Qwen, Qwen2.5-7B and Qwen3 in miniature
    "r1-distill-qwen": (Qwen2Config(vocab_size=320, **SMALL, tie_word_embeddings=False,
                                    rope_theta=1e4), "deepseek"),
    "qwen2.5-7b": (Qwen2Config(vocab_size=152064, **SMALL, tie_word_embeddings=False,
                               rope_theta=1e6), "data"),
    "qwen3": (Qwen3Config(vocab_size=320, **SMALL, head_dim=16, tie_word_embeddings=True,
                          rope_theta=1e6), "data"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_distills_from(family, tmp_path, data, tokenizer_dir, deepseek_tokenizer):
    cfg, tok = FAMILIES[family]
    teacher = teacher_dir(tmp_path / "teacher", cfg,
                          deepseek_tokenizer if tok == "deepseek" else tokenizer_dir)
    out = tmp_path / "out"
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={teacher}", f"--out_dir={out}",
                   *TINY, "--max_iters=3", "--eval_interval=3", "--warmup_iters=0")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stdout + r.stderr  # the tokenizers were compared, and agree
    _, evals = read_log(out)
    assert evals[0]["teacher_val_ce"] > 0 and evals[-1]["iter"] == 3
    student = AutoModelForCausalLM.from_pretrained(out / "hf")
    cfg_json = json.loads((out / "hf" / "config.json").read_text())
    assert cfg_json["model_type"] == "qwen2" and cfg_json["tie_word_embeddings"]
    assert cfg_json["vocab_size"] == cfg.vocab_size
    assert cfg_json["rope_theta"] == cfg.rope_parameters["rope_theta"]  # the teacher's RoPE
    assert student.num_parameters() > 0


REFUSED = {  # (config, extra settings) -> the one line's words
    # a window of 16 tokens in the teacher's layer 1, and distill.py runs it at block_size 64
    "sliding window": (Qwen2Config(vocab_size=320, **SMALL, use_sliding_window=True,
                                   sliding_window=16, max_window_layers=1), [],
                       "sliding_window=16 < 64 tokens"),
    "prune a qwen3": (FAMILIES["qwen3"][0], ["--init_from=prune", "--n_head=2", "--n_embd=32"],
                      "pruning needs a Qwen2 teacher"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused(case, tmp_path, data, tokenizer_dir):
    cfg, extra, message = REFUSED[case]
    teacher = teacher_dir(tmp_path / "teacher", cfg, tokenizer_dir)
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={teacher}",
                   f"--out_dir={tmp_path / 'out'}", *TINY, *extra)
    assert_one_line_error(r, "distill.py", message)
    assert not os.path.exists(tmp_path / "out")


def test_no_tokenizer_beside_the_teacher_warns(tmp_path, data):
    teacher = teacher_dir(tmp_path / "teacher", Qwen2Config(vocab_size=320, **SMALL))
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={teacher}",
                   f"--out_dir={tmp_path / 'out'}", *TINY, "--max_iters=1")
    assert r.returncode == 0, r.stderr
    assert "warning: no tokenizer beside the teacher" in r.stdout
