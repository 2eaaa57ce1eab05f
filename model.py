"""
The Qwen2 architecture in one file, for teacher (Qwen2.5-0.5B) and student; Qwen3 teachers too.

- ModelConfig / CONFIGS: the two shapes this project uses, or any Qwen2/Qwen3 config.json (hf.py
  reads them).
- Transformer: GQA attention with RoPE, SwiGLU MLP, RMSNorm, pre-norm blocks, tied or untied head.
  model(idx) gives the final hidden states; model.lm_head(h) the logits.
- generate / stream: sampling with a KV cache.

It imports nothing of the project. Loading and saving checkpoints is hf.py's (hf.load, hf.save),
speculative decoding speculative.py's, the distillation loss, which applies the heads itself a chunk
of tokens at a time, loss.py's. The module names follow Hugging Face's (minus the leading "model."),
so loading is a rename.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 151936  # embedding rows; Qwen's tokenizer uses 151,665, the rest are padding
    n_layer: int = 12
    n_head: int = 8
    n_kv_head: int = 2  # grouped-query attention: n_head // n_kv_head query heads per K/V head
    n_embd: int = 512
    head_dim: int = 64
    intermediate_size: int = 2048  # SwiGLU hidden width
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_seq_len: int = 512
    # what sets Qwen3 apart from Qwen2 (the defaults), read from config.json by config_from_hf
    qkv_bias: bool = True  # Qwen2 always biases q/k/v; Qwen3 q/k/v/o only with attention_bias
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over head_dim of each head's q and k, before RoPE
    model_type: str = "qwen2"  # what hf.save writes: "qwen2" or "qwen3"


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
    # cos/sin of the rotation angles, float32, (max_seq_len, head_dim), in the rotate-half layout
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hs); cos, sin: (T, hs). In float32 (fp16 angles lose precision), cast back.
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


# SDPA's enable_gqa (torch >= 2.5) reaches a fused kernel only through flash attention: fp16/bf16 on
# sm80+. The memory-efficient kernel (what a T4 or fp32 gets) rejects unequal head counts and SDPA
# silently falls back to the math kernel, which materializes (T, T) scores: there K/V are expanded
# instead. Decided outside forward (each check inside would break torch.compile's graph): here, and
# per device in Transformer._apply.
SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.o_bias)
        # Qwen3: one (head_dim,) weight each, shared by all heads; else Identity (no parameters)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.flash_gqa = False  # True on an sm80+ GPU: set by Transformer.init_rope

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, _ = x.shape
        # q: (B, nh, T, hs); k, v: (B, nkv, T, hs)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # all keys/values so far: (B, nkv, pos + T, hs)
        # A prefill from position 0 is causal; one new token attends to everything cached; several
        # after cached ones (speculative decoding) need a lower-right causal mask: is_causal is
        # top-left, wrong with more keys.
        S = k.size(2)
        mask = q.new_ones(T, S, dtype=torch.bool).tril(S - T) if 1 < T < S else None
        causal = T > 1 and mask is None
        if self.n_kv_head == self.n_head:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        elif self.flash_gqa and q.dtype in (torch.float16, torch.bfloat16):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=True)
        else:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
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
        dt = self.input_layernorm.weight.dtype  # x is float32 over float16 weights if fp32_residual
        x = x + self.self_attn(self.input_layernorm(x).to(dt), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x).to(dt))


class KVCache:
    """Preallocated keys and values for every layer: (B, n_kv_head, max_len, head_dim), filled at
    pos. Setting pos back forgets the tokens after it (a rejected draft): updates overwrite them."""

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
        # float16 weights with a float32 residual stream: each block computes in float16, the
        # residual adds and the norms in float32. Qwen2 models overflow float16 in their residual
        # stream (reported from 1.5B up).
        self.fp32_residual = False
        self.init_rope()
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()
        if verbose:
            print(f"Transformer: {self.num_params():,} parameters")

    def init_rope(self, device=None):
        # what depends on the device, set again whenever the model lands on one: the RoPE tables
        # (non-persistent buffers, never saved) and whether GQA can take flash attention there
        device = torch.device(device or self.embed_tokens.weight.device)
        cfg = self.config
        cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, cfg.max_seq_len, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        on_cuda = device.type == "cuda"
        flash = SDPA_GQA and on_cuda and torch.cuda.get_device_capability(device) >= (8, 0)
        for block in self.layers:
            block.self_attn.flash_gqa = flash

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.init_rope(self.rope_cos.device)  # .half()/.to(dtype) cast RoPE too: back to float32
        return self

    @torch.no_grad()
    def init_weights(self):
        # For training from scratch: N(0, 0.02) for every matrix and the embedding (GPT-2 / Qwen2's
        # initializer_range), zero biases, ones for the norms. The two projections that write into
        # the residual stream (o_proj, down_proj) get 0.02 / sqrt(2 * n_layer), as in GPT-2, so the
        # residual's variance does not grow with depth.
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

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        """AdamW, its weight decay on the matrices and embeddings only (not on biases and norms);
        fused: one kernel steps every parameter."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)

    def flops_per_token(self, seq_len, backward=True):
        """Matmul FLOPs per token as (body, head): 2 per weight forward, 4 more backward, plus
        attention's scores and weighted sum, none for the embedding lookup. Two parts: the head runs
        apart from the body (in distill_loss, a chunk at a time): a caller may weigh them apart."""
        cfg, k = self.config, (6 if backward else 2)
        attention = 2 * k * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
        body = k * sum(p.numel() for p in self.layers.parameters()) + attention
        return body, k * cfg.vocab_size * cfg.n_embd

    def forward(self, idx, cache=None):
        """idx (B, T) -> the final hidden states (B, T, D), after the last norm; whoever needs the
        logits applies the head. Non-finite activations anywhere reach these hidden states, so
        torch.isfinite(h).all() is the cheap check (fp16 overflow)."""
        B, T = idx.shape
        pos = cache.pos if cache is not None else 0
        if pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
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
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
               draws=None, vocab=None):
        """Yields the next token of every row, (B,), with a KV cache; stops at max_seq_len
        (silently: sample.py says so), or once every row has emitted eos_id. draws: (B, new)
        uniforms in [0, 1) to sample with, one per row and token (sample_next). vocab: only ids
        below it (the tokenizer's: the embedding's rows above are padding)."""
        B, T = idx.shape
        max_new_tokens = min(max_new_tokens, self.room(T))
        dtype = self.embed_tokens.weight.dtype
        cache = KVCache(self.config, B, T + max_new_tokens, idx.device, dtype)
        h = self(idx, cache)[:, -1]  # prefill; the head only for the last position
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for i in range(max_new_tokens):
            nxt = sample_next(self.logits(h)[:, :vocab], temperature, top_k, top_p,
                              None if draws is None else draws[:, i])
            yield nxt
            if eos_id is not None:
                done |= nxt == eos_id
                if done.all():
                    return
            if cache.pos < cache.k.size(3):
                h = self(nxt[:, None], cache)[:, -1]

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 draws=None, vocab=None):
        """idx (B, T) -> (B, T + new): temperature 0 is greedy; stops once all rows hit eos_id."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, eos_id, draws,
                               vocab))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)

    def room(self, T):  # new tokens a prompt of T tokens leaves below max_seq_len
        if T >= self.config.max_seq_len:
            raise ValueError(f"the prompt ({T} tokens) leaves no room below "
                             f"max_seq_len={self.config.max_seq_len}")
        return self.config.max_seq_len - T

    def logits(self, h):  # float32 logits of h (float32 over float16 weights with fp32_residual)
        return self.lm_head(h.to(self.lm_head.weight.dtype)).float()


# -----------------------------------------------------------------------------
# sampling


def filtered_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (..., V) float32 -> what sample_next draws from; temperature 0: a one-hot argmax."""
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus: the smallest set of most likely tokens whose mass reaches top_p (at least one)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(dim=-1)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, draw=None):
    """logits (B, V) float32 -> token ids (B,). temperature 0 is greedy. draw: (B,) uniforms in
    [0, 1), one per row, to sample with (where the cumulative probability passes it) instead of
    torch.multinomial's: a row's token then depends on its own draw alone."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filtered_probs(logits, temperature, top_k, top_p)
    if draw is None:
        return torch.multinomial(probs, 1)[:, 0]
    cdf = probs.cumsum(-1)  # the first id whose cumulative probability passes the draw
    at = torch.searchsorted(cdf, (draw * cdf[:, -1])[:, None].to(cdf.dtype), right=True)
    return at[:, 0].clamp(max=probs.size(-1) - 1)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def auto_dtype(device):
    """float32 on CPU; on CUDA bfloat16 from sm80 (Ampere) on, float16 before: a T4 (sm75) reports
    bfloat16 as supported, but emulates it, and its fused attention kernels do not take it."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
