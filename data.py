"""
The data's format, in one place for prepare.py, which writes it, and for everything that reads it:
documents in, token bins and meta.json out, the bins read back as training windows.

- read_files / clean: documents from .txt, .jsonl and .parquet files, one string at a time.
- prepare: documents -> train.bin, val.bin, meta.json (prepare.py's work; the tests call it too).
- read_meta: meta.json and the bins, checked before anything trains on them.
- Bins: train.bin / val.bin as windows of block_size + 1 tokens, as arrays or as x, y batches.

The bins are flat arrays of token ids: uint16 if the vocabulary fits, else uint32 (Qwen2.5 has
151,665 ids); meta.json says which, never guess it. Every file is written as *.tmp and renamed at
the end, meta.json last: a directory without meta.json is unfinished, whatever else it holds. Bad
input is a ValueError of one line, which the scripts print.
"""

import glob
import itertools
import json
import os

import numpy as np
import torch

from common import WriteError
from common import progress as progress_bar

VERSION = 1  # bump when the bins or meta.json change meaning


def bin_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


# -----------------------------------------------------------------------------
# documents in: generators of strings, so nothing is held in memory


def read_txt(path, field=None):
    # one document per blank-line separated block; a file without blank lines is one document
    block = []
    with open(path, encoding="utf-8") as f:
        for line in itertools.chain(f, [""]):  # "" ends the last block
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).rstrip("\n")
                block = []


def read_jsonl(path, field):
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or field not in row:
                found = ", ".join(row) if isinstance(row, dict) else row
                raise ValueError(f"{path}:{i}: no field '{field}' (found: {found}); choose one "
                                 f"with --text_field")
            if not isinstance(row[field], (str, type(None))):
                raise ValueError(f"{path}:{i}: field '{field}' holds "
                                 f"{type(row[field]).__name__}, not text")
            yield row[field] or ""


def read_parquet(path, field):
    import pyarrow.parquet as pq  # a dependency of datasets

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors for a damaged or foreign file
        raise ValueError(f"{path} is not a readable parquet file ({e})") from None
    if field not in pf.schema_arrow.names:
        found = ", ".join(pf.schema_arrow.names)
        raise ValueError(f"{path}: no column '{field}' (found: {found}); choose one with "
                         f"--text_field")
    for batch in pf.iter_batches(batch_size=1000, columns=[field]):
        yield from (text or "" for text in batch.column(0).to_pylist())


READERS = {".txt": read_txt, ".jsonl": read_jsonl, ".parquet": read_parquet}


def find_files(patterns):
    paths = []
    for p in patterns:
        hits = [p] if os.path.exists(p) else sorted(glob.glob(p, recursive=True))
        if not hits:
            raise ValueError(f"no files match --input={p}")
        for path in hits:
            if os.path.splitext(path)[1] not in READERS:
                raise ValueError(f"--input={path}: not a .txt, .jsonl or .parquet file")
        paths += hits
    return paths


def read_files(paths, field):
    for path in paths:
        try:
            yield from READERS[os.path.splitext(path)[1]](path, field)
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text") from None


def clean(docs, min_chars, convert=None):
    for text in docs:
        if len(text.strip()) >= min_chars:  # kept as is: its tokens decode back to it
            yield convert(text) if convert else text


# -----------------------------------------------------------------------------
# the bins and meta.json out


def prepare(docs, tok, eos_id, out_dir, val_fraction=0.1, seed=1337, max_bytes=None,
            max_docs=None, batch_size=1000, source="", options=None, progress=True,
            tokenizer=None, total_bytes=None):
    """Tokenize an iterable of documents into out_dir/{train.bin, val.bin, meta.json}; returns
    meta (a failed write: WriteError, no file renamed into place). Each document is followed by one
    EOS and goes whole to train or val by a seeded coin flip.
    tokenizer: what meta.json records (a hub id or a directory; default tok.name_or_path).
    total_bytes: the text expected, for the progress line's ETA."""
    dtype = bin_dtype(len(tok))
    backend = tok.backend_tokenizer  # Rust: encode_batch runs on all cores
    backend.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # skips unused offsets
    rng = np.random.default_rng(seed)  # one draw per document: batch_size does not change the split
    n = dict(train_tokens=0, val_tokens=0, train_docs=0, val_docs=0, text_bytes=0)
    os.makedirs(out_dir, exist_ok=True)
    final = {name: os.path.join(out_dir, name) for name in ("train.bin", "val.bin", "meta.json")}
    tmp = {name: path + ".tmp" for name, path in final.items()}
    files = {split: open(tmp[split + ".bin"], "wb") for split in ("train", "val")}

    def limited():  # whole documents until max_docs or max_bytes
        for text in itertools.islice(docs, max_docs):
            n["text_bytes"] += len(text.encode("utf-8"))
            yield text
            if max_bytes and n["text_bytes"] >= max_bytes:
                return

    def write(ids, splits):  # each document's tokens and one EOS, appended to its split's file
        for split, f in files.items():
            flat = []
            for doc, s in zip(ids, splits):
                if s == split:
                    flat += doc + [eos_id]
                    n[split + "_docs"] += 1
            f.write(np.asarray(flat, dtype=dtype).tobytes())  # not tofile: errno on failure
            n[split + "_tokens"] += len(flat)

    bar = progress_bar(total_bytes or max_bytes, "tokenizing text", unit="B", enabled=progress)
    try:
        stream, pending, done = limited(), None, 0
        while batch := list(itertools.islice(stream, batch_size)):
            # the newest batch waits: its last document may have to go to a split left empty
            if pending:
                write(*pending)
            ids = [e.ids for e in encode(batch, add_special_tokens=False)]
            coins = rng.random(len(batch)) < val_fraction
            pending = (ids, np.where(coins, "val", "train").tolist())
            bar.update(n["text_bytes"] - done)
            done = n["text_bytes"]
        bar.close()
        ids, splits = pending or ([], [])
        if n["train_docs"] + n["val_docs"] + len(ids) < 2:
            raise ValueError(f"{len(ids)} document(s) after cleaning and limits; a train/val split "
                             f"needs at least 2")
        for split in ("val", "train"):
            if n[split + "_docs"] == 0 and split not in splits:
                splits[-1] = split
        write(ids, splits)
        for f in files.values():
            f.close()
        name = tokenizer or tok.name_or_path  # a directory stored absolute: runs may be elsewhere
        name = os.path.abspath(name) if os.path.isdir(name) else name
        meta = dict(version=VERSION, tokenizer=name, vocab_size=len(tok), eos_id=eos_id,
                    dtype=np.dtype(dtype).name, **n, source=source,
                    options=dict(val_fraction=val_fraction, seed=seed, max_bytes=max_bytes,
                                 max_docs=max_docs, **(options or {})))
        with open(tmp["meta.json"], "w") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
        # the old meta.json goes first, the new one comes last: a kill in between leaves none
        if os.path.exists(final["meta.json"]):
            os.remove(final["meta.json"])
        for name in final:
            os.replace(tmp[name], final[name])
        return meta
    except BaseException as e:  # an error or Ctrl-C: drop the temp files, leave older output alone
        if bar.bar is not None:
            bar.bar.close()  # so that the error gets a line of its own
        for f in files.values():
            f.close()
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        if isinstance(e, OSError) and not isinstance(e, WriteError):  # a full disk, say
            raise WriteError(e, (e.filename or out_dir).removesuffix(".tmp")) from None
        raise


# -----------------------------------------------------------------------------
# the bins read back


def read_meta(data_dir):
    """prepare.py's output, checked before anything trains on it -> (meta.json's dict, the bins'
    numpy dtype). A ValueError (one line naming the file and the fix) if a file is missing, damaged
    or of another run."""
    meta_path = os.path.join(data_dir, "meta.json")
    bins = [os.path.join(data_dir, f"{split}.bin") for split in ("train", "val")]
    for path in [meta_path, *bins]:
        if not os.path.exists(path):
            raise ValueError(f"no {path}: run prepare.py first (or point --data_dir at its output)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        dtype = np.dtype(meta["dtype"])
        vocab_size, eos_id = int(meta["vocab_size"]), int(meta["eos_id"])
        assert dtype in (np.uint16, np.uint32) and 0 <= eos_id < vocab_size  # never guessed
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"{meta_path} is damaged or not prepare.py's ({type(e).__name__}: "
                         f"{e}); rerun prepare.py") from None
    # whole tokens, as many as meta.json says, ids the tokenizer has, not zeroed
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        size = os.path.getsize(path)
        if size % dtype.itemsize:
            raise ValueError(f"{path} is {size:,} bytes, not a whole number of {dtype.name} "
                             f"tokens: damaged; rerun prepare.py")
        n = size // dtype.itemsize
        if f"{split}_tokens" in meta and n != meta[f"{split}_tokens"]:
            raise ValueError(f"{path} holds {n:,} tokens, but meta.json says "
                             f"{meta[f'{split}_tokens']:,}: cut short, or not of the same "
                             f"prepare.py run; rerun prepare.py")
        tokens = np.memmap(path, dtype=dtype, mode="r") if size else None
        if tokens is not None and (top := int(tokens.max())) >= vocab_size:
            raise ValueError(f"{path} holds token id {top}, but meta.json's tokenizer has "
                             f"{vocab_size} ids: the bins and meta.json are not of one prepare.py "
                             f"run; rerun prepare.py")
        if tokens is not None and n > 1 and int(tokens.min()) == top:  # text is never one id
            raise ValueError(f"{path} holds nothing but token id {top}: damaged (zeroed?); rerun "
                             f"prepare.py")
    return meta, dtype


class Bins:
    """prepare.py's output in data_dir, read as windows of block_size + 1 tokens: x is a window's
    first block_size tokens, y its last block_size (x shifted by one). A ValueError (read_meta's)
    if it is missing or damaged."""

    def __init__(self, data_dir, block_size):
        self.meta, self.dtype = read_meta(data_dir)
        self.dir, self.block_size = data_dir, block_size
        self.vocab_size, self.eos_id = int(self.meta["vocab_size"]), int(self.meta["eos_id"])

    def path(self, split):
        return os.path.join(self.dir, f"{split}.bin")

    def n_windows(self, split):
        return os.path.getsize(self.path(split)) // self.dtype.itemsize // (self.block_size + 1)

    def windows(self, split, indices):
        """Window indices -> their tokens, int64 (len, block_size + 1)."""
        # re-opened on every call as in nanoGPT: pages of a long-lived memmap pile up in memory
        data = np.memmap(self.path(split), dtype=self.dtype, mode="r")
        T = self.block_size + 1
        return np.stack([data[i * T:(i + 1) * T] for i in indices]).astype(np.int64)

    def batch(self, split, indices, device):
        """Window indices -> x, y (len, block_size) int64 on the device."""
        w = torch.from_numpy(self.windows(split, indices))
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        if torch.device(device).type == "cuda":  # pinned, so the copy runs while the GPU is busy
            x, y = (t.pin_memory().to(device, non_blocking=True) for t in (x, y))
        return x.to(device), y.to(device)
