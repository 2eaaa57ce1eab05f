"""
The distillation loss. First the plain reference loss, full logits: the definition, what everything below must
equal (tests/test_loss.py and bench.py compare against it). Then the fused loss, which applies the student's and
the teacher's heads a chunk of tokens at a time, so that no [B, T, V] logits ever exist (2.5 GB in float32 at
8 x 512 x 151,936). docs/loss.md has the design and the derivations.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# The divergences: each is its value per token from the two log-probabilities at the temperature, log_ps and
# log_pt [n, V] -> [n]; beta is the divergence's own parameter (jsd's mixing weight). To try another one, write
# its value and add it to the table: the fused loss takes its gradient from autograd (docs/loss.md: how much
# slower). The three here also have analytic gradients further down.


def forward_kl(log_ps, log_pt, beta):  # KL(p_t || p_s): mass-covering, the standard
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def reverse_kl(log_ps, log_pt, beta):  # KL(p_s || p_t): mode-seeking
    return forward_kl(log_pt, log_ps, beta)


def jsd(log_ps, log_pt, beta):  # beta KL(p_t || M) + (1 - beta) KL(p_s || M), M = beta p_t + (1 - beta) p_s
    log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
    return beta * forward_kl(log_m, log_pt, beta) + (1 - beta) * forward_kl(log_m, log_ps, beta)


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}
KD_KINDS = DIVERGENCES.keys()  # a live view: a divergence added to the table is a kind distill.py accepts


def reference_loss(h_s, w_s, h_t, w_t, targets, alpha=0.5, temperature=2.0, vocab_size=None, ignore_index=-100,
                   kind="forward_kl", beta=0.5, normalizer=None, sparse=None):
    """What distill_loss computes, written plainly with full [n, V] logits: small inputs only. The same arguments
    and stats; autograd gives the gradients. Over the n valid tokens, N = normalizer (default n):
        loss = (alpha * T^2 * sum div + (1 - alpha) * sum ce) / N"""
    mask, tau = targets != ignore_index, temperature
    vocab = w_s.shape[0] if vocab_size is None else vocab_size
    n = mask.sum()
    N = n.clamp(min=1) if normalizer is None else torch.as_tensor(normalizer).clamp(min=1e-12)
    z_s = h_s[mask] @ w_s[:vocab].T                                    # [n, V]: the student's logits
    ce = F.cross_entropy(z_s, targets[mask], reduction="sum") / N
    log_ps = F.log_softmax(z_s / tau, -1)
    kl = div = top1 = z_s.new_zeros(())
    if h_t is not None:
        z_t = h_t[mask] @ w_t[:vocab].T
        log_pt = F.log_softmax(z_t / tau, -1)
        kl = forward_kl(log_ps, log_pt, beta).sum() / N               # always the forward KL, for the logs
        div = DIVERGENCES[kind](log_ps, log_pt, beta).sum() / N
        top1 = (z_s.argmax(-1) == z_t.argmax(-1)).sum() / N
    elif sparse is not None:  # a sampled teacher (cache.py): the unbiased estimate CE(t_hat, p_s) - H(p_t)
        t_hat, ids = sparse["t_hat"][mask], sparse["ids"][mask]
        kl = div = (-(t_hat * log_ps.gather(1, ids)).sum(-1) - sparse["entropy"][mask]).sum() / N
        top1 = (z_s.argmax(-1) == sparse["argmax"][mask]).sum() / N
    loss = alpha * tau ** 2 * div + (1 - alpha) * ce
    return loss, {"ce": ce, "kl": kl, "div": div, "top1": top1, "n": n}


# -----------------------------------------------------------------------------
# The fused loss. Per chunk of C valid tokens it takes u = z_s / T and v = z_t / T, [C, V] float32 (T folded into
# the hidden states before the head), computes the loss terms and the analytic gradient dL/dz_s in a few [C, V]
# buffers reused by every chunk, and accumulates grad_h_s and grad_w_s right away (a backward that recomputed the
# chunks would redo the teacher's matmul). Each line's comment says what a buffer holds from there on. Passes over
# [C, V] memory, not FLOPs, are the elementwise work's cost: softmaxes are taken once and reused, row sums are
# products (`_rowdot`), and a log-sum-exp is read off a softmax at the row's maximum (`_lse`).
# Gradients, with u = z / T, for the divergence's value d (docs/loss.md derives them):
#   forward_kl  dd/du = p_s - p_t
#   reverse_kl  dd/du = p_s (r - d),            r = log p_s - log p_t
#   jsd         dd/du = (1 - beta) p_s (r - KL(p_s || M)),  r = log p_s - log M
#   and dL/dz_s = (1 - alpha) (softmax(z_s) - onehot(target)) + alpha T dd/du


def head(h, w, out=None):
    """The head product z = h @ w.T as float32: h [C, D], w [V, D] -> [C, V] (written into out if given). A float32
    w is the plain float32 product. A float16/bfloat16 w multiplies in its dtype: on CUDA on tensor cores with
    float32 accumulation and result (out_dtype, torch >= 2.8); elsewhere the half product is cast."""
    if w.dtype == torch.float32:
        return torch.mm(h.float(), w.T, out=out)
    h = h.to(w.dtype)
    if w.is_cuda:
        return torch.mm(h, w.T, out_dtype=torch.float32, out=out) if out is not None else \
            torch.mm(h, w.T, out_dtype=torch.float32)
    return torch.mm(h, w.T).float() if out is None else out.copy_(torch.mm(h, w.T))


def _rowdot(a, b, out=None):
    """sum_v a * b per row, [C, V] x [C, V] -> [C, 1]. Without out: a batched product, no [C, V] temporary, but its
    float32 sum is sequential, good for a value; with out (a free buffer): a product then torch.sum's more
    accurate pairwise sum, for a row sum that a gradient takes (reverse_kl's, jsd's)."""
    if out is None:
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1, 1)
    return torch.mul(a, b, out=out).sum(-1, keepdim=True)


def _lse(p, x_max, i_max):  # logsumexp(x) per row from p = softmax(x): x_max - log p at the argmax (p >= 1 / V)
    return x_max - p.gather(1, i_max).log()


def _forward_kl(u, v, free, beta, m):
    """dd/du of KL(p_t || p_s) in a buffer; u and v are consumed, free[0] used. m: the rows' max/argmax of u and v.
    Returns (forward KL, d, dd/du as g, c) per row, with dd/du = c g."""
    p_t = torch.softmax(v, -1, out=free[0])                     # free[0]: p_t
    kl = _rowdot(p_t, v) - _rowdot(p_t, u)                      # sum p_t (v - u); the log-sum-exps below
    p_s = torch.softmax(u, -1, out=v)                           # v: p_s
    kl += _lse(p_s, m.u_max, m.u_arg) - _lse(p_t, m.v_max, m.v_arg)
    return kl, kl, torch.sub(p_s, p_t, out=u), 1.0              # u: p_s - p_t


def _reverse_kl(u, v, free, beta, m):  # as _forward_kl, for KL(p_s || p_t)
    p_t = torch.softmax(v, -1, out=free[0])                     # free[0]: p_t
    shift = _lse(p_t, m.v_max, m.v_arg) - u.logsumexp(-1, keepdim=True)
    r = torch.sub(u, v, out=v).add_(shift)                      # v: r = log p_s - log p_t
    kl = -_rowdot(p_t, r)
    p_s = torch.softmax(u, -1, out=free[0])                     # free[0]: p_s
    d = _rowdot(p_s, r, out=u)                                  # u: free
    return kl, d, r.sub_(d).mul_(p_s), 1.0                      # v: p_s (r - d)


def _jsd(u, v, free, beta, m):  # as _forward_kl, for the JSD; uses free[0] and free[1]
    log_ps = torch.log_softmax(u, -1, out=free[1])              # free[1]: log p_s; u: free
    log_pt = torch.log_softmax(v, -1, out=u)                    # u: log p_t
    p_t = torch.exp(log_pt, out=v)                              # v: p_t
    tpt = _rowdot(p_t, log_pt)                                  # sum p_t log p_t
    kl = tpt - _rowdot(p_t, log_ps)
    log_m = torch.add(log_pt, math.log(beta) - math.log1p(-beta), out=free[0])
    torch.logaddexp(log_m, log_ps, out=log_m).add_(math.log1p(-beta))  # free[0]: log M
    kl_tm = tpt - _rowdot(p_t, log_m)                           # KL(p_t || M)
    r = torch.sub(log_ps, log_m, out=log_m)                     # free[0]: r = log p_s - log M
    p_s = torch.exp(log_ps, out=v)                              # v: p_s
    kl_sm = _rowdot(p_s, r, out=u)                              # KL(p_s || M); u: free
    d = beta * kl_tm + (1 - beta) * kl_sm
    return kl, d, r.sub_(kl_sm).mul_(p_s), 1 - beta             # free[0]: p_s (r - kl_sm)


# the analytic gradients and the [C, V] scratch buffers each takes beyond u and v
ANALYTIC = {"forward_kl": (_forward_kl, 1), "reverse_kl": (_reverse_kl, 1), "jsd": (_jsd, 2)}


def _autograd(fn, u, v, beta, need_grad):
    """A divergence with only a value: its chunk's gradient from autograd (slower; docs/loss.md)."""
    with torch.enable_grad():
        u = u.detach().requires_grad_(need_grad)
        log_ps, log_pt = torch.log_softmax(u, -1), torch.log_softmax(v, -1)
        d = fn(log_ps, log_pt, beta).view(-1, 1)
        g = torch.autograd.grad(d.sum(), u)[0] if need_grad else None
    with torch.no_grad():
        return forward_kl(log_ps, log_pt, beta).view(-1, 1), d.detach(), g, 1.0


def _sampled(u, sparse, free, m):
    """The sampled teacher (cache.py): forward KL estimated from t_hat over its ids, CE(t_hat, p_s) - H(p_t); its
    gradient p_s - t_hat is p_s - p_t in expectation. Returns what _forward_kl does."""
    ids, t_hat, entropy, _ = sparse                             # [C, K], [C, K] (zero-padded), [C, 1]
    p_s = torch.softmax(u, -1, out=free[0])                     # free[0]: p_s
    log_ps_ids = u.gather(1, ids) - _lse(p_s, m.u_max, m.u_arg)
    kl = -(t_hat * log_ps_ids).sum(-1, keepdim=True) - entropy
    return kl, kl, p_s.scatter_add_(1, ids, -t_hat), 1.0        # free[0]: p_s - t_hat


@dataclass
class _RowMax:  # each row's max and argmax of u (and v): top1, and the log-sum-exps
    u_max: torch.Tensor
    u_arg: torch.Tensor
    v_max: torch.Tensor = None
    v_arg: torch.Tensor = None


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
    head_dtype: torch.dtype = torch.float32  # the student's head products (autocast's dtype, else float32)


def _chunk(u, v, y, q_buf, free, o, sparse):
    """The loss terms of one chunk. u = z_s * s [C, V] with s = 1 / tau if there is a teacher, else 1; v = z_t /
    tau or None; y [C, 1]; q_buf and free: spare [C, V] buffers. u, v and the spare buffers are consumed. Returns
    the chunk's sums [ce, kl, div, top1] and, if gradients are wanted, (G, factor, bound): dL/dz_s of the
    chunk's unnormalized loss is factor * G, and |G| <= bound (None: unknown), for float16's loss scaling."""
    teacher = v is not None or sparse is not None
    s = 1 / o.tau if teacher else 1.0
    u_max, u_arg = u.max(-1, keepdim=True)
    m = _RowMax(u_max, u_arg)
    # CE at temperature 1: q = softmax(z_s), z_s = u / s
    q = torch.softmax(u if s == 1 else torch.mul(u, 1 / s, out=free[0]), -1, out=q_buf)  # q_buf: q
    ce = (u_max - u.gather(1, y)) / s - q.gather(1, u_arg).log()
    kl = div = top1 = u.new_zeros(())
    g, c, g_bound = None, 1.0, 1.0
    if v is not None:  # the student agrees if its logit at the teacher's argmax is its largest
        m.v_max, m.v_arg = v.max(-1, keepdim=True)
        top1 = (u.gather(1, m.v_arg) >= u_max).sum().float()
    elif sparse is not None:
        top1 = (u.gather(1, sparse[3]) >= u_max).sum().float()
    need_grad = o.need_h or o.need_w
    if sparse is not None:
        kl, div, g, c = _sampled(u, sparse, free, m)
    elif v is not None and o.kind in ANALYTIC:
        kl, div, g, c = ANALYTIC[o.kind][0](u, v, free, o.beta, m)
        g_bound = 1.0 if o.kind == "forward_kl" else None
    elif v is not None:
        kl, div, g, c = _autograd(DIVERGENCES[o.kind], u, v, o.beta, need_grad)
        g_bound = None
    sums = torch.stack([ce.sum(), kl.sum(), div.sum(), top1])
    if not need_grad:
        return sums, None
    # the mix, written once: dL/dz_s = (1 - alpha) (q - onehot(y)) + alpha tau c g
    if o.alpha == 1:
        return sums, (g, o.tau * c, g_bound)
    if g is not None and o.alpha > 0:
        r = o.alpha * o.tau * c / (1 - o.alpha)
        q.add_(g, alpha=r)                                      # q_buf: G = q + r g
        bound = None if g_bound is None else 1 + abs(r) * g_bound
    else:
        bound = 1.0
    q.scatter_add_(1, y, q.new_full(y.shape, -1.0))
    return sums, (q, 1 - o.alpha, bound)


def _fp16_scale(bound):
    """float16 loss scaling of a gradient G with |G| <= bound: the largest power of two that keeps bound * scale
    below half of float16's maximum, so that G's small entries (probabilities ~1e-6 and less) stay off the
    underflow while nothing can overflow. None (no bound known): 1, and the backward products stay float32."""
    return 2.0 ** math.floor(math.log2(32768 / bound)) if bound is not None else None


class _FusedLoss(torch.autograd.Function):
    """Forward computes the loss and, per chunk, grad_h_s and grad_w_s (float32); backward only scales them by
    grad_output / N. A second backward through the same graph is an error."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, normalizer, sparse, o):
        hs = h_s.reshape(-1, h_s.shape[-1])                        # [B*T, D_s]
        ht = h_t.reshape(-1, h_t.shape[-1]) if h_t is not None else None
        y = targets.reshape(-1).long()
        idx = (y != o.ignore_index).nonzero().squeeze(1)  # [n] valid rows: the call's one host sync (n sizes chunks)
        need_grad = o.need_h or o.need_w
        half = o.head_dtype != torch.float32
        # [vocab, D_s]: the student's head in its products' dtype (no gradients: as it is); the sums are float32
        ws = w_s[:o.vocab].to(o.head_dtype) if half or need_grad else w_s[:o.vocab]
        wt = w_t[:o.vocab] if w_t is not None else None            # [vocab, D_t] in its own dtype, no grad
        n, dev, f32 = idx.numel(), hs.device, torch.float32
        grad_h = torch.zeros(hs.shape, dtype=f32, device=dev) if o.need_h else None
        grad_w = torch.zeros(w_s.shape, dtype=f32, device=dev) if o.need_w else None  # padding rows stay 0
        sums = torch.zeros(4, dtype=f32, device=dev)              # ce, kl, div, top1
        teacher = ht is not None or sparse is not None
        s = 1 / o.tau if teacher else 1.0
        # [C, vocab] buffers, allocated once per call (a fresh one per chunk costs page faults): u, q, scratch, v
        C = min(o.chunk_size, n)
        n_free = 1 if ht is None else max(1, ANALYTIC.get(o.kind, (None, 1))[1])
        bufs = torch.empty(2 + n_free + (ht is not None), C, o.vocab, dtype=f32, device=dev).unbind()
        g16 = ws_f = None
        for i in range(0, n, o.chunk_size):
            ix = idx[i:i + o.chunk_size]
            c = len(ix)
            h_c, y_c = hs[ix], y[ix, None]                           # [c, D_s], [c, 1]
            u = head(h_c * s if s != 1 else h_c, ws, bufs[0][:c])      # [c, vocab]: z_s * s
            v = None if ht is None else head(ht[ix] / o.tau, wt, bufs[-1][:c])  # z_t / tau
            sp = None if sparse is None else [t[ix] for t in sparse]
            free = [b[:c] for b in bufs[2:2 + n_free]]
            chunk_sums, grad = _chunk(u, v, y_c, bufs[1][:c], free, o, sp)
            sums += chunk_sums
            if grad is None:
                continue
            G, factor, bound = grad                                # dL/dz_s = factor * G
            if half:  # G in the head's dtype; float16 scaled away from its underflow (bfloat16 has float32's range)
                scale = 1.0 if o.head_dtype == torch.bfloat16 else _fp16_scale(bound)
                if scale is None:  # no bound on G: these two products stay float32
                    ws_f = ws.float() if ws_f is None else ws_f
                    G_h, w_h, h_h, unscale = G, ws_f, h_c.float(), factor
                else:
                    if g16 is None:
                        g16 = torch.empty(C, o.vocab, dtype=o.head_dtype, device=dev)
                    G_h = torch.mul(G, scale, out=g16[:c])
                    w_h, h_h, unscale = ws, h_c.to(o.head_dtype), factor / scale
            else:
                G_h, w_h, h_h, unscale = G, ws, h_c.float(), factor
            if o.need_h:
                grad_h.index_copy_(0, ix, head(G_h, w_h.T).mul_(unscale))  # [c, D_s]
            if o.need_w:
                _add_grad_w(grad_w[:o.vocab], G_h, h_h, unscale)
        n_t = torch.full((), float(n), device=dev)                # (a fill: no copy from the host, no sync)
        N = n_t.clamp(min=1) if normalizer is None else normalizer.clamp(min=1e-12)  # 0 tokens: loss 0, no NaN
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
    """grad_w [V, D] float32 += alpha * G.T @ h: in G's dtype with float32 accumulation (CUDA), else cast."""
    if G.dtype == torch.float32:
        grad_w.addmm_(G.T, h, alpha=alpha)
    elif G.is_cuda:
        torch.addmm(grad_w, G.T, h, out_dtype=torch.float32, alpha=alpha, out=grad_w)
    else:
        grad_w.add_(torch.mm(G.T, h), alpha=alpha)


def distill_loss(h_s, w_s, h_t, w_t, targets, alpha=0.5, temperature=2.0, vocab_size=None,
                 ignore_index=-100, kind="forward_kl", chunk_size=256, beta=0.5, normalizer=None, sparse=None):
    """The fused chunked distillation loss: reference_loss's value and gradients without its [n, V] logits.
    h_s [B, T, D_s] student hidden states after the final norm, w_s [V, D_s] student head; h_t [B, T, D_t], w_t
    [V, D_t] teacher's (no gradient; both None -> CE only, needs alpha == 0); targets [B, T] (int64).
    kind: a key of DIVERGENCES. vocab_size: rows from it up (padding ids) are left out of both softmaxes.
    sparse: instead of h_t, w_t, a sampled teacher (cache.py), forward_kl only: a dict of ids [B, T, K] (int64)
    and t_hat [B, T, K] (float32, zero-padded, each token's summing to 1), entropy [B, T] (the teacher's, at the
    temperature) and argmax [B, T]; kl and div are then the unbiased estimate CE(t_hat, p_s) - entropy.
    normalizer: number or 0-dim tensor to divide the summed terms by (default: valid tokens here).
    Called under autocast (float16/bfloat16), the student's three head products run in that dtype with float32
    results; the softmaxes, KL and CE are float32 in any case.
    Returns (loss, stats), stats of detached 0-dim float32 tensors, the same keys in every mode: ce, kl (always
    forward KL at this temperature, without tau^2), div (the `kind` divergence), top1 (student/teacher argmax
    agreements), all summed over tokens and divided by the normalizer (kl, div, top1 0 without a teacher); n
    (valid tokens here)."""
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
        raise ValueError("a sparse (sampled) teacher replaces h_t and w_t, and takes forward_kl only")
    vocab = w_s.shape[0] if vocab_size is None else vocab_size
    assert 0 < vocab <= w_s.shape[0] and (w_t is None or vocab <= w_t.shape[0])
    if normalizer is not None:
        if isinstance(normalizer, (int, float)) and normalizer < 0:
            raise ValueError(f"normalizer must be >= 0, got {normalizer}")
        normalizer = normalizer.float() if torch.is_tensor(normalizer) else \
            torch.full((), float(normalizer), device=h_s.device)  # a Python number: a fill, not a synced copy
    if sparse is not None:  # [B, T, ...] -> [B*T, ...] in the order the chunks take them
        sparse = [sparse[k].reshape(-1, *sparse[k].shape[2:]) if k in ("ids", "t_hat") else
                  sparse[k].reshape(-1, 1) for k in ("ids", "t_hat", "entropy", "argmax")]
    device_type = h_s.device.type
    head_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32
    grad_on = torch.is_grad_enabled()
    o = Options(alpha=float(alpha), tau=float(temperature), kind=kind, beta=float(beta), vocab=vocab,
                chunk_size=int(chunk_size), ignore_index=ignore_index, need_h=grad_on and h_s.requires_grad,
                need_w=grad_on and w_s.requires_grad, head_dtype=head_dtype)
    with torch.autocast(device_type, enabled=False):  # the dtypes inside are the loss's own
        loss, s = _FusedLoss.apply(h_s, w_s, h_t, w_t, targets, normalizer, sparse, o)
    return loss, dict(zip(("ce", "kl", "div", "top1", "n"), s.unbind()))
