"""
One whole distillation step at the real shapes (the Qwen2.5-0.5B-shaped teacher's forward, the
student-123m's forward and backward, the loss, fused AdamW) against the same step written with
transformers: Qwen2ForCausalLM for both models and the plain full-logits reference_loss on their
final hidden states. Random weights on both sides (not the same values: a speed and memory test).

    python bench/step_vs_hf.py    # ~10 min on 2 cores; ~11 GB of RAM (both sides in one process)

Speed: both sides in one process, a step of each in turn, medians of `steps` after a warm-up.
Peak RSS: each side alone in a fresh process, two steps (AdamW's state exists from the first).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import torch  # noqa: E402

import harness  # noqa: E402
import hf  # noqa: E402
from configurator import at_least, check, configure, one_of  # noqa: E402
from loss import distill_loss, reference_loss  # noqa: E402
from model import CONFIGS, Transformer  # noqa: E402

# -----------------------------------------------------------------------------
B = 1  # sequences per step
T = 512  # tokens per sequence
steps = 5  # timed steps of each side, after a warm-up
threads = "0,1"  # torch thread counts to run both sides at, comma-separated (0: one per core)
chunk_size = 128  # distill_loss's tokens per chunk
teacher = "qwen2.5-0.5b"  # the teacher's shape: a key of model.CONFIGS, or tiny (a smoke run)
student = "student-123m"  # the student's
side = None  # reference | ours: that side alone, in this process (the script runs itself so)
config = configure(globals())
check(config, {"B": at_least(1), "T": at_least(1), "steps": at_least(1),
               "chunk_size": at_least(1), "teacher": one_of(*CONFIGS, "tiny"),
               "student": one_of(*CONFIGS, "tiny"), "side": one_of(None, "reference", "ours")})
# -----------------------------------------------------------------------------
tcfg, scfg = harness.model_config(teacher), harness.model_config(student)
VOCAB = min(harness.VOCAB, tcfg.vocab_size, scfg.vocab_size)
KD = dict(alpha=0.5, temperature=2.0, vocab_size=VOCAB)


def make_step(which):
    if which == "ours":
        t = Transformer(tcfg, verbose=False).requires_grad_(False).eval()
        s = Transformer(scfg, verbose=False)

        def loss_fn(x, y):
            with torch.no_grad():
                h_t = t(x)
            return distill_loss(s(x), s.lm_head.weight, h_t, t.lm_head.weight, y,
                                chunk_size=chunk_size, **KD)[0]
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        def qwen2(cfg):
            return Qwen2ForCausalLM(Qwen2Config(**hf.config_to_hf(cfg, torch.float32),
                                                attn_implementation="sdpa"))
        t, s = qwen2(tcfg).requires_grad_(False).eval(), qwen2(scfg).train()

        def loss_fn(x, y):  # transformers' final hidden states, then the full-logits loss
            with torch.no_grad():
                h_t = t.model(x).last_hidden_state
            return reference_loss(s.model(x).last_hidden_state, s.lm_head.weight, h_t,
                                  t.lm_head.weight, y, **KD)[0]
    return harness.training_step(s, loss_fn, B, T, VOCAB)


def one_side():  # peak RSS over two steps
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    step = make_step(side)
    step()
    step()
    return {"rss": harness.peak_rss()}


def matmul_peak(n=2048):  # this CPU's float32 FLOP/s: the best of 5 n x n products
    a, b, times = torch.randn(n, n), torch.randn(n, n), []
    for _ in range(6):  # the first a warm-up
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times[1:])


def main():
    with torch.device("meta"):  # parameter counts only
        tm, sm = Transformer(tcfg, verbose=False), Transformer(scfg, verbose=False)
    # each side holds the teacher (4 bytes a weight), the student with its gradients and AdamW's
    # moments (16) and its saved activations (~0.3 GB at T=512), the reference (B, T, V) logits:
    # ~11 GB at the defaults (6.8 + 5.0 GB were measured alone)
    acts = 100 * B * T * scfg.n_layer * scfg.n_embd
    harness.need((2 * (4 * tm.num_params() + 16 * sm.num_params() + acts) + 8 * B * T * VOCAB * 4)
                 / 1e9 + 0.5, "both sides in one process")
    flops = sum(sm.flops_per_token(T)) + sum(tm.flops_per_token(T, backward=False))
    rows, default = [], torch.get_num_threads()
    for n in [int(n) or default for n in threads.split(",")]:
        rss = {k: harness.own_process(config, side=k, threads=n)["rss"]
               for k in ("reference", "ours")}
        torch.set_num_threads(n)
        peak = matmul_peak()
        torch.manual_seed(0)
        times = harness.interleaved({k: make_step(k) for k in ("reference", "ours")}, steps,
                                    f"{n} threads")
        rows += [(name, n, times[k], rss[k], times["reference"], rss["reference"], peak)
                 for name, k in (("reference: transformers Qwen2ForCausalLM x 2 (sdpa), full "
                                  "logits, reference_loss", "reference"),
                                 ("ours: model.py hidden states + fused distill_loss", "ours"))]
    print(f"\nB={B}, T={T}, float32, CPU ({harness.machine()}); speed: both sides in one process, "
          f"a step of each in turn, medians of {steps} after a warm-up; peak RSS: each side alone "
          f"in a fresh process; distill_loss chunk_size={chunk_size}. A step is "
          f"{flops / 1e9:.2f} GFLOP/token (student 6N + attention, teacher 2N + attention); "
          f"'bound' is that at this CPU's float32 matmul speed, measured just before\n")
    harness.table(["one training step", "threads", "tokens/s", "bound", "peak RSS GB",
                   "speed vs reference", "RSS vs reference"],
                  [[name, n, f"{B * T / t:.1f}", f"{peak / flops:.0f}", f"{r / 1e9:.2f}",
                    f"{t_ref / t:.2f}x", f"{r / r_ref:.2f}x"]
                   for name, n, t, r, t_ref, r_ref, peak in rows])


if __name__ == "__main__":
    if side:
        harness.report(one_side())
    else:
        main()
