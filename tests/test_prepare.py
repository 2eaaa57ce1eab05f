"""prepare.py and data.py's prepare: offline, with tokenizers built here and a small synthetic
corpus."""

import json
import os
import random
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

import data
import hf
from conftest import (
    assert_one_line_error,
    make_model_dir,
    make_tokenizer,
    run_script,
    snapshot,
    start_script,
)

# a corpus with Chinese (both scripts), English, digits, emoji, inner newlines, leading blanks,
# and a literal "<|endoftext|>" that must stay text; every document is unique
PHRASES = ["中文维基百科是一个自由的百科全书", "歷史與資訊", "北京大学成立于1898年",
           "Mixed 文本 with English", "数字 3.14159 和 emoji 😀", "　　全角空格开头",
           "第一行\n第二行", "e=mc²，质能方程", "tab\tseparated"]
rng = random.Random(0)
DOCS = [f"{i}: " + "，".join(rng.choice(PHRASES) for _ in range(rng.randint(1, 12)))
        for i in range(80)]
DOCS[5] = "一个包含 <|endoftext|> 字面文本的文档"


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"title": "t", field: d}, ensure_ascii=False) + "\n")
    return str(path)


def load(out_dir):
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    return meta, {s: np.fromfile(os.path.join(out_dir, f"{s}.bin"), dtype=meta["dtype"])
                  for s in ("train", "val")}


def split_docs(arr, eos):
    cuts = np.flatnonzero(arr == eos)
    assert len(arr) == 0 or cuts[-1] == len(arr) - 1  # every split ends with an EOS
    return [arr[a + 1:b].tolist() for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    # a small byte-level BPE: lossless, so decoding must give back each document exactly
    from transformers import AutoTokenizer

    path = make_tokenizer(tmp_path_factory.mktemp("bpe"), DOCS, vocab_size=600)
    return path, AutoTokenizer.from_pretrained(path)


def prepare_docs(docs, bpe, out, **kw):  # data.prepare with the BPE, no progress line
    return data.prepare(docs, bpe[1], bpe[1].eos_token_id, str(out), progress=False, **kw)


@pytest.fixture(scope="module")
def good(bpe, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("good"))
    prepare_docs(DOCS, bpe, out)
    return out


# -----------------------------------------------------------------------------
# the core, called directly


def test_lossless_and_split_by_document(bpe, good):
    tok = bpe[1]
    meta, bins = load(good)
    eos = tok.eos_token_id
    docs = {s: [tok.backend_tokenizer.decode(ids, skip_special_tokens=False)
                for ids in split_docs(bins[s], eos)] for s in bins}
    # exactly the input documents, none in both splits, their order kept within each
    assert sorted(docs["train"] + docs["val"]) == sorted(DOCS)
    assert docs["train"] == [d for d in DOCS if d in docs["train"]]
    assert meta["train_docs"] == len(docs["train"]) and meta["val_docs"] == len(docs["val"])
    assert 0 < meta["val_docs"] < 0.3 * len(DOCS)
    direct = [tok(d, add_special_tokens=False, split_special_tokens=True)["input_ids"]
              for d in DOCS]
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(ids) + 1 for ids in direct)
    assert sorted(split_docs(bins["train"], eos) + split_docs(bins["val"], eos)) == sorted(direct)


def test_meta_matches_bins(bpe, good):
    meta, bins = load(good)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(bpe[1])
    assert meta["eos_id"] == bpe[1].eos_token_id
    for s in ("train", "val"):
        assert os.path.getsize(os.path.join(good, f"{s}.bin")) == meta[f"{s}_tokens"] * 2
        assert (bins[s] == meta["eos_id"]).sum() == meta[f"{s}_docs"]
    assert meta["text_bytes"] == sum(len(d.encode()) for d in DOCS)
    assert meta["version"] == data.VERSION and meta["options"]["seed"] == 1337
    assert sorted(os.listdir(good)) == ["meta.json", "train.bin", "val.bin"]  # no temp files left


def test_seeded_and_independent_of_batch_size(bpe, good, tmp_path):
    prepare_docs(iter(DOCS), bpe, tmp_path / "a", batch_size=7)
    prepare_docs(DOCS, bpe, tmp_path / "b", seed=2)
    for s in ("train", "val"):
        assert (load(good)[1][s] == load(tmp_path / "a")[1][s]).all()
    # another seed, another split
    assert load(tmp_path / "b")[1]["val"].tolist() != load(good)[1]["val"].tolist()


def test_uint32_for_a_large_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 70_002)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    fast.save_pretrained(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    docs = ["w70001 w3 w69999", "w65536 w65537", "w2", "w40000 w70000 w12345"]
    data.prepare(docs, tok, 0, str(tmp_path / "out"), val_fraction=0.5, progress=False)
    meta, bins = load(tmp_path / "out")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002
    got = sorted(split_docs(bins["train"], 0) + split_docs(bins["val"], 0))
    assert got == sorted([[int(w[1:]) for w in d.split()] for d in docs])  # ids > 65,535 intact


def test_both_splits_get_a_document(bpe, tmp_path):
    meta = prepare_docs(DOCS[:2], bpe, tmp_path / "a", val_fraction=0.0)
    assert meta["train_docs"] == 1 and meta["val_docs"] == 1
    meta = prepare_docs(DOCS[:3], bpe, tmp_path / "b", val_fraction=0.99)
    assert meta["train_docs"] == 1 and meta["val_docs"] == 2
    with pytest.raises(ValueError, match="at least 2"):
        prepare_docs(DOCS[:1], bpe, tmp_path / "c")
    assert not os.path.exists(tmp_path / "c" / "meta.json") and os.listdir(tmp_path / "c") == []


def test_limits(bpe, tmp_path):
    meta = prepare_docs(DOCS, bpe, tmp_path / "a", max_docs=10, batch_size=4)
    assert meta["train_docs"] + meta["val_docs"] == 10
    meta = prepare_docs(DOCS, bpe, tmp_path / "b", max_bytes=500, batch_size=4)
    taken = np.cumsum([len(d.encode()) for d in DOCS])
    # whole documents, up to 500 bytes
    assert meta["train_docs"] + meta["val_docs"] == np.searchsorted(taken, 500) + 1
    assert meta["text_bytes"] == taken[np.searchsorted(taken, 500)]


def test_readers(tmp_path):
    (tmp_path / "a.txt").write_text("　　第一段\n第一段第二行\n\n\n第二段  \n \nlast\n",
                                    encoding="utf-8")
    (tmp_path / "b.txt").write_text("一个文件一个文档", encoding="utf-8")
    write_jsonl(tmp_path / "c.jsonl", ["甲", "", "乙"], field="body")
    with open(tmp_path / "c.jsonl", "a") as f:
        f.write('\n{"body": null}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["丙", "丁"], "id": [1, 2]}), tmp_path / "d.parquet")
    paths = data.find_files([str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl"),
                             str(tmp_path / "d.parquet")])
    assert [os.path.basename(p) for p in paths] == ["a.txt", "b.txt", "c.jsonl", "d.parquet"]
    assert list(data.read_files(paths[:2], "text")) == ["　　第一段\n第一段第二行", "第二段  ",
                                                         "last", "一个文件一个文档"]
    assert list(data.read_files(paths[2:3], "body")) == ["甲", "", "乙", ""]
    assert list(data.read_files(paths[3:], "text")) == ["丙", "丁"]
    assert list(data.clean(["", "  ", "短", "长一点的文档"], min_chars=2)) == ["长一点的文档"]
    with pytest.raises(ValueError, match="no column 'body'"):
        list(data.read_files(paths[3:], "body"))


def test_t2s():
    opencc = pytest.importorskip("opencc")
    t2s = opencc.OpenCC("t2s").convert
    assert list(data.clean(["歷史與資訊很重要"], 1, t2s)) == ["历史与资讯很重要"]


def test_a_failed_run_leaves_the_old_output_alone(bpe, tmp_path):
    out = tmp_path / "out"
    prepare_docs(DOCS, bpe, out)
    before = snapshot(out)
    bad = write_jsonl(tmp_path / "bad.jsonl", DOCS[:30])
    with open(bad, "a") as f:
        f.write('{"body": "no text field here"}\n')
    seen = []

    def docs():  # a run that dies after it has written temp files
        for d in data.read_files([bad], "text"):
            seen.append(sorted(os.listdir(out)))
            yield d

    with pytest.raises(ValueError, match="no field 'text'"):
        prepare_docs(docs(), bpe, out, batch_size=8)
    # it wrote under .tmp names, and left the output untouched, no .tmp behind
    assert ["meta.json", "train.bin", "train.bin.tmp", "val.bin", "val.bin.tmp"] in seen
    assert snapshot(out) == before


def test_a_tokenizer_that_cannot_be_loaded(tmp_path):
    with pytest.raises(ValueError, match="cannot load tokenizer .nobody/nothing.*local directory"):
        hf.load_tokenizer("nobody/nothing")  # HF_HUB_OFFLINE=1: fails at once
    (tmp_path / "tok").mkdir()
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        hf.load_tokenizer(str(tmp_path / "tok"))  # an empty directory


# -----------------------------------------------------------------------------
# the command line, run as users do


@pytest.mark.slow
def test_the_command(bpe, tmp_path):
    """Its output, and its lines with stdout and stderr pipes, as in Colab's !python or a log file:
    the first says what it does and about how long it takes; the progress line (every 30 s, and at
    the end) how far it got. Into an out_dir with a meta.json, a message and nothing written;
    --force rebuilds."""
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    r = run_script("prepare.py", "--input=docs.jsonl", f"--tokenizer={bpe[0]}", "--out_dir=OUT",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    meta, _ = load(tmp_path / "OUT")
    kept = [d for d in DOCS if len(d.strip()) >= 20]  # --min_chars=20 by default
    assert meta["train_docs"] + meta["val_docs"] == len(kept) < len(DOCS)
    assert meta["source"] == ["docs.jsonl"]
    assert meta["options"] == dict(val_fraction=0.1, seed=1337, max_bytes=None, max_docs=None,
                                   t2s=False, min_chars=20, text_field="text")
    first = r.stdout.splitlines()[0]
    assert first.startswith("prepare.py: tokenizing") and "docs.jsonl" in first, first
    assert "roughly" in first, first
    progress = [line for line in r.stdout.splitlines() if line.startswith("tokenizing text:")]
    assert progress, r.stdout  # on stdout, with the first line: a log file (> log) gets both
    assert "done in" in progress[-1] and "left" not in progress[-1], r.stdout  # the total: a guess
    done = f"{meta['text_bytes']:,}/{meta['text_bytes']:,} B"  # the last line reaches its total
    assert progress[-1].startswith(f"tokenizing text: {done}"), progress[-1]
    before = snapshot(tmp_path / "OUT")
    write_jsonl(tmp_path / "docs.jsonl", DOCS[:40])
    r = run_script("prepare.py", "--input", "docs.jsonl,missing_too*.txt", f"--tokenizer={bpe[0]}",
                   "--out_dir=OUT", cwd=tmp_path)
    assert r.returncode == 0 and "--force" in r.stdout  # a friendly line, nothing read or written
    assert snapshot(tmp_path / "OUT") == before
    r = run_script("prepare.py", "--input=docs.jsonl", f"--tokenizer={bpe[0]}", "--out_dir=OUT",
                   "--force", "--min_chars=0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert load(tmp_path / "OUT")[0]["text_bytes"] == sum(len(d.encode()) for d in DOCS[:40])
    assert sorted(os.listdir(tmp_path / "OUT")) == ["meta.json", "train.bin", "val.bin"]


@pytest.fixture(scope="module")
def bad(bpe, tmp_path_factory):
    """Bad inputs as users give them, built once in one directory."""
    d = tmp_path_factory.mktemp("bad")
    write_jsonl(d / "docs.jsonl", DOCS)
    (d / "empty.jsonl").write_text("\n")
    (d / "short.txt").write_text("短\n\n\n", encoding="utf-8")
    (d / "nocv").mkdir()
    (d / "nocv" / "opencc.py").write_text("raise ImportError('no opencc here')\n")
    text = (d / "docs.jsonl").read_text(encoding="utf-8")
    (d / "cut.jsonl").write_text(text[:len(text) // 2], encoding="utf-8")  # cut short, mid-line
    (d / "latin1.txt").write_bytes("café crème brûlée, déjà vu".encode("latin-1"))
    (d / "cut.parquet").write_bytes(b"PAR1" + b"\0" * 100)
    (d / "a_file").write_text("")
    make_model_dir(d / "model_no_tokenizer")  # config.json and weights, no tokenizer files
    return d


BAD = {  # arguments -> the one line's words
    "no files": (["--input=nothing*.jsonl"], "no files match --input=nothing*.jsonl"),
    "no documents": (["--input=empty.jsonl,short.txt"], "no documents in empty.jsonl short.txt"),
    "text field": (["--input=docs.jsonl", "--text_field=body"], "no field 'body'"),
    "no opencc": (["--input=docs.jsonl", "--t2s"], "pip install opencc"),
    "offline": ([], "give local text with --input=FILE"),  # the default dataset, offline
    "no tokenizer dir": (["--input=docs.jsonl", "--tokenizer=./no_such_tokenizer"],
                         "no directory ./no_such_tokenizer"),
    "tokenizer not cached": (["--input=docs.jsonl", "--tokenizer=nobody/nothing"],
                             "cannot load tokenizer"),
    "model as tokenizer": (["--input=docs.jsonl", "--tokenizer=model_no_tokenizer"],
                           "cannot encode ordinary text"),
    "cut jsonl": (["--input=cut.jsonl"], "cut.jsonl:39: not valid JSON"),
    "not utf-8": (["--input=latin1.txt"], "latin1.txt is not UTF-8 text"),
    "cut parquet": (["--input=cut.parquet"], "cut.parquet is not a readable parquet file"),
    "batch_size": (["--input=docs.jsonl", "--batch_size=0"], "batch_size=0: must be >= 1"),
    "max_docs": (["--input=docs.jsonl", "--max_docs=1"], "max_docs=1: must be >= 2 or None"),
    "max_bytes": (["--input=docs.jsonl", "--max_bytes=-1"], "max_bytes=-1: must be >= 1 or None"),
    "val_fraction": (["--input=docs.jsonl", "--val_fraction=1"],
                     "val_fraction=1.0: must be in [0, 1)"),
    "not a number": (["--input=docs.jsonl", "--max_docs=ten"],
                     "max_docs='ten': must be >= 2 or None"),
    "misspelt": (["--input=docs.jsonl", "--tokeniser=x"],
                 "unknown setting 'tokeniser' in --tokeniser=x; did you mean 'tokenizer'?"),
    "out_dir a file": (["--input=docs.jsonl", "--out_dir=a_file/OUT"],
                       "cannot write to --out_dir=a_file/OUT"),
}
# into a new out_dir, which none of these makes (nor a folder above it); the others into an
# earlier output, with --force, which must stay as it was
NEW = {"no files", "no tokenizer dir", "tokenizer not cached"}
# a fresh interpreter (conftest.run_script) for one of each kind: a setting, the input, the
# tokenizer (and "no opencc", which needs another PYTHONPATH)
REAL = {"misspelt", "cut jsonl", "model as tokenizer"}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD)
def test_bad_input(case, bpe, bad, good, tmp_path):
    """exit status 1, the problem in one line, no traceback, and nothing written: an earlier output
    in out_dir untouched, a new out_dir not made."""
    args, message = BAD[case]
    out = tmp_path / "new" / "data" / "wiki_zh" if case in NEW else tmp_path / "OUT"
    if case not in NEW:
        shutil.copytree(good, out)
    before = snapshot(out)
    tok = [] if any(a.startswith("--tokenizer") for a in args) else [f"--tokenizer={bpe[0]}"]
    env = {"PYTHONPATH": str(bad / "nocv")} if case == "no opencc" else None
    r = run_script("prepare.py", *tok, f"--out_dir={out}", "--force", *args, cwd=bad, env=env,
                   fresh=case in REAL)
    assert_one_line_error(r, "prepare.py", message)
    assert r.stderr.count("offline") <= 1, r.stderr
    assert not (tmp_path / "new").exists() if case in NEW else snapshot(out) == before


@pytest.mark.slow
def test_offline_names_both_ways_out(tmp_path):
    os.makedirs(tmp_path / "data")  # a folder that was there before stays; one made for it goes
    # no arguments, and the default tokenizer is not cached
    r = run_script("prepare.py", cwd=tmp_path)
    line = assert_one_line_error(r, "prepare.py", "offline: cannot stream")
    assert "--input=FILE" in line and "--tokenizer=DIR" in line and line.count("offline") == 1
    assert os.listdir(tmp_path / "data") == []  # no data/wiki_zh


# -----------------------------------------------------------------------------
# interrupted runs


def open_pipe(p, path):
    """The write end of a fifo that process p reads, as a blocking fd. A plain open() would hang
    if p died before opening it: poll with O_NONBLOCK until it has, for at most 60 s."""
    deadline = time.time() + 60
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.05)
    os.set_blocking(fd, True)
    return fd


def start_on_a_pipe(tmp_path, tok_dir, out, docs):
    """prepare.py reading a pipe we hold open, stopped mid-write, deterministically: the temp
    files exist, more input is pending."""
    os.mkfifo(tmp_path / "pipe.jsonl")
    p = start_script("prepare.py", "--input=pipe.jsonl", f"--tokenizer={tok_dir}",
                     f"--out_dir={out}", "--force", "--batch_size=8", cwd=tmp_path)
    deadline = time.time() + 60
    f = os.fdopen(open_pipe(p, tmp_path / "pipe.jsonl"), "w")
    f.write("".join(json.dumps({"text": d}) + "\n" for d in docs))
    f.flush()
    while not (out / "val.bin.tmp").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    return p, f


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_an_interrupted_command_then_the_same_command(how, bpe, good, tmp_path):
    """Ctrl-C and SIGTERM: one line, the temp files gone; kill -9: temp files left, which nothing
    takes as output. Either way the earlier good files are intact, and the same command run again
    ends in a correct result, with no temp file left."""
    out = tmp_path / "out"
    shutil.copytree(good, out)
    before = snapshot(out)
    p, f = start_on_a_pipe(tmp_path, bpe[0], out, DOCS[:30])
    p.send_signal(getattr(signal, how))
    stdout, stderr = p.communicate(timeout=60)
    f.close()
    if how == "SIGKILL":
        assert p.returncode == -signal.SIGKILL
        assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "train.bin.tmp", "val.bin",
                                           "val.bin.tmp"]
    else:
        r = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
        assert_one_line_error(r, "prepare.py", "", status=130, what="interrupted")
        assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]  # no temp files
    assert {name: snapshot(out)[name] for name in before} == before
    os.remove(tmp_path / "pipe.jsonl")
    write_jsonl(tmp_path / "pipe.jsonl", DOCS)  # the same command, its input whole this time
    r = run_script("prepare.py", "--input=pipe.jsonl", f"--tokenizer={bpe[0]}", f"--out_dir={out}",
                   "--force", "--batch_size=8", "--min_chars=0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]
    meta, bins = load(out)
    assert meta["train_docs"] + meta["val_docs"] == len(DOCS)
    assert all((bins[s] == load(good)[1][s]).all() for s in bins)  # as a clean run's split and ids
