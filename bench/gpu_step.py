"""
config/t4.py's training step on the GPU at hand, part by part: the teacher's forward, the student's
forward, the loss (both heads and the head's gradients), the student's backward, the optimizer;
then the loss's three student-head products alone, so that the loss splits into products and
elementwise work. For the student in float32, float16 and bfloat16 (where the GPU has it), eager
and compiled (compile: the bodies as distill.py compiles them, and the loss's chunk).

    python bench/gpu_step.py     # CUDA (bench/gpu.py runs it); not yet run on a GPU
    python bench/gpu_step.py --device=cpu --teacher=DIR --block_size=32 ...   # a smoke run

Each row is a process of its own (a failed compile is then a row, not the end), timed with CUDA
events (perf_counter on a CPU): medians of `steps` after 3 warm-up steps. The teacher runs as
distill.py runs it: a float16 teacher keeps its residual stream in float32.
"""

import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import torch  # noqa: E402

import harness  # noqa: E402
import hf  # noqa: E402
from common import compiled  # noqa: E402
from configurator import at_least, check, configure, one_of  # noqa: E402
from loss import _add_grad_w, _compiled, distill_loss, head  # noqa: E402
from model import CONFIGS, DTYPES, ModelConfig, Transformer  # noqa: E402

T4 = harness.t4()
# -----------------------------------------------------------------------------
device = "cuda"  # cuda | cuda:N; cpu: a smoke run at tiny settings (its times mean nothing)
teacher = None  # hub id or directory; None: random weights of the Qwen2.5-0.5B shape
teacher_dtype = T4["teacher_dtype"]  # config/t4.py's
vocab_size = 151_665  # ids of the random tokens, Qwen2.5's (at most the teacher's rows)
batch_size = T4["batch_size"]  # config/t4.py's
block_size = T4["block_size"]  # config/t4.py's
kd_chunk_size = T4["kd_chunk_size"]  # config/t4.py's
compile = T4["compile"]  # config/t4.py's: the compiled rows too (False: eager rows only)
n_layer = 12  # the student: distill.py's (student-123m)
n_head = 8
n_kv_head = 2
n_embd = 512
intermediate_size = 2048
steps = 10  # timed steps per row, after 3 warm-ups
timeout = 300  # seconds for each row's process
side = None  # one row alone, in this process: DTYPE or DTYPE-compiled (the script runs itself so)
config = configure(globals())
check(config, {"teacher_dtype": one_of(*DTYPES), "vocab_size": at_least(2),
               "batch_size": at_least(1), "block_size": at_least(1), "steps": at_least(1),
               "kd_chunk_size": at_least(1), "timeout": at_least(1)})
# -----------------------------------------------------------------------------
PARTS = ("teacher forward", "student body forward", "loss (both heads, grads of the head)",
         "student body backward", "optimizer (AdamW, scaler)")


class Clock:
    """Marks between parts of a step: CUDA events on a GPU (no sync until read), perf_counter on
    a CPU."""

    def __init__(self):
        self.cuda, self.marks = torch.device(device).type == "cuda", []
        self.mark()

    def mark(self):
        if self.cuda:
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())

    def seconds(self):  # between consecutive marks
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def one_row():
    dtype, _, how = side.partition("-")
    dt, kind, fast = DTYPES[dtype], torch.device(device).type, how == "compiled"
    torch.manual_seed(0)
    if teacher is None:
        with torch.device(device):
            cfg = dataclasses.replace(CONFIGS["qwen2.5-0.5b"], max_seq_len=block_size)
            t = Transformer(cfg, verbose=False).to(DTYPES[teacher_dtype])
    else:
        t = hf.load(teacher, DTYPES[teacher_dtype], device, max_seq_len=block_size)
    t.requires_grad_(False).eval()
    t.fp32_residual = teacher_dtype == "float16"  # distill.py's teacher_fp32_residual
    s = Transformer(ModelConfig(  # as distill.py makes it
        vocab_size=t.config.vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
        n_embd=n_embd, head_dim=n_embd // n_head, intermediate_size=intermediate_size,
        max_seq_len=block_size, rope_theta=t.config.rope_theta,
        rms_norm_eps=t.config.rms_norm_eps), verbose=False).to(device)
    opt = s.configure_optimizers(0.01, 3e-4, (0.9, 0.95))
    scaler = torch.amp.GradScaler(kind, enabled=dt == torch.float16)
    body, t_body = (compiled(s, "the student"), compiled(t, "the teacher")) if fast else (s, t)
    autocast = torch.autocast(kind, dtype=dt, enabled=dt != torch.float32)
    x = torch.randint(0, vocab_size, (batch_size, block_size + 1), device=device)
    idx, y = x[:, :-1], x[:, 1:]
    times = []
    for i in range(3 + steps):
        clock = Clock()
        with torch.no_grad():
            h_t = t_body(idx)
        clock.mark()
        with autocast:
            h_s = body(idx)
        clock.mark()
        with autocast:
            leaf = h_s.detach().requires_grad_()  # the loss alone: its grad_h lands here
            loss, _ = distill_loss(leaf, s.lm_head.weight, h_t, t.lm_head.weight, y, alpha=0.5,
                                   temperature=2.0, vocab_size=vocab_size,
                                   chunk_size=kd_chunk_size, compile=fast)
            scaler.scale(loss).backward()
        clock.mark()
        h_s.backward(leaf.grad)
        clock.mark()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        clock.mark()
        times += [clock.seconds()] if i >= 3 else []
    out = {part: statistics.median(ts) for part, ts in zip(PARTS, zip(*times))}
    # the three head products alone, chunk by chunk, in the loss's dtypes: logits, grad_h, grad_w
    w, h = s.lm_head.weight[:vocab_size].detach().to(dt), leaf.detach().flatten(0, 1).to(dt)
    C = kd_chunk_size
    z, g = torch.empty(C, vocab_size, device=device), torch.zeros(C, vocab_size, device=device,
                                                                  dtype=dt)
    grad_w, products = torch.zeros(w.shape, device=device), []
    for i in range(3 + steps):
        clock = Clock()
        for j in range(0, h.shape[0], C):
            hc = h[j:j + C]
            head(hc, w, z[:len(hc)])
            head(g[:len(hc)], w.T)
            _add_grad_w(grad_w, g[:len(hc)], hc, 1.0)
        clock.mark()
        products += clock.seconds() if i >= 3 else []
    out["products"], out["step"] = statistics.median(products), sum(out[p] for p in PARTS)
    out["peak GB"] = torch.cuda.max_memory_allocated() / 1e9 if kind == "cuda" else None
    out["eager"] = [what for what, m in (("student", body), ("teacher", t_body))
                    if fast and not m.fast] + (["loss"] if fast and not _compiled["terms"] else [])
    return out


def main():
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_step.py: no CUDA GPU here: skipped (--device=cpu runs it on the CPU, tiny)")
        return
    on_gpu = device.startswith("cuda")
    dtypes = ["float32", "float16"]
    if on_gpu and torch.cuda.get_device_capability(device) >= (8, 0):
        dtypes.append("bfloat16")  # a T4 (sm75) only emulates it
    rows, tokens = [], batch_size * block_size
    name = torch.cuda.get_device_name(device) if on_gpu else harness.machine()
    harness.say(f"the step part by part on {name}: {len(dtypes) * (1 + compile)} rows, each a "
                f"process of at most {timeout} s")
    for dtype in dtypes:
        for how in ["eager"] + ["compiled"] * compile:
            what = f"{dtype}, {how}"
            try:
                r = harness.own_process(config, timeout=timeout,
                                        side=dtype + ("-compiled" if how == "compiled" else ""))
            except SystemExit as e:  # the end of its stderr
                harness.say(f"{what}: " + str(e).strip().replace("\n", "\n    "))
                continue
            if r["eager"]:
                what += f" ({', '.join(r['eager'])} fell back to eager: the warning above)"
            loss, prod = r[PARTS[2]], r["products"]
            rows.append([what] + [f"{r[p] * 1e3:.0f}" for p in PARTS[:2]] +
                        [f"{loss * 1e3:.0f} ({prod * 1e3:.0f} + {(loss - prod) * 1e3:.0f})"] +
                        [f"{r[p] * 1e3:.0f}" for p in PARTS[3:]] +
                        [f"{r['step'] * 1e3:.0f}", f"{tokens / r['step']:,.0f}",
                         f"{r['peak GB']:.2f}" if r["peak GB"] is not None else "-"])
            harness.say(f"{what}: done")
    print(f"\nper part, ms a step (medians of {steps} after 3 warm-ups), batch {batch_size} x "
          f"{block_size}, teacher {teacher or 'random'} in {teacher_dtype}, distill_loss "
          f"chunk_size={kd_chunk_size}; loss = (its head's 3 products alone + the rest: the "
          f"elementwise work); compiled = the two bodies and the loss's chunk under "
          f"torch.compile\n")
    harness.table(["student dtype", "teacher fwd", "student fwd", "loss (products + elementwise)",
                   "student bwd", "optimizer", "step", "tokens/s", "peak GB"], rows)


if __name__ == "__main__":
    if side:
        harness.report(one_row())
    else:
        main()
