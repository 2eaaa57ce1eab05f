"""distill.py end to end, as a user runs it (subprocesses, from another working directory), on CPU: a tiny corpus
tokenized with conftest's BPE, the tiny random teacher of conftest exported through model.py, tiny students.

TINY is a tiny student's run, as the README's CPU example; LEARN adds a learning rate that moves it in 40 steps
and more weight on the KD term (the random teacher's KL is small next to CE on the data)."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hf
from conftest import REPO, TINY, make_model_dir, read_log, run, write_data

LEARN = ["--alpha=0.9", "--learning_rate=3e-3", "--warmup_iters=5"]
TIMING = ("tokens_per_sec", "peak_mem_gb", "mfu")


@pytest.fixture(scope="session")
def straight(tmp_path_factory, data, model_dir):
    out = tmp_path_factory.mktemp("straight")
    r = run(f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={out}", *TINY, *LEARN)
    assert r.returncode == 0, r.stderr
    return str(out)


def load_student(out_dir):
    from model import ModelConfig, Transformer

    ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    return hf.from_state_dict(ModelConfig(**ckpt["model_args"]), ckpt["model"]), ckpt


def val_batch(data, block_size=64, n=8):
    """The fixed val windows distill.py evaluates on: n evenly spread windows of block_size + 1 tokens."""
    with open(os.path.join(data, "meta.json")) as f:
        val = np.fromfile(os.path.join(data, "val.bin"), dtype=json.load(f)["dtype"]).astype(np.int64)
    count = len(val) // (block_size + 1)
    idx = np.arange(min(n, count)) * count // min(n, count)
    w = torch.from_numpy(np.stack([val[i * (block_size + 1):(i + 1) * (block_size + 1)] for i in idx]))
    return w[:, :-1], w[:, 1:]


# -----------------------------------------------------------------------------


def test_writes_checkpoint_log_and_hf(straight):
    ckpt = torch.load(os.path.join(straight, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scaler", "model_args", "iter_num", "data_pos", "best_val_ce", "config",
            "tokenizer", "rng"} <= set(ckpt)
    assert ckpt["iter_num"] == 40 and ckpt["scaler"] is None and ckpt["model_args"]["vocab_size"] == 320
    train, evals = read_log(straight)
    assert [r["iter"] for r in train] == list(range(40))
    assert [r["iter"] for r in evals] == [0, 10, 20, 30, 40]
    for r in train:
        assert set(r) == {"iter", "loss", "ce", "kl", "lr", "grad_norm", "tokens_per_sec", "mfu", "peak_mem_gb",
                          "peak_reserved_gb"}
        assert r["mfu"] is None and r["tokens_per_sec"] > 0 and r["peak_mem_gb"] > 0  # no MFU on a CPU
        assert r["peak_reserved_gb"] is None  # CUDA's cache only
    assert train[0]["lr"] == pytest.approx(3e-3 / 6)  # (it + 1) / (warmup + 1): step 0 moves
    assert [("teacher_val_ce" in r) for r in evals] == [True] + [False] * 4  # once
    assert ckpt["best_val_ce"] == min(r["val_ce"] for r in evals)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(os.path.join(straight, "hf")))


def test_student_learns_from_the_teacher(straight):
    train, evals = read_log(straight)
    kl = [r["val_kl"] for r in evals]
    assert all(b <= a for a, b in zip(kl, kl[1:])) and kl[-1] < 0.8 * kl[0], kl
    assert evals[-1]["val_top1"] > evals[0]["val_top1"]
    assert sum(r["loss"] for r in train[-5:]) < sum(r["loss"] for r in train[:5])


def test_eval_matches_a_plain_computation(straight, data, model_dir):
    """Reads the bins with meta.json's dtype (uint32 here), the same windows, the same numbers as plain full-logits
    losses: the teacher's CE at the first eval, the student's CE, KL at T=2 and top-1 at the last."""
    from model import Transformer

    x, y = val_batch(data)
    teacher = hf.load(model_dir, verbose=False)
    student, _ = load_student(straight)
    with torch.no_grad():
        zt, zs = (m.lm_head(m(x))[..., :300] for m in (teacher, student))  # the tokenizer's 300 ids; then padding
    kl = (F.softmax(zt / 2, -1) * (F.log_softmax(zt / 2, -1) - F.log_softmax(zs / 2, -1))).sum(-1).mean()
    _, evals = read_log(straight)
    assert evals[0]["teacher_val_ce"] == pytest.approx(F.cross_entropy(zt.flatten(0, 1), y.flatten()).item(), rel=1e-5)
    assert evals[-1]["val_ce"] == pytest.approx(F.cross_entropy(zs.flatten(0, 1), y.flatten()).item(), rel=1e-5)
    assert evals[-1]["val_kl"] == pytest.approx(kl.item(), rel=1e-4)
    assert evals[-1]["val_top1"] == pytest.approx((zs.argmax(-1) == zt.argmax(-1)).float().mean().item())


def test_resume_is_exact(straight, data, model_dir, tmp_path):
    """20 iterations, then a resume to 40, give the same losses, evals and weights as 40 straight, to the bit."""
    args = [f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={tmp_path}", *TINY, *LEARN]
    r = run(*args, "--max_iters=20")  # lr_decay_iters=40 keeps the schedule of the 40-iteration run
    assert r.returncode == 0, r.stderr
    r = run(*args, "--init_from=resume")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout and "max_iters 20 -> 40" in r.stdout
    strip = lambda rows: [{k: v for k, v in row.items() if k not in TIMING + ("teacher_val_ce",)} for row in rows]
    assert strip(read_log(tmp_path)[0]) == strip(read_log(straight)[0])  # iterations 0-39, one row each
    assert strip(read_log(tmp_path)[1]) == strip(read_log(straight)[1])
    a, b = load_student(tmp_path)[0].state_dict(), load_student(straight)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hf_export_loads_in_transformers_and_sample_py(straight):
    from transformers import AutoModelForCausalLM

    student, _ = load_student(straight)
    ref = AutoModelForCausalLM.from_pretrained(os.path.join(straight, "hf")).eval()
    x = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert (ref(x).logits - student.lm_head(student(x))).abs().max() < 1e-4
    r = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), f"--init_from={straight}", "--temperature=0",
                        "--max_new_tokens=5", "--num_samples=1", "--device=cpu"], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("维基百科是")


def test_two_processes(straight, data, model_dir, tmp_path):
    """The tiny run under torch.distributed.run (gloo): eval all-reduced over both processes equals one process's
    eval at iter 0 (same seed, same weights)."""
    r = run(f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={tmp_path}", *TINY, ddp=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "512 tokens" in r.stdout and "2 processes" in r.stdout  # 4 batch * 64 block * 2
    train, evals = read_log(tmp_path)
    assert [row["iter"] for row in train] == list(range(40)) and [row["iter"] for row in evals] == [0, 10, 20, 30, 40]
    one = read_log(straight)[1][0]
    for k in ("val_ce", "val_kl", "val_top1", "teacher_val_ce"):
        assert evals[0][k] == pytest.approx(one[k], abs=1e-5)
    assert os.path.exists(os.path.join(tmp_path, "hf", "model.safetensors"))


@pytest.mark.parametrize("eval_interval", [100000, 1])
def test_ctrl_c_saves_and_resumes(eval_interval, data, model_dir, tmp_path):
    """Ctrl-C: the step finishes, then a checkpoint and exit 130; the resume ends with a straight run's rows.
    eval_interval=1: every stop lands on an eval iteration, evaluated before the checkpoint (a resume does not
    evaluate again where it starts, so that eval row was lost before)."""
    args = [f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={tmp_path}", *TINY,
            "--max_iters=100000", f"--eval_interval={eval_interval}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "distill.py"), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    for line in p.stdout:
        if line.startswith("iter 0:"):
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "--init_from=resume" in out and "Traceback" not in err
    k = torch.load(os.path.join(tmp_path, "ckpt.pt"), map_location="cpu", weights_only=True)["iter_num"]
    assert k >= 1 and not os.path.exists(os.path.join(tmp_path, "hf"))
    assert [row["iter"] for row in read_log(tmp_path)[1]] == list(range(0, k + 1, eval_interval))
    r = run(*args, "--init_from=resume", f"--max_iters={k + 2}")
    assert r.returncode == 0, r.stderr
    train, evals = read_log(tmp_path)
    assert [row["iter"] for row in train] == list(range(k + 2))
    assert [row["iter"] for row in evals] == sorted(set(range(0, k + 3, eval_interval)) | {k + 2})
    assert os.path.exists(os.path.join(tmp_path, "hf", "model.safetensors"))


def test_a_failed_compile_trains_on_eager(data, model_dir, tmp_path):
    """--compile=True where torch.compile cannot work (here: no C++ compiler for inductor; on a GPU: no Triton for
    it): one warning each for the student, the teacher and the loss's chunk, then the same run as eager."""
    args = [f"--data_dir={data}", f"--teacher={model_dir}", *TINY, *LEARN, "--max_iters=4", "--eval_interval=2"]
    r = run(*args, f"--out_dir={tmp_path / 'compiled'}", "--compile=True",
            env=dict(CXX="/nonexistent", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor")))
    assert r.returncode == 0, r.stderr
    for what in ("the student", "the teacher", "distill_loss"):
        assert r.stderr.count(f"Warning: {what}: torch.compile failed") == 1, r.stderr
    eager = run(*args, f"--out_dir={tmp_path / 'eager'}")
    assert eager.returncode == 0, eager.stderr
    strip = lambda rows: [{k: v for k, v in row.items() if k not in TIMING} for row in rows]  # noqa: E731
    assert [strip(rows) for rows in read_log(tmp_path / "compiled")] == \
        [strip(rows) for rows in read_log(tmp_path / "eager")]


def test_without_a_teacher(tmp_path, tokenizer_dir):
    """teacher=None: a plain language model (CE only) on uint16 bins; max_iters from epochs; vocabulary rounded up."""
    data = write_data(tmp_path / "data16", tokenizer_dir, np.uint16)
    out = tmp_path / "out"
    r = run(f"--data_dir={data}", "--teacher=None", f"--out_dir={out}", *TINY, "--max_iters=0", "--epochs=1",
            "--batch_size=16", "--learning_rate=1e-2", "--warmup_iters=2", "--eval_interval=100")
    assert r.returncode == 0, r.stderr
    train, evals = read_log(out)
    n_windows = 30_000 // 65  # 461 windows of 65 tokens: 28 steps of 16 make an epoch
    assert len(train) == n_windows // 16 == 28
    assert all(row["kl"] is None for row in train) and evals[-1]["val_kl"] is None
    assert evals[-1]["val_ce"] < evals[0]["val_ce"] - 1.0
    student, ckpt = load_student(out)
    assert ckpt["model_args"]["vocab_size"] == 320 and ckpt["data_pos"] == [1, 0]  # 300 ids -> 320 rows; epoch 2
    assert os.path.exists(os.path.join(out, "hf", "tokenizer.json"))


def test_float16_with_gradscaler_and_accumulation(data, model_dir, tmp_path):
    """dtype=float16: float32 weights, autocast and a GradScaler whose state is checkpointed and resumed."""
    args = [f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={tmp_path}", *TINY, "--dtype=float16",
            "--gradient_accumulation_steps=2", "--lr_decay_iters=6", "--eval_interval=3", *LEARN]
    r = run(*args, "--max_iters=3")
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(os.path.join(tmp_path, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0 and ckpt["model"]["norm.weight"].dtype == torch.float32
    r = run(*args, "--max_iters=6", "--init_from=resume")
    assert r.returncode == 0, r.stderr
    train, evals = read_log(tmp_path)
    assert [row["iter"] for row in train] == list(range(6))
    assert evals[-1]["iter"] == 6 and evals[-1]["val_ce"] < evals[0]["val_ce"]


@pytest.fixture(scope="session")
def odd(tmp_path_factory, tokenizer_dir, data, straight):
    """Bad inputs as users make them, built once: teachers, data directories and run directories gone wrong."""
    from model import Transformer

    d = tmp_path_factory.mktemp("odd")
    small = make_model_dir(d / "small_vocab", tokenizer_dir, vocab_size=256)
    poisoned = make_model_dir(d / "poisoned", tokenizer_dir)
    model = hf.load(poisoned, verbose=False)
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")  # -> NaN hidden states
    hf.save(model, poisoned)
    cut_teacher = make_model_dir(d / "cut_teacher", tokenizer_dir)  # a download cut short
    truncate(os.path.join(cut_teacher, "model.safetensors"))

    def data_copy(name, edit):
        shutil.copytree(data, d / name)
        edit(d / name)
        return str(d / name)

    def meta_edit(**kw):
        return lambda p: (p / "meta.json").write_text(json.dumps(dict(json.loads((p / "meta.json").read_text()), **kw)))

    cut_run, foreign_run = d / "cut_run", d / "foreign_run"
    shutil.copytree(straight, cut_run)
    truncate(cut_run / "ckpt.pt")
    shutil.copytree(straight, foreign_run)
    torch.save({"weights": torch.zeros(2)}, foreign_run / "ckpt.pt")
    (d / "a_file").write_text("")
    return dict(small_vocab=small, poisoned=poisoned, cut_teacher=cut_teacher, cut_run=cut_run,
                foreign_run=foreign_run, unwritable=d / "a_file" / "out",
                cut_meta=data_copy("cut_meta", lambda p: truncate(p / "meta.json")),
                float_meta=data_copy("float_meta", meta_edit(dtype="float32")),
                small_meta=data_copy("small_meta", meta_edit(vocab_size=100, eos_id=0)),
                cut_bin=data_copy("cut_bin", lambda p: open(p / "train.bin", "ab").write(b"\0")))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


# extra settings -> the one line that must say what is wrong. Each runs on a copy of an earlier run (the straight
# one) with --init_from=resume unless it says otherwise, and that run's files must come out untouched; FRESH cases
# run in an empty out_dir (runtime failures, and refusals that need no earlier run).
ERRORS = {
    "misspelt key": (["--batchsize=4"], "did you mean 'batch_size'?"),
    "alpha": (["--alpha=1.5"], "alpha=1.5: must be in [0, 1]"),
    "temperature": (["--temperature=0"], "temperature=0.0: must be in (0, inf)"),
    "kd_beta": (["--kd_kind=jsd", "--kd_beta=1"], "kd_beta=1.0: must be in (0, 1)"),
    "kd_kind": (["--kd_kind=kl"], "kd_kind='kl': must be one of forward_kl, reverse_kl, jsd"),
    "learning_rate": (["--learning_rate=-3e-4"], "learning_rate=-0.0003: must be >= 0"),
    "min_lr": (["--min_lr=0.1"], "min_lr=0.1 exceeds learning_rate=0.0003"),
    "n_kv_head": (["--n_kv_head=0"], "n_kv_head=0: must be >= 1"),
    "None": (["--batch_size=None"], "batch_size=None: must be >= 1"),
    "kd_chunk_size": (["--kd_chunk_size=0"], "kd_chunk_size=0: must be >= 1"),
    "seed": (["--seed=-1"], "seed=-1: must be >= 0"),
    "dtype": (["--dtype=fp16"], "dtype='fp16': must be one of float32, bfloat16, float16"),
    "device": (["--device=gpu"], "device='gpu': must be cpu, cuda or cuda:N"),
    "no cuda": (["--device=cuda:0"], "device=cuda:0, but this machine has no CUDA device(s)"),
    "init_from": (["--init_from=pretrained"], "init_from='pretrained': must be one of scratch, prune, resume"),
    "earlier run": (["--init_from=scratch"], "ckpt.pt holds an earlier run: continue it with --init_from=resume"),
    "damaged checkpoint": (["--out_dir={cut_run}"], "ckpt.pt is damaged and cannot be read"),
    "foreign checkpoint": (["--out_dir={foreign_run}"], "ckpt.pt is not a checkpoint of distill.py"),
    "missing data": (["--data_dir={missing}"], "meta.json: run prepare.py first"),
    "damaged meta.json": (["--data_dir={cut_meta}"], "meta.json is damaged or not prepare.py's"),
    "meta.json dtype": (["--data_dir={float_meta}"], "meta.json is damaged or not prepare.py's"),
    "foreign ids": (["--data_dir={small_meta}"], "but meta.json's tokenizer has 100 ids: the bins and meta.json"),
    "cut bin": (["--data_dir={cut_bin}"], "train.bin is 120,001 bytes, not a whole number of uint32 tokens"),
    "too little data": (["--batch_size=500"], "train.bin holds 461 windows"),
    "vocabulary": (["--teacher={small_vocab}"], "the teacher's vocabulary (256 rows) is smaller than the "
                                                "tokenizer's (300 ids)"),
    "block_size": (["--block_size=256"], "block_size 256 exceeds the teacher's max_seq_len 128"),
    "no teacher": (["--teacher={missing}"], "cannot load the teacher: no directory"),
    "damaged teacher": (["--teacher={cut_teacher}"], "model.safetensors is damaged and cannot be read"),
    "config file t4": (["config/t4.py", "--data_dir={missing}"], "run prepare.py first"),  # found from elsewhere
    "config file a100": (["config/a100.py", "--data_dir={missing}"], "run prepare.py first"),
    # FRESH
    "unwritable out_dir": (["--out_dir={unwritable}"], "cannot write to out_dir"),
    "no checkpoint": (["--init_from=resume"], "ckpt.pt to resume from"),
    "non-finite teacher": (["--init_from=scratch", "--teacher={poisoned}"],
                           "the teacher's weights hold NaN or inf (layers.1.mlp.down_proj.weight)"),
    "non-finite loss": (["--init_from=scratch", "--learning_rate=1e30", "--warmup_iters=0"],
                        "non-finite loss at iter 1"),
    # init_from=prune: the teacher (conftest's) has 4 heads of 8 in 2 groups, 32 channels, 48 neurons, 2 layers
    "prune head_dim": (["--init_from=prune"], "the student's head_dim 16 (n_embd / n_head) differs from the teacher's 8"),
    "prune wider": (["--init_from=prune", "--n_head=4", "--n_kv_head=2"], "intermediate_size 64 exceeds the "
                                                                          "teacher's 48: pruning can only remove"),
    "prune deeper": (["--init_from=prune", "--n_head=4", "--intermediate_size=48", "--n_layer=3"],
                     "the student's n_layer 3 exceeds the teacher's 2"),
    "prune groups": (["--init_from=prune", "--n_head=4", "--intermediate_size=48"],
                     "the student has 4 query heads per K/V head, the teacher 2"),
    "prune no teacher": (["--init_from=prune", "--teacher=None"], "init_from=prune cuts the student out of the "
                                                                  "teacher, and teacher is None"),
}
FRESH = {"unwritable out_dir", "no checkpoint", "non-finite teacher", "non-finite loss", "prune head_dim",
         "prune wider", "prune deeper", "prune groups", "prune no teacher"}


def files(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(pathlib.Path(d).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ERRORS)
def test_clear_errors(case, data, model_dir, odd, straight, tmp_path):
    """exit status 1, one line `distill.py: error: ...` naming the problem, no traceback, nothing lost."""
    extra, message = ERRORS[case]
    extra = [e.format(**odd, missing=tmp_path / "missing") for e in extra]
    out = tmp_path / "out"
    if case not in FRESH:
        shutil.copytree(straight, out)
        extra = ["--init_from=resume", *extra]
    given = next((e.split("=", 1)[1] for e in extra if e.startswith("--out_dir=")), out)
    before = files(given) if case not in FRESH else None
    r = run(f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={out}", *TINY, *extra)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("distill.py: error: ") and message in lines[0], r.stderr
    if before is not None:
        assert files(given) == before


DDP_GRADS = '''
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from torch.nn.parallel import DistributedDataParallel as DDP
from loss import distill_loss
from model import ModelConfig, Transformer
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same models and batch on every rank; each takes its half of the batch
cfg = dict(vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=16, head_dim=8, intermediate_size=24, max_seq_len=32)
student = Transformer(ModelConfig(**cfg), verbose=False)
teacher = Transformer(ModelConfig(**dict(cfg, n_embd=24, head_dim=12)), verbose=False).requires_grad_(False)
x, y = torch.randint(0, 50, (4, 12)), torch.randint(0, 50, (4, 12))
y[0, :7] = y[3, 2:] = -100  # uneven valid tokens across the halves
n = (y != -100).sum().float()
if world > 1:
    model, x, y = DDP(student), x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2]
else:
    model = student
loss, _ = distill_loss(model(x), student.lm_head.weight, teacher(x), teacher.lm_head.weight, y,
                       normalizer=n / world)  # as distill.py
loss.backward()
if rank == 0:
    torch.save({k: p.grad for k, p in student.named_parameters()}, sys.argv[2])
dist.barrier()  # rank 1 waits for rank 0's save: a process group torn down under a peer's feet can abort
del model  # DDP holds the process group: alive at exit, gloo aborts now and then (configurator.end_processes)
import gc; gc.collect()
dist.destroy_process_group()
'''


def test_ddp_gradient_equals_one_process(tmp_path):
    """Two processes, each with half of a batch (the tied head used outside DDP's forward, the step's
    normalizer), end with the gradient of one process on the whole batch."""
    script = tmp_path / "grads.py"
    script.write_text(DDP_GRADS)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for nproc, out in ((1, "one.pt"), (2, "two.pt")):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                            str(script), REPO, str(tmp_path / out)], capture_output=True, text=True, env=env,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    assert one.keys() == two.keys()
    for k in one:
        assert (one[k] - two[k]).abs().max().item() <= 1e-6 + 1e-5 * one[k].abs().max().item(), k


OLD = ["--teacher=None", "--n_layer=1", "--n_head=2", "--n_kv_head=1", "--n_embd=16", "--intermediate_size=32",
       "--block_size=32", "--batch_size=2", "--lr_decay_iters=8", "--eval_interval=2", "--eval_iters=1",
       "--log_interval=1", "--device=cpu", "--compile=False", "--seed=1"]


def test_an_older_checkpoint_resumes_exactly(tmp_path, data):
    """tests/data/ckpt_v1.pt was written by distill.py before the split into loss.py and hf.py (commit 49881b8),
    with OLD and --max_iters=4 on conftest's data. It resumes to 8 iterations as a run from scratch goes."""
    shutil.copytree(os.path.join(os.path.dirname(__file__), "data"), tmp_path / "old",
                    ignore=lambda d, names: [n for n in names if n != "ckpt_v1.pt"])
    os.replace(tmp_path / "old" / "ckpt_v1.pt", tmp_path / "old" / "ckpt.pt")
    resumed = run(f"--data_dir={data}", f"--out_dir={tmp_path / 'old'}", *OLD, "--max_iters=8",
                  "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "max_iters 4 -> 8" in resumed.stdout
    fresh = run(f"--data_dir={data}", f"--out_dir={tmp_path / 'new'}", *OLD, "--max_iters=8")
    assert fresh.returncode == 0, fresh.stderr
    old_rows, new_rows = read_log(tmp_path / "old")[0], read_log(tmp_path / "new")[0]
    assert [r["iter"] for r in old_rows] == [4, 5, 6, 7]
    for a, b in zip(old_rows, new_rows[4:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["iter"] == b["iter"]
