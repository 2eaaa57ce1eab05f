"""
How much of the teacher did the student learn, and how fast does it make the teacher as a draft?

    python eval.py --student=out --teacher=Qwen/Qwen2.5-0.5B        # on data/wiki_zh/val.bin
    python eval.py --student=out_kd,out_ce --data=held_out.jsonl     # several students; plain text

1. Teacher-forced, on held-out tokens, for the teacher and each student: val CE and perplexity; per
   student KL(teacher || student), top-1 agreement (the acceptance of greedy drafting) and the
   acceptance a = sum_v min(p_v, q_v) = 1 - TV(p, q), p the teacher's and q the student's
   distribution, at temperature 1 and at the sampling settings below.
2. Real speculative decoding (speculative.generate) from held-out prompts at each draft length g:
   tokens per teacher call, the drafts kept, c (the draft's time per token over the teacher's, both
   alone, prefill included), the speed-up that a and c predict,

       speed-up = (1 - a^(g+1)) / ((1 - a) (g c + 1))            (Leviathan et al. 2023)

   and the measured wall-clock speed-up over the teacher alone (same prompts, device, tokens).
3. Along the student's own samples (where a draft lives): from `samples` held-out prompts each
   student samples new_tokens tokens at the sampling settings; a at each offset k after the prompt
   (the teacher's and the student's distributions read along the student's tokens), the teacher's
   mean NLL of those tokens, and how much they repeat themselves (repeated 4-grams).

Tables on the terminal; the same numbers in the JSON file `out`.
"""

import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import speculative
from checkpoint import load_model
from common import atomic_write, check_device, die, one_line_errors, phase, progress
from configurator import DEVICE, at_least, check, configure, one_of
from data import read_files, read_meta
from hf import check_tokenizers, load_tokenizer
from model import DTYPES, auto_dtype, filtered_probs

# -----------------------------------------------------------------------------
student = "out"  # a distill.py out_dir, a Hugging Face directory or a hub id; comma-separated
teacher = "Qwen/Qwen2.5-0.5B"  # the model the students draft for (the same kinds of path)
data = "data/wiki_zh"  # a prepare.py data_dir (its val.bin), or a held-out .txt/.jsonl file
block_size = 256  # tokens per teacher-forced window
windows = 64  # teacher-forced windows of val, evenly spread (fewer if val is shorter)
batch_size = 4  # windows per forward pass
chunk_size = 128  # tokens whose logits exist at once: never (batch, block, vocab)
temperature = 1.0  # the sampling settings of the second acceptance and of generation; 0 = greedy
top_k = None  # keep only the k most likely tokens (None: all)
top_p = None  # nucleus: the most likely tokens up to this mass (None: all)
draft_lens = "1,2,4,8"  # draft lengths g to generate with, comma-separated
prompts = 8  # held-out prompts to generate from (each model alone, speculative at every g, sampled)
prompt_len = 32  # tokens per prompt
new_tokens = 64  # tokens generated per prompt (EOS does not stop it: every run makes as many)
samples = 64  # held-out prompts each student samples from in 3 (one batch per student: cheap)
seed = 1337
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "auto"  # float32 | bfloat16 | float16; auto: CPU float32, sm80+ bfloat16, else float16
out = None  # the numbers as JSON; None: eval.json in the first student's directory (a hub id: here)
config = configure(globals())
check(config, {
    "student": ((lambda v: isinstance(v, str) and all(v.split(","))),
                "one or more paths, comma-separated"),
    "teacher": ((lambda v: isinstance(v, str) and v != ""), "a directory or a hub id"),
    "data": ((lambda v: isinstance(v, str) and v != ""), "a data_dir or a .txt/.jsonl file"),
    "block_size": at_least(2), "windows": at_least(1), "batch_size": at_least(1),
    "chunk_size": at_least(1), "temperature": at_least(0), "top_k": at_least(1, or_none=True),
    "top_p": (lambda v: v is None or 0 < v <= 1, "in (0, 1] or None"),
    "draft_lens": ((lambda v: all(int(g) >= 1 for g in str(v).split(","))),
                   "draft lengths >= 1, comma-separated"),
    "prompts": at_least(0), "prompt_len": at_least(1), "new_tokens": at_least(1),
    "samples": at_least(0),
    "seed": at_least(0), "device": DEVICE, "dtype": one_of("auto", *DTYPES),
    "out": ((lambda v: v is None or isinstance(v, str) and v), "a path or None")})
# -----------------------------------------------------------------------------


def held_out(tok_path):
    """The held-out token ids, int64: a data_dir's val.bin, or a text file through the teacher's
    tokenizer (each document followed by EOS, as prepare.py writes the bins)."""
    if os.path.isdir(data):
        try:
            meta, dtype = read_meta(data)
        except ValueError as e:
            die(str(e))
        ids = np.fromfile(os.path.join(data, "val.bin"), dtype=dtype).astype(np.int64)
        found = tok_path and check_tokenizers(tok_path, meta.get("tokenizer"), meta.get("eos_id"))
        if found and not found[1]:
            die(f"the teacher's tokenizer ({teacher}) {found[0]} the data's "
                f"({meta.get('tokenizer')}): prepare held-out data with the teacher's tokenizer, "
                f"or give a text file as --data")
        if found:
            print(f"warning: {found[0]}", file=sys.stderr)
        return ids
    if os.path.splitext(data)[1] not in (".txt", ".jsonl"):
        die(f"--data={data}: neither a data_dir nor a .txt/.jsonl file")
    if not os.path.exists(data):
        die(f"--data={data}: no such file")
    try:
        tok, eos = load_tokenizer(tok_path or "")
    except ValueError as e:
        die(f"the teacher's tokenizer: {e}")
    ids = []
    try:
        for text in read_files([data], "text"):
            ids += tok.encode(text, add_special_tokens=False) + [eos]
    except ValueError as e:  # a damaged file (data.py): one line
        die(str(e))
    return np.array(ids, dtype=np.int64)


KEYS = ("ce", "kl", "top1", "accept_t1", "accept")  # per student, summed over tokens


def teacher_forced(t_model, models, x, y, sampling, chunk):
    """Sums over the tokens of x (B, T) -> y: the teacher's CE, and per student its CE, KL(p || q),
    top-1 agreements, sum min(p, q) at temperature 1 and after sampling; chunk tokens at a time."""
    h_t = t_model(x).flatten(0, 1)
    h_s = [m(x).flatten(0, 1) for m in models]
    y = y.flatten()
    teacher_ce, sums = 0.0, [dict.fromkeys(KEYS, 0.0) for _ in models]
    for i in range(0, y.numel(), chunk):
        z_t, yc = t_model.logits(h_t[i:i + chunk]), y[i:i + chunk]
        logp = z_t.log_softmax(-1)
        p, p_s = logp.exp(), filtered_probs(z_t, *sampling)
        teacher_ce += F.cross_entropy(z_t, yc, reduction="sum").item()
        for m, h, s in zip(models, h_s, sums):
            z_s = m.logits(h[i:i + chunk])
            logq = z_s.log_softmax(-1)
            s["ce"] += F.cross_entropy(z_s, yc, reduction="sum").item()
            s["kl"] += (p * (logp - logq)).sum().item()
            s["top1"] += (z_t.argmax(-1) == z_s.argmax(-1)).sum().item()
            s["accept_t1"] += torch.minimum(p, logq.exp()).sum().item()
            s["accept"] += torch.minimum(p_s, filtered_probs(z_s, *sampling)).sum().item()
    return teacher_ce, sums


def own_samples(t_model, m, starts, sampling):
    """The student m samples new_tokens after each of starts (1, plen) at the sampling settings;
    along its tokens: a at each offset (the teacher's and its distributions, after sampling), the
    teacher's NLL of each token, and the share of repeated 4-grams in each sample."""
    x = m.generate(torch.cat(starts), new_tokens, *sampling)  # (P, plen + new): one batch
    plen, new = starts[0].size(1), x.size(1) - starts[0].size(1)
    h_t, h_s = t_model(x[:, :-1]), m(x[:, :-1])
    accept, nll = [], []
    for k in range(new):  # the position plen - 1 + k predicts generated token k
        pos, tok = plen - 1 + k, x[:, plen + k]
        z_t, z_s = t_model.logits(h_t[:, pos]), m.logits(h_s[:, pos])
        p, q = filtered_probs(z_t, *sampling), filtered_probs(z_s, *sampling)
        accept.append(torch.minimum(p, q).sum(-1).mean().item())
        nll.append(-z_t.log_softmax(-1).gather(1, tok[:, None]).mean().item())
    grams = [[tuple(row[i:i + 4]) for i in range(len(row) - 3)] for row in x[:, plen:].tolist()]
    repeated = [1 - len(set(g)) / len(g) for g in grams if g]
    return dict(accept_by_offset={k + 1: a for k, a in enumerate(accept)},
                accept=float(np.mean(accept)), teacher_nll=float(np.mean(nll)),
                repeated_4grams=float(np.mean(repeated)) if repeated else None,
                samples=x.size(0), tokens=new)


def timed(fn, *args, **kwargs):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def predicted(a, g, c):  # (tokens per teacher call, speed-up) from acceptance a, length g, cost c
    tokens = g + 1 if a >= 1 else (1 - a ** (g + 1)) / (1 - a)
    return tokens, tokens / (g * c + 1)


def main():
    torch.manual_seed(seed)
    check_device(device)
    one_line_errors()  # a failed write, running out of memory, Ctrl-C: one line
    dt = auto_dtype(device) if dtype == "auto" else DTYPES[dtype]
    sampling = (temperature, top_k, top_p)
    gs = [int(g) for g in str(draft_lens).split(",")]
    names = student.split(",")
    phase("loading the models", "a smaller --dtype (float16 or bfloat16)", device)
    try:
        t_model, tok_path = load_model(teacher, device, dt)
        students = [load_model(name, device, dt)[0] for name in names]
    except (OSError, ValueError, KeyError) as e:
        die(f"{e}".splitlines()[0])
    V = t_model.config.vocab_size
    for name, m in zip(names, students):
        if m.config.vocab_size != V:
            die(f"the student {name} has {m.config.vocab_size} vocabulary rows and the teacher "
                f"{V}: a draft needs the teacher's vocabulary (distill from this teacher)")
    ids = held_out(tok_path)
    if ids.size and ids.max() >= V:
        die(f"{data} holds token id {ids.max()}, beyond the teacher's {V} rows: data of another "
            f"tokenizer?")
    block = min(block_size, t_model.config.max_seq_len - 1,
                *(m.config.max_seq_len - 1 for m in students))
    n = len(ids) // (block + 1)
    if n == 0:
        die(f"{data} holds {len(ids)} held-out tokens, fewer than one window of {block + 1}: give "
            f"more text")
    count = min(windows, n)
    win = ids[:n * (block + 1)].reshape(n, block + 1)[np.arange(count) * n // count]
    win = torch.from_numpy(win).to(device)
    print(f"teacher {teacher}: {t_model.num_params():,} parameters; {len(names)} student(s); "
          f"{count} windows of {block} tokens from {data}; {dt}, {device}", file=sys.stderr)

    # 1. teacher-forced
    phase("the teacher-forced pass", f"lower --batch_size (now {batch_size}) or --chunk_size "
          f"(now {chunk_size})", device)
    teacher_ce, total = 0.0, [dict.fromkeys(KEYS, 0.0) for _ in students]
    bar = progress(count * block, "teacher-forced", unit="tokens")
    with torch.no_grad():
        for i in range(0, count, batch_size):
            x = win[i:i + batch_size]
            ce, sums = teacher_forced(t_model, students, x[:, :-1], x[:, 1:], sampling, chunk_size)
            teacher_ce += ce
            for acc, s in zip(total, sums):
                for k in acc:
                    acc[k] += s[k]
            bar.update(x[:, 1:].numel())
    bar.close()
    tokens = count * block
    result = {"teacher": teacher, "data": data, "tokens": tokens, "settings": config,
              "teacher_val_ce": teacher_ce / tokens, "students": {}}
    for name, acc in zip(names, total):
        r = {k: v / tokens for k, v in acc.items()}
        r["val_ce"] = r.pop("ce")
        r["val_ppl"] = float(np.exp(r["val_ce"]))
        result["students"][name] = r

    # 2. speculative generation from held-out prompts (the starts of evenly spread windows)
    phase("generation", f"lower --prompt_len (now {prompt_len}) or --new_tokens (now "
          f"{new_tokens})", device)
    plen = min(prompt_len, block)
    starts = [win[i * count // prompts, :plen][None] for i in range(prompts)] if prompts else []
    bar = progress(len(starts) * len(students) * (len(gs) + 2), "generation", unit="runs")
    for name, m in zip(names, students):
        gen = dict(teacher_s=0.0, draft_s=0.0, tokens=0, draft_tokens=0,
                   g={g: dict(s=0.0, drafted=0, accepted=0, calls=0) for g in gs})
        if starts:  # warm-up: the first calls of a model pay for allocations, kernels, caches
            for fn in (t_model, m):
                fn.generate(starts[0], 4, *sampling)
        for x in starts:
            made, s = timed(t_model.generate, x, new_tokens, *sampling)
            gen["teacher_s"] += s
            gen["tokens"] += made.size(1) - plen
            made, s = timed(m.generate, x, new_tokens, *sampling)  # fewer at its max_seq_len
            gen["draft_s"] += s
            gen["draft_tokens"] += made.size(1) - plen
            bar.update(2)
            for g in gs:
                stats = {}
                gen["g"][g]["s"] += timed(speculative.generate, t_model, m, x, new_tokens,
                                          *sampling, draft_len=g, stats=stats)[1]
                for k in ("drafted", "accepted", "calls"):
                    gen["g"][g][k] += stats[k]
                bar.update()
        r = result["students"][name]
        r["c"] = ((gen["draft_s"] / gen["draft_tokens"]) / (gen["teacher_s"] / gen["tokens"])
                  if starts else None)
        r["generation"] = {}
        for g, st in gen["g"].items():
            if not starts:
                break
            pred_tokens, pred_speedup = predicted(r["accept"], g, r["c"])
            r["generation"][g] = dict(tokens_per_call=gen["tokens"] / st["calls"],
                                      acceptance=st["accepted"] / max(st["drafted"], 1),
                                      predicted_tokens_per_call=pred_tokens,
                                      predicted_speedup=pred_speedup,
                                      speedup=gen["teacher_s"] / st["s"], **st)
    bar.close()

    # 3. along the students' own samples, from the starts of evenly spread windows
    own_starts = [win[i * count // min(samples, count), :plen][None]
                  for i in range(min(samples, count))]
    with torch.no_grad():
        for name, m in zip(names, students):
            result["students"][name]["own"] = own_samples(t_model, m, own_starts, sampling) \
                if own_starts else None
    report(result, t_model, students)
    path = out or os.path.join(names[0] if os.path.isdir(names[0]) else ".", "eval.json")
    atomic_write(path, lambda f: f.write(json.dumps(result, indent=1) + "\n"), mode="w")
    print(f"wrote {path}", file=sys.stderr)


def report(result, t_model, students):
    sampled = (f"T {temperature}" + (f", top-k {top_k}" if top_k else "") +
               (f", top-p {top_p}" if top_p else ""))
    plain = temperature == 1 and not top_k and not top_p  # the sampled acceptance is a at T 1
    print(f"\nteacher {result['teacher']}: val CE {result['teacher_val_ce']:.3f} "
          f"(ppl {np.exp(result['teacher_val_ce']):.1f}), {result['tokens']:,} held-out tokens\n")
    print("| student | val CE | val ppl | KL(teacher \\|\\| student) | top-1 agreement "
          "(a greedy) | a at T 1 |" + ("" if plain else f" a at {sampled} |") + "\n" +
          "|---" * (6 if plain else 7) + "|")
    for name, r in result["students"].items():
        print(f"| {name} | {r['val_ce']:.3f} | {r['val_ppl']:.1f} | {r['kl']:.3f} | "
              f"{r['top1']:.3f} | {r['accept_t1']:.3f} |" +
              ("" if plain else f" {r['accept']:.3f} |"))
    if any(r["generation"] for r in result["students"].values()):
        report_generation(result, t_model, students, sampled)
    if any(r["own"] for r in result["students"].values()):
        report_own(result, sampled)


def report_generation(result, t_model, students, sampled):
    print(f"\nspeculative generation at {sampled}: {prompts} prompts of {prompt_len} tokens, "
          f"{new_tokens} new tokens each\n\n| student | g | c | tokens per teacher call "
          f"(predicted) | drafts kept | speed-up predicted | speed-up measured |\n"
          f"|---|---|---|---|---|---|---|")
    for name, r in result["students"].items():
        for g, s in r["generation"].items():
            print(f"| {name} | {g} | {r['c']:.3f} | {s['tokens_per_call']:.2f} "
                  f"({s['predicted_tokens_per_call']:.2f}) | {s['acceptance']:.3f} | "
                  f"{s['predicted_speedup']:.2f}x | {s['speedup']:.2f}x |")
    if max(m.num_params() for m in [t_model, *students]) < 10_000_000:
        print("\nnote: models this small spend their time in Python and the kernels' launches, not "
              "in arithmetic: c and the speed-ups above are noise here (they move between runs); "
              "the acceptance and the tokens per call are not")


def report_own(result, sampled):
    made = min(r["own"]["tokens"] for r in result["students"].values())  # fewer at a max_seq_len
    offsets = [g for g in sorted({1, 2, 4, 8, *(int(g) for g in str(draft_lens).split(","))})
               if g <= made]
    print(f"\nalong each student's own samples at {sampled} ({samples} samples of {made} "
          f"tokens): a at offset k after the prompt, over all tokens, the teacher's NLL of the "
          f"student's tokens, repeated 4-grams\n\n| student | " +
          " | ".join(f"a at {k}" for k in offsets) + " | a | teacher NLL | repeated 4-grams |\n|" +
          "---|" * (len(offsets) + 4))
    for name, r in result["students"].items():
        own = r["own"]
        rep = f"{own['repeated_4grams']:.3f}" if own["repeated_4grams"] is not None else "-"
        print(f"| {name} | " + " | ".join(f"{own['accept_by_offset'][k]:.3f}" for k in offsets) +
              f" | {own['accept']:.3f} | {own['teacher_nll']:.3f} | {rep} |")


if __name__ == "__main__":
    main()
