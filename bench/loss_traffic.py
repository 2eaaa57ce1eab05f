"""
The loss's memory traffic outside the head products, per token, for each mode of distill_loss
(float32), and its CPU time per token: on a GPU the elementwise work is bound by memory.

    python bench/loss_traffic.py                              # 5-10 min (5 compiles); ~2.7 GB
    python bench/loss_traffic.py --loss_file=/tmp/old.py      # another loss.py, e.g. from
                                                              # git show 8ff3a5c:loss.py

Eager: ByteCounter below counts the bytes each op reads and writes on [C, V] tensors. Compiled
(compile=True): inductor's own estimate for the kernels it generated (its graph metrics), as a
dispatch mode does not see inside a compiled graph.
"""

import contextlib
import importlib.util
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import harness  # noqa: E402
from configurator import at_least, check, configure  # noqa: E402

# -----------------------------------------------------------------------------
loss_file = None  # another loss.py to count (None: the project's)
tokens = 256  # tokens of the batch, a multiple of chunk_size (one compiled graph per mode)
chunk_size = 128  # distill_loss's tokens per chunk
vocab = 151_665  # ids in the softmaxes; the heads have 271 rows more (padding), as Qwen2.5's
repeats = 3  # timed runs per mode, the modes in turn, after a warm-up
compiled = True  # also each mode with compile=True (a compile each: minutes on a CPU)
config = configure(globals())
check(config, {"tokens": at_least(1), "chunk_size": at_least(1), "vocab": at_least(2),
               "repeats": at_least(1)})
# -----------------------------------------------------------------------------


class ByteCounter(TorchDispatchMode):
    """Counts the bytes that ops read and write on [C, V]-sized tensors (C <= chunk_size), leaving
    out the head products (mm, addmm: the logits, grad_h and grad_w) and the index ops, which touch
    only a few entries per row. An op's bytes are those of its [C, V] arguments read (an in-place
    self counts as read and written, an out= argument as written) and of the new [C, V] tensors it
    returns: the traffic of a kernel that streams each operand once. by_op: bytes per op name."""
    SKIP = ("mm", "addmm", "gather", "scatter", "scatter_add", "index_select", "index_copy",
            "index", "empty", "new_zeros", "new_full", "new_empty")  # allocations move no data

    def __init__(self, vocab, chunk_size):
        super().__init__()
        self.vocab, self.chunk, self.bytes, self.by_op = vocab, chunk_size, 0, {}

    def big(self, t):  # [c, V] and its views ([c, 1, V], [c, V, 1], [k, c, V]); not a [V, D] head
        return isinstance(t, torch.Tensor) and t.dim() >= 2 and self.vocab in t.shape[-2:] and \
            t.shape[-1] != t.shape[-2] and min(t.shape) <= self.chunk and \
            t.numel() <= 4 * self.chunk * self.vocab

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema, name = func._schema, func._schema.name.split("::")[-1].rstrip("_")
        if name in self.SKIP or any(r.alias_info is not None and not r.alias_info.is_write
                                    for r in schema.returns):  # a view
            return out
        n, seen = 0, set()
        values = dict(zip((a.name for a in schema.arguments), args)) | kwargs
        for a in schema.arguments:
            t = values.get(a.name)
            if not self.big(t) or (t.data_ptr(), a.name == "out") in seen:
                continue
            seen.add((t.data_ptr(), a.name == "out"))
            writes = a.alias_info is not None and a.alias_info.is_write
            reads = a.name != "out" and not (name in ("copy", "fill", "zero") and a.name == "self")
            n += t.numel() * t.element_size() * (reads + writes)
        fresh = [r for r, spec in zip(out if isinstance(out, tuple) else (out,), schema.returns)
                 if spec.alias_info is None and self.big(r)]
        n += sum(r.numel() * r.element_size() for r in fresh)
        self.bytes += n
        self.by_op[name] = self.by_op.get(name, 0) + n
        return out


def main():
    if loss_file:
        spec = importlib.util.spec_from_file_location("loss_under_test", loss_file)
        lib = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(lib)
    else:
        import loss as lib
    g, V, K = torch.Generator().manual_seed(0), vocab + 271, 12
    h_s, w_s = torch.randn(1, tokens, 512, generator=g), torch.randn(V, 512, generator=g) * 0.02
    h_t, w_t = torch.randn(1, tokens, 896, generator=g), torch.randn(V, 896, generator=g) * 0.05
    y = torch.randint(0, vocab, (1, tokens), generator=g)
    ids = torch.randint(0, vocab, (1, tokens, K), generator=g)
    sparse = dict(ids=ids, t_hat=torch.full((1, tokens, K), 1 / K), entropy=torch.ones(1, tokens),
                  argmax=ids[..., 0])
    modes = [("forward_kl + CE (default)", dict(kind="forward_kl")),
             ("reverse_kl + CE", dict(kind="reverse_kl")), ("jsd + CE", dict(kind="jsd")),
             ("CE only", dict(alpha=0.0, h_t=None, w_t=None)),
             ("sampled teacher (cache) + CE", dict(h_t=None, w_t=None, sparse=sparse))]
    if hasattr(lib, "DIVERGENCES"):  # forward KL once more, by its value alone: autograd's gradient
        lib.DIVERGENCES["forward_kl_by_value"] = lib.forward_kl
        modes.append(("forward_kl by its value alone (autograd) + CE",
                      dict(kind="forward_kl_by_value")))

    def step(kw, counter=None):
        args = dict(h_t=h_t, w_t=w_t, alpha=0.5, temperature=2.0) | kw
        hs, ws = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
        with counter or contextlib.nullcontext():
            lib.distill_loss(hs, ws, args.pop("h_t"), args.pop("w_t"), y, vocab_size=vocab,
                             chunk_size=chunk_size, **args)[0].backward()

    rows = []
    for name, kw in modes:
        step(kw, counter := ByteCounter(vocab, chunk_size))
        top = sorted(counter.by_op.items(), key=lambda kv: -kv[1])[:6]
        rows.append([name, counter.bytes / tokens,
                     ", ".join(f"{k} {v / tokens / (vocab * 4):.1f}" for k, v in top)])
        harness.say(f"{name}: counted")
    if compiled and hasattr(lib, "_terms"):  # the analytic modes, compiled: inductor's estimate
        import torch._inductor.metrics as metrics

        assert tokens % chunk_size == 0, "equal chunks: one graph per mode"
        log = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")  # counts at INFO
        level = log.level
        log.setLevel(logging.INFO)
        torch._dynamo.reset()
        lib._compiled.clear()
        try:
            for name, kw in list(modes):
                if kw.get("kind", "forward_kl") in lib.ANALYTIC:
                    metrics.reset()
                    step(kw := dict(kw, compile=True))  # its compile: one graph, equal chunks
                    if lib._compiled.get("terms") is None:  # the compile failed: the warning says
                        break
                    rows.append([name + ", compiled", metrics.num_bytes_accessed / chunk_size,
                                 "inductor's estimate"])
                    modes.append((name + ", compiled", kw))
                    harness.say(f"{name}: compiled")
        finally:
            log.setLevel(level)
    times = harness.interleaved({name: lambda kw=kw: step(kw) for name, kw in modes}, repeats,
                                "timing the modes")
    print(f"\ndistill_loss forward + backward, {loss_file or 'loss.py'}, {tokens} tokens in chunks "
          f"of {chunk_size}, V = {vocab:,}, float32, T = 2, alpha = 0.5: bytes read and written by "
          f"the non-matmul ops on [C, V] tensors (ByteCounter), per token; a pass = one float32 "
          f"[V] row read or written ({vocab * 4 / 1e6:.2f} MB); CPU ms / token: forward + "
          f"backward, medians of {repeats}, the modes in turn ({harness.machine()})\n")
    harness.table(["mode", "MB / token", "passes / token", "CPU ms / token",
                   "largest ops (passes)"],
                  [[name, f"{b / 1e6:.1f}", f"{b / (vocab * 4):.1f}",
                    f"{times[name] / tokens * 1e3:.2f}", top] for name, b, top in rows])


if __name__ == "__main__":
    main()
