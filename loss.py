"""
The distillation loss. First the plain reference loss, full logits: the definition, what everything
below must equal (tests/test_loss.py and bench/ compare against it). Then the fused loss, which
applies the student's and the teacher's heads a chunk of tokens at a time, so that no [B, T, V]
logits ever exist (2.5 GB in float32 at 8 x 512 x 151,936). docs/loss.md has the design and the
derivations.
"""

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# The divergences: each is its value per token from the two log-probabilities at the temperature,
# log_ps and log_pt [n, V] -> [n]; beta is the divergence's own parameter (jsd's mixing weight). To
# try another one, write its value and add it to the table: the fused loss takes its gradient from
# autograd (docs/loss.md: how much slower). The three here also have analytic gradients further
# down.


def forward_kl(log_ps, log_pt, beta):  # KL(p_t || p_s): mass-covering, the standard
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def reverse_kl(log_ps, log_pt, beta):  # KL(p_s || p_t): mode-seeking
    return forward_kl(log_pt, log_ps, beta)


def jsd(log_ps, log_pt, beta):  # beta KL(p_t || M) + (1 - beta) KL(p_s || M)
    # M = beta p_t + (1 - beta) p_s
    log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
    return beta * forward_kl(log_m, log_pt, beta) + (1 - beta) * forward_kl(log_m, log_ps, beta)


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}
KD_KINDS = DIVERGENCES.keys()  # a live view: a divergence added to the table is a kind to use


def reference_loss(h_s, w_s, h_t, w_t, targets, alpha=0.5, temperature=2.0, vocab_size=None,
                   ignore_index=-100, kind="forward_kl", beta=0.5, normalizer=None, sparse=None):
    """What distill_loss computes, written plainly with full [n, V] logits: small inputs only. The
    same arguments and stats; autograd gives the gradients. Over the n valid tokens, N = normalizer
    (default n):
        loss = (alpha * T^2 * sum div + (1 - alpha) * sum ce) / N"""
    mask, tau = targets != ignore_index, temperature
    vocab = w_s.shape[0] if vocab_size is None else vocab_size
    n = mask.sum()
    N = n.clamp(min=1) if normalizer is None else torch.as_tensor(normalizer).clamp(min=1e-12)
    z_s = h_s[mask] @ w_s[:vocab].T  # [n, V]: the student's logits
    ce = F.cross_entropy(z_s, targets[mask], reduction="sum") / N
    log_ps = F.log_softmax(z_s / tau, -1)
    kl = div = top1 = z_s.new_zeros(())
    if h_t is not None:
        z_t = h_t[mask] @ w_t[:vocab].T
        log_pt = F.log_softmax(z_t / tau, -1)
        div = DIVERGENCES[kind](log_ps, log_pt, beta).sum() / N
        kl = div if kind == "forward_kl" else forward_kl(log_ps, log_pt, beta).sum() / N  # logged
        top1 = (z_s.argmax(-1) == z_t.argmax(-1)).sum() / N
    elif sparse is not None:  # a sampled teacher (cache.py): the unbiased CE(t_hat, p_s) - H(p_t)
        t_hat, ids = sparse["t_hat"][mask], sparse["ids"][mask]
        kl = div = (-(t_hat * log_ps.gather(1, ids)).sum(-1) - sparse["entropy"][mask]).sum() / N
        top1 = (z_s.argmax(-1) == sparse["argmax"][mask]).sum() / N
    loss = alpha * tau ** 2 * div + (1 - alpha) * ce
    return loss, {"ce": ce, "kl": kl, "div": div, "top1": top1, "n": n}


# -----------------------------------------------------------------------------
# The fused loss. Per chunk of C valid tokens it takes u = z_s / T and v = z_t / T, [C, V] float32
# (T folded into the hidden states before the head), computes the loss terms and the analytic
# gradient dL/dz_s in a few [C, V] buffers reused by every chunk, and accumulates grad_h_s and
# grad_w_s right away (a backward that recomputed the chunks would redo the teacher's matmul). Each
# line's comment says what a buffer holds from there on.
# On a GPU the elementwise work costs its passes over [C, V] memory, not its FLOPs
# (`python bench/loss_traffic.py` counts them), so: p_s = softmax(u) is taken once and shared; CE's
# softmax(z_s) is p_s^T / S, its row sum S folded into a per-row factor; a log-sum-exp is read off a
# softmax at the row's maximum (`_lse`); row sums of values are products, both of the forward KL's
# in one (`_rowdot`); a gradient p_s - x (forward KL, the cache) is mixed with CE's in two ops that
# never write it (`PsMinus`).
# Gradients, with u = z / T, for the divergence's value d (docs/loss.md derives them):
#   forward_kl  dd/du = p_s - p_t
#   reverse_kl  dd/du = p_s (r - d),            r = log p_s - log p_t
#   jsd         dd/du = (1 - beta) p_s (r - KL(p_s || M)),  r = log p_s - log M
#   and dL/dz_s = (1 - alpha) (softmax(z_s) - onehot(target)) + alpha T dd/du


def head(h, w, out=None):
    """The head product z = h @ w.T as float32: h [C, D], w [V, D] -> [C, V] (written into out if
    given). A float32 w is the plain float32 product. A float16/bfloat16 w multiplies in its dtype:
    on CUDA on tensor cores with float32 accumulation and result (out_dtype, torch >= 2.8);
    elsewhere the half product is cast."""
    if w.dtype == torch.float32:
        return torch.mm(h.float(), w.T, out=out)
    h = h.to(w.dtype)
    if w.is_cuda:
        return torch.mm(h, w.T, out_dtype=torch.float32, out=out) if out is not None else \
            torch.mm(h, w.T, out_dtype=torch.float32)
    return torch.mm(h, w.T).float() if out is None else out.copy_(torch.mm(h, w.T))


def _rowdot(a, b, out=None):
    """sum_v a * b per row: a [C, V], b [C, V] -> [C, 1], or b [k, C, V] -> [C, k]. Without out: a
    batched product, no [C, V] temporary, a read of each operand, but a float32 sum in sequence:
    good for a value, and fast on a CPU for k = 2 (k = 1 is slow there). With out (a free [C, V]
    buffer): a product, then torch.sum's more accurate pairwise sum, for a row sum that a gradient
    takes."""
    if out is not None:
        return torch.mul(a, b, out=out).sum(-1, keepdim=True)
    b = b.unsqueeze(0) if b.dim() == 2 else b
    with _full_float32(a.device):
        return torch.bmm(a.unsqueeze(1), b.permute(1, 2, 0)).squeeze(1)


@contextmanager
def _full_float32(device):
    # TF32 (distill.py turns it on for Ampere and newer) would round bmm's operands to 10 bits: a
    # ~1e-3 relative error on each row sum, 1e-3 to 1e-2 nats on forward KL, a difference of two
    # of them. A setter and a getter per call; the head products keep TF32.
    if device.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32:
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True


def _lse(p, x_max, i_max):  # logsumexp(x) per row from p = softmax(x): x_max - log p at the argmax
    # (p >= 1 / V there)
    return x_max - p.gather(1, i_max).log()


@dataclass
class _Rows:  # per-row facts of a chunk, [C, 1] each: max and argmax of u and v, log-sum-exp of u
    u_max: torch.Tensor
    u_arg: torch.Tensor
    lse_u: torch.Tensor = None
    v_max: torch.Tensor = None
    v_arg: torch.Tensor = None


# Each divergence's analytic gradient: (uv, p_s, free, beta, m) -> (forward KL, d, g, c) per row,
# dd/du = c * g. uv [2, C, V]: u and v, which it may overwrite; p_s = softmax(u), to be kept; free:
# its scratch buffers; g: one of those buffers (or uv's), or PsMinus(x) for g = p_s - x, which the
# mix then never writes out (two passes fewer).


class PsMinus(NamedTuple):  # g = p_s - x, given by x alone
    x: torch.Tensor


def _forward_kl(uv, p_s, free, beta, m):
    u, v = uv
    p_t = torch.softmax(v, -1, out=free[0])                     # free[0]: p_t
    pu_pv = _rowdot(p_t, uv)                                    # [C, 2]: sum p_t u, sum p_t v
    kl = pu_pv[:, 1:] - pu_pv[:, :1] + m.lse_u - _lse(p_t, m.v_max, m.v_arg)
    return kl, kl, PsMinus(p_t), 1.0                            # g = p_s - p_t


def _reverse_kl(uv, p_s, free, beta, m):
    u, v = uv
    p_t = torch.softmax(v, -1, out=free[0])                     # free[0]: p_t
    # v: r = log p_s - log p_t; u: free
    r = torch.sub(u, v, out=v).add_(_lse(p_t, m.v_max, m.v_arg) - m.lse_u)
    kl = -_rowdot(p_t, r, out=u)
    d = _rowdot(p_s, r, out=free[0])                            # free[0]: free
    return kl, d, r.sub_(d).mul_(p_s), 1.0                      # v: p_s (r - d)


def _jsd(uv, p_s, free, beta, m):
    u, v = uv
    log_ps = torch.log_softmax(u, -1, out=free[1])              # free[1]: log p_s; u: free
    log_pt = torch.log_softmax(v, -1, out=u)                    # u: log p_t
    p_t = torch.exp(log_pt, out=v)                              # v: p_t
    tpt = _rowdot(p_t, log_pt, out=free[0])                     # sum p_t log p_t
    kl = tpt - _rowdot(p_t, log_ps, out=free[0])
    log_m = torch.add(log_pt, math.log(beta) - math.log1p(-beta), out=free[0])
    torch.logaddexp(log_m, log_ps, out=log_m).add_(math.log1p(-beta))  # free[0]: log M
    r = torch.sub(log_ps, log_m, out=log_m)                     # free[0]: r = log p_s - log M
    kl_tm = kl + _rowdot(p_t, r, out=u)                         # KL(p_t || M); u: free
    kl_sm = _rowdot(p_s, r, out=u)                              # KL(p_s || M)
    d = beta * kl_tm + (1 - beta) * kl_sm
    return kl, d, r.sub_(kl_sm).mul_(p_s), 1 - beta             # free[0]: p_s (r - kl_sm)


# name: (analytic gradient, scratch buffers it takes, bound on |g| or None)
ANALYTIC = {"forward_kl": (_forward_kl, 1, 1.0), "reverse_kl": (_reverse_kl, 1, None),
            "jsd": (_jsd, 2, None)}


def _autograd(fn, uv, beta, need_grad):
    """A divergence with only a value: its chunk's gradient from autograd (slower; docs/loss.md)."""
    with torch.enable_grad():
        u = uv[0].detach().requires_grad_(need_grad)
        log_ps, log_pt = torch.log_softmax(u, -1), torch.log_softmax(uv[1], -1)
        d = fn(log_ps, log_pt, beta).view(-1, 1)
        g = torch.autograd.grad(d.sum(), u)[0] if need_grad else None
    with torch.no_grad():
        return forward_kl(log_ps, log_pt, beta).view(-1, 1), d.detach(), g, 1.0


def _sampled(u, p_s, sparse, free, m):
    """The sampled teacher (cache.py): forward KL estimated from t_hat over its ids,
    CE(t_hat, p_s) - H(p_t); its gradient p_s - t_hat is p_s - p_t in expectation. Returns what
    _forward_kl does."""
    ids, t_hat, entropy, _ = sparse                     # [C, K], [C, K] (zero-padded), [C, 1]
    kl = -(t_hat * (u.gather(1, ids) - m.lse_u)).sum(-1, keepdim=True) - entropy
    return kl, kl, PsMinus(free[0].zero_().scatter_add_(1, ids, t_hat)), 1.0  # g = p_s - t_hat


@dataclass
class Options:
    """distill_loss's settings, as the fused loss uses them."""
    alpha: float
    tau: float            # the temperature
    kind: str
    beta: float
    vocab: int            # rows of the heads in the softmaxes
    chunk_size: int
    ignore_index: int
    need_h: bool          # gradients wanted for h_s / w_s
    need_w: bool
    head_dtype: torch.dtype = torch.float32  # the student's head products': autocast's, or float32
    compiled: bool = False  # the chunk's elementwise work through torch.compile (_terms)


def _chunk(uv, y, keep, p_buf, free, o, sparse):
    """The loss terms of one chunk. uv [2, C, V]: u = z_s * s with s = 1 / tau if there is a
    teacher, else 1, and v = z_t / tau; or [1, C, V], u alone, without a dense teacher. y [C, 1];
    keep [C, 1]: 1.0 for a row that counts, 0.0 for one that does not (its target was ignore_index)
    and goes into no sum; p_buf and free: spare [C, V] buffers. uv and the spare buffers are
    consumed.
    Returns the chunk's sums [ce, kl, div, top1] and, if gradients are wanted,
    (G, row, factor, bound): dL/dz_s of the chunk's unnormalized loss is factor * G / row ([C, 1]),
    and |G / row| <= bound (None: unknown)."""
    dense = uv.shape[0] == 2
    tau = o.tau if dense or sparse is not None else 1.0         # CE's softmax(z_s) = softmax(tau u)
    u, v = uv[0], uv[-1]
    u_max, u_arg = u.max(-1, keepdim=True)
    z_y = u.gather(1, y) * tau                                  # z_s at the targets
    p_s = torch.softmax(u, -1, out=p_buf)                       # p_buf: p_s
    m = _Rows(u_max, u_arg, _lse(p_s, u_max, u_arg))
    kl = div = top1 = u.new_zeros(())
    g, c, bound = None, 1.0, 1.0
    if dense:  # the student agrees if its logit at the teacher's argmax is its largest
        m.v_max, m.v_arg = v.max(-1, keepdim=True)
        top1 = ((u.gather(1, m.v_arg) >= u_max) * keep).sum()
    elif sparse is not None:
        top1 = ((u.gather(1, sparse[3]) >= u_max) * keep).sum()
    need_grad = o.need_h or o.need_w
    if sparse is not None:
        kl, div, g, c = _sampled(u, p_s, sparse, free, m)
    elif dense and o.kind in ANALYTIC:
        fn, _, bound = ANALYTIC[o.kind]
        kl, div, g, c = fn(uv, p_s, free, o.beta, m)
    elif dense:
        kl, div, g, c = _autograd(DIVERGENCES[o.kind], uv, o.beta, need_grad)
        bound = None
    # CE at temperature 1: q = softmax(z_s) = p_s^tau / S, S = sum p_s^tau, so
    # logsumexp(z_s) = tau lse_u + log S
    S = torch.ones_like(u_max)
    if tau != 1:
        S = torch.linalg.vector_norm(p_s, tau, -1, keepdim=True) ** tau
    ce = tau * m.lse_u + S.log() - z_y
    sums = torch.stack([(ce * keep).sum(), (kl * keep).sum(), (div * keep).sum(), top1])
    if not need_grad:
        return sums, None
    # the mix, written once: dL/dz_s = (1 - alpha) (q - onehot(y)) + alpha tau c g. In units of
    # 1 / S per row: G = p_s^tau + k g - S onehot(y), k = r S, r = alpha tau c / (1 - alpha)
    if o.alpha == 1:
        g = torch.sub(p_s, g.x, out=g.x) if isinstance(g, PsMinus) else g
        return sums, (g, torch.ones_like(S), o.tau * c, bound)
    r = o.alpha * o.tau * c / (1 - o.alpha) if g is not None else 0.0
    bound = None if bound is None else 1 + abs(r) * bound
    # G / -k = x - p_s (1 + p_s^(tau - 1) / k): two ops, g never written
    if isinstance(g, PsMinus) and r > 0:
        k = S * r
        if tau == 1:
            y_k = 1 + 1 / k                                     # [C, 1]
        else:  # 1 + p_s^(tau - 1) / k, in u (at tau = 2 one pass: p_s itself, no power)
            base = p_s if tau == 2 else torch.pow(p_s, tau - 1, out=u)
            y_k = torch.addcdiv(torch.ones_like(k), base, k, out=u)
        G = torch.addcmul(g.x, p_s, y_k, value=-1, out=g.x).scatter_add_(1, y, S / k)  # G / -k
        return sums, (G, -1 / r, 1 - o.alpha, bound)
    q = p_s if tau == 1 else torch.pow(p_s, tau, out=u)         # u: q * S
    if r != 0:
        torch.addcmul(q, g, S * r, out=q)                       # q * S + k g
    q.scatter_add_(1, y, -S)
    return sums, (q, S, 1 - o.alpha, bound)


def _terms(u, v, y, keep, sparse, o, scale, g_dtype):
    """What _chunk computes, written as plain tensor expressions for torch.compile, which fuses them
    into a few kernels (each [C, V] operand read about once: bench/loss_traffic.py). u, v [C, V]
    as in _chunk (v None without a dense teacher), y and keep [C, 1], sparse the cache's
    [ids, t_hat, entropy, argmax] or None; the analytic divergences only. Returns the sums
    [ce, kl, div, top1] and dL/dz_s of the chunk's unnormalized loss times scale, in g_dtype (None
    without gradients)."""
    dense, f32 = v is not None, torch.float32
    tau = o.tau if dense or sparse is not None else 1.0
    u_max = u.amax(-1, keepdim=True)
    lse_u = torch.logsumexp(u, -1, keepdim=True)
    log_ps = u - lse_u
    p_s = log_ps.exp()
    kl = div = top1 = g = u.new_zeros(())
    if dense:
        log_pt = torch.log_softmax(v, -1)
        p_t = log_pt.exp()
        top1 = ((u.gather(1, v.argmax(-1, keepdim=True)) >= u_max) * keep).sum()
        kl = (p_t * (log_pt - log_ps)).sum(-1, keepdim=True)
        div, g = kl, p_s - p_t
        if o.kind == "reverse_kl":
            r = log_ps - log_pt
            div = (p_s * r).sum(-1, keepdim=True)
            g = p_s * (r - div)
        elif o.kind == "jsd":
            log_m = torch.logaddexp(log_pt + math.log(o.beta), log_ps + math.log1p(-o.beta))
            r = log_ps - log_m
            kl_sm = (p_s * r).sum(-1, keepdim=True)
            div = o.beta * (p_t * (log_pt - log_m)).sum(-1, keepdim=True) + (1 - o.beta) * kl_sm
            g = (1 - o.beta) * p_s * (r - kl_sm)
    elif sparse is not None:
        ids, t_hat, entropy, argmax = sparse
        kl = div = -(t_hat * (u.gather(1, ids) - lse_u)).sum(-1, keepdim=True) - entropy
        top1 = ((u.gather(1, argmax) >= u_max) * keep).sum()
        g = p_s.scatter_add(1, ids, -t_hat)
    z = u * tau  # CE at temperature 1
    lse_z = torch.logsumexp(z, -1, keepdim=True)
    ce = lse_z - z.gather(1, y)
    sums = torch.stack([(ce * keep).sum(), (kl * keep).sum(), (div * keep).sum(), top1])
    if g_dtype is None:
        return sums, None
    # one fused pass writes the gradient: the one-hot of y from a comparison with the column index,
    # not a scatter
    onehot = torch.arange(u.shape[1], device=u.device) == y
    G = (1 - o.alpha) * (torch.exp(z - lse_z) - onehot.to(f32)) + (o.alpha * o.tau) * g
    return sums, (G * (scale * keep)).to(g_dtype)


_compiled = {}  # "terms": torch.compile(_terms), made at the first call asking; None if it failed


def _run_terms(*args):
    """_terms compiled, or None where compiling failed (no C++ compiler, no Triton for the GPU): a
    warning, then the eager chunk from there on."""
    if "terms" not in _compiled:
        _compiled["terms"] = torch.compile(_terms, dynamic=False)
    if _compiled["terms"] is None:
        return None
    try:
        return _compiled["terms"](*args)
    except Exception as e:  # noqa: BLE001 (torch.compile's failures have many types)
        _compiled["terms"] = None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"distill_loss: torch.compile failed ({type(e).__name__}: {first}); the "
                      f"eager loss instead", stacklevel=2)
        return None


def _g_scale(dtype, bound):
    """float16's factor for the gradient of the logits: a power of two, clear of its underflow with
    room below its overflow (|G * scale| <= 32768); bfloat16 has float32's range."""
    return 1.0 if dtype != torch.float16 else 2.0 ** math.floor(math.log2(32768 / bound))


class _FusedLoss(torch.autograd.Function):
    """Forward computes the loss and, per chunk, grad_h_s and grad_w_s (float32); backward only
    scales them by grad_output / N. A second backward through the same graph is an error."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, normalizer, sparse, o):
        hs = h_s.reshape(-1, h_s.shape[-1])                        # [B*T, D_s]
        ht = h_t.reshape(-1, h_t.shape[-1]) if h_t is not None else None
        y = targets.reshape(-1).long()
        # every row goes through the chunks; an ignored row's terms are multiplied by 0 (keep), its
        # target read as 0. Selecting the valid rows instead would cost a host sync per call
        valid = y != o.ignore_index                                # [B*T]
        keep = valid.to(torch.float32)[:, None]                    # [B*T, 1]
        y = y.masked_fill(~valid, 0)
        need_grad, half = o.need_h or o.need_w, o.head_dtype != torch.float32
        # [vocab, D_s]: the student's head in its products' dtype (no gradients: as it is); the
        # sums are float32. A CPU has no half product with a float32 result: there the operands are
        # rounded to the half dtype and multiplied in float32, what a GPU's tensor cores compute (a
        # half result could overflow)
        emulate = half and not hs.is_cuda
        ws = w_s[:o.vocab].to(o.head_dtype) if half or need_grad else w_s[:o.vocab]
        ws = ws.float() if emulate else ws
        wt = w_t[:o.vocab] if w_t is not None else None            # [vocab, D_t], its own dtype
        n, dev, f32 = y.numel(), hs.device, torch.float32
        grad_h = torch.zeros(hs.shape, dtype=f32, device=dev) if o.need_h else None
        grad_w = torch.zeros(w_s.shape, dtype=f32, device=dev) if o.need_w else None  # padding: 0
        sums = torch.zeros(4, dtype=f32, device=dev)              # ce, kl, div, top1
        s = 1 / o.tau if ht is not None or sparse is not None else 1.0
        # [C, vocab] buffers, once per call (a fresh one per chunk costs page faults): u and v, p_s,
        # scratch
        C = min(o.chunk_size, n)
        n_free = 1 if ht is None else ANALYTIC.get(o.kind, (None, 1))[1]
        uv = torch.empty(1 + (ht is not None), C, o.vocab, dtype=f32, device=dev)
        bufs = g16 = ws_f = None  # bufs: the eager chunk's, made when it first runs
        # the compiled chunk: the analytic divergences, with its bound on |dL/dz_s| (float16's
        # scale) up front
        compiled = o.compiled and (ht is None or o.kind in ANALYTIC)
        b = 1.0 if ht is None else ANALYTIC.get(o.kind, (None, None, None))[2]
        t_bound = None if b is None else (1 - o.alpha) + o.alpha * o.tau * b
        g_half = half and (o.head_dtype == torch.bfloat16 or t_bound is not None)
        g_dtype = (o.head_dtype if g_half else f32) if need_grad else None
        g_scale = _g_scale(o.head_dtype, t_bound) if g_half else 1.0
        for i in range(0, n, o.chunk_size):
            ix = slice(i, i + o.chunk_size)
            h_c, y_c, k_c = hs[ix], y[ix, None], keep[ix]         # [c, D_s], [c, 1], [c, 1]
            c = len(h_c)
            uv_c = uv[:, :c]                                       # [2, c, vocab]
            h_u = h_c * s if s != 1 else h_c
            head(h_u.to(o.head_dtype).float() if emulate else h_u, ws, uv_c[0])  # u = z_s * s
            if ht is not None:
                head(ht[ix] / o.tau, wt, uv_c[1])                  # v = z_t / tau
            sp = None if sparse is None else [t[ix] for t in sparse]
            v_c = uv_c[1] if ht is not None else None
            out = _run_terms(uv_c[0], v_c, y_c, k_c, sp, o, g_scale, g_dtype) if compiled else None
            if out is not None:  # dL/dz_s times g_scale, in g_dtype already
                chunk_sums, G = out
                grad = None if G is None else (G, 1.0, 1.0, t_bound)
            else:
                compiled = False
                if bufs is None:
                    bufs = torch.empty(1 + n_free, C, o.vocab, dtype=f32, device=dev).unbind()
                chunk_sums, grad = _chunk(uv_c, y_c, k_c, bufs[0][:c], [b[:c] for b in bufs[1:]],
                                          o, sp)
            sums += chunk_sums
            if grad is None:
                continue
            G, row, factor, bound = grad                           # dL/dz_s = factor * G / row
            if half and (o.head_dtype == torch.bfloat16 or bound is not None):
                # G in the head's dtype, the rows' 1 / S, keep and float16's scale folded in (the
                # compiled chunk's is)
                scale = _g_scale(o.head_dtype, bound)
                if G.dtype == f32:
                    if g16 is None:
                        g16 = torch.empty(C, o.vocab, dtype=o.head_dtype, device=dev)
                    G = torch.mul(G, scale / row * k_c, out=g16[:c])
                w_b, h_b = ws, h_c.to(o.head_dtype)
                out_scale = alpha_w = factor / scale
                if emulate:
                    G, h_b = G.float(), h_b.float()
            else:  # float32 (or float16 without a bound on G: these two products stay float32)
                if half and ws_f is None:
                    ws_f = w_s[:o.vocab].float()
                # the rows' 1 / S and keep on the [c, D] side
                w_b, out_scale = ws_f if half else ws, factor / row * k_c
                h_b, alpha_w = h_c.float() * out_scale, 1.0
            if o.need_h:
                grad_h[ix] = head(G, w_b.T).mul_(out_scale)             # [c, D_s]
            if o.need_w:
                _add_grad_w(grad_w[:o.vocab], G, h_b, alpha_w)
        n_t = keep.sum()                                           # valid tokens, on the device
        # 0 tokens: loss 0, no NaN
        N = n_t.clamp(min=1) if normalizer is None else normalizer.clamp(min=1e-12)
        ce, kl, div, top1 = (sums / N).unbind()
        loss = o.alpha * o.tau * o.tau * div + (1 - o.alpha) * ce
        ctx.grads, ctx.N = (grad_h, grad_w), N
        ctx.h_meta, ctx.w_dtype = (h_s.shape, h_s.dtype), w_s.dtype
        stats = torch.stack([ce, kl, div, top1, n_t])
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        if ctx.grads is None:
            raise RuntimeError("distill_loss: backward through the same call twice is unsupported")
        (grad_h, grad_w), ctx.grads = ctx.grads, None
        scale = grad_loss / ctx.N                                  # in place: no extra V x D copy
        if grad_h is not None:
            grad_h = grad_h.mul_(scale).view(ctx.h_meta[0]).to(ctx.h_meta[1])
        if grad_w is not None:
            grad_w = grad_w.mul_(scale).to(ctx.w_dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def _add_grad_w(grad_w, G, h, alpha):
    """grad_w [V, D] float32 += alpha * G.T @ h: a half G on CUDA multiplies on tensor cores into
    float32 grad_w in place (torch >= 2.10: 2.8 and 2.9 refuse a float32 self with half operands);
    elsewhere the half product is cast."""
    if G.dtype == torch.float32:
        grad_w.addmm_(G.T, h, alpha=alpha)
    elif G.is_cuda:
        torch.addmm(grad_w, G.T, h, out_dtype=torch.float32, alpha=alpha, out=grad_w)
    else:
        grad_w.add_(torch.mm(G.T, h), alpha=alpha)


def distill_loss(h_s, w_s, h_t, w_t, targets, alpha=0.5, temperature=2.0, vocab_size=None,
                 ignore_index=-100, kind="forward_kl", chunk_size=256, beta=0.5, normalizer=None,
                 sparse=None, compile=False):
    """The fused chunked distillation loss: reference_loss's value and gradients without its [n, V]
    logits. h_s [B, T, D_s] student hidden states after the final norm, w_s [V, D_s] student head;
    h_t [B, T, D_t], w_t [V, D_t] teacher's (no gradient; both None -> CE only, needs alpha == 0);
    targets [B, T] (int64).
    kind: a key of DIVERGENCES. vocab_size: rows from it up (padding ids) are left out of both
    softmaxes.
    sparse: instead of h_t, w_t, a sampled teacher (cache.py), forward_kl only: a dict of
    ids [B, T, K] (int64) and t_hat [B, T, K] (float32, zero-padded, each token's summing to 1),
    entropy [B, T] (the teacher's, at the temperature) and argmax [B, T]; kl and div are then the
    unbiased estimate CE(t_hat, p_s) - entropy.
    normalizer: number or 0-dim tensor to divide the summed terms by (default: valid tokens here).
    Called under autocast (float16/bfloat16), the student's three head products run in that dtype
    with float32 results; the softmaxes, KL and CE are float32 in any case.
    compile: each chunk's elementwise work through torch.compile (the three built-in divergences,
    the cache and CE alone; a divergence without an analytic gradient stays eager): fewer passes
    over [C, V] memory, a compile (tens of seconds) at the first call and at each new chunk shape.
    If compiling fails, a warning, then eager.
    Returns (loss, stats), stats of detached 0-dim float32 tensors, the same keys in every mode: ce,
    kl (always forward KL at this temperature, without tau^2), div (the `kind` divergence), top1
    (student/teacher argmax agreements), all summed over tokens and divided by the normalizer (kl,
    div, top1 0 without a teacher); n (valid tokens here)."""
    if kind not in KD_KINDS:
        raise ValueError(f"kind must be one of {', '.join(KD_KINDS)}, got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError("jsd needs 0 < beta < 1 (its ends are 0; use forward_kl/reverse_kl)")
    if (h_t is None) != (w_t is None) or (h_t is None and sparse is None and alpha != 0):
        raise ValueError("without a teacher (h_t = w_t = None) only CE is computed: alpha = 0")
    if sparse is not None and (h_t is not None or kind != "forward_kl"):
        raise ValueError("a sparse (sampled) teacher replaces h_t and w_t, and takes forward_kl "
                         "only")
    vocab = w_s.shape[0] if vocab_size is None else vocab_size
    assert 0 < vocab <= w_s.shape[0] and (w_t is None or vocab <= w_t.shape[0])
    if normalizer is not None:
        if isinstance(normalizer, (int, float)) and normalizer < 0:
            raise ValueError(f"normalizer must be >= 0, got {normalizer}")
        # a Python number: a fill, not a synced copy
        normalizer = normalizer.float() if torch.is_tensor(normalizer) else \
            torch.full((), float(normalizer), device=h_s.device)
    if sparse is not None:  # [B, T, ...] -> [B*T, ...] in the order the chunks take them
        sparse = [sparse[k].reshape(-1, *sparse[k].shape[2:]) if k in ("ids", "t_hat") else
                  sparse[k].reshape(-1, 1) for k in ("ids", "t_hat", "entropy", "argmax")]
    device_type = h_s.device.type
    amp = torch.is_autocast_enabled(device_type)
    head_dtype = torch.get_autocast_dtype(device_type) if amp else torch.float32
    grad_on = torch.is_grad_enabled()
    o = Options(alpha=float(alpha), tau=float(temperature), kind=kind, beta=float(beta),
                vocab=vocab, chunk_size=int(chunk_size), ignore_index=ignore_index,
                need_h=grad_on and h_s.requires_grad, need_w=grad_on and w_s.requires_grad,
                head_dtype=head_dtype, compiled=bool(compile))
    with torch.autocast(device_type, enabled=False):  # the dtypes inside are the loss's own
        loss, s = _FusedLoss.apply(h_s, w_s, h_t, w_t, targets, normalizer, sparse, o)
    return loss, dict(zip(("ce", "kl", "div", "top1", "n"), s.unbind()))
