"""
Does distillation beat plain training at equal steps; does a student cut out of the teacher
(init_from=prune) beat a random start; does learning on its own continuations (on-policy) help?
A small answer that anyone can reproduce on a CPU.

    python experiments/kd_vs_ce.py              # the shipped sample, seeds 1,2,3, kd,ce,prune
    python experiments/kd_vs_ce.py --arms=kd,prune,prune:learning_rate=5e-4 --jobs=2
    python experiments/kd_vs_ce.py --arms=kd,onpolicy,prune,prune_onpolicy --drafts
    python experiments/kd_vs_ce.py --size=tiny  # a one-minute smoke run into out/kd_vs_ce_tiny

1. A byte-level BPE tokenizer of Qwen2's pipeline trained on the corpus (a CPU-sized vocabulary),
   then prepare.py.
2. A teacher trained as a plain language model (distill.py --teacher=None), exported to
   OUT/teacher/hf.
3. Per seed, the same student trained in each arm, with the same data, steps and seed:
   kd              distilled from the teacher (alpha 0.5, T 2.0), from a random start;
   ce              CE only (alpha 0: the teacher is still loaded, so val_kl and val_top1 are
                   measured, but adds nothing);
   prune           distilled as kd, starting from the teacher's pruned weights (init_from=prune),
                   at its own learning rate;
   cache           distilled as kd, from a sampled teacher cache (50 draws per token), one per seed;
   topk            distilled as kd, from a top-k teacher cache of about the same bytes per token;
   onpolicy        distilled as kd, and on its own continuations of each window's last quarter
                   (onpolicy_tokens; reverse KL there: onpolicy_kind);
   prune_onpolicy  prune, and on-policy as onpolicy.
   An arm NAME:key=value:key=value adds distill.py settings to arm NAME (its own runs and row):
   prune:prune_layers=even, onpolicy:onpolicy_kind=jsd.
4. A table of the last eval, mean ± standard deviation over the seeds: val CE at step 0 and at the
   end, perplexity, KL to the teacher, top-1 agreement, the steps each arm took to reach the kd
   arm's final val CE (seed by seed) and a step's seconds. In OUT/results.md and OUT/results.json;
   plot.py draws the runs.
5. With drafts: eval.py on every student at temperature 1 and greedy, and draft_table.py's table
   of them as drafts for the teacher (OUT/drafts.md).

Each step runs the project's own scripts as a user would; their output goes to OUT/*.log. Each size
has its own OUT (out/kd_vs_ce, out/kd_vs_ce_tiny); one made for another size is refused. OUT keeps
the tokenizer, the data, the teacher and every finished student, each with the settings it was made
with (settings.json, written last): a rerun reuses what was made with the settings asked for now,
and rebuilds the rest (an interrupted step, other settings, or what depends on a rebuilt step),
saying so.
"""

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
from common import die  # noqa: E402
from configurator import at_least, check, configure, one_of  # noqa: E402
from sizes import PRUNE_LR, SIZES  # noqa: E402

# -----------------------------------------------------------------------------
corpus = os.path.join(REPO, "data", "zh_wiki_sample.jsonl")  # .jsonl/.txt/.parquet text
out = None  # where everything goes; None: out/kd_vs_ce (out/kd_vs_ce_tiny for size=tiny)
size = "full"  # full | tiny
arms = "kd,ce,prune"  # comma-separated: kd, ce, prune, cache, topk, onpolicy, prune_onpolicy
seeds = "1,2,3"  # comma-separated
alpha = 0.5  # the distilled students' alpha
temperature = 2.0
prune_lr = None  # the pruned start's learning rate; None: the size's
topk = 49  # the topk arm's ids per token: as many as the sampled cache keeps on average
jobs = 1  # students trained at once (each on cores / jobs threads)
drafts = False  # also eval.py every student as a draft: at T 1 and greedy, OUT/drafts.md
config = configure(globals())
check(config, {"size": one_of(*SIZES), "jobs": at_least(1), "topk": at_least(1),
               "alpha": at_least(0), "temperature": at_least(0)})
# -----------------------------------------------------------------------------
METRICS = [("val_ce", "val CE"), ("val_ppl", "val ppl"), ("val_kl", "val KL to teacher"),
           ("val_top1", "top-1 agreement")]


def arm_table(alpha, prune_lr, topk, onpolicy_tokens):
    # {out} and {seed} in a setting's value: the run's; labels take the settings
    onpolicy = dict(onpolicy_tokens=onpolicy_tokens, onpolicy_kind="reverse_kl")
    prune = dict(alpha=alpha, init_from="prune", learning_rate=prune_lr)
    return {"kd": ("distilled (alpha {alpha})", dict(alpha=alpha)),
            "ce": ("CE only (alpha 0)", dict(alpha=0.0)),
            "prune": ("pruned, then distilled (lr {learning_rate})", prune),
            "cache": ("distilled from a sampled teacher cache (50 draws)",
                      dict(alpha=alpha, teacher_cache="{out}/cache_seed{seed}")),
            "topk": (f"distilled from a top-{topk} teacher cache",
                     dict(alpha=alpha, teacher_cache="{out}/topk{topk}_seed{seed}",
                          cache_topk=topk)),
            "onpolicy": ("distilled, on-policy ({onpolicy_tokens} tokens, {onpolicy_kind})",
                         dict(alpha=alpha, **onpolicy)),
            "prune_onpolicy": ("pruned, distilled on-policy ({onpolicy_tokens} tokens, "
                               "{onpolicy_kind})", dict(prune, **onpolicy))}


def run(script, args, log_path, threads=None):
    """Runs one of the project's scripts; its output goes to log_path. Stops the experiment if it
    fails."""
    t0 = time.time()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(log_path, "w") as log:
        r = subprocess.run([sys.executable, os.path.join(REPO, script), *args], stdout=log,
                           stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        with open(log_path) as f:
            tail = f.read().strip().splitlines()[-1:]
        die(f"{script} failed ({tail[0] if tail else r.returncode}); see {log_path}")
    print(f"  {os.path.basename(log_path)[:-4]}: {time.time() - t0:.0f} s", flush=True)


def reuse(path, record, what):
    """True if path holds a finished step made with these settings (its settings.json); otherwise
    path is cleared for a rebuild, and the line says why."""
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


def rows(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def exact_eval(run_dir, teacher_dir, data_dir, train, temperature):
    """val_kl and val_top1 of a run's student against the teacher itself, on distill.py's val
    windows: for the runs that trained from a cache, whose own log holds the cache's estimate (and,
    for top-k, no estimate of KL at all)."""
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
    windows = val[:n * (block + 1)].reshape(n, block + 1)[np.arange(count) * n // count]
    windows = torch.from_numpy(windows)
    kl = top1 = tokens = 0.0
    with torch.no_grad():
        for i in range(0, count, batch):
            x, y = windows[i:i + batch, :-1], windows[i:i + batch, 1:]
            _, st = distill_loss(s(x), s.lm_head.weight, t(x), t.lm_head.weight, y,
                                 temperature=temperature, vocab_size=meta["vocab_size"],
                                 normalizer=1)
            kl, top1 = kl + st["kl"].item(), top1 + st["top1"].item()
            tokens += st["n"].item()
    return kl / tokens, top1 / tokens


def mean_sd(values, digits=3):
    m = statistics.mean(values)
    if len(values) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main():
    sz = SIZES[size]
    known = arm_table(alpha, prune_lr or PRUNE_LR[size], topk, sz["onpolicy_tokens"])
    specs = {}
    for spec in arms.split(","):
        name, *extra = spec.split(":")
        if name not in known:
            die(f"unknown arm {name!r}; one of {', '.join(known)}")
        label, settings = known[name]
        given = dict(kv.split("=", 1) for kv in extra if kv)
        settings = dict(settings, **given)
        label = label.format(**settings) + "".join(f", {k}={v}" for k, v in given.items()
                                                   if "{" + k + "}" not in label)
        specs[spec.replace(":", "_")] = (label, settings)
    seed_list = [int(s) for s in str(seeds).split(",")]
    where = os.path.abspath(out or ("out/kd_vs_ce" if size == "full" else f"out/kd_vs_ce_{size}"))
    try:
        with open(os.path.join(where, "size.json")) as f:
            made_for = json.load(f)["size"]
    except (OSError, ValueError, KeyError):
        made_for = None
    if made_for not in (None, size):
        die(f"{where} holds the {made_for} size's runs; give --size={made_for}, or another --out "
            f"for --size={size}")
    os.makedirs(where, exist_ok=True)
    with open(os.path.join(where, "size.json"), "w") as f:
        json.dump({"size": size}, f)
    from data import find_files, read_files
    from hf import train_bpe

    # 1. tokenizer and data
    tok_dir, data_dir = os.path.join(where, "tokenizer"), os.path.join(where, "data")
    print(f"kd_vs_ce ({size}): {corpus} -> {where}", flush=True)
    # every step's record holds the records of the steps it depends on: a rebuilt step rebuilds
    # what follows
    tok_rec = dict(corpus=os.path.abspath(corpus), vocab=sz["vocab"])
    if not reuse(tok_dir, tok_rec, "tokenizer"):
        train_bpe(read_files(find_files([corpus]), "text"), tok_dir, sz["vocab"],
                  log=lambda line: print(f"  {line}", flush=True))
        finished(tok_dir, tok_rec)
    data_rec = dict(tokenizer=tok_rec, args=[f"--input={corpus}", f"--tokenizer={tok_dir}",
                                             f"--out_dir={data_dir}"])
    if not reuse(data_dir, data_rec, "data"):
        run("prepare.py", data_rec["args"], os.path.join(where, "prepare.log"))
        finished(data_dir, data_rec)
    common = ["--device=cpu", "--dtype=float32", "--teacher_dtype=float32", "--log_interval=10",
              f"--data_dir={data_dir}", *flags(sz["train"])]

    # 2. the teacher, a plain language model
    teacher_dir = os.path.join(where, "teacher")
    teacher_rec = dict(data=data_rec, args=common + ["--teacher=None",
                                                     f"--out_dir={teacher_dir}", "--seed=0",
                                                     *flags(sz["teacher"])])
    if not reuse(teacher_dir, teacher_rec, "teacher"):  # distill.py refuses an interrupted one
        run("distill.py", teacher_rec["args"], teacher_dir + ".log")
        finished(teacher_dir, teacher_rec)
        for _, settings in specs.values():  # an earlier teacher's caches, at the same paths: gone
            for seed in seed_list if "teacher_cache" in settings else ():
                shutil.rmtree(settings["teacher_cache"].format(out=where, seed=seed, topk=topk),
                              ignore_errors=True)

    # 3. the students: every arm, seed by seed, jobs at a time
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None

    def student(job):
        name, seed = job
        run_dir = os.path.join(where, f"{name}_seed{seed}")
        rec = dict(teacher=teacher_rec, label=specs[name][0],
                   args=common + [f"--teacher={teacher_dir}/hf", f"--out_dir={run_dir}",
                                  f"--seed={seed}", f"--temperature={temperature}",
                                  *flags(sz["student"]),
                                  *(f.format(out=where, seed=seed, topk=topk)
                                    for f in flags(specs[name][1]))])
        if not reuse(run_dir, rec, f"{name}_seed{seed}"):
            run("distill.py", rec["args"], run_dir + ".log", threads)
            finished(run_dir, rec)
        log = rows(run_dir)
        evals = [r for r in log if "val_ce" in r]
        if "teacher_cache" in specs[name][1]:  # its val_kl is the cache's estimate: measure it
            evals[-1]["val_kl"], evals[-1]["val_top1"] = exact_eval(run_dir, teacher_dir, data_dir,
                                                                    sz["train"], temperature)
        train = [r for r in log if "loss" in r]
        train = train[1:] or train  # past the first row's start-up, where there are more
        step = statistics.median(sz["train"]["batch_size"] * sz["train"]["block_size"] /
                                 r["tokens_per_sec"] for r in train)
        share = statistics.mean(r["gen_share"] for r in train) if "gen_share" in train[0] else None
        return evals, dict(seconds_per_step=step, gen_share=share)

    jobs_list = [(name, seed) for seed in seed_list for name in specs]
    with ThreadPoolExecutor(jobs) as pool:
        results = dict(zip(jobs_list, pool.map(student, jobs_list)))
    curves = {job: evals for job, (evals, _) in results.items()}
    costs = {job: cost for job, (_, cost) in results.items()}
    teacher_ce = next(evals[0]["teacher_val_ce"] for evals in curves.values())

    # 4. the table
    def reached(name, seed):  # the first eval at or below the kd student's final val CE (same seed)
        goal = curves[("kd", seed)][-1]["val_ce"]
        return next((r["iter"] for r in curves[(name, seed)] if r["val_ce"] <= goal), None)

    header = ["student", "val CE at step 0"] + [title for _, title in METRICS]
    if "kd" in specs:
        header.append("steps to kd's final val CE")
    header.append("s / step (its share generating)")
    lines = [f"teacher val CE: {teacher_ce:.3f} (ppl {2.718281828 ** teacher_ce:.1f}); "
             f"{len(seed_list)} seed(s) {seed_list}, {sz['student']['max_iters']} steps each, "
             f"alpha {alpha}, T {temperature}", "",
             "| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
    for name, (label, _) in specs.items():
        runs = [curves[(name, s)] for s in seed_list]
        cells = [label, mean_sd([r[0]["val_ce"] for r in runs])]
        cells += [mean_sd([r[-1][k] for r in runs], 1 if k == "val_ppl" else 3) for k, _ in METRICS]
        if "kd" in specs:
            cells.append(", ".join(str(reached(name, s)) if reached(name, s) is not None else "-"
                                   for s in seed_list))
        cost = [costs[(name, s)] for s in seed_list]
        share = [c["gen_share"] for c in cost if c["gen_share"] is not None]
        cells.append(mean_sd([c["seconds_per_step"] for c in cost]) +
                     (f" ({statistics.mean(share):.0%})" if share else ""))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(where, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(where, "results.json"), "w") as f:
        json.dump({"teacher_val_ce": teacher_ce,
                   "arms": {name: {"label": label, "settings": settings}
                            for name, (label, settings) in specs.items()},
                   "evals": {f"{name}_seed{seed}": ev for (name, seed), ev in curves.items()},
                   "costs": {f"{name}_seed{seed}": c for (name, seed), c in costs.items()}},
                  f, indent=1)
    if drafts:  # each on-policy arm against its off-policy twin, seed by seed
        twins = [f"{a}-{'prune' if a.startswith('prune') else 'kd'}" for a in specs
                 if "onpolicy" in a and ("prune" if a.startswith("prune") else "kd") in specs]
        evaluate_drafts(where, teacher_dir, data_dir, sz, twins,
                        [f"{where}/{name}_seed{seed}" for name, seed in jobs_list])


def evaluate_drafts(where, teacher_dir, data_dir, sz, twins, students):
    """eval.py on every student at temperature 1 and greedy (all val windows teacher-forced, 16
    held-out prompts for speculative generation at g 4, 64 own samples), then draft_table.py's
    table: OUT/drafts.md."""
    block = sz["train"]["block_size"]
    common = [f"--teacher={teacher_dir}/hf", f"--student={','.join(students)}",
              f"--data={data_dir}", f"--block_size={block}", "--windows=320",
              "--prompts=16", "--prompt_len=16", f"--new_tokens={min(96, block - 17)}",
              "--draft_lens=4", "--samples=64", "--device=cpu"]
    for t in (1, 0):
        path = os.path.join(where, f"eval_t{t}.json")
        run("eval.py", [*common, f"--temperature={t}", f"--out={path}"], path[:-5] + ".log")
    table = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "draft_table.py"),
                            f"--t1={where}/eval_t1.json", f"--t0={where}/eval_t0.json",
                            f"--results={where}/results.json", "--g=4",
                            *([f"--pairs={','.join(twins)}"] if twins else [])],
                           capture_output=True, text=True)
    if table.returncode != 0:
        die(f"draft_table.py failed: {table.stderr.strip()[-300:]}")
    print("\n" + table.stdout)
    with open(os.path.join(where, "drafts.md"), "w") as f:
        f.write(table.stdout)


if __name__ == "__main__":
    main()
