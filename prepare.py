"""
Prepare the token files that distill.py trains on: text in, train.bin / val.bin / meta.json out.

    python prepare.py          # the first ~50 MB of Chinese Wikipedia (needs network)
    python prepare.py --input=docs.jsonl --tokenizer=TOKENIZER_DIR --out_dir=data/mine [--force]

Each document is tokenized with the teacher's tokenizer (no BOS) and followed by one EOS. Whole
documents go to train or val by a seeded coin flip each, so no document is in both and none is cut.
A .txt file holds one document per blank-line separated block (a file without blank lines is one
document); a .jsonl file one per line, in text_field; a .parquet file one per row, in column
text_field. data.py has the format (uint16 or uint32 bins, meta.json written last). If out_dir
already has a meta.json, prepare.py says so and leaves it alone; --force rebuilds.
"""

import itertools
import os
import socket
import tempfile
from urllib.parse import urlparse

from common import WriteError, die, one_line_errors, write_failed
from configurator import at_least, between, check, configure
from data import clean, find_files, prepare, read_files
from hf import TOKENIZER_FILES, load_tokenizer, resolve_pretrained

WIKI = ("wikimedia/wikipedia", "20231101.zh")  # the old "wikipedia" id fails on datasets >= 4

# -----------------------------------------------------------------------------
input = None  # .txt/.jsonl/.parquet files or globs, comma-separated; None: stream zh Wikipedia
text_field = "text"  # the .jsonl field or .parquet column holding the text
tokenizer = "Qwen/Qwen2.5-0.5B"  # hub id or local tokenizer directory
out_dir = "data/wiki_zh"
max_bytes = None  # stop after this much UTF-8 text, in whole documents; None: 50e6 for Wikipedia,
# all of it for --input
max_docs = None  # stop after this many documents
min_chars = 20  # drop documents shorter than this, spaces stripped
t2s = False  # Traditional to Simplified Chinese (pip install opencc)
val_fraction = 0.1  # share of documents that go to val.bin
seed = 1337  # seed of the per-document train/val coin
batch_size = 1000  # documents per tokenizer call
force = False  # rebuild an out_dir that already has a meta.json
config = configure(globals())
check(config, {"val_fraction": between(0, 1, "[)"), "max_bytes": at_least(1, or_none=True),
               "max_docs": at_least(2, or_none=True), "min_chars": at_least(0), "seed": at_least(0),
               "batch_size": at_least(1)})
# -----------------------------------------------------------------------------


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
        first = (str(e).splitlines() or [type(e).__name__])[0]
        die(f"streaming {' '.join(WIKI)} failed ({first}); use --input=FILE for local text")


def load_t2s():
    try:
        import opencc
    except ImportError:
        die("--t2s needs OpenCC: pip install opencc")
    return opencc.OpenCC("t2s").convert


def remove_empty(folders):  # deepest first; a folder that holds anything stays
    for d in folders:
        try:
            os.rmdir(d)
        except OSError:
            return


def build():
    convert = load_t2s() if t2s else None
    paths = find_files(input.split(",")) if input else None
    offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
                  for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if (not paths or not os.path.isdir(tokenizer)) and not offline and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # a cached tokenizer still loads, without the retries
        offline = True
    if not paths and offline:  # both ways out at once: local text, and a local tokenizer if needed
        try:
            resolve_pretrained(tokenizer, TOKENIZER_FILES)  # a directory, or in the hub's cache
            tok_too = ""
        except FileNotFoundError:
            tok_too = (f" and --tokenizer=DIR (a directory with tokenizer.json; {tokenizer} is not "
                       f"cached)")
        die(f"offline: cannot stream {' '.join(WIKI)}; give local text with --input=FILE (.jsonl, "
            f".txt or .parquet){tok_too}")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # we never fork: every core, whatever inherited

    docs = clean(read_files(paths, text_field) if paths else read_wikipedia(), min_chars, convert)
    first = next(docs, None)  # one document before the slow tokenizer load: bad input fails fast
    if first is None:
        die(f"no documents in {' '.join(paths or WIKI)} (empty, or all shorter than "
            f"--min_chars={min_chars})")
    try:
        tok, eos_id = load_tokenizer(tokenizer)
    except ValueError as e:
        die(str(e))
    limit = int(max_bytes) if max_bytes else (None if paths else int(50e6))
    # .jsonl/.txt: about the text's size
    total = sum(os.path.getsize(p) for p in paths) if paths else limit
    total = min(total, limit or total)
    print(f"prepare.py: tokenizing {'up to ' if limit else ''}{total / 1e6:.1f} MB of text from "
          f"{' '.join(paths) if paths else ' '.join(WIKI)} with {tokenizer} into {out_dir}: "
          f"roughly {max(1, round(total / 3.7e6))} s on 2 CPU cores (3.7 MB/s)"
          f"{'' if paths else ', plus the download'}", flush=True)
    try:
        meta = prepare(itertools.chain([first], docs), tok, eos_id, out_dir, val_fraction, seed,
                       limit, max_docs, batch_size, source=paths or " ".join(WIKI),
                       options=dict(t2s=t2s, min_chars=min_chars, text_field=text_field),
                       tokenizer=tokenizer, total_bytes=total)
    except WriteError as e:  # a full disk, say: the temp files are gone, the old output untouched
        die(f"{write_failed(e)}; nothing was renamed into place: make room, then rerun the same "
            f"command")
    print(f"wrote {out_dir}: train {meta['train_tokens']:,} tokens ({meta['train_docs']:,} docs), "
          f"val {meta['val_tokens']:,} tokens ({meta['val_docs']:,} docs), {meta['dtype']}, "
          f"{meta['text_bytes'] / 1e6:.1f} MB of text")


def main():
    if os.path.exists(os.path.join(out_dir, "meta.json")) and not force:
        print(f"prepare.py: {out_dir} already has a meta.json; leaving it as it is (--force "
              f"rebuilds it)")
        return
    made = []  # the folders this run creates: a run that fails leaves none of them behind
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        remove_empty(made)
        die(f"cannot write to --out_dir={out_dir} ({e.strerror}); choose another")
    try:
        build()
    except ValueError as e:  # bad input found while reading it (data.py): one line
        remove_empty(made)
        die(str(e))
    except BaseException:  # an error, Ctrl-C or SIGTERM: prepare() has removed its temp files
        remove_empty(made)
        raise


if __name__ == "__main__":
    # Ctrl-C and SIGTERM (kill, a notebook's stop button): one line, status 130; the temp files are
    # gone by then and nothing was renamed into place
    one_line_errors()
    main()
