"""When the machine runs out: a full disk for each kind of file the scripts write, memory in each
phase, checkpoints of another version, a damaged teacher. Each is one line naming the problem and
the way on, exit status 1, no traceback; no earlier good file is lost, no temporary file is left;
and the same command (or --init_from=resume) works once there is room.

A real full disk needs privileges CI lacks, so the faults are injected: INJECT runs a script as
__main__ after replacing open() so that writes to one file fail with ENOSPC, or after making one
function raise torch.OutOfMemoryError (MemoryError)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import (
    ENV,
    REPO,
    TINY,
    assert_one_line_error,
    make_loud_model_dir,
    read_log,
    run_script,
)

pytestmark = pytest.mark.slow

INJECT = r'''
import builtins, errno, fnmatch, importlib, json, os, runpy, sys
spec = json.loads(sys.argv[1])
script, args = sys.argv[2], sys.argv[3:]
sys.path.insert(0, os.path.dirname(script))
real_open, opened, left = builtins.open, {}, [spec.get("after", 0)]

class Full:  # a file on a disk that fills after `after` bytes written to it, over all its opens
    def __init__(self, f):
        self.f = f
    def write(self, b):
        n = len(b.encode() if isinstance(b, str) else memoryview(b).cast("B"))
        if n > left[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)
        left[0] -= n
        return self.f.write(b)
    def writelines(self, lines):
        for line in lines:
            self.write(line)
    def __enter__(self):
        return self
    def __exit__(self, *a):
        return self.f.__exit__(*a)
    def __getattr__(self, name):
        return getattr(self.f, name)

def open_(file, mode="r", *a, **k):
    f = real_open(file, mode, *a, **k)
    name = os.path.basename(str(file))
    if spec.get("disk") and any(c in mode for c in "wax+") and fnmatch.fnmatch(name, spec["disk"]):
        opened[name] = opened.get(name, 0) + 1
        if opened[name] >= spec.get("nth", 1):
            return Full(f)
    return f

builtins.open = open_
if spec.get("oom"):  # module.function raises on its nth call (with gradients on, if "grad")
    module, name = spec["oom"].rsplit(".", 1)
    module = importlib.import_module(module)
    real, calls = getattr(module, name), [0]
    def failing(*a, **k):
        import torch
        if not spec.get("grad") or torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] >= spec.get("nth", 1):
                raise (MemoryError() if spec.get("cpu") else
                       torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        return real(*a, **k)
    setattr(module, name, failing)
if spec.get("free") is not None:  # the disk's free bytes, as common.disk_free reports them
    import common
    common.disk_free = lambda path: spec["free"]
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
'''


def faulty(script, spec, *args, cwd=None, timeout=300):
    """script (a file of the repository) with these arguments, under INJECT's fault spec."""
    return subprocess.run([sys.executable, "-c", INJECT, json.dumps(spec),
                           os.path.join(REPO, script), *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=cwd or os.path.dirname(REPO), timeout=timeout)


def one_line(r, script, *parts):
    """conftest.assert_one_line_error, but for eval.py's notes allowed above the error line:
    exit status 1, no traceback, one error line, the last on stderr, that holds every part."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in lines if line.startswith(f"{script}: error: ")]
    assert errors == lines[-1:], r.stderr
    for part in parts:
        assert part in lines[-1], (part, lines[-1])
    return lines[-1]


def no_tmp(d):
    left = [f for _, _, fs in os.walk(d) for f in fs if ".tmp" in f or ".part" in f]
    assert not left, left


def weights(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)


LEARN = ["--alpha=0.9", "--learning_rate=3e-3", "--warmup_iters=5", "--max_iters=12",
         "--lr_decay_iters=12", "--eval_interval=4"]
TIMING = ("tokens_per_sec", "peak_mem_gb", "mfu")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data, model_dir):  # this file's own: shorter than conftest's
    """A 12-iteration run, evals and checkpoints at 0, 4, 8 and 12: how each resumed run ends."""
    out = tmp_path_factory.mktemp("straight12")
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={out}",
                   *TINY, *LEARN)
    assert r.returncode == 0, r.stderr
    return out


def same_run(a, b):
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert [strip(x) for x in read_log(a)] == [strip(x) for x in read_log(b)]
    wa, wb = weights(a)["model"], weights(b)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# -----------------------------------------------------------------------------
# a full disk


@pytest.mark.parametrize("target, nth, after", [("ckpt.pt.tmp", 2, 1000), ("log.jsonl", 1, 3000),
                                                ("model.safetensors.tmp", 1, 1000)],
                         ids=["checkpoint", "log", "export"])
def test_a_full_disk_during_a_run(target, nth, after, straight, data, model_dir, tmp_path):
    """The checkpoint at iter 4 (its second), the log part-way, the export at the end: one line that
    names the file, the error and the free space, and says to resume; the last good checkpoint is
    whole, no temporary file is left, and --init_from=resume then ends as the straight run."""
    args = [f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={tmp_path}", *TINY, *LEARN]
    r = faulty("distill.py", dict(disk=target, nth=nth, after=after), *args)
    final = target.removesuffix(".tmp")
    one_line(r, "distill.py", f"cannot write {tmp_path}", f"{final}: No space left on device (",
             "free there); make room, then continue from", "--init_from=resume")
    no_tmp(tmp_path)
    ckpt = weights(tmp_path)  # the last good one: iter 0, where the next failed; 12, finished
    assert ckpt["version"] == 2 and ckpt["iter_num"] % 4 == 0
    assert ckpt["iter_num"] == {"ckpt.pt.tmp": 0, "model.safetensors.tmp": 12}.get(target, 8)
    r = run_script("distill.py", *args, "--init_from=resume")
    assert r.returncode == 0, r.stderr
    same_run(tmp_path, straight)
    assert os.path.exists(tmp_path / "hf" / "model.safetensors")


def test_a_full_disk_while_the_cache_is_built(data, model_dir, tmp_path):
    """The teacher cache's build: one line naming the cache's file; its part files are removed (they
    hold nothing to reuse), and the same command then builds it and trains."""
    args = [f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={tmp_path / 'out'}",
            f"--teacher_cache={tmp_path / 'cache'}", *TINY, "--max_iters=2"]
    r = faulty("distill.py", dict(disk="train.entries.bin.part0", after=5000), *args)
    one_line(r, "distill.py", f"cannot write {tmp_path / 'cache' / 'train.entries.bin'}: No space",
             "make room, then rerun the same command")
    no_tmp(tmp_path)
    assert not os.path.exists(tmp_path / "cache" / "meta.json")
    r = run_script("distill.py", *args)
    assert r.returncode == 0 and "built the teacher cache" in r.stdout, r.stderr


def test_a_full_disk_for_prepare_eval_and_plot(data, tokenizer_dir, model_dir, straight, tmp_path):
    """prepare.py's bins (an earlier output kept whole), eval.py's JSON and plot.py's PNG: one line
    each, no temporary file left, and the rerun works."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"第{i}个文档，内容是一些中文文字。" * 3}) + "\n"
                            for i in range(40)), encoding="utf-8")
    prep = [f"--input={docs}", f"--tokenizer={tokenizer_dir}", f"--out_dir={tmp_path / 'bins'}"]
    assert faulty("prepare.py", {}, *prep).returncode == 0
    before = {f: (tmp_path / "bins" / f).read_bytes() for f in os.listdir(tmp_path / "bins")}
    r = faulty("prepare.py", dict(disk="train.bin.tmp", after=100), *prep, "--force")
    one_line(r, "prepare.py", f"cannot write {tmp_path / 'bins' / 'train.bin'}: No space left on "
             "device", "nothing was renamed into place")
    assert {f: (tmp_path / "bins" / f).read_bytes() for f in before} == before
    assert sorted(os.listdir(tmp_path / "bins")) == sorted(before)

    ev = [f"--teacher={model_dir}", f"--student={straight}", f"--data={data}", "--block_size=16",
          "--windows=2", "--prompts=1", "--prompt_len=4", "--new_tokens=4", "--draft_lens=1",
          "--device=cpu", f"--out={tmp_path / 'eval.json'}"]
    r = faulty("eval.py", dict(disk="eval.json.tmp", after=10), *ev)
    one_line(r, "eval.py", f"cannot write {tmp_path / 'eval.json'}: No space left on device")
    assert faulty("eval.py", {}, *ev).returncode == 0 and (tmp_path / "eval.json").exists()

    pytest.importorskip("matplotlib")
    r = faulty("plot.py", dict(disk="curves.png.tmp", after=100), straight,
               f"--out={tmp_path / 'curves.png'}")
    one_line(r, "plot.py", f"cannot write {tmp_path / 'curves.png'}: No space left on device")
    no_tmp(tmp_path)
    assert faulty("plot.py", {}, straight, f"--out={tmp_path / 'curves.png'}").returncode == 0


def test_too_little_room_for_a_checkpoint(data, model_dir, tmp_path):
    """Free space is checked against a checkpoint's size before training: too little is one line
    before anything is written; less than a run writes in all is a warning."""
    args = [f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={tmp_path / 'out'}", *TINY,
            "--max_iters=2"]
    r = faulty("distill.py", dict(free=1000), *args)
    one_line(r, "distill.py", "has 0.0 MB free; a checkpoint of this student takes ~")
    assert not os.path.exists(tmp_path / "out")
    from model import ModelConfig, Transformer

    student = Transformer(ModelConfig(vocab_size=320, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                                      head_dim=16, intermediate_size=64), verbose=False)
    r = faulty("distill.py", dict(free=int(1.5 * 12 * student.num_params())), *args)
    assert r.returncode == 0 and "warning: " in r.stdout and "this run writes up to" in r.stdout


# -----------------------------------------------------------------------------
# memory


@pytest.mark.parametrize("where, spec, message", [
    ("the step", dict(oom="loss.distill_loss", grad=True, nth=3), "in the training step: lower "
     "--batch_size (now 4) and raise --gradient_accumulation_steps (now 1)"),
    ("the eval", dict(oom="loss.distill_loss", nth=1, cpu=True), "in the eval: lower --batch_size"),
    ("the cache", dict(oom="cache.window_entries"), "in the teacher cache's build: lower "
     "--batch_size (now 4): the teacher runs on that many windows at once"),
    ("the calibration", dict(oom="prune.importance"), "in the calibration of init_from=prune"),
], ids=lambda v: v if isinstance(v, str) and v.startswith("the ") else "")
def test_out_of_memory_in_each_phase(where, spec, message, data, model_dir, tmp_path):
    """Out of memory (CUDA's OutOfMemoryError, a CPU's MemoryError) in each phase of a run: one line
    with the phase, the peak and what to change; a step that ran out writes no checkpoint."""
    extra = {"the cache": [f"--teacher_cache={tmp_path / 'cache'}"],
             "the calibration": ["--init_from=prune", "--n_head=4", "--n_kv_head=2",
                                 "--intermediate_size=48", "--prune_windows=8"]}.get(where, [])
    r = faulty("distill.py", spec, f"--data_dir={data}", f"--teacher={model_dir}",
               f"--out_dir={tmp_path / 'out'}", *TINY, *extra)
    one_line(r, "distill.py", "out of memory (", "resident at the peak)", message)
    if where == "the step":  # the step of iter 2 failed: the checkpoint of iter 0 stays
        assert weights(tmp_path / "out")["iter_num"] == 0


def test_out_of_memory_in_sample_and_eval(model_dir, data, tmp_path):
    r = faulty("sample.py", dict(oom="model.sample_next"), f"--init_from={model_dir}",
               "--device=cpu", "--num_samples=1", "--max_new_tokens=4")
    one_line(r, "sample.py", "out of memory (", "in generation: a shorter prompt or "
             "--max_new_tokens (now 4)")
    r = faulty("eval.py", dict(oom="model.filtered_probs"), f"--teacher={model_dir}",
               f"--student={model_dir}", f"--data={data}", "--block_size=16", "--windows=2",
               "--device=cpu", f"--out={tmp_path / 'e.json'}")
    one_line(r, "eval.py", "in the teacher-forced pass: lower --batch_size (now 4)")
    assert not os.path.exists(tmp_path / "e.json")


# -----------------------------------------------------------------------------
# checkpoints of another version, a damaged teacher, a schedule that trains nothing


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("optimizer"), "lacks optimizer: not a checkpoint this distill.py can resume"),
    (lambda c: c.update(shards=3), "holds shards, unknown here"),
    (lambda c: c.update(version=3), "was written by a newer distill.py (checkpoint format 3; this "
     "one reads up to 2): update this repository"),
], ids=["missing key", "extra key", "newer format"])
def test_a_checkpoint_of_another_version(edit, message, straight, data, model_dir, tmp_path):
    """One line naming what is missing or unknown and what to do; the file is left as it was, and
    sample.py still reads the weights of one that lacks only what training needs."""
    out = tmp_path / "out"
    out.mkdir()
    ckpt = weights(straight)
    edit(ckpt)
    torch.save(ckpt, out / "ckpt.pt")
    before = (out / "ckpt.pt").read_bytes()
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={out}",
                   *TINY, *LEARN, "--init_from=resume")
    assert_one_line_error(r, "distill.py", message)
    assert (out / "ckpt.pt").read_bytes() == before
    if "optimizer" not in ckpt:
        r = faulty("sample.py", {}, f"--init_from={out}", "--device=cpu", "--num_samples=1",
                   "--max_new_tokens=3", "--start=维基")
        assert r.returncode == 0, r.stderr


def test_a_damaged_teacher_and_an_overflowing_one(tokenizer_dir, data, tmp_path):
    """Weights that hold NaN (a damaged download) are named at load; finite weights whose
    activations overflow float16 (the loud teacher without its float32 residual stream) get the
    dtype's hint."""
    import hf

    loud = make_loud_model_dir(tmp_path / "loud", tokenizer_dir)
    damaged = hf.load(loud)
    with torch.no_grad():
        damaged.layers[0].mlp.up_proj.weight[3, 3] = float("nan")
    hf.save(damaged, tmp_path / "damaged", tokenizer_dir=tokenizer_dir)
    common = [f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", *TINY, "--max_iters=2"]
    r = run_script("distill.py", *common, f"--teacher={tmp_path / 'damaged'}")
    assert r.returncode == 1 and "the teacher's weights hold NaN or inf (layers.0.mlp.up_proj" \
        ".weight): the files in" in r.stderr and "download them again" in r.stderr, r.stderr
    r = run_script("distill.py", *common, f"--teacher={loud}", "--teacher_dtype=float16",
            "--teacher_fp32_residual=False")
    assert r.returncode == 1 and "non-finite teacher output at iter 0: its activations overflow " \
        "float16; try --teacher_dtype=float32" in r.stderr, r.stderr
    # the guard on: it trains
    r = run_script("distill.py", *common, f"--teacher={loud}", "--teacher_dtype=float16")
    assert r.returncode == 0, r.stderr


def test_a_warmup_longer_than_the_run_is_a_warning(data, model_dir, tmp_path):
    """docs/training.md's tiny recipe once left warmup_iters at 500 for a 40-iteration run: the
    learning rate never passed 8% of its value, and nothing was learned. Now it says so."""
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={model_dir}",
                   f"--out_dir={tmp_path}", *TINY, "--max_iters=4", "--lr_decay_iters=4")
    assert r.returncode == 0, r.stderr
    assert ("warning: warmup_iters=500 is not shorter than the run (4 iters, the decay 4): the "
            "learning rate peaks at 0.8% of learning_rate; set --warmup_iters to about a tenth of "
            "it (--warmup_iters=1)") in r.stdout, r.stdout


def test_a_resumed_run_logs_the_straight_runs_rows(straight, data, model_dir, tmp_path):
    """teacher_val_ce is in a run's first eval row only: a resume takes it from the log instead of
    logging it again, so its rows are a straight run's, key for key."""
    args = [f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={tmp_path}", *TINY, *LEARN]
    # its end is an eval of the straight run
    assert run_script("distill.py", *args, "--max_iters=8").returncode == 0
    assert run_script("distill.py", *args, "--init_from=resume").returncode == 0
    same_run(tmp_path, straight)
    assert [("teacher_val_ce" in r) for r in read_log(tmp_path)[1]] == [True, False, False, False]


def test_eval_writes_beside_the_student(straight, data, model_dir):
    r = faulty("eval.py", {}, f"--teacher={model_dir}", f"--student={straight}", f"--data={data}",
               "--block_size=16", "--windows=2", "--prompts=1", "--prompt_len=4", "--new_tokens=4",
               "--draft_lens=1", "--device=cpu")
    assert r.returncode == 0 and f"wrote {straight / 'eval.json'}" in r.stderr, r.stderr
