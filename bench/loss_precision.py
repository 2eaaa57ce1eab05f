"""
The student's head in float16 and bfloat16 (distill_loss under autocast) against the float32 path,
on the same inputs at the real V: the loss's relative difference and the cosine of each gradient to
float32's.

    python bench/loss_precision.py    # ~4 min on 2 cores; ~4.5 GB of RAM

Logits of std ~3 (random heads N(0, 0.15), hidden states N(0, 1)); the teacher's head in float16,
as config/t4.py's. A CPU has no half product with a float32 result (out_dtype is CUDA's): loss.py
emulates it there, the operands rounded to the half dtype and multiplied in float32.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402
from configurator import at_least, check, configure  # noqa: E402
from loss import distill_loss  # noqa: E402
from model import DTYPES  # noqa: E402

# -----------------------------------------------------------------------------
tokens = 128  # tokens of the batch
V = 151_936  # rows of the heads (Qwen2.5's)
vocab = 151_665  # rows in the softmaxes (the rest is padding)
D_s = 512  # the student's width
D_t = 896  # the teacher's
chunk_size = 128  # distill_loss's tokens per chunk
config = configure(globals())
check(config, {"tokens": at_least(1), "V": at_least(2), "vocab": at_least(2),
               "chunk_size": at_least(1)})
# -----------------------------------------------------------------------------


def main():
    # in proportion to the heads: ~4.5 GB were measured at the defaults
    harness.need(4.5 * V / 151_936 + 0.3, "this run")
    torch.manual_seed(0)
    h_s, h_t = torch.randn(1, tokens, D_s), torch.randn(1, tokens, D_t)
    w_s, w_t = torch.randn(V, D_s) * 0.15, (torch.randn(V, D_t) * 0.11).half()
    y = torch.randint(0, vocab, (1, tokens))

    def run(dtype, kind, alpha):  # -> the loss, grad_h and grad_w (flat)
        hs, ws = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = distill_loss(hs, ws, h_t, w_t, y, alpha=alpha, temperature=2.0,
                                   vocab_size=vocab, kind=kind, chunk_size=chunk_size)
        loss.backward()
        return loss.item(), hs.grad.flatten(), ws.grad.flatten()

    rows = []
    for kind, alpha in (("forward_kl", 0.5), ("forward_kl", 1.0), ("reverse_kl", 0.5)):
        ref = run(torch.float32, kind, alpha)
        for dtype in ("bfloat16", "float16"):
            got = run(DTYPES[dtype], kind, alpha)
            harness.say(f"{kind}, alpha {alpha}, {dtype}: done")
            cos = [F.cosine_similarity(g.double(), r.double(), 0).item()
                   for g, r in zip(got[1:], ref[1:])]
            rows.append([f"{kind}, alpha {alpha}", dtype, f"{ref[0]:.5f}",
                         f"{got[0]:.5f}", f"{abs(got[0] - ref[0]) / ref[0]:.1e}",
                         f"{1 - cos[0]:.1e}", f"{1 - cos[1]:.1e}"])
    print(f"\n{tokens} tokens, V = {V:,} ({vocab:,} in the softmaxes), D_s = {D_s}, teacher head "
          f"float16, T = 2, CPU ({harness.machine()}); the half products emulated as on a GPU: "
          f"operands rounded to the half dtype, multiplied in float32\n")
    harness.table(["loss", "head dtype", "float32 loss", "half loss", "relative difference",
                   "1 - cos grad_h", "1 - cos grad_w"], rows)


if __name__ == "__main__":
    main()
