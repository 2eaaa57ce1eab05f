"""On-policy distillation (onpolicy.py, distill.py's onpolicy_* settings): the continuations follow
the student's distribution and depend on their window alone, the loss of an on-policy window
equals a plain full-logits computation (values and gradients, EOS masking, the prefix's own loss),
a resumed run is the straight run, two processes give one process's gradient, bad settings are one
line."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import onpolicy
from conftest import REPO, TINY, assert_one_line_error, read_log, run_script
from model import ModelConfig, Transformer, sample_next


def tiny(seed, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8,
               intermediate_size=48, max_seq_len=64, rope_theta=10000.0)
    model = Transformer(ModelConfig(**dict(cfg, **kw)), verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model.eval()


def test_draws_sample_the_distribution():
    """sample_next with draws (inverse CDF) picks each id with its probability (chi-square over
    60,000 draws of a 40-id distribution, zero-probability ids never), at a temperature, top-k."""
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(0)) * 2
    u = onpolicy.draws(7, 0, range(60_000), 1)[:, 0]
    for temperature, top_k in ((1.0, None), (0.7, 10)):
        got = sample_next(logits.expand(len(u), -1), temperature, top_k, draw=u)
        p = F.softmax(logits[0] / temperature, -1)
        if top_k:
            p = torch.where(p >= p.topk(top_k).values[-1], p, 0)
            p = p / p.sum()
        counts = torch.bincount(got, minlength=40).double()
        assert counts[p == 0].sum() == 0
        live = p > 0
        expected = len(u) * p[live].double()
        stat = ((counts[live] - expected) ** 2 / expected).sum().item()
        df = live.sum().item() - 1
        assert stat < df + 6 * (2 * df) ** 0.5, (temperature, stat, df)


def test_a_continuation_depends_on_its_window_alone():
    """The same window's continuation, alone or in a batch with others, and its draws from (seed,
    iteration, window): what makes a run's samples the same on one process or two, and on resume.
    keep ends where the student's EOS is read."""
    student = tiny(1)
    x = torch.randint(0, 40, (3, 24), generator=torch.Generator().manual_seed(2))
    u = onpolicy.draws(5, 3, [10, 11, 12], 8)
    assert torch.equal(u, onpolicy.draws(5, 3, [10, 11, 12], 8))
    assert not torch.equal(u, onpolicy.draws(5, 4, [10, 11, 12], 8))  # another iteration
    together, keep = onpolicy.continue_windows(student, x, 8, 1.0, u, 7, 40)
    alone, _ = onpolicy.continue_windows(student, x[1:2], 8, 1.0, u[1:2], 7, 40)
    assert torch.equal(together[1], alone[0]) and torch.equal(together[:, :16], x[:, :16])
    own = together[:, 16:]
    for b in range(3):
        first = (own[b] == 7).nonzero()
        n = first[0, 0].item() if len(first) else 8
        assert keep[b].tolist() == [k < n for k in range(8)], (own[b], keep[b])


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd", "forward_kl"])
def test_the_loss_of_an_on_policy_window_equals_full_logits(kind):
    """onpolicy.loss against a plain full-logits computation: over the prefix the usual loss (alpha
    T^2 divergence + (1 - alpha) CE on the real next tokens), over the student's own positions kind
    alone, T^2 scaled, up to its EOS; one normalizer, the number of positions that count. Values
    and both gradients, float64 reference."""
    g = torch.Generator().manual_seed(3)
    B, T, n, V, D = 3, 20, 8, 40, 16
    h_s, h_t = torch.randn(B, T, D, generator=g), torch.randn(B, T, D + 8, generator=g)
    w_s, w_t = torch.randn(V, D, generator=g) * 0.5, torch.randn(V, D + 8, generator=g) * 0.5
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    keep = torch.ones(B, n, dtype=torch.bool)
    keep[0, 3:] = False  # an EOS read at the prefix's 4th own position
    keep[2, 0:] = False  # the first own token was the EOS
    N = B * (T - n) + keep.sum()
    tau, alpha, beta = 2.0, 0.3, 0.4
    hs, ws = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    got, stats = onpolicy.loss(hs, ws, h_t, w_t, x, y, keep, N, kind, alpha=alpha,
                               temperature=tau, kind=kind if kind == "jsd" else "forward_kl",
                               beta=beta, chunk_size=7)
    got.backward()

    hd, wd = h_s.double().requires_grad_(), w_s.double().requires_grad_()
    z_s, z_t = hd @ wd.T, h_t.double() @ w_t.double().T
    ls, lt = F.log_softmax(z_s / tau, -1), F.log_softmax(z_t / tau, -1)

    def div(name):  # per position, (B, T)
        if name == "forward_kl":
            return (lt.exp() * (lt - ls)).sum(-1)
        if name == "reverse_kl":
            return (ls.exp() * (ls - lt)).sum(-1)
        m = torch.logaddexp(lt + torch.log(torch.tensor(beta)),
                            ls + torch.log1p(torch.tensor(-beta)))
        return beta * (lt.exp() * (lt - m)).sum(-1) + (1 - beta) * (ls.exp() * (ls - m)).sum(-1)

    prefix_kind = "jsd" if kind == "jsd" else "forward_kl"
    ce = F.cross_entropy(z_s.flatten(0, 1), y.flatten(), reduction="none").view(B, T)
    P = T - n
    want = (alpha * tau ** 2 * div(prefix_kind)[:, :P] + (1 - alpha) * ce[:, :P]).sum()
    want = (want + tau ** 2 * (div(kind)[:, P:] * keep).sum()) / N
    want.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=0)
    for a, b in ((hs.grad, hd.grad), (ws.grad, wd.grad)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
    assert stats["n"] == B * P and stats["n_own"] == keep.sum()
    fkl = div("forward_kl")
    torch.testing.assert_close(stats["own_kl"].double(), (fkl[:, P:] * keep).sum() / N, rtol=1e-5,
                               atol=0)


# -----------------------------------------------------------------------------
# through distill.py

# conftest's straight run (TINY and LEARN, no on-policy step) as distill.py ran it at 89b5d54, the
# commit before on-policy steps existed: its loss every 8th iteration and its val CE at each eval
# (there, rows and weights were bit-identical to today's; the tolerance is for other CPUs)
BEFORE_LOSS = [1.842741, 1.685507, 1.58207, 1.46116, 1.462171]
BEFORE_VAL_CE = [5.705576, 5.558591, 5.747286, 5.829959, 5.83188]


@pytest.mark.slow
def test_without_on_policy_steps_a_run_is_the_run_from_before(straight):
    train, evals = read_log(straight)
    assert not any("own_kl" in r or "gen_share" in r for r in train)  # the rows of before
    assert [r["loss"] for r in train[::8]] == pytest.approx(BEFORE_LOSS, rel=1e-4)
    assert [r["val_ce"] for r in evals] == pytest.approx(BEFORE_VAL_CE, rel=1e-4)


ON = ["--onpolicy_tokens=16", "--alpha=0.9", "--learning_rate=3e-3", "--warmup_iters=5",
      "--max_iters=12", "--lr_decay_iters=12", "--eval_interval=4"]


@pytest.fixture(scope="module")
def onpolicy_run(tmp_path_factory, data, model_dir):
    out = tmp_path_factory.mktemp("onpolicy")
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={out}",
                   *TINY, *ON)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_an_on_policy_run_logs_its_generation(onpolicy_run):
    """Every train row of an on-policy run has the student's own KL, the teacher's log-probability
    of the student's tokens, and the generation's share of the time."""
    train, evals = read_log(onpolicy_run)
    assert [r["iter"] for r in train] == list(range(12)) and evals[-1]["iter"] == 12
    for r in train:
        assert r["own_kl"] > 0 and r["own_teacher_logprob"] < 0 and 0 < r["gen_share"] < 1, r
        assert r["ce"] > 0 and r["kl"] > 0


@pytest.mark.slow
def test_resume_in_the_middle_of_an_on_policy_run_is_exact(onpolicy_run, data, model_dir, tmp_path):
    args = [f"--data_dir={data}", f"--teacher={model_dir}", f"--out_dir={tmp_path}", *TINY, *ON]
    assert run_script("distill.py", *args, "--max_iters=8").returncode == 0
    r = run_script("distill.py", *args, "--init_from=resume")
    assert r.returncode == 0, r.stderr
    timing = ("tokens_per_sec", "peak_mem_gb", "gen_share")
    strip = lambda rows: [{k: v for k, v in x.items() if k not in timing} for x in rows]  # noqa: E731
    assert [strip(x) for x in read_log(tmp_path)] == [strip(x) for x in read_log(onpolicy_run)]
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["model"]
            for d in (tmp_path, onpolicy_run))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_share_of_the_steps_is_on_policy(data, model_dir, tmp_path):
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={model_dir}",
                   f"--out_dir={tmp_path}", *TINY, *ON, "--onpolicy_share=0.5", "--max_iters=6")
    assert r.returncode == 0, r.stderr
    assert [r["own_kl"] is not None for r in read_log(tmp_path)[0]] == [False, True] * 3


DDP_ONPOLICY = '''
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from torch.nn.parallel import DistributedDataParallel as DDP
import onpolicy
from model import ModelConfig, Transformer
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
cfg = dict(vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=16, head_dim=8,
           intermediate_size=24, max_seq_len=32)
student = Transformer(ModelConfig(**cfg), verbose=False)
teacher = Transformer(ModelConfig(**dict(cfg, n_embd=24, head_dim=12)), verbose=False)
teacher.requires_grad_(False)
x, y = torch.randint(0, 50, (4, 16)), torch.randint(0, 50, (4, 16))
windows = list(range(100, 104))
part = slice(2 * rank, 2 * rank + 2) if world > 1 else slice(0, 4)
x, y, windows = x[part], y[part], windows[part]
u = onpolicy.draws(1, 5, windows, 6)
x_new, keep = onpolicy.continue_windows(student, x, 6, 1.0, u, 3, 50)
n = torch.tensor(float(y[:, :-6].numel()) + keep.sum())
dist.all_reduce(n)
model = DDP(student) if world > 1 else student
loss, _ = onpolicy.loss(model(x_new), student.lm_head.weight, teacher(x_new),
                        teacher.lm_head.weight, x_new, y, keep, n / world, "reverse_kl",
                        alpha=0.5, temperature=2.0, kind="forward_kl")
loss.backward()
if rank == 0:
    torch.save({k: p.grad for k, p in student.named_parameters()}, sys.argv[2])
dist.barrier()
del model
import gc; gc.collect()
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_processes_give_one_processs_gradient(tmp_path):
    """Each process continues its own windows (their draws, not the process's) and normalizes by
    the step's tokens of both: the gradient is one process's on all the windows."""
    script = tmp_path / "grads.py"
    script.write_text(DDP_ONPOLICY)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for nproc, out in ((1, "one.pt"), (2, "two.pt")):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={nproc}", str(script), REPO, str(tmp_path / out)],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    for k in one:
        assert (one[k] - two[k]).abs().max().item() <= 1e-6 + 1e-5 * one[k].abs().max().item(), k


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["--onpolicy_tokens=64"], "onpolicy_tokens=64: must be in [0, 63]"),
    (["--onpolicy_tokens=8", "--teacher=None"], "on-policy steps need the teacher online"),
    (["--onpolicy_tokens=8", "--teacher_cache={tmp}/cache"], "teacher_cache='"),
    (["--onpolicy_tokens=8", "--onpolicy_share=0"], "onpolicy_share=0.0: must be in (0, 1]"),
    (["--onpolicy_kind=kl"], "onpolicy_kind='kl': must be one of forward_kl, reverse_kl, jsd"),
], ids=["longer than the window", "no teacher", "teacher cache", "share", "kind"])
def test_bad_on_policy_settings_are_one_line(extra, message, data, model_dir, tmp_path):
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={model_dir}",
                   f"--out_dir={tmp_path / 'out'}", *TINY, *[e.format(tmp=tmp_path) for e in extra])
    assert_one_line_error(r, "distill.py", message)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--dtype=float16"], ["--dtype=bfloat16"], ["--compile=True"],
                                   ["--init_from=prune", "--n_head=4", "--n_kv_head=2",
                                    "--intermediate_size=48", "--prune_windows=8"], "ddp"],
                         ids=["float16", "bfloat16", "compile", "prune", "two processes"])
def test_on_policy_with_each_way_to_train(extra, data, model_dir, tmp_path):
    """On-policy steps under autocast (float16's GradScaler), torch.compile, a pruned start and two
    processes: the run finishes, every row finite, its own positions counted."""
    ddp = extra == "ddp"
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={model_dir}",
                   f"--out_dir={tmp_path}", *TINY, *ON, "--max_iters=4", *([] if ddp else extra),
                   ddp=ddp, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    train, evals = read_log(tmp_path)
    assert [row["iter"] for row in train] == list(range(4))
    assert all(torch.isfinite(torch.tensor([row["loss"], row["own_kl"]])).all() for row in train)
