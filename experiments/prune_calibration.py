"""
init_from=prune, before any training: how many calibration windows the importance ranking needs,
and which choices give the best start. Runs on the teacher and data of experiments/kd_vs_ce.py (run
that first), in-process.

    python experiments/prune_calibration.py --out=out/kd_vs_ce --windows_n=8,32,128

1. Stability: importances from N windows and from 4N other windows. It reports Spearman's rank
   correlation per statistic and the share of kept pieces the two choose alike.
2. The start: val CE of the pruned student before training, for each choice. Width (channels,
   heads, neurons) is chosen by importance or evenly spaced (Xu et al. 2024, "weight selection":
   no calibration). Layers are chosen by importance or evenly spaced. RMSNorm weights are rescaled
   or not. Next to these: the teacher's val CE, and that of a randomly initialized student.
"""

import json
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import hf  # noqa: E402
from configurator import configure  # noqa: E402
from loss import distill_loss  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from prune import importance, prune, select  # noqa: E402
from sizes import SIZES  # noqa: E402

# -----------------------------------------------------------------------------
out = "out/kd_vs_ce"  # kd_vs_ce.py's output: its teacher/hf and data/
size = "full"  # the size it was made at: full | tiny
windows_n = "8,32,128"  # N, comma-separated: importances from N windows compared with 4N others
config = configure(globals())
# -----------------------------------------------------------------------------


def windows(data_dir, split, block):
    with open(os.path.join(data_dir, "meta.json")) as f:
        dtype = json.load(f)["dtype"]
    data = np.fromfile(os.path.join(data_dir, f"{split}.bin"), dtype=dtype).astype(np.int64)
    n = len(data) // (block + 1)
    return torch.from_numpy(data[:n * (block + 1)].reshape(n, block + 1))


@torch.no_grad()
def val_ce(model, val, vocab, batch=16):
    total, n = 0.0, 0
    for i in range(0, len(val), batch):
        x, y = val[i:i + batch, :-1], val[i:i + batch, 1:]
        _, s = distill_loss(model(x), model.lm_head.weight, None, None, y, alpha=0.0,
                            vocab_size=vocab, normalizer=1)
        total, n = total + s["ce"].item(), n + s["n"].item()
    return total / n


def spearman(a, b):
    ra, rb = (x.flatten().argsort().argsort().double() for x in (a, b))
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def agreement(k1, k2):  # the share of kept pieces both choose, over every kept index set
    pairs = [(k1["layers"], k2["layers"]), (k1["channels"], k2["channels"]),
             *zip(k1["neurons"], k2["neurons"]), *zip(k1["heads"], k2["heads"])]
    same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in pairs)
    return same / sum(len(a) for a, _ in pairs)


def main():
    torch.set_grad_enabled(False)
    ns = [int(n) for n in str(windows_n).split(",")]
    sz = SIZES[size]
    block = sz["train"]["block_size"]
    teacher = hf.load(os.path.join(out, "teacher", "hf"))
    tcfg, s = teacher.config, sz["student"]
    scfg = ModelConfig(vocab_size=tcfg.vocab_size, n_layer=s["n_layer"], n_head=s["n_head"],
                       n_kv_head=s["n_kv_head"], n_embd=s["n_embd"],
                       head_dim=s["n_embd"] // s["n_head"],
                       intermediate_size=s["intermediate_size"], rope_theta=tcfg.rope_theta,
                       rms_norm_eps=tcfg.rms_norm_eps, max_seq_len=block)
    data_dir = os.path.join(out, "data")
    with open(os.path.join(data_dir, "meta.json")) as f:
        vocab = json.load(f)["vocab_size"]
    every = windows(data_dir, "train", block)
    train = every[torch.randperm(len(every), generator=torch.Generator().manual_seed(0))]
    val = windows(data_dir, "val", block)[:160]
    print(f"teacher {tcfg.n_layer}x{tcfg.n_embd} -> student {scfg.n_layer}x{scfg.n_embd}; windows "
          f"of {block} tokens; {len(train)} train windows\n")

    # 1. stability
    print("| N windows | vs 4N | layers | channels | heads | neurons | kept alike | s per window |")
    print("|---|---|---|---|---|---|---|---|")
    for n in ns:
        t0 = time.time()
        a = importance(teacher, train[:n, :-1].split(16))
        dt = (time.time() - t0) / n
        b = importance(teacher, train[n:5 * n, :-1].split(16))
        per = {"layers": "tokens"}  # the layers' sums are per token
        corr = {k: spearman(a[k] / (a[per[k]] if k in per else 1),
                            b[k] / (b[per[k]] if k in per else 1))
                for k in ("layers", "channels", "heads", "neurons")}
        same = agreement(select(a, tcfg, scfg), select(b, tcfg, scfg))
        print(f"| {n} | {4 * n} | " + " | ".join(f"{corr[k]:.3f}" for k in corr) +
              f" | {same:.1%} | {dt:.3f} |")

    # 2. the start
    sums = importance(teacher, train[:4 * max(ns), :-1].split(16))
    torch.manual_seed(0)
    rows = [("teacher", val_ce(teacher, val, vocab)),
            ("random init (scratch)", val_ce(Transformer(scfg, verbose=False), val, vocab))]
    for width in ("importance", "even"):
        for layers in ("importance", "even"):
            keep = select(sums, tcfg, scfg, layers=layers, width=width)
            for rescale in (True, False):
                student = prune(teacher, scfg, keep, sums if rescale else None)
                rows.append((f"width {width}, layers {layers} {keep['layers'].tolist()}, RMSNorm "
                             f"{'rescaled' if rescale else 'as is'}", val_ce(student, val, vocab)))
    print(f"\nval CE before training ({len(val)} val windows; importance from {4 * max(ns)} "
          f"windows)\n")
    print("| student | val CE |\n|---|---|")
    for name, ce in rows:
        print(f"| {name} | {ce:.3f} |")


if __name__ == "__main__":
    main()
