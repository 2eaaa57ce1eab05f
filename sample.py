"""
Generate text from the distilled student, or from any Qwen2 checkpoint (the teacher too):

    python sample.py                                   # the student in out/
    python sample.py --init_from=Qwen/Qwen2.5-0.5B     # the teacher, through our model.py
    python sample.py --init_from=out/hf --start=FILE:prompt.txt --temperature=0
    python sample.py --init_from=Qwen/Qwen2.5-1.5B --draft=out   # the student drafts (speculative)
"""

import sys
import time

import torch

import speculative
from checkpoint import load_model
from common import check_device, die, one_line_errors, phase
from configurator import DEVICE, at_least, check, configure, one_of
from hf import load_tokenizer
from model import DTYPES, auto_dtype

# -----------------------------------------------------------------------------
init_from = "out"  # a distill.py out_dir (its ckpt.pt), a Hugging Face directory, or a hub id
start = "维基百科是"  # the prompt, or FILE:path to read it from a file
num_samples = 3  # samples to draw, one after the other
max_new_tokens = 200  # tokens per sample (fewer if the model's max_seq_len is reached first)
temperature = 0.8  # 0 = greedy; < 1 sharper, > 1 more random
top_k = 200  # keep only the k most likely tokens (None: all)
top_p = None  # nucleus sampling: keep the most likely tokens up to this mass (None: all)
seed = 1337
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "auto"  # float32 | bfloat16 | float16; auto: CPU float32, sm80+ bfloat16, else float16
draft = None  # speculative: a draft of init_from's vocabulary (out_dir, HF dir, hub id)
draft_len = 4  # tokens the draft proposes per call of init_from's model
config = configure(globals())
check(config, {
    "init_from": ((lambda v: isinstance(v, str) and v != ""), "a directory or a hub id"),
    "start": ((lambda v: isinstance(v, str)), "text, or FILE:path"), "num_samples": at_least(1),
    "max_new_tokens": at_least(1), "temperature": at_least(0), "top_k": at_least(1, or_none=True),
    "top_p": (lambda v: v is None or 0 < v <= 1, "in (0, 1] or None"), "seed": at_least(0),
    "device": DEVICE, "dtype": one_of("auto", *DTYPES),
    "draft": ((lambda v: v is None or isinstance(v, str) and v != ""),
              "a directory or a hub id, or None"),
    "draft_len": at_least(1)})
# -----------------------------------------------------------------------------


def main():
    torch.manual_seed(seed)
    check_device(device)
    one_line_errors()  # running out of memory, Ctrl-C: one line
    dt = auto_dtype(device) if dtype == "auto" else DTYPES[dtype]
    phase("loading the model", "a smaller --dtype (float16 or bfloat16)", device)
    try:
        model, tok_path = load_model(init_from, device, dt)
        tokenizer, eos_id = load_tokenizer(tok_path or "")
        draft_model = load_model(draft, device, dt)[0] if draft else None
    except (OSError, ValueError, KeyError) as e:
        die(f"{e}".splitlines()[0])
    prompt = start
    if prompt.startswith("FILE:"):
        try:
            with open(prompt[5:], encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            die(f"cannot read the prompt file: {e}")
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if not ids:
        die("the prompt is empty; give some text with --start")
    if len(ids) >= model.config.max_seq_len:
        die(f"the prompt is {len(ids)} tokens, and the model takes {model.config.max_seq_len} in "
            f"all: shorten it")
    x = torch.tensor([ids], dtype=torch.long, device=device)
    if draft_model is not None and draft_model.config.vocab_size != model.config.vocab_size:
        die(f"the draft {draft} has {draft_model.config.vocab_size} vocabulary rows and "
            f"{init_from} {model.config.vocab_size}: a draft needs the same vocabulary")
    print(f"{init_from}: {model.num_params():,} parameters, {dt}, {device}", file=sys.stderr)
    if draft_model is not None:
        print(f"draft {draft}: {draft_model.num_params():,} parameters, {draft_len} tokens per "
              f"call", file=sys.stderr)
    room = model.config.max_seq_len - len(ids)
    if max_new_tokens > room:
        print(f"note: stopping after {room} new tokens, at max_seq_len={model.config.max_seq_len}",
              file=sys.stderr)
    phase("generation", f"a shorter prompt or --max_new_tokens (now {max_new_tokens}): the KV "
          f"cache holds them all", device)
    for _ in range(num_samples):
        out, stats, t0 = list(ids), {}, time.time()
        shown = tokenizer.decode(ids, skip_special_tokens=True)
        print(shown, end="", flush=True)
        sampling = (max_new_tokens, temperature, top_k, top_p, eos_id)
        tokens = model.stream(x, *sampling) if draft_model is None else \
            speculative.stream(model, draft_model, x, *sampling, draft_len, stats)
        for tok in tokens:
            if tok.item() == eos_id:
                break
            out.append(tok.item())
            text = tokenizer.decode(out, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # hold back a character whose bytes are still arriving
                print(text[len(shown):], end="", flush=True)
                shown = text
        new = len(out) - len(ids)
        print("\n---------------", flush=True)
        print(f"{new} tokens, {new / (time.time() - t0):.1f} tokens/s", file=sys.stderr)
        if stats:
            print(f"draft: {stats['accepted']}/{stats['drafted']} drafted tokens accepted "
                  f"({stats['accepted'] / max(stats['drafted'], 1):.1%}), "
                  f"{(stats['accepted'] + stats['calls']) / stats['calls']:.2f} tokens per teacher "
                  f"call", file=sys.stderr)


if __name__ == "__main__":
    main()
