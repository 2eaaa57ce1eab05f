"""distill.py when things go wrong, as they do for users: a phase interrupted (Ctrl-C, SIGTERM, kill -9), a file
damaged after a good run (cut, zeroed, swapped for another run's), a resume with other settings or data. Each must
end in a correct run or one clear line, with the earlier good files intact and no new empty folder."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import CORPUS, REPO, TINY, make_model_dir, make_tokenizer, read_log, run, write_data

SHORT = [*TINY, "--max_iters=8", "--lr_decay_iters=8", "--eval_interval=4"]
SLOW = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=256, head_dim=64, intermediate_size=1024)
BUILDING = r"^(building|an earlier build was interrupted: building again) the teacher cache .*: the teacher runs"
PRUNED = ["--n_layer=2", "--n_head=2", "--n_kv_head=1", "--n_embd=128", "--intermediate_size=256"]  # of SLOW


@pytest.fixture(scope="module")
def good(tmp_path_factory, data, model_dir, tokenizer_dir):
    """One finished run with a teacher cache, on a copy of the data whose meta.json has prepare.py's token counts.
    It is sent Ctrl-C after its last eval, as the checkpoint and the export are written: they finish."""
    d = tmp_path_factory.mktemp("good")
    shutil.copytree(data, d / "data")
    write_data(d / "other", tokenizer_dir, np.uint16, n_train=20_000, n_val=2_000)  # another prepare.py run's
    for folder in (d / "data", d / "other"):
        meta = json.loads((folder / "meta.json").read_text())
        for split in ("train", "val"):
            meta[f"{split}_tokens"] = os.path.getsize(folder / f"{split}.bin") // np.dtype(meta["dtype"]).itemsize
        (folder / "meta.json").write_text(json.dumps(meta))
    args = [f"--data_dir={d / 'data'}", f"--teacher={model_dir}", f"--out_dir={d / 'out'}",
            f"--teacher_cache={d / 'cache'}", *SHORT]
    rc, stdout, err = interrupt(args, "^eval 8:", signal.SIGINT)  # Ctrl-C as the export runs: it finishes
    assert rc == 0 and "exported the student at iter 8 (its last weights)" in stdout and not err, (rc, err)
    return d


@pytest.fixture(scope="module")
def slow_teacher(tmp_path_factory, tokenizer_dir):
    """A teacher slow enough on a CPU (seconds for the cache and the calibration; a step ~10x the 10 ms of
    test_second_ctrl_c_in_the_loop) that a signal sent on a line of progress lands mid-phase."""
    return make_model_dir(tmp_path_factory.mktemp("slow"), tokenizer_dir, **SLOW)


def start(args):  # distill.py as conftest.run starts it, without waiting
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    return subprocess.Popen([sys.executable, os.path.join(REPO, "distill.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=os.path.dirname(REPO))


def interrupt(args, when, sig):
    """distill.py, sent sig as soon as a line of its stdout matches the regex `when` -> (returncode, stdout,
    stderr)."""
    p = start(args)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if re.search(when, line):
            p.send_signal(sig)
            break
    out, err = p.communicate(timeout=300)
    assert re.search(when, seen[-1] if seen else ""), "".join(seen) + out + err
    return p.returncode, "".join(seen) + out, err


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def loads(ckpt_path):  # a whole checkpoint, as resume reads it
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    return ckpt["iter_num"]


# -----------------------------------------------------------------------------
# interrupted phases


def test_cache_build_interrupted_then_built_again(slow_teacher, data, tmp_path):
    """Ctrl-C in the cache build: one line, exit 130. kill -9: part files and no meta.json. Neither is taken as a
    cache; the same command then says it builds again and ends in a correct run."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = [f"--data_dir={data}", f"--teacher={slow_teacher}", f"--out_dir={out}", f"--teacher_cache={cache}",
            *SHORT, "--max_iters=2"]
    rc, stdout, err = interrupt(args, r"^teacher cache: \d", signal.SIGINT)  # the first progress line: mid-build
    assert re.search(BUILDING, stdout, re.M), stdout  # the phase's first line says what it does
    assert rc == 130 and "interrupted" in one_line(err), (rc, err)
    assert not (cache / "meta.json").exists() and not out.exists()
    rc, stdout, err = interrupt(args, r"^teacher cache: \d", signal.SIGKILL)
    assert rc == -signal.SIGKILL and not (cache / "meta.json").exists() and not out.exists()
    assert list(cache.glob("train.*.part0"))
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert "an earlier build was interrupted: building again" in r.stdout
    assert sorted(os.listdir(cache)) == ["meta.json", "train.entries.bin", "train.tokens.bin", "val.entries.bin",
                                         "val.tokens.bin"]
    sizes = json.loads((cache / "meta.json").read_text())["sizes"]
    assert sizes == {name: os.path.getsize(cache / name) for name in sizes} and len(sizes) == 4


def test_calibration_interrupted(slow_teacher, data, tmp_path):
    """init_from=prune, stopped while the teacher ranks its pieces, by SIGTERM as torchrun and schedulers send it
    (Ctrl-C takes the same way out: the cache test): one line, exit 130, and no out_dir at all, so the same command
    starts afresh."""
    out = tmp_path / "out"
    args = [f"--data_dir={data}", f"--teacher={slow_teacher}", f"--out_dir={out}", "--init_from=prune",
            "--prune_windows=460", *SHORT, *PRUNED]
    rc, stdout, err = interrupt(args, r"^calibration: \d", signal.SIGTERM)
    assert "pruning the student out of the teacher: the teacher runs over 460 windows" in stdout
    assert rc == 130 and "interrupted" in one_line(err), (rc, err)
    assert "pruned the student" not in stdout and not out.exists()


def test_training_and_export_killed_then_resumed(data, model_dir, tmp_path):
    """kill -9 after the checkpoint of iter 4: the checkpoint loads, and the same command says how to continue,
    in one line; a last log row cut short runs again. kill -9 again after the last eval, as the checkpoint and
    the export are written; the resume command then ends the run: each iteration logged once, the export the
    checkpoint's weights."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    args = [f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={out}", *SHORT]
    rc, stdout, err = interrupt(args, "^iter 4:", signal.SIGKILL)  # iter 4's eval and checkpoint come before
    assert rc == -signal.SIGKILL and loads(out / "ckpt.pt") == 4
    r = run(*args)
    assert r.returncode == 1 and "--init_from=resume" in one_line(r.stderr)
    with open(out / "log.jsonl", "a") as f:  # as if the kill had cut a row's write short
        f.write('{"iter": 5, "loss": 5.')
    rc, stdout, err = interrupt([*args, "--init_from=resume"], "^eval 8:", signal.SIGKILL)
    assert rc == -signal.SIGKILL and loads(out / "ckpt.pt") in (4, 8)
    r = run(*args, "--init_from=resume")
    assert r.returncode == 0 and "exported the student at iter 8" in r.stdout, r.stderr
    train, evals = read_log(out)
    assert [row["iter"] for row in train] == list(range(8)) and [row["iter"] for row in evals] == [0, 4, 8]
    assert loads(out / "ckpt.pt") == 8
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    hf = load_file(out / "hf" / "model.safetensors")
    assert torch.equal(hf["model.embed_tokens.weight"], ckpt["model"]["embed_tokens.weight"])


def test_second_ctrl_c_in_the_loop(slow_teacher, data, tmp_path):
    """The first Ctrl-C in the loop asks for a checkpoint after the step; a second, during that step, aborts in one
    line that says how to go on from the checkpoint there is (iter 0's). The student is pruned: that start names
    its size too, as a scratch start does."""
    out = tmp_path / "out"
    args = [f"--data_dir={data}", f"--teacher={slow_teacher}", f"--out_dir={out}", *SHORT, *PRUNED,
            "--batch_size=16", "--eval_iters=1", "--init_from=prune", "--prune_windows=16"]
    p = start(args)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith("iter 0:"):
            break
    pruned = next(line for line in seen if line.startswith("pruned the student"))
    assert re.search(r"; Transformer: [\d,]+ parameters$", pruned), pruned
    p.send_signal(signal.SIGINT)
    time.sleep(0.01)  # long enough for the first to be handled, and a step of the slow teacher takes ~10x that
    p.send_signal(signal.SIGINT)
    out_text, err = p.communicate(timeout=300)
    assert p.returncode == 130 and "stopped at" not in out_text, out_text
    assert f"continue from {out / 'ckpt.pt'} with --init_from=resume" in one_line(err)
    assert loads(out / "ckpt.pt") == 0


# -----------------------------------------------------------------------------
# files damaged after a good run: one line naming the file, before the teacher loads, nothing else touched


def cut(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 // 36 * 36)  # whole tokens of uint32 and of the cache's 9 bytes


def zero(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(bytes(size))


def swap(other):  # the file replaced by another run's (or another split's) of the same kind
    return lambda path, d: shutil.copyfile(other(d), path)


# file (relative to the good run's folder), damage -> what the one line must name
DAMAGE = {
    "train.bin zeroed": ("data/train.bin", zero, "train.bin"),
    "val.bin cut": ("data/val.bin", cut, "val.bin"),
    "meta.json swapped": ("data/meta.json", swap(lambda d: d / "other" / "meta.json"), "meta.json says 20,000"),
    "ckpt.pt zeroed": ("out/ckpt.pt", zero, "ckpt.pt is damaged"),
    "train.tokens.bin zeroed": ("cache/train.tokens.bin", zero, "train.tokens.bin"),
    "val.entries.bin swapped": ("cache/val.entries.bin", swap(lambda d: d / "cache" / "train.entries.bin"),
                                "val.entries.bin"),
    "cache meta.json zeroed": ("cache/meta.json", zero, "cache/meta.json"),
    "log.jsonl zeroed": ("out/log.jsonl", zero, "log.jsonl is damaged at line 1"),
}


def snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_file(case, good, model_dir, tmp_path):
    """A resume after the good run, one of its files damaged: exit 1, one line naming the file, no teacher loaded
    (the ckpt.pt and data cases run without the cache, where the teacher would load), nothing else changed."""
    name, damage, named = DAMAGE[case]
    for part in ("data", "out", "cache", "other"):
        shutil.copytree(good / part, tmp_path / part)
    damage(tmp_path / name, *([tmp_path] if damage not in (cut, zero) else []))
    before = snapshot(tmp_path)
    cache = [f"--teacher_cache={tmp_path / 'cache'}"] if name.startswith("cache/") else []
    r = run(f"--data_dir={tmp_path / 'data'}", f"--teacher={model_dir}", f"--out_dir={tmp_path / 'out'}", *SHORT,
            "--init_from=resume", *cache)
    assert r.returncode == 1 and named in one_line(r.stderr), r.stderr
    assert "loaded " not in r.stdout, r.stdout  # the teacher's "loaded DIR: N parameters" line
    assert snapshot(tmp_path) == before


def test_damaged_teacher(slow_teacher, model_dir, data, tmp_path):
    """The teacher's model.safetensors swapped for another model's: one line naming the teacher, and no out_dir
    left behind (cut: test_distill.py's test_clear_errors)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(model_dir, teacher)
    shutil.copyfile(os.path.join(slow_teacher, "model.safetensors"), teacher / "model.safetensors")
    r = run(f"--data_dir={data}", f"--teacher={teacher}", f"--out_dir={tmp_path / 'out'}", *SHORT)
    line = one_line(r.stderr)
    assert r.returncode == 1 and "cannot load the teacher" in line and str(teacher) in line, r.stderr
    assert not (tmp_path / "out").exists()


def test_failed_run_leaves_no_out_dir(tmp_path):
    """Missing data: one line, and neither out_dir nor a folder above it made (a bad teacher: above)."""
    r = run(f"--data_dir={tmp_path / 'missing'}", f"--out_dir={tmp_path / 'a' / 'out'}", *SHORT)
    assert r.returncode == 1 and "run prepare.py first" in one_line(r.stderr)
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# resume with other settings or other data


def test_resume_says_what_it_ignores_and_what_is_not_exact(good, data, model_dir, tmp_path):
    """Without the original shape flags the checkpoint's shape wins, and the resume says so; another batch_size is
    applied, and the resume says that it is no longer exact."""
    shutil.copytree(good / "out", tmp_path / "out")
    shape = ("--n_layer=", "--n_head=", "--n_kv_head=", "--n_embd=", "--intermediate_size=", "--batch_size=")
    r = run(f"--data_dir={good / 'data'}", f"--teacher={model_dir}", f"--out_dir={tmp_path / 'out'}",
            *[a for a in SHORT if not a.startswith(shape)], "--batch_size=2", "--max_iters=10",
            "--lr_decay_iters=10", "--init_from=resume")
    assert r.returncode == 0, r.stderr
    ignored = next(line for line in r.stdout.splitlines() if "ignored" in line)
    assert "n_layer 12 (the checkpoint's 2)" in ignored and "n_embd 512 (the checkpoint's 32)" in ignored
    inexact = next(line for line in r.stdout.splitlines() if "not exact" in line)
    assert "batch_size 4 -> 2" in inexact and "n_layer" not in inexact
    config = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (2, 32, 64)


@pytest.mark.parametrize("tokenizer", ["another vocabulary", "other ids"])
def test_resume_on_data_of_another_tokenizer_is_refused(tokenizer, good, model_dir, tmp_path):
    """Data made with another tokenizer than the checkpoint's: refused in one line, before the teacher loads,
    whether the vocabularies differ in size or only in which ids the same text gets."""
    if tokenizer == "another vocabulary":
        tok = make_tokenizer(tmp_path / "tok", vocab_size=280)
    else:  # as many ids, other merges
        tok = make_tokenizer(tmp_path / "tok", texts=[t[::-1] for t in CORPUS] + CORPUS[:2])
    other = write_data(tmp_path / "data", tok, np.uint32)
    shutil.copytree(good / "out", tmp_path / "out")
    before = snapshot(tmp_path / "out")
    r = run(f"--data_dir={other}", f"--teacher={model_dir}", f"--out_dir={tmp_path / 'out'}", *SHORT,
            "--init_from=resume")
    line = one_line(r.stderr)
    why = "another tokenizer (280 ids" if tokenizer == "another vocabulary" else "encodes text into other ids"
    assert r.returncode == 1 and why in line and "resume on the data it trained on" in line, r.stderr
    assert "loaded " not in r.stdout and snapshot(tmp_path / "out") == before
