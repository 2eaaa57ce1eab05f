"""
The distillation loss: the student's head, and the teacher's, applied a chunk of tokens at a time, so that no
[B, T, V] logits ever exist (2.5 GB in float32 at 8 x 512 x 151,936). docs/loss.md has the design.
"""

import math

import torch

# Distillation loss: fused LM head + KL/CE, chunked over tokens, never materializing the full [B*T, V]
# logits (docs/loss.md: the design, each kind, the derivations). Over the valid tokens i (targets !=
# ignore_index), with tau the temperature and z = h @ w[:vocab_size].T (rows from vocab_size up, Qwen's
# padding ids, are left out of both softmaxes):
#   p_s = softmax(z_s / tau), p_t = softmax(z_t / tau), ce_i = -log softmax(z_s)[target_i]
#   loss = (alpha * tau^2 * sum_i div_i + (1 - alpha) * sum_i ce_i) / N
# div by kind: forward_kl KL(p_t || p_s) (the default), reverse_kl KL(p_s || p_t), jsd beta KL(p_t || M) +
# (1 - beta) KL(p_s || M) with M = beta p_t + (1 - beta) p_s. N: the valid tokens of the call by default;
# under gradient accumulation / DDP the whole step's. The gradients are analytic and computed in the forward
# pass, chunk by chunk (a backward that recomputed the chunks would redo the teacher's matmul); u = z_s / tau:
#   d(tau^2 KL(p_t||p_s))/dz_s = tau (p_s - p_t)
#   d(tau^2 KL(p_s||p_t))/dz_s = tau p_s (log p_s - log p_t - KL(p_s||p_t))
#   d(tau^2 JSD)/dz_s          = tau (1 - beta) p_s (r - sum_v p_s r),  r = log p_s - log M
#   d ce / dz_s                = softmax(z_s) - onehot(target)

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")


def _rowdot(a, b, out):  # sum_v a * b per row: [C, V] x [C, V] -> [C, 1]; out: a free [C, V] buffer
    return torch.mul(a, b, out=out).sum(-1, keepdim=True)


def _head(h, w, out):
    """out [C, V] float32 = h [C, D] @ w [V, D].T. A float16/bfloat16 w (a teacher's head) multiplies in its own dtype
    with a float32 result: a float32 copy of Qwen2.5-0.5B's head would take 0.54 GB at the step's peak, and its
    matmul would run at a T4's float32 rate, 8x slower. CUDA accumulates in float32; elsewhere the product is cast."""
    if w.dtype == torch.float32:
        return torch.mm(h.float(), w.T, out=out)
    h = h.to(w.dtype)
    return out.copy_(torch.mm(h, w.T, out_dtype=torch.float32) if w.is_cuda else torch.mm(h, w.T))


def _kd_chunk(zs, zt, y, a, b, alpha, tau, kind, beta, need_grad, sparse=None):
    """The loss terms of one chunk of C valid tokens, in place in four [C, V] float32 buffers: zs holds the
    student's logits, zt the teacher's divided by tau (None: CE only, or a sparse teacher), a and b are free. The
    comments say what each buffer holds from that line on. With need_grad, zs ends holding dL/dz_s of the
    unnormalized loss. sparse: a sampled teacher (ids, t_hat, entropy, argmax; see distill_loss). Returns the
    chunk's sums [ce, kl, div, top1] (the last three 0 without a teacher)."""
    if sparse is not None:  # forward KL from t_hat; its gradient tau (p_s - t_hat) is tau (p_s - p_t) in expectation
        ids, t_hat, entropy, argmax = sparse                 # [C, K], [C, K] (zero-padded), [C, 1], [C, 1]
        top1 = (zs.gather(1, argmax) >= zs.amax(-1, keepdim=True)).sum().float()
        log_ps = torch.log_softmax(zs.div_(tau), -1, out=a)  # a: log p_s; zs: free
        kl = div = -(t_hat * log_ps.gather(1, ids)).sum(-1, keepdim=True) - entropy  # CE(t_hat, p_s) - H(p_t)
        k = tau
        torch.exp(log_ps, out=zs).scatter_add_(1, ids, -t_hat)  # zs: p_s - t_hat
        kl = div = kl.sum()
        if tau == 1:
            log_q = log_ps
        else:                                                # b: log softmax(tau * log p_s) = log softmax(z_s)
            log_q = torch.mul(log_ps, tau, out=b)
            log_q.sub_(log_q.logsumexp(-1, keepdim=True))
    elif zt is None:
        log_q = torch.log_softmax(zs, -1, out=a)             # a: log softmax(z_s)
        kl = div = top1 = zs.new_zeros(())
    else:  # the student agrees if its logit at the teacher's argmax is its largest (argmax is slow)
        top1 = (zs.gather(1, zt.argmax(-1, keepdim=True)) >= zs.amax(-1, keepdim=True)).sum().float()
        log_ps = torch.log_softmax(zs.div_(tau), -1, out=a)  # a: log p_s (kept to the end); zs: free
        log_pt = torch.log_softmax(zt, -1, out=b)            # b: log p_t
        p_t = torch.exp(log_pt, out=zt)                      # zt: p_t
        kl = _rowdot(p_t, torch.sub(log_pt, log_ps, out=zs), zs)  # KL(p_t || p_s) per row; zs: free
        # each kind leaves g / k in zs, its gradient dL/dz_s divided by k (folded into the mix below)
        if kind == "forward_kl":                             # g = tau (p_s - p_t)
            div, k = kl, tau
            torch.exp(log_ps, out=zs).sub_(p_t)              # zs: p_s - p_t
        elif kind == "reverse_kl":                           # g = tau p_s (r - div)
            r = torch.sub(log_ps, log_pt, out=zt)            # zt: r = log p_s - log p_t
            p_s = torch.exp(log_ps, out=zs)                  # zs: p_s
            div, k = _rowdot(p_s, r, b), tau                 # KL(p_s || p_t); b: free
            p_s.mul_(r.sub_(div))                            # zs: p_s (r - div)
        else:  # jsd: log M = log(1 - beta) + logaddexp(log p_t + log(beta / (1 - beta)), log p_s)
            log_m = torch.add(log_pt, math.log(beta) - math.log1p(-beta), out=zs)
            torch.logaddexp(log_m, log_ps, out=log_m).add_(math.log1p(-beta))  # zs: log M
            kl_tm = _rowdot(p_t, log_pt.sub_(log_m), b)      # KL(p_t || M); b: free
            r = torch.sub(log_ps, log_m, out=zs)             # zs: r = log p_s - log M
            p_s = torch.exp(log_ps, out=zt)                  # zt: p_s
            kl_sm = _rowdot(p_s, r, b)                       # KL(p_s || M); b: free
            div, k = beta * kl_tm + (1 - beta) * kl_sm, tau * (1 - beta)
            r.sub_(kl_sm).mul_(p_s)                          # zs: p_s (r - kl_sm)
        kl, div = kl.sum(), div.sum()
        # CE's log softmax(z_s) = log softmax(tau * log p_s) (softmax ignores a shift): no buffer kept it
        log_q = log_ps if tau == 1 else torch.log_softmax(torch.mul(log_ps, tau, out=zt), -1, out=b)  # b
    ce = -log_q.gather(1, y)                                 # [C, 1]
    if need_grad:  # zs = dL/dz_s = alpha * k * (g / k) + (1 - alpha) * (softmax(z_s) - onehot(y))
        q = log_q.exp_()                                     # softmax(z_s), in log_q's buffer
        if alpha == 0:
            zs.copy_(q)
        else:
            zs.mul_(alpha * k).add_(q, alpha=1 - alpha)
        zs.scatter_add_(1, y, zs.new_full(y.shape, alpha - 1))
    return torch.stack([ce.sum(), kl, div, top1])


class _KDLossFn(torch.autograd.Function):
    """Forward computes the loss and, per chunk, grad_h_s and grad_w_s (float32); backward only
    scales them by grad_output / N. A second backward through the same graph is an error."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, norm, alpha, tau, vocab, ignore_index, kind,
                beta, chunk_size, need_h, need_w, sparse):
        hs = h_s.reshape(-1, h_s.shape[-1])                        # [B*T, D_s]
        ht = h_t.reshape(-1, h_t.shape[-1]) if h_t is not None else None
        y = targets.reshape(-1).long()
        idx = (y != ignore_index).nonzero().squeeze(1)  # [n] valid rows: the call's one host sync (n sizes the chunks)
        ws = w_s[:vocab].float() if need_h or need_w else w_s[:vocab]  # [vocab, D_s]; the gradients' math is float32
        wt = w_t[:vocab] if w_t is not None else None              # [vocab, D_t] in its own dtype (_head), no grad
        n, dev, f32 = idx.numel(), hs.device, torch.float32
        grad_h = torch.zeros(hs.shape, dtype=f32, device=dev) if need_h else None
        grad_w = torch.zeros(w_s.shape, dtype=f32, device=dev) if need_w else None  # padding rows stay 0
        sums = torch.zeros(4, dtype=f32, device=dev)              # ce, kl, div, top1
        # four [C, vocab] buffers, allocated once per call: a fresh one per chunk costs page faults
        C = min(chunk_size, n)
        zs_buf, a_buf, b_buf = torch.empty(3, C, vocab, dtype=f32, device=dev).unbind()
        zt_buf = torch.empty(C, vocab, dtype=f32, device=dev) if ht is not None else None
        for i in range(0, n, chunk_size):
            ix = idx[i:i + chunk_size]
            c = len(ix)
            h_c, y_c = hs[ix].float(), y[ix, None]                 # [c, D_s], [c, 1]
            zs = _head(h_c, ws, zs_buf[:c])                        # [c, vocab] student logits
            zt = None if ht is None else _head(ht[ix] / tau, wt, zt_buf[:c])  # z_t / tau
            sp = None if sparse is None else [t[ix] for t in sparse]
            sums += _kd_chunk(zs, zt, y_c, a_buf[:c], b_buf[:c], alpha, tau, kind, beta, need_h or need_w, sp)
            if need_h:                                             # zs now holds dL/dz_s
                grad_h.index_copy_(0, ix, zs @ ws)
            if need_w:
                grad_w[:vocab].addmm_(zs.T, h_c)
        del zs_buf, a_buf, b_buf, zt_buf
        n_t = torch.full((), float(n), device=dev)                # (a fill: no copy from the host, no sync)
        N = n_t.clamp(min=1) if norm is None else norm.clamp(min=1e-12)  # 0 tokens: loss 0, no NaN
        ce, kl, div, top1 = (sums / N).unbind()
        loss = alpha * tau * tau * div + (1 - alpha) * ce
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
        return (grad_h, grad_w) + (None,) * 14


def distill_loss(h_s, w_s, h_t, w_t, targets, alpha=0.5, temperature=2.0, vocab_size=None,
                 ignore_index=-100, kind="forward_kl", chunk_size=256, beta=0.5, normalizer=None, sparse=None):
    """Fused chunked distillation loss, see the comment above. h_s [B, T, D_s] student hidden
    states after the final norm, w_s [V, D_s] student head; h_t [B, T, D_t], w_t [V, D_t] teacher's
    (no gradient; both None -> CE only, needs alpha == 0); targets [B, T] (int64).
    sparse: instead of h_t, w_t, a sampled teacher (cache.py), forward_kl only: a dict of ids [B, T, K] (int64)
    and t_hat [B, T, K] (float32, zero-padded, each token's summing to 1), entropy [B, T] (the teacher's, at the
    temperature) and argmax [B, T]; kl and div are then the unbiased estimate CE(t_hat, p_s) - entropy.
    normalizer: number or 0-dim tensor to divide the summed terms by (default: valid tokens here).
    Returns (loss, stats), stats of detached 0-dim float32 tensors: ce, kl (always forward KL at
    this temperature, without tau^2), div (the `kind` divergence), top1 (student/teacher argmax
    agreements), all summed over tokens and divided by the normalizer; n (valid tokens here)."""
    if kind not in KD_KINDS:
        raise ValueError(f"kind must be one of {KD_KINDS}, got {kind!r}")
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
    grad_on = torch.is_grad_enabled()
    loss, s = _KDLossFn.apply(h_s, w_s, h_t, w_t, targets, normalizer, float(alpha),
                              float(temperature), vocab, ignore_index, kind, float(beta),
                              int(chunk_size), grad_on and h_s.requires_grad,
                              grad_on and w_s.requires_grad, None if sparse is None else [
                                  sparse[k].reshape(-1, *sparse[k].shape[2:]) if k in ("ids", "t_hat") else
                                  sparse[k].reshape(-1, 1) for k in ("ids", "t_hat", "entropy", "argmax")])
    if h_t is None and sparse is None:
        return loss, {"ce": s[0], "n": s[4]}
    return loss, {"ce": s[0], "kl": s[1], "div": s[2], "top1": s[3], "n": s[4]}
