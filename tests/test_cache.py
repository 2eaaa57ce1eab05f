"""The sampled teacher cache (cache.py): an unbiased estimator of forward KD, a faithful round trip,
refusals of a cache built otherwise, interrupted builds never taken as complete, exact resume and
two processes."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from cache import TOKEN, window_entries
from conftest import CACHED, assert_one_line_error, read_log, run_script, untimed
from loss import distill_loss

TAU = 2.0


def dense_grad(z_s, z_t, tau=TAU):  # d(tau^2 KL(p_t || p_s)) / dz_s, the full forward-KL gradient
    return tau * (torch.softmax(z_s / tau, -1) - torch.softmax(z_t / tau, -1))


def sparse_loss(z_s, ids, t_hat, entropy, argmax, y=None, alpha=1.0):
    """distill_loss on logits: identity hidden states and head, so dL/dh_s = dL/dz_s."""
    V = z_s.shape[-1]
    h = z_s.detach().clone().requires_grad_()
    y = torch.zeros(z_s.shape[:-1], dtype=torch.long) if y is None else y
    loss, s = distill_loss(h, torch.eye(V), None, None, y, alpha=alpha, temperature=TAU,
                           sparse=dict(ids=ids, t_hat=t_hat, entropy=entropy, argmax=argmax))
    loss.backward()
    return loss, s, h.grad


def draws(p, n, generator):
    """The cache's estimator: distinct ids of n draws and their frequencies, zero-padded."""
    ids = torch.multinomial(p.reshape(-1, p.shape[-1]), n, replacement=True, generator=generator)
    t_hat = torch.zeros(ids.shape)
    for r in range(len(ids)):
        u, c = ids[r].unique(return_counts=True)
        ids[r, :len(u)], ids[r, len(u):] = u, 0
        t_hat[r, :len(u)] = c / n
    return ids.view(*p.shape[:-1], n), t_hat.view(*p.shape[:-1], n)


def test_estimator_is_unbiased():
    """The gradient from t_hat, averaged over many draws, approaches the full forward-KL gradient:
    the deviation of the mean shrinks like 1/sqrt(draws) (checked at 6 standard errors)."""
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(2, 3, 40, generator=g), torch.randn(2, 3, 40, generator=g) * 2
    p_t = torch.softmax(z_t / TAU, -1)
    entropy = -(p_t * p_t.log()).sum(-1)
    grads = []
    for _ in range(400):
        ids, t_hat = draws(p_t, 50, g)
        grad = sparse_loss(z_s, ids, t_hat, entropy, z_t.argmax(-1))[2]
        grads.append(grad * 6)  # distill_loss divides by 6 tokens
    grads = torch.stack(grads)
    err = (grads.mean(0) - dense_grad(z_s, z_t)).abs()
    assert (err <= 6 * grads.std(0) / 20 + 1e-6).all(), err.max()


def test_one_hot_teacher_is_exact():
    """A teacher sure of one id: every draw is that id, t_hat is p_t, and loss, KL and gradient are
    full KD's."""
    g = torch.Generator().manual_seed(1)
    z_s = torch.randn(2, 5, 30, generator=g)
    hot = torch.randint(0, 30, (2, 5), generator=g)
    z_t = torch.full((2, 5, 30), -1e4).scatter_(-1, hot[..., None], 0.0)
    ids, t_hat = hot[..., None], torch.ones(2, 5, 1)
    loss, s, grad = sparse_loss(z_s, ids, t_hat, torch.zeros(2, 5), hot)
    h = z_s.clone().requires_grad_()
    dense, ds = distill_loss(h, torch.eye(30), z_t, torch.eye(30),
                             torch.zeros(2, 5, dtype=torch.long), alpha=1.0, temperature=TAU)
    dense.backward()
    torch.testing.assert_close(loss, dense)
    torch.testing.assert_close(s["kl"], ds["kl"])
    torch.testing.assert_close(grad, h.grad)


def test_ignored_tokens_contribute_nothing():
    g = torch.Generator().manual_seed(2)
    z_s, z_t = torch.randn(1, 6, 20, generator=g), torch.randn(1, 6, 20, generator=g)
    p_t = torch.softmax(z_t / TAU, -1)
    ids, t_hat = draws(p_t, 50, g)
    y = torch.zeros(1, 6, dtype=torch.long)
    y[0, 2:4] = -100
    args = (-(p_t * p_t.log()).sum(-1), z_t.argmax(-1))
    loss, s, grad = sparse_loss(z_s, ids, t_hat, *args, y=y, alpha=0.5)
    keep = [0, 1, 4, 5]
    loss2, s2, grad2 = sparse_loss(z_s[:, keep], ids[:, keep], t_hat[:, keep],
                                   *(a[:, keep] for a in args), y=y[:, keep], alpha=0.5)
    torch.testing.assert_close(loss, loss2)
    assert grad[0, 2:4].abs().sum() == 0
    torch.testing.assert_close(grad[:, keep], grad2)


def test_window_entries_round_trip():
    """What the cache stores per token equals what the teacher gives directly: entropy at the
    temperature, argmax, CE on the label (float16's precision), counts that add up to the draws, ids
    only of the tokenizer's (the padding rows never drawn), each token's draws reproducible from its
    seed."""
    torch.manual_seed(3)
    # 90 ids, 96 rows: 6 padding rows made the likeliest (a sampler that saw them would draw them)
    vocab = 90
    w = torch.randn(96, 16)
    w[vocab:] *= 0
    h, y = torch.randn(40, 16) * 3, torch.randint(0, vocab, (40,))
    h[:, 0] = 50.0
    w[vocab:, 0] = 10.0
    g = torch.Generator().manual_seed(7)
    entries, tokens = window_entries(h, w, y, vocab, TAU, 50, 0, g, chunk=16)
    z = (h @ w[:vocab].T).double()
    p = torch.softmax(z / TAU, -1)
    entropy = torch.from_numpy(tokens["entropy"].astype(np.float64))
    torch.testing.assert_close(entropy, -(p * p.log()).sum(-1), rtol=1e-3, atol=1e-3)
    assert (tokens["argmax"] == z.argmax(-1).numpy()).all()
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    ce_got = torch.from_numpy(tokens["ce"].astype(np.float64))
    torch.testing.assert_close(ce_got, ce, rtol=1e-3, atol=1e-3)
    ids, counts = entries & 0xFFFFFF, entries >> 24
    assert (ids < vocab).all() and len(entries) == tokens["n"].sum()
    starts = np.concatenate([[0], np.cumsum(tokens["n"], dtype=np.int64)[:-1]])
    assert (np.add.reduceat(counts, starts) == 50).all()
    again, _ = window_entries(h, w, y, vocab, TAU, 50, 0, g.manual_seed(7), chunk=16)
    assert (again == entries).all()
    topk, tok_k = window_entries(h, w, y, vocab, TAU, 50, 5, g, chunk=16)
    assert (tok_k["n"] <= 5).all() and ((topk & 0xFFFFFF).reshape(-1) < vocab).all()


# -----------------------------------------------------------------------------
# through distill.py: conftest's cached run


@pytest.mark.slow
def test_trains_from_the_cache_without_the_teacher(cached, model_dir, tmp_path):
    """A second run reuses the cache and never loads the teacher: it would fail if it did (the
    teacher is gone)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(model_dir, teacher)
    meta = json.loads((cached / "cache" / "meta.json").read_text())
    cache = tmp_path / "cache"
    shutil.copytree(cached / "cache", cache)
    (cache / "meta.json").write_text(json.dumps(dict(meta, teacher=str(teacher))))
    shutil.rmtree(teacher)
    r = run_script("distill.py", f"--data_dir={cached / 'data'}", f"--teacher={teacher}",
                   f"--out_dir={tmp_path / 'out'}", f"--teacher_cache={cache}", *CACHED)
    assert r.returncode == 0, r.stderr
    assert "built the teacher cache" not in r.stdout
    a, b = read_log(cached / "out"), read_log(tmp_path / "out")
    assert untimed(a[0]) == untimed(b[0]) and untimed(a[1]) == untimed(b[1])  # to the bit
    first = b[1][0]
    assert b[0][0]["kl"] > 0 and all(row["kl"] is not None for row in b[0])  # logged estimates
    assert first["kl_estimated"] and first["teacher_val_ce"] > 0
    assert b[1][-1]["val_kl"] < first["val_kl"]


@pytest.mark.slow
def test_resume_from_the_cache_is_exact(cached, model_dir, tmp_path):
    args = [f"--data_dir={cached / 'data'}", f"--teacher={model_dir}", f"--out_dir={tmp_path}",
            f"--teacher_cache={cached / 'cache'}", *CACHED]
    assert run_script("distill.py", *args, "--max_iters=10").returncode == 0
    r = run_script("distill.py", *args, "--init_from=resume")
    assert r.returncode == 0, r.stderr
    for resumed, straight in zip(read_log(tmp_path), read_log(cached / "out")):
        assert untimed(resumed, "teacher_val_ce", "kl_estimated") == \
            untimed(straight, "teacher_val_ce", "kl_estimated")


@pytest.mark.slow
def test_two_processes_build_the_same_cache_and_read_disjoint_windows(cached, data, model_dir,
                                                                       tmp_path):
    """Two processes each build a contiguous share of the windows (every window with its own
    seed): joined, the same bytes as one process's. Training, they read disjoint windows, as from
    train.bin: the eval all-reduced over both equals one process's."""
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={model_dir}",
                   f"--out_dir={tmp_path / 'out'}", f"--teacher_cache={tmp_path / 'cache'}",
                   *CACHED, ddp=True)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("train.entries.bin", "train.tokens.bin", "val.entries.bin", "val.tokens.bin"):
        assert (tmp_path / "cache" / name).read_bytes() == \
            (cached / "cache" / name).read_bytes(), name
    assert not list((tmp_path / "cache").glob("*.part*"))
    one, two = read_log(cached / "out")[1][0], read_log(tmp_path / "out")[1][0]
    for k in ("val_ce", "val_kl", "val_top1", "teacher_val_ce"):
        assert two[k] == pytest.approx(one[k], abs=1e-5), k


@pytest.mark.slow
def test_refused_or_rebuilt(cached, data, model_dir, tmp_path):
    """A cache of other settings or other data is refused in one line; an interrupted build (no
    meta.json) is not taken as complete: the next run builds it again."""
    def args(data_dir, cache, out="o"):
        return [f"--data_dir={data_dir}", f"--teacher={model_dir}", f"--out_dir={tmp_path / out}",
                f"--teacher_cache={cache}", *CACHED]

    for extra, message in ((["--temperature=1.0"], "temperature 2.0 (now 1.0)"),
                           (["--cache_samples=20"], "cache_samples 50 (now 20)"),
                           (["--kd_kind=jsd"], "reverse_kl and jsd need the whole teacher")):
        r = run_script("distill.py", *args(data, cached / "cache"), *extra)
        assert_one_line_error(r, "distill.py", message)
    other = tmp_path / "data"
    shutil.copytree(data, other)
    with open(other / "val.bin", "r+b") as f:
        f.write(b"\1\0\0\0")  # one token changed
    r = run_script("distill.py", *args(other, cached / "cache"), fresh=True)
    assert_one_line_error(r, "distill.py", "built with other settings or data: val")
    half = tmp_path / "half"  # as a kill leaves it: entries written, no meta.json
    shutil.copytree(cached / "cache", half)
    (half / "meta.json").unlink()
    with open(half / "train.entries.bin", "r+b") as f:
        f.truncate(1000)
    r = run_script("distill.py", *args(data, half, out="o2"))
    assert r.returncode == 0 and "built the teacher cache" in r.stdout, r.stderr
    assert (half / "train.entries.bin").read_bytes() == \
        (cached / "cache" / "train.entries.bin").read_bytes()


@pytest.mark.slow
def test_size(cached):
    """The layout's size: 4 bytes per kept id, 9 per token."""
    tokens = np.fromfile(cached / "cache" / "train.tokens.bin", dtype=TOKEN)
    assert TOKEN.itemsize == 9
    size = os.path.getsize(cached / "cache" / "train.entries.bin")
    assert size == 4 * int(tokens["n"].sum()) and 1 <= tokens["n"].max() <= 50
