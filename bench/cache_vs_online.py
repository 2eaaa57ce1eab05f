"""
A distillation step from the teacher cache (cache.py: the student alone, t_hat of the sampled ids)
against the online step (the teacher's forward, both heads in the loss), at the real shapes.

    python bench/cache_vs_online.py   # ~3 min on 2 cores; ~7.5 GB of RAM (both steps, one process)

First a cache of `windows` windows of random tokens from the random Qwen2.5-0.5B-shaped teacher: its
build time, bytes and kept ids per token (a random teacher is nearly uniform: at T=2 nearly every
draw is a new id, the cache's largest case). Speed: both steps in one process, in turn, medians of
`steps` after a warm-up. Peak RSS: each alone in a fresh process, two steps.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import numpy as np  # noqa: E402
import torch  # noqa: E402

import cache  # noqa: E402
import harness  # noqa: E402
from configurator import at_least, check, configure, one_of  # noqa: E402
from data import Bins  # noqa: E402
from loss import distill_loss  # noqa: E402
from model import CONFIGS, Transformer  # noqa: E402

# -----------------------------------------------------------------------------
B = 1  # sequences per step
T = 512  # tokens per sequence
steps = 5  # timed steps of each side, after a warm-up
windows = 8  # windows of T + 1 tokens in the cache
threads = 0  # torch threads (0: one per core)
chunk_size = 128  # distill_loss's tokens per chunk
samples = 50  # the cache's draws per token (distill.py's cache_samples)
teacher = "qwen2.5-0.5b"  # the teacher's shape: a key of model.CONFIGS, or tiny (a smoke run)
student = "student-123m"  # the student's
side = None  # online | cached: that side alone, in this process (the script runs itself so)
cache_dir = None  # the cache the sides read (the script sets it)
config = configure(globals())
check(config, {"B": at_least(1), "T": at_least(1), "steps": at_least(1), "windows": at_least(B),
               "threads": at_least(0), "chunk_size": at_least(1), "samples": at_least(1),
               "teacher": one_of(*CONFIGS, "tiny"), "student": one_of(*CONFIGS, "tiny"),
               "side": one_of(None, "online", "cached")})
# -----------------------------------------------------------------------------
tcfg, scfg = harness.model_config(teacher), harness.model_config(student)
VOCAB = min(harness.VOCAB, tcfg.vocab_size, scfg.vocab_size)
KD = dict(alpha=0.5, temperature=2.0, vocab_size=VOCAB, chunk_size=chunk_size)
torch.set_num_threads(threads or torch.get_num_threads())


def make_step(which, cache_dir):
    s = Transformer(scfg, verbose=False)
    if which == "online":
        t = Transformer(tcfg, verbose=False).requires_grad_(False).eval()

        def loss_fn(x, y):
            with torch.no_grad():
                h_t = t(x)
            return distill_loss(s(x), s.lm_head.weight, h_t, t.lm_head.weight, y, **KD)[0]
    else:
        c, window = cache.Cache(cache_dir, T), [0]

        def loss_fn(x, y):  # the windows in turn, B copies of one
            window[0] = (window[0] + 1) % (len(c.offsets["train"]) - 1)
            sparse = c.batch("train", [window[0]] * B, "cpu")
            return distill_loss(s(x), s.lm_head.weight, None, None, y, sparse=sparse, **KD)[0]
    return harness.training_step(s, loss_fn, B, T, VOCAB)


def one_side():  # peak RSS over two steps
    torch.manual_seed(0)
    step = make_step(side, cache_dir)
    step()
    step()
    return {"rss": harness.peak_rss()}


def build(d):  # -> the cache's directory, its build time per token
    rng = np.random.default_rng(0)
    for split, n in (("train", windows), ("val", 1)):
        rng.integers(0, VOCAB, n * (T + 1), dtype=np.uint32).tofile(os.path.join(d, f"{split}.bin"))
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump({"dtype": "uint32", "vocab_size": VOCAB, "eos_id": 0, "tokenizer": None}, f)
    meta = dict(vocab_size=VOCAB, temperature=KD["temperature"], cache_samples=samples,
                cache_topk=0, seed=0)
    teacher_model = Transformer(tcfg, verbose=False).requires_grad_(False).eval()
    t0, out = time.perf_counter(), os.path.join(d, "cache")
    cache.build(out, teacher_model, Bins(d, T), meta, batch_size=4)
    cache.join(out, 1, meta)
    return out, (time.perf_counter() - t0) / ((windows + 1) * T)


def main():
    with torch.device("meta"):  # parameter counts only
        tm, sm = Transformer(tcfg, verbose=False), Transformer(scfg, verbose=False)
    # the teacher (4 bytes a weight), two students with gradients and AdamW's moments (16) and
    # saved activations (~0.3 GB at T=512), the loss's buffers: ~7.5 GB at the defaults (5.05 and
    # 2.99 GB were measured alone)
    acts = 100 * B * T * scfg.n_layer * scfg.n_embd
    harness.need((4 * tm.num_params() + 2 * (16 * sm.num_params() + acts)
                  + 8 * chunk_size * VOCAB * 4) / 1e9 + 0.5, "both sides in one process")
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        built, build_time = build(d)
        harness.say(f"the cache: {windows + 1} windows built, {build_time * 1e3:.2f} ms per token")
        tokens = np.fromfile(os.path.join(built, "train.tokens.bin"), dtype=cache.TOKEN)
        size = sum(os.path.getsize(os.path.join(built, f"train.{k}.bin"))
                   for k in ("entries", "tokens")) / len(tokens)
        rss = {k: harness.own_process(config, side=k, cache_dir=built)["rss"]
               for k in ("online", "cached")}
        times = harness.interleaved({k: make_step(k, built) for k in ("online", "cached")}, steps,
                                    "the two steps")
    print(f"\nB={B}, T={T}, float32, CPU ({harness.machine()}); speed: both in one process, a step "
          f"of each in turn, medians of {steps} after a warm-up; peak RSS: each alone in a fresh "
          f"process; chunk_size={chunk_size}. The cache: {samples} draws per token at "
          f"T={KD['temperature']}, {tokens['n'].mean():.1f} kept ids per token (max "
          f"{tokens['n'].max()}), {size:.1f} bytes per token, built at {build_time * 1e3:.2f} ms "
          f"per token\n")
    harness.table(["one training step", "tokens/s", "peak RSS GB", "speed vs online",
                   "RSS vs online"],
                  [[name, f"{B * T / times[k]:.1f}", f"{rss[k] / 1e9:.2f}",
                    f"{times['online'] / times[k]:.2f}x", f"{rss[k] / rss['online']:.2f}x"]
                   for name, k in (("online: the teacher's forward, both heads in the loss",
                                    "online"),
                                   ("from the cache: the student alone, t_hat of the sampled ids",
                                    "cached"))])


if __name__ == "__main__":
    if side:
        harness.report(one_side())
    else:
        main()
