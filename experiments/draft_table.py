"""
The kd_vs_ce experiment's students as drafts for its teacher: one table, mean ± sd over seeds, from
two eval.py runs over the same students, one at --temperature=1 and one at --temperature=0
(kd_vs_ce.py --drafts makes both and calls this). Several files per temperature (students evaluated
in several calls) are merged.

    python experiments/draft_table.py --t1=OUT/eval_t1.json --t0=OUT/eval_t0.json --g=4
    python experiments/draft_table.py ... --results=OUT/results.json --pairs=onpolicy-kd

Students are grouped into arms by their folder's name, ARM_seedN (kd_seed1, ce_seed2, ...). pairs:
A-B differences seed by seed (default: each arm minus the base arm).
"""

import json
import os
import re
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from common import die  # noqa: E402
from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
t1 = ""  # eval.py's JSON at --temperature=1; several, comma-separated
t0 = ""  # eval.py's JSON at --temperature=0; several, comma-separated
results = None  # kd_vs_ce.py's results.json: adds each arm's seconds per training step
g = 4  # the draft length to show
base = "ce"  # the arm the others are compared with, seed by seed (unless pairs)
pairs = None  # A-B pairs of arms to compare seed by seed, comma-separated: onpolicy-kd,...
config = configure(globals())
# -----------------------------------------------------------------------------


def own(key, k=None):  # a number along the student's own samples (eval.py's section 3)
    return lambda r, g: r["own"][key] if k is None else r["own"]["accept_by_offset"][str(k)]


ROWS = [  # label, which run (t1: temperature 1, t0: greedy, cost: training), the number
    ("val CE", "t1", lambda r, g: r["val_ce"]),
    ("KL(teacher \\|\\| student)", "t1", lambda r, g: r["kl"]),
    ("a, greedy (top-1 agreement)", "t1", lambda r, g: r["top1"]),
    ("a at T 1 (teacher-forced)", "t1", lambda r, g: r["accept_t1"]),
    ("a at T 1 along its own samples, offset 1", "t1", own("accept", 1)),
    ("  offset 2", "t1", own("accept", 2)),
    ("  offset 4", "t1", own("accept", 4)),
    ("  over the sample", "t1", own("accept")),
    ("teacher NLL of its own samples (T 1)", "t1", own("teacher_nll")),
    ("repeated 4-grams in its own samples (T 1)", "t1", own("repeated_4grams")),
    ("repeated 4-grams in its own samples (greedy)", "t0", own("repeated_4grams")),
    ("tokens per teacher call, g {g}, T 1", "t1",
     lambda r, g: r["generation"][g]["tokens_per_call"]),
    ("  predicted from a", "t1", lambda r, g: r["generation"][g]["predicted_tokens_per_call"]),
    ("tokens per teacher call, g {g}, greedy", "t0",
     lambda r, g: r["generation"][g]["tokens_per_call"]),
    ("c (draft step / teacher step), T 1 run", "t1", lambda r, g: r["c"]),
    ("speed-up, g {g}, T 1: predicted", "t1", lambda r, g: r["generation"][g]["predicted_speedup"]),
    ("speed-up, g {g}, T 1: measured", "t1", lambda r, g: r["generation"][g]["speedup"]),
    ("speed-up, g {g}, greedy: measured", "t0", lambda r, g: r["generation"][g]["speedup"]),
    ("seconds per training step", "cost", lambda r, g: r["seconds_per_step"]),
]


def by_arm(students):
    """{arm: {seed: numbers}} from {path or name: numbers}."""
    out = {}
    for name, r in students.items():
        m = re.fullmatch(r"(.+)_seed(\d+)", os.path.basename(os.path.normpath(name)))
        if not m:
            die(f"{name} is not named ARM_seedN")
        out.setdefault(m[1], {})[int(m[2])] = r
    return out


def mean_sd(xs):
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else \
        f"{xs[0]:.3f}"


def main():
    if not t1 or not t0:
        die("give eval.py's JSON files: --t1=EVAL_T1.json --t0=EVAL_T0.json")
    runs = {}
    for run, paths in (("t1", t1), ("t0", t0)):
        runs[run] = {}
        for path in paths.split(","):
            with open(path) as f:  # JSON's keys are strings: the draft lengths too
                for arm, seeds in by_arm(json.load(f)["students"]).items():
                    runs[run].setdefault(arm, {}).update(seeds)
    if results:
        with open(results) as f:
            runs["cost"] = by_arm(json.load(f)["costs"])
    names = list(runs["t1"])
    compared = [p.split("-") for p in pairs.split(",")] if pairs else \
        [(a, base) for a in names if a != base and base in names]
    columns = names + [f"{a} - {b}, seed by seed" for a, b in compared]
    print("| | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for label, run, fn in ROWS:
        if run not in runs:
            continue
        try:
            values = {a: {s: fn(r, str(g)) for s, r in runs[run][a].items()} for a in names}
        except (KeyError, TypeError):  # an older eval.py's JSON, without its own samples
            continue
        cells = [mean_sd(list(values[a].values())) for a in names]
        for a, b in compared:
            seeds = sorted(set(values[a]) & set(values[b]))
            cells.append(", ".join(f"{values[a][s] - values[b][s]:+.3f}" for s in seeds))
        print(f"| {label.format(g=g)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
