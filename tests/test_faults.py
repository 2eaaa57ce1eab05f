"""distill.py when things go wrong, as they do for users: a phase interrupted (Ctrl-C, SIGTERM,
kill -9), a file damaged after a good run (cut, zeroed, swapped for another's), a resume with other
settings or data. Each must end in a correct run or one clear line, with the earlier good files
intact and no new empty folder. Bad settings: test_distill.py's test_clear_errors."""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import (
    CACHED,
    CORPUS,
    LEARN,
    TINY,
    assert_one_line_error,
    interrupt,
    load_student,
    make_model_dir,
    make_tokenizer,
    read_log,
    run_script,
    snapshot,
    start_script,
    untimed,
    write_data,
)

pytestmark = pytest.mark.slow
SHORT = [*TINY, "--max_iters=8", "--lr_decay_iters=8", "--eval_interval=4"]
SLOW = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=256, head_dim=64, intermediate_size=1024)
PRUNED = ["--n_layer=2", "--n_head=2", "--n_kv_head=1", "--n_embd=128", "--intermediate_size=256"]
BUILDING = (r"^(building|an earlier build was interrupted: building again) the teacher cache .*: "
            r"the teacher runs")


@pytest.fixture(scope="module")
def slow_teacher(tmp_path_factory, tokenizer_dir):
    """A teacher slow enough on a CPU (seconds for the cache and the calibration; a step ~10x the
    10 ms of test_second_ctrl_c_in_the_loop) that a signal sent on a line of progress lands
    mid-phase."""
    return make_model_dir(tmp_path_factory.mktemp("slow"), tokenizer_dir, **SLOW)


def iter_num(out_dir):  # of its checkpoint, loaded whole, as resume loads it
    return torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)["iter_num"]


def assert_interrupted(r, message=""):
    return assert_one_line_error(r, "distill.py", message, status=130, what="interrupted")


# -----------------------------------------------------------------------------
# interrupted phases


def test_cache_build_interrupted_then_built_again(slow_teacher, data, tmp_path):
    """Ctrl-C in the cache build: one line, exit 130. kill -9: part files and no meta.json.
    Neither is taken as a cache; the same command then says it builds again and ends in a correct
    run."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = [f"--data_dir={data}", f"--teacher={slow_teacher}", f"--out_dir={out}",
            f"--teacher_cache={cache}", *SHORT, "--max_iters=2"]
    progress = r"teacher cache: \d"  # the first progress line: mid-build
    r = interrupt(start_script("distill.py", *args), progress, signal.SIGINT)
    assert re.search(BUILDING, r.stdout, re.M), r.stdout  # the phase's first line says what it does
    assert_interrupted(r)
    assert not (cache / "meta.json").exists() and not out.exists()
    r = interrupt(start_script("distill.py", *args), progress, signal.SIGKILL)
    assert r.returncode == -signal.SIGKILL and not (cache / "meta.json").exists()
    assert list(cache.glob("train.*.part0")) and not out.exists()
    r = run_script("distill.py", *args)
    assert r.returncode == 0, r.stderr
    assert "an earlier build was interrupted: building again" in r.stdout
    assert sorted(os.listdir(cache)) == ["meta.json", "train.entries.bin", "train.tokens.bin",
                                         "val.entries.bin", "val.tokens.bin"]
    sizes = json.loads((cache / "meta.json").read_text())["sizes"]
    assert sizes == {name: os.path.getsize(cache / name) for name in sizes} and len(sizes) == 4


def test_calibration_interrupted(slow_teacher, data, tmp_path):
    """init_from=prune, stopped while the teacher ranks its pieces, by SIGTERM as torchrun and
    schedulers send it (Ctrl-C takes the same way out: the cache test): one line, exit 130, and no
    out_dir at all, so the same command starts afresh."""
    out = tmp_path / "out"
    r = interrupt(start_script("distill.py", f"--data_dir={data}", f"--teacher={slow_teacher}",
                               f"--out_dir={out}", "--init_from=prune", "--prune_windows=460",
                               *SHORT, *PRUNED),
                  r"calibration: \d", signal.SIGTERM)
    assert "pruning the student out of the teacher: the teacher runs over 460 windows" in r.stdout
    assert_interrupted(r)
    assert "pruned the student" not in r.stdout and not out.exists()


def test_killed_runs_resume_exactly(straight, data, model_dir, tmp_path):
    """The straight run, killed (kill -9) after iter 20, its last log row cut short as a kill can
    leave it, resumed and killed again as the last eval's checkpoint and the export are written,
    then resumed to its end: the rows (each once) and the weights of the run that went straight,
    to the bit, and the export the checkpoint's weights."""
    from safetensors.torch import load_file

    args = [f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={tmp_path}", *TINY, *LEARN]
    r = interrupt(start_script("distill.py", *args), "iter 20:", signal.SIGKILL)
    assert r.returncode == -signal.SIGKILL and iter_num(tmp_path) == 20  # eval 20's checkpoint
    with open(tmp_path / "log.jsonl", "a") as f:  # as if the kill had cut a row's write short
        f.write('{"iter": 21, "loss": 5.')
    resume = [*args, "--init_from=resume"]
    r = interrupt(start_script("distill.py", *resume), "eval 40:", signal.SIGKILL)
    assert "resuming" in r.stdout and r.returncode == -signal.SIGKILL
    assert iter_num(tmp_path) in (30, 40)
    r = run_script("distill.py", *resume)
    assert r.returncode == 0 and "exported the student at iter 40" in r.stdout, r.stderr
    assert [untimed(rows, "teacher_val_ce") for rows in read_log(tmp_path)] == \
        [untimed(rows, "teacher_val_ce") for rows in read_log(straight)]
    (student, ckpt), (want, _) = load_student(tmp_path), load_student(straight)
    assert ckpt["iter_num"] == 40
    a, b = student.state_dict(), want.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(exported["model.embed_tokens.weight"], ckpt["model"]["embed_tokens.weight"])


def test_second_ctrl_c_in_the_loop(slow_teacher, data, tmp_path):
    """The first Ctrl-C in the loop asks for a checkpoint after the step; a second, during that
    step, aborts in one line that says how to go on from the checkpoint there is (iter 0's). The
    student is pruned: that start names its size too, as a scratch start does."""
    out = tmp_path / "out"
    p = start_script("distill.py", f"--data_dir={data}", f"--teacher={slow_teacher}",
                     f"--out_dir={out}", *SHORT, *PRUNED, "--batch_size=16", "--eval_iters=1",
                     "--init_from=prune", "--prune_windows=16")
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith("iter 0:"):
            break
    pruned = next(line for line in seen if line.startswith("pruned the student"))
    assert re.search(r"; Transformer: [\d,]+ parameters$", pruned), pruned
    p.send_signal(signal.SIGINT)
    time.sleep(0.01)  # long enough for the first to be handled; a step of the slow teacher: ~10x
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=300)
    r = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    assert "stopped at" not in r.stdout, r.stdout
    assert_interrupted(r, f"continue from {out / 'ckpt.pt'} with --init_from=resume")
    assert iter_num(out) == 0


# -----------------------------------------------------------------------------
# files damaged after a good run: one line naming the file, before the teacher loads, nothing
# else touched


def cut(path):
    with open(path, "r+b") as f:  # whole tokens of uint32 and of the cache's 9 bytes
        f.truncate(os.path.getsize(path) // 2 // 36 * 36)


def zero(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(bytes(size))


def grow(path):  # a byte more
    with open(path, "ab") as f:
        f.write(b"\0")


def edit(**kw):  # meta.json with other values
    return lambda path: path.write_text(json.dumps(dict(json.loads(path.read_text()), **kw)))


def foreign(path):  # another program's torch.save
    torch.save({"weights": torch.zeros(2)}, path)


def swap(other):  # the file replaced by another of the same kind beside it
    return lambda path: shutil.copyfile(path.parent / other, path)


# file (in the cached run's folder: conftest), damage -> what the one line must name
DAMAGE = {
    "train.bin zeroed": ("data/train.bin", zero, "train.bin"),
    "train.bin a byte long": ("data/train.bin", grow,
                              "train.bin is 120,001 bytes, not a whole number of uint32 tokens"),
    "val.bin cut": ("data/val.bin", cut, "val.bin"),
    "meta.json cut": ("data/meta.json", cut, "meta.json is damaged or not prepare.py's"),
    "meta.json dtype": ("data/meta.json", edit(dtype="float32"),
                        "meta.json is damaged or not prepare.py's"),
    "meta.json of fewer ids": ("data/meta.json", edit(vocab_size=100, eos_id=0),
                               "but meta.json's tokenizer has 100 ids: the bins and meta.json"),
    "ckpt.pt cut": ("out/ckpt.pt", cut, "ckpt.pt is damaged and cannot be read"),
    "ckpt.pt not distill.py's": ("out/ckpt.pt", foreign,
                                 "ckpt.pt is not a checkpoint of distill.py"),
    "log.jsonl zeroed": ("out/log.jsonl", zero, "log.jsonl is damaged at line 1"),
    "train.tokens.bin zeroed": ("cache/train.tokens.bin", zero, "train.tokens.bin"),
    "val.entries.bin swapped": ("cache/val.entries.bin", swap("train.entries.bin"),
                                "val.entries.bin"),
    "cache meta.json zeroed": ("cache/meta.json", zero, "cache/meta.json"),
}
REAL = {"ckpt.pt cut", "val.entries.bin swapped"}  # in a fresh interpreter (conftest.run_script)


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_file(case, cached, model_dir, tmp_path):
    """A resume after the cached run, one of its files damaged: exit 1, one line naming the file,
    no teacher loaded (the ckpt.pt and data cases run without the cache, where the teacher would
    load), nothing else changed."""
    name, damage, named = DAMAGE[case]
    for part in ("data", "out", "cache"):
        shutil.copytree(cached / part, tmp_path / part)
    damage(tmp_path / name)
    before = snapshot(tmp_path)
    cache = [f"--teacher_cache={tmp_path / 'cache'}"] if name.startswith("cache/") else []
    r = run_script("distill.py", f"--data_dir={tmp_path / 'data'}", f"--teacher={model_dir}",
                   f"--out_dir={tmp_path / 'out'}", *CACHED, "--init_from=resume", *cache,
                   fresh=case in REAL)
    assert_one_line_error(r, "distill.py", named)
    assert "loaded " not in r.stdout, r.stdout  # the teacher's "loaded DIR: N parameters" line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["cut", "another model's"])
def test_damaged_teacher(damage, slow_teacher, model_dir, data, tmp_path):
    """The teacher's model.safetensors cut short, or swapped for another model's: one line naming
    the teacher, and no out_dir left behind."""
    teacher = tmp_path / "teacher"
    shutil.copytree(model_dir, teacher)
    if damage == "cut":
        cut(teacher / "model.safetensors")
    else:
        shutil.copyfile(os.path.join(slow_teacher, "model.safetensors"),
                        teacher / "model.safetensors")
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={teacher}",
                   f"--out_dir={tmp_path / 'out'}", *SHORT)
    line = assert_one_line_error(r, "distill.py", "cannot load the teacher")
    assert str(teacher) in line, line
    assert damage != "cut" or "model.safetensors is damaged and cannot be read" in line, line
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# resume with other settings or other data


def test_resume_says_what_it_ignores_and_what_is_not_exact(cached, model_dir, tmp_path):
    """Without the original shape flags the checkpoint's shape wins, and the resume says so;
    another batch_size is applied, and the resume says that it is no longer exact."""
    shutil.copytree(cached / "out", tmp_path / "out")
    shape = ("--n_layer=", "--n_head=", "--n_kv_head=", "--n_embd=", "--intermediate_size=",
             "--batch_size=")
    r = run_script("distill.py", f"--data_dir={cached / 'data'}", f"--teacher={model_dir}",
                   f"--out_dir={tmp_path / 'out'}", *[a for a in CACHED if not a.startswith(shape)],
                   "--batch_size=2", "--max_iters=22", "--lr_decay_iters=22", "--init_from=resume")
    assert r.returncode == 0, r.stderr
    ignored = next(line for line in r.stdout.splitlines() if "ignored" in line)
    assert "n_layer 12 (the checkpoint's 2)" in ignored
    assert "n_embd 512 (the checkpoint's 32)" in ignored
    inexact = next(line for line in r.stdout.splitlines() if "not exact" in line)
    assert "batch_size 4 -> 2" in inexact and "n_layer" not in inexact
    config = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == \
        (2, 32, 64)


@pytest.mark.parametrize("tokenizer", ["another vocabulary", "other ids"])
def test_resume_on_data_of_another_tokenizer_is_refused(tokenizer, cached, model_dir, tmp_path):
    """Data made with another tokenizer than the checkpoint's: refused in one line, before the
    teacher loads, whether the vocabularies differ in size or only in which ids the same text
    gets."""
    if tokenizer == "another vocabulary":
        tok = make_tokenizer(tmp_path / "tok", vocab_size=280)
    else:  # as many ids, other merges
        tok = make_tokenizer(tmp_path / "tok", texts=[t[::-1] for t in CORPUS] + CORPUS[:2])
    other = write_data(tmp_path / "data", tok, np.uint32)
    shutil.copytree(cached / "out", tmp_path / "out")
    before = snapshot(tmp_path / "out")
    r = run_script("distill.py", f"--data_dir={other}", f"--teacher={model_dir}",
                   f"--out_dir={tmp_path / 'out'}", *CACHED, "--init_from=resume")
    why = "another tokenizer (280 ids" if tokenizer == "another vocabulary" else \
        "encodes text into other ids"
    line = assert_one_line_error(r, "distill.py", why)
    assert "resume on the data it trained on" in line
    assert "loaded " not in r.stdout and snapshot(tmp_path / "out") == before
