"""
On-policy distillation: the student also learns on its own continuations (GKD: Agarwal et al. 2024,
arXiv 2306.13649; Qwen3, arXiv 2505.09388, 4.5; DistillSpec: Zhou et al. 2024). docs/onpolicy.md.

    python distill.py config/t4.py --init_from=prune --onpolicy_tokens=128

On an on-policy step the student replaces the last n tokens of each training window by its own
continuation of the first T - n (continue_windows: sampled with a KV cache, without gradients). The
window keeps its shape; the teacher scores every position of it. The prefix's positions keep the
usual loss on the real next tokens; the n positions whose input is the student's own tokens take
the chosen divergence alone, no CE (loss), up to the first EOS the student emitted. Each window
samples from its own draws (the seed, the iteration, its index): its continuation is the same on
one process or eight, and a resumed run draws again what the straight run drew.
"""

import numpy as np
import torch

from loss import distill_loss


def draws(seed, iteration, windows, n):
    """Uniforms (len(windows), n) in [0, 1), float64, from a generator per window seeded by (seed,
    iteration, window index): what model.sample_next samples with."""
    rows = [np.random.default_rng([seed, iteration, int(w)]).random(n) for w in windows]
    return torch.from_numpy(np.stack(rows))


@torch.no_grad()
def continue_windows(student, x, n, temperature, uniforms, eos_id, vocab):
    """x (B, T) -> (x_new (B, T), keep (B, n)): the last n tokens of each row replaced by the
    student's continuation of the first T - n, sampled at temperature (0: greedy) with uniforms
    (draws), ids below vocab (the tokenizer's). keep[b, k]: the student's tokens of row b up to its
    k-th, the input of position T - n + k, hold no eos_id (what comes after an EOS carries no
    loss)."""
    prefix = x[:, :x.size(1) - n]
    made = student.generate(prefix, n, temperature, draws=uniforms.to(x.device), vocab=vocab)
    own = made[:, prefix.size(1):]
    keep = (own == eos_id).int().cumsum(-1) == 0
    return made, keep


def loss(h_s, w_s, h_t, w_t, x_new, y, keep, normalizer, own_kind, **kd):
    """distill_loss of an on-policy window (B, T): its prefix's positions take the usual loss (kd,
    distill_loss's settings) on y's real next tokens; the n positions that read the student's own
    tokens take own_kind alone (alpha 1: no CE), where keep. One normalizer for both. Returns (loss,
    stats): the prefix's stats, kl over every position, own_kl and n_own over the student's."""
    P = y.size(1) - keep.size(1)
    prefix, s = distill_loss(h_s[:, :P], w_s, h_t[:, :P], w_t, y[:, :P], normalizer=normalizer,
                             **kd)
    marks = torch.where(keep, x_new[:, P:], -100)  # only which positions count: no CE is taken
    own, s_own = distill_loss(h_s[:, P:], w_s, h_t[:, P:], w_t, marks, normalizer=normalizer,
                              **dict(kd, alpha=1.0, kind=own_kind))
    s.update(kl=s["kl"] + s_own["kl"], own_kl=s_own["kl"], n_own=s_own["n"])
    return prefix + own, s


@torch.no_grad()
def teacher_logprob(teacher, h_t, x_new, keep, chunk=128):
    """The teacher's log-probability of the student's tokens, summed over those that count, and
    their number: h_t (B, T, D) the teacher's hidden states on x_new; the positions T - n - 1 ..
    T - 2 predict the student's n tokens. chunk rows of logits at a time."""
    B, T = x_new.shape
    n = keep.size(1)
    # the k-th token counts if no EOS came before it (keep, shifted by one: keep[k] covers token k)
    counts = torch.cat([torch.ones_like(keep[:, :1]), keep[:, :-1]], 1).flatten()
    h = h_t[:, T - n - 1:T - 1].flatten(0, 1)
    tokens = x_new[:, T - n:].flatten()
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.size(0), chunk):
        logp = teacher.logits(h[i:i + chunk]).log_softmax(-1)
        total += (logp.gather(1, tokens[i:i + chunk, None])[:, 0] * counts[i:i + chunk]).sum()
    return total, counts.sum().float()
