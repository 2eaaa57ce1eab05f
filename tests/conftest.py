"""Shared fixtures: a tiny BPE tokenizer and a tiny random Qwen2 checkpoint, made here, offline."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # no test touches the network
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CORPUS = [
    "维基百科是一个自由内容、公开编辑且多语言的网络百科全书协作计划。",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "长江是亚洲最长的河流，全长约六千三百公里。",
    "Python 是一种广泛使用的高级编程语言, released in 1991.",
    "数学是研究数量、结构、变化以及空间等概念的一门学科。",
    "The quick brown fox jumps over the lazy dog 123 次。",
]


def make_tokenizer(out_dir, texts=CORPUS, vocab_size=300, eos="<|endoftext|>", bos=None):
    """A tiny BPE of Qwen2's pipeline (hf.train_bpe), eos as id 0; bos: one added and prepended by default."""
    from hf import train_bpe

    return train_bpe(texts, out_dir, vocab_size, eos, bos)


def make_model_dir(out_dir, tokenizer_dir=None, vocab_size=320, seed=0, **kw):
    """A tiny random Qwen2 checkpoint exported through model.py (random biases and norm weights too)."""
    import torch

    import hf
    from model import ModelConfig, Transformer

    torch.manual_seed(seed)
    args = dict(vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8,
                intermediate_size=48, max_seq_len=128, rope_theta=10000.0)
    args.update(kw)
    model = Transformer(ModelConfig(**args), verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    hf.save(model, str(out_dir), tokenizer_dir=tokenizer_dir)
    return str(out_dir)


def make_loud_model_dir(out_dir, tokenizer_dir=None, vocab_size=320):
    """A tiny Qwen2 checkpoint whose residual stream outgrows float16 (Qwen2's massive activations in
    miniature: 3e4 in one channel, then two blocks adding ~2e4 each), as a real teacher's does from 1.5B up:
    in float16 throughout its hidden states are inf; over a float32 residual stream they are finite."""
    import torch

    import hf
    from model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8,
                      intermediate_size=48, max_seq_len=128, rope_theta=10000.0, tie_word_embeddings=False)
    model = Transformer(cfg, verbose=False).eval()  # untied: the head's logits stay of ordinary size
    with torch.no_grad():
        model.embed_tokens.weight[:, 0] = 3e4  # the normalized input: ~sqrt(32) in channel 0, ~0 elsewhere
        for b in model.layers:
            b.self_attn.o_proj.weight.zero_()
            for w in (b.mlp.gate_proj.weight, b.mlp.up_proj.weight):
                w.zero_()[:, 0] = 1.0  # every neuron: silu(5.66) * 5.66 ~ 32
            b.mlp.down_proj.weight.zero_()[0] = 13.0  # 48 neurons * 32 * 13 ~ 2e4 into channel 0
    hf.save(model, str(out_dir), tokenizer_dir=tokenizer_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir):
    return make_model_dir(tmp_path_factory.mktemp("model"), tokenizer_dir)


# -----------------------------------------------------------------------------
# distill.py as a user runs it

TINY = ["--n_layer=2", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--intermediate_size=64",  # a tiny student
        "--block_size=64", "--batch_size=4", "--max_iters=40", "--lr_decay_iters=40", "--eval_interval=10",
        "--eval_iters=2", "--log_interval=1", "--device=cpu", "--dtype=float32", "--teacher_dtype=float32",
        "--compile=False", "--seed=1"]


def run(*args, ddp=False, timeout=300, env=None):
    """distill.py with these arguments, in a subprocess, from outside the repository (under torch.distributed.run
    with ddp: True for two processes, or their number); env: more environment variables."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8", **(env or {}))
    nproc = 2 if ddp is True else int(ddp)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if ddp \
        else [sys.executable]
    return subprocess.run(launch + [os.path.join(REPO, "distill.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=os.path.dirname(REPO), timeout=timeout)


def read_log(out_dir):
    """A run's log.jsonl: (train rows, eval rows)."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_ce" in r]


def write_data(d, tokenizer_dir, dtype, n_train=30_000, n_val=3_000):
    """train.bin / val.bin / meta.json as prepare.py writes them: the corpus' sentences, each + EOS, shuffled."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in CORPUS]
    rng = np.random.default_rng(0)
    os.makedirs(d, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        ids = []
        while len(ids) < n:
            ids += docs[rng.integers(len(docs))]
        np.array(ids[:n], dtype=dtype).tofile(os.path.join(d, f"{split}.bin"))
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump({"dtype": np.dtype(dtype).name, "vocab_size": len(tok), "eos_id": tok.eos_token_id,
                   "tokenizer": tokenizer_dir}, f)
    return str(d)


@pytest.fixture(scope="session")
def data(tmp_path_factory, tokenizer_dir):
    return write_data(tmp_path_factory.mktemp("data32"), tokenizer_dir, np.uint32)  # Qwen's dtype
