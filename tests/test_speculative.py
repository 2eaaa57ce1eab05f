"""Speculative decoding: the accept/reject rule keeps the target's distribution, the generator is
exact, the KV cache extends by several tokens and rolls back, transformers takes our student as an
assistant, sample.py --draft."""

import pytest
import torch

import hf
import speculative
from conftest import make_model_dir, random_model, run_script, tiny_config
from model import KVCache, filtered_probs
from speculative import accept as speculative_accept

V = 16  # a tiny vocabulary: every id is drawn often enough to test the distribution


def tiny(seed, vocab_size=V, **kw):  # conftest's tiny model at max_seq_len 64 (unless kw says)
    return random_model(tiny_config(**dict(vocab_size=vocab_size, max_seq_len=64) | kw), seed)


def chi2_ok(counts, p):
    """counts (V,) drawn from p (V,): no draw where p is 0, and the chi-square statistic below df +
    6 sd (its mean is df, its sd sqrt(2 df)): a test at about 1e-6 that is fixed by the seed
    anyway."""
    n, live = counts.sum(), p > 0
    if counts[~live].sum() > 0:  # drew an id that has no probability
        return False
    expected = n * p[live]
    stat = ((counts[live] - expected) ** 2 / expected).sum().item()
    df = live.sum().item() - 1
    return stat < df + 6 * (2 * max(df, 1)) ** 0.5


def first_emitted(p, q, N):
    """The first token emitted by speculative_accept over N rows of the same p (g + 1, V) and q (g,
    V)."""
    g = q.size(0)
    P, Q = p.expand(N, -1, -1), q.expand(N, -1, -1)
    drafted = torch.multinomial(Q.reshape(N * g, V), 1).view(N, g)
    n, nxt = speculative_accept(P, Q, drafted)
    assert ((0 <= n) & (n <= g)).all()
    return torch.where(n > 0, drafted[:, 0], nxt), n


@pytest.mark.parametrize("g", [1, 3])
@pytest.mark.parametrize("sampling", [(1.0, None, None), (0.8, 6, None), (1.3, None, 0.8),
                                      (1.0, 10, 0.9)])
def test_accept_rule_keeps_the_target_distribution(g, sampling):
    torch.manual_seed(g)
    z_p, z_q = torch.randn(g + 1, V) * 1.5, torch.randn(g, V) * 1.5  # two unrelated models' logits
    p, q = filtered_probs(z_p, *sampling), filtered_probs(z_q, *sampling)
    first, n = first_emitted(p, q, 100_000)
    counts = torch.bincount(first, minlength=V).double()
    assert chi2_ok(counts, p[0].double())
    assert not chi2_ok(counts, q[0].double())  # it tells the draft's distribution from the target's
    a = torch.minimum(p[0], q[0]).sum().item()  # the first draft's acceptance is sum min(p, q)
    assert (n > 0).double().mean().item() == pytest.approx(a, abs=0.006)


def test_accept_rule_at_p_equal_q():
    torch.manual_seed(0)
    p = filtered_probs(torch.randn(4, V), 1.0, 8, None)
    first, n = first_emitted(p, p[:3], 100_000)
    assert (n == 3).all()  # nothing is ever rejected
    assert chi2_ok(torch.bincount(first, minlength=V).double(), p[0].double())
    one_hot = filtered_probs(torch.randn(4, V), 0.0)  # greedy: p and q one-hot
    n, nxt = speculative_accept(one_hot[None], one_hot[None, :3], one_hot[:3].argmax(-1)[None])
    assert n.item() == 3 and nxt.item() == one_hot[3].argmax().item()


def test_generator_keeps_the_target_distribution():
    """End to end through the real generator: the first two tokens' joint distribution (the second
    comes from the bonus after an accepted draft, or from the next call after a rollback) is the
    teacher's."""
    teacher, draft = tiny(0, vocab_size=8, n_layer=1), tiny(1, vocab_size=8, n_layer=1)
    prompt, sampling = torch.tensor([[3, 1, 4]]), (1.2, 6, None)
    torch.manual_seed(0)
    counts = torch.zeros(8, 8, dtype=torch.float64)
    for _ in range(1200):
        out = speculative.generate(teacher, draft, prompt, 2, *sampling, draft_len=1)
        counts[out[0, 3], out[0, 4]] += 1
    with torch.no_grad():
        p1 = filtered_probs(teacher.logits(teacher(prompt)[:, -1]), *sampling)[0]
        ctx = torch.cat([prompt.expand(8, -1), torch.arange(8)[:, None]], dim=1)
        p2 = filtered_probs(teacher.logits(teacher(ctx)[:, -1]), *sampling)
    assert chi2_ok(counts.flatten(), (p1[:, None] * p2).flatten().double())


@pytest.mark.parametrize("g", [1, 3, 8])
def test_greedy_equals_the_teachers_greedy(g):
    teacher = tiny(0, vocab_size=64, max_seq_len=48)
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    for draft in (tiny(1, vocab_size=64, n_layer=1), teacher):  # a poor draft, and a perfect one
        stats = {}
        out = speculative.generate(teacher, draft, prompt, 40, 0.0, draft_len=g, stats=stats)
        assert torch.equal(out, teacher.generate(prompt, 40, 0.0))
        assert out.size(1) == 45 and 0 <= stats["accepted"] <= stats["drafted"]
        # every call: its accepted drafts and one more
        assert out.size(1) - 5 == stats["accepted"] + stats["calls"]
    assert stats["accepted"] == stats["drafted"]  # the teacher drafting for itself
    # max_seq_len inside a drafted block: it stops there, the same as without a draft
    long = speculative.generate(teacher, draft, prompt, 100, 0.0, draft_len=g)
    assert long.size(1) == 48 and torch.equal(long, teacher.generate(prompt, 100, 0.0))
    # EOS inside a drafted block ends the output at it
    plain = teacher.generate(prompt, 40, 0.0)
    eos = plain[0, 5 + 7].item()
    first = 5 + (plain[0, 5:] == eos).nonzero()[0].item()
    got = speculative.generate(teacher, teacher, prompt, 40, 0.0, eos_id=eos, draft_len=g)
    assert torch.equal(got, plain[:, :first + 1])


def test_a_draft_with_a_shorter_context_drafts_until_it_is_full():
    teacher = tiny(0, vocab_size=64)  # max_seq_len 64
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    plain = teacher.generate(prompt, 40, 0.0)
    # it drafts up to its last position; with a prompt longer than 4, none
    for draft_len, draft_context in ((3, 15), (3, 4)):
        stats = {}
        # the teacher's weights: every draft passes
        short = tiny(0, vocab_size=64, max_seq_len=draft_context)
        out = speculative.generate(teacher, short, prompt, 40, 0.0, draft_len=draft_len,
                                   stats=stats)
        assert torch.equal(out, plain)
        assert stats["accepted"] == stats["drafted"] == (9 if draft_context == 15 else 0)


def test_draft_must_share_the_vocabulary_and_batch_size_is_one():
    teacher = tiny(0)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative.generate(teacher, tiny(1, vocab_size=V + 1), torch.ones(1, 3, dtype=torch.long),
                             4)
    with pytest.raises(ValueError, match="batch size 1"):
        speculative.generate(teacher, tiny(1), torch.ones(2, 3, dtype=torch.long), 4)


@pytest.mark.parametrize("n_kv_head", [2, 4])  # GQA (K/V expanded) and plain multi-head attention
def test_cache_extends_by_several_tokens_and_rolls_back(n_kv_head):
    model = tiny(0, vocab_size=64, n_kv_head=n_kv_head)
    idx = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, 2, 14, idx.device, torch.float32)
        parts = [model(idx[:, :5], cache), model(idx[:, 5:6], cache)]  # a prefill, one token
        model(torch.randint(0, 64, (2, 4)), cache)  # four tokens the check rejects ...
        cache.pos = 6  # ... rolled back
        # several tokens at pos > 0
        parts += [model(idx[:, 6:10], cache), model(idx[:, 10:14], cache)]
    assert cache.pos == 14
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_transformers_takes_our_student_as_assistant(tmp_path, tokenizer_dir):
    """Our export beside a teacher of the same vocabulary: transformers' assisted generation
    (greedy) gives the teacher's own greedy output, and so does ours."""
    from transformers import AutoModelForCausalLM

    teacher_dir = make_model_dir(tmp_path / "teacher", tokenizer_dir, seed=0)
    student_dir = make_model_dir(tmp_path / "student", tokenizer_dir, seed=1, n_layer=1, n_embd=16,
                                 n_head=2, n_kv_head=1, intermediate_size=32)
    t, s = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (teacher_dir, student_dir))
    idx = torch.randint(1, 320, (1, 6), generator=torch.Generator().manual_seed(0))
    plain = t.generate(idx, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assisted = t.generate(idx, assistant_model=s, max_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert torch.equal(assisted, plain)
    ours_t, ours_s = (hf.load(d, verbose=False) for d in (teacher_dir, student_dir))
    assert torch.equal(speculative.generate(ours_t, ours_s, idx, 20, 0.0, draft_len=4), plain)


@pytest.mark.slow
def test_sample_with_a_draft(tmp_path, model_dir, tokenizer_dir):
    draft = make_model_dir(tmp_path / "draft", tokenizer_dir, seed=1, n_layer=1)
    args = ["sample.py", f"--init_from={model_dir}", "--start=维基百科是", "--num_samples=2",
            "--max_new_tokens=200", "--temperature=0", "--device=cpu"]
    plain, spec = run_script(*args), run_script(*args, f"--draft={draft}", "--draft_len=3")
    assert plain.returncode == 0 and spec.returncode == 0, plain.stderr + spec.stderr
    assert spec.stdout == plain.stdout
    lines = spec.stderr.splitlines()
    notes = [line for line in lines if line.startswith("draft: ")]
    assert len(notes) == 2 and "accepted" in notes[0] and "tokens per teacher call" in notes[0]
    # max_seq_len (128) cuts the samples short: the note is a line of its own before them, not
    # inside the text
    note = next(i for i, line in enumerate(lines) if line.startswith("note: stopping after"))
    first = next(i for i, line in enumerate(lines) if "tokens/s" in line)
    assert "max_seq_len=128" in lines[note] and note < first
    assert "note" not in spec.stdout
