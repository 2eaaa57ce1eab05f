"""
Speculative decoding (Leviathan et al. 2023, Chen et al. 2023): a small draft model (the student)
proposes a few tokens one by one, the model it drafts for (its teacher) scores them all in one call,
and what comes out follows that model's distribution exactly. eval.py measures how well a student
drafts (docs/draft.md).

    out = speculative.generate(teacher, student, idx, max_new_tokens, temperature=0, draft_len=4)

generate and stream take model.generate's arguments, the draft after the model; above model.py,
which knows nothing of drafts.
"""

import torch
import torch.nn.functional as F

from model import KVCache, filtered_probs


@torch.no_grad()
def stream(model, draft, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
           draft_len=4, stats=None):
    """model.stream's tokens, (1,) each, drafted by draft (the same vocabulary; batch size 1): the
    model's greedy tokens exactly at temperature 0, its distribution otherwise. stats, a dict if
    given, counts drafted, accepted and the model's calls."""
    max_new_tokens = min(max_new_tokens, model.room(idx.size(1)))
    return (yield from speculate(model, draft, idx, max_new_tokens, (temperature, top_k, top_p),
                                 eos_id, draft_len, {} if stats is None else stats))


def generate(model, draft, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             eos_id=None, draft_len=4, stats=None):
    """idx (1, T) -> (1, T + new), as model.generate, drafted by draft."""
    new = list(stream(model, draft, idx, max_new_tokens, temperature, top_k, top_p, eos_id,
                      draft_len, stats))
    return torch.cat([idx] + [t[:, None] for t in new], dim=1)


def speculate(model, draft, idx, max_new_tokens, sampling, eos_id, gamma, stats):
    """Yields model's next tokens for idx (1, T), one tensor (1,) each, drafted by draft g = gamma
    at a time; stats counts drafted, accepted and model's calls. With p model's distribution and q
    the draft's (Chen et al. swap the letters), a round: the draft proposes g tokens one by one;
    model scores the last token and the g in one call; a prefix is kept, plus one token of model's
    own (accept), and both KV caches roll back to it. At a round's start model's cache holds all of
    ctx but its last token, the draft's all but the last one or two."""
    if idx.size(0) != 1:
        raise ValueError(f"speculative decoding takes one sequence at a time (batch size 1), "
                         f"got {idx.size(0)}")
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the draft's vocabulary has {draft.config.vocab_size} rows, "
                         f"not {model.config.vocab_size}")
    T, end, dev = idx.size(1), idx.size(1) + max_new_tokens, idx.device
    cache = KVCache(model.config, 1, end, dev, model.embed_tokens.weight.dtype)
    draft_end = min(end, draft.config.max_seq_len)
    dcache = KVCache(draft.config, 1, draft_end, dev, draft.embed_tokens.weight.dtype)
    if T > 1:
        model(idx[:, :-1], cache)
        if T <= draft.config.max_seq_len:  # else g stays 0: the prompt outruns the draft
            draft(idx[:, :-1], dcache)
    ctx = idx
    while ctx.size(1) < end:
        L = ctx.size(1)
        draft_room = draft.config.max_seq_len - L + 1
        g = max(0, min(gamma, end - L - 1, draft_room))  # near the ends: fewer, or none
        x, drafted, q = ctx[:, dcache.pos:], [], []
        for _ in range(g):
            q.append(filtered_probs(draft.logits(draft(x, dcache)[:, -1]), *sampling))  # (1, V)
            x = torch.multinomial(q[-1], 1)  # (1, 1); temperature 0: q is one-hot, x its argmax
            drafted.append(x)
        drafted = torch.cat([ctx[:, :0]] + drafted, dim=1)  # (1, g)
        h = model(torch.cat([ctx[:, -1:], drafted], 1), cache)  # the last token and the g drafts
        p = filtered_probs(model.logits(h), *sampling)
        n, nxt = accept(p, torch.stack(q, 1) if g else p[:, :0], drafted)
        n = n.item()
        cache.pos, dcache.pos = L + n, min(dcache.pos, L + n)  # the rollback
        counts = (("drafted", g), ("accepted", n), ("calls", 1))
        stats.update({k: stats.get(k, 0) + v for k, v in counts})
        new = torch.cat([drafted[:, :n], nxt[:, None]], dim=1)
        for tok in new[0]:
            yield tok[None]
            if tok.item() == eos_id:
                return
        ctx = torch.cat([ctx, new], dim=1)


def accept(p, q, drafted):
    """Speculative decoding's rule for N rows at once: p (N, g + 1, V) the target's distributions,
    q (N, g, V) the draft's, which drew drafted (N, g). -> (n, nxt), (N,) each: keep n drafts, then
    emit nxt. A draft x passes with probability min(1, p(x) / q(x)); at the first rejection nxt is
    drawn from max(0, p - q) renormalized, after g passes from p[g] (the bonus). Every emitted token
    then follows p exactly."""
    N, g = drafted.shape
    px, qx = (d.gather(-1, drafted[..., None])[..., 0] for d in (p[:, :g], q))  # p(x), q(x): (N, g)
    ok = torch.rand_like(qx) * qx < px  # u < p / q without dividing; never when p(x) = 0
    n = ok.int().cumprod(dim=-1).sum(dim=-1)  # the accepted prefix
    rows = torch.arange(N, device=p.device)
    pn, qn = p[rows, n], F.pad(q, (0, 0, 0, 1))[rows, n]  # q is 0 at the bonus: the residual is p
    residual = (pn - qn).clamp(min=0)
    has_mass = residual.sum(-1, keepdim=True) > 0
    residual = torch.where(has_mass, residual, pn)  # p = q up to rounding: p itself
    return n, torch.multinomial(residual, 1)[:, 0]
