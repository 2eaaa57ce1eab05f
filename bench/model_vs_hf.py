"""
model.py against transformers' Qwen2ForCausalLM on the same random weights: a train step (logits
and CE, or hidden states and the fused CE of distill_loss) and greedy generation with a KV cache.

    python bench/model_vs_hf.py    # ~3-4 min on 2 cores; two student-123m models in one process

The sides run in turn, medians of `repeats` after a warm-up; a line per phase as it goes.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402
import hf  # noqa: E402
from configurator import at_least, check, configure, one_of  # noqa: E402
from loss import distill_loss  # noqa: E402
from model import CONFIGS, Transformer  # noqa: E402

# -----------------------------------------------------------------------------
model = "student-123m"  # the shape: a key of model.CONFIGS, or tiny (a smoke run)
T = 512  # tokens of the train step (batch 1)
repeats = 3  # timed rounds of each phase, after a warm-up
prompt_len = 32  # generation: the prompt's tokens
new_tokens = 128  # generation: the tokens generated
config = configure(globals())
check(config, {"model": one_of(*CONFIGS, "tiny"), "T": at_least(1), "repeats": at_least(1),
               "prompt_len": at_least(1), "new_tokens": at_least(1)})
# -----------------------------------------------------------------------------


def main():
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # its "Loading weights" bar
    torch.manual_seed(0)
    cfg = harness.model_config(model)
    harness.say(f"{model}: random weights, exported, loaded by model.py and by transformers")
    with tempfile.TemporaryDirectory() as d:
        hf.save(Transformer(cfg, verbose=False), d)
        ours = hf.load(d)  # eval mode, as transformers': neither has dropout
        ref = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa")
    x = torch.randint(0, min(harness.VOCAB, cfg.vocab_size), (1, T + 1))
    idx, targets = x[:, :-1], x[:, 1:]

    def ref_step():  # transformers shifts the labels itself
        ref(idx, labels=idx).loss.backward()

    def ours_step():
        F.cross_entropy(ours.lm_head(ours(idx)).flatten(0, 1), targets.flatten()).backward()

    def fused_step():
        distill_loss(ours(idx), ours.lm_head.weight, None, None, targets, alpha=0.0)[0].backward()

    t = harness.interleaved({"ref": ref_step, "ours": ours_step, "fused": fused_step}, repeats,
                            f"train step, T={T}")
    prompt = x[:, :prompt_len]
    g = harness.interleaved({
        "ref": lambda: ref.generate(prompt, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False),
        "ours": lambda: ours.generate(prompt, new_tokens, temperature=0),
    }, repeats, f"greedy generation, {prompt_len} + {new_tokens} tokens")
    print(f"\n{model}, float32, CPU ({harness.machine()})\n")
    harness.table(["what", "tokens/s", "vs transformers"], [
        [f"train step B=1 T={T}: transformers Qwen2ForCausalLM (sdpa), logits + CE",
         f"{T / t['ref']:.0f}", "1.00x"],
        ["train step: model.py, logits + CE", f"{T / t['ours']:.0f}",
         f"{t['ref'] / t['ours']:.2f}x"],
        ["train step: model.py, hidden states + fused CE (distill_loss)", f"{T / t['fused']:.0f}",
         f"{t['ref'] / t['fused']:.2f}x"],
        [f"greedy generation ({prompt_len} + {new_tokens} tokens): transformers generate",
         f"{new_tokens / g['ref']:.0f}", "1.00x"],
        ["greedy generation: model.py KV cache", f"{new_tokens / g['ours']:.0f}",
         f"{g['ref'] / g['ours']:.2f}x"]])


if __name__ == "__main__":
    main()
