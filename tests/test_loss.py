"""Tests of the fused distillation loss against a plain full-logits float64 reference.

Tolerances: the fused loss runs in float32, so values and gradients are checked at rtol 1e-5
against float64. Gradient entries are sums over V (grad_h) or over tokens (grad_w) of terms of
either sign; an entry that cancels to ~0 keeps an absolute float32 rounding error of ~1e-7 times
the size of its terms, so it cannot be relatively accurate: atol = 1e-6 * max|grad| covers those.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import loss
from loss import distill_loss, reference_loss

B, T, V, D_S, D_T = 3, 11, 157, 16, 24  # B*T = 33 tokens, V not a multiple of anything


def make_inputs(seed=0, vocab=V - 20, n_ignore=5, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, T, D_S, generator=g) * scale
    w_s = torch.randn(V, D_S, generator=g) * 0.5
    h_t = torch.randn(B, T, D_T, generator=g) * scale
    w_t = torch.randn(V, D_T, generator=g) * 0.5
    targets = torch.randint(0, vocab, (B, T), generator=g)
    targets.view(-1)[torch.randperm(B * T, generator=g)[:n_ignore]] = -100
    return [x.to(dtype) for x in (h_s, w_s, h_t, w_t)] + [targets]


def reference(h_s, w_s, h_t, w_t, targets, **kw):
    """loss.reference_loss in float64. Returns loss, stats dict, grad_h_s, grad_w_s."""
    hs = h_s.detach().double().requires_grad_()
    ws = w_s.detach().double().requires_grad_()
    if "vocab_size" not in kw or kw["vocab_size"] is None:
        kw["vocab_size"] = V
    assert (targets[targets != -100] < kw["vocab_size"]).all()
    h_t, w_t = (None, None) if h_t is None else (h_t.double(), w_t.double())
    loss, stats = reference_loss(hs, ws, h_t, w_t, targets, **kw)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, hs.grad, ws.grad


def fused(h_s, w_s, h_t, w_t, targets, **kw):
    h_s = h_s.detach().clone().requires_grad_()
    w_s = w_s.detach().clone().requires_grad_()
    loss, stats = distill_loss(h_s, w_s, h_t, w_t, targets, **kw)
    loss.backward()
    return loss.detach(), stats, h_s.grad, w_s.grad


def close(actual, expected, rtol=1e-5, atol_frac=1e-6):
    atol = atol_frac * expected.abs().max().item() if expected.numel() > 1 else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def check_against_reference(inputs, rtol=1e-5, **kw):
    val, s, gh, gw = fused(*inputs, **kw)
    kw.pop("chunk_size", None), kw.pop("compile", None)
    rl, rs, rgh, rgw = reference(*inputs, **kw)
    assert val.dtype == torch.float32 and all(v.dtype == torch.float32 for v in s.values())
    assert all(v.dim() == 0 and not v.requires_grad for v in s.values())
    assert s.keys() == rs.keys()
    close(val, rl, rtol)
    for k in rs:
        close(s[k], rs[k], rtol)
    close(gh, rgh, rtol)
    close(gw, rgw, rtol)
    return s, gw


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_matches_reference(kind, temperature, alpha):
    vocab = V - 20  # the last 20 rows are padding: excluded from softmaxes, no gradient
    s, gw = check_against_reference(make_inputs(), alpha=alpha, temperature=temperature,
                                    vocab_size=vocab, kind=kind, chunk_size=8)
    assert torch.all(gw[vocab:] == 0)
    if kind == "forward_kl":
        assert torch.equal(s["div"], s["kl"])


@pytest.mark.parametrize("beta", [0.1, 0.9])
def test_jsd_beta(beta):
    s, _ = check_against_reference(make_inputs(1), kind="jsd", beta=beta, vocab_size=None)
    binary_entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert 0 < s["div"].item() <= binary_entropy


def test_vocab_none_uses_all_rows():
    check_against_reference(make_inputs(2, vocab=V), vocab_size=None, chunk_size=5)


@pytest.mark.parametrize("chunk_size", [1, 7, 28, 100])  # 28 valid tokens
def test_chunk_size_does_not_matter(chunk_size):
    base = fused(*make_inputs(3), chunk_size=4)
    other = fused(*make_inputs(3), chunk_size=chunk_size)
    for a, b in zip(base[:1] + base[2:], other[:1] + other[2:]):
        close(a, b)
    for k in base[1]:
        close(base[1][k], other[1][k])


def test_gradient_accumulation():
    """Two micro-batches with normalizer = the step's token count add up to one big call."""
    h_s, w_s, h_t, w_t, y = make_inputs(5)
    y[0, :4] = -100  # unequal valid counts in the two halves
    total = (y != -100).sum()
    parts = [fused(h_s[sl], w_s, h_t[sl], w_t, y[sl], normalizer=norm)
             for sl, norm in [(slice(0, 1), total), (slice(1, B), int(total))]]  # tensor, int
    whole = fused(h_s, w_s, h_t, w_t, y)
    close(parts[0][0] + parts[1][0], whole[0])
    close(torch.cat([parts[0][2], parts[1][2]]), whole[2])
    close(parts[0][3] + parts[1][3], whole[3])
    for k in ("ce", "kl", "div", "top1"):
        close(parts[0][1][k] + parts[1][1][k], whole[1][k])
    assert parts[0][1]["n"] + parts[1][1]["n"] == total


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    """Half inputs. The student's side is computed in float32 and its gradients come back in its
    dtype. The teacher's head multiplies in its own dtype, as a float16 teacher's does on a GPU
    (there with a float32 result; on a CPU the product is rounded): the loss, stats and gradients
    match the float64 reference to the half dtype's precision."""
    inputs = make_inputs(6, dtype=dtype)
    val, s, gh, gw = fused(*inputs, vocab_size=V - 20)
    rl, rs, rgh, rgw = reference(*inputs, vocab_size=V - 20)
    assert gh.dtype == dtype and gw.dtype == dtype and val.dtype == torch.float32
    tol = 2 * torch.finfo(dtype).eps
    close(val, rl, rtol=tol)
    for k in rs:
        close(s[k], rs[k], rtol=tol, atol_frac=tol)
    close(gh, rgh, rtol=tol, atol_frac=tol)
    close(gw, rgw, rtol=tol, atol_frac=tol)
    # CE only, without gradients (how distill.py takes a half teacher's own CE): its head is never
    # cast whole
    with torch.no_grad():
        _, s = distill_loss(inputs[2], inputs[3], None, None, inputs[4], alpha=0.0,
                            vocab_size=V - 20)
    zt = (inputs[2].double() @ inputs[3].double()[:V - 20].T)[inputs[4] != -100]
    close(s["ce"], F.cross_entropy(zt, inputs[4][inputs[4] != -100]), rtol=tol)


def test_ce_only_matches_cross_entropy():
    h_s, w_s, _, _, y = make_inputs(7)
    val, s, gh, gw = fused(h_s, w_s, None, None, y, alpha=0.0, vocab_size=V - 20, chunk_size=6)
    # the same keys in every mode: 0 without a teacher
    assert set(s) == {"ce", "kl", "div", "top1", "n"}
    assert s["kl"] == 0 and s["div"] == 0 and s["top1"] == 0
    hs, ws = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    ref = F.cross_entropy((hs @ ws[:V - 20].T).view(-1, V - 20), y.view(-1), ignore_index=-100)
    ref.backward()
    close(val, ref.detach())
    close(s["ce"], ref.detach())
    close(gh, hs.grad)
    close(gw, ws.grad)
    assert torch.all(gw[V - 20:] == 0)
    with pytest.raises(ValueError):
        distill_loss(h_s, w_s, None, None, y, alpha=0.5)


def test_no_valid_tokens():
    h_s, w_s, h_t, w_t, y = make_inputs(8)
    y[:] = -100
    for norm in (None, 0, torch.tensor(0.0)):
        val, s, gh, gw = fused(h_s, w_s, h_t, w_t, y, normalizer=norm)
        assert val.item() == 0 and gh.abs().sum() == 0 and gw.abs().sum() == 0
        assert all(torch.isfinite(v) for v in s.values()) and s["n"] == 0


def test_grad_output_scaling_and_no_grad():
    inputs = make_inputs(9)
    h_s = inputs[0].clone().requires_grad_()
    loss, _ = distill_loss(h_s, *inputs[1:])
    (3 * loss + h_s.sum()).backward()  # the loss inside a larger graph
    _, _, gh, _ = fused(*inputs)
    close(h_s.grad, 3 * gh + 1)
    with torch.no_grad():
        l2, _ = distill_loss(inputs[0].requires_grad_(), *inputs[1:])
    assert not l2.requires_grad
    close(l2, loss.detach())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_large_logits_stay_finite(temperature):
    # logits of +-hundreds: probabilities underflow to 0; log-space math keeps everything finite
    inputs = make_inputs(10, scale=100.0)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        val, s, gh, gw = fused(*inputs, kind=kind, temperature=temperature)
        assert torch.isfinite(val) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    # and the default still matches (CE is taken as log_softmax(T * log p_s) when T != 1)
    val, s, gh, gw = fused(*inputs, temperature=temperature)
    rl, rs, rgh, rgw = reference(*inputs, temperature=temperature)
    close(val, rl)
    for k in rs:
        close(s[k], rs[k])
    for g, rg in ((gh, rgh), (gw, rgw)):  # float32 rounding of tiny entries: compare to the largest
        assert (g.double() - rg).abs().max() <= 1e-4 * rg.abs().max()


def test_bad_arguments():
    inputs = make_inputs(11)
    for kw in (dict(temperature=0.0), dict(alpha=1.5), dict(kind="kl"),
               dict(kind="jsd", beta=0.0), dict(normalizer=-1)):
        with pytest.raises(ValueError):
            distill_loss(*inputs, **kw)


def total_variation(log_ps, log_pt, beta):  # a divergence by its value alone: 1/2 sum |p_s - p_t|
    return 0.5 * (log_ps.exp() - log_pt.exp()).abs().sum(-1)


def alpha_divergence(log_ps, log_pt, beta):  # Amari's, alpha = beta, also by its value alone
    return (1 - torch.exp(beta * log_pt + (1 - beta) * log_ps).sum(-1)) / (beta * (1 - beta))


@pytest.mark.parametrize("name, fn", [("tv", total_variation), ("alpha_div", alpha_divergence)])
def test_new_divergence_by_its_value_alone(name, fn, monkeypatch):
    """A divergence added to the table by its value alone: distill_loss takes its gradient from
    autograd per chunk, and its loss and gradients match autograd through the full-logits
    reference."""
    monkeypatch.setitem(loss.DIVERGENCES, name, fn)
    assert name in loss.KD_KINDS  # distill.py's kd_kind check reads the table
    for alpha, temperature in ((0.5, 2.0), (1.0, 0.7)):
        s, _ = check_against_reference(make_inputs(12), kind=name, alpha=alpha,
                                       temperature=temperature, beta=0.3, vocab_size=V - 20,
                                       chunk_size=8)
        assert s["div"] > 0 and not torch.equal(s["div"], s["kl"])
    # and it trains: a few steps of plain gradient descent on the student's head lower the
    # divergence
    h_s, w_s, h_t, w_t, y = make_inputs(13)
    w_s = w_s.clone().requires_grad_()
    first = None
    for _ in range(20):
        val, st = distill_loss(h_s, w_s, h_t, w_t, y, alpha=1.0, kind=name, beta=0.3, chunk_size=8)
        first = st["div"].item() if first is None else first
        w_s.grad = None
        val.backward()
        with torch.no_grad():
            w_s -= 5.0 * w_s.grad
    assert st["div"].item() < 0.9 * first


def test_stats_have_the_same_keys_in_every_mode():
    h_s, w_s, h_t, w_t, y = make_inputs(14)
    sparse = dict(ids=torch.zeros(B, T, 1, dtype=torch.long), t_hat=torch.ones(B, T, 1),
                  entropy=torch.zeros(B, T), argmax=torch.zeros(B, T, dtype=torch.long))
    for args, kw in (((h_t, w_t), {}), ((None, None), dict(alpha=0.0)),
                     ((None, None), dict(sparse=sparse))):
        _, s = distill_loss(h_s, w_s, *args, y, **kw)
        assert list(s) == ["ce", "kl", "div", "top1", "n"]


def test_reference_loss_is_the_textbook_loss():
    """The oracle itself, against the formulas written out with torch.nn.functional."""
    h_s, w_s, h_t, w_t, y = [x.double() if x.is_floating_point() else x for x in make_inputs(15)]
    m = y != -100
    z_s, z_t = (h_s @ w_s.T)[m], (h_t @ w_t.T)[m]
    val, s = reference_loss(h_s, w_s, h_t, w_t, y, alpha=0.3, temperature=2.0)
    kl = F.kl_div(F.log_softmax(z_s / 2, -1), F.log_softmax(z_t / 2, -1), log_target=True,
                  reduction="sum") / m.sum()
    ce = F.cross_entropy(z_s, y[m])
    close(s["kl"], kl)
    close(s["ce"], ce)
    close(val, 0.3 * 4 * kl + 0.7 * ce)
    p_s, p_t = F.softmax(z_s / 2, -1), F.softmax(z_t / 2, -1)
    mix = (p_s + p_t) / 2
    jsd = (0.5 * (p_t * (p_t / mix).log()).sum() + 0.5 * (p_s * (p_s / mix).log()).sum()) / m.sum()
    close(reference_loss(h_s, w_s, h_t, w_t, y, kind="jsd")[1]["div"], jsd)
    close(reference_loss(h_s, w_s, h_t, w_t, y, kind="reverse_kl")[1]["div"],
          (p_s * (p_s.log() - p_t.log())).sum() / m.sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_in_the_autocast_dtype(dtype):
    """Under autocast the student's head products run in that dtype: the loss and gradients stay
    within that dtype's rounding of the float32 path (float16's gradient scaled clear of its
    underflow)."""
    inputs = make_inputs(16)
    l32, s32, gh32, gw32 = fused(*inputs, vocab_size=V - 20, chunk_size=8)
    with torch.autocast("cpu", dtype=dtype):
        l16, s16, gh16, gw16 = fused(*inputs, vocab_size=V - 20, chunk_size=8)
    assert l16.dtype == gh16.dtype == gw16.dtype == torch.float32
    assert not torch.equal(gw16, gw32)  # the products did change dtype
    eps = torch.finfo(dtype).eps
    assert abs(l16 - l32) <= 4 * eps * l32
    for g, g32 in ((gh16, gh32), (gw16, gw32)):
        assert F.cosine_similarity(g.flatten(), g32.flatten(), 0) > 1 - 4 * eps
    # float16 without a bound on G keeps the backward products in float32
    for kind in ("reverse_kl", "jsd"):
        ref = fused(*inputs, kind=kind, chunk_size=8)
        with torch.autocast("cpu", dtype=dtype):
            got = fused(*inputs, kind=kind, chunk_size=8)
        assert abs(got[0] - ref[0]) <= 4 * eps * ref[0]
        assert F.cosine_similarity(got[3].flatten(), ref[3].flatten(), 0) > 1 - 4 * eps


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_top1_with_a_teacher_near_the_student(kind):
    """Random teachers never agree with the student (top1 = 0 above): a teacher close to the student
    does."""
    h_s, w_s, _, _, y = make_inputs(17)
    h_t = h_s + 0.3 * torch.randn(h_s.shape, generator=torch.Generator().manual_seed(0))
    s, _ = check_against_reference([h_s, w_s, h_t, w_s.clone(), y], kind=kind, chunk_size=8)
    assert 0.5 < s["top1"] < 1


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["forward_kl", "jsd", "sparse"])  # each a compile (~10 s)
def test_compiled_chunk_matches_reference(mode, fresh_compile):
    """compile=True: the chunk's elementwise work through torch.compile (inductor's C++ on a CPU)
    gives the reference's values and gradients, as the eager chunk does (CE alone is the same code
    without a teacher). 33 tokens in chunks of 11: one graph."""
    h_s, w_s, h_t, w_t, y = make_inputs(18)
    if mode == "sparse":
        g = torch.Generator().manual_seed(1)
        t_hat = torch.rand(B, T, 4, generator=g)
        sparse = dict(ids=torch.randint(0, V - 20, (B, T, 4), generator=g),
                      t_hat=t_hat / t_hat.sum(-1, keepdim=True),
                      entropy=torch.rand(B, T, generator=g),
                      argmax=torch.randint(0, V - 20, (B, T), generator=g))
        check_against_reference([h_s, w_s, None, None, y], sparse=sparse, chunk_size=11,
                                compile=True)
    else:
        check_against_reference([h_s, w_s, h_t, w_t, y], kind=mode, alpha=0.3, chunk_size=11,
                                compile=True)
    assert loss._compiled["terms"] is not None  # it did compile, and did not fall back


@pytest.mark.slow
def test_compiled_chunk_in_half_precision(fresh_compile):
    """Under autocast the compiled chunk hands the backward products its gradient in the half dtype,
    float16's scaled as the eager chunk's: the same loss, and gradients within rounding of the eager
    path's. float16 only (bfloat16 takes the same path without the scale)."""
    inputs = make_inputs(19)
    for dtype in (torch.float16,):
        with torch.autocast("cpu", dtype=dtype):
            eager = fused(*inputs, chunk_size=11)
            got = fused(*inputs, chunk_size=11, compile=True)
        eps = torch.finfo(dtype).eps
        assert abs(got[0] - eager[0]) <= 4 * eps * eager[0]
        for g, ref in zip(got[2:], eager[2:]):
            assert F.cosine_similarity(g.flatten(), ref.flatten(), 0) > 1 - 4 * eps
    assert loss._compiled["terms"] is not None


def test_compile_failure_falls_back_to_eager(fresh_compile, monkeypatch):
    """A compile that fails (no C++ compiler, no Triton for the GPU) is one warning; the loss goes
    on eager, the same values, and later calls do not try again."""
    calls = []

    def broken_compile(fn, **kw):
        def run(*args):
            calls.append(1)
            raise RuntimeError("Cannot find a working triton installation\nmore lines")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    inputs = make_inputs(20)
    with pytest.warns(UserWarning, match="torch.compile failed .*triton.*the eager loss instead"):
        got = fused(*inputs, chunk_size=11, compile=True)
    for a, b in zip(got, fused(*inputs, chunk_size=11)):
        if torch.is_tensor(a):
            assert torch.equal(a, b)
    fused(*inputs, chunk_size=11, compile=True)
    assert len(calls) == 1 and loss._compiled["terms"] is None


SYNCING = {"nonzero", "_local_scalar_dense", "masked_select", "unique", "_unique2",
           "unique_consecutive"}


@pytest.mark.parametrize("kw", [dict(), dict(kind="jsd"), dict(alpha=0.0, h_t=None, w_t=None)])
def test_no_op_the_host_waits_for(kw):
    """distill_loss, forward and backward, with ignored tokens among the targets, runs no op whose
    output size or value the host must read (nonzero, .item(), masked_select, unique): on a GPU each
    is a wait for the device, per call. Ops counted by a dispatch mode here; the GPU suite checks it
    with CUDA's sync debug mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func._schema.name.split("::")[-1].rstrip("_"))
            return func(*args, **(kwargs or {}))

    h_s, w_s, h_t, w_t, y = make_inputs(18)
    args = dict(h_t=h_t, w_t=w_t) | kw
    h_s, w_s = h_s.requires_grad_(), w_s.requires_grad_()
    with Ops() as ops:
        loss, stats = distill_loss(h_s, w_s, args.pop("h_t"), args.pop("w_t"), y, chunk_size=8,
                                   **args)
        loss.backward()
    assert "mm" in ops.seen and not ops.seen & SYNCING, ops.seen & SYNCING
