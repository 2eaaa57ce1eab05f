"""
Speed and memory, side by side with a reference in the same run; the README shows the tables.

    python bench.py model      # student train step and KV-cache generation vs transformers' Qwen2ForCausalLM
    python bench.py prepare    # prepare.py vs the bare tokenizer
    python bench.py loss       # the fused distillation loss vs the plain full-logits loss
    python bench.py bytes      # the loss's memory traffic outside the head products, per token, each mode
    python bench.py precision  # the student's head in float16/bfloat16 against float32, at the real V
    python bench.py step       # a whole distillation step vs the same step written with transformers
    python bench.py cache      # a step from the teacher cache vs the online step
    python bench.py gpu        # CUDA only: config/t4.py through distill.py for 20 steps, then the largest batch
    python bench.py spec       # speculative decoding (the student drafting) vs the teacher generating alone

Timings interleave the two sides and report medians; memory sections run each side in its own process. gpu has
no reference side: it reports what the T4 run would take (tokens/s, MFU, peak memory) on the GPU at hand.
Settings of a section as --key=value after the names: `python bench.py prepare --tokenizer=DIR` (the
tokenizer as a hub id, the default, or a local directory). The loss's reference needs ~19 GB of free RAM and
the step's ~11 GB (its timing holds both sides in one process).
"""

import contextlib
import inspect
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import torch.utils._python_dispatch

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)


def timed(fn, repeats):
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns, repeats):
    """Median seconds of each fn, running them in turn so that load on the machine hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def machine():
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run_child(fn, timeout=None, **kwargs):
    """Runs fn(**kwargs) of this file in a fresh process and returns the dict it prints: a side's peak RSS
    (ru_maxrss) is then its own."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", fn.__name__, json.dumps(kwargs)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"bench.py: {fn.__name__} timed out after {timeout} s") from None
    if r.returncode != 0:
        raise SystemExit(f"bench.py: {fn.__name__}({kwargs}) failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)


def available_bytes():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


# -----------------------------------------------------------------------------
# model.py vs transformers


def bench_model(T=512, repeats=3, prompt_len=32, new_tokens=128):
    from transformers import AutoModelForCausalLM

    from loss import distill_loss
    from model import CONFIGS, Transformer

    torch.manual_seed(0)
    cfg = CONFIGS["student-123m"]
    with tempfile.TemporaryDirectory() as d:
        Transformer(cfg, verbose=False).save_pretrained(d)
        ours = Transformer.from_pretrained(d, verbose=False)
        ref = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa")
    x = torch.randint(0, 151_665, (1, T + 1))
    idx, targets = x[:, :-1], x[:, 1:]

    def ref_step():
        ref(idx, labels=x[:, :-1]).loss.backward()  # transformers shifts the labels itself

    def ours_step():
        F.cross_entropy(ours.lm_head(ours(idx)).flatten(0, 1), targets.flatten()).backward()

    def ours_fused_step():
        distill_loss(ours(idx), ours.lm_head.weight, None, None, targets, alpha=0.0)[0].backward()

    t = interleaved({"ref": ref_step, "ours": ours_step, "fused": ours_fused_step}, repeats)
    ours.eval(), ref.eval()
    prompt = x[:, :prompt_len]
    g = interleaved({
        "ref": lambda: ref.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False),
        "ours": lambda: ours.generate(prompt, new_tokens, temperature=0),
    }, repeats)
    print(f"student-123m, float32, CPU ({machine()})\n")
    rows = [
        ["train step B=1 T=512: transformers Qwen2ForCausalLM (sdpa), logits + CE", f"{T / t['ref']:.0f}", "1.00x"],
        ["train step: model.py, logits + CE", f"{T / t['ours']:.0f}", f"{t['ref'] / t['ours']:.2f}x"],
        ["train step: model.py, hidden states + fused CE (distill_loss)", f"{T / t['fused']:.0f}",
         f"{t['ref'] / t['fused']:.2f}x"],
        [f"greedy generation ({prompt_len} + {new_tokens} tokens): transformers generate",
         f"{new_tokens / g['ref']:.0f}", "1.00x"],
        ["greedy generation: model.py KV cache", f"{new_tokens / g['ours']:.0f}", f"{g['ref'] / g['ours']:.2f}x"],
    ]
    table(["what", "tokens/s", "vs transformers"], rows)


# -----------------------------------------------------------------------------
# prepare.py vs the bare tokenizer

# the bare tokenizer: load it, batch-encode the same documents, one EOS each, write the array
BARE = r"""
import json, sys
import numpy as np
from transformers import AutoTokenizer
data, tokenizer, out = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(tokenizer)
docs = [json.loads(line)["text"] for line in open(data, encoding="utf-8")]
ids = []
for i in range(0, len(docs), 1000):
    for e in tok.backend_tokenizer.encode_batch_fast(docs[i:i + 1000], add_special_tokens=False):
        ids += e.ids + [tok.eos_token_id]
np.array(ids, dtype=np.uint32).tofile(out)
"""


def run_command(cmd):
    """Wall seconds and peak RSS bytes of a command, each in a fresh meter process (RUSAGE_CHILDREN keeps
    the largest child a process ever waited for)."""
    meter = ("import resource, subprocess, sys, time; t0 = time.time(); "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
             "print(time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", meter, *cmd], capture_output=True, text=True,
                       env=dict(os.environ, TOKENIZERS_PARALLELISM="true"))
    if r.returncode != 0:
        raise SystemExit(f"bench.py: {' '.join(cmd[:3])} ... failed:\n{r.stderr[-2000:]}")
    wall, rss_kb = r.stdout.split()
    return float(wall), int(rss_kb) * 1024


def bench_prepare(data=os.path.join(REPO, "data", "zh_wiki_sample.jsonl"), tokenizer="Qwen/Qwen2.5-0.5B",
                  copies=11, repeats=2):
    """~17 MB: the 1.6 MB zh Wikipedia sample repeated 11 times. Each side is a fresh process (start, imports
    and tokenizer load included), the sides alternate, medians compared."""
    from hf import TOKENIZER_FILES, resolve_pretrained

    try:  # a hub id is downloaded here, once, so that neither side times the download
        tokenizer = resolve_pretrained(tokenizer, TOKENIZER_FILES)
    except FileNotFoundError as e:
        raise SystemExit(f"bench.py: prepare: {e}")
    with tempfile.TemporaryDirectory() as tmp:
        with open(data, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        corpus = os.path.join(tmp, "corpus.jsonl")
        with open(corpus, "w", encoding="utf-8") as f:
            f.writelines(lines * copies)
        texts = [json.loads(line)["text"] for line in lines]
        mb, chars, docs = (copies * x for x in (sum(len(t.encode()) for t in texts) / 1e6, sum(map(len, texts)), len(texts)))
        sides = {"bare tokenizer": [sys.executable, "-c", BARE, corpus, tokenizer, os.path.join(tmp, "bare.bin")],
                 "prepare.py": [sys.executable, os.path.join(REPO, "prepare.py"), f"--input={corpus}",
                                f"--tokenizer={tokenizer}", f"--out_dir={os.path.join(tmp, 'out')}", "--force"]}
        runs = {side: [] for side in sides}
        for _ in range(repeats):
            for side, cmd in sides.items():
                runs[side].append(run_command(cmd))
        with open(os.path.join(tmp, "out", "meta.json")) as f:
            meta = json.load(f)
        tokens = os.path.getsize(os.path.join(tmp, "bare.bin")) // 4
        assert tokens == meta["train_tokens"] + meta["val_tokens"] and meta["train_docs"] + meta["val_docs"] == docs
    print(f"{mb:.1f} MB of text, {docs:,} documents, {tokens:,} tokens ({chars / (tokens - docs):.2f} characters per "
          f"token, EOS not counted); medians of {repeats} interleaved runs ({machine()})\n")
    wall = {side: statistics.median(w for w, _ in runs[side]) for side in sides}
    rss = {side: max(r for _, r in runs[side]) for side in sides}
    table(["side", "wall s", "MB/s", "peak RSS MB", "wall vs bare"],
          [[side, f"{wall[side]:.2f}", f"{mb / wall[side]:.2f}", f"{rss[side] / 1e6:.0f}",
            f"{wall[side] / wall['bare tokenizer']:.2f}x"] for side in sides])


# -----------------------------------------------------------------------------
# the fused distillation loss vs the plain full-logits loss


def loss_side(side, B, T, V, D_s, D_t, iters, chunk_size):
    from loss import distill_loss, reference_loss

    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(B, T, D_s, generator=g).requires_grad_()
    w_s = torch.randn(V, D_s, generator=g).mul_(0.02).requires_grad_()
    h_t = torch.randn(B, T, D_t, generator=g)
    w_t = torch.randn(V, D_t, generator=g).mul_(0.05)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[:, -1] = -100

    def step():
        h_s.grad = w_s.grad = None
        if side == "reference":  # the definition (loss.py): full logits, autograd
            loss = reference_loss(h_s, w_s, h_t, w_t, targets)[0]
        else:
            loss = distill_loss(h_s, w_s, h_t, w_t, targets, chunk_size=chunk_size)[0]
        loss.backward()
        return loss

    t = timed(step, iters)
    return {"time": t, "rss": peak_rss(), "loss": step().item()}


def bench_loss(B=8, T=512, V=151_936, D_s=512, D_t=896, iters=2, chunk_size=256):
    need = 7.5 * B * T * V * 4 + 2 * V * (D_s + D_t) * 4  # ~7 (B, T, V) float32 tensors
    if available_bytes() < need:
        raise SystemExit(f"bench.py: the reference loss needs ~{need / 1e9:.0f} GB, {available_bytes() / 1e9:.0f} GB free")
    args = dict(B=B, T=T, V=V, D_s=D_s, D_t=D_t, iters=iters, chunk_size=chunk_size)
    ref, ours = run_child(loss_side, side="reference", **args), run_child(loss_side, side="fused", **args)
    print(f"forward + backward, B={B} T={T} V={V:,} D_s={D_s} D_t={D_t}, float32, CPU ({machine()}); each side "
          f"in its own process, median of {iters} after a warm-up; peak RSS of the whole process (inputs and "
          f"weights included)\n")
    table(["loss", "s / step", "tokens/s", "peak RSS GB", "time vs reference", "RSS vs reference", "loss value"],
          [[name, f"{r['time']:.2f}", f"{B * T / r['time']:.0f}", f"{r['rss'] / 1e9:.2f}",
            f"{r['time'] / ref['time']:.2f}x", f"{r['rss'] / ref['rss']:.2f}x", f"{r['loss']:.6f}"]
           for name, r in (("reference_loss, full logits", ref), (f"distill_loss, chunk_size={chunk_size}", ours))])


class ByteCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes that ops read and write on [C, V]-sized tensors (C <= chunk_size, V = vocab),
    leaving out the head products (mm, addmm: the logits, grad_h and grad_w) and the index ops, which touch only
    a few entries per row. An op's bytes are those of its [C, V] arguments read (an in-place self counts as read
    and written, an out= argument as written) and of the new [C, V] tensors it returns: the traffic of a kernel
    that streams each operand once, what an elementwise pass costs on a GPU. by_op: bytes per op name."""
    SKIP = ("mm", "addmm", "gather", "scatter", "scatter_add", "index_select", "index_copy", "index",
            "empty", "new_zeros", "new_full", "new_empty")  # views and allocations too: they move no data

    def __init__(self, vocab, chunk_size):
        super().__init__()
        self.vocab, self.chunk, self.bytes, self.by_op = vocab, chunk_size, 0, {}

    def big(self, t):  # [c, V] and its views ([c, 1, V], [c, V, 1], [k, c, V]); not a head's [V, D]
        return isinstance(t, torch.Tensor) and t.dim() >= 2 and self.vocab in t.shape[-2:] and \
            t.shape[-1] != t.shape[-2] and min(t.shape) <= self.chunk and t.numel() <= 4 * self.chunk * self.vocab

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1].rstrip("_")
        if name in self.SKIP or any(r.alias_info is not None and not r.alias_info.is_write
                                    for r in func._schema.returns):
            return out
        n, seen = 0, set()
        values = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
        for a in func._schema.arguments:
            t = values.get(a.name)
            if not self.big(t) or (t.data_ptr(), a.name == "out") in seen:
                continue
            seen.add((t.data_ptr(), a.name == "out"))
            writes = a.alias_info is not None and a.alias_info.is_write
            reads = a.name != "out" and not (name in ("copy", "fill", "zero") and a.name == "self")
            n += t.numel() * t.element_size() * (reads + writes)
        fresh = [r for r, spec in zip(out if isinstance(out, tuple) else (out,), func._schema.returns)
                 if spec.alias_info is None and self.big(r)]
        n += sum(r.numel() * r.element_size() for r in fresh)
        self.bytes += n
        self.by_op[name] = self.by_op.get(name, 0) + n
        return out


def loss_bytes(loss_file=None, tokens=256, V=151_936, vocab=151_665, D_s=512, D_t=896, chunk_size=128, repeats=3):
    """The [C, V] bytes per token of distill_loss's forward + backward (ByteCounter) and its CPU time per token
    (medians of `repeats`, the modes in turn), each mode. loss_file: another loss.py to count (e.g.
    `git show 8ff3a5c:loss.py > /tmp/old.py`, the loss before issue 21)."""
    import importlib.util

    if loss_file:
        spec = importlib.util.spec_from_file_location("loss_under_test", loss_file)
        lib = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(lib)
    else:
        import loss as lib
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(1, tokens, D_s, generator=g)
    w_s = torch.randn(V, D_s, generator=g).mul_(0.02)
    h_t = torch.randn(1, tokens, D_t, generator=g)
    w_t = torch.randn(V, D_t, generator=g).mul_(0.05)
    y = torch.randint(0, vocab, (1, tokens), generator=g)
    K = 12
    ids = torch.randint(0, vocab, (1, tokens, K), generator=g)
    sparse = dict(ids=ids, t_hat=torch.full((1, tokens, K), 1 / K), entropy=torch.ones(1, tokens),
                  argmax=ids[..., 0])
    modes = [("forward_kl + CE (default)", dict(kind="forward_kl")), ("reverse_kl + CE", dict(kind="reverse_kl")),
             ("jsd + CE", dict(kind="jsd")), ("CE only", dict(alpha=0.0, h_t=None, w_t=None)),
             ("sampled teacher (cache) + CE", dict(h_t=None, w_t=None, sparse=sparse))]
    if hasattr(lib, "DIVERGENCES"):  # forward KL once more, given by its value alone: autograd's gradient
        lib.DIVERGENCES["forward_kl_by_value"] = lib.forward_kl
        modes.append(("forward_kl by its value alone (autograd) + CE", dict(kind="forward_kl_by_value")))

    def step(kw, count=False):
        args = dict(h_t=h_t, w_t=w_t, alpha=0.5, temperature=2.0) | kw
        hs, ws = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
        with ByteCounter(vocab, chunk_size) if count else contextlib.nullcontext() as counter:
            lib.distill_loss(hs, ws, args.pop("h_t"), args.pop("w_t"), y, vocab_size=vocab, chunk_size=chunk_size,
                             **args)[0].backward()
        return counter

    rows = []
    for name, kw in modes:
        counter = step(kw, count=True)
        top = sorted(counter.by_op.items(), key=lambda kv: -kv[1])[:6]
        rows.append(dict(mode=name, per_token=counter.bytes / tokens,
                         top=", ".join(f"{k} {v / tokens / (vocab * 4):.1f}" for k, v in top)))
    if hasattr(lib, "_terms"):  # compile=True: the bytes of the kernels inductor generates for the chunk
        rows += compiled_rows(lib, modes, step, tokens, chunk_size)
        modes += [(r["mode"], r["kw"]) for r in rows if "kw" in r]
    times = interleaved({name: lambda kw=kw: step(kw) for name, kw in modes}, repeats)
    for r in rows:
        r["time"] = times[r["mode"]] / tokens
    return rows


def compiled_rows(lib, modes, step, tokens, chunk_size):
    """The modes with compile=True (the analytic ones). Their traffic is inductor's own estimate for the kernels
    it generated (compile_fx's graph metrics: each kernel's distinct buffers, read or written once), per chunk,
    as dispatch modes do not see inside a compiled graph. A mode whose compile fails is left out, with the
    warning."""
    import logging

    import torch._inductor.metrics as metrics

    assert tokens % chunk_size == 0, "equal chunks: one graph per mode"
    log = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")  # its count runs at INFO
    level, rows = log.level, []
    torch._dynamo.reset()
    lib._compiled.clear()
    log.setLevel(logging.INFO)
    try:
        for name, kw in modes:
            if kw.get("kind", "forward_kl") not in lib.ANALYTIC:
                continue
            kw = dict(kw, compile=True)
            metrics.reset()
            step(kw)  # compiles this mode's chunk (one graph: the chunks are equal)
            if lib._compiled.get("terms") is None:
                break
            rows.append(dict(mode=name + ", compiled", per_token=metrics.num_bytes_accessed / chunk_size,
                             top="inductor's estimate", kw=kw))
    finally:
        log.setLevel(level)
    return rows


def bench_bytes(loss_file=None, tokens=256, chunk_size=128, repeats=3):
    """The loss's memory traffic outside the head products, per token, for each mode (float32)."""
    vocab = 151_665
    rows = loss_bytes(loss_file=loss_file, tokens=int(tokens), chunk_size=int(chunk_size), repeats=int(repeats))
    print(f"distill_loss forward + backward, {loss_file or 'loss.py'}, {tokens} tokens in chunks of {chunk_size}, "
          f"V = {vocab:,}, float32, T = 2, alpha = 0.5: bytes read and written by the non-matmul ops on [C, V] "
          f"tensors (bench.ByteCounter), per token; a pass = one float32 [V] row read or written "
          f"({vocab * 4 / 1e6:.2f} MB); CPU ms / token: forward + backward, medians of {repeats}, the modes in turn "
          f"({machine()})\n")
    table(["mode", "MB / token", "passes / token", "CPU ms / token", "largest ops (passes)"],
          [[r["mode"], f"{r['per_token'] / 1e6:.1f}", f"{r['per_token'] / (vocab * 4):.1f}", f"{r['time'] * 1e3:.2f}",
            r["top"]] for r in rows])


def bench_precision(tokens=128, V=151_936, vocab=151_665, D_s=512, D_t=896, chunk_size=128):
    """The student's head in float16/bfloat16 (distill_loss under autocast) against the float32 path, on the same
    inputs at the real V: the loss's relative difference and the cosine of each gradient to float32's. Logits of
    std ~3 (random heads N(0, 0.15), hidden states N(0, 1)); the teacher's head in float16, as config/t4.py's."""
    from loss import distill_loss

    torch.manual_seed(0)
    h_s, h_t = torch.randn(1, tokens, D_s), torch.randn(1, tokens, D_t)
    w_s, w_t = torch.randn(V, D_s) * 0.15, (torch.randn(V, D_t) * 0.11).half()
    y = torch.randint(0, vocab, (1, tokens))

    def run(dtype, kind, alpha):
        hs, ws = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = distill_loss(hs, ws, h_t, w_t, y, alpha=alpha, temperature=2.0, vocab_size=vocab, kind=kind,
                                   chunk_size=chunk_size)
        loss.backward()
        return loss.item(), hs.grad.flatten(), ws.grad.flatten()

    rows = []
    for kind, alpha in (("forward_kl", 0.5), ("forward_kl", 1.0), ("reverse_kl", 0.5)):
        ref = run(torch.float32, kind, alpha)
        for dtype in (torch.bfloat16, torch.float16):
            got = run(dtype, kind, alpha)
            cos = [F.cosine_similarity(g.double(), r.double(), 0).item() for g, r in zip(got[1:], ref[1:])]
            rows.append([f"{kind}, alpha {alpha}", str(dtype).split(".")[1], f"{ref[0]:.5f}", f"{got[0]:.5f}",
                         f"{abs(got[0] - ref[0]) / ref[0]:.1e}", f"{1 - cos[0]:.1e}", f"{1 - cos[1]:.1e}"])
    print(f"{tokens} tokens, V = {V:,} ({vocab:,} in the softmaxes), D_s = {D_s}, teacher head float16, T = 2, CPU "
          f"({machine()}); a CPU emulates the GPU's half products: operands rounded to the half dtype, multiplied in "
          f"float32\n")
    table(["loss", "head dtype", "float32 loss", "half loss", "relative difference", "1 - cos grad_h",
           "1 - cos grad_w"], rows)


# -----------------------------------------------------------------------------
# one whole distillation step at the real shapes vs the same step written with transformers

ALPHA, TEMPERATURE, VOCAB = 0.5, 2.0, 151_665  # the tokenizer's ids; the heads' other 271 rows are padding


def hf_config(cfg):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                       num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                       max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
                       rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
                       use_sliding_window=False, attn_implementation="sdpa")


def make_step(side, B, T, chunk_size, cache_dir=None):
    """One training step of a side, as a function. Random weights on both sides (N(0, 0.02), not the same
    values: a speed and memory test). cached: the student alone, its teacher read from cache_dir (bench_cache)."""
    from loss import distill_loss, reference_loss
    from model import CONFIGS, Transformer

    tcfg, scfg = CONFIGS["qwen2.5-0.5b"], CONFIGS["student-123m"]
    if side == "cached":
        from cache import Cache

        student, cache = Transformer(scfg, verbose=False), Cache(cache_dir, T)
        window = [0]

        def loss_fn(x, y):
            window[0] = (window[0] + 1) % (len(cache.offsets["train"]) - 1)
            sparse = cache.batch("train", [window[0]] * B, "cpu")
            return distill_loss(student(x), student.lm_head.weight, None, None, y, alpha=ALPHA,
                                temperature=TEMPERATURE, vocab_size=VOCAB, chunk_size=chunk_size, sparse=sparse)[0]
    elif side == "ours":
        teacher = Transformer(tcfg, verbose=False).requires_grad_(False).eval()
        student = Transformer(scfg, verbose=False)

        def loss_fn(x, y):
            with torch.no_grad():
                h_t = teacher(x)
            return distill_loss(student(x), student.lm_head.weight, h_t, teacher.lm_head.weight, y, alpha=ALPHA,
                                temperature=TEMPERATURE, vocab_size=VOCAB, chunk_size=chunk_size)[0]
    else:
        from transformers import Qwen2ForCausalLM

        teacher = Qwen2ForCausalLM(hf_config(tcfg)).requires_grad_(False).eval()
        student = Qwen2ForCausalLM(hf_config(scfg)).train()

        def loss_fn(x, y):  # transformers' final hidden states, then the plain full-logits loss of loss.py
            with torch.no_grad():
                h_t = teacher.model(x).last_hidden_state
            return reference_loss(student.model(x).last_hidden_state, student.lm_head.weight, h_t,
                                  teacher.lm_head.weight, y, alpha=ALPHA, temperature=TEMPERATURE,
                                  vocab_size=VOCAB)[0]

    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4, weight_decay=0.01, fused=True)  # as distill.py
    data = torch.randint(0, VOCAB, (B, T + 1))

    def step():
        loss_fn(data[:, :-1], data[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def step_side(side, B, T, threads, chunk_size, cache_dir=None):
    """A side alone in its process: its peak RSS over two steps (AdamW's state exists from the first)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    step = make_step(side, B, T, chunk_size, cache_dir)
    step()
    step()
    return {"rss": peak_rss()}


def step_pair(B, T, steps, threads, chunk_size):
    """Both sides in one process, steps taken in turn: the speed ratio, with any load on the machine hitting
    both alike."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fns = {side: make_step(side, B, T, chunk_size) for side in ("reference", "ours")}
    return interleaved(fns, steps)


def matmul_peak(n=2048, repeats=5):
    """This CPU's float32 matmul FLOP/s (best of a few n x n products): the ceiling for any step."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / min(timed(lambda: a @ b, 1) for _ in range(repeats))


def bench_step(B=1, T=512, steps=5, threads=(0, 1), chunk_size=128):
    """threads: torch thread counts to run both sides at (0: torch's default, one per core). Speed comes from
    both sides in one process, a step of each in turn (medians of `steps`); peak RSS from each side alone in a
    fresh process (a warm-up step, then one more: AdamW's state exists from the first)."""
    from model import CONFIGS, Transformer

    with torch.device("meta"):  # parameter counts only
        teacher, student = (Transformer(CONFIGS[k], verbose=False) for k in ("qwen2.5-0.5b", "student-123m"))
    flops = sum(student.flops_per_token(T)) + sum(teacher.flops_per_token(T, backward=False))
    rows, default_threads = [], torch.get_num_threads()
    for n in threads:
        n = n or default_threads
        torch.set_num_threads(n)
        peak = matmul_peak()
        args = dict(B=B, T=T, threads=n, chunk_size=chunk_size)
        times = run_child(step_pair, steps=steps, **args)
        rss = {side: run_child(step_side, side=side, **args)["rss"] for side in ("reference", "ours")}
        rows += [(name, n, times[side], rss[side], times["reference"], rss["reference"], peak) for name, side in (
            ("reference: transformers Qwen2ForCausalLM x 2 (sdpa), full logits, reference_loss", "reference"),
            ("ours: model.py hidden states + fused distill_loss", "ours"))]
    torch.set_num_threads(default_threads)
    print(f"B={B}, T={T}, float32, CPU ({machine()}); speed: both sides in one process, a step of each in turn, "
          f"medians of {steps} after a warm-up; peak RSS: each side alone in a fresh process; distill_loss "
          f"chunk_size={chunk_size}. A step is {flops / 1e9:.2f} GFLOP/token (student 6N + attention, teacher 2N + "
          f"attention); 'bound' is that at this CPU's float32 matmul speed, measured just before\n")
    table(["one training step", "threads", "tokens/s", "bound", "peak RSS GB", "speed vs reference",
           "RSS vs reference"],
          [[name, n, f"{B * T / t:.1f}", f"{peak / flops:.0f}", f"{r / 1e9:.2f}", f"{t_ref / t:.2f}x",
            f"{r / r_ref:.2f}x"] for name, n, t, r, t_ref, r_ref, peak in rows])


def gpu_checks(teacher, batch_size, block_size, device):
    """What the T4 run must not do silently, in one process. 1. The float16 teacher's hidden states are finite, with
    and without the float32 residual stream (on random weights this only shows the guard works; a real checkpoint
    is the real test). 2. One training step with SDPA restricted to its fused kernels: a fall-back to the math
    kernel, which materializes (T, T) scores, becomes an error."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from loss import distill_loss
    from model import CONFIGS, Transformer

    out = {}
    t = Transformer.from_pretrained(teacher, dtype=torch.float16, device=device, verbose=False, max_seq_len=block_size)
    x = torch.randint(0, VOCAB, (batch_size, block_size + 1), device=device)
    with torch.no_grad():
        for guard in (False, True):
            t.fp32_residual = guard
            out[f"teacher finite, fp32_residual={guard}"] = bool(torch.isfinite(t(x[:, :-1])).all())
    s = Transformer(CONFIGS["student-123m"], verbose=False).to(device)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            with torch.no_grad():
                h_t = t(x[:, :-1])
            loss, _ = distill_loss(s(x[:, :-1]), s.lm_head.weight, h_t, t.lm_head.weight, x[:, 1:], vocab_size=VOCAB,
                                   chunk_size=128)
            loss.backward()
        out["a step with fused SDPA only"] = "ok"
    except RuntimeError as e:
        out["a step with fused SDPA only"] = f"FAILED: {str(e).splitlines()[0][:200]}"
    return out


class Clock:
    """Marks between parts of a step: CUDA events on a GPU (no sync until read), perf_counter on a CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self):  # the intervals between consecutive marks
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


PARTS = ("teacher forward", "student body forward", "loss (both heads, grads of the head)",
         "student body backward", "optimizer (AdamW, scaler)")


def gpu_parts(teacher, device, dtype, compiled, batch_size, block_size, chunk_size, steps, teacher_dtype="float16",
              student="student-123m"):
    """One process: config/t4.py's step (float16 teacher, the student in `dtype` under autocast, distill_loss at
    chunk_size) timed part by part with CUDA events, medians over `steps` after 3 warm-up steps; then the loss's
    three student-head products alone, at the same shapes and dtype, and the loss with the elementwise work alone
    (the products subtracted). compiled: torch.compile the two bodies and the loss's chunk (compile=True)."""
    from loss import distill_loss, head
    from model import CONFIGS, DTYPES, Transformer

    torch.manual_seed(0)
    dt = DTYPES[dtype]
    t = Transformer.from_pretrained(teacher, dtype=DTYPES[teacher_dtype], device=device, verbose=False,
                                    max_seq_len=block_size).requires_grad_(False).eval()
    s = Transformer(CONFIGS[student], verbose=False).to(device)
    opt = torch.optim.AdamW(s.parameters(), lr=3e-4, fused=True)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=dt == torch.float16)
    body, t_body = (torch.compile(s), torch.compile(t)) if compiled else (s, t)
    autocast = torch.autocast(torch.device(device).type, dtype=dt, enabled=dt != torch.float32)
    x = torch.randint(0, VOCAB, (batch_size, block_size + 1), device=device)
    idx, y = x[:, :-1], x[:, 1:]
    times = []
    for step in range(3 + steps):
        clock = Clock(device)
        clock.mark()
        with torch.no_grad():
            h_t = t_body(idx)
        clock.mark()
        with autocast:
            h_s = body(idx)
        clock.mark()
        with autocast:
            h_s_leaf = h_s.detach().requires_grad_()  # the loss alone: its grad_h lands here
            loss, _ = distill_loss(h_s_leaf, s.lm_head.weight, h_t, t.lm_head.weight, y, alpha=ALPHA,
                                   temperature=TEMPERATURE, vocab_size=VOCAB, chunk_size=chunk_size,
                                   compile=compiled)
            scaler.scale(loss).backward()
        clock.mark()
        h_s.backward(h_s_leaf.grad)
        clock.mark()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        clock.mark()
        if step >= 3:
            times.append(clock.seconds())
    out = {part: statistics.median(ts) for part, ts in zip(PARTS, zip(*times))}
    # the three head products alone: logits, grad_h, grad_w, chunk by chunk, in the loss's dtypes
    hd = dt
    w, h = s.lm_head.weight[:VOCAB].detach().to(hd), h_s.detach().reshape(-1, h_s.shape[-1]).to(hd)
    z = torch.empty(chunk_size, VOCAB, device=device)
    g = torch.zeros(chunk_size, VOCAB, device=device, dtype=hd)
    gw = torch.zeros(w.shape, device=device)
    prod = []
    for step in range(3 + steps):
        clock = Clock(device)
        clock.mark()
        for i in range(0, h.shape[0], chunk_size):
            hc = h[i:i + chunk_size]
            head(hc, w, z[:len(hc)])
            head(g[:len(hc)], w.T)
            if hd == torch.float32:
                gw.addmm_(g[:len(hc)].T, hc)
            elif w.is_cuda:
                torch.addmm(gw, g[:len(hc)].T, hc, out_dtype=torch.float32, out=gw)
            else:
                gw.add_(torch.mm(g[:len(hc)].T, hc))
        clock.mark()
        if step >= 3:
            prod.append(clock.seconds()[0])
    out["of which the head's 3 products"] = statistics.median(prod)
    out["step"] = sum(out[p] for p in PARTS)
    if torch.device(device).type == "cuda":
        out["peak GB"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def bench_gpu_parts(teacher, device, batch_size, block_size, chunk_size, steps, timeout, **kw):
    """The table of gpu_parts for float32, float16 and bfloat16 (where the GPU has it), eager and compiled; each
    setting in its own process, so that a compile failure (no Triton for a T4) is a row, not the end."""
    dtypes = ["float32", "float16"]
    if torch.device(device).type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0):
        dtypes.append("bfloat16")
    rows, tokens = [], batch_size * block_size
    for dtype in dtypes:
        for compiled in (False, True):
            what = f"{dtype}, {'compiled' if compiled else 'eager'}"
            try:
                r = run_child(gpu_parts, timeout=timeout, teacher=teacher, device=device, dtype=dtype,
                              compiled=compiled, batch_size=batch_size, block_size=block_size,
                              chunk_size=chunk_size, steps=steps, **kw)
            except SystemExit as e:
                print(f"- {what}: failed: {str(e).strip().splitlines()[-1][:200]}", flush=True)
                continue
            loss, prod = r[PARTS[2]], r["of which the head's 3 products"]
            rows.append([what] + [f"{r[p] * 1e3:.0f}" for p in PARTS[:2]] +
                        [f"{loss * 1e3:.0f} ({prod * 1e3:.0f} + {(loss - prod) * 1e3:.0f})"] +
                        [f"{r[p] * 1e3:.0f}" for p in PARTS[3:]] +
                        [f"{r['step'] * 1e3:.0f}", f"{tokens / r['step']:,.0f}",
                         f"{r['peak GB']:.2f}" if "peak GB" in r else "-"])
            print(f"- {what}: done", flush=True)
    print(f"\nper part, ms a step (medians of {steps} after 3 warm-ups), batch {batch_size} x {block_size}, "
          f"distill_loss chunk_size={chunk_size}; loss = (its head's 3 products alone + the rest: the elementwise "
          f"work); compiled = the two bodies and the loss's chunk under torch.compile\n", flush=True)
    table(["student dtype", "teacher fwd", "student fwd", "loss (products + elementwise)", "student bwd",
           "optimizer", "step", "tokens/s", "peak GB"], rows)


def cache_pair(B, T, steps, threads, chunk_size, cache_dir):
    """The online step and the cached step in one process, in turn: the speed ratio."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return interleaved({side: make_step(side, B, T, chunk_size, cache_dir) for side in ("ours", "cached")}, steps)


def bench_cache(B=1, T=512, steps=5, windows=8, threads=0, chunk_size=128, samples=50):
    """A distillation step from the teacher cache (the student alone) vs today's online step (teacher forward +
    both heads in the loss), at the real shapes: speed from both in one process in turn, peak RSS from each alone.
    First a cache of `windows` windows from the random Qwen2.5-0.5B-shaped teacher: its build time per token,
    bytes per token and kept ids per token. (A random teacher is nearly uniform: at T=2 nearly every draw is a
    new id, the cache's largest case.)"""
    import numpy as np

    import cache as cache_lib
    from model import CONFIGS, Transformer

    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        teacher = Transformer(CONFIGS["qwen2.5-0.5b"], verbose=False).requires_grad_(False).eval()
        data = torch.randint(0, VOCAB, (windows, T + 1))
        meta = dict(vocab_size=VOCAB, temperature=TEMPERATURE, cache_samples=samples, cache_topk=0)
        t0 = time.perf_counter()
        cache_lib.build(d, teacher, lambda split, w: (data[w, :-1], data[w, 1:]), {"train": windows, "val": 1},
                        meta, 4, 0)
        cache_lib.join(d, 1, meta)
        build = (time.perf_counter() - t0) / ((windows + 1) * T)
        del teacher
        tokens = np.fromfile(os.path.join(d, "train.tokens.bin"), dtype=cache_lib.TOKEN)
        size = sum(os.path.getsize(os.path.join(d, f"train.{k}.bin")) for k in ("entries", "tokens")) / len(tokens)
        args = dict(B=B, T=T, threads=threads, chunk_size=chunk_size, cache_dir=d)
        times = run_child(cache_pair, steps=steps, **args)
        rss = {side: run_child(step_side, side=side, **args)["rss"] for side in ("ours", "cached")}
    print(f"B={B}, T={T}, float32, CPU ({machine()}); speed: both in one process, a step of each in turn, medians of "
          f"{steps} after a warm-up; peak RSS: each alone in a fresh process; chunk_size={chunk_size}. The cache: "
          f"{samples} draws per token at T={TEMPERATURE}, {tokens['n'].mean():.1f} kept ids per token (max "
          f"{tokens['n'].max()}), {size:.1f} bytes per token, built at {build * 1e3:.2f} ms per token\n")
    table(["one training step", "tokens/s", "peak RSS GB", "speed vs online", "RSS vs online"],
          [[name, f"{B * T / times[side]:.1f}", f"{rss[side] / 1e9:.2f}", f"{times['ours'] / times[side]:.2f}x",
            f"{rss[side] / rss['ours']:.2f}x"]
           for name, side in (("online: the teacher's forward, both heads in the loss", "ours"),
                              ("from the cache: the student alone, t_hat of the sampled ids", "cached"))])


def bench_gpu(steps=20, limit_gb=14.0, batches=(12, 16, 24, 32, 48), device="cuda", teacher=None, timeout=300,
              parts=True, parts_steps=10, **flags):
    """The T4 run (config/t4.py: float16 teacher, float32 student, batch 8 x 512) through distill.py itself, with
    random tokens and a random teacher of the Qwen2.5-0.5B shape (or `teacher`, a hub id or directory: any teacher
    distill.py takes, e.g. --teacher=Qwen/Qwen2.5-1.5B). First gpu_checks; then the step part by part for each dtype,
    eager and compiled (bench_gpu_parts: CUDA events; parts=False skips it); then `steps` steps: tokens/s, MFU, peak
    memory allocated and reserved; then 3 steps at each of `batches` up to the first whose reserved memory passes
    limit_gb (the T4's 15 GB less ~1 GB for CUDA's context) or runs out. Every row is printed as it comes, so a
    run cut short keeps what it measured; each child has `timeout` seconds and writes no checkpoint or export.
    flags: more distill.py settings (a CPU smoke run: device="cpu", block_size=64, teacher_dtype=float32)."""
    import numpy as np

    from model import CONFIGS, Transformer

    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: skipped")
        return
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        if teacher is None:
            Transformer(CONFIGS["qwen2.5-0.5b"], verbose=False).half().save_pretrained(d)  # the "teacher"
        rng = np.random.default_rng(0)
        for split, n in (("train", 2_000_000), ("val", 100_000)):
            rng.integers(0, VOCAB, n, dtype=np.uint32).tofile(os.path.join(d, f"{split}.bin"))
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump({"dtype": "uint32", "vocab_size": VOCAB, "eos_id": 151_643, "tokenizer": None}, f)
        name = f"{torch.cuda.get_device_name()}, torch {torch.__version__}" if device == "cuda" else machine()
        print(f"config/t4.py on {name}; teacher {teacher or 'random, of the Qwen2.5-0.5B shape'}; random tokens; "
              f"tokens/s and MFU: medians over the last 3/4 of the steps; flags {flags or 'none'}\n", flush=True)
        block = int(flags.get("block_size", 512))
        try:
            for what, result in run_child(gpu_checks, timeout=timeout, teacher=teacher or d, batch_size=8,
                                          block_size=block, device=device).items():
                print(f"- {what}: {result}", flush=True)
        except SystemExit as e:
            print(f"- the checks failed: {e}", flush=True)
        if str(parts) not in ("False", "0"):  # the budget of docs/benchmarks.md, part by part
            bench_gpu_parts(teacher or d, device, 8, block, int(flags.get("kd_chunk_size", 128)), int(parts_steps),
                            timeout, **({"teacher_dtype": flags["teacher_dtype"]} if "teacher_dtype" in flags else {}))

        def run(batch_size, iters):
            args = dict(dict(teacher=teacher or d, data_dir=d, out_dir=os.path.join(d, "out"), device=device,
                             batch_size=batch_size, max_iters=iters, lr_decay_iters=iters, warmup_iters=2,
                             eval_interval=10 ** 6, eval_iters=1, log_interval=1, save=False), **flags)
            shutil.rmtree(args["out_dir"], ignore_errors=True)
            cmd = [sys.executable, os.path.join(REPO, "distill.py"), os.path.join(REPO, "config", "t4.py"),
                   *(f"--{k}={v}" for k, v in args.items())]
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
            med = lambda k: statistics.median(row[k] for row in later) if later[0][k] is not None else None  # noqa
            peak = lambda k: max(row[k] for row in rows) if rows[0][k] is not None else None  # noqa
            return (med("tokens_per_sec"), med("mfu"), peak("peak_mem_gb"), peak("peak_reserved_gb")), None

        print("\n| run | batch_size | tokens/s | MFU | peak allocated GB | peak reserved GB |\n|---|---|---|---|---|---|",
              flush=True)
        fits = []
        for i, (what, b, iters) in enumerate([(f"T4 settings, {steps} steps", 8, steps)] +
                                             [("3 steps", b, 3) for b in batches if b != 8]):
            res, err = run(b, iters)
            if res is None:
                print(f"| {what} | {b} | {err} | - | - | - |", flush=True)
                break
            tps, mfu, mem, reserved = res
            print(f"| {what} | {b} | {tps:,.0f} | {f'{mfu:.1%}' if mfu else '-'} | {mem:.2f} | "
                  f"{f'{reserved:.2f}' if reserved is not None else '-'} |", flush=True)
            if (reserved or mem) > limit_gb:
                break
            fits.append(b)
        print(f"\nlargest batch_size with peak reserved <= {limit_gb} GB: {max(fits) if fits else 'none'}; "
              f"bench.py gpu took {time.time() - t0:.0f} s", flush=True)


# -----------------------------------------------------------------------------
# speculative decoding vs plain generation


def bench_spec(new_tokens=32, prompt_len=16, draft_len=4, repeats=2):
    """Greedy generation by the teacher alone, the draft alone and the teacher with the draft (speculative.py),
    tokens/s side by side, at the KD-vs-CE experiment's sizes and at the real shapes
    (Qwen2.5-0.5B drafted for by student-123m), random weights. Random drafts are never accepted, so the
    speculative rows force the acceptance (speculative.accept replaced): all g drafts pass, or none. They measure
    the cost ratio c and what a call costs around the models, not a real acceptance: eval.py measures that."""
    import dataclasses

    import speculative
    from model import CONFIGS, ModelConfig, Transformer

    new_tokens, prompt_len, g, repeats = int(new_tokens), int(prompt_len), int(draft_len), int(repeats)
    exp = dict(vocab_size=4096, head_dim=64, max_seq_len=256, rope_theta=1e6)  # experiments/kd_vs_ce.py, "full"
    shapes = {"experiment: 4 x 256 teacher, 2 x 128 student, vocab 4,096":
              (ModelConfig(n_layer=4, n_head=4, n_kv_head=2, n_embd=256, intermediate_size=768, **exp),
               ModelConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=128, intermediate_size=384, **exp)),
              "real: Qwen2.5-0.5B teacher, student-123m draft":
              tuple(dataclasses.replace(CONFIGS[k], max_seq_len=256) for k in ("qwen2.5-0.5b", "student-123m"))}
    real_accept = speculative.accept

    def forced(passes):  # every draft passes (passes=True) or none; then the teacher's argmax, as greedy would
        def accept(p, q, drafted):
            n = torch.full((p.size(0),), drafted.size(1) if passes else 0, dtype=torch.long, device=p.device)
            return n, p[torch.arange(p.size(0)), n].argmax(-1)
        return accept

    print(f"greedy, {prompt_len} + {new_tokens} tokens, g = {g}, float32, CPU ({machine()}); medians of {repeats} "
          f"after a warm-up, the runs interleaved\n")
    rows = []
    for name, (tcfg, dcfg) in shapes.items():
        torch.manual_seed(0)
        teacher, draft = Transformer(tcfg, verbose=False).eval(), Transformer(dcfg, verbose=False).eval()
        prompt = torch.randint(0, tcfg.vocab_size, (1, prompt_len))
        stats = {}

        def spec(key):
            def run():
                speculative.accept = forced(key == "all")
                try:
                    stats[key] = {}
                    teacher.generate(prompt, new_tokens, 0.0, draft=draft, draft_len=g, stats=stats[key])
                finally:
                    speculative.accept = real_accept
            return run

        t = interleaved({"teacher": lambda: teacher.generate(prompt, new_tokens, 0.0),
                         "draft": lambda: draft.generate(prompt, new_tokens, 0.0),
                         "all": spec("all"), "none": spec("none")}, repeats)
        c = t["draft"] / t["teacher"]
        rows += [[name, "teacher alone", "-", f"{new_tokens / t['teacher']:.1f}", "1.00x", "1.00x"],
                 ["", f"draft alone (c = {c:.3f})", "-", f"{new_tokens / t['draft']:.1f}",
                  f"{t['teacher'] / t['draft']:.2f}x", "-"]]
        for key, what, a in (("all", "all drafts pass", 1.0), ("none", "no draft passes", 0.0)):
            per_call = new_tokens / stats[key]["calls"]
            predicted = (g + 1 if a else 1) / (g * c + 1)
            rows.append(["", f"speculative, {what}", f"{per_call:.2f}", f"{new_tokens / t[key]:.1f}",
                         f"{t['teacher'] / t[key]:.2f}x", f"{predicted:.2f}x"])
    table(["shapes", "generation", "tokens per teacher call", "tokens/s", "vs teacher alone",
           "predicted (1 - a^(g+1)) / ((1 - a)(g c + 1))"], rows)


SECTIONS = {"model": bench_model, "prepare": bench_prepare, "loss": bench_loss, "bytes": bench_bytes,
            "precision": bench_precision, "step": bench_step, "cache": bench_cache, "gpu": bench_gpu,
            "spec": bench_spec}
CHILDREN = {"loss_side": loss_side, "step_side": step_side, "step_pair": step_pair, "gpu_checks": gpu_checks,
            "gpu_parts": gpu_parts, "cache_pair": cache_pair}

# -----------------------------------------------------------------------------
# the command line. What a section takes on docs/benchmarks.md's machine (2 CPU cores), for the list that a bare
# `python bench.py` prints instead of starting them all
NEEDS = {"model": "~3 min; RAM not measured (two 123M students in one process)",
         "prepare": "~1 min, ~0.7 GB; the tokenizer (its hub id online, or --tokenizer=DIR)",
         "loss": "~5 min; ~19 GB of free RAM (the full-logits reference)",
         "step": "~10 min; ~11 GB of RAM (both sides in one process)",
         "cache": "~3 min; ~5 GB of RAM",
         "bytes": "5-10 min (five compiles); ~2.7 GB of RAM",
         "precision": "~4 min; ~4.5 GB of RAM",
         "gpu": "a CUDA GPU, up to --limit_gb=14 GB of it; time not measured here",
         "spec": "~2 min; ~3 GB of RAM (Qwen2.5-0.5B's and student-123m's shapes, random weights)"}


def sections_table():
    said = dict(re.findall(r"python bench\.py (\w+)\s+# (.*)", __doc__))  # what each compares, from the top
    rows = [(name, said.get(name) or (inspect.getdoc(fn) or "").split(".")[0], NEEDS.get(name, "not stated"))
            for name, fn in SECTIONS.items()]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {n:<{width}}  {what}\n  {'':<{width}}  needs {needs}" for n, what, needs in rows)


USAGE = "usage: python bench.py SECTION [SECTION ...] [--key=value ...]   (all: every section, in turn)"

if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # one side of a memory benchmark, in its own process
        print(json.dumps(CHILDREN[sys.argv[2]](**json.loads(sys.argv[3]))))
        sys.exit()
    if "-h" in sys.argv[1:] or "--help" in sys.argv[1:]:
        print(f"{USAGE}\n{__doc__}\nsections (what they take on 2 CPU cores):\n{sections_table()}\n\nsettings:")
        for name, fn in SECTIONS.items():
            params = inspect.signature(fn).parameters.values()
            print(f"  {name}: " + ", ".join(f"--{p.name}={p.default}" for p in params if p.default is not p.empty))
        sys.exit()
    if not [a for a in sys.argv[1:] if not a.startswith("--")]:  # a bare call lists, it does not start ~30 min
        print(f"{USAGE}\n\nsections (what they take on 2 CPU cores):\n{sections_table()}\n\n"
              f"python bench.py --help: every section's settings")
        sys.exit()
    names = [a for a in sys.argv[1:] if not a.startswith("--")]
    names = list(SECTIONS) if names == ["all"] else names
    flags = dict(a[2:].partition("=")[::2] for a in sys.argv[1:] if a.startswith("--"))
    for name in names:
        if name not in SECTIONS:
            raise SystemExit(f"bench.py: error: unknown section {name!r}; one of {', '.join(SECTIONS)}, or all")
    for key in flags:
        if not any(key in inspect.signature(SECTIONS[name]).parameters for name in names):
            raise SystemExit(f"bench.py: error: no section of {', '.join(names)} takes --{key}")
    for name in names:
        print(f"\n## {name}\n", flush=True)
        SECTIONS[name](**{k: v for k, v in flags.items() if k in inspect.signature(SECTIONS[name]).parameters})
