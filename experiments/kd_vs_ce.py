"""
Does distillation beat plain training at equal steps? A small answer that anyone can reproduce on a CPU.

    python experiments/kd_vs_ce.py                      # data/zh_wiki_sample.jsonl, 3 seeds
    python experiments/kd_vs_ce.py --corpus=my.jsonl --out=out/kd_vs_ce --seeds 1 2 3
    python experiments/kd_vs_ce.py --size=tiny          # a one-minute smoke run (the test suite runs it)

1. A byte-level BPE tokenizer trained on the corpus (a CPU-sized vocabulary), then prepare.py with it.
2. A teacher trained as a plain language model (distill.py --teacher=None), exported to OUT/teacher/hf.
3. Per seed, one student distilled from it (alpha 0.5, T 2.0) and the same student trained on CE only (alpha 0:
   the teacher is still loaded, so val_kl and val_top1 are measured, but it adds nothing to the loss): same
   data, steps and seed.
4. A table of the last eval: teacher val CE; for both students val CE, perplexity, KL to the teacher and top-1
   agreement, mean ± standard deviation over the seeds. Also written to OUT/results.md; plot.py draws the runs.

Each step runs the project's own scripts as a user would; their output goes to OUT/*.log.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# (tokenizer vocabulary, teacher shape and steps, student shape and steps, shared training settings)
SIZES = {
    "full": dict(
        vocab=4096,
        teacher=dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=256, intermediate_size=768, max_iters=1200),
        student=dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=128, intermediate_size=384, max_iters=600),
        train=dict(block_size=128, batch_size=16, learning_rate=2e-3, min_lr=1e-4, warmup_iters=50,
                   eval_interval=100, eval_iters=20),
    ),
    "tiny": dict(
        vocab=300,
        teacher=dict(n_layer=1, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64, max_iters=12),
        student=dict(n_layer=1, n_head=2, n_kv_head=1, n_embd=16, intermediate_size=32, max_iters=8),
        train=dict(block_size=32, batch_size=4, learning_rate=3e-3, min_lr=1e-4, warmup_iters=2,
                   eval_interval=4, eval_iters=2),
    ),
}
METRICS = [("val_ce", "val CE"), ("val_ppl", "val ppl"), ("val_kl", "val KL to teacher"),
           ("val_top1", "top-1 agreement")]


def train_tokenizer(texts, out_dir, vocab_size):
    """A byte-level BPE with <|endoftext|> (id 0) as EOS, saved as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return out_dir


def run(script, args, log_path):
    """Runs one of the project's scripts; its output goes to log_path. Stops the experiment if it fails."""
    t0 = time.time()
    with open(log_path, "w") as log:
        r = subprocess.run([sys.executable, os.path.join(REPO, script), *args], stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        with open(log_path) as f:
            tail = f.read().strip().splitlines()[-1:]
        raise SystemExit(f"kd_vs_ce.py: error: {script} failed ({tail[0] if tail else r.returncode}); see {log_path}")
    print(f"  {os.path.basename(log_path)[:-4]}: {time.time() - t0:.0f} s", flush=True)


def flags(d):
    return [f"--{k}={v}" for k, v in d.items()]


def last_eval(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    evals = [r for r in rows if "val_ce" in r]
    teacher_ce = next((r["teacher_val_ce"] for r in evals if r.get("teacher_val_ce") is not None), None)
    return evals[-1], teacher_ce


def mean_sd(values, digits=3):
    m = statistics.mean(values)
    return f"{m:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=os.path.join(REPO, "data", "zh_wiki_sample.jsonl"),
                   help=".jsonl/.txt/.parquet text (default: data/zh_wiki_sample.jsonl, shipped with the repository)")
    p.add_argument("--out", default="out/kd_vs_ce", help="where everything goes")
    p.add_argument("--size", choices=SIZES, default="full")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--alpha", type=float, default=0.5, help="the distilled students' alpha")
    p.add_argument("--temperature", type=float, default=2.0)
    args = p.parse_args()
    size = SIZES[args.size]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    from prepare import find_files, read_files

    # 1. tokenizer and data
    tok_dir, data_dir = os.path.join(out, "tokenizer"), os.path.join(out, "data")
    print(f"kd_vs_ce ({args.size}): {args.corpus} -> {out}", flush=True)
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        train_tokenizer(read_files(find_files([args.corpus]), "text"), tok_dir, size["vocab"])
    run("prepare.py", [f"--input={args.corpus}", f"--tokenizer={tok_dir}", f"--out_dir={data_dir}", "--force"],
        os.path.join(out, "prepare.log"))
    common = ["--device=cpu", "--dtype=float32", "--teacher_dtype=float32", "--log_interval=10",
              f"--data_dir={data_dir}", *flags(size["train"])]

    # 2. the teacher, a plain language model
    teacher_dir = os.path.join(out, "teacher")
    run("distill.py", common + ["--teacher=None", f"--out_dir={teacher_dir}", "--seed=0",
                                *flags(size["teacher"])], teacher_dir + ".log")

    # 3. the students: distilled and CE-only, seed by seed
    results = {"kd": [], "ce": []}
    teacher_ce = None
    for seed in args.seeds:
        for name, alpha in (("kd", args.alpha), ("ce", 0.0)):
            run_dir = os.path.join(out, f"{name}_seed{seed}")
            run("distill.py", common + [f"--teacher={teacher_dir}/hf", f"--out_dir={run_dir}", f"--seed={seed}",
                                        f"--alpha={alpha}", f"--temperature={args.temperature}",
                                        *flags(size["student"])], run_dir + ".log")
            row, tce = last_eval(run_dir)
            results[name].append(row)
            teacher_ce = tce if tce is not None else teacher_ce

    # 4. the table
    lines = [f"teacher val CE: {teacher_ce:.3f} (ppl {2.718281828 ** teacher_ce:.1f}); "
             f"{len(args.seeds)} seed(s) {args.seeds}, {size['student']['max_iters']} steps each, "
             f"alpha {args.alpha}, T {args.temperature}", "",
             "| student | " + " | ".join(title for _, title in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for name, label in (("kd", f"distilled (alpha {args.alpha})"), ("ce", "CE only (alpha 0)")):
        lines.append(f"| {label} | " + " | ".join(mean_sd([r[k] for r in results[name]], 1 if k == "val_ppl" else 3)
                                            for k, _ in METRICS) + " |")
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"teacher_val_ce": teacher_ce, **results}, f, indent=1)


if __name__ == "__main__":
    main()
