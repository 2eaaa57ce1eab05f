"""
Speculative decoding's cost: greedy generation by the teacher alone, by the draft alone and by the
teacher with the draft (speculative.py), tokens/s side by side, random weights, at two shapes: the
KD-vs-CE experiment's and the real ones (Qwen2.5-0.5B drafted for by student-123m).

    python bench/speculative_cost.py    # ~2 min on 2 cores; ~3 GB of RAM

Random drafts are never accepted, so the speculative rows force the acceptance (speculative.accept
replaced): all g drafts pass, or none. They measure the cost ratio c and what a call costs around
the models, not a real acceptance: eval.py measures that.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import torch  # noqa: E402

import harness  # noqa: E402
import speculative  # noqa: E402
from configurator import at_least, check, configure  # noqa: E402
from model import CONFIGS, ModelConfig, Transformer  # noqa: E402

# -----------------------------------------------------------------------------
new_tokens = 32  # tokens generated per run
prompt_len = 16  # the prompt's tokens
draft_len = 4  # g: tokens the draft proposes per teacher call
repeats = 2  # timed runs of each, in turn, after a warm-up
shapes = "experiment,real"  # which shapes, comma-separated
config = configure(globals())
check(config, {"new_tokens": at_least(1), "prompt_len": at_least(1), "draft_len": at_least(1),
               "repeats": at_least(1),
               "shapes": (lambda v: set(v.split(",")) <= {"experiment", "real"},
                          "experiment, real or both, comma-separated")})
# -----------------------------------------------------------------------------
EXP = dict(vocab_size=4096, head_dim=64, max_seq_len=256, rope_theta=1e6)  # kd_vs_ce.py's "full"
SHAPES = {
    "experiment": ("experiment: 4 x 256 teacher, 2 x 128 student, vocab 4,096",
                   ModelConfig(n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
                               intermediate_size=768, **EXP),
                   ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=128,
                               intermediate_size=384, **EXP)),
    "real": ("real: Qwen2.5-0.5B teacher, student-123m draft",
             *(dataclasses.replace(CONFIGS[k], max_seq_len=256)
               for k in ("qwen2.5-0.5b", "student-123m")))}


def forced(passes):
    """speculative.accept, forced: every draft passes (passes=True) or none; then the teacher's
    argmax, as greedy would."""
    def accept(p, q, drafted):
        n = torch.full((p.size(0),), drafted.size(1) if passes else 0, dtype=torch.long,
                       device=p.device)
        return n, p[torch.arange(p.size(0)), n].argmax(-1)
    return accept


def shape_rows(key):
    """The table's rows for one pair of shapes: each generation in turn, medians."""
    name, tcfg, dcfg = SHAPES[key]
    torch.manual_seed(0)
    teacher, draft = (Transformer(c, verbose=False).eval() for c in (tcfg, dcfg))
    prompt = torch.randint(0, tcfg.vocab_size, (1, prompt_len))
    g, real_accept, stats = draft_len, speculative.accept, {}

    def spec(which):
        def run():
            speculative.accept = forced(which == "all")
            try:
                stats[which] = {}
                speculative.generate(teacher, draft, prompt, new_tokens, 0.0, draft_len=g,
                                     stats=stats[which])
            finally:
                speculative.accept = real_accept
        return run

    t = harness.interleaved({"teacher": lambda: teacher.generate(prompt, new_tokens, 0.0),
                             "draft": lambda: draft.generate(prompt, new_tokens, 0.0),
                             "all": spec("all"), "none": spec("none")}, repeats, key)
    c = t["draft"] / t["teacher"]
    rows = [[name, "teacher alone", "-", f"{new_tokens / t['teacher']:.1f}", "1.00x", "1.00x"],
            ["", f"draft alone (c = {c:.3f})", "-", f"{new_tokens / t['draft']:.1f}",
             f"{t['teacher'] / t['draft']:.2f}x", "-"]]
    for which, what, a in (("all", "all drafts pass", 1.0), ("none", "no draft passes", 0.0)):
        predicted = (g + 1 if a else 1) / (g * c + 1)
        rows.append(["", f"speculative, {what}", f"{new_tokens / stats[which]['calls']:.2f}",
                     f"{new_tokens / t[which]:.1f}", f"{t['teacher'] / t[which]:.2f}x",
                     f"{predicted:.2f}x"])
    return rows


def main():
    rows = [row for key in shapes.split(",") for row in shape_rows(key)]
    print(f"\ngreedy, {prompt_len} + {new_tokens} tokens, g = {draft_len}, float32, CPU "
          f"({harness.machine()}); medians of {repeats} after a warm-up, the runs interleaved\n")
    harness.table(["shapes", "generation", "tokens per teacher call", "tokens/s",
                   "vs teacher alone", "predicted (1 - a^(g+1)) / ((1 - a)(g c + 1))"], rows)


if __name__ == "__main__":
    main()
