"""
Distill Qwen2.5-0.5B (the teacher) into a small Qwen2 student on the token bins of prepare.py.

    python distill.py config/t4.py                    # the standard run, one T4
    python distill.py config/t4.py --batch_size=4     # any setting as --key=value, after the files
    python -m torch.distributed.run --standalone --nproc_per_node=8 distill.py config/a100.py
    python distill.py --teacher=None                  # no teacher: a plain language model (CE only)

Per token, with z the logits, T the temperature and y the next token (Hinton et al. 2015):

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

The frozen teacher runs only up to its final hidden states; distill_loss (loss.py) applies both
heads a chunk of tokens at a time, so no [B, T, V] logits ever exist (2.5 GB in float32 at
8 x 512 x 151,936). Writes out_dir/log.jsonl (one JSON object per line), out_dir/ckpt.pt (at every
eval, on Ctrl-C and at the end; init_from="resume" continues exactly) and at the end out_dir/hf, a
Hugging Face directory with the tokenizer.
"""

import inspect
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import lru_cache, partial

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cache
import checkpoint
import common
import hf
import onpolicy
import prune
from common import die
from configurator import DEVICE, at_least, between, check, configure, one_of
from data import Bins
from loss import KD_KINDS, distill_loss
from model import DTYPES, ModelConfig, Transformer, auto_dtype

common.check_torch()

# -----------------------------------------------------------------------------
# settings: config/*.py files and --key=value flags override these (configurator.py)
# I/O
data_dir = "data/wiki_zh"  # prepare.py's output: train.bin, val.bin, meta.json
out_dir = "out"  # ckpt.pt, log.jsonl, hf/
init_from = "scratch"  # scratch | prune (cut out of the teacher: prune.py) | resume (its ckpt.pt)
eval_interval = 500  # evaluate and checkpoint every this many iterations, and at the end
eval_iters = 20  # validation batches per eval: a fixed set of eval_iters * batch_size windows
log_interval = 10  # a train row (printed and in log.jsonl) every this many iterations
save = True  # write ckpt.pt and, at the end, the Hugging Face export (bench/gpu.py: off)
wandb_log = False  # also log to Weights & Biases (pip install wandb)
wandb_project = "qwen-distill"
wandb_run_name = "student-123m"
# teacher and loss
teacher = "Qwen/Qwen2.5-0.5B"  # hub id or local Hugging Face directory; None: no teacher, CE only
teacher_dtype = "auto"  # float32 | bfloat16 | float16; auto: CPU float32, sm80+ bfloat16, else fp16
teacher_fp32_residual = True  # a float16 teacher keeps its residual stream float32 (fp16 overflows)
alpha = 0.5  # weight of the KD term; 1 - alpha goes to CE on the data
temperature = 2.0  # softens both distributions in the KD term, scaled by T^2 (its gradient's size)
kd_kind = "forward_kl"  # forward_kl | reverse_kl | jsd (loss.py explains each)
kd_beta = 0.5  # jsd only: the mixture weight
teacher_cache = None  # a directory: the teacher runs once into a sampled cache there (cache.py)
cache_samples = 50  # teacher_cache: draws per token from the teacher at the temperature (<= 255)
cache_topk = 0  # teacher_cache: > 0 keeps the k most likely ids instead (biased: for comparison)
kd_chunk_size = 128  # tokens per chunk of the fused loss: a few (chunk, V) fp32 buffers, 78 MB each
# on-policy (onpolicy.py, docs/onpolicy.md): the student also learns on its own continuations
onpolicy_tokens = 0  # tokens at the end of each window the student writes itself; 0: off
onpolicy_share = 1.0  # share of the steps that are on-policy (GKD's lambda); the others as usual
onpolicy_temperature = 1.0  # its sampling temperature; 1: the student's distribution, as it drafts
onpolicy_kind = "reverse_kl"  # the divergence on its own tokens, any kd_kind; why: docs/onpolicy.md
prune_windows = 256  # init_from=prune: train windows on which the teacher's pieces are ranked
prune_layers = "importance"  # init_from=prune: layers kept: importance (1 - cos(in, out)) | even
prune_width = "importance"  # init_from=prune: the channels, heads, neurons kept: importance | even
# student: vocabulary, rope_theta and rms_norm_eps are the teacher's; head_dim = n_embd // n_head
n_layer = 12
n_head = 8
n_kv_head = 2  # grouped-query attention: n_head // n_kv_head query heads share a K/V head
n_embd = 512
intermediate_size = 2048  # SwiGLU width
# data
block_size = 512  # tokens per sequence; the data is cut into windows of block_size + 1
batch_size = 8  # sequences per micro-step, per process
gradient_accumulation_steps = 1  # micro-steps per optimizer step
epochs = 3  # passes over train.bin when max_iters is 0
max_iters = 0  # optimizer steps; 0: epochs * windows // windows per step
# AdamW; linear warmup, then cosine decay to min_lr
learning_rate = 3e-4
min_lr = 1e-5
warmup_iters = 500
lr_decay_iters = 0  # where the cosine reaches min_lr; 0: max_iters (set it to stop early, resume)
weight_decay = 0.01  # on 2-D weights only, not on biases and norms
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the gradient's global norm; 0: no clipping
# system
device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu | cuda | cuda:N (torchrun: per rank)
dtype = "float32"  # student compute: float32 | bfloat16 | float16 (autocast over float32 weights)
compile = False  # torch.compile student, teacher, loss chunk; where it fails: a warning, eager
deterministic = False  # GPU runs that repeat to the bit (attention's backward without atomics)
seed = 1337
config = configure(globals())

# -----------------------------------------------------------------------------
# the settings' valid values, checked before anything is loaded

is_dir = (lambda v: isinstance(v, str) and v != ""), "a directory"
check(config, {
    "data_dir": is_dir, "out_dir": is_dir, "init_from": one_of("scratch", "prune", "resume"),
    "eval_interval": at_least(1), "eval_iters": at_least(1), "log_interval": at_least(1),
    "teacher_dtype": one_of("auto", *DTYPES), "alpha": between(0, 1),
    "temperature": between(0, math.inf, "()"), "kd_kind": one_of(*KD_KINDS),
    "kd_beta": between(0, 1, "()"), "kd_chunk_size": at_least(1), "cache_samples": between(1, 255),
    "cache_topk": between(0, 255),
    "teacher_cache": ((lambda v: v is None or is_dir[0](v)), "a directory or None"),
    "onpolicy_tokens": between(0, block_size - 1), "onpolicy_share": between(0, 1, "(]"),
    "onpolicy_temperature": at_least(0), "onpolicy_kind": one_of(*KD_KINDS),
    "prune_windows": at_least(1), "prune_layers": one_of("importance", "even"),
    "prune_width": one_of("importance", "even"),
    "n_layer": at_least(1), "n_head": at_least(1), "n_kv_head": at_least(1), "n_embd": at_least(1),
    "intermediate_size": at_least(1), "block_size": at_least(1), "batch_size": at_least(1),
    "gradient_accumulation_steps": at_least(1), "epochs": at_least(1), "max_iters": at_least(0),
    "learning_rate": at_least(0), "min_lr": at_least(0), "warmup_iters": at_least(0),
    "lr_decay_iters": at_least(0), "weight_decay": at_least(0), "beta1": between(0, 1, "[)"),
    "beta2": between(0, 1, "[)"), "grad_clip": at_least(0), "device": DEVICE,
    "dtype": one_of(*DTYPES), "seed": at_least(0)})
if n_embd % n_head or n_head % n_kv_head:
    die(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head}), and n_head of n_kv_head "
        f"({n_kv_head})")
if init_from == "prune" and teacher is None:
    die("init_from=prune cuts the student out of the teacher, and teacher is None: give a teacher")
if teacher_cache and (teacher is None or kd_kind != "forward_kl"):
    die(f"teacher_cache keeps samples of a teacher's distribution, which forward_kl learns from; "
        f"teacher={teacher!r}, kd_kind={kd_kind!r}: give a teacher and forward_kl, or drop "
        f"--teacher_cache (reverse_kl and jsd need the whole teacher)")
if onpolicy_tokens and (teacher is None or teacher_cache):
    die(f"onpolicy_tokens={onpolicy_tokens}: on-policy steps need the teacher online, to score the "
        f"student's own tokens (teacher={teacher!r}, teacher_cache={teacher_cache!r}, which holds "
        f"it on the corpus alone): give a teacher and no --teacher_cache, or --onpolicy_tokens=0")
if min_lr > learning_rate:
    die(f"min_lr={min_lr} exceeds learning_rate={learning_rate}: the schedule decays to min_lr")

# -----------------------------------------------------------------------------
# processes and devices

ddp, rank, local_rank, world_size, device = common.init_processes(device)  # torchrun's, or this one
device_type = "cuda" if device.startswith("cuda") else "cpu"
master = rank == 0
print0 = partial(print, flush=True) if master else (lambda *args, **kw: None)  # rank 0 only
common.one_line_errors()  # Ctrl-C, a full disk, no memory: one line (the loop takes Ctrl-C over)
if teacher_dtype == "auto":
    teacher_dtype = str(auto_dtype(device)).removeprefix("torch.")
common.check_bfloat16(device, dtype=dtype, teacher_dtype=teacher_dtype)  # not where it is emulated
if teacher is None:
    alpha = 0.0  # nothing to distill from: CE on the data only
torch.manual_seed(seed)
if deterministic:  # before cuBLAS starts: fixed workspaces, as use_deterministic_algorithms asks
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
if device_type == "cuda":  # TF32 matmuls for float32 on Ampere+ (no effect on a T4)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=DTYPES[dtype])

# out_dir: writable, created only when the first file is written, and no earlier run in it lost to a
# forgotten --init_from=resume (every process checks, so that all stop together)
common.check_writable(out_dir, "out_dir")
ckpt_path, log_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "log.jsonl")
if init_from != "resume" and os.path.exists(ckpt_path):
    die(f"{ckpt_path} holds an earlier run: continue it with --init_from=resume, or start again in "
        f"another --out_dir (or delete it)")

# -----------------------------------------------------------------------------
# data: prepare.py's flat token bins, cut into non-overlapping windows of block_size + 1 tokens

try:
    bins = Bins(data_dir, block_size)  # data.py: meta.json and the bins, checked
except ValueError as e:
    die(str(e))
meta, vocab_size = bins.meta, bins.vocab_size
windows_per_iter = batch_size * gradient_accumulation_steps * world_size
tokens_per_iter = windows_per_iter * block_size
n_train, n_val = bins.n_windows("train"), bins.n_windows("val")
if n_train < windows_per_iter:
    die(f"train.bin holds {n_train} windows of block_size + 1 = {block_size + 1} tokens; one step "
        f"takes {windows_per_iter} (batch_size * gradient_accumulation_steps * processes): more "
        f"data or smaller settings")
if n_val < 1:
    die(f"val.bin is shorter than one window of block_size + 1 = {block_size + 1} tokens")
if max_iters == 0:
    max_iters = epochs * (n_train // windows_per_iter)
lr_decay_iters = lr_decay_iters or max_iters
if warmup_iters >= min(max_iters, lr_decay_iters):  # a schedule that never reaches learning_rate
    print0(f"warning: warmup_iters={warmup_iters} is not shorter than the run ({max_iters} iters, "
           f"the decay {lr_decay_iters}): the learning rate peaks at "
           f"{min(max_iters, lr_decay_iters) / (warmup_iters + 1):.1%} of learning_rate; set "
           f"--warmup_iters to about a tenth of it (--warmup_iters={max(1, max_iters // 10)})")


def load_batch(split, windows):
    """Window indices -> x, y (len, block_size) int64 on the device, y being x shifted by one
    token, and the cached teacher of those windows (distill_loss's sparse; None without a cache)."""
    x, y = bins.batch(split, windows, device)
    return x, y, tcache.batch(split, windows, device) if tcache else None


@lru_cache(maxsize=2)
def epoch_order(epoch):  # a permutation of the windows per epoch from the seed (all resume needs)
    return np.random.default_rng(seed + epoch).permutation(n_train)


def fit(pos):  # an epoch's last windows, fewer than one step, wait for a later shuffle
    return pos if pos[1] + windows_per_iter <= n_train else (pos[0] + 1, 0)


def step_windows(pos):
    """This process's micro-batches' windows at data position pos = (epoch, window in the epoch's
    order). The step takes the next windows_per_iter windows, and slot micro * world_size + rank
    of them is ours."""
    order, slots = epoch_order(pos[0]), range(gradient_accumulation_steps)
    starts = [pos[1] + (m * world_size + rank) * batch_size for m in slots]
    return [order[s:s + batch_size] for s in starts]


def step_batches(pos):  # (x, y, sparse) of each micro-batch
    return [load_batch("train", windows) for windows in step_windows(pos)]


# validation: a fixed, evenly spread set of windows of val.bin; each process takes its share
n_eval = min(eval_iters * batch_size, n_val)
val_windows = np.arange(n_eval) * n_val // n_eval
my_val_windows = val_windows[rank::world_size]

# -----------------------------------------------------------------------------
# resume: the checkpoint is read and compared with these settings and data before the teacher loads;
# the student's shape is the checkpoint's, whatever the settings say

ckpt, log_rows = None, []
if init_from == "resume":
    if not os.path.exists(ckpt_path):
        die(f"no {ckpt_path} to resume from; start with --init_from=scratch")
    try:  # and log.jsonl's rows up to the checkpoint: the later iterations run again
        ckpt = checkpoint.load(ckpt_path)
        report = checkpoint.compare_resume(ckpt, {k: globals()[k] for k in config}, meta,
                                           world_size)
        log_rows = checkpoint.resume_log(log_path, ckpt["iter_num"])
    except ValueError as e:
        die(str(e))
    print0(f"resuming {ckpt_path} at iter {ckpt['iter_num']}", *report, sep="\n")
    n_layer, n_head, n_kv_head, n_embd, intermediate_size = \
        (ckpt["model_args"][k] for k in checkpoint.SHAPE)
# what this run uses, for the checkpoint and the log: the settings as given, and as derived above
config = {k: globals()[k] for k in config}

# -----------------------------------------------------------------------------
# the teacher: online (model.py, frozen) or its sampled cache (cache.py); loss_fn (below) takes
# whichever it is

cache_meta, cache_state, tcache = None, None, None
if teacher_cache:  # checked against what it was built from, before anything loads; built when used
    cache_meta = cache.describe(bins, teacher, temperature, cache_samples, cache_topk, seed)
    cache_state = cache.state(teacher_cache, cache_meta)
    if cache_state not in ("complete", "absent"):
        die(cache_state)

teacher_model, tcfg = None, None
batch_hint = f"lower --batch_size (now {batch_size}): the teacher runs on that many windows at once"
if teacher is not None and (cache_state != "complete" or init_from == "prune"):
    common.phase("loading the teacher", "a smaller teacher, or --teacher_dtype=float16", device)
    try:  # checked against the data: its tokenizer, vocabulary and block_size (hf.py)
        teacher_model = hf.load_teacher(teacher, meta.get("tokenizer"), bins.eos_id, vocab_size,
                                        block_size, DTYPES[teacher_dtype], device, verbose=master,
                                        log=print0)
    except ValueError as e:
        die(str(e))
    teacher_model.fp32_residual = teacher_fp32_residual and teacher_dtype == "float16"
    tcfg = teacher_model.config
elif cache_state == "complete":  # the teacher is not loaded: its shape comes from the cache
    tcfg = ModelConfig(**cache.teacher_config(teacher_cache))

# -----------------------------------------------------------------------------
# the student: from scratch, cut out of the teacher (prune.py), or the checkpoint's

model_args = ckpt["model_args"] if ckpt is not None else asdict(ModelConfig(
    # the teacher's vocabulary (padding rows included); else the tokenizer's, rounded up to 64
    vocab_size=tcfg.vocab_size if tcfg else -(-vocab_size // 64) * 64, n_layer=n_layer,
    n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, head_dim=n_embd // n_head,
    intermediate_size=intermediate_size, max_seq_len=block_size, tie_word_embeddings=True,
    rope_theta=tcfg.rope_theta if tcfg else ModelConfig.rope_theta,
    rms_norm_eps=tcfg.rms_norm_eps if tcfg else ModelConfig.rms_norm_eps))
if block_size > model_args["max_seq_len"]:
    die(f"block_size {block_size} exceeds the student's max_seq_len {model_args['max_seq_len']}")
if model_args["vocab_size"] < vocab_size:
    die(f"the student's vocabulary ({model_args['vocab_size']} rows) is smaller than the "
        f"tokenizer's ({vocab_size})")
if init_from == "prune" and (problem := prune.check(tcfg, ModelConfig(**model_args))):
    die(f"init_from=prune: {problem}")

if teacher_cache:
    common.phase("the teacher cache's build", batch_hint, device)
    tcache = cache.open_or_build(teacher_cache, cache_meta, teacher_model, bins, batch_size, rank,
                                 world_size, log=print0)
    print0(f"training from the teacher cache {teacher_cache}: kl and val_kl are estimates from its "
           f"samples (unbiased), teacher_val_ce and val_top1 exact")

if init_from == "prune":  # calibrated on prune_windows windows of train.bin (prune.py)
    calibration = np.random.default_rng(seed).permutation(n_train)[:prune_windows][rank::world_size]
    common.phase("the calibration of init_from=prune", batch_hint, device)
    raw_model = prune.calibrate_and_cut(
        teacher_model, ModelConfig(**model_args),
        (bins.batch("train", calibration[i:i + batch_size], device)[0]
         for i in range(0, len(calibration), batch_size)),
        min(prune_windows, n_train), prune_layers, prune_width, log=print0)
else:  # float32: the master weights under autocast
    raw_model = Transformer(ModelConfig(**model_args), verbose=master)
if ckpt is not None:
    raw_model.load_state_dict(ckpt["model"])
raw_model.to(device)
if tcache is not None and teacher_model is not None:  # it built the cache (or pruned): not needed
    teacher_model = None
    if device_type == "cuda":
        torch.cuda.empty_cache()

if master and save:  # room for a checkpoint: the float32 weights and AdamW's two moments
    common.check_room(out_dir, 12 * raw_model.num_params(), log=print0)

# -----------------------------------------------------------------------------
# optimizer, GradScaler, the rest of the checkpoint

optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2))
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # float16's small range
iter_num, data_pos, best_val_ce = 0, (0, 0), float("inf")
if ckpt is not None:
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"] is not None and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    iter_num, data_pos = ckpt["iter_num"], fit(tuple(ckpt["data_pos"]))
    best_val_ce = ckpt["best_val_ce"]
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device_type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    ckpt = None  # its tensors are in the model and the optimizer now
resumed_at = iter_num if init_from == "resume" else None

# torch.compile, falling back to eager with a warning where it fails (common.compiled)
model = common.compiled(raw_model, "the student") if compile else raw_model
if compile and teacher_model is not None:
    teacher_model = common.compiled(teacher_model, "the teacher")
train_model = model
if ddp:  # around the compiled module, as PyTorch advises: DDPOptimizer then splits its graph at
    # the gradient buckets, whose all-reduces overlap the backward. The only buffers are the RoPE
    # tables, the same on every process: not broadcast at every forward (its name since torch 2.13)
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else "broadcast_buffers")
    train_model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None,
                      **{no_sync: False})

# -----------------------------------------------------------------------------
# the loop's helpers: schedule, loss, sums over processes, health checks, log, MFU, stop requests

def get_lr(it):  # linear warmup ((it + 1) / (warmup + 1): step 0 moves), cosine to min_lr, min_lr
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# distill_loss's settings, the same for the step and the eval
kd = dict(alpha=alpha, temperature=temperature, vocab_size=vocab_size, kind=kd_kind,
          chunk_size=kd_chunk_size, beta=kd_beta, compile=compile)


def loss_fn(h_s, x, y, sparse, normalizer, keep=None):
    """distill_loss of the student's hidden states h_s against the teacher on x: online (its hidden
    states and head, run here without gradients), the cache's sampled teacher (sparse), or none (CE
    only). keep: an on-policy window's mask (onpolicy.py): the prefix's positions take the usual
    loss, the student's own positions onpolicy_kind alone. Returns (loss, stats, h_t): stats also
    has bad_teacher (the teacher's output is not finite); h_t is None without an online teacher."""
    h_t = w_t = None
    if teacher_model is not None:
        with torch.no_grad():
            h_t, w_t = teacher_model(x), teacher_model.lm_head.weight
    # under autocast the loss runs the student's head products in dtype (float32 results), its
    # softmaxes, KL and CE in float32. It applies both heads itself, a chunk of tokens at a time;
    # the student's head is tied to its embedding (the same tensor)
    with autocast:
        loss, s = distill_loss(h_s, raw_model.lm_head.weight, h_t, w_t, y, normalizer=normalizer,
                               sparse=sparse, **kd) if keep is None else \
            onpolicy.loss(h_s, raw_model.lm_head.weight, h_t, w_t, x, y, keep, normalizer,
                          onpolicy_kind, **kd)
    s["bad_teacher"] = torch.zeros((), device=device) if h_t is None else ~torch.isfinite(h_t).all()
    return loss, s, h_t


def teacher_ce(h_t, y, sparse):  # the teacher's own CE summed over y: the cache holds it per label
    if sparse is not None:
        return sparse["ce"][y != -100].sum()
    return distill_loss(h_t, teacher_model.lm_head.weight, None, None, y, normalizer=1.0,
                        **dict(kd, alpha=0.0, compile=False))[1]["ce"]


def all_reduce(stats):
    """{name: 0-dim tensor} -> {name: float}, summed over processes in one all-reduce (one sync)."""
    values = torch.stack([v.float() for v in stats.values()])
    if ddp:
        dist.all_reduce(values)
    return dict(zip(stats, values.tolist()))


def check_finite(what, value, bad_teacher):
    # before anything trains on it: a non-finite teacher output (fp16 overflow) or loss stops it
    if bad_teacher:  # its weights are finite (hf.load_teacher checks): its activations are not
        die(f"non-finite teacher output at iter {iter_num}: its activations overflow "
            f"{teacher_dtype}" + ("; try --teacher_dtype=float32" * (teacher_dtype != "float32")))
    if not math.isfinite(value):
        die(f"non-finite {what} at iter {iter_num}; lower learning_rate" +
            ("" if dtype == "float32" else ", or try --dtype=float32"))


# rows: a line each on rank 0 and the same as JSON in log.jsonl, where the rows of iterations
# that run again are dropped
log = checkpoint.RunLog(log_path, log_rows, master, dict(project=wandb_project,
                        name=wandb_run_name, config=config) if wandb_log else None)

# MFU: each part of a token's FLOPs at the peak of the dtype it runs in (common.py's table):
# the student's body and head (the loss's head products) in dtype, the teacher in teacher_dtype
parts = [(f, dtype) for f in raw_model.flops_per_token(block_size)]
if teacher_model is not None:
    parts += [(f, teacher_dtype) for f in teacher_model.flops_per_token(block_size, backward=False)]
seconds_at_peak = common.time_at_peak(device, parts)  # one token's; None on CPUs and unknown GPUs

# from here on Ctrl-C (and torchrun's SIGTERM) stop after the step, with a checkpoint; a second
# Ctrl-C aborts with one line: how to go on from the last checkpoint (if there is one yet)
stop_requested = common.stop_requests(lambda: f"continue from {ckpt_path} with --init_from=resume"
                               if os.path.exists(ckpt_path) else "rerun the same command")

# -----------------------------------------------------------------------------
# the loop

print0(f"{max_iters} iterations of {tokens_per_iter:,} tokens ({batch_size} batch * {block_size} "
       f"block * {gradient_accumulation_steps} accum * {world_size} processes); {n_train:,} train "
       f"windows, {len(val_windows)} val windows; student {dtype}, teacher {teacher or 'none'} "
       f"{teacher_dtype}, {device}")
batches = step_batches(data_pos)
# the teacher's own val CE is logged once, at a run's first eval (a resume's log has it)
teacher_val_ce = next((r["teacher_val_ce"] for r in log_rows if "teacher_val_ce" in r), None)
t_log, log_from, stop = time.time(), iter_num, False
gen_seconds = []  # (start, end) of each on-policy generation since the last train row


step_hint = (f"lower --batch_size (now {batch_size}) and raise --gradient_accumulation_steps (now "
             f"{gradient_accumulation_steps}) to keep the step's tokens, or lower --kd_chunk_size")
while True:
    # every eval_interval iterations and at the end (not again where a resume starts): val CE,
    # forward KL and top-1 agreement with the teacher, token-weighted over the fixed val windows
    # and summed over processes (normalizer=1 makes distill_loss's stats plain sums); the teacher's
    # own val CE once per run
    evaluating = (iter_num % eval_interval == 0 or iter_num >= max_iters) and iter_num != resumed_at
    if evaluating:
        common.phase("the eval", f"lower --batch_size (now {batch_size})", device)
        keys = ("ce", "kl", "top1", "n", "teacher_ce", "bad_teacher")
        sums = {k: torch.zeros((), device=device) for k in keys}
        for i in range(0, len(my_val_windows), batch_size):
            x, y, sparse = load_batch("val", my_val_windows[i:i + batch_size])
            with torch.no_grad():
                with autocast:
                    h_s = model(x)  # no dropout: train and eval modes are the same
                _, s, h_t = loss_fn(h_s, x, y, sparse, 1.0)
                if teacher_val_ce is None and (h_t is not None or sparse is not None):
                    s["teacher_ce"] = teacher_ce(h_t, y, sparse)
            for k in keys & s.keys():
                sums[k] += s[k]
        r = all_reduce(sums)
        check_finite("val_ce", r["ce"], r["bad_teacher"])
        n, has_teacher = r["n"], teacher is not None  # online or from the cache
        row = {"iter": iter_num, "val_ce": r["ce"] / n, "val_ppl": math.exp(min(r["ce"] / n, 700)),
               "val_kl": r["kl"] / n if has_teacher else None,
               "val_top1": r["top1"] / n if has_teacher else None}
        if has_teacher and teacher_val_ce is None:
            teacher_val_ce = row["teacher_val_ce"] = r["teacher_ce"] / n
            if tcache is not None:
                row["kl_estimated"] = True  # from the cache's samples: unbiased, not exact
        best_val_ce = min(best_val_ce, row["val_ce"])  # the best so far, never a worse value
        log(row)

    # the checkpoint, after each eval and on a stop request (checkpoint.save: a kill during the
    # write leaves the old one whole)
    if (evaluating or stop) and master and save:
        checkpoint.save(ckpt_path, {
            "model": raw_model.state_dict(),  # unwrapped: no _orig_mod. / module. prefixes
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "model_args": model_args, "iter_num": iter_num, "data_pos": list(data_pos),
            "best_val_ce": best_val_ce, "config": config, "tokenizer": meta.get("tokenizer"),
            "meta": meta, "world_size": world_size,
            # nothing random runs after the init (the data order comes from seed + epoch), but
            # a future dropout or sampling step would need these
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device)
                    if device_type == "cuda" else None}})
    if stop:
        print0(f"stopped at iter {iter_num}: saved {ckpt_path}; continue with the same settings "
               f"and --init_from=resume")
        if ddp:  # the others wait for rank 0's checkpoint
            train_model = None  # DDP holds the process group: let go of it first
            common.end_processes()
        sys.exit(130)
    if evaluating:
        t_log, log_from = time.time(), iter_num  # the eval's time is no training time
        gen_seconds.clear()
    if iter_num >= max_iters:
        break

    # one optimizer step: gradient_accumulation_steps micro-steps on each process
    common.phase("the training step", step_hint, device)
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # on-policy (onpolicy.py): the student first writes the end of each of its windows itself
    keeps, share = [None] * gradient_accumulation_steps, onpolicy_share + 1e-12
    if onpolicy_tokens and int((iter_num + 1) * share) > int(iter_num * share):  # share of steps
        t_gen = common.clock(device)
        with autocast:
            made = [onpolicy.continue_windows(raw_model, x, onpolicy_tokens, onpolicy_temperature,
                                              onpolicy.draws(seed, iter_num, w, onpolicy_tokens),
                                              bins.eos_id, vocab_size)
                    for (x, _, _), w in zip(batches, step_windows(data_pos))]
        batches = [(x_new, y, None) for (x_new, _), (_, y, _) in zip(made, batches)]
        keeps = [keep for _, keep in made]
        gen_seconds.append((t_gen, common.clock(device)))
    # the loss is divided by the valid tokens of the whole step, all micro-steps and processes; DDP
    # averages gradients over processes, so each passes global / world_size: the global mean
    n_tokens = sum((y != -100).sum() if keep is None else
                   y[:, :-keep.size(1)].numel() + keep.sum()
                   for (_, y, _), keep in zip(batches, keeps)).float()  # on the device: no sync
    if ddp:
        dist.all_reduce(n_tokens)
    normalizer = n_tokens / world_size
    stats = {k: torch.zeros((), device=device) for k in ("loss", "ce", "kl", "bad_teacher") +
             (("own_kl", "n", "n_own", "lp", "n_lp") if onpolicy_tokens else ())}
    for micro, ((x, y, sparse), keep) in enumerate(zip(batches, keeps)):
        if ddp:  # all-reduce the gradients on the last micro-step only
            train_model.require_backward_grad_sync = micro == gradient_accumulation_steps - 1
        with autocast:
            h_s = train_model(x)  # (B, T, D_s) after the final norm
        loss, s, h_t = loss_fn(h_s, x, y, sparse, normalizer, keep)
        scaler.scale(loss).backward()
        stats["loss"] += loss.detach()
        for k in stats.keys() & s.keys() - {"loss"}:
            stats[k] += s[k]
        if keep is not None and iter_num % log_interval == 0:  # one micro-batch's, for the row
            stats["lp"], stats["n_lp"] = onpolicy.teacher_logprob(teacher_model, h_t, x, keep)
    data_pos = fit((data_pos[0], data_pos[1] + windows_per_iter))
    batches = step_batches(data_pos)  # the next step's, read while the GPU still works on this one
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                               grad_clip if grad_clip > 0 else float("inf"))
    # one all-reduce and one host sync per step: the logged numbers, the health checks and the stop
    # request; loss, ce, kl and grad_norm are the same mean on every process once / world_size
    asked = torch.full((), float(stop_requested()), device=device)
    r = all_reduce(dict(stats, grad_norm=grad_norm, stop=asked))
    for k in ("loss", "ce", "kl", "grad_norm", "own_kl"):
        r[k] = r[k] / world_size if k in r else None
    check_finite("loss", r["loss"], r["bad_teacher"])
    scaler.step(optimizer)  # skipped by the GradScaler when float16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    if iter_num % log_interval == 0 and master:
        dt = time.time() - t_log
        tps = tokens_per_iter * (iter_num + 1 - log_from) / dt
        mem, reserved = common.peak_mem_gb(device)
        row = {"iter": iter_num, "loss": r["loss"], "ce": r["ce"],
               "kl": r["kl"] if teacher is not None else None, "lr": lr,
               "grad_norm": r["grad_norm"], "tokens_per_sec": tps,
               "mfu": tps * seconds_at_peak / world_size if seconds_at_peak else None,
               "peak_mem_gb": mem, "peak_reserved_gb": reserved}
        if onpolicy_tokens:  # per token of its kind; own_*: None on a step that was not on-policy
            n = r["n"] + r["n_own"]  # the step's tokens: the prefixes', the student's own
            row.update(ce=r["ce"] * n / r["n"], own_kl=r["own_kl"] * n / r["n_own"] if r["n_own"]
                       else None, own_teacher_logprob=r["lp"] / r["n_lp"] if r["n_lp"] else None,
                       gen_share=sum(common.seconds(a, b) for a, b in gen_seconds) / dt)
        log(row)
        t_log, log_from = time.time(), iter_num + 1
    if iter_num % log_interval == 0:
        gen_seconds.clear()
    iter_num += 1
    stop = bool(r["stop"])  # checkpointed, then stopped, at the top of the loop

# -----------------------------------------------------------------------------
# the end: the trained model as a Hugging Face directory, with the tokenizer

if master and save:
    hf_dir, tokenizer_dir = os.path.join(out_dir, "hf"), None
    if meta.get("tokenizer"):  # a local directory, or a hub id (its files are in the hub's cache)
        try:
            tokenizer_dir = hf.resolve_pretrained(meta["tokenizer"], hf.TOKENIZER_FILES)
        except FileNotFoundError as e:  # offline, say: the weights are still exported
            print(f"note: the tokenizer is not saved with the model: {e}", file=sys.stderr)
    hf.save(raw_model, hf_dir, tokenizer_dir=tokenizer_dir)
    what = "the student" if teacher is not None else "the model (no teacher: a language model)"
    print(f"exported {what} at iter {iter_num} (its last weights) to {hf_dir}; the best val_ce was "
          f"{best_val_ce:.4f}", flush=True)
if ddp:  # the others wait for rank 0's export
    train_model = None  # DDP holds the process group: let go of it first
    common.end_processes()
