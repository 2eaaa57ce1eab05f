"""
Training curves of one or more distill.py runs, overlaid, as one PNG:

    python plot.py out/kd out/ce                 # -> out/kd/curves.png, beside the first run
    python plot.py out/kd out/ce --out=PATH.png --names=KD,CE

Top row: train loss, CE and KL against iteration; bottom row: val_ce, val_kl, val_top1. Each run is
named by its directory. matplotlib is an optional dependency: pip install matplotlib
"""

import json
import os

from common import atomic_write, die, one_line_errors
from configurator import configure

PANELS = [("loss", "train loss"), ("ce", "train CE"), ("kl", "train KL (teacher || student)"),
          ("val_ce", "val CE"), ("val_kl", "val KL"),
          ("val_top1", "val top-1 agreement with the teacher")]


def read_log(path):
    """-> {key: ([iters], [values])} for the keys in PANELS; rows without a key (or with null) are
    skipped."""
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
        die("matplotlib is not installed; pip install matplotlib")
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    names = names or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    for run, name in zip(run_dirs, names):
        log = os.path.join(run, "log.jsonl")
        if not os.path.exists(log):
            die(f"no log.jsonl in {run}: give distill.py out_dirs")
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
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    print(f"wrote {out}")


# -----------------------------------------------------------------------------
runs = ""  # distill.py out_dirs (each with a log.jsonl), comma-separated, or as plain arguments
out = None  # the PNG to write; None: curves.png in the first run's directory
names = None  # legend names, comma-separated, one per run; None: the directories' names
config = configure(globals(), plain="runs")
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    one_line_errors()  # a failed write: one line
    run_dirs = [r for r in runs.split(",") if r]
    if not run_dirs:
        die("give distill.py out_dirs: python plot.py OUT_DIR [OUT_DIR ...] [--out=PATH.png]")
    if names and len(names.split(",")) != len(run_dirs):
        die("give one --names entry per run, comma-separated")
    plot(run_dirs, out or os.path.join(run_dirs[0], "curves.png"), names and names.split(","))
