"""
Does distillation beat plain training at equal steps, and does a student cut out of the teacher (init_from=prune)
beat a random start? A small answer that anyone can reproduce on a CPU.

    python experiments/kd_vs_ce.py                      # data/zh_wiki_sample.jsonl, 3 seeds, the arms kd ce prune
    python experiments/kd_vs_ce.py --arms kd prune prune:learning_rate=5e-4 --seeds 1 2 3 --jobs 2
    python experiments/kd_vs_ce.py --size=tiny          # a one-minute smoke run into out/kd_vs_ce_tiny

1. A byte-level BPE tokenizer of Qwen2's pipeline trained on the corpus (a CPU-sized vocabulary), then prepare.py.
2. A teacher trained as a plain language model (distill.py --teacher=None), exported to OUT/teacher/hf.
3. Per seed, the same student trained in each arm, with the same data, steps and seed:
   kd     distilled from the teacher (alpha 0.5, T 2.0), from a random start;
   ce     CE only (alpha 0: the teacher is still loaded, so val_kl and val_top1 are measured, but adds nothing);
   prune  distilled as kd, starting from the teacher's pruned weights (init_from=prune), at its own learning rate;
   cache  distilled as kd, from a sampled teacher cache (teacher_cache: 50 draws per token), one per seed;
   topk   distilled as kd, from a top-k teacher cache of about the same bytes per token (--topk ids).
   An arm NAME:key=value,key=value adds distill.py settings to arm NAME (its own runs and row): prune:prune_layers=even.
4. A table of the last eval, mean ± standard deviation over the seeds: val CE at step 0 and at the end,
   perplexity, KL to the teacher, top-1 agreement, and the steps each arm took to reach the kd arm's final val CE
   (seed by seed). Also written to OUT/results.md and OUT/results.json; plot.py draws the runs.

Each step runs the project's own scripts as a user would; their output goes to OUT/*.log. Each size has its own OUT
(out/kd_vs_ce, out/kd_vs_ce_tiny); one made for another size is refused. OUT keeps the tokenizer, the data, the
teacher and every finished student, each with the settings it was made with (settings.json, written last): a rerun
reuses what was made with the settings asked for now, and rebuilds the rest (an interrupted step, other settings,
or what depends on a rebuilt step), saying so.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# (tokenizer vocabulary, teacher shape and steps, student shape and steps, shared training settings). The student is
# prunable from the teacher: the same head_dim (64), fewer of everything.
SIZES = {
    "full": dict(
        vocab=4096,
        teacher=dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=256, intermediate_size=768, max_iters=1200),
        student=dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=128, intermediate_size=384, max_iters=600),
        train=dict(block_size=128, batch_size=16, learning_rate=2e-3, min_lr=1e-4, warmup_iters=50,
                   eval_interval=50, eval_iters=20, prune_windows=512),
    ),
    "tiny": dict(
        vocab=300,
        teacher=dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64, max_iters=12),
        student=dict(n_layer=1, n_head=1, n_kv_head=1, n_embd=16, intermediate_size=32, max_iters=8),
        train=dict(block_size=32, batch_size=4, learning_rate=3e-3, min_lr=1e-4, warmup_iters=2,
                   eval_interval=4, eval_iters=2, prune_windows=8),
    ),
}
PRUNE_LR = {"full": 2e-3, "tiny": 3e-3}  # the pruned start's learning rate: the scratch arms' (docs/pruning.md has the sweep)
METRICS = [("val_ce", "val CE"), ("val_ppl", "val ppl"), ("val_kl", "val KL to teacher"),
           ("val_top1", "top-1 agreement")]


def arms(alpha, prune_lr, topk):  # {out} and {seed} in a setting's value: the run's; labels take the settings
    return {"kd": ("distilled (alpha {alpha})", dict(alpha=alpha)),
            "ce": ("CE only (alpha 0)", dict(alpha=0.0)),
            "prune": ("pruned, then distilled (lr {learning_rate})",
                      dict(alpha=alpha, init_from="prune", learning_rate=prune_lr)),
            "cache": ("distilled from a sampled teacher cache (50 draws)",
                      dict(alpha=alpha, teacher_cache="{out}/cache_seed{seed}")),
            "topk": (f"distilled from a top-{topk} teacher cache",
                     dict(alpha=alpha, teacher_cache="{out}/topk{topk}_seed{seed}", cache_topk=topk))}


def run(script, args, log_path, threads=None):
    """Runs one of the project's scripts; its output goes to log_path. Stops the experiment if it fails."""
    t0 = time.time()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(log_path, "w") as log:
        r = subprocess.run([sys.executable, os.path.join(REPO, script), *args], stdout=log, stderr=subprocess.STDOUT,
                           env=env)
    if r.returncode != 0:
        with open(log_path) as f:
            tail = f.read().strip().splitlines()[-1:]
        raise SystemExit(f"kd_vs_ce.py: error: {script} failed ({tail[0] if tail else r.returncode}); see {log_path}")
    print(f"  {os.path.basename(log_path)[:-4]}: {time.time() - t0:.0f} s", flush=True)


def reuse(path, record, what):
    """True if path holds a finished step made with these settings (its settings.json); otherwise path is cleared
    for a rebuild, and the line says why."""
    try:
        with open(os.path.join(path, "settings.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = None
    if saved == json.loads(json.dumps(record)):
        print(f"  {what}: reusing {path}", flush=True)
        return True
    if os.path.exists(path):
        why = "made with other settings" if saved else "unfinished, or of an older kd_vs_ce.py"
        print(f"  {what}: {path} was {why}: rebuilding it", flush=True)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return False


def finished(path, record):  # the last file a step writes: its settings, which mark it as done
    with open(os.path.join(path, "settings.json.tmp"), "w") as f:
        json.dump(record, f, indent=1)
    os.replace(os.path.join(path, "settings.json.tmp"), os.path.join(path, "settings.json"))


def flags(d):
    return [f"--{k}={v}" for k, v in d.items()]


def evals(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "val_ce" in r]


def exact_eval(run_dir, teacher_dir, data_dir, train, temperature):
    """val_kl and val_top1 of a run's student against the teacher itself, on distill.py's val windows: for the runs
    that trained from a cache, whose own log holds the cache's estimate (and, for top-k, no estimate of KL at all)."""
    import numpy as np
    import torch

    import hf
    from loss import distill_loss

    t, s = (hf.load(os.path.join(d, "hf"), verbose=False) for d in (teacher_dir, run_dir))
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    block, batch = train["block_size"], train["batch_size"]
    val = np.fromfile(os.path.join(data_dir, "val.bin"), dtype=meta["dtype"]).astype(np.int64)
    n = len(val) // (block + 1)
    count = min(train["eval_iters"] * batch, n)
    windows = torch.from_numpy(val[:n * (block + 1)].reshape(n, block + 1)[np.arange(count) * n // count])
    kl = top1 = tokens = 0.0
    with torch.no_grad():
        for i in range(0, count, batch):
            x, y = windows[i:i + batch, :-1], windows[i:i + batch, 1:]
            _, st = distill_loss(s(x), s.lm_head.weight, t(x), t.lm_head.weight, y, temperature=temperature,
                                 vocab_size=meta["vocab_size"], normalizer=1)
            kl, top1, tokens = kl + st["kl"].item(), top1 + st["top1"].item(), tokens + st["n"].item()
    return kl / tokens, top1 / tokens


def mean_sd(values, digits=3):
    m = statistics.mean(values)
    return f"{m:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=os.path.join(REPO, "data", "zh_wiki_sample.jsonl"),
                   help=".jsonl/.txt/.parquet text (default: data/zh_wiki_sample.jsonl, shipped with the repository)")
    p.add_argument("--out", help="where everything goes (default: out/kd_vs_ce, out/kd_vs_ce_tiny for --size=tiny)")
    p.add_argument("--size", choices=SIZES, default="full")
    p.add_argument("--arms", nargs="+", default=["kd", "ce", "prune"], help="kd, ce, prune, or NAME:key=value,...")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--alpha", type=float, default=0.5, help="the distilled students' alpha")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--prune_lr", type=float, help="the pruned start's learning rate (default: the size's)")
    p.add_argument("--topk", type=int, default=49, help="the topk arm's ids per token: as many as the sampled cache "
                   "keeps on average (49 of 50 draws for the full size's teacher at T 2)")
    p.add_argument("--jobs", type=int, default=1, help="students trained at once (each on cores / jobs threads)")
    args = p.parse_args()
    size = SIZES[args.size]
    known = arms(args.alpha, args.prune_lr or PRUNE_LR[args.size], args.topk)
    specs = {}
    for spec in args.arms:
        name, _, extra = spec.partition(":")
        if name not in known:
            raise SystemExit(f"kd_vs_ce.py: error: unknown arm {name!r}; one of {', '.join(known)}")
        label, settings = known[name]
        given = dict(kv.split("=", 1) for kv in extra.split(",") if kv)
        settings = dict(settings, **given)
        label = label.format(**settings) + "".join(f", {k}={v}" for k, v in given.items() if "{" + k + "}" not in label)
        specs[spec.replace(":", "_").replace(",", "_")] = (label, settings)
    out = os.path.abspath(args.out or ("out/kd_vs_ce" if args.size == "full" else f"out/kd_vs_ce_{args.size}"))
    try:
        with open(os.path.join(out, "size.json")) as f:
            made_for = json.load(f)["size"]
    except (OSError, ValueError, KeyError):
        made_for = None
    if made_for not in (None, args.size):
        raise SystemExit(f"kd_vs_ce.py: error: {out} holds the {made_for} size's runs; give --size={made_for}, or "
                         f"another --out for --size={args.size}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "size.json"), "w") as f:
        json.dump({"size": args.size}, f)
    from data import find_files, read_files
    from hf import train_bpe

    # 1. tokenizer and data
    tok_dir, data_dir = os.path.join(out, "tokenizer"), os.path.join(out, "data")
    print(f"kd_vs_ce ({args.size}): {args.corpus} -> {out}", flush=True)
    # every step's record holds the records of the steps it depends on: a rebuilt step rebuilds what follows
    tok_rec = dict(corpus=os.path.abspath(args.corpus), vocab=size["vocab"])
    if not reuse(tok_dir, tok_rec, "tokenizer"):
        train_bpe(read_files(find_files([args.corpus]), "text"), tok_dir, size["vocab"])
        finished(tok_dir, tok_rec)
    data_rec = dict(tokenizer=tok_rec, args=[f"--input={args.corpus}", f"--tokenizer={tok_dir}",
                                             f"--out_dir={data_dir}"])
    if not reuse(data_dir, data_rec, "data"):
        run("prepare.py", data_rec["args"], os.path.join(out, "prepare.log"))
        finished(data_dir, data_rec)
    common = ["--device=cpu", "--dtype=float32", "--teacher_dtype=float32", "--log_interval=10",
              f"--data_dir={data_dir}", *flags(size["train"])]

    # 2. the teacher, a plain language model
    teacher_dir = os.path.join(out, "teacher")
    teacher_rec = dict(data=data_rec, args=common + ["--teacher=None", f"--out_dir={teacher_dir}", "--seed=0",
                                                     *flags(size["teacher"])])
    if not reuse(teacher_dir, teacher_rec, "teacher"):  # distill.py would refuse to start over an interrupted one
        run("distill.py", teacher_rec["args"], teacher_dir + ".log")
        finished(teacher_dir, teacher_rec)
        for _, settings in specs.values():  # an earlier teacher's caches, at the same paths: gone
            for seed in args.seeds if "teacher_cache" in settings else ():
                shutil.rmtree(settings["teacher_cache"].format(out=out, seed=seed, topk=args.topk), ignore_errors=True)

    # 3. the students: every arm, seed by seed, args.jobs at a time
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None

    def student(job):
        name, seed = job
        run_dir = os.path.join(out, f"{name}_seed{seed}")
        rec = dict(teacher=teacher_rec, label=specs[name][0],
                   args=common + [f"--teacher={teacher_dir}/hf", f"--out_dir={run_dir}", f"--seed={seed}",
                                  f"--temperature={args.temperature}", *flags(size["student"]),
                                  *(f.format(out=out, seed=seed, topk=args.topk) for f in flags(specs[name][1]))])
        if not reuse(run_dir, rec, f"{name}_seed{seed}"):
            run("distill.py", rec["args"], run_dir + ".log", threads)
            finished(run_dir, rec)
        rows = evals(run_dir)
        if "teacher_cache" in specs[name][1]:  # its val_kl is the cache's estimate: measure against the teacher
            rows[-1]["val_kl"], rows[-1]["val_top1"] = exact_eval(run_dir, teacher_dir, data_dir, size["train"],
                                                                  args.temperature)
        return rows

    jobs = [(name, seed) for seed in args.seeds for name in specs]
    with ThreadPoolExecutor(args.jobs) as pool:
        curves = dict(zip(jobs, pool.map(student, jobs)))
    teacher_ce = next(rows[0]["teacher_val_ce"] for rows in curves.values())

    # 4. the table
    def reached(name, seed):  # the first eval at or below the kd student's final val CE (same seed)
        goal = curves[("kd", seed)][-1]["val_ce"]
        return next((r["iter"] for r in curves[(name, seed)] if r["val_ce"] <= goal), None)

    header = ["student", "val CE at step 0"] + [title for _, title in METRICS]
    if "kd" in specs:
        header.append("steps to kd's final val CE")
    lines = [f"teacher val CE: {teacher_ce:.3f} (ppl {2.718281828 ** teacher_ce:.1f}); "
             f"{len(args.seeds)} seed(s) {args.seeds}, {size['student']['max_iters']} steps each, "
             f"alpha {args.alpha}, T {args.temperature}", "",
             "| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
    for name, (label, _) in specs.items():
        runs = [curves[(name, s)] for s in args.seeds]
        cells = [label, mean_sd([r[0]["val_ce"] for r in runs])]
        cells += [mean_sd([r[-1][k] for r in runs], 1 if k == "val_ppl" else 3) for k, _ in METRICS]
        if "kd" in specs:
            cells.append(", ".join(str(reached(name, s)) if reached(name, s) is not None else "-" for s in args.seeds))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"teacher_val_ce": teacher_ce, "arms": {name: {"label": label, "settings": settings}
                                                          for name, (label, settings) in specs.items()},
                   "evals": {f"{name}_seed{seed}": rows for (name, seed), rows in curves.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
