"""
The Qwen2 architecture in one file, for the teacher (Qwen2.5-0.5B) and the student alike; Qwen3 teachers too.

- ModelConfig / CONFIGS: the two shapes this project uses, or any Qwen2/Qwen3 config.json.
- Transformer: GQA attention with RoPE, SwiGLU MLP, RMSNorm, pre-norm blocks, tied or untied head.
  model(idx) gives the final hidden states; model.lm_head(h) the logits.
- from_pretrained / save_pretrained: read and write Hugging Face Qwen2/Qwen3 checkpoints (safetensors).
- generate: sampling with a KV cache.
- distill_loss: the fused, chunked distillation loss (it never holds [B, T, V] logits).

The module names follow Hugging Face's (minus the leading "model."), so loading is a rename.
"""

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 151936  # embedding rows; Qwen's tokenizer uses 151,665 of them, the rest is padding
    n_layer: int = 12
    n_head: int = 8
    n_kv_head: int = 2  # grouped-query attention: n_head // n_kv_head query heads share each K/V head
    n_embd: int = 512
    head_dim: int = 64
    intermediate_size: int = 2048  # SwiGLU hidden width
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_seq_len: int = 512
    # what sets Qwen3 apart from Qwen2 (the defaults), read from config.json by config_from_hf
    qkv_bias: bool = True  # Qwen2 always biases q/k/v; Qwen3 biases q/k/v/o only with attention_bias
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over head_dim of each head's q and k, before RoPE
    model_type: str = "qwen2"  # what save_pretrained writes: "qwen2" or "qwen3"


CONFIGS = {
    # Qwen/Qwen2.5-0.5B: 494,032,768 parameters
    "qwen2.5-0.5b": ModelConfig(n_layer=24, n_head=14, n_kv_head=2, n_embd=896, head_dim=64,
                                intermediate_size=4864, max_seq_len=32768),
    # the student: 123,426,304 parameters, 77.8M of them in the (tied) embedding
    "student-123m": ModelConfig(n_layer=12, n_head=8, n_kv_head=2, n_embd=512, head_dim=64,
                                intermediate_size=2048, max_seq_len=512),
}

# -----------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # in float32 whatever the input dtype, cast back, then scale (Qwen2: weight, not 1 + weight)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim, theta, max_seq_len, device=None):
    # cos/sin of the rotation angles, float32, shape (max_seq_len, head_dim), in the rotate-half layout
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hs); cos, sin: (T, hs). Computed in float32 (fp16 angles lose precision), cast back.
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


# SDPA's enable_gqa (torch >= 2.5) reaches a fused kernel only through flash attention: fp16/bf16 on sm80+. The
# memory-efficient kernel (what a T4 or fp32 gets) rejects unequal head counts and SDPA silently falls back to the
# math kernel, which materializes (T, T) scores: there K/V are expanded instead. Decided outside forward (each check
# inside would break torch.compile's graph): here, and per device in Transformer._apply.
SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.o_bias)
        # Qwen3: one (head_dim,) weight each, shared by all heads; Identity (no parameters) otherwise
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.flash_gqa = False  # True on an sm80+ GPU: set by Transformer.init_rope

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # all keys/values so far: (B, nkv, pos + T, hs)
        # a prefill (from position 0) is causal; one new token attends to everything cached
        causal = T > 1
        if self.n_kv_head == self.n_head:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        elif self.flash_gqa and q.dtype in (torch.float16, torch.bfloat16):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        else:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0):
        dt = self.input_layernorm.weight.dtype  # x may be float32 over float16 weights (Transformer.fp32_residual)
        x = x + self.self_attn(self.input_layernorm(x).to(dt), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x).to(dt))


class KVCache:
    """Preallocated keys and values for every layer: (B, n_kv_head, max_len, head_dim), filled at pos."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached

    def update(self, layer, k, v):
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        if layer == self.k.size(0) - 1:
            self.pos = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# -----------------------------------------------------------------------------
# the model


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, verbose=True):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # float16 weights with a float32 residual stream: each block computes in float16, the residual adds and the
        # norms in float32. Qwen2 models overflow float16 in their residual stream (reported from 1.5B up).
        self.fp32_residual = False
        self.init_rope()
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()
        if verbose:
            print(f"Transformer: {self.num_params():,} parameters")

    def init_rope(self, device=None):
        # what depends on the device, set again whenever the model lands on one: the RoPE tables (non-persistent
        # buffers, never saved) and whether GQA attention can take flash attention there
        device = torch.device(device or self.embed_tokens.weight.device)
        cfg = self.config
        cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, cfg.max_seq_len, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        flash = SDPA_GQA and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
        for block in self.layers:
            block.self_attn.flash_gqa = flash

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.init_rope(self.rope_cos.device)  # .half()/.to(dtype) cast every floating buffer: RoPE stays float32
        return self

    @torch.no_grad()
    def init_weights(self):
        # For training from scratch: N(0, 0.02) for every matrix and the embedding (GPT-2 / Qwen2's
        # initializer_range), zero biases, ones for the norms. The two projections that write into the
        # residual stream (o_proj, down_proj) get 0.02 / sqrt(2 * n_layer), as in GPT-2, so the residual's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, 0.02 / math.sqrt(2 * self.config.n_layer))
            else:
                p.normal_(0.0, 0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # a tied head is counted once

    def flops_per_token(self, seq_len, backward=True):
        """Matmul FLOPs per token as (body, head): 2 per weight forward, 4 more backward, plus attention's scores and
        weighted sum; the embedding lookup none. Two parts because distill_loss runs the heads in float32 (a
        teacher's in its own dtype), whatever the body's compute dtype."""
        cfg, k = self.config, (6 if backward else 2)
        attention = 2 * k * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
        return k * sum(p.numel() for p in self.layers.parameters()) + attention, k * cfg.vocab_size * cfg.n_embd

    def forward(self, idx, cache=None):
        """idx (B, T) -> the final hidden states (B, T, D), after the last norm. The head is applied by
        whoever needs logits: self.lm_head(h) for all of them, distill_loss a chunk of tokens at a time,
        generation at the last position only. Non-finite activations anywhere reach these hidden
        states, so torch.isfinite(h).all() is the cheap check (fp16 overflow)."""
        B, T = idx.shape
        pos = cache.pos if cache is not None else 0
        if pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        assert pos == 0 or T == 1, "the KV cache takes a prefill from position 0, then one token at a time"
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        x = self.embed_tokens(idx)
        if self.fp32_residual:
            x = x.float()
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i)
        return self.norm(x)

    # -------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None):
        """Yields the next token of every row, (B,), one step at a time, with a KV cache."""
        B, T = idx.shape
        room = self.config.max_seq_len - T
        if room <= 0:
            raise ValueError(f"the prompt ({T} tokens) leaves no room below max_seq_len={self.config.max_seq_len}")
        if max_new_tokens > room:
            print(f"note: stopping after {room} new tokens, at max_seq_len={self.config.max_seq_len}",
                  file=sys.stderr)
            max_new_tokens = room
        cache = KVCache(self.config, B, T + max_new_tokens, idx.device, self.embed_tokens.weight.dtype)
        h = self(idx, cache)[:, -1]  # prefill; the head only for the last position
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits = self.lm_head(h.to(self.lm_head.weight.dtype)).float()  # (h is float32 with fp32_residual)
            nxt = sample_next(logits, temperature, top_k, top_p)
            yield nxt
            if eos_id is not None:
                done |= nxt == eos_id
                if done.all():
                    return
            if cache.pos < cache.k.size(3):
                h = self(nxt[:, None], cache)[:, -1]

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None):
        """idx (B, T) -> (B, T + new): temperature 0 is greedy; stops early once every row emitted eos_id."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, eos_id))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)

    # -------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", verbose=True, max_seq_len=None):
        """A local Hugging Face Qwen2/Qwen3 directory or a hub id such as "Qwen/Qwen2.5-0.5B". max_seq_len, the
        longest sequence it will run, caps max_position_embeddings (smaller RoPE tables, fewer refusals)."""
        from safetensors.torch import load_file

        path = resolve_pretrained(path)
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        with open(os.path.join(path, "config.json")) as f:
            config = config_from_hf(json.load(f), path, max_seq_len)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):  # sharded
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{path} has no model.safetensors (or model.safetensors.index.json)")
        sd = {}
        for name in files:
            try:
                tensors = load_file(os.path.join(path, name), device=str(device))
            except Exception as e:  # a download cut short, a full disk: safetensors' own error types
                raise ValueError(f"{os.path.join(path, name)} is damaged and cannot be read ({e}); download it "
                                 f"again") from None
            for k, t in tensors.items():
                if not k.endswith("rotary_emb.inv_freq"):  # old exports carry it
                    sd[k.removeprefix("model.")] = t.to(dtype)
        model = cls.from_state_dict(config, sd, device, where=path)
        if verbose:
            print(f"loaded {path}: {model.num_params():,} parameters, {dtype}")
        return model

    @classmethod
    def from_state_dict(cls, config, sd, device="cpu", where="state dict"):
        """A model holding the tensors of sd (our names, as state_dict() gives them), in eval mode. Built on
        the meta device and assigned the tensors, so the weights exist once in memory."""
        with torch.device("meta"):
            model = cls(config, verbose=False)
        expected = set(model.state_dict())
        if config.tie_word_embeddings:
            expected.discard("lm_head.weight")
            sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}  # a tied export may carry a copy
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if missing or unexpected:
            raise ValueError(f"{where}: the weights do not match a model of its config: "
                             f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                             f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
        model.load_state_dict(sd, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.init_rope(torch.device(device))
        return model.eval()

    def save_pretrained(self, out_dir, tokenizer_dir=None):
        """Writes config.json and model.safetensors that transformers' AutoModelForCausalLM loads (plus the
        tokenizer's files when tokenizer_dir is given). Each file goes to a temporary name, then is renamed."""
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        cfg = self.config
        qwen3 = cfg.model_type == "qwen3"
        # the only layouts transformers knows; it would load any other with weights dropped or randomly filled
        fits = {"qwen2": cfg.qkv_bias and not cfg.o_bias and not cfg.qk_norm,
                "qwen3": cfg.qk_norm and cfg.qkv_bias == cfg.o_bias}.get(cfg.model_type)
        if not fits:
            raise ValueError(f"model_type {cfg.model_type!r} has no Hugging Face layout with qk_norm={cfg.qk_norm}, "
                             f"qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}")
        dtype = self.embed_tokens.weight.dtype
        hf = {
            "architectures": ["Qwen3ForCausalLM" if qwen3 else "Qwen2ForCausalLM"], "model_type": cfg.model_type,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
            "use_sliding_window": False, "attention_dropout": 0.0,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
        if qwen3:
            hf["attention_bias"] = cfg.qkv_bias
        if tokenizer_dir is not None:
            hf.update(special_token_ids(tokenizer_dir))
        tensors = {}
        for k, t in self.state_dict().items():
            if k == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # transformers re-ties it; safetensors refuses shared storage anyway
            tensors[k if k.startswith("lm_head") else "model." + k] = t.detach().to("cpu").contiguous()
        atomic_write(os.path.join(out_dir, "model.safetensors"),
                     lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        atomic_write(os.path.join(out_dir, "config.json"),
                     lambda p: open(p, "w").write(json.dumps(hf, indent=2) + "\n"))
        for name in TOKENIZER_FILES if tokenizer_dir else ():
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src):
                atomic_write(os.path.join(out_dir, name), lambda p: shutil.copyfile(src, p))


def load_checkpoint(path):
    """distill.py's ckpt.pt -> its dict; a one-line ValueError if the file is damaged (a copy cut short, a full
    disk) or not distill.py's."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch reports a cut zip archive as RuntimeError, other damage as other types
        raise ValueError(f"{path} is damaged and cannot be read ({(str(e).splitlines() or [type(e).__name__])[0]}); "
                         f"restore a copy, or start again elsewhere") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= ckpt.keys():
        raise ValueError(f"{path} is not a checkpoint of distill.py (no model / model_args)")
    return ckpt


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def atomic_write(path, write):
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def special_token_ids(tokenizer_dir):
    # eos/bos/pad ids for config.json, read from the tokenizer's files without importing transformers
    ids = {}
    try:
        with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
            added = {t["content"]: t["id"] for t in json.load(f).get("added_tokens", [])}
        with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as f:
            tc = json.load(f)
    except (OSError, ValueError):
        return ids
    for kind in ("bos", "eos", "pad"):
        tok = tc.get(f"{kind}_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok in added:
            ids[f"{kind}_token_id"] = added[tok]
    return ids


def resolve_pretrained(name, patterns=("*.json", "*.safetensors")):
    """A local directory as it is; otherwise a hub id such as "Qwen/Qwen2.5-0.5B", whose files matching patterns
    are downloaded once (the Hugging Face cache): returns that directory. Models and tokenizers alike."""
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.expanduser(name)
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"no directory {name} (and it is not a hub id like Qwen/Qwen2.5-0.5B)")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name, allow_patterns=list(patterns))
    except Exception as e:  # offline, unknown repo, gated: one line, and the way out
        raise FileNotFoundError(f"could not download {name} from the Hugging Face hub "
                                f"({type(e).__name__}); offline, pass a local directory instead") from None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def auto_dtype(device):
    """float32 on CPU; on CUDA bfloat16 from sm80 (Ampere) on, float16 before: a T4 (sm75) reports bfloat16 as
    supported, but emulates it, and its fused attention kernels do not take it."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def config_from_hf(hf, path="config.json", max_seq_len=None):
    """A Qwen2 or Qwen3 config.json (dict) -> ModelConfig; a ValueError names what this file does not implement.
    max_seq_len: the longest sequence the model will run, if less than max_position_embeddings."""
    kind = hf.get("model_type")
    if kind in ("deepseek_v2", "deepseek_v3"):
        raise ValueError(f"{path}: model_type {kind!r}: DeepSeek's MLA attention and MoE are not implemented here; "
                         f"DeepSeek's distilled Qwen models (deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B, ...) "
                         f"are Qwen2 and load")
    if kind not in ("qwen2", "qwen3"):
        raise ValueError(f"{path}: model_type {kind!r}: only 'qwen2' and 'qwen3' models load here "
                         f"(Qwen2.5, Qwen3, DeepSeek-R1-Distill-Qwen)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r}: only silu (SwiGLU) is implemented")
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"  # transformers 5 writes the latter
    rope = hf.get(field) or {}
    scaling = rope.get("rope_type", rope.get("type", "default"))  # "type": the older spelling
    if scaling != "default":
        raise ValueError(f"{path}: {field} asks for {scaling!r} RoPE scaling, which is not implemented; "
                         f"remove it from config.json to run within the trained context")
    n_layer, max_len = hf["num_hidden_layers"], hf.get("max_position_embeddings", 32768)
    max_len = min(max_len, max_seq_len or max_len)
    # transformers slides layer i if layer_types says so, else if i >= max_window_layers; a window as long as the
    # sequence changes nothing
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window") else None
    slides = ("sliding_attention" in hf["layer_types"] if hf.get("layer_types")
              else n_layer > hf.get("max_window_layers", 28))
    if window is not None and window < max_len and slides:
        raise ValueError(f"{path}: use_sliding_window with sliding_window={window} < {max_len} tokens: sliding-window "
                         f"attention is not implemented; load with max_seq_len <= {window}")
    qwen3 = kind == "qwen3"
    bias = hf.get("attention_bias", False)  # Qwen3 only: q, k, v and o alike
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=n_layer, n_head=heads,
        n_kv_head=hf.get("num_key_value_heads") or heads, n_embd=hidden,
        head_dim=hf.get("head_dim") or (128 if qwen3 else hidden // heads),  # Qwen3Config's default is 128
        intermediate_size=hf["intermediate_size"],
        rope_theta=float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),  # transformers' Qwen2/Qwen3 default
        max_seq_len=max_len,
        qkv_bias=bias if qwen3 else True, o_bias=bias if qwen3 else False, qk_norm=qwen3, model_type=kind)


# -----------------------------------------------------------------------------
# sampling


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) float32 -> token ids (B,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p (at least one)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1)[:, 0]


# -----------------------------------------------------------------------------
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
