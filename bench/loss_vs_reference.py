"""
The fused distillation loss (loss.distill_loss) against the plain full-logits loss
(loss.reference_loss): time and peak RSS of a forward + backward, and the loss's value.

    python bench/loss_vs_reference.py         # ~5 min on 2 cores; ~20 GB of free RAM
    python bench/loss_vs_reference.py --B=1   # ~4 GB

Each side runs alone in a fresh process (its peak RSS covers all it held: inputs, weights, the
runtime): the median of `iters` steps after a warm-up.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import torch  # noqa: E402

import harness  # noqa: E402
from configurator import at_least, check, configure, one_of  # noqa: E402
from loss import distill_loss, reference_loss  # noqa: E402

# -----------------------------------------------------------------------------
B = 8  # sequences
T = 512  # tokens per sequence
V = 151_936  # rows of the heads (Qwen2.5's)
D_s = 512  # the student's width (student-123m)
D_t = 896  # the teacher's (Qwen2.5-0.5B)
iters = 2  # timed steps per side, after a warm-up
chunk_size = 256  # distill_loss's tokens per chunk
side = None  # reference | fused: that side alone, in this process (the script runs itself so)
config = configure(globals())
check(config, {"B": at_least(1), "T": at_least(2), "V": at_least(2), "iters": at_least(1),
               "chunk_size": at_least(1), "side": one_of(None, "reference", "fused")})
# -----------------------------------------------------------------------------


def one_side():
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(B, T, D_s, generator=g).requires_grad_()
    w_s = torch.randn(V, D_s, generator=g).mul_(0.02).requires_grad_()
    h_t = torch.randn(B, T, D_t, generator=g)
    w_t = torch.randn(V, D_t, generator=g).mul_(0.05)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[:, -1] = -100

    def step():
        h_s.grad = w_s.grad = None
        if side == "reference":  # the definition: full logits, autograd
            loss = reference_loss(h_s, w_s, h_t, w_t, targets)[0]
        else:
            loss = distill_loss(h_s, w_s, h_t, w_t, targets, chunk_size=chunk_size)[0]
        loss.backward()
        return loss

    t = harness.timed(step, iters)
    return {"time": t, "rss": harness.peak_rss(), "loss": step().item()}


def main():
    # the reference holds ~7 (B, T, V) float32 tensors at its peak, and the heads with their grads
    harness.need((7.5 * B * T * V * 4 + 2 * V * (D_s + D_t) * 4) / 1e9, "the reference")
    ref, ours = (harness.own_process(config, side=s) for s in ("reference", "fused"))
    print(f"\nforward + backward, B={B} T={T} V={V:,} D_s={D_s} D_t={D_t}, float32, CPU "
          f"({harness.machine()}); each side in its own process, median of {iters} after a "
          f"warm-up; peak RSS of the whole process (inputs and weights included)\n")
    harness.table(
        ["loss", "s / step", "tokens/s", "peak RSS GB", "time vs reference", "RSS vs reference",
         "loss value"],
        [[name, f"{r['time']:.2f}", f"{B * T / r['time']:.0f}", f"{r['rss'] / 1e9:.2f}",
          f"{r['time'] / ref['time']:.2f}x", f"{r['rss'] / ref['rss']:.2f}x", f"{r['loss']:.6f}"]
         for name, r in (("reference_loss, full logits", ref),
                         (f"distill_loss, chunk_size={chunk_size}", ours))])


if __name__ == "__main__":
    if side:
        harness.report(one_side())
    else:
        main()
