"""The benchmarks of bench/, a script each: every one runs at tiny settings (seconds, where the real
runs take minutes and GBs: docs/benchmarks.md), its sides in their own processes; each prints its
settings with --help, and refuses in one line what the machine lacks."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import REPO

BENCH = os.path.join(REPO, "bench")
SCRIPTS = sorted(f for f in os.listdir(BENCH) if f.endswith(".py") and f != "harness.py")
TINY_STEP = ["--teacher=tiny", "--student=tiny", "--T=32", "--steps=1"]
SMOKE = {  # a smoke run's settings, and a row its table must have
    "loss_vs_reference.py": (["--B=1", "--T=16", "--V=1000", "--iters=1"],
                             "| distill_loss, chunk_size=256 |"),
    "loss_traffic.py": (["--tokens=32", "--chunk_size=16", "--vocab=1000", "--repeats=1",
                         "--compiled=False"], "| forward_kl + CE (default) | 0.1 | 16.0 |"),
    "loss_precision.py": (["--tokens=16", "--V=1271", "--vocab=1000", "--chunk_size=8"],
                          "| reverse_kl, alpha 0.5 | float16 |"),
    "model_vs_hf.py": (["--model=tiny", "--T=32", "--repeats=1", "--prompt_len=4",
                        "--new_tokens=8"], "| greedy generation: model.py KV cache |"),
    "step_vs_hf.py": ([*TINY_STEP, "--threads=1"],
                      "| ours: model.py hidden states + fused distill_loss | 1 |"),
    "cache_vs_online.py": ([*TINY_STEP, "--windows=2"], "| from the cache: the student alone"),
    "speculative_cost.py": (["--shapes=experiment", "--new_tokens=8", "--repeats=1"],
                            "|  | speculative, all drafts pass | 4.00 |"),
}
TINY_GPU = ["--device=cpu", "--vocab_size=300", "--teacher_dtype=float32", "--block_size=32",
            "--batch_size=2", "--kd_chunk_size=16", "--compile=False", "--n_layer=1", "--n_head=2",
            "--n_kv_head=1", "--n_embd=32", "--intermediate_size=64", "--steps=2",
            "--parts_steps=1", "--batches=", "--timeout=120"]
SKIPPED = "no CUDA GPU here: skipped (--device=cpu runs it on the CPU, tiny)\n"


def bench(script, *args):
    """A script of bench/ as a user runs it, from outside the repository, on one thread."""
    return subprocess.run([sys.executable, os.path.join(BENCH, script), *args], timeout=300,
                          capture_output=True, text=True, cwd=os.path.dirname(REPO),
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


# scripts run in one process (the imports once) as `python bench/SCRIPT ARGS` runs each:
# [exit code, SystemExit's message, stdout] of each
IN_PROCESS = r"""
import contextlib, io, json, os, runpy, sys
bench, calls = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, bench)
results = []
for script, args in calls:
    sys.argv, out, code = [script, *args], io.StringIO(), (0, None)
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(os.path.join(bench, script), run_name="__main__")
    except SystemExit as e:
        code = (e.code, None) if e.code is None or isinstance(e.code, int) else (1, str(e.code))
    results.append([*code, out.getvalue()])
print(json.dumps(results))
"""


def test_every_script_prints_its_settings_and_refuses_what_the_machine_lacks():
    calls = [[s, ["--help"]] for s in SCRIPTS] + [
        ["loss_vs_reference.py", ["--B=100000"]], ["step_vs_hf.py", ["--B=100000"]],
        ["cache_vs_online.py", ["--B=100000", "--windows=100000"]],
        ["loss_precision.py", ["--V=100000000"]], ["loss_vs_reference.py", ["--chunk_size=0"]],
        ["step_vs_hf.py", ["--student=gpt2"]]]
    if not torch.cuda.is_available():  # where there is one, these would run
        calls += [["gpu.py", []], ["gpu_step.py", []]]
    r = subprocess.run([sys.executable, "-c", IN_PROCESS, BENCH, json.dumps(calls)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    results = iter(json.loads(r.stdout.strip().splitlines()[-1]))
    for script in SCRIPTS:
        code, msg, out = next(results)
        assert code == 0 and out.startswith(f"usage: python {script} [config/FILE.py"), out
        assert "  # " in out and "configure(" not in out, out  # the settings with their comments
    for script in ("loss_vs_reference.py", "step_vs_hf.py", "cache_vs_online.py",
                   "loss_precision.py"):
        code, msg, out = next(results)
        assert code == 1 and msg.startswith(f"{script}: error: "), msg
        assert "GB of free RAM, and " in msg and "GB are free" in msg, msg
        assert "\n" not in msg and out == "", (msg, out)  # one line, and nothing started
    assert next(results)[:2] == [1, "loss_vs_reference.py: error: chunk_size=0: must be >= 1"]
    code, msg, _ = next(results)
    assert code == 1 and msg.startswith("step_vs_hf.py: error: student='gpt2': must be one of ")
    for script in ("gpu.py", "gpu_step.py") if not torch.cuda.is_available() else ():
        assert next(results) == [0, None, f"{script}: {SKIPPED}"]


@pytest.mark.slow
def test_every_script_at_tiny_settings(tmp_path, tokenizer_dir, model_dir):
    """Each script at tiny settings, its sides in their own processes. The scripts run side by side,
    the longest first: their imports, and their waits for their sides, overlap (~60 s of CPU time in
    all). gpu.py on the CPU: the checks, gpu_step.py's rows (eager), distill.py in float32 and
    float16."""
    with open(os.path.join(REPO, "data", "zh_wiki_sample.jsonl"), encoding="utf-8") as f:
        (tmp_path / "docs.jsonl").write_text("".join(f.readlines()[:100]), encoding="utf-8")
    runs = {"gpu.py": ([*TINY_GPU, f"--teacher={model_dir}"], "| --dtype=float16, 2 steps | 2 |"),
            "step_vs_hf.py": SMOKE["step_vs_hf.py"],
            "cache_vs_online.py": SMOKE["cache_vs_online.py"],
            "prepare_vs_tokenizer.py": ([f"--data={tmp_path / 'docs.jsonl'}", "--copies=2",
                                         f"--tokenizer={tokenizer_dir}", "--repeats=1"],
                                        "| prepare.py |")}
    runs |= {k: v for k, v in SMOKE.items() if k not in runs}
    with ThreadPoolExecutor(2 * (os.cpu_count() or 1)) as pool:
        done = dict(zip(runs, pool.map(lambda script: bench(script, *runs[script][0]), runs)))
    failed = [f"{script}:\n{r.stdout[-1500:]}{r.stderr[-2500:]}" for script, r in done.items()
              if r.returncode != 0 or runs[script][1] not in r.stdout]
    assert not failed, "\n\n".join(failed)
    assert "200 documents" in done["prepare_vs_tokenizer.py"].stdout
    out = done["gpu.py"].stdout
    for line in ("On a T4: 9-15 min in all", "compile=False (set here; config/t4.py has True)",
                 "- float16 teacher finite, fp32_residual=True: True",
                 "- a step with fused SDPA only (float32 teacher, fp32_residual=False): ok",
                 "| float32, eager |", "| float16, eager |", "| float32 student, 2 steps | 2 |",
                 "largest batch_size with peak reserved <= 14.0 GB (float32 student): 2; "
                 "bench/gpu.py took "):
        assert line in out, (line, out)
