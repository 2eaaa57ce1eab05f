"""Teachers beyond Qwen2.5-0.5B through distill.py, built with transformers' own config classes: each family's
switches distill and export; a teacher whose tokenizer reads the data otherwise, and checkpoints model.py cannot
run exactly, are refused with one line."""

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

from conftest import TINY, make_tokenizer, read_log, run

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, rms_norm_eps=1e-6)


def teacher_dir(path, cfg, tokenizer_dir=None, edit=None):
    """A random checkpoint saved by transformers, with the tokenizer's files beside it; edit changes config.json."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    for name in os.listdir(tokenizer_dir) if tokenizer_dir else ():
        shutil.copy(os.path.join(tokenizer_dir, name), path)
    if edit:
        cfg_json = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(edit(cfg_json)))
    return str(path)


@pytest.fixture(scope="module")
def deepseek_tokenizer(tmp_path_factory):
    # the data's vocabulary and merges, another EOS token at the same id, a BOS prepended by default
    return make_tokenizer(tmp_path_factory.mktemp("ds_tok"), eos="<｜end▁of▁sentence｜>", bos="<｜begin▁of▁sentence｜>")


FAMILIES = {  # (config, tokenizer): DeepSeek-R1-Distill-Qwen, Qwen2.5-7B and Qwen3 in miniature
    "r1-distill-qwen": (Qwen2Config(vocab_size=320, **SMALL, tie_word_embeddings=False, rope_theta=1e4), "deepseek"),
    "qwen2.5-7b": (Qwen2Config(vocab_size=152064, **SMALL, tie_word_embeddings=False, rope_theta=1e6), "data"),
    "qwen3": (Qwen3Config(vocab_size=320, **SMALL, head_dim=16, tie_word_embeddings=True, rope_theta=1e6), "data"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_distills_from(family, tmp_path, data, tokenizer_dir, deepseek_tokenizer):
    cfg, tok = FAMILIES[family]
    teacher = teacher_dir(tmp_path / "teacher", cfg, deepseek_tokenizer if tok == "deepseek" else tokenizer_dir)
    out = tmp_path / "out"
    r = run(f"--data_dir={data}", f"--teacher={teacher}", f"--out_dir={out}", *TINY, "--max_iters=3",
            "--eval_interval=3", "--warmup_iters=0")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stdout + r.stderr  # the tokenizers were compared, and agree
    _, evals = read_log(out)
    assert evals[0]["teacher_val_ce"] > 0 and evals[-1]["iter"] == 3
    student = AutoModelForCausalLM.from_pretrained(out / "hf")
    cfg_json = json.loads((out / "hf" / "config.json").read_text())
    assert cfg_json["model_type"] == "qwen2" and cfg_json["vocab_size"] == cfg.vocab_size and cfg_json["tie_word_embeddings"]
    assert cfg_json["rope_theta"] == cfg.rope_parameters["rope_theta"]  # the teacher's RoPE
    assert student.num_parameters() > 0


def yarn(hf):
    hf.pop("rope_parameters", None)
    return dict(hf, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
                rope_theta=1e6)


REFUSED = {  # (config, tokenizer, config.json edit, extra settings) -> the one line's words
    "sliding window": (Qwen2Config(vocab_size=320, **SMALL, use_sliding_window=True, sliding_window=16,
                                   max_window_layers=1), "data", None, [], "sliding_window=16 < 64 tokens"),
    "rope scaling": (Qwen2Config(vocab_size=320, **SMALL), "data", yarn, [], "asks for 'yarn' RoPE scaling"),
    "deepseek-v3": (Qwen2Config(vocab_size=320, **SMALL), "data", lambda hf: dict(hf, model_type="deepseek_v3"), [],
                    "DeepSeek's MLA attention and MoE are not implemented"),
    "another tokenizer": (Qwen2Config(vocab_size=320, **SMALL), "other", None, [],
                          "encodes text into other ids than the data's"),
    "prune a qwen3": (FAMILIES["qwen3"][0], "data", None, ["--init_from=prune", "--n_head=2", "--n_embd=32"],
                      "pruning needs a Qwen2 teacher"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused(case, tmp_path, data, tokenizer_dir):
    cfg, tok, edit, extra, message = REFUSED[case]
    tok_dir = make_tokenizer(tmp_path / "other_tok", vocab_size=280) if tok == "other" else tokenizer_dir
    teacher = teacher_dir(tmp_path / "teacher", cfg, tok_dir, edit)
    r = run(f"--data_dir={data}", f"--teacher={teacher}", f"--out_dir={tmp_path / 'out'}", *TINY, *extra)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("distill.py: error: ") and message in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")


def test_no_tokenizer_beside_the_teacher_warns(tmp_path, data):
    teacher = teacher_dir(tmp_path / "teacher", Qwen2Config(vocab_size=320, **SMALL))
    r = run(f"--data_dir={data}", f"--teacher={teacher}", f"--out_dir={tmp_path / 'out'}", *TINY, "--max_iters=1")
    assert r.returncode == 0, r.stderr
    assert "warning: no tokenizer beside the teacher" in r.stdout
