"""
What the benchmarks share: medians of runs taken in turn, a markdown table, the machine's name,
the free memory checked up front, and a side run again in a fresh process, so that its peak RSS
is its own. Each script puts the repository on sys.path before it imports this or the project.

A script that needs a side alone runs itself: own_process(config, side="reference") starts
`python SCRIPT --key=value ...` with its settings and those given, and the side prints its
result as one JSON line (report), which own_process returns.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 151_665  # Qwen2.5's token ids; its heads' other 271 rows are padding
START = time.time()


def say(msg):  # a progress line, with the seconds since the script started
    print(f"[{time.time() - START:4.0f} s] {msg}", flush=True)


def timed(fn, repeats):
    """Median seconds of fn() over repeats, after one warm-up call."""
    return interleaved({"fn": fn}, repeats)["fn"]


def interleaved(fns, repeats, what=None):
    """Median seconds of each fn, run in turn so that load on the machine hits all alike, after a
    warm-up call of each. what: a progress line after the warm-up and after each round."""
    for fn in fns.values():
        fn()
    if what:
        say(f"{what}: warmed up")
    times = {k: [] for k in fns}
    for i in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        if what:
            say(f"{what}: round {i + 1} of {repeats}")
    return {k: statistics.median(v) for k, v in times.items()}


def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def machine():
    cpu = os.uname().machine
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def model_config(name):
    """A key of model.CONFIGS, or tiny: a shape for smoke runs (the tests')."""
    from model import CONFIGS, ModelConfig

    if name == "tiny":
        return ModelConfig(vocab_size=1024, n_layer=2, n_head=2, n_kv_head=1, n_embd=64,
                           head_dim=32, intermediate_size=128)
    return CONFIGS[name]


def training_step(student, loss_fn, B, T, vocab):
    """One training step on random tokens, as a function: loss_fn(x, y), its backward, and fused
    AdamW (distill.py's optimizer)."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4, weight_decay=0.01, fused=True)
    data = torch.randint(0, vocab, (B, T + 1))

    def step():
        loss_fn(data[:, :-1], data[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def t4():
    """config/t4.py's settings: what the GPU scripts run, and their defaults."""
    g = {}
    with open(os.path.join(REPO, "config", "t4.py")) as f:
        exec(f.read(), g)
    return {k: v for k, v in g.items() if not k.startswith("_")}


def peak_rss():  # bytes (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def need(gb, what):
    """Says up front what the run needs; stops with one line where the machine has less free."""
    from common import die

    with open("/proc/meminfo") as f:
        free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    if free < gb * 1e9:
        die(f"{what} needs ~{gb:.1f} GB of free RAM, and {free / 1e9:.1f} GB are free")
    say(f"{what} needs ~{gb:.1f} GB of free RAM; {free / 1e9:.1f} GB are free")


def flags(settings):
    return [f"--{k}={v}" for k, v in settings.items()]


def own_process(config, timeout=None, **settings):
    """Runs this script in a fresh process with config's settings and these, and returns the dict
    that its report() printed last; its stderr goes to ours. SystemExit, with the end of its
    stderr, if it fails."""
    from common import die

    cmd = [sys.executable, os.path.abspath(sys.argv[0]), *flags({**config, **settings})]
    what = " ".join(flags(settings)) or "the side"
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        die(f"{what} timed out after {timeout} s")
    if r.returncode != 0:
        die(f"{what} failed:\n{r.stderr[-2000:]}")
    sys.stderr.write(r.stderr)  # its warnings (a compile that fell back to eager, say)
    return json.loads(r.stdout.strip().splitlines()[-1])


def report(result):  # a side's result: one JSON line, the last of its stdout
    print(json.dumps(result), flush=True)
