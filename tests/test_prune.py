"""prune.py: the student cut out of a teacher holds exactly the kept slices of its weights; pieces
that do nothing rank last; cutting a teacher into its own shape changes nothing, through distill.py
and the HF export."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf
from conftest import TINY, make_model_dir, random_model, read_log, run_script
from model import CONFIGS, ModelConfig, Transformer
from prune import importance, prune, select

TEACHER = ModelConfig(vocab_size=96, n_layer=4, n_head=6, n_kv_head=2, n_embd=48, head_dim=8,
                      intermediate_size=40, max_seq_len=64)
STUDENT = ModelConfig(vocab_size=96, n_layer=2, n_head=2, n_kv_head=1, n_embd=16, head_dim=8,
                      intermediate_size=12, max_seq_len=64)


def random_teacher(seed=0):
    return random_model(TEACHER, seed)


def batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (2, 24), generator=g) for _ in range(n)]


def test_the_student_is_the_kept_slices():
    teacher = random_teacher()
    sums = importance(teacher, batches())
    keep = select(sums, TEACHER, STUDENT)
    student = prune(teacher, STUDENT, keep)  # without sums: no norm rescaling, plain slices
    t, s = teacher.state_dict(), student.state_dict()
    ch, hd = keep["channels"], 8
    assert len(keep["layers"]) == 2 and keep["layers"].tolist() == sorted(keep["layers"].tolist())
    assert torch.equal(s["embed_tokens.weight"], t["embed_tokens.weight"][:, ch])
    assert torch.equal(s["lm_head.weight"], s["embed_tokens.weight"])
    assert torch.equal(s["norm.weight"], t["norm.weight"][ch])
    for j, layer in enumerate(keep["layers"].tolist()):
        a, b = f"layers.{layer}.self_attn.", f"layers.{j}.self_attn."
        heads, groups, neurons = keep["heads"][j], keep["groups"][j], keep["neurons"][j]
        assert len(groups) == 1 and len(heads) == 2
        assert (heads // 3 == groups[0]).all()  # the teacher's query heads 3g..3g+2 share K/V g

        def per_head(w, idx):  # the rows of heads idx
            return w.view(-1, hd, *w.shape[1:])[idx].flatten(0, 1)

        assert torch.equal(s[b + "q_proj.weight"], per_head(t[a + "q_proj.weight"], heads)[:, ch])
        assert torch.equal(s[b + "q_proj.bias"], per_head(t[a + "q_proj.bias"], heads))
        for name in ("k_proj", "v_proj"):
            want = per_head(t[a + f"{name}.weight"], groups)[:, ch]
            assert torch.equal(s[b + f"{name}.weight"], want)
            assert torch.equal(s[b + f"{name}.bias"], per_head(t[a + f"{name}.bias"], groups))
        o = t[a + "o_proj.weight"].view(48, 6, hd)[:, heads].flatten(1)
        assert torch.equal(s[b + "o_proj.weight"], o[ch])
        a, b = f"layers.{layer}.", f"layers.{j}."
        for name in ("gate_proj", "up_proj"):
            want = t[a + f"mlp.{name}.weight"][neurons][:, ch]
            assert torch.equal(s[b + f"mlp.{name}.weight"], want)
        want = t[a + "mlp.down_proj.weight"][ch][:, neurons]
        assert torch.equal(s[b + "mlp.down_proj.weight"], want)
        for name in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(s[b + f"{name}.weight"], t[a + f"{name}.weight"][ch])


def test_idle_pieces_rank_last():
    """Neurons, K/V groups, channels and a layer that do nothing are the ones dropped."""
    teacher = random_teacher(2)
    dead_neurons, dead_channels = [3, 7, 11, 20, 33], list(range(0, 48, 3))  # 16 of 48 channels
    with torch.no_grad():
        for block in teacher.layers:
            block.mlp.gate_proj.weight[dead_neurons] = 0  # silu(0) * up = 0
            block.self_attn.v_proj.weight[8:16] = 0        # K/V group 1: its 3 heads output 0
            block.self_attn.v_proj.bias[8:16] = 0
            block.input_layernorm.weight[dead_channels] = 0
            block.post_attention_layernorm.weight[dead_channels] = 0
        teacher.norm.weight[dead_channels] = 0
        teacher.layers[2].self_attn.o_proj.weight.zero_()  # block 2 returns its input: 1 - cos = 0
        teacher.layers[2].mlp.down_proj.weight.zero_()
    cfg = ModelConfig(**dict(STUDENT.__dict__, n_layer=3, n_embd=32, n_head=3,
                             intermediate_size=35))
    keep = select(importance(teacher, batches()), TEACHER, cfg)
    assert keep["layers"].tolist() == [0, 1, 3]
    assert set(keep["channels"].tolist()) == set(range(48)) - set(dead_channels)
    for groups, neurons in zip(keep["groups"], keep["neurons"]):
        assert groups.tolist() == [0]
        assert set(neurons.tolist()) == set(range(40)) - set(dead_neurons)
    even = select(importance(teacher, batches()), TEACHER, cfg, layers="even")
    assert even["layers"].tolist() == [0, 2, 3]


@pytest.mark.slow
def test_pruning_into_its_own_shape_changes_nothing(tmp_path, data, tokenizer_dir):
    """distill.py --init_from=prune with the teacher's own shape and learning rate 0: the exported
    student gives the teacher's logits; its first eval equals the teacher's."""
    teacher_dir = make_model_dir(tmp_path / "teacher", tokenizer_dir, n_layer=3)  # 4 heads, 2 K/V
    out = tmp_path / "out"
    shape = ["--n_layer=3", "--n_head=4", "--n_kv_head=2", "--n_embd=32", "--intermediate_size=48"]
    r = run_script("distill.py", f"--data_dir={data}", f"--teacher={teacher_dir}",
                   f"--out_dir={out}", *TINY, *shape, "--init_from=prune", "--learning_rate=0",
                   "--min_lr=0", "--max_iters=2", "--prune_windows=8")
    assert r.returncode == 0, r.stderr
    assert "pruned the student out of the teacher" in r.stdout
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    x = torch.randint(0, 300, (2, 64))
    with torch.no_grad():
        assert (teacher(x).logits - student(x).logits).abs().max().item() <= 1e-5
    _, evals = read_log(out)
    assert evals[0]["val_ce"] == pytest.approx(evals[0]["teacher_val_ce"], abs=1e-5)
    assert evals[0]["val_kl"] == pytest.approx(0, abs=1e-5) and evals[0]["val_top1"] == 1.0


@pytest.mark.slow  # a model of the real sizes: ~10 s
def test_real_shapes(tmp_path):
    """A random teacher of Qwen2.5-0.5B's shape cut to student-123m: 123,426,304 parameters, and
    transformers loads the export with the same logits."""
    torch.manual_seed(0)
    teacher = Transformer(CONFIGS["qwen2.5-0.5b"], verbose=False).eval()
    x = torch.randint(0, 151_665, (1, 16))
    cfg = CONFIGS["student-123m"]
    sums = importance(teacher, [x])
    student = prune(teacher, cfg, select(sums, teacher.config, cfg), sums)
    assert student.num_params() == 123_426_304
    del teacher
    hf.save(student, tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 12
    with torch.no_grad():
        assert (student.lm_head(student(x)) - ref(x).logits).abs().max().item() <= 1e-4
    # float32, the tied head stored once
    assert os.path.getsize(tmp_path / "model.safetensors") < 0.51e9
