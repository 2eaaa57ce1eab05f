"""
prepare.py against the bare tokenizer: a script that loads it, batch-encodes the same documents
(one EOS each) and writes the array. Wall time and peak RSS of each as a fresh process (start,
imports and tokenizer load included), the sides in turn, medians compared.

    python bench/prepare_vs_tokenizer.py                      # ~1 min on 2 cores; ~0.7 GB
    python bench/prepare_vs_tokenizer.py --tokenizer=DIR      # offline: a local tokenizer

The corpus: the shipped zh Wikipedia sample (1.6 MB) repeated `copies` times, ~17 MB.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import harness  # noqa: E402
from common import die  # noqa: E402
from configurator import at_least, check, configure  # noqa: E402
from hf import TOKENIZER_FILES, resolve_pretrained  # noqa: E402

# -----------------------------------------------------------------------------
data = "data/zh_wiki_sample.jsonl"  # JSON lines, each a document's "text"; relative: to the repo
tokenizer = "Qwen/Qwen2.5-0.5B"  # hub id or local tokenizer directory
copies = 11  # the corpus is data this many times over
repeats = 2  # runs of each side, in turn
config = configure(globals())
check(config, {"copies": at_least(1), "repeats": at_least(1)})
# -----------------------------------------------------------------------------

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

# wall seconds and peak RSS (KiB) of a command, in a fresh meter process: RUSAGE_CHILDREN keeps
# the largest child a process ever waited for
METER = """import resource, subprocess, sys, time
t0 = time.time()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"""


def measure(side, cmd):  # -> (wall s, peak RSS bytes)
    r = subprocess.run([sys.executable, "-c", METER, *cmd], capture_output=True, text=True,
                       env=dict(os.environ, TOKENIZERS_PARALLELISM="true"))
    if r.returncode != 0:
        die(f"{side} failed:\n{r.stderr[-2000:]}")
    wall, rss_kb = r.stdout.split()
    harness.say(f"{side}: {float(wall):.1f} s")
    return float(wall), int(rss_kb) * 1024


def main():
    try:  # a hub id is downloaded here, once, so that neither side times the download
        tok = resolve_pretrained(tokenizer, TOKENIZER_FILES)
    except FileNotFoundError as e:
        die(str(e))
    with open(os.path.join(harness.REPO, data), encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    texts = [json.loads(line)["text"] for line in lines]
    mb, chars, docs = (copies * x for x in (sum(len(t.encode()) for t in texts) / 1e6,
                                            sum(map(len, texts)), len(texts)))
    with tempfile.TemporaryDirectory() as tmp:
        corpus, out = os.path.join(tmp, "corpus.jsonl"), os.path.join(tmp, "out")
        with open(corpus, "w", encoding="utf-8") as f:
            f.writelines(lines * copies)
        sides = {"bare tokenizer": [sys.executable, "-c", BARE, corpus, tok,
                                    os.path.join(tmp, "bare.bin")],
                 "prepare.py": [sys.executable, os.path.join(harness.REPO, "prepare.py"),
                                f"--input={corpus}", f"--tokenizer={tok}", f"--out_dir={out}",
                                "--force"]}
        runs = {side: [] for side in sides}
        for _ in range(repeats):
            for side, cmd in sides.items():
                runs[side].append(measure(side, cmd))
        with open(os.path.join(out, "meta.json")) as f:
            meta = json.load(f)
        tokens = os.path.getsize(os.path.join(tmp, "bare.bin")) // 4
    assert tokens == meta["train_tokens"] + meta["val_tokens"], "the sides' tokens differ"
    assert meta["train_docs"] + meta["val_docs"] == docs, "prepare.py dropped documents"
    print(f"\n{mb:.1f} MB of text, {docs:,} documents, {tokens:,} tokens "
          f"({chars / (tokens - docs):.2f} characters per token, EOS not counted); medians of "
          f"{repeats} interleaved runs ({harness.machine()})\n")
    wall = {side: statistics.median(w for w, _ in runs[side]) for side in sides}
    rss = {side: max(r for _, r in runs[side]) for side in sides}
    harness.table(["side", "wall s", "MB/s", "peak RSS MB", "wall vs bare"],
                  [[side, f"{wall[side]:.2f}", f"{mb / wall[side]:.2f}", f"{rss[side] / 1e6:.0f}",
                    f"{wall[side] / wall['bare tokenizer']:.2f}x"] for side in sides])


if __name__ == "__main__":
    main()
