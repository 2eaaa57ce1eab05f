"""model.py against transformers' Qwen2ForCausalLM, the oracle: random tiny configs in float32."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from model import CONFIGS, ModelConfig, Transformer, distill_loss, sample_next

# (tied, n_head, n_kv_head, hidden, head_dim, intermediate, vocab): GQA ratios 1, 2 and 8, odd sizes
SHAPES = [
    (True, 4, 2, 32, 8, 48, 101),
    (False, 8, 1, 40, 6, 37, 97),
    (True, 3, 3, 24, 8, 50, 64),
    (False, 6, 3, 30, 10, 29, 131),
]


def hf_model(tied, n_head, n_kv, hidden, head_dim, inter, vocab, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=3,
                      num_attention_heads=n_head, num_key_value_heads=n_kv, head_dim=head_dim,
                      tie_word_embeddings=tied, rope_theta=10000.0, max_position_embeddings=64, rms_norm_eps=1e-5)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norm weights, not the init's zeros and ones
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(-1.0, 1.5)
    return model


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers(tmp_path, shape):
    ref = hf_model(*shape)
    ref.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(str(tmp_path), verbose=False)
    assert ours.config.tie_word_embeddings == shape[0]
    assert ours.num_params() == sum(p.numel() for p in ref.parameters())
    idx = torch.randint(0, shape[-1], (3, 37))
    with torch.no_grad():
        h, ref_logits = ours(idx), ref(idx).logits
    assert h.shape == (3, 37, shape[3])  # the final hidden states; the head is the caller's
    assert (ours.lm_head(h) - ref_logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_training_gradients_match_transformers(tmp_path, shape):
    # the training path, hidden states and the head's weight into distill_loss (CE only), against transformers
    ref = hf_model(*shape).train()
    ref.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(str(tmp_path), verbose=False)
    idx, y = torch.randint(0, shape[-1], (2, 21)), torch.randint(0, shape[-1], (2, 21))
    y[0, :5] = -100
    distill_loss(ours(idx), ours.lm_head.weight, None, None, y, alpha=0.0, chunk_size=8)[0].backward()
    ref_loss = torch.nn.functional.cross_entropy(ref(idx).logits.flatten(0, 1), y.flatten())
    ref_loss.backward()
    theirs = {k.removeprefix("model."): p.grad for k, p in ref.named_parameters()}
    for k, p in ours.named_parameters():
        g = theirs[k]
        assert (p.grad - g).abs().max().item() <= 1e-5 * g.abs().max().item() + 1e-7, k


@pytest.mark.parametrize("tied", [True, False])
def test_export_round_trip(tmp_path, tokenizer_dir, tied):
    torch.manual_seed(1)
    ours = Transformer(ModelConfig(vocab_size=90, n_layer=2, n_head=4, n_kv_head=1, n_embd=24, head_dim=6,
                                   intermediate_size=40, max_seq_len=64, tie_word_embeddings=tied), verbose=False)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours.save_pretrained(tmp_path, tokenizer_dir=tokenizer_dir)
    assert not list(tmp_path.glob("*.tmp"))
    assert (tmp_path / "tokenizer.json").exists()
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == "qwen2" and hf["architectures"] == ["Qwen2ForCausalLM"]
    assert hf["eos_token_id"] == 0  # <|endoftext|>, the test tokenizer's first id
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 90, (2, 50))
    with torch.no_grad():
        assert (ours.lm_head(ours(idx)) - ref(idx).logits).abs().max().item() <= 1e-4
    again = Transformer.from_pretrained(str(tmp_path), verbose=False)
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_sharded_checkpoint(tmp_path):
    ref = hf_model(*SHAPES[1])
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = Transformer.from_pretrained(str(tmp_path), verbose=False)
    idx = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        assert (ours.lm_head(ours(idx)) - ref(idx).logits).abs().max().item() <= 1e-4


def test_kv_cache_generation_equals_recompute(model_dir):
    model = Transformer.from_pretrained(model_dir, verbose=False)
    idx = torch.randint(0, 320, (2, 7))
    out = model.generate(idx, 20, temperature=0)
    x = idx
    with torch.no_grad():
        for _ in range(20):
            x = torch.cat([x, model.lm_head(model(x)[:, -1]).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, x)


def test_greedy_generation_equals_transformers(model_dir):
    model = Transformer.from_pretrained(model_dir, verbose=False)
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    idx = torch.randint(1, 320, (1, 9))  # id 0 is EOS
    ours = model.generate(idx, 25, temperature=0, eos_id=0)
    theirs = ref.generate(idx, max_new_tokens=25, do_sample=False, eos_token_id=0, pad_token_id=0)
    assert torch.equal(ours, theirs[:, :ours.size(1)])


def test_generation_stops_at_max_seq_len(model_dir, capsys):
    model = Transformer.from_pretrained(model_dir, verbose=False)  # max_seq_len 128
    out = model.generate(torch.ones(1, 120, dtype=torch.long), 50, temperature=1.0, top_k=5)
    assert out.shape == (1, 128)
    assert "max_seq_len=128" in capsys.readouterr().err
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
    assert student.num_params() == 123_426_304
    assert teacher.num_params() == 494_032_768


def test_init_and_rope_dtype():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=16, head_dim=8,
                                intermediate_size=32, max_seq_len=32), verbose=False)
    assert m.lm_head.weight is m.embed_tokens.weight
    assert torch.all(m.layers[0].self_attn.q_proj.bias == 0) and torch.all(m.norm.weight == 1)
    assert abs(m.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 0.005
    m.half()
    assert m.rope_cos.dtype == torch.float32 and m.embed_tokens.weight.dtype == torch.float16


def test_from_pretrained_errors(tmp_path, model_dir):
    with pytest.raises(FileNotFoundError, match="no directory"):
        Transformer.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not 'qwen2'"):
        Transformer.from_pretrained(str(tmp_path))
    # missing keys: drop a layer's weights from a good checkpoint
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(open(os.path.join(model_dir, "config.json")).read())
    sd = {k: v for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items() if "layers.1." not in k}
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(ValueError, match="missing .*layers.1"):
        Transformer.from_pretrained(str(bad))
    with pytest.raises(FileNotFoundError, match="pass a local directory"):
        Transformer.from_pretrained("Qwen/No-Such-Model-For-Tests")  # HF_HUB_OFFLINE=1 in conftest
