"""
Prepare the token files that distill.py trains on: text in, train.bin / val.bin / meta.json out.

    python prepare.py                           # the first ~50 MB of Chinese Wikipedia (needs network)
    python prepare.py --input=docs.jsonl --tokenizer=TOKENIZER_DIR --out_dir=data/mine [--force]

Each document is tokenized with the teacher's tokenizer (no BOS) and followed by one EOS. Whole
documents go to train or val by a seeded coin flip each, so no document is in both and none is cut.
The bins are flat arrays of token ids: uint16 if the vocabulary fits, else uint32 (Qwen2.5 has
151,665 ids); meta.json says which, never guess it. Every file is written as *.tmp and renamed at
the end, meta.json last: a directory without meta.json is unfinished, whatever else it holds.
"""
import argparse
import glob
import itertools
import json
import os
import signal
import socket
import sys
import tempfile
from urllib.parse import urlparse

import numpy as np

from configurator import at_least, between, check, die, progress as progress_bar
from hf import TOKENIZER_FILES, load_tokenizer, resolve_pretrained

VERSION = 1  # bump when the bins or meta.json change meaning
WIKI = ("wikimedia/wikipedia", "20231101.zh")  # the old script-based "wikipedia" id fails on datasets >= 4


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
                die(f"{path}:{i}: not valid JSON ({e})")
            if not isinstance(row, dict) or field not in row:
                die(f"{path}:{i}: no field '{field}' (found: {', '.join(row) if isinstance(row, dict) else row}); "
                    f"choose one with --text_field")
            if not isinstance(row[field], (str, type(None))):
                die(f"{path}:{i}: field '{field}' holds {type(row[field]).__name__}, not text")
            yield row[field] or ""

def read_parquet(path, field):
    import pyarrow.parquet as pq  # a dependency of datasets
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors for a damaged or foreign file
        die(f"{path} is not a readable parquet file ({e})")
    if field not in pf.schema_arrow.names:
        die(f"{path}: no column '{field}' (found: {', '.join(pf.schema_arrow.names)}); choose one with --text_field")
    for batch in pf.iter_batches(batch_size=1000, columns=[field]):
        yield from (text or "" for text in batch.column(0).to_pylist())

READERS = {".txt": read_txt, ".jsonl": read_jsonl, ".parquet": read_parquet}

def find_files(patterns):
    paths = []
    for p in patterns:
        hits = [p] if os.path.exists(p) else sorted(glob.glob(p, recursive=True))
        if not hits:
            die(f"no files match --input={p}")
        for path in hits:
            if os.path.splitext(path)[1] not in READERS:
                die(f"--input={path}: not a .txt, .jsonl or .parquet file")
        paths += hits
    return paths

def read_files(paths, field):
    for path in paths:
        try:
            yield from READERS[os.path.splitext(path)[1]](path, field)
        except UnicodeDecodeError:
            die(f"{path} is not UTF-8 text")

def hub_reachable():
    # load_dataset and from_pretrained retry for 25-50 s when the hub cannot be reached; a plain
    # connection fails at once. Behind a proxy we cannot tell, so we assume it works.
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
        return True
    except OSError:
        return False

def read_wikipedia():
    from datasets import load_dataset
    try:
        for row in load_dataset(*WIKI, split="train", streaming=True):
            yield row["text"]
    except Exception as e:  # a lost connection comes as many exception types; say it in one line
        die(f"streaming {' '.join(WIKI)} failed ({(str(e).splitlines() or [type(e).__name__])[0]}); "
            f"use --input=FILE for local text")

def clean(docs, min_chars, convert=None):
    for text in docs:
        if len(text.strip()) >= min_chars:  # the text itself is kept as is: its tokens decode back to it
            yield convert(text) if convert else text

def load_t2s():
    try:
        import opencc
    except ImportError:
        die("--t2s needs OpenCC: pip install opencc")
    return opencc.OpenCC("t2s").convert

# Qwen2's normalization and pre-tokenization, as its tokenizer.json states them. A small BPE trained with them
# encodes alike when transformers loads it as itself and when, beside a qwen2 config.json (an exported model),
# it loads it as Qwen2Tokenizer, which always rebuilds this pipeline around the vocabulary.
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def train_bpe(texts, out_dir, vocab_size, eos="<|endoftext|>", bos=None):
    """A byte-level BPE of vocab_size ids trained on texts, Qwen2's pipeline, eos as id 0, saved as a transformers
    tokenizer directory: a CPU-sized stand-in for Qwen's (the experiments and the tests train theirs). bos: a BOS
    added after training (the next id) and prepended by default, as DeepSeek-R1-Distill-Qwen's tokenizer does."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.add_special_tokens([bos])
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos, pad_token=eos).save_pretrained(str(out_dir))
    return str(out_dir)


# -----------------------------------------------------------------------------
# tokens out

def prepare(docs, tok, eos_id, out_dir, val_fraction=0.1, seed=1337, max_bytes=None, max_docs=None,
            batch_size=1000, source="", options=None, progress=True, tokenizer=None, total_bytes=None):
    """Tokenize an iterable of documents into out_dir/{train.bin, val.bin, meta.json}; returns meta.
    tokenizer: what meta.json records (a hub id or a directory; default tok.name_or_path). total_bytes: the text
    expected, for the progress line's ETA."""
    dtype = np.uint16 if len(tok) <= 2**16 else np.uint32
    backend = tok.backend_tokenizer  # Rust: encode_batch runs on all cores
    backend.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text (sticks to tok)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast skips unused offsets
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
            np.asarray(flat, dtype=dtype).tofile(f)
            n[split + "_tokens"] += len(flat)

    bar = progress_bar(total_bytes or max_bytes, "tokenizing text", unit="B", enabled=progress)
    try:
        stream, pending, done = limited(), None, 0
        while batch := list(itertools.islice(stream, batch_size)):
            # the newest batch waits: its last document may have to go to a split left empty
            if pending:
                write(*pending)
            ids = [e.ids for e in encode(batch, add_special_tokens=False)]
            pending = (ids, np.where(rng.random(len(batch)) < val_fraction, "val", "train").tolist())
            bar.update(n["text_bytes"] - done)
            done = n["text_bytes"]
        bar.close()
        ids, splits = pending or ([], [])
        if n["train_docs"] + n["val_docs"] + len(ids) < 2:
            die(f"{len(ids)} document(s) after cleaning and limits; a train/val split needs at least 2")
        for split in ("val", "train"):
            if n[split + "_docs"] == 0 and split not in splits:
                splits[-1] = split
        write(ids, splits)
        for f in files.values():
            f.close()
        name = tokenizer or tok.name_or_path  # a local directory is stored absolute: distill.py may run elsewhere
        name = os.path.abspath(name) if os.path.isdir(name) else name
        meta = dict(version=VERSION, tokenizer=name, vocab_size=len(tok), eos_id=eos_id,
                    dtype=np.dtype(dtype).name, **n, source=source, options=dict(val_fraction=val_fraction,
                    seed=seed, max_bytes=max_bytes, max_docs=max_docs, **(options or {})))
        with open(tmp["meta.json"], "w") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
        # the old meta.json goes first, the new one comes last: a kill in between leaves none
        if os.path.exists(final["meta.json"]):
            os.remove(final["meta.json"])
        for name in final:
            os.replace(tmp[name], final[name])
        return meta
    except BaseException:  # an error or Ctrl-C: drop the temp files, leave any older output alone
        if bar.bar is not None:
            bar.bar.close()  # so that the error gets a line of its own
        for f in files.values():
            f.close()
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        raise


def read_meta(data_dir):
    """prepare.py's output, checked before anything trains on it -> (meta.json's dict, the bins' numpy dtype).
    A ValueError (one line naming the file and the fix) if a file is missing, damaged or of another run."""
    meta_path = os.path.join(data_dir, "meta.json")
    for path in (meta_path, os.path.join(data_dir, "train.bin"), os.path.join(data_dir, "val.bin")):
        if not os.path.exists(path):
            raise ValueError(f"no {path}: run prepare.py first (or point --data_dir at its output)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        dtype, vocab_size, eos_id = np.dtype(meta["dtype"]), int(meta["vocab_size"]), int(meta["eos_id"])
        assert dtype in (np.uint16, np.uint32) and 0 <= eos_id < vocab_size  # never guessed
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"{meta_path} is damaged or not prepare.py's ({type(e).__name__}: {e}); rerun "
                         f"prepare.py") from None
    for split in ("train", "val"):  # whole tokens, as many as meta.json says, ids the tokenizer has, not zeroed
        path = os.path.join(data_dir, f"{split}.bin")
        size = os.path.getsize(path)
        if size % dtype.itemsize:
            raise ValueError(f"{path} is {size:,} bytes, not a whole number of {dtype.name} tokens: damaged; "
                             f"rerun prepare.py")
        n = size // dtype.itemsize
        if f"{split}_tokens" in meta and n != meta[f"{split}_tokens"]:
            raise ValueError(f"{path} holds {n:,} tokens, but meta.json says {meta[f'{split}_tokens']:,}: cut "
                             f"short, or not of the same prepare.py run; rerun prepare.py")
        tokens = np.memmap(path, dtype=dtype, mode="r") if size else None
        if tokens is not None and (top := int(tokens.max())) >= vocab_size:
            raise ValueError(f"{path} holds token id {top}, but meta.json's tokenizer has {vocab_size} ids: the "
                             f"bins and meta.json are not of one prepare.py run; rerun prepare.py")
        if tokens is not None and n > 1 and int(tokens.min()) == top:  # text is never one id repeated
            raise ValueError(f"{path} holds nothing but token id {top}: damaged (zeroed?); rerun prepare.py")
    return meta, dtype

# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenize text into train.bin / val.bin / meta.json for distill.py.",
        epilog="A .txt file holds one document per blank-line separated block (a file without blank lines is "
               "one document); a .jsonl file one per line, in --text_field; a .parquet file one per row, in "
               "column --text_field. If out_dir already has a meta.json, prepare.py says so and exits 0 "
               "without touching it; --force rebuilds. Bad input: one error line, exit 1.")
    p.add_argument("--input", nargs="+", action="extend", metavar="FILE", help="local .txt/.jsonl/.parquet "
                   f"files or globs, repeated or listed (default: stream {' '.join(WIKI)})")
    p.add_argument("--text_field", default="text", help="jsonl field or parquet column holding the text")
    p.add_argument("--tokenizer", default="Qwen/Qwen2.5-0.5B", help="hub name or local tokenizer directory")
    p.add_argument("--out_dir", default="data/wiki_zh")
    p.add_argument("--max_bytes", type=lambda s: int(float(s)), help="stop after this much UTF-8 text, in "
                   "whole documents (default: 50e6 for Wikipedia, all of it for --input)")
    p.add_argument("--max_docs", type=int, help="stop after this many documents")
    p.add_argument("--min_chars", type=int, default=20, help="drop documents shorter than this, spaces stripped")
    p.add_argument("--t2s", action="store_true", help="Traditional to Simplified Chinese (pip install opencc)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of documents that go to val.bin")
    p.add_argument("--seed", type=int, default=1337, help="seed of the per-document train/val coin")
    p.add_argument("--batch_size", type=int, default=1000, help="documents per tokenizer call")
    p.add_argument("--force", action="store_true", help="rebuild an out_dir that already has a meta.json")
    args = p.parse_args(argv)
    check(vars(args), {"val_fraction": between(0, 1, "[)"), "max_bytes": at_least(1, or_none=True),
                       "max_docs": at_least(2, or_none=True), "min_chars": at_least(0), "seed": at_least(0),
                       "batch_size": at_least(1)})
    if os.path.exists(os.path.join(args.out_dir, "meta.json")) and not args.force:
        print(f"prepare.py: {args.out_dir} already has a meta.json; leaving it as it is (--force rebuilds it)")
        return
    made = []  # the folders this run creates: a run that fails leaves none of them behind
    parent = os.path.abspath(args.out_dir)
    while not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out_dir).close()
    except OSError as e:
        remove_empty(made)
        die(f"cannot write to --out_dir={args.out_dir} ({e.strerror}); choose another")
    try:
        build(args)
    except BaseException:  # an error, Ctrl-C or SIGTERM: prepare() has removed its temp files
        remove_empty(made)
        raise


def remove_empty(folders):  # deepest first; a folder that holds anything stays
    for d in folders:
        try:
            os.rmdir(d)
        except OSError:
            return


def build(args):
    convert = load_t2s() if args.t2s else None
    paths = find_files(args.input) if args.input else None
    offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
                  for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if (not paths or not os.path.isdir(args.tokenizer)) and not offline and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # a cached tokenizer still loads, without the retries
        offline = True
    if not paths and offline:  # both ways out at once: local text, and a local tokenizer unless one is at hand
        try:
            resolve_pretrained(args.tokenizer, TOKENIZER_FILES)  # a local directory, or in the Hugging Face cache
            tok_too = ""
        except FileNotFoundError:
            tok_too = f" and --tokenizer=DIR (a directory with tokenizer.json; {args.tokenizer} is not cached)"
        die(f"offline: cannot stream {' '.join(WIKI)}; give local text with --input=FILE (.jsonl, .txt or "
            f".parquet){tok_too}")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # we never fork: use every core, whatever was inherited

    docs = clean(read_files(paths, args.text_field) if paths else read_wikipedia(), args.min_chars, convert)
    first = next(docs, None)  # one document read before the slow tokenizer load: bad input fails fast
    if first is None:
        die(f"no documents in {' '.join(paths or WIKI)} (empty, or all shorter than --min_chars={args.min_chars})")
    try:
        tok, eos_id = load_tokenizer(args.tokenizer)
    except ValueError as e:
        die(str(e))
    max_bytes = args.max_bytes or (None if paths else int(50e6))
    total = sum(os.path.getsize(p) for p in paths) if paths else max_bytes  # .jsonl/.txt: about the text's size
    total = min(total, max_bytes or total)
    print(f"prepare.py: tokenizing {'up to ' if max_bytes else ''}{total / 1e6:.1f} MB of text from "
          f"{' '.join(paths) if paths else ' '.join(WIKI)} with {args.tokenizer} into {args.out_dir}: roughly "
          f"{max(1, round(total / 3.7e6))} s on 2 CPU cores (3.7 MB/s){'' if paths else ', plus the download'}",
          flush=True)
    try:
        meta = prepare(itertools.chain([first], docs), tok, eos_id, args.out_dir, args.val_fraction, args.seed,
                       max_bytes, args.max_docs, args.batch_size, source=paths or " ".join(WIKI),
                       options=dict(t2s=args.t2s, min_chars=args.min_chars, text_field=args.text_field),
                       tokenizer=args.tokenizer, total_bytes=total)
    except OSError as e:  # a full disk, say: the temp files are gone, the old output untouched
        die(f"{e.filename or args.out_dir}: {e.strerror}; nothing was renamed into place")
    print(f"wrote {args.out_dir}: train {meta['train_tokens']:,} tokens ({meta['train_docs']:,} docs), "
          f"val {meta['val_tokens']:,} tokens ({meta['val_docs']:,} docs), {meta['dtype']}, "
          f"{meta['text_bytes'] / 1e6:.1f} MB of text")


def interrupted(signum, frame):  # SIGTERM (kill, a notebook's stop button) as Ctrl-C: clean up, one line
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("prepare.py: interrupted; the temp files are gone, nothing was renamed into place (rerun the "
                 "same command)")
