"""
The T4 run (config/t4.py) on the GPU at hand, through distill.py itself, with random tokens and a
random teacher of the Qwen2.5-0.5B shape (or --teacher=NAME: any teacher distill.py takes):
1. checks: the float16 teacher is finite; a step runs with SDPA's fused kernels alone;
2. the step part by part, each student dtype, eager and compiled (bench/gpu_step.py);
3. `steps` steps of config/t4.py with the float32 student, then with --dtype=float16: tokens/s,
   MFU, peak memory allocated and reserved;
4. 3 steps at each of `batches` until peak reserved memory passes limit_gb or runs out.

    python bench/gpu.py                                     # CUDA; 9-15 min on a T4 (a tally)
    python bench/gpu.py --teacher=Qwen/Qwen2.5-1.5B
    python bench/gpu.py --device=cpu --teacher=DIR --vocab_size=300 ...   # a smoke run

Every row is printed as it comes, so a run cut short keeps what it measured; each process has
`timeout` seconds and writes no checkpoint or export. No CUDA GPU and no --device=cpu: skipped.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import numpy as np  # noqa: E402
import torch  # noqa: E402

import harness  # noqa: E402
import hf  # noqa: E402
from configurator import at_least, check, configure, one_of  # noqa: E402
from loss import distill_loss  # noqa: E402
from model import CONFIGS, DTYPES, ModelConfig, Transformer  # noqa: E402

T4 = harness.t4()
# -----------------------------------------------------------------------------
device = "cuda"  # cuda | cuda:N; cpu: a smoke run at tiny settings (its numbers mean nothing)
teacher = None  # hub id or directory; None: random weights of the Qwen2.5-0.5B shape
teacher_dtype = T4["teacher_dtype"]  # config/t4.py's
vocab_size = 151_665  # ids of the random tokens, Qwen2.5's (at most the teacher's rows)
batch_size = T4["batch_size"]  # config/t4.py's
block_size = T4["block_size"]  # config/t4.py's
kd_chunk_size = T4["kd_chunk_size"]  # config/t4.py's
compile = T4["compile"]  # config/t4.py's
n_layer = 12  # the student: distill.py's (student-123m)
n_head = 8
n_kv_head = 2
n_embd = 512
intermediate_size = 2048
steps = 20  # steps of each end-to-end run (float32 student, float16 student)
batches = "12,16,24,32,48"  # batch sizes to try, comma-separated ("": none)
limit_gb = 14.0  # the T4's 15 GB less ~1 GB for CUDA's context
parts = True  # 2. the step part by part (bench/gpu_step.py)
parts_steps = 10  # its timed steps per row
timeout = 300  # seconds for each process
side = None  # checks: the checks alone, in this process (the script runs itself so)
config = configure(globals())
check(config, {"teacher_dtype": one_of(*DTYPES), "vocab_size": at_least(2), "steps": at_least(2),
               "batch_size": at_least(1), "block_size": at_least(1), "timeout": at_least(1),
               "side": one_of(None, "checks")})
# -----------------------------------------------------------------------------
STUDENT = ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size")
SHARED = ("device", "teacher_dtype", "vocab_size", "batch_size", "block_size", "kd_chunk_size",
          "compile", *STUDENT, "timeout")  # the settings that bench/gpu_step.py takes too


def checks():
    """What the T4 run must not do silently, in one process. 1. The float16 teacher's hidden states
    are finite, with and without the float32 residual stream (random weights only show that the
    guard works; a real checkpoint is the real test). 2. A training step as distill.py takes it
    (a float16 teacher with its float32 residual stream) with SDPA restricted to its fused
    kernels: a fall-back to the math kernel, which materializes (T, T) scores, is an error."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out, x = {}, torch.randint(0, vocab_size, (batch_size, block_size + 1), device=device)
    t = hf.load(teacher, torch.float16, device, max_seq_len=block_size)
    with torch.no_grad():
        for guard in (False, True):
            t.fp32_residual = guard
            out[f"float16 teacher finite, fp32_residual={guard}"] = \
                bool(torch.isfinite(t(x[:, :-1])).all())
    t = hf.load(teacher, DTYPES[teacher_dtype], device, max_seq_len=block_size)
    t.fp32_residual = teacher_dtype == "float16"  # distill.py's teacher_fp32_residual
    s = Transformer(ModelConfig(  # as distill.py makes it
        vocab_size=t.config.vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
        n_embd=n_embd, head_dim=n_embd // n_head, intermediate_size=intermediate_size,
        max_seq_len=block_size, rope_theta=t.config.rope_theta,
        rms_norm_eps=t.config.rms_norm_eps), verbose=False).to(device)
    what = f"a step with fused SDPA only ({teacher_dtype} teacher, fp32_residual={t.fp32_residual})"
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            with torch.no_grad():
                h_t = t(x[:, :-1])
            distill_loss(s(x[:, :-1]), s.lm_head.weight, h_t, t.lm_head.weight, x[:, 1:],
                         vocab_size=vocab_size, chunk_size=kd_chunk_size)[0].backward()
        out[what] = "ok"
    except RuntimeError as e:
        out[what] = f"FAILED: {str(e).splitlines()[0][:200]}"
    return out


def gpu_info():
    """The GPU's name, its SM and memory clocks (current/max) and power limit: nvidia-smi's, else
    what torch knows."""
    props = torch.cuda.get_device_properties(device)
    query = "name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit"
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", f"--id=GPU-{props.uuid}", f"--query-gpu={query}",
                            "--format=csv,noheader"], capture_output=True, text=True)
        if r.returncode == 0 and len(v := [s.strip() for s in r.stdout.split(",")]) == 6:
            return (f"{v[0]}: SM clock {v[1]} (max {v[2]}), memory clock {v[3]} (max {v[4]}), "
                    f"power limit {v[5]} (nvidia-smi)")
    sm, mem = (getattr(props, k, None) for k in ("clock_rate", "memory_clock_rate"))  # kHz
    clocks = f"max SM clock {sm / 1e3:.0f} MHz, max memory clock {mem / 1e3:.0f} MHz" \
        if sm and mem else "clocks unknown"
    return f"{props.name}: {clocks}, power limit unknown (no nvidia-smi; torch's properties)"


def distill(data_dir, teacher_dir, batch, iters, **more):
    """distill.py config/t4.py for iters steps -> ((tokens/s, MFU, peak allocated GB, peak
    reserved GB, whether a torch.compile fell back to eager), None) from its log and its
    warnings, or (None, the error)."""
    args = dict(teacher=teacher_dir, data_dir=data_dir, out_dir=os.path.join(data_dir, "out"),
                device=device, batch_size=batch, max_iters=iters, lr_decay_iters=iters,
                warmup_iters=2, eval_interval=10 ** 6, eval_iters=1, log_interval=1, save=False)
    args |= {k: config[k] for k in ("teacher_dtype", "block_size", "kd_chunk_size", "compile")
             if config[k] != T4[k]}  # the rest is config/t4.py's
    args |= {k: config[k] for k in STUDENT} | more
    shutil.rmtree(args["out_dir"], ignore_errors=True)
    cmd = [sys.executable, os.path.join(harness.REPO, "distill.py"),
           os.path.join(harness.REPO, "config", "t4.py"), *harness.flags(args)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    if r.returncode != 0:
        print("    " + r.stderr[-2000:].replace("\n", "\n    "), flush=True)
        return None, (r.stderr.strip().splitlines() or ["?"])[-1][:120]
    with open(os.path.join(args["out_dir"], "log.jsonl")) as f:
        rows = [row for row in map(json.loads, f) if "loss" in row]
    later = rows[len(rows) // 4:] or rows  # past the warm-up (CUDA init, allocator growth)
    med = [statistics.median(r[k] for r in later) if later[0][k] is not None else None
           for k in ("tokens_per_sec", "mfu")]
    peak = [max(r[k] for r in rows) if rows[0][k] is not None else None
            for k in ("peak_mem_gb", "peak_reserved_gb")]
    return (*med, *peak, "torch.compile failed" in r.stderr), None


def plan(rows, sizes):
    """What the run does, and about how long it takes, before it starts."""
    t4 = ", ".join(f"{k}={config[k]}" + ("" if config[k] == T4[k] else
                                         f" (set here; config/t4.py has {T4[k]})")
                   for k in ("compile", "kd_chunk_size"))
    return "\n".join([
        f"It runs, each part a process of at most {timeout} s:", "1. the checks",
        f"2. the step part by part (bench/gpu_step.py): {rows} rows, a process each" if parts else
        "2. (the step part by part: parts=False)",
        f"3. distill.py config/t4.py for {steps} steps, the student in float32, then in float16 "
        f"(--dtype=float16)",
        f"4. 3 steps at each batch size of {sizes} until peak reserved passes {limit_gb} GB"
        if sizes else "4. (no larger batch sizes: batches is empty)",
        "On a T4: 9-15 min in all, a tally of its parts (not yet measured); the last line says "
        "how long it took.",
        f"Every row runs config/t4.py and takes its settings: {t4}; the teacher "
        f"{teacher or 'random, of the Qwen2.5-0.5B shape'} in {teacher_dtype} (float16: its "
        f"residual stream in float32, as distill.py runs it); random tokens.\n"])


def main():
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu.py: no CUDA GPU here: skipped (--device=cpu runs it on the CPU, tiny)")
        return
    on_gpu, t0 = device.startswith("cuda"), time.time()
    bf16 = on_gpu and torch.cuda.get_device_capability(device) >= (8, 0)  # as gpu_step.py
    rows = (2 + bf16) * (1 + compile)
    sizes = [int(b) for b in batches.split(",") if b and int(b) != batch_size]
    where = f"{gpu_info()}, torch {torch.__version__}" if on_gpu else harness.machine()
    print(f"bench/gpu.py on {where}\n{plan(rows, sizes)}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        for split, n in (("train", 2_000_000), ("val", 100_000)):
            rng.integers(0, vocab_size, n, dtype=np.uint32).tofile(os.path.join(d, f"{split}.bin"))
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump({"dtype": "uint32", "vocab_size": vocab_size,
                       "eos_id": min(151_643, vocab_size - 1), "tokenizer": None}, f)
        teacher_dir = teacher or os.path.join(d, "teacher")
        if teacher is None:
            torch.manual_seed(0)
            hf.save(Transformer(CONFIGS["qwen2.5-0.5b"], verbose=False).half(), teacher_dir)
        try:
            for what, result in harness.own_process(config, timeout=timeout, side="checks",
                                                    teacher=teacher_dir).items():
                print(f"- {what}: {result}", flush=True)
        except SystemExit as e:
            print(f"- the checks failed: {e}", flush=True)
        if parts:
            step = {k: config[k] for k in SHARED} | dict(teacher=teacher_dir, steps=parts_steps)
            try:
                subprocess.run([sys.executable, os.path.join(harness.REPO, "bench", "gpu_step.py"),
                                *harness.flags(step)], timeout=(rows + 1) * timeout)
            except subprocess.TimeoutExpired:
                print(f"- the step part by part: timed out after {(rows + 1) * timeout} s")
        print("\n| run | batch_size | tokens/s | MFU | peak allocated GB | peak reserved GB |\n"
              "|---|---|---|---|---|---|", flush=True)
        fits = []
        for what, b, iters, more in [
                (f"float32 student, {steps} steps", batch_size, steps, {}),
                (f"--dtype=float16, {steps} steps", batch_size, steps, {"dtype": "float16"}),
                *[("3 steps", b, 3, {}) for b in sizes]]:
            res, err = distill(d, teacher_dir, b, iters, **more)
            if res is None:
                print(f"| {what} | {b} | {err} | - | - | - |", flush=True)
                if iters == 3:  # the batch sizes stop at the first that fails
                    break
                continue
            tps, mfu, mem, reserved, eager = res
            what += " (a torch.compile failed: eager)" if eager else ""
            print(f"| {what} | {b} | {tps:,.0f} | {f'{mfu:.1%}' if mfu else '-'} | {mem:.2f} | "
                  f"{f'{reserved:.2f}' if reserved is not None else '-'} |", flush=True)
            if iters == 3 and (reserved or mem) > limit_gb:
                break
            fits += [b] if not more and (reserved or mem) <= limit_gb else []
    print(f"\nlargest batch_size with peak reserved <= {limit_gb} GB (float32 student): "
          f"{max(fits) if fits else 'none'}; bench/gpu.py took {time.time() - t0:.0f} s",
          flush=True)


if __name__ == "__main__":
    if side:
        harness.report(checks())
    else:
        main()
