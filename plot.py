"""
Training curves of one or more distill.py runs, overlaid, as one PNG:

    python plot.py out/kd out/ce                 # -> out/kd/curves.png, beside the first run
    python plot.py out/kd out/ce --out=PATH.png

Top row: train loss, CE and KL against iteration; bottom row: val_ce, val_kl, val_top1. Each run is named
by its directory. matplotlib is an optional dependency: pip install matplotlib
"""

import argparse
import json
import os

PANELS = [("loss", "train loss"), ("ce", "train CE"), ("kl", "train KL (teacher || student)"),
          ("val_ce", "val CE"), ("val_kl", "val KL"), ("val_top1", "val top-1 agreement with the teacher")]


def read_log(path):
    """-> {key: ([iters], [values])} for the keys in PANELS; rows without a key (or with null) are skipped."""
    series = {key: ([], []) for key, _ in PANELS}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            for key in series:
                if row.get(key) is not None:
                    series[key][0].append(row["iter"])
                    series[key][1].append(row[key])
    return series


def plot(run_dirs, out, names=None):
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plot.py: error: matplotlib is not installed; pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for run, name in zip(run_dirs, names or [os.path.basename(os.path.normpath(d)) for d in run_dirs]):
        log = os.path.join(run, "log.jsonl")
        if not os.path.exists(log):
            raise SystemExit(f"plot.py: error: no log.jsonl in {run}: give distill.py out_dirs")
        series = read_log(log)
        for ax, (key, title) in zip(axes.flat, PANELS):
            iters, values = series[key]
            if values:
                ax.plot(iters, values, marker="." if len(values) < 30 else None, label=name)
            ax.set_title(title)
            ax.set_xlabel("iteration")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="distill.py out_dirs (each with a log.jsonl)")
    p.add_argument("--out", help="the PNG to write (default: curves.png in the first run's directory, not in the "
                   "repository's tracked files)")
    p.add_argument("--names", nargs="+", help="legend names, one per run (default: the directory names)")
    args = p.parse_args()
    if args.names and len(args.names) != len(args.runs):
        raise SystemExit("plot.py: error: give one --names entry per run")
    plot(args.runs, args.out or os.path.join(args.runs[0], "curves.png"), args.names)
