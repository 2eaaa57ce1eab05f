"""Tests for prepare.py: offline, with tokenizers built here and a small synthetic corpus."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import data
import hf
from conftest import REPO as ROOT, make_tokenizer

# a corpus with Chinese (both scripts), English, digits, emoji, inner newlines, leading blanks,
# and a literal "<|endoftext|>" that must stay text; every document is unique
PHRASES = ["中文维基百科是一个自由的百科全书", "歷史與資訊", "北京大学成立于1898年", "Mixed 文本 with English",
           "数字 3.14159 和 emoji 😀", "　　全角空格开头", "第一行\n第二行", "e=mc²，质能方程", "tab\tseparated"]
rng = random.Random(0)
DOCS = [f"{i}: " + "，".join(rng.choice(PHRASES) for _ in range(rng.randint(1, 12))) for i in range(80)]
DOCS[5] = "一个包含 <|endoftext|> 字面文本的文档"

def run(*args, cwd, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})

def assert_clean_error(r, message):
    assert r.returncode != 0, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]  # the error is one line, and the last one
    assert last.startswith("prepare.py: error:") and message in last, r.stderr
    assert "Traceback" not in r.stderr, r.stderr

def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"title": "t", field: d}, ensure_ascii=False) + "\n")
    return str(path)

def load(out_dir):
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    bins = {s: np.fromfile(os.path.join(out_dir, f"{s}.bin"), dtype=meta["dtype"]) for s in ("train", "val")}
    return meta, bins

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

@pytest.fixture(scope="module")
def good(bpe, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("good"))
    data.prepare(DOCS, bpe[1], bpe[1].eos_token_id, out, progress=False)
    return out

# -----------------------------------------------------------------------------
# the core, called directly

def test_lossless_and_split_by_document(bpe, good):
    tok = bpe[1]
    meta, bins = load(good)
    eos = tok.eos_token_id
    docs = {s: [tok.backend_tokenizer.decode(ids, skip_special_tokens=False) for ids in split_docs(bins[s], eos)]
            for s in bins}
    assert sorted(docs["train"] + docs["val"]) == sorted(DOCS)  # exactly the input documents, none in both
    assert docs["train"] == [d for d in DOCS if d in docs["train"]]  # order kept within a split
    assert meta["train_docs"] == len(docs["train"]) and meta["val_docs"] == len(docs["val"])
    assert 0 < meta["val_docs"] < 0.3 * len(DOCS)
    direct = [tok(d, add_special_tokens=False, split_special_tokens=True)["input_ids"] for d in DOCS]
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(ids) + 1 for ids in direct)
    assert sorted(split_docs(bins["train"], eos) + split_docs(bins["val"], eos)) == sorted(direct)

def test_meta_matches_bins(bpe, good):
    meta, bins = load(good)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(bpe[1]) and meta["eos_id"] == bpe[1].eos_token_id
    for s in ("train", "val"):
        assert os.path.getsize(os.path.join(good, f"{s}.bin")) == meta[f"{s}_tokens"] * 2
        assert (bins[s] == meta["eos_id"]).sum() == meta[f"{s}_docs"]
    assert meta["text_bytes"] == sum(len(d.encode()) for d in DOCS)
    assert meta["version"] == data.VERSION and meta["options"]["seed"] == 1337
    assert sorted(os.listdir(good)) == ["meta.json", "train.bin", "val.bin"]  # no temp files left

def test_seeded_and_independent_of_batch_size(bpe, good, tmp_path):
    data.prepare(iter(DOCS), bpe[1], bpe[1].eos_token_id, str(tmp_path / "a"), batch_size=7, progress=False)
    data.prepare(DOCS, bpe[1], bpe[1].eos_token_id, str(tmp_path / "b"), seed=2, progress=False)
    for s in ("train", "val"):
        assert (load(good)[1][s] == load(tmp_path / "a")[1][s]).all()
    assert load(tmp_path / "b")[1]["val"].tolist() != load(good)[1]["val"].tolist()  # another seed, another split

def test_uint32_for_a_large_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 70_002)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>").save_pretrained(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    docs = ["w70001 w3 w69999", "w65536 w65537", "w2", "w40000 w70000 w12345"]
    data.prepare(docs, tok, 0, str(tmp_path / "out"), val_fraction=0.5, progress=False)
    meta, bins = load(tmp_path / "out")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002
    got = sorted(split_docs(bins["train"], 0) + split_docs(bins["val"], 0))
    assert got == sorted([[int(w[1:]) for w in d.split()] for d in docs])  # ids above 65,535 intact

def test_both_splits_get_a_document(bpe, tmp_path):
    tok = bpe[1]
    meta = data.prepare(DOCS[:2], tok, tok.eos_token_id, str(tmp_path / "a"), val_fraction=0.0, progress=False)
    assert meta["train_docs"] == 1 and meta["val_docs"] == 1
    meta = data.prepare(DOCS[:3], tok, tok.eos_token_id, str(tmp_path / "b"), val_fraction=0.99, progress=False)
    assert meta["train_docs"] == 1 and meta["val_docs"] == 2
    with pytest.raises(ValueError, match="at least 2"):
        data.prepare(DOCS[:1], tok, tok.eos_token_id, str(tmp_path / "c"), progress=False)
    assert not os.path.exists(tmp_path / "c" / "meta.json") and os.listdir(tmp_path / "c") == []

def test_limits(bpe, tmp_path):
    tok = bpe[1]
    meta = data.prepare(DOCS, tok, tok.eos_token_id, str(tmp_path / "a"), max_docs=10, batch_size=4, progress=False)
    assert meta["train_docs"] + meta["val_docs"] == 10
    meta = data.prepare(DOCS, tok, tok.eos_token_id, str(tmp_path / "b"), max_bytes=500, batch_size=4,
                           progress=False)
    taken = np.cumsum([len(d.encode()) for d in DOCS])
    assert meta["train_docs"] + meta["val_docs"] == np.searchsorted(taken, 500) + 1  # whole documents, up to 500 B
    assert meta["text_bytes"] == taken[np.searchsorted(taken, 500)]

def test_readers(tmp_path):
    (tmp_path / "a.txt").write_text("　　第一段\n第一段第二行\n\n\n第二段  \n \nlast\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("一个文件一个文档", encoding="utf-8")
    write_jsonl(tmp_path / "c.jsonl", ["甲", "", "乙"], field="body")
    with open(tmp_path / "c.jsonl", "a") as f:
        f.write('\n{"body": null}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["丙", "丁"], "id": [1, 2]}), tmp_path / "d.parquet")
    paths = data.find_files([str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl"), str(tmp_path / "d.parquet")])
    assert [os.path.basename(p) for p in paths] == ["a.txt", "b.txt", "c.jsonl", "d.parquet"]
    assert list(data.read_files(paths[:2], "text")) == ["　　第一段\n第一段第二行", "第二段  ", "last",
                                                         "一个文件一个文档"]
    assert list(data.read_files(paths[2:3], "body")) == ["甲", "", "乙", ""]
    assert list(data.read_files(paths[3:], "text")) == ["丙", "丁"]
    assert list(data.clean(["", "  ", "短", "长一点的文档"], min_chars=2)) == ["长一点的文档"]
    with pytest.raises(ValueError, match="no column 'body'"):
        list(data.read_files(paths[3:], "body"))

def test_t2s():
    opencc = pytest.importorskip("opencc")
    assert list(data.clean(["歷史與資訊很重要"], 1, opencc.OpenCC("t2s").convert)) == ["历史与资讯很重要"]

def test_a_failed_run_leaves_the_old_output_alone(bpe, tmp_path):
    out = tmp_path / "out"
    data.prepare(DOCS, bpe[1], bpe[1].eos_token_id, str(out), progress=False)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    bad = write_jsonl(tmp_path / "bad.jsonl", DOCS[:30])
    with open(bad, "a") as f:
        f.write('{"body": "no text field here"}\n')
    seen = []

    def docs():  # a run that dies after it has written temp files
        for d in data.read_files([bad], "text"):
            seen.append(sorted(os.listdir(out)))
            yield d
    with pytest.raises(ValueError, match="no field 'text'"):
        data.prepare(docs(), bpe[1], bpe[1].eos_token_id, str(out), batch_size=8, progress=False)
    assert ["meta.json", "train.bin", "train.bin.tmp", "val.bin", "val.bin.tmp"] in seen  # writing under .tmp
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # untouched, no .tmp left

# -----------------------------------------------------------------------------
# the command line, run as users do

def test_the_command(bpe, tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    r = run("--input=docs.jsonl", f"--tokenizer={bpe[0]}", "--out_dir=OUT", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    meta, _ = load(tmp_path / "OUT")
    kept = [d for d in DOCS if len(d.strip()) >= 20]  # --min_chars=20 by default
    assert meta["train_docs"] + meta["val_docs"] == len(kept) < len(DOCS) and meta["source"] == ["docs.jsonl"]
    assert meta["options"] == dict(val_fraction=0.1, seed=1337, max_bytes=None, max_docs=None, t2s=False,
                                   min_chars=20, text_field="text")
    before = {p: (tmp_path / "OUT" / p).read_bytes() for p in os.listdir(tmp_path / "OUT")}
    write_jsonl(tmp_path / "docs.jsonl", DOCS[:40])
    r = run("--input", "docs.jsonl,missing_too*.txt", f"--tokenizer={bpe[0]}", "--out_dir=OUT", cwd=tmp_path)
    assert r.returncode == 0 and "--force" in r.stdout  # exists: a friendly message, nothing read or written
    assert {p: (tmp_path / "OUT" / p).read_bytes() for p in os.listdir(tmp_path / "OUT")} == before
    r = run("--input=docs.jsonl", f"--tokenizer={bpe[0]}", "--out_dir=OUT", "--force", "--min_chars=0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert load(tmp_path / "OUT")[0]["text_bytes"] == sum(len(d.encode()) for d in DOCS[:40])
    assert sorted(os.listdir(tmp_path / "OUT")) == ["meta.json", "train.bin", "val.bin"]

def open_pipe(p, path):
    """The write end of a fifo that process p reads, as a blocking fd. A plain open() would hang if p died
    before opening it: poll with O_NONBLOCK until it has, for at most 60 s."""
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


def test_a_killed_run(bpe, tmp_path):
    # the input is a pipe we hold open, so the run is stopped mid-write, deterministically
    out = tmp_path / "out"
    data.prepare(DOCS, bpe[1], bpe[1].eos_token_id, str(out), progress=False)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    os.mkfifo(tmp_path / "pipe.jsonl")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "prepare.py"), "--input=pipe.jsonl",
                          f"--tokenizer={bpe[0]}", "--out_dir=out", "--force"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    fd = open_pipe(p, tmp_path / "pipe.jsonl")
    with os.fdopen(fd, "w") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:20]))
        f.flush()
        while not (out / "val.bin.tmp").exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "train.bin.tmp", "val.bin", "val.bin.tmp"]
    assert {name: (out / name).read_bytes() for name in before} == before
    data.prepare(DOCS[:10], bpe[1], bpe[1].eos_token_id, str(out), progress=False)  # a rerun cleans up
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]
    assert load(out)[0]["train_docs"] + load(out)[0]["val_docs"] == 10

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
    (d / "cut.jsonl").write_text(text[:len(text) // 2], encoding="utf-8")  # a copy cut short, mid-line
    (d / "latin1.txt").write_bytes("café crème brûlée, déjà vu".encode("latin-1"))
    (d / "cut.parquet").write_bytes(b"PAR1" + b"\0" * 100)
    (d / "a_file").write_text("")
    from conftest import make_model_dir
    make_model_dir(d / "model_no_tokenizer")  # config.json and weights, no tokenizer files
    return d


BAD = {  # arguments -> the one line's words (FORCE: into an earlier output, which must stay as it was)
    "no files": (["--input=nothing*.jsonl"], "no files match --input=nothing*.jsonl"),
    "no documents": (["--input=empty.jsonl,short.txt"], "no documents in empty.jsonl short.txt"),
    "text field": (["--input=docs.jsonl", "--text_field=body"], "no field 'body'"),
    "no opencc": (["--input=docs.jsonl", "--t2s"], "pip install opencc"),
    "offline": ([], "give local text with --input=FILE"),  # the default dataset, offline
    "no tokenizer dir": (["--input=docs.jsonl", "--tokenizer=./no_such_tokenizer"], "no directory ./no_such_tokenizer"),
    "model as tokenizer": (["--input=docs.jsonl", "--tokenizer=model_no_tokenizer"], "cannot encode ordinary text"),
    "cut jsonl": (["--input=cut.jsonl"], "cut.jsonl:39: not valid JSON"),
    "not utf-8": (["--input=latin1.txt"], "latin1.txt is not UTF-8 text"),
    "cut parquet": (["--input=cut.parquet"], "cut.parquet is not a readable parquet file"),
    "batch_size": (["--input=docs.jsonl", "--batch_size=0"], "batch_size=0: must be >= 1"),
    "max_docs": (["--input=docs.jsonl", "--max_docs=1"], "max_docs=1: must be >= 2 or None"),
    "max_bytes": (["--input=docs.jsonl", "--max_bytes=-1"], "max_bytes=-1: must be >= 1 or None"),
    "val_fraction": (["--input=docs.jsonl", "--val_fraction=1"], "val_fraction=1.0: must be in [0, 1)"),
    "not a number": (["--input=docs.jsonl", "--max_docs=ten"], "max_docs='ten': must be >= 2 or None"),
    "misspelt": (["--input=docs.jsonl", "--tokeniser=x"], "unknown setting 'tokeniser' in --tokeniser=x; did you "
                                                          "mean 'tokenizer'?"),
    "out_dir a file": (["--input=docs.jsonl", "--out_dir=a_file/OUT"], "cannot write to --out_dir=a_file/OUT"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case, bpe, bad, good, tmp_path):
    """exit status 1, the problem in one line, no traceback, and an earlier output in out_dir untouched (the runs
    pass --force)."""
    args, message = BAD[case]
    out = tmp_path / "OUT"
    shutil.copytree(good, out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    tok = [] if any(a.startswith("--tokenizer") for a in args) else [f"--tokenizer={bpe[0]}"]
    env = {"PYTHONPATH": str(bad / "nocv")} if case == "no opencc" else None
    r = run(*tok, f"--out_dir={out}", "--force", *args, cwd=bad, env=env)
    assert_clean_error(r, message)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before

def test_a_tokenizer_that_cannot_be_loaded(tmp_path):
    with pytest.raises(ValueError, match="cannot load tokenizer .nobody/nothing.*local directory"):
        hf.load_tokenizer("nobody/nothing")  # HF_HUB_OFFLINE=1: fails at once
    (tmp_path / "tok").mkdir()
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        hf.load_tokenizer(str(tmp_path / "tok"))  # an empty directory


# -----------------------------------------------------------------------------
# interrupted, failed and long runs, as users meet them

def start_on_a_pipe(tmp_path, tok_dir, out, docs):
    """prepare.py reading a pipe we hold open, stopped mid-write: the temp files exist, more input is pending."""
    os.mkfifo(tmp_path / "pipe.jsonl")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "prepare.py"), "--input=pipe.jsonl",
                          f"--tokenizer={tok_dir}", f"--out_dir={out}", "--force", "--batch_size=8"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    fd = open_pipe(p, tmp_path / "pipe.jsonl")
    f = os.fdopen(fd, "w")
    f.write("".join(json.dumps({"text": d}) + "\n" for d in docs))
    f.flush()
    while not (out / "val.bin.tmp").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    return p, f


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_an_interrupted_command_then_the_same_command(how, bpe, good, tmp_path):
    """Ctrl-C and SIGTERM: one line, the temp files gone; kill -9: temp files left, which nothing takes as output.
    Either way the earlier good files are intact, and the same command run again ends in a correct result."""
    out = tmp_path / "out"
    shutil.copytree(good, out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    p, f = start_on_a_pipe(tmp_path, bpe[0], out, DOCS[:30])
    p.send_signal(getattr(signal, how))
    _, err = p.communicate(timeout=60)
    f.close()
    assert {name: (out / name).read_bytes() for name in before} == before
    if how == "SIGKILL":
        assert p.returncode == -signal.SIGKILL
    else:
        assert p.returncode == 130 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("prepare.py: interrupted"), err
        assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]  # no temp files left
    os.remove(tmp_path / "pipe.jsonl")
    write_jsonl(tmp_path / "pipe.jsonl", DOCS)  # the same command, its input whole this time
    r = run("--input=pipe.jsonl", f"--tokenizer={bpe[0]}", f"--out_dir={out}", "--force", "--batch_size=8",
            "--min_chars=0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]
    meta, bins = load(out)
    assert meta["train_docs"] + meta["val_docs"] == len(DOCS)
    assert all((bins[s] == load(good)[1][s]).all() for s in bins)  # the same split and ids as a clean run


FAILS = {  # a command that fails before writing anything -> its line's words
    "missing --input": (["--input=nothing*.jsonl"], "no files match"),
    "bad --tokenizer": (["--input=docs.jsonl", "--tokenizer=./no_such_tokenizer"], "no directory"),
    "tokenizer not cached": (["--input=docs.jsonl", "--tokenizer=nobody/nothing"], "cannot load tokenizer"),
}


@pytest.mark.parametrize("case", FAILS)
def test_a_failed_command_leaves_no_new_folder(case, tmp_path):
    args, message = FAILS[case]
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    r = run(*args, "--out_dir=new/data/wiki_zh", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert_clean_error(r, message)
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.count("offline") <= 1, r.stderr
    assert not (tmp_path / "new").exists()


def test_offline_names_both_ways_out(tmp_path):
    os.makedirs(tmp_path / "data")  # a folder that was there before stays; the one made for the run goes
    r = run(cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})  # no arguments, and the default tokenizer is not cached
    assert_clean_error(r, "offline: cannot stream")
    assert "--input=FILE" in r.stderr and "--tokenizer=DIR" in r.stderr and r.stderr.count("offline") == 1, r.stderr
    assert os.listdir(tmp_path / "data") == []  # no data/wiki_zh


def test_progress_when_not_a_terminal(bpe, tmp_path):
    """stdout and stderr are pipes here, as in Colab's !python or a log file: the first line says what it does and
    about how long it takes; the progress line (every 30 s, and at the end) says how far it got."""
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    r = run("--input=docs.jsonl", f"--tokenizer={bpe[0]}", "--out_dir=OUT", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("prepare.py: tokenizing") and "docs.jsonl" in first and "roughly" in first, first
    progress = [line for line in r.stdout.splitlines() if line.startswith("tokenizing text:")]
    assert progress, r.stdout  # on stdout, with the first line: a log file (> log) gets both
    last = progress[-1]  # its total was an estimate: no "s left"
    assert "done in" in last and "left" not in last, r.stdout
