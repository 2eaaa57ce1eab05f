"""distill.py end to end, as a user runs it (processes, from another working directory), on CPU: a
tiny corpus tokenized with conftest's BPE, the tiny random teacher of conftest exported through
model.py, tiny students (conftest's TINY; the straight run adds LEARN). Exact resume after a
kill, and damaged files: test_faults.py."""

import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hf
from conftest import (
    LEARN,
    TINY,
    assert_one_line_error,
    interrupt,
    load_student,
    make_model_dir,
    read_log,
    run_script,
    snapshot,
    start_script,
    untimed,
    write_data,
)

pytestmark = pytest.mark.slow


def val_batch(data, block_size=64, n=8):
    """The fixed val windows distill.py evaluates on: n evenly spread windows of block_size + 1
    tokens."""
    with open(os.path.join(data, "meta.json")) as f:
        dtype = json.load(f)["dtype"]
    val = np.fromfile(os.path.join(data, "val.bin"), dtype=dtype).astype(np.int64)
    count = len(val) // (block_size + 1)
    idx = np.arange(min(n, count)) * count // min(n, count)
    w = torch.from_numpy(np.stack([val[i * (block_size + 1):(i + 1) * (block_size + 1)]
                                   for i in idx]))
    return w[:, :-1], w[:, 1:]


# -----------------------------------------------------------------------------
# the straight run (conftest): what it writes, learns and exports


def test_writes_checkpoint_log_and_hf(straight):
    ckpt = torch.load(os.path.join(straight, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scaler", "model_args", "iter_num", "data_pos", "best_val_ce",
            "config", "tokenizer", "rng"} <= set(ckpt)
    assert ckpt["iter_num"] == 40 and ckpt["scaler"] is None
    assert ckpt["model_args"]["vocab_size"] == 320
    train, evals = read_log(straight)
    assert [r["iter"] for r in train] == list(range(40))
    assert [r["iter"] for r in evals] == [0, 10, 20, 30, 40]
    for r in train:
        assert set(r) == {"iter", "loss", "ce", "kl", "lr", "grad_norm", "tokens_per_sec", "mfu",
                          "peak_mem_gb", "peak_reserved_gb"}
        assert r["mfu"] is None and r["tokens_per_sec"] > 0 and r["peak_mem_gb"] > 0  # a CPU's
        assert r["peak_reserved_gb"] is None  # CUDA's cache only
    assert train[0]["lr"] == pytest.approx(3e-3 / 6)  # (it + 1) / (warmup + 1): step 0 moves
    assert [("teacher_val_ce" in r) for r in evals] == [True] + [False] * 4  # once
    assert ckpt["best_val_ce"] == min(r["val_ce"] for r in evals)
    hf_files = os.listdir(os.path.join(straight, "hf"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(hf_files)


def test_student_learns_from_the_teacher(straight):
    train, evals = read_log(straight)
    kl = [r["val_kl"] for r in evals]
    assert all(b <= a for a, b in zip(kl, kl[1:])) and kl[-1] < 0.8 * kl[0], kl
    assert evals[-1]["val_top1"] > evals[0]["val_top1"]
    assert sum(r["loss"] for r in train[-5:]) < sum(r["loss"] for r in train[:5])


def test_eval_matches_a_plain_computation(straight, data, model_dir):
    """Reads the bins with meta.json's dtype (uint32 here), the same windows, the same numbers as
    plain full-logits losses: the teacher's CE at the first eval, the student's CE, KL at T=2 and
    top-1 at the last."""
    x, y = val_batch(data)
    teacher = hf.load(model_dir, verbose=False)
    student, _ = load_student(straight)
    with torch.no_grad():  # the tokenizer's 300 ids; then padding
        zt, zs = (m.lm_head(m(x))[..., :300] for m in (teacher, student))
    kl = (F.softmax(zt / 2, -1) * (F.log_softmax(zt / 2, -1) - F.log_softmax(zs / 2, -1)))
    ce = [F.cross_entropy(z.flatten(0, 1), y.flatten()).item() for z in (zt, zs)]
    _, evals = read_log(straight)
    assert evals[0]["teacher_val_ce"] == pytest.approx(ce[0], rel=1e-5)
    assert evals[-1]["val_ce"] == pytest.approx(ce[1], rel=1e-5)
    assert evals[-1]["val_kl"] == pytest.approx(kl.sum(-1).mean().item(), rel=1e-4)
    top1 = (zs.argmax(-1) == zt.argmax(-1)).float().mean().item()
    assert evals[-1]["val_top1"] == pytest.approx(top1)


def test_hf_export_loads_in_transformers_and_sample_py(straight):
    from transformers import AutoModelForCausalLM

    student, _ = load_student(straight)
    ref = AutoModelForCausalLM.from_pretrained(os.path.join(straight, "hf")).eval()
    x = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert (ref(x).logits - student.lm_head(student(x))).abs().max() < 1e-4
    r = run_script("sample.py", f"--init_from={straight}", "--temperature=0", "--max_new_tokens=5",
                   "--num_samples=1", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("维基百科是")


def test_two_processes(straight, data, model_dir, tmp_path):
    """The tiny run under torch.distributed.run (gloo): eval all-reduced over both processes
    equals one process's eval at iter 0 (same seed, same weights)."""
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={model_dir}",
                   f"--out_dir={tmp_path}", *TINY, ddp=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "512 tokens" in r.stdout and "2 processes" in r.stdout  # 4 batch * 64 block * 2
    train, evals = read_log(tmp_path)
    assert [row["iter"] for row in train] == list(range(40))
    assert [row["iter"] for row in evals] == [0, 10, 20, 30, 40]
    one = read_log(straight)[1][0]
    for k in ("val_ce", "val_kl", "val_top1", "teacher_val_ce"):
        assert evals[0][k] == pytest.approx(one[k], abs=1e-5)
    assert os.path.exists(os.path.join(tmp_path, "hf", "model.safetensors"))


# -----------------------------------------------------------------------------
# other runs


@pytest.mark.parametrize("eval_interval", [100000, 1])
def test_ctrl_c_saves_and_resumes(eval_interval, data, model_dir, tmp_path):
    """Ctrl-C: the step finishes, then a checkpoint and exit 130; the resume ends with a straight
    run's rows. eval_interval=1: every stop lands on an eval iteration, evaluated before the
    checkpoint (a resume does not evaluate again where it starts, so that eval row was lost
    before)."""
    args = [f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={tmp_path}", *TINY,
            "--max_iters=100000", f"--eval_interval={eval_interval}"]
    r = interrupt(start_script("distill.py", *args), "iter 0:", signal.SIGINT)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert "--init_from=resume" in r.stdout
    k = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)["iter_num"]
    assert k >= 1 and not os.path.exists(tmp_path / "hf")
    assert [row["iter"] for row in read_log(tmp_path)[1]] == list(range(0, k + 1, eval_interval))
    r = run_script("distill.py", *args, "--init_from=resume", f"--max_iters={k + 2}")
    assert r.returncode == 0, r.stderr
    train, evals = read_log(tmp_path)
    assert [row["iter"] for row in train] == list(range(k + 2))
    assert [row["iter"] for row in evals] == sorted(set(range(0, k + 3, eval_interval)) | {k + 2})
    assert os.path.exists(tmp_path / "hf" / "model.safetensors")


def test_a_failed_compile_trains_on_eager(data, model_dir, tmp_path):
    """--compile=True where torch.compile cannot work (here: no C++ compiler for inductor; on a
    GPU: no Triton for it): one warning each for the student, the teacher and the loss's chunk,
    then the same run as eager."""
    args = [f"--data_dir={data}", f"--teacher={model_dir}", *TINY, *LEARN, "--max_iters=4",
            "--eval_interval=2"]
    r = run_script("distill.py", *args, f"--out_dir={tmp_path / 'compiled'}", "--compile=True",
                   env=dict(CXX="/nonexistent", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor")))
    assert r.returncode == 0, r.stderr
    for what in ("the student", "the teacher", "distill_loss"):
        assert r.stderr.count(f"Warning: {what}: torch.compile failed") == 1, r.stderr
    eager = run_script("distill.py", *args, f"--out_dir={tmp_path / 'eager'}")
    assert eager.returncode == 0, eager.stderr
    compiled, eager = read_log(tmp_path / "compiled"), read_log(tmp_path / "eager")
    assert [untimed(rows) for rows in compiled] == [untimed(rows) for rows in eager]


def test_without_a_teacher(tmp_path, tokenizer_dir):
    """teacher=None: a plain language model (CE only) on uint16 bins; max_iters from epochs;
    vocabulary rounded up."""
    data = write_data(tmp_path / "data16", tokenizer_dir, np.uint16)
    out = tmp_path / "out"
    r = run_script("distill.py", f"--data_dir={data}", "--teacher=None", f"--out_dir={out}", *TINY,
                   "--max_iters=0", "--epochs=1", "--batch_size=16", "--learning_rate=1e-2",
                   "--warmup_iters=2", "--eval_interval=100")
    assert r.returncode == 0, r.stderr
    train, evals = read_log(out)
    n_windows = 30_000 // 65  # 461 windows of 65 tokens: 28 steps of 16 make an epoch
    assert len(train) == n_windows // 16 == 28
    assert all(row["kl"] is None for row in train) and evals[-1]["val_kl"] is None
    assert evals[-1]["val_ce"] < evals[0]["val_ce"] - 1.0
    _, ckpt = load_student(out)  # 300 ids -> 320 rows; the next epoch's start
    assert ckpt["model_args"]["vocab_size"] == 320 and ckpt["data_pos"] == [1, 0]
    assert os.path.exists(out / "hf" / "tokenizer.json")


def test_float16_with_gradscaler_and_accumulation(data, model_dir, tmp_path):
    """dtype=float16: float32 weights, autocast and a GradScaler whose state is checkpointed and
    resumed."""
    args = [f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={tmp_path}", *TINY,
            "--dtype=float16", "--gradient_accumulation_steps=2", "--lr_decay_iters=6",
            "--eval_interval=3", *LEARN]
    r = run_script("distill.py", *args, "--max_iters=3")
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0 and ckpt["model"]["norm.weight"].dtype == torch.float32
    r = run_script("distill.py", *args, "--max_iters=6", "--init_from=resume")
    assert r.returncode == 0, r.stderr
    train, evals = read_log(tmp_path)
    assert [row["iter"] for row in train] == list(range(6))
    assert evals[-1]["iter"] == 6 and evals[-1]["val_ce"] < evals[0]["val_ce"]


OLD = ["--teacher=None", "--n_layer=1", "--n_head=2", "--n_kv_head=1", "--n_embd=16",
       "--intermediate_size=32", "--block_size=32", "--batch_size=2", "--lr_decay_iters=8",
       "--eval_interval=2", "--eval_iters=1", "--log_interval=1", "--device=cpu",
       "--compile=False", "--seed=1"]


def test_an_older_checkpoint_resumes_exactly(tmp_path, data):
    """tests/data/ckpt_v1.pt was written by distill.py before the split into loss.py and hf.py
    (commit 49881b8), with OLD and --max_iters=4 on conftest's data. It resumes to 8 iterations as
    a run from scratch goes."""
    os.mkdir(tmp_path / "old")
    shutil.copyfile(os.path.join(os.path.dirname(__file__), "data", "ckpt_v1.pt"),
                    tmp_path / "old" / "ckpt.pt")
    resumed = run_script("distill.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'old'}", *OLD,
                         "--max_iters=8", "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "max_iters 4 -> 8" in resumed.stdout
    fresh = run_script("distill.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'new'}", *OLD,
                       "--max_iters=8")
    assert fresh.returncode == 0, fresh.stderr
    old_rows, new_rows = read_log(tmp_path / "old")[0], read_log(tmp_path / "new")[0]
    assert [r["iter"] for r in old_rows] == [4, 5, 6, 7]
    for a, b in zip(old_rows, new_rows[4:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["iter"] == b["iter"]


DDP_GRADS = '''
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from torch.nn.parallel import DistributedDataParallel as DDP
from loss import distill_loss
from model import ModelConfig, Transformer
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
torch.manual_seed(0)  # the same models and batch on every rank; each takes its half of the batch
cfg = dict(vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=16, head_dim=8,
           intermediate_size=24, max_seq_len=32)
student = Transformer(ModelConfig(**cfg), verbose=False)
teacher = Transformer(ModelConfig(**dict(cfg, n_embd=24, head_dim=12)), verbose=False)
teacher.requires_grad_(False)
x, y = torch.randint(0, 50, (4, 12)), torch.randint(0, 50, (4, 12))
y[0, :7] = y[3, 2:] = -100  # uneven valid tokens across the halves
n = (y != -100).sum().float()
model = student
if world > 1:
    dist.init_process_group("gloo")
    model, x, y = DDP(student), x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2]
loss, _ = distill_loss(model(x), student.lm_head.weight, teacher(x), teacher.lm_head.weight, y,
                       normalizer=n / world)  # as distill.py
loss.backward()
if rank == 0:
    torch.save({k: p.grad for k, p in student.named_parameters()}, sys.argv[2])
if world > 1:
    dist.barrier()  # rank 1 waits for rank 0's save: a group torn down under a peer can abort
    del model  # DDP holds the group: alive at exit, gloo aborts now and then (end_processes)
    import gc; gc.collect()
    dist.destroy_process_group()
'''


def test_ddp_gradient_equals_one_process(tmp_path):
    """Two processes, each with half of a batch (the tied head used outside DDP's forward, the
    step's normalizer), end with the gradient of one process on the whole batch."""
    from conftest import REPO

    script = tmp_path / "grads.py"
    script.write_text(DDP_GRADS)
    for out, ddp in (("one.pt", False), ("two.pt", 2)):
        r = run_script(script, REPO, tmp_path / out, ddp=ddp)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    assert one.keys() == two.keys()
    for k in one:
        assert (one[k] - two[k]).abs().max().item() <= 1e-6 + 1e-5 * one[k].abs().max().item(), k


# -----------------------------------------------------------------------------
# bad settings and inputs: one line each


@pytest.fixture(scope="session")
def odd(tmp_path_factory, tokenizer_dir):
    """Teachers and folders gone wrong, built once (damaged files: test_faults.py)."""
    d = tmp_path_factory.mktemp("odd")
    small = make_model_dir(d / "small_vocab", tokenizer_dir, vocab_size=256)
    poisoned = make_model_dir(d / "poisoned", tokenizer_dir)
    model = hf.load(poisoned, verbose=False)
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")  # -> NaN hidden states
    hf.save(model, poisoned)
    (d / "a_file").write_text("")
    return dict(small_vocab=small, poisoned=poisoned, unwritable=d / "a_file" / "out")


# extra settings -> the one line that must say what is wrong. Each runs on a copy of the straight
# run with --init_from=resume, and that run's files must come out untouched, unless it is in
# FRESH: those run into a new out_dir, which a refusal does not make (nor a folder above it), and
# a failure mid-run (RUNTIME) does.
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
    "init_from": (["--init_from=pretrained"],
                  "init_from='pretrained': must be one of scratch, prune, resume"),
    "earlier run": (["--init_from=scratch"],
                    "ckpt.pt holds an earlier run: continue it with --init_from=resume"),
    "too little data": (["--batch_size=500"], "train.bin holds 461 windows"),
    "vocabulary": (["--teacher={small_vocab}"],
                   "the teacher's vocabulary (256 rows) is smaller than the tokenizer's (300 ids)"),
    "block_size": (["--block_size=256"], "block_size 256 exceeds the teacher's max_seq_len 128"),
    "no teacher": (["--teacher={missing}"], "cannot load the teacher: no directory"),
    "config file t4": (["config/t4.py", "--data_dir={missing}"], "run prepare.py first"),
    "config file a100": (["config/a100.py", "--data_dir={missing}"], "run prepare.py first"),
    # FRESH
    "missing data": (["--data_dir={missing}"], "meta.json: run prepare.py first"),
    "unwritable out_dir": (["--out_dir={unwritable}"], "cannot write to out_dir"),
    "no checkpoint": (["--init_from=resume"], "ckpt.pt to resume from"),
    "non-finite teacher": (["--init_from=scratch", "--teacher={poisoned}"],
                           "the teacher's weights hold NaN or inf (layers.1.mlp.down_proj.weight)"),
    "non-finite loss": (["--init_from=scratch", "--learning_rate=1e30", "--warmup_iters=0"],
                        "non-finite loss at iter 1"),
    # init_from=prune: conftest's teacher has 4 heads of 8 in 2 groups, 32 channels, 48 neurons,
    # 2 layers
    "prune head_dim": (["--init_from=prune"],
                       "the student's head_dim 16 (n_embd / n_head) differs from the teacher's 8"),
    "prune wider": (["--init_from=prune", "--n_head=4", "--n_kv_head=2"],
                    "intermediate_size 64 exceeds the teacher's 48: pruning can only remove"),
    "prune deeper": (["--init_from=prune", "--n_head=4", "--intermediate_size=48", "--n_layer=3"],
                     "the student's n_layer 3 exceeds the teacher's 2"),
    "prune groups": (["--init_from=prune", "--n_head=4", "--intermediate_size=48"],
                     "the student has 4 query heads per K/V head, the teacher 2"),
    "prune no teacher": (["--init_from=prune", "--teacher=None"],
                         "init_from=prune cuts the student out of the teacher, and teacher is "
                         "None"),
}
FRESH = {"missing data", "unwritable out_dir", "no checkpoint", "non-finite teacher",
         "non-finite loss", "prune head_dim", "prune wider", "prune deeper", "prune groups",
         "prune no teacher"}
RUNTIME = {"non-finite teacher", "non-finite loss"}
# a fresh interpreter (conftest.run_script) for one of each kind: a setting, the data, the
# checkpoint, the teacher, a failure mid-run
REAL = {"misspelt key", "missing data", "no checkpoint", "vocabulary", "non-finite loss"}


@pytest.mark.parametrize("case", ERRORS)
def test_clear_errors(case, data, model_dir, odd, straight, tmp_path):
    """exit status 1, one line `distill.py: error: ...` naming the problem, no traceback, nothing
    lost or left behind."""
    extra, message = ERRORS[case]
    extra = [e.format(**odd, missing=tmp_path / "missing") for e in extra]
    out = tmp_path / "new" / "out"
    if case not in FRESH:
        shutil.copytree(straight, out)
        extra = ["--init_from=resume", *extra]
    given = next((e.split("=", 1)[1] for e in extra if e.startswith("--out_dir=")), out)
    before = snapshot(given) if case not in FRESH else None
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={out}",
                   *TINY, *extra, fresh=case in REAL)
    assert_one_line_error(r, "distill.py", message)
    if case not in FRESH:
        assert snapshot(given) == before
    elif case not in RUNTIME:
        assert not os.path.exists(tmp_path / "new")
