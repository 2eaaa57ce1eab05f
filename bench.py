"""
Speed and memory, side by side with a reference in the same run; the README shows the tables.

    python bench.py model      # student train step and KV-cache generation vs transformers' Qwen2ForCausalLM
    python bench.py prepare    # prepare.py vs the bare tokenizer
    python bench.py loss       # the fused distillation loss vs the plain full-logits loss
    python bench.py step       # a whole distillation step vs the same step written with transformers

Timings interleave the two sides and report medians; memory sections run each side in its own process.
"""

import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)


def timed(fn, repeats):
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns, repeats):
    """Median seconds of each fn, running them in turn so that load on the machine hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def machine():
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


# -----------------------------------------------------------------------------
# model.py vs transformers


def bench_model(T=512, repeats=3, prompt_len=32, new_tokens=128):
    from transformers import AutoModelForCausalLM

    from model import CONFIGS, Transformer, distill_loss

    torch.manual_seed(0)
    cfg = CONFIGS["student-123m"]
    with tempfile.TemporaryDirectory() as d:
        Transformer(cfg, verbose=False).save_pretrained(d)
        ours = Transformer.from_pretrained(d, verbose=False)
        ref = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa")
    x = torch.randint(0, 151_665, (1, T + 1))
    idx, targets = x[:, :-1], x[:, 1:]

    def ref_step():
        ref(idx, labels=x[:, :-1]).loss.backward()  # transformers shifts the labels itself

    def ours_step():
        F.cross_entropy(ours(idx).flatten(0, 1), targets.flatten()).backward()

    def ours_fused_step():
        h = ours(idx, hidden_only=True)
        distill_loss(h, ours.lm_head.weight, None, None, targets, alpha=0.0)[0].backward()

    t = interleaved({"ref": ref_step, "ours": ours_step, "fused": ours_fused_step}, repeats)
    ours.eval(), ref.eval()
    prompt = x[:, :prompt_len]
    g = interleaved({
        "ref": lambda: ref.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False),
        "ours": lambda: ours.generate(prompt, new_tokens, temperature=0),
    }, repeats)
    print(f"student-123m, float32, CPU ({machine()})\n")
    rows = [
        ["train step B=1 T=512: transformers Qwen2ForCausalLM (sdpa), logits + CE", f"{T / t['ref']:.0f}", "1.00x"],
        ["train step: model.py, logits + CE", f"{T / t['ours']:.0f}", f"{t['ref'] / t['ours']:.2f}x"],
        ["train step: model.py, hidden states + fused CE (distill_loss)", f"{T / t['fused']:.0f}",
         f"{t['ref'] / t['fused']:.2f}x"],
        [f"greedy generation ({prompt_len} + {new_tokens} tokens): transformers generate",
         f"{new_tokens / g['ref']:.0f}", "1.00x"],
        ["greedy generation: model.py KV cache", f"{new_tokens / g['ours']:.0f}", f"{g['ref'] / g['ours']:.2f}x"],
    ]
    table(["what", "tokens/s", "vs transformers"], rows)


if __name__ == "__main__":
    sections = {"model": bench_model}
    which = sys.argv[1:] or list(sections)
    for name in which:
        if name not in sections:
            raise SystemExit(f"bench.py: error: unknown section {name!r}; one of {', '.join(sections)}")
        print(f"\n## {name}\n")
        sections[name]()
