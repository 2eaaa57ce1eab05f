"""The GPU suite: every CUDA path of the project at tiny sizes, on one GPU, in a few minutes.

    python -m pytest -m gpu

Without a CUDA GPU this file is skipped with one line, and the CPU suite does not wait for it. Each
test says what it guards: most of it is what only a GPU can tell (CUDA's dtype rules for the head's
products, SDPA's fused kernels, TF32, host syncs, pinned copies, NCCL, Triton). `GPU_SUITE_ON=cpu
python -m pytest -m gpu` runs what a CPU can of it (the half dtypes emulated, gloo for NCCL): a
check of the tests themselves on a machine without a GPU.
"""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hf
from conftest import TINY, make_loud_model_dir, make_model_dir, read_log, run_script, untimed

pytestmark = pytest.mark.gpu
DEVICE = "cpu" if os.environ.get("GPU_SUITE_ON") == "cpu" else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: the GPU suite (python -m pytest -m gpu) needs one",
                allow_module_level=True)
ON_GPU = DEVICE == "cuda"
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="CUDA only")
SM80 = ON_GPU and torch.cuda.get_device_capability() >= (8, 0)
# bfloat16 where the GPU has it (sm80+; a T4 emulates it, and distill.py refuses it there); a CPU
# emulates both
HALF = [torch.float16] + ([torch.bfloat16] if SM80 or not ON_GPU else [])
DTYPES = [torch.float32] + HALF
NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
ON = [f"--device={DEVICE}"]  # after TINY: later flags win


# -----------------------------------------------------------------------------
# model.py


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: NAME[d])
def test_model_in_half_precision_is_as_close_as_transformers(dtype, model_dir):
    """model.py in float16/bfloat16 on the GPU (SDPA's fused kernels; GQA through flash attention on
    sm80+) lands as close to the float32 logits as transformers' Qwen2ForCausalLM in the same dtype:
    its largest error at most twice theirs plus one rounding step of the logits' size."""
    from transformers import AutoModelForCausalLM


    x = torch.randint(0, 300, (2, 64), device=DEVICE)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).eval()
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(DEVICE).eval()
    ours = hf.load(model_dir, dtype=dtype, device=DEVICE, verbose=False)
    with torch.no_grad():
        z = ref(x).logits.float()
        theirs_err = (theirs(x).logits.float() - z).abs().max().item()
        ours_err = (ours.logits(ours(x)) - z).abs().max().item()
    step = torch.finfo(dtype).eps * z.abs().max().item()
    assert ours_err <= 2 * theirs_err + step, (ours_err, theirs_err)


def test_greedy_generation_equals_transformers_on_the_gpu(model_dir, tmp_path):
    """float32 on the GPU (TF32 off): model.py's KV-cache generation gives transformers' greedy
    tokens; speculative decoding with a draft gives the same tokens again."""
    from transformers import AutoModelForCausalLM

    import speculative

    ours = hf.load(model_dir, device=DEVICE, verbose=False)
    draft = hf.load(make_model_dir(tmp_path / "draft", seed=5, n_layer=1), device=DEVICE,
                                        verbose=False)
    ref = AutoModelForCausalLM.from_pretrained(model_dir).to(DEVICE).eval()
    prompt = torch.randint(0, 300, (1, 8), device=DEVICE)
    want = ref.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert torch.equal(ours.generate(prompt, 24, temperature=0), want)
    for g in (1, 4):
        out = speculative.generate(ours, draft, prompt, 24, temperature=0, draft_len=g)
        assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NAME[d])
def test_a_training_step_uses_fused_attention_only(dtype):
    """A student step with SDPA held to its fused kernels (flash, memory-efficient): model.py picks
    a path that has one in every dtype (GQA expanded where flash is out of reach), so no step falls
    back to the math kernel, which would hold (T, T) scores."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model import ModelConfig, Transformer

    if not ON_GPU:
        pytest.skip("a CPU has no fused SDPA kernels to hold to")
    model = Transformer(ModelConfig(vocab_size=512, n_layer=2, n_head=8, n_kv_head=2, n_embd=128,
                                    head_dim=16, intermediate_size=256, max_seq_len=256),
                        verbose=False).to(DEVICE)
    x = torch.randint(0, 512, (2, 256), device=DEVICE)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            model(x).float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# -----------------------------------------------------------------------------
# the fused loss


LOSS_MODES = ["forward_kl", "reverse_kl", "jsd", "cache"]
# compile on: each dtype with forward KL, and every mode in float16 (a T4's dtype): 6 compiles
LOSS_CASES = [(dt, mode, c) for dt in DTYPES for mode in LOSS_MODES for c in (False, True)
              if not c or mode == "forward_kl" or dt == torch.float16]


def loss_inputs(mode):
    from test_loss import make_inputs

    h_s, w_s, h_t, w_t, y = (t.to(DEVICE) for t in make_inputs(21, vocab=137))
    if mode != "cache":
        return dict(h_s=h_s, w_s=w_s, h_t=h_t, w_t=w_t, targets=y, kind=mode), None
    K, g = 6, torch.Generator().manual_seed(0)
    ids = torch.randint(0, 137, (*y.shape, K), generator=g).to(DEVICE)
    t_hat = torch.rand(*y.shape, K, generator=g).to(DEVICE)
    sparse = dict(ids=ids, t_hat=t_hat / t_hat.sum(-1, keepdim=True),
                  entropy=torch.ones(y.shape, device=DEVICE), argmax=ids[..., 0])
    return dict(h_s=h_s, w_s=w_s, h_t=None, w_t=None, targets=y, sparse=sparse), sparse


def loss_and_grads(args, dtype, compile, **kw):
    from loss import distill_loss

    h_s, w_s = args["h_s"].clone().requires_grad_(), args["w_s"].clone().requires_grad_()
    rest = {k: v for k, v in args.items() if k not in ("h_s", "w_s", "h_t", "w_t", "targets")}
    with torch.autocast(torch.device(DEVICE).type, dtype=dtype, enabled=dtype != torch.float32):
        loss, stats = distill_loss(h_s, w_s, args["h_t"], args["w_t"], args["targets"], alpha=0.5,
                                   temperature=2.0, vocab_size=137, chunk_size=11,
                                   compile=compile, **rest, **kw)
    loss.backward()
    return loss.detach(), stats, h_s.grad, w_s.grad


@pytest.mark.parametrize("dtype, mode, compile", LOSS_CASES,
                         ids=lambda v: NAME.get(v, v) if not isinstance(v, bool)
                         else ("compiled" if v else "eager"))
def test_fused_loss_matches_the_reference(dtype, mode, compile, fresh_compile):
    """distill_loss on the GPU against the float64 full-logits reference_loss: values and gradients
    to 1e-5 in float32; under autocast the student's head products run in the half dtype on tensor
    cores, its gradient accumulated into float32 (torch.addmm with out_dtype, what torch 2.8 and 2.9
    refuse on CUDA), and the results stay within that dtype's rounding of float32's. compile: the
    chunk through inductor (Triton on a GPU)."""
    import loss as loss_lib
    from test_loss import close, reference

    args, sparse = loss_inputs(mode)
    got = loss_and_grads(args, dtype, compile)
    if compile:
        assert loss_lib._compiled["terms"] is not None  # it compiled: no fall-back
    if dtype == torch.float32:
        kw = dict(kind=mode) if sparse is None else dict(sparse=sparse)
        want = reference(args["h_s"], args["w_s"], args["h_t"], args["w_t"], args["targets"],
                         alpha=0.5, temperature=2.0, vocab_size=137, **kw)
        close(got[0], want[0], rtol=2e-5)
        for k in want[1]:
            close(got[1][k], want[1][k], rtol=2e-5)
        close(got[2], want[2], rtol=2e-5)
        close(got[3], want[3], rtol=2e-5)
        return
    want = loss_and_grads(args, torch.float32, False)
    eps = torch.finfo(dtype).eps
    assert got[2].dtype == got[3].dtype == torch.float32 and torch.isfinite(got[3]).all()
    assert abs(got[0] - want[0]) <= 4 * eps * want[0]
    for g, w in ((got[2], want[2]), (got[3], want[3])):
        assert F.cosine_similarity(g.flatten().double(), w.flatten().double(), 0) > 1 - 4 * eps


@needs_cuda
def test_the_fused_loss_never_waits_for_the_gpu():
    """distill_loss forward and backward, in float16, with ignored tokens among the targets, make no
    host sync (CUDA's sync debug mode turns one into an error): the step's one sync stays the
    loop's."""
    args, _ = loss_inputs("forward_kl")
    loss_and_grads(args, torch.float16, False)  # warm: the first call of some kernels allocates
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_and_grads(args, torch.float16, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_forward_kl_is_exact_under_tf32():
    """distill.py turns TF32 on for float32 matmuls on Ampere and newer. The logged forward KL is a
    difference of row sums, which TF32 would round to 10 bits: 1e-3 to 1e-2 nats. It stays within
    1e-5 of float64."""
    from loss import distill_loss
    from test_loss import reference

    g = torch.Generator().manual_seed(3)
    h_s, h_t = torch.randn(4, 64, 48, generator=g), torch.randn(4, 64, 48, generator=g)
    # logits ~4
    w_s, w_t = torch.randn(2000, 48, generator=g) * 0.6, torch.randn(2000, 48, generator=g) * 0.6
    y = torch.randint(0, 2000, (4, 64), generator=g)
    want = reference(h_s, w_s, h_t, w_t, y, temperature=1.0, vocab_size=2000)[1]["kl"].item()
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.no_grad():
            _, s = distill_loss(*(t.to(DEVICE) for t in (h_s, w_s, h_t, w_t, y)),
                                temperature=1.0, chunk_size=64, vocab_size=2000)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert abs(s["kl"].item() - want) <= 1e-5 * max(1.0, want), (s["kl"].item(), want)


@needs_cuda
def test_the_cache_copies_from_pinned_memory(tmp_path):
    """cache.Cache.batch pins its arrays before the non-blocking copy: a pageable copy would wait
    for the GPU, and the next batch is read while the GPU still works."""
    from torch.profiler import ProfilerActivity, profile

    from cache import TOKEN, Cache

    T = 16
    tokens = np.zeros(2 * T, dtype=TOKEN)
    tokens["n"] = 1
    for split in ("train", "val"):
        tokens.tofile(tmp_path / f"{split}.tokens.bin")
        np.full(2 * T, 1 << 24, dtype=np.uint32).tofile(tmp_path / f"{split}.entries.bin")
    cache = Cache(str(tmp_path), T)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        batch = cache.batch("train", [0, 1], DEVICE)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert batch["t_hat"].device.type == "cuda" and any("Memcpy HtoD" in n for n in names), names
    assert not any("Pageable" in n for n in names), [n for n in names if "Memcpy" in n]


# -----------------------------------------------------------------------------
# distill.py, sample.py, eval.py on the GPU


@pytest.fixture(scope="module")
def loud(tmp_path_factory, tokenizer_dir):
    return make_loud_model_dir(tmp_path_factory.mktemp("loud") / "teacher", tokenizer_dir)


def train(*extra, out, data, teacher, env=None):
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={teacher}", f"--out_dir={out}",
                   *TINY, *ON, "--max_iters=10", "--lr_decay_iters=10", "--eval_interval=5",
                   "--learning_rate=3e-3", "--warmup_iters=2", *extra, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NAME[d])
def test_on_policy_steps_in_each_dtype(dtype, data, model_dir, tmp_path):
    """On-policy steps (onpolicy.py: continuations with a KV cache under autocast, the two-part
    loss) on the GPU in each dtype, then a compiled run: every row finite, the generation's share
    of the time logged."""
    for extra in (["--compile=True"] if dtype == torch.float16 else []), []:
        out = tmp_path / ("compiled" if extra else "eager")
        train(f"--dtype={NAME[dtype]}", "--onpolicy_tokens=16", "--teacher_dtype=float16", *extra,
              out=out, data=data, teacher=model_dir)
        rows = read_log(out)[0]
        assert all(np.isfinite(r["loss"]) and np.isfinite(r["own_kl"]) and 0 < r["gen_share"] < 1
                   for r in rows)
        if not extra:
            break


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NAME[d])
def test_distill_trains_in_each_dtype(dtype, data, loud, tmp_path):
    """A tiny run per student dtype (autocast, float16's GradScaler) from a float16 teacher whose
    residual stream outgrows float16 (teacher_fp32_residual keeps it finite): it trains, and logs
    GPU memory and, on a GPU in common.py's table, MFU."""
    train(f"--dtype={NAME[dtype]}", "--teacher_dtype=float16", out=tmp_path, data=data,
          teacher=loud)
    rows, evals = read_log(tmp_path)
    assert evals[-1]["val_ce"] < evals[0]["val_ce"] and all(np.isfinite(r["loss"]) for r in rows)
    if ON_GPU:
        from common import PEAK_FLOPS

        assert rows[-1]["peak_reserved_gb"] > 0
        words = torch.cuda.get_device_name().replace("-", " ").split()
        known = any(all(w in words for w in names) for names, _ in PEAK_FLOPS)
        assert (rows[-1]["mfu"] is not None) == known

@pytest.mark.slow
def test_cache_and_prune_on_the_gpu(data, model_dir, tmp_path):
    """The teacher cache's build and training from it, and init_from=prune's calibration, in
    float16."""
    r = train("--dtype=float16", "--teacher_dtype=float16", f"--teacher_cache={tmp_path / 'cache'}",
              out=tmp_path / "cached", data=data, teacher=model_dir)
    assert "built the teacher cache" in r.stdout
    r = train("--dtype=float16", "--init_from=prune", "--n_head=4", "--n_kv_head=2",
              "--intermediate_size=48", "--prune_windows=8", out=tmp_path / "pruned", data=data,
              teacher=model_dir)
    assert "pruned the student out of the teacher" in r.stdout

@pytest.mark.slow
def test_resume_is_bit_exact_on_the_gpu(data, model_dir, tmp_path):
    """--deterministic=True (attention's backward without atomics): 5 iterations, then a resume to
    10, give the rows and weights of 10 straight to the bit, float16's GradScaler state included."""
    from conftest import load_student

    args = ["--dtype=float16", "--teacher_dtype=float16", "--deterministic=True"]
    train(*args, out=tmp_path / "straight", data=data, teacher=model_dir)
    train(*args, "--max_iters=5", out=tmp_path / "resumed", data=data, teacher=model_dir)
    train(*args, "--init_from=resume", out=tmp_path / "resumed", data=data, teacher=model_dir)
    resumed, straight = (read_log(tmp_path / d) for d in ("resumed", "straight"))
    assert [untimed(rows, "teacher_val_ce") for rows in resumed] == \
        [untimed(rows, "teacher_val_ce") for rows in straight]
    a, b = (load_student(tmp_path / d)[0].state_dict() for d in ("resumed", "straight"))
    assert all(torch.equal(a[k], b[k]) for k in a)

@pytest.mark.slow
def test_torchrun_with_nccl(data, model_dir, tmp_path):
    """distill.py under torch.distributed.run with NCCL, one process per GPU (two where there are
    two): its first eval equals one process's."""
    nproc = min(2, torch.cuda.device_count()) if ON_GPU else 2
    one = train(out=tmp_path / "one", data=data, teacher=model_dir)
    many = run_script("distill.py", f"--data_dir={data}", f"--teacher={model_dir}",
                      f"--out_dir={tmp_path / 'many'}", *TINY, *ON, "--max_iters=2",
                      "--eval_interval=5", ddp=nproc)
    assert many.returncode == 0, many.stdout[-2000:] + many.stderr[-3000:]
    assert one.returncode == 0 and f"{nproc} processes" in many.stdout
    first = read_log(tmp_path / "one")[1][0]
    for k in ("val_ce", "val_kl", "val_top1", "teacher_val_ce"):
        assert read_log(tmp_path / "many")[1][0][k] == pytest.approx(first[k], abs=1e-4)

@pytest.mark.slow
def test_compile_works_and_falls_back(data, model_dir, tmp_path):
    """--compile=True on the GPU: the student, the teacher and the loss's chunk compile (inductor,
    Triton) and train to within float rounding of eager. Then with no C compiler for Triton's
    launcher and fresh caches, each fails once, with one warning, and the run goes on eager."""
    args = ["--dtype=float16", "--teacher_dtype=float16"]
    eager = train(*args, out=tmp_path / "eager", data=data, teacher=model_dir)
    fast = train(*args, "--compile=True", out=tmp_path / "compiled", data=data, teacher=model_dir,
                 env=dict(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor")))
    assert eager.returncode == fast.returncode == 0, fast.stderr
    assert "torch.compile failed" not in fast.stderr, fast.stderr
    a, b = (read_log(tmp_path / d)[1][-1] for d in ("eager", "compiled"))
    assert b["val_ce"] == pytest.approx(a["val_ce"], rel=1e-2)
    broken = dict(CC="/nonexistent", CXX="/nonexistent",
                  TRITON_CACHE_DIR=str(tmp_path / "triton_cold"),
                  TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor_cold"))
    r = train(*args, "--compile=True", out=tmp_path / "broken", data=data, teacher=model_dir,
              env=broken)
    for what in ("the student", "the teacher", "distill_loss"):
        assert r.stderr.count(f"Warning: {what}: torch.compile failed") == 1, r.stderr[-3000:]

@pytest.mark.slow
def test_sample_and_eval_with_a_float16_teacher(loud, data, tokenizer_dir, tmp_path):
    """sample.py and eval.py load a float16 model with its residual stream in float32 (as
    distill.py's teacher): the loud teacher samples, and eval.py measures a student against it and
    drafts for it, all finite."""
    r = run_script("sample.py", f"--init_from={loud}", "--dtype=float16", f"--device={DEVICE}",
                   "--num_samples=1", "--max_new_tokens=16", "--temperature=0.8")
    assert r.returncode == 0, r.stderr
    student = make_model_dir(tmp_path / "student", tokenizer_dir, seed=3, n_layer=1)
    r = run_script("eval.py", f"--teacher={loud}", f"--student={student}", f"--data={data}",
                   "--dtype=float16", f"--device={DEVICE}", "--block_size=32", "--windows=4",
                   "--prompts=2", "--prompt_len=8", "--new_tokens=8", "--draft_lens=2",
                   f"--out={tmp_path / 'eval.json'}")
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "eval.json").read_text())
    numbers = [v for v in got["students"][student].values() if isinstance(v, float)]
    assert np.isfinite(got["teacher_val_ce"]) and all(np.isfinite(v) for v in numbers)
