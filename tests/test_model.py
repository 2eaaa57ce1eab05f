"""model.py against transformers' Qwen2ForCausalLM / Qwen3ForCausalLM, the oracle: random tiny
configs in float32."""

import copy
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

import hf
from conftest import make_loud_model
from hf import config_from_hf
from loss import distill_loss
from model import CONFIGS, ModelConfig, Transformer, sample_next

# (tied, n_head, n_kv_head, hidden, head_dim, intermediate, vocab): GQA ratios 1, 2 and 8, odd sizes
SHAPES = [
    (True, 4, 2, 32, 8, 48, 101),
    (False, 8, 1, 40, 6, 37, 97),
    (True, 3, 3, 24, 8, 50, 64),
    (False, 6, 3, 30, 10, 29, 131),
]


def hf_model(tied, n_head, n_kv, hidden, head_dim, inter, vocab, seed=0):
    return random_hf(Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                 num_hidden_layers=3, num_attention_heads=n_head,
                                 num_key_value_heads=n_kv, head_dim=head_dim,
                                 tie_word_embeddings=tied, rope_theta=10000.0,
                                 max_position_embeddings=64, rms_norm_eps=1e-5), seed)


def random_hf(cfg, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norm weights, not the init's zeros and ones
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(-1.0, 1.5)
    return model


# one tiny random config per teacher family, with that family's switches
TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6)
FAMILIES = {
    # no head_dim in the file
    "qwen2.5-0.5b": Qwen2Config(**TINY, tie_word_embeddings=True, rope_theta=1e6),
    "r1-distill-qwen": Qwen2Config(**TINY, tie_word_embeddings=False, rope_theta=1e4,
                                   max_window_layers=1),
    "qwen2.5-7b": Qwen2Config(**dict(TINY, vocab_size=152064), tie_word_embeddings=False,
                              rope_theta=1e6),
    # head_dim 16, not 32 / 4 heads
    "qwen3": Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=True, rope_theta=1e6),
    "qwen3-attention-bias": Qwen3Config(**TINY, head_dim=16, attention_bias=True, rope_theta=1e6),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers(tmp_path, shape):
    ref = hf_model(*shape)
    ref.save_pretrained(tmp_path)
    ours = hf.load(str(tmp_path), verbose=False)
    assert ours.config.tie_word_embeddings == shape[0]
    assert ours.num_params() == sum(p.numel() for p in ref.parameters())
    idx = torch.randint(0, shape[-1], (3, 37))
    with torch.no_grad():
        h, ref_logits = ours(idx), ref(idx).logits
    assert h.shape == (3, 37, shape[3])  # the final hidden states; the head is the caller's
    assert (ours.lm_head(h) - ref_logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_training_gradients_match_transformers(tmp_path, shape):
    # the training path, hidden states and the head's weight into distill_loss (CE only),
    # against transformers
    ref = hf_model(*shape).train()
    ref.save_pretrained(tmp_path)
    ours = hf.load(str(tmp_path), verbose=False)
    idx, y = torch.randint(0, shape[-1], (2, 21)), torch.randint(0, shape[-1], (2, 21))
    y[0, :5] = -100
    loss, _ = distill_loss(ours(idx), ours.lm_head.weight, None, None, y, alpha=0.0, chunk_size=8)
    loss.backward()
    ref_loss = torch.nn.functional.cross_entropy(ref(idx).logits.flatten(0, 1), y.flatten())
    ref_loss.backward()
    theirs = {k.removeprefix("model."): p.grad for k, p in ref.named_parameters()}
    for k, p in ours.named_parameters():
        g = theirs[k]
        assert (p.grad - g).abs().max().item() <= 1e-5 * g.abs().max().item() + 1e-7, k


@pytest.mark.parametrize("tied", [True, False])
def test_export_round_trip(tmp_path, tokenizer_dir, tied):
    torch.manual_seed(1)
    ours = Transformer(ModelConfig(vocab_size=90, n_layer=2, n_head=4, n_kv_head=1, n_embd=24,
                                   head_dim=6, intermediate_size=40, max_seq_len=64,
                                   tie_word_embeddings=tied), verbose=False)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save(ours, tmp_path, tokenizer_dir=tokenizer_dir)
    assert not list(tmp_path.glob("*.tmp"))
    assert (tmp_path / "tokenizer.json").exists()
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    assert cfg_json["model_type"] == "qwen2" and cfg_json["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg_json["eos_token_id"] == 0  # <|endoftext|>, the test tokenizer's first id
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 90, (2, 50))
    with torch.no_grad():
        assert (ours.lm_head(ours(idx)) - ref(idx).logits).abs().max().item() <= 1e-4
    again = hf.load(str(tmp_path), verbose=False)
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_families_match_transformers(tmp_path, family):
    ref = random_hf(FAMILIES[family])
    ref.save_pretrained(tmp_path / "hf")
    ours = hf.load(str(tmp_path / "hf"), verbose=False)
    assert ours.config.model_type == ref.config.model_type
    # q_norm/k_norm, biases, head
    assert ours.num_params() == sum(p.numel() for p in ref.parameters())
    idx = torch.randint(0, ref.config.vocab_size, (2, 40))
    with torch.no_grad():
        ref_logits = ref(idx).logits
        assert (ours.lm_head(ours(idx)) - ref_logits).abs().max().item() <= 1e-4
    prompt = idx[:, :9]
    theirs = ref.generate(prompt, max_new_tokens=15, do_sample=False)
    assert torch.equal(ours.generate(prompt, 15, temperature=0), theirs)
    # our export loads in transformers as the same architecture, with the same logits
    hf.save(ours, tmp_path / "ours")
    cfg_json = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg_json["architectures"] == ref.config.architectures
    assert cfg_json["model_type"] == ref.config.model_type
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(ref)
    with torch.no_grad():
        assert (back(idx).logits - ref_logits).abs().max().item() <= 1e-4


# (sliding_window, max_window_layers, max_seq_len, refused): 2 layers, max_position_embeddings 64
SLIDING = [
    (16, 1, None, True),   # layer 1 slides at 16 tokens, sequences reach 64: refused
    (64, 1, None, False),  # the window covers max_position_embeddings: full attention
    (16, 1, 16, False),    # the caller runs at most 16 tokens
    (16, 2, None, False),  # no layer slides (layer i slides from i >= max_window_layers)
]


@pytest.mark.parametrize("window, max_window_layers, max_seq_len, refused", SLIDING)
def test_sliding_window_refused_only_where_it_matters(tmp_path, window, max_window_layers,
                                                      max_seq_len, refused):
    ref = random_hf(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=window,
                                max_window_layers=max_window_layers))
    ref.save_pretrained(tmp_path)
    if refused:
        with pytest.raises(ValueError, match=f"use_sliding_window.*sliding_window={window}") as e:
            hf.load(str(tmp_path), max_seq_len=max_seq_len)
        assert "\n" not in str(e.value)
        return
    ours = hf.load(str(tmp_path), verbose=False, max_seq_len=max_seq_len)
    T = ours.config.max_seq_len
    assert T == (max_seq_len or 64) and ours.rope_cos.shape[0] == T
    idx = torch.randint(0, 101, (2, T))  # the longest sequence: where a window would first show
    with torch.no_grad():
        assert (ours.lm_head(ours(idx)) - ref(idx).logits).abs().max().item() <= 1e-4


QWEN2 = dict(model_type="qwen2", vocab_size=101, hidden_size=32, intermediate_size=48,
             num_hidden_layers=2, num_attention_heads=4)
YARN = {"factor": 4.0, "original_max_position_embeddings": 32768}
REFUSED = [  # config.json, what the one-line error says
    ({"model_type": "deepseek_v3"},
     r"model_type 'deepseek_v3'.*MLA.*DeepSeek-R1-Distill-Qwen-1.5B"),
    ({"model_type": "deepseek_v2"}, r"model_type 'deepseek_v2'.*MLA"),
    ({"model_type": "llama"}, r"model_type 'llama'.*only 'qwen2' and 'qwen3'"),
    ({"model_type": "qwen2_moe"}, r"model_type 'qwen2_moe'.*only 'qwen2' and 'qwen3'"),
    (dict(QWEN2, rope_scaling=dict(YARN, rope_type="yarn")), r"rope_scaling asks for 'yarn'"),
    # Qwen2.5's README spelling
    (dict(QWEN2, rope_scaling=dict(YARN, type="yarn")), r"rope_scaling asks for 'yarn'"),
    (dict(QWEN2, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}),
     r"rope_parameters asks for 'linear'"),
    (dict(QWEN2, hidden_act="gelu"), r"hidden_act 'gelu'"),
]


@pytest.mark.parametrize("cfg_json, match", REFUSED)
def test_refused_configs(tmp_path, cfg_json, match):
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(ValueError, match=match) as e:
        hf.load(str(tmp_path))
    assert "\n" not in str(e.value)


def test_config_from_hf_defaults():
    q2 = config_from_hf(dict(QWEN2, max_position_embeddings=131072))
    assert (q2.head_dim, q2.rope_theta, q2.qkv_bias, q2.o_bias, q2.qk_norm) == \
        (8, 10000.0, True, False, False)
    q3 = config_from_hf(dict(QWEN2, model_type="qwen3"))  # Qwen3Config's defaults
    assert (q3.head_dim, q3.qkv_bias, q3.o_bias, q3.qk_norm) == (128, False, False, True)
    rope = {"rope_type": "default", "rope_theta": 1e6}
    assert config_from_hf(dict(QWEN2, rope_parameters=rope)).rope_theta == 1e6
    # DeepSeek-R1-Distill-Qwen-1.5B's layout with its window switched on: layers 21..27 would slide
    # at 4096 tokens
    sw = dict(QWEN2, num_hidden_layers=28, max_window_layers=21, use_sliding_window=True,
              sliding_window=4096, max_position_embeddings=131072)
    with pytest.raises(ValueError, match="sliding_window=4096 < 131072"):
        config_from_hf(sw)
    assert config_from_hf(sw, max_seq_len=4096).max_seq_len == 4096
    assert config_from_hf(dict(sw, max_window_layers=28)).max_seq_len == 131072  # no layer slides
    bad = Transformer(ModelConfig(vocab_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                                  head_dim=8, intermediate_size=32, qk_norm=True), verbose=False)
    with pytest.raises(ValueError, match="no Hugging Face layout"):  # a qwen2 has no q/k norms
        hf.save(bad, "unused")


def test_sharded_checkpoint(tmp_path):
    ref = hf_model(*SHAPES[1])
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = hf.load(str(tmp_path), verbose=False)
    idx = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        assert (ours.lm_head(ours(idx)) - ref(idx).logits).abs().max().item() <= 1e-4


def test_kv_cache_generation_equals_recompute(model_dir):
    model = hf.load(model_dir, verbose=False)
    idx = torch.randint(0, 320, (2, 7))
    out = model.generate(idx, 20, temperature=0)
    x = idx
    with torch.no_grad():
        for _ in range(20):
            x = torch.cat([x, model.lm_head(model(x)[:, -1]).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, x)


def test_greedy_generation_equals_transformers(model_dir):
    model = hf.load(model_dir, verbose=False)
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    idx = torch.randint(1, 320, (1, 9))  # id 0 is EOS
    ours = model.generate(idx, 25, temperature=0, eos_id=0)
    theirs = ref.generate(idx, max_new_tokens=25, do_sample=False, eos_token_id=0, pad_token_id=0)
    assert torch.equal(ours, theirs[:, :ours.size(1)])


def test_generation_stops_at_max_seq_len(model_dir):
    model = hf.load(model_dir, verbose=False)  # max_seq_len 128
    out = model.generate(torch.ones(1, 120, dtype=torch.long), 50, temperature=1.0, top_k=5)
    assert out.shape == (1, 128)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(torch.ones(1, 128, dtype=torch.long), 5)


def test_sampling_filters():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, 0.0), greedy)
    assert torch.equal(sample_next(logits, 1.0, top_k=1), greedy)
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6), greedy)
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(20):
        tok = sample_next(logits, 2.0, top_k=3)
        assert (top3 == tok[:, None]).any(-1).all()
    # top_p keeps the smallest set of tokens whose mass reaches p
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seen = {sample_next(probs.log(), 1.0, top_p=0.7).item() for _ in range(200)}
    assert seen == {0, 1}


def test_parameter_counts():
    with torch.device("meta"):
        student = Transformer(CONFIGS["student-123m"], verbose=False)
        teacher = Transformer(CONFIGS["qwen2.5-0.5b"], verbose=False)
        qwen3 = Transformer(config_from_hf({  # Qwen/Qwen3-0.6B
            "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
            "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True,
            "max_position_embeddings": 40960}), verbose=False)
    assert student.num_params() == 123_426_304
    assert teacher.num_params() == 494_032_768
    assert qwen3.num_params() == 596_049_920


def test_init_and_rope_dtype():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=16,
                                head_dim=8, intermediate_size=32, max_seq_len=32), verbose=False)
    assert m.lm_head.weight is m.embed_tokens.weight
    assert torch.all(m.layers[0].self_attn.q_proj.bias == 0) and torch.all(m.norm.weight == 1)
    assert abs(m.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 0.005
    m.half()
    assert m.rope_cos.dtype == torch.float32 and m.embed_tokens.weight.dtype == torch.float16


def test_from_pretrained_errors(tmp_path, model_dir):
    with pytest.raises(FileNotFoundError, match="no directory"):
        hf.load(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load(str(tmp_path))
    # missing keys: drop a layer's weights from a good checkpoint
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(open(os.path.join(model_dir, "config.json")).read())
    sd = load_file(os.path.join(model_dir, "model.safetensors"))
    sd = {k: v for k, v in sd.items() if "layers.1." not in k}
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(ValueError, match="missing .*layers.1"):
        hf.load(str(bad))
    with pytest.raises(FileNotFoundError, match="pass a local directory"):
        hf.load("Qwen/No-Such-Model-For-Tests")  # HF_HUB_OFFLINE=1 in conftest


@pytest.mark.slow  # torch.compile's tracing
def test_compiles_to_one_graph():
    """The attention's GQA branch is decided outside forward (on an sm80+ GPU in half precision:
    flash attention with enable_gqa); forced here under CPU bfloat16 autocast, the model is one
    graph for torch.compile, and the branch gives the expanded K/V's result."""
    m = Transformer(ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                head_dim=8, intermediate_size=48, max_seq_len=32), verbose=False)
    assert not any(b.self_attn.flash_gqa for b in m.layers)  # a CPU
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expanded = m(x)
        for b in m.layers:
            b.self_attn.flash_gqa = True
        assert torch.equal(m(x), expanded)
        explained = torch._dynamo.explain(m)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_fp32_residual_keeps_float16_finite():
    """A residual stream that outgrows float16 (conftest's loud model: Qwen2's massive activations
    in miniature): float16 throughout gives inf; float16 blocks over a float32 residual stream
    match the float32 model."""
    ref = make_loud_model()
    x = torch.randint(0, 64, (2, 16))
    half = copy.deepcopy(ref).half()
    with torch.no_grad():
        expected = ref(x)
        assert not torch.isfinite(half(x)).all()  # 3e4 + 2e4 + 2e4 > 65,504
        half.fp32_residual = True
        h = half(x)
    assert h.dtype == torch.float32 and torch.isfinite(h).all()
    assert (h - expected).abs().max().item() <= 2e-3 * expected.abs().max().item()
    # float32 hidden states, a float16 head
    assert half.generate(x[:1, :4], 3, temperature=0).shape == (1, 7)


def test_flops_per_token():
    with torch.device("meta"):
        student = Transformer(CONFIGS["student-123m"], verbose=False)
        teacher = Transformer(CONFIGS["qwen2.5-0.5b"], verbose=False)
    s_body, s_head = student.flops_per_token(512)
    t_body, t_head = teacher.flops_per_token(512, backward=False)
    # the heads run inside the float32 loss
    assert s_head == 6 * 151_936 * 512 and t_head == 2 * 151_936 * 896
    # a distillation step, per token
    assert round((s_body + s_head + t_body + t_head) / 1e9, 2) == 1.81
