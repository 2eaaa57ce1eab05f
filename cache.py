"""
The teacher run once, not every epoch: a sampled teacher cache (Anshumann et al., "Sparse Logit
Sampling: Accelerating Knowledge Distillation in LLMs", ACL 2025).

    python distill.py config/t4.py --teacher_cache=data/wiki_zh/cache

distill.py builds the cache on first use. For every token of every window of train.bin and val.bin,
it draws cache_samples ids from the teacher's distribution at the run's temperature and keeps the
distinct ids with their counts. t_hat = count / cache_samples is unbiased, so the KD gradient
T (p_s - t_hat) equals full KD's in expectation. Top-k logits, the usual alternative, are biased:
the student learns the renormalized head of the teacher's distribution and nothing of its tail
(cache_topk > 0 builds that instead, for comparison). Then training reads the cache like train.bin,
and the teacher is not loaded at all.

A cache is a directory. For each split (train, val), windows are stored in their order in the bins:
  SPLIT.entries.bin  uint32 per kept id: id | count << 24
                     (top-k: a probability in 255ths for the count)
  SPLIT.tokens.bin   9 bytes per token (TOKEN): its number of entries; the teacher's entropy at the
                     temperature (for val_kl); its argmax (for top-1 agreement); its CE on the
                     label (teacher_val_ce)
  meta.json          what the cache was built from, written last: a directory without it
                     is unfinished
"""

import hashlib
import json
import os
import time
from dataclasses import asdict

import numpy as np
import torch

from common import WriteError, atomic_write, progress
from loss import head

VERSION = 1
# 9 bytes, unaligned
TOKEN = np.dtype([("n", "u1"), ("entropy", "<f2"), ("argmax", "<u4"), ("ce", "<f2")])
TOKEN_FILES = ("entries", "tokens")  # SPLIT.entries.bin, SPLIT.tokens.bin


def fingerprint(path):  # size and sha1 of a bin: a cache of other data is refused
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return f"{os.path.getsize(path)}:{h.hexdigest()}"


def describe(bins, teacher, temperature, samples, topk, seed):
    """What distill.py's cache of these bins (data.Bins) is built from, as meta.json records it
    (less the teacher's shape, which the build adds): state() compares it with a cache's. The bins
    count by fingerprint."""
    meta = dict(version=VERSION, teacher=teacher, tokenizer=bins.meta.get("tokenizer"),
                temperature=float(temperature), block_size=bins.block_size, cache_samples=samples,
                cache_topk=topk, seed=seed, vocab_size=bins.vocab_size)
    for split in ("train", "val"):
        meta[split] = fingerprint(bins.path(split))
    return meta


def state(cache_dir, want):
    """"complete" (meta.json matches want, and the files have the sizes it records), "absent" (no
    meta.json: build it; an interrupted build left none), or the one line saying what is wrong."""
    path = os.path.join(cache_dir, "meta.json")
    if not os.path.exists(path):
        return "absent"
    try:
        with open(path) as f:
            have = json.load(f)
    except (OSError, ValueError) as e:
        return f"{path} is damaged ({e}); delete {cache_dir} to rebuild it"
    differ = [f"{k} {have.get(k)!r} (now {v!r})" for k, v in want.items() if have.get(k) != v]
    if differ:
        return (f"the teacher cache {cache_dir} was built with other settings or data: "
                f"{', '.join(differ)}; give another --teacher_cache, or delete it to rebuild")
    # a cut or swapped file: before anything trains on it
    for name, size in have.get("sizes", {}).items():
        file = os.path.join(cache_dir, name)
        if not os.path.exists(file) or os.path.getsize(file) != size:
            got = f"{os.path.getsize(file):,} bytes" if os.path.exists(file) else "missing"
            return (f"{file} is damaged ({got}, meta.json says {size:,}); "
                    f"delete {cache_dir} to rebuild it")
    # each token's entry count against the entries there are (a zeroed file)
    for split in ("train", "val"):
        tokens = os.path.join(cache_dir, f"{split}.tokens.bin")
        entries = (np.memmap(tokens, dtype=TOKEN, mode="r")["n"].sum(dtype=np.int64)
                   if have.get("sizes") else None)
        if entries is not None and 4 * entries != have["sizes"][f"{split}.entries.bin"]:
            return (f"{tokens} is damaged: its tokens count {entries:,} entries, "
                    f"{split}.entries.bin holds {have['sizes'][f'{split}.entries.bin'] // 4:,}; "
                    f"delete {cache_dir} to rebuild it")
    return "complete"


def teacher_config(cache_dir):
    # the shape of the teacher it was built from: the student takes its vocabulary
    with open(os.path.join(cache_dir, "meta.json")) as f:
        return json.load(f)["teacher_config"]


def open_or_build(cache_dir, meta, teacher, bins, batch_size, rank=0, world_size=1, log=print):
    """The complete cache of meta in cache_dir, built first from the teacher over the windows of
    bins (data.Bins) if there is none (distill.py checked state() already). Under torchrun every
    process builds its share of the windows; rank 0 joins them and writes meta.json."""
    if state(cache_dir, meta) == "absent":
        n_windows = {split: bins.n_windows(split) for split in ("train", "val")}
        t0, tokens = time.time(), sum(n_windows.values()) * bins.block_size
        again = os.path.isdir(cache_dir) and any(".part" in f for f in os.listdir(cache_dir))
        log(f"{'an earlier build was interrupted: building again' if again else 'building'} "
            f"the teacher cache {cache_dir}: the teacher runs once over {tokens:,} tokens")
        bar = progress(tokens, "teacher cache", unit="tokens", enabled=rank == 0)
        meta = dict(meta, teacher_config=asdict(teacher.config))
        build(cache_dir, teacher, bins, meta, batch_size, rank, world_size,
              progress=lambda split, n: bar.update(n * world_size))
        bar.close()
        sync()
        if rank == 0:
            join(cache_dir, world_size, meta)
        sync()
        size = sum(os.path.getsize(os.path.join(cache_dir, f"{s}.{k}.bin")) for s in n_windows
                   for k in ("entries", "tokens"))
        log(f"built the teacher cache {cache_dir} in {time.time() - t0:.0f} s: "
            f"{size / tokens:.1f} bytes per token")
    return Cache(cache_dir, bins.block_size)


def sync():  # under torchrun: every process waits for the others
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def window_entries(h, w, y, vocab, tau, samples, topk, generator, chunk=128):
    """One window: h [T, D] the teacher's final hidden states, w its head, y [T] the labels ->
    (entries uint32, tokens TOKEN[T]). The teacher's logits are computed a chunk of tokens at a
    time, never all [T, V] at once."""
    entries, tokens = [], np.zeros(len(y), dtype=TOKEN)
    for i in range(0, len(y), chunk):
        z = head(h[i:i + chunk], w[:vocab],
                 torch.empty(len(y[i:i + chunk]), vocab, device=h.device))
        log_p1 = torch.log_softmax(z, -1)
        ce = -log_p1.gather(1, y[i:i + chunk, None]).squeeze(1)
        argmax = z.argmax(-1)
        p = torch.softmax(z.div_(tau), -1)
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
        if topk:
            vals, ids = p.topk(topk, -1)
            counts = (vals / vals.sum(-1, keepdim=True) * 255).round().long()
            keep = counts > 0  # the top id always has a count
        else:
            # distinct ids of `samples` draws, with their counts (run lengths of the sorted draws)
            ids = torch.multinomial(p, samples, replacement=True,
                                    generator=generator).sort(-1).values
            keep = torch.ones_like(ids, dtype=torch.bool)
            keep[:, 1:] = ids[:, 1:] != ids[:, :-1]
            starts = torch.arange(samples, device=ids.device).expand_as(ids)[keep]
            ends = torch.cat([starts[1:], starts.new_tensor([samples])])
            ends[keep.sum(-1).cumsum(0) - 1] = samples  # each row's last run ends at `samples`
            counts = torch.zeros_like(ids)
            counts[keep] = ends - starts
        packed = (ids[keep] | counts[keep] << 24).cpu().numpy().astype(np.uint32)
        entries.append(packed)
        t = tokens[i:i + chunk]
        t["n"], t["entropy"], t["argmax"], t["ce"] = (x.cpu().numpy()
                                                      for x in (keep.sum(-1), entropy, argmax, ce))
    return np.concatenate(entries), tokens


def build(cache_dir, teacher, bins, meta, batch_size, rank=0, world_size=1, progress=None):
    """Writes SPLIT.{entries,tokens}.bin for both splits of bins (data.Bins), meta's settings. Each
    process builds a contiguous share of the windows into part files; rank 0 joins them in order
    once all are done, and writes meta.json last. Every window draws from its own generator,
    seeded by meta's seed and its index, so the cache is the same whatever the number of
    processes. A failed write (a full disk) removes this process's part files: WriteError."""
    os.makedirs(cache_dir, exist_ok=True)
    w, seed = teacher.lm_head.weight, meta["seed"]
    for s, split in enumerate(("train", "val")):
        n = bins.n_windows(split)
        mine = range(rank * n // world_size, (rank + 1) * n // world_size)
        names = {kind: os.path.join(cache_dir, f"{split}.{kind}.bin") for kind in TOKEN_FILES}
        part = {kind: open(f"{name}.part{rank}", "wb") for kind, name in names.items()}
        gen = torch.Generator(device=w.device)
        try:
            for i in range(mine.start, mine.stop, batch_size):
                windows = list(range(i, min(i + batch_size, mine.stop)))
                x, y = bins.batch(split, windows, w.device)
                h = teacher(x)
                for b, window in enumerate(windows):
                    gen.manual_seed(seed * 1_000_003 + s * 100_000_007 + window)
                    entries, tokens = window_entries(h[b], w, y[b], meta["vocab_size"],
                                                     meta["temperature"], meta["cache_samples"],
                                                     meta["cache_topk"], gen)
                    # through Python's file object: a failed write is an OSError with its errno
                    part["entries"].write(entries.tobytes())
                    part["tokens"].write(tokens.tobytes())
                if progress:
                    progress(split, len(windows) * x.shape[1])
            for f in part.values():
                f.close()
        except OSError as e:
            for kind, f in part.items():
                f.close()
                os.remove(f"{names[kind]}.part{rank}")
            failed = (e.filename or "").rsplit(".part", 1)[0] or cache_dir
            raise WriteError(e, failed) from None


def join(cache_dir, world_size, meta):
    """Rank 0, after every process built its part: the parts in order into SPLIT.*.bin,
    then meta.json (a failed write: WriteError, the parts kept for the rerun's build)."""

    def concatenate(final):
        def write(out):
            for r in range(world_size):
                with open(f"{final}.part{r}", "rb") as f:
                    while block := f.read(1 << 24):
                        out.write(block)
        return write

    for split in ("train", "val"):
        for kind in TOKEN_FILES:
            final = os.path.join(cache_dir, f"{split}.{kind}.bin")
            atomic_write(final, concatenate(final))
            for r in range(world_size):
                os.remove(f"{final}.part{r}")
    sizes = {f"{s}.{k}.bin": os.path.getsize(os.path.join(cache_dir, f"{s}.{k}.bin"))
             for s in ("train", "val") for k in TOKEN_FILES}
    atomic_write(os.path.join(cache_dir, "meta.json"),
                 lambda f: json.dump(dict(meta, sizes=sizes), f, indent=2), mode="w")


class Cache:
    """Reads a complete cache: the teacher of a batch of windows, as distill_loss's
    sparse argument."""

    def __init__(self, cache_dir, block_size):
        self.dir, self.T, self.offsets = cache_dir, block_size, {}
        for split in ("train", "val"):
            n = np.fromfile(os.path.join(cache_dir, f"{split}.tokens.bin"), dtype=TOKEN)["n"]
            per_window = n.reshape(-1, block_size).sum(1, dtype=np.int64)
            self.offsets[split] = np.concatenate([[0], per_window.cumsum()])

    def batch(self, split, windows, device):
        """-> dict of ids [B, T, K], t_hat [B, T, K] (zero-padded to the batch's most entries),
        entropy [B, T], argmax [B, T], ce [B, T]; K is at most cache_samples."""
        tokens = np.memmap(os.path.join(self.dir, f"{split}.tokens.bin"), dtype=TOKEN, mode="r")
        entries = np.memmap(os.path.join(self.dir, f"{split}.entries.bin"), dtype=np.uint32,
                            mode="r")
        off, T = self.offsets[split], self.T
        rows = np.stack([tokens[w * T:(w + 1) * T] for w in windows])  # [B, T] TOKEN
        flat = np.concatenate([entries[off[w]:off[w + 1]] for w in windows]).astype(np.int64)
        n = rows["n"].reshape(-1).astype(np.int64)
        token = np.repeat(np.arange(len(n)), n)                        # each entry's token
        slot = np.arange(len(flat)) - np.repeat(np.cumsum(n) - n, n)   # its place in the token
        ids = np.zeros((len(n), max(int(n.max()), 1)), dtype=np.int64)
        t_hat = np.zeros(ids.shape, dtype=np.float32)
        ids[token, slot], t_hat[token, slot] = flat & 0xFFFFFF, flat >> 24
        t_hat /= np.maximum(t_hat.sum(1, keepdims=True), 1)
        shape = (len(windows), T, -1)
        out = {"ids": ids.reshape(shape), "t_hat": t_hat.reshape(shape),
               "entropy": rows["entropy"].astype(np.float32),
               "argmax": rows["argmax"].astype(np.int64), "ce": rows["ce"].astype(np.float32)}
        # pinned first on a GPU: CUDA copies pageable memory synchronously, non_blocking or not
        pin = torch.device(device).type == "cuda"
        return {k: (torch.from_numpy(v).pin_memory() if pin else torch.from_numpy(v))
                .to(device, non_blocking=True) for k, v in out.items()}
