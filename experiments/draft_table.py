"""
The kd_vs_ce experiment's students as drafts for its teacher: one table, mean ± sd over seeds, from two eval.py
runs over the same students, one at --temperature=1 and one at --temperature=0 (README, "Use the student as a
draft", has the commands). Several files per temperature (students evaluated in several calls) are merged.

    python experiments/draft_table.py --t1 OUT/eval_t1.json --t0 OUT/eval_t0.json --g 4

Students are grouped into arms by their folder's name, ARM_seedN (kd_seed1, ce_seed2, ...); each arm's
difference from the base arm (--base, CE only) is given seed by seed.
"""

import argparse
import json
import os
import re
import statistics

ROWS = [  # label, which run (t1: temperature 1, t0: greedy), the number
    ("val CE", "t1", lambda r, g: r["val_ce"]),
    ("KL(teacher \\|\\| student)", "t1", lambda r, g: r["kl"]),
    ("a, greedy (top-1 agreement)", "t1", lambda r, g: r["top1"]),
    ("a at T 1 (teacher-forced)", "t1", lambda r, g: r["accept_t1"]),
    ("tokens per teacher call, g {g}, T 1", "t1", lambda r, g: r["generation"][g]["tokens_per_call"]),
    ("  predicted from a", "t1", lambda r, g: r["generation"][g]["predicted_tokens_per_call"]),
    ("tokens per teacher call, g {g}, greedy", "t0", lambda r, g: r["generation"][g]["tokens_per_call"]),
    ("c (draft step / teacher step), T 1 run", "t1", lambda r, g: r["c"]),
    ("speed-up, g {g}, T 1: predicted", "t1", lambda r, g: r["generation"][g]["predicted_speedup"]),
    ("speed-up, g {g}, T 1: measured", "t1", lambda r, g: r["generation"][g]["speedup"]),
    ("speed-up, g {g}, greedy: measured", "t0", lambda r, g: r["generation"][g]["speedup"]),
]


def arms(result):
    """{arm: {seed: the student's numbers}} from an eval.py JSON."""
    out = {}
    for name, r in result["students"].items():
        m = re.fullmatch(r"(.+)_seed(\d+)", os.path.basename(os.path.normpath(name)))
        if not m:
            raise SystemExit(f"draft_table.py: {name} is not named ARM_seedN")
        out.setdefault(m[1], {})[int(m[2])] = r
    return out


def mean_sd(xs):
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--t1", nargs="+", required=True, help="eval.py's JSON at --temperature=1")
    p.add_argument("--t0", nargs="+", required=True, help="eval.py's JSON at --temperature=0")
    p.add_argument("--g", default="4", help="the draft length to show")
    p.add_argument("--base", default="ce", help="the arm the others are compared with, seed by seed")
    p.add_argument("--vs", nargs="*", help="only these arms' differences from the base (default: every arm's)")
    args = p.parse_args()
    runs = {}
    for run, paths in (("t1", args.t1), ("t0", args.t0)):
        runs[run] = {}
        for path in paths:
            for arm, seeds in arms(json.load(open(path))).items():
                runs[run].setdefault(arm, {}).update(seeds)
    names = list(runs["t1"])
    others = [a for a in names if a != args.base and (args.vs is None or a in args.vs)]
    print("| | " + " | ".join(names) + " | " + " | ".join(f"{a} - {args.base}, seed by seed" for a in others) +
          " |\n|---|" + "---|" * (len(names) + len(others)))
    for label, run, fn in ROWS:
        arm_values = {a: {s: fn(r, args.g) for s, r in runs[run][a].items()} for a in names}
        cells = [mean_sd(list(arm_values[a].values())) for a in names]
        base = arm_values.get(args.base, {})
        for a in others:
            seeds = sorted(set(arm_values[a]) & set(base))
            cells.append(", ".join(f"{arm_values[a][s] - base[s]:+.3f}" for s in seeds))
        print(f"| {label.format(g=args.g)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
