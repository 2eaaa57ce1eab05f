"""What the tests share: offline stand-ins for Qwen's tokenizer, checkpoints and data (a tiny BPE,
tiny random Qwen2 checkpoints, token bins), one way to run a script as a user does and one check
of its one-line error, and the distill.py runs that several files read, each built once a session.

    python -m pytest                  # everything (CI)
    python -m pytest -m "not slow"    # without scripts run as processes, torchrun, torch.compile
    python -m pytest -m gpu           # the GPU suite, tests/test_gpu.py
"""

import atexit
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # no test touches the network, nor does a script it runs
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")  # every script's

CORPUS = [
    "维基百科是一个自由内容、公开编辑且多语言的网络百科全书协作计划。",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "长江是亚洲最长的河流，全长约六千三百公里。",
    "Python 是一种广泛使用的高级编程语言, released in 1991.",
    "数学是研究数量、结构、变化以及空间等概念的一门学科。",
    "The quick brown fox jumps over the lazy dog 123 次。",
]


def make_tokenizer(out_dir, texts=CORPUS, vocab_size=300, eos="<|endoftext|>", bos=None):
    """A tiny BPE of Qwen2's pipeline (hf.train_bpe), eos as id 0; bos: one added and prepended
    by default."""
    from hf import train_bpe

    return train_bpe(texts, out_dir, vocab_size, eos, bos, log=None)


def tiny_config(**kw):
    from model import ModelConfig

    args = dict(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8,
                intermediate_size=48, max_seq_len=128, rope_theta=10000.0)
    return ModelConfig(**dict(args, **kw))


def random_model(cfg, seed=0):
    """model.py's Transformer of cfg, its weights random, biases and norm weights too (not the
    init's zeros and ones), in eval mode."""
    import torch

    from model import Transformer

    torch.manual_seed(seed)
    model = Transformer(cfg, verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model.eval()


def make_model_dir(out_dir, tokenizer_dir=None, vocab_size=320, seed=0, **kw):
    """A tiny random Qwen2 checkpoint exported through model.py."""
    import hf

    model = random_model(tiny_config(vocab_size=vocab_size, **kw), seed)
    hf.save(model, str(out_dir), tokenizer_dir=tokenizer_dir)
    return str(out_dir)


def make_loud_model():
    """A tiny Qwen2 model whose residual stream outgrows float16 (Qwen2's massive activations in
    miniature: 3e4 in one channel, then two blocks adding ~2e4 each), as a real teacher's does from
    1.5B up: in float16 throughout its hidden states are inf; over a float32 residual stream they
    are finite. Its head is untied: the logits stay of ordinary size."""
    import torch

    from model import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config(tie_word_embeddings=False), verbose=False).eval()
    with torch.no_grad():
        model.embed_tokens.weight[:, 0] = 3e4  # normalized: ~sqrt(32) in channel 0, ~0 elsewhere
        for b in model.layers:
            b.self_attn.o_proj.weight.zero_()
            for w in (b.mlp.gate_proj.weight, b.mlp.up_proj.weight):
                w.zero_()[:, 0] = 1.0  # every neuron: silu(5.66) * 5.66 ~ 32
            b.mlp.down_proj.weight.zero_()[0] = 13.0  # 48 neurons * 32 * 13 ~ 2e4 into channel 0
    return model


def make_loud_model_dir(out_dir, tokenizer_dir=None):
    import hf

    hf.save(make_loud_model(), str(out_dir), tokenizer_dir=tokenizer_dir)
    return str(out_dir)


def write_data(d, tokenizer_dir, dtype, n_train=30_000, n_val=3_000, counts=False):
    """train.bin / val.bin / meta.json as prepare.py writes them: the corpus' sentences, each
    + EOS, shuffled; counts: with prepare.py's token counts in meta.json (older data has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in CORPUS]
    rng = np.random.default_rng(0)
    os.makedirs(d, exist_ok=True)
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": len(tok), "eos_id": tok.eos_token_id,
            "tokenizer": tokenizer_dir}
    for split, n in (("train", n_train), ("val", n_val)):
        ids = []
        while len(ids) < n:
            ids += docs[rng.integers(len(docs))]
        np.array(ids[:n], dtype=dtype).tofile(os.path.join(d, f"{split}.bin"))
        if counts:
            meta[f"{split}_tokens"] = n
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f)
    return str(d)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir):
    return make_model_dir(tmp_path_factory.mktemp("model"), tokenizer_dir)


@pytest.fixture(scope="session")
def data(tmp_path_factory, tokenizer_dir):
    return write_data(tmp_path_factory.mktemp("data32"), tokenizer_dir, np.uint32)  # Qwen's dtype


def snapshot(d):
    """Every file under d: {relative path: bytes}."""
    return {str(p.relative_to(d)): p.read_bytes() for p in Path(d).rglob("*") if p.is_file()}


@pytest.fixture
def fresh_compile():
    """torch.compile's caches emptied: each test compiles its own graphs (dynamo stops compiling a
    function after 8 variants)."""
    import torch

    import loss

    torch._dynamo.reset()
    loss._compiled.clear()
    yield
    torch._dynamo.reset()
    loss._compiled.clear()


# -----------------------------------------------------------------------------
# the scripts, as a user runs them


def run_script(script, *args, env=None, cwd=None, timeout=300, ddp=False, fresh=False):
    """SCRIPT of the repository (distill.py, experiments/kd_vs_ce.py; or an absolute path) with
    these arguments, as a user runs it: a process of its own, in cwd (default: outside the
    repository), with ENV and env -> subprocess.CompletedProcess, stdout and stderr as text.
    ddp: under torch.distributed.run, two processes (True) or that many. A run without ddp, env or
    fresh is a child of the fork server (tests/forkserver.py): the same process but for the
    imports it starts with and the teardown it skips, ~2 s less. fresh=True, or FORKSERVER=0 in
    the environment, starts `python SCRIPT` instead: for what the interpreter's own start and end
    show (at least one run of each kind of one-line error)."""
    argv = [os.path.join(REPO, script), *map(str, args)]
    cwd = str(cwd or os.path.dirname(REPO))
    if not (ddp or env or fresh or os.environ.get("FORKSERVER") == "0"):
        return forked(argv, cwd, timeout)
    nproc = 2 if ddp is True else int(ddp)
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([sys.executable, *(launch if ddp else []), *argv], capture_output=True,
                          text=True, env=dict(ENV, **(env or {})), cwd=cwd, timeout=timeout)


def start_script(script, *args, cwd=None):
    """run_script's fresh process, started, not waited for: stdout and stderr are pipes of text
    (for a test that reads its progress and sends it signals). Ctrl-C reaches it as from a
    terminal, also where pytest runs with SIGINT ignored (a background job of a shell without job
    control), which the process would inherit."""
    return subprocess.Popen([sys.executable, os.path.join(REPO, script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=str(cwd or os.path.dirname(REPO)),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


server = None  # the fork server, started by the first run that needs it; ends with pytest


def forked(argv, cwd, timeout):
    global server
    if server is None or server.poll() is not None:
        server = subprocess.Popen([sys.executable, os.path.join(REPO, "tests/forkserver.py")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
        atexit.register(server.stdin.close)  # its end

    def reply():
        line = server.stdout.readline()
        assert line, "the fork server stopped; FORKSERVER=0 runs every script without it"
        return int(line)

    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        server.stdin.write(json.dumps([argv[0], argv[1:], cwd, out, err]) + "\n")
        server.stdin.flush()
        pid, t0 = reply(), time.monotonic()
        timer = threading.Timer(timeout, os.kill, (pid, signal.SIGKILL))
        timer.start()
        status = reply()
        timer.cancel()
        stdout, stderr = (open(path, encoding="utf-8").read() for path in (out, err))
    if status == -signal.SIGKILL and time.monotonic() - t0 >= timeout:
        raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
    return subprocess.CompletedProcess(argv, status, stdout, stderr)


def assert_one_line_error(r, script, message, status=1, what="error: "):
    """r (a CompletedProcess) ended as every script stops on bad input: exit status 1, no
    traceback, one line on stderr, `SCRIPT: error: ...` with message in it -> that line.
    status and what for an interrupt (`SCRIPT: interrupted ...`)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == status and len(lines) == 1, (r.returncode, r.stderr[-3000:])
    assert lines[0].startswith(f"{script}: {what}") and message in lines[0], lines[0]
    return lines[0]


# -----------------------------------------------------------------------------
# distill.py's runs and what they write

# a tiny student's run, as the README's CPU example
TINY = ["--n_layer=2", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--intermediate_size=64",
        "--block_size=64", "--batch_size=4", "--max_iters=40", "--lr_decay_iters=40",
        "--eval_interval=10", "--eval_iters=2", "--log_interval=1", "--device=cpu",
        "--dtype=float32", "--teacher_dtype=float32", "--compile=False", "--seed=1"]
# a learning rate that moves the student in 40 steps, more weight on the KD term (the random
# teacher's KL is small next to CE on the data)
LEARN = ["--alpha=0.9", "--learning_rate=3e-3", "--warmup_iters=5"]
TIMING = ("tokens_per_sec", "peak_mem_gb", "mfu")


def read_log(out_dir):
    """A run's log.jsonl: (train rows, eval rows)."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_ce" in r]


def untimed(rows, *more):
    """Rows without their timings (and the keys in more): what runs that compute alike share."""
    return [{k: v for k, v in row.items() if k not in TIMING + more} for row in rows]


def load_student(out_dir):
    """A run's ckpt.pt -> (its model, the checkpoint)."""
    import torch

    import hf
    from model import ModelConfig

    ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    return hf.from_state_dict(ModelConfig(**ckpt["model_args"]), ckpt["model"]), ckpt


@pytest.fixture(scope="session")
def straight(tmp_path_factory, data, model_dir):
    """The tiny run, TINY and LEARN: 40 iterations, an eval and a checkpoint every 10."""
    out = tmp_path_factory.mktemp("straight")
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={out}",
                   *TINY, *LEARN)
    assert r.returncode == 0, r.stderr
    return str(out)


CACHED = [*TINY, "--max_iters=20", "--lr_decay_iters=20", "--learning_rate=3e-3",
          "--warmup_iters=2"]


@pytest.fixture(scope="session")
def cached(tmp_path_factory, tokenizer_dir, model_dir):
    """A 20-iteration run (CACHED) from a teacher cache it builds, in a folder with its data (the
    bins of the data fixture, with prepare.py's token counts in meta.json), out and cache. It is
    sent Ctrl-C after its last eval, as the checkpoint and the export are written: they finish."""
    d = tmp_path_factory.mktemp("cached")
    write_data(d / "data", tokenizer_dir, np.uint32, counts=True)
    r = interrupt(start_script("distill.py", f"--data_dir={d / 'data'}", f"--teacher={model_dir}",
                               f"--out_dir={d / 'out'}", f"--teacher_cache={d / 'cache'}", *CACHED),
                  "eval 20:", signal.SIGINT)
    assert r.returncode == 0 and "built the teacher cache" in r.stdout and not r.stderr, r.stderr
    assert "exported the student at iter 20 (its last weights)" in r.stdout, r.stdout
    return d


def interrupt(p, when, sig, timeout=300):
    """p (start_script's) is sent sig as soon as a line of its stdout matches the regex when (from
    the line's start) -> a CompletedProcess of it, with all its stdout."""
    seen = []
    for line in p.stdout:
        seen.append(line)
        if re.match(when, line):
            p.send_signal(sig)
            break
    out, err = p.communicate(timeout=timeout)
    assert seen and re.match(when, seen[-1]), "".join(seen) + out + err[-3000:]
    return subprocess.CompletedProcess(p.args, p.returncode, "".join(seen) + out, err)
