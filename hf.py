"""
Hugging Face formats in and out: model directories (config.json, safetensors), tokenizers, the hub.

    model = hf.load("Qwen/Qwen2.5-0.5B", dtype=torch.float16, device="cuda")  # or a local directory
    hf.save(model, "out/hf", tokenizer_dir=...)  # what AutoModelForCausalLM.from_pretrained loads

- resolve_pretrained: a local directory, or a hub id downloaded once into the Hugging Face cache.
- config_from_hf / config_to_hf: config.json <-> ModelConfig, with a one-line refusal for what is
  not implemented.
- load / save / from_state_dict: a Transformer from and to safetensors, or from tensors in memory,
  their names and shapes checked.
- load_tokenizer / check_tokenizers / train_bpe: the tokenizer the data was made with; does a
  teacher read the data's ids? A small BPE of Qwen2's pipeline (tests and experiments).
- load_teacher: distill.py's teacher, checked against the data, or a one-line error.
"""

import json
import os
import sys

import torch

from common import atomic_write, first_line
from model import ModelConfig, Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


def resolve_pretrained(name, patterns=("*.json", "*.safetensors")):
    """A local directory as it is; otherwise a hub id such as "Qwen/Qwen2.5-0.5B", whose files
    matching patterns are downloaded once (the Hugging Face cache): returns that directory. Models
    and tokenizers alike."""
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.expanduser(name)
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"no directory {name} "
                                f"(and it is not a hub id like Qwen/Qwen2.5-0.5B)")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name, allow_patterns=list(patterns))
    except Exception as e:  # offline, unknown repo, gated: one line, and the way out
        raise FileNotFoundError(f"could not download {name} from the Hugging Face hub "
                                f"({type(e).__name__}); offline, "
                                f"pass a local directory instead") from None


def config_from_hf(hf, path="config.json", max_seq_len=None):
    """A Qwen2 or Qwen3 config.json (dict) -> ModelConfig; a ValueError names what this
    file does not implement. max_seq_len: the longest sequence the model will run, if less
    than max_position_embeddings."""
    kind = hf.get("model_type")
    if kind in ("deepseek_v2", "deepseek_v3"):
        raise ValueError(f"{path}: model_type {kind!r}: DeepSeek's MLA attention and MoE are not "
                         f"implemented here; DeepSeek's distilled Qwen models "
                         f"(deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B, ...) are Qwen2 and load")
    if kind not in ("qwen2", "qwen3"):
        raise ValueError(f"{path}: model_type {kind!r}: only 'qwen2' and 'qwen3' models load here "
                         f"(Qwen2.5, Qwen3, DeepSeek-R1-Distill-Qwen)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r}: "
                         f"only silu (SwiGLU) is implemented")
    # transformers 5 writes the latter
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(field) or {}
    scaling = rope.get("rope_type", rope.get("type", "default"))  # "type": the older spelling
    if scaling != "default":
        raise ValueError(f"{path}: {field} asks for {scaling!r} RoPE scaling, "
                         f"which is not implemented; "
                         f"remove it from config.json to run within the trained context")
    n_layer, max_len = hf["num_hidden_layers"], hf.get("max_position_embeddings", 32768)
    max_len = min(max_len, max_seq_len or max_len)
    # transformers slides layer i if layer_types says so, else if i >= max_window_layers; a window
    # as long as the sequence changes nothing
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window") else None
    slides = ("sliding_attention" in hf["layer_types"] if hf.get("layer_types")
              else n_layer > hf.get("max_window_layers", 28))
    if window is not None and window < max_len and slides:
        raise ValueError(f"{path}: use_sliding_window with sliding_window={window} < {max_len} "
                         f"tokens: sliding-window attention is not implemented; "
                         f"load with max_seq_len <= {window}")
    qwen3 = kind == "qwen3"
    bias = hf.get("attention_bias", False)  # Qwen3 only: q, k, v and o alike
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=n_layer, n_head=heads,
        n_kv_head=hf.get("num_key_value_heads") or heads, n_embd=hidden,
        # Qwen3Config's default is 128
        head_dim=hf.get("head_dim") or (128 if qwen3 else hidden // heads),
        intermediate_size=hf["intermediate_size"],
        rope_theta=float(hf.get("rope_theta")
                         or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        # transformers' Qwen2/Qwen3 default
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        max_seq_len=max_len,
        qkv_bias=bias if qwen3 else True, o_bias=bias if qwen3 else False, qk_norm=qwen3,
        model_type=kind)


def config_to_hf(cfg, dtype):
    """ModelConfig -> the config.json that transformers' AutoModelForCausalLM loads as Qwen2
    or Qwen3."""
    qwen3 = cfg.model_type == "qwen3"
    # the only layouts transformers knows; it would load any other with weights dropped or
    # randomly filled
    fits = {"qwen2": cfg.qkv_bias and not cfg.o_bias and not cfg.qk_norm,
            "qwen3": cfg.qk_norm and cfg.qkv_bias == cfg.o_bias}.get(cfg.model_type)
    if not fits:
        raise ValueError(f"model_type {cfg.model_type!r} has no Hugging Face layout with "
                         f"qk_norm={cfg.qk_norm}, qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}")
    hf = {
        "architectures": ["Qwen3ForCausalLM" if qwen3 else "Qwen2ForCausalLM"],
        "model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False, "attention_dropout": 0.0,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if qwen3:
        hf["attention_bias"] = cfg.qkv_bias
    return hf


def read_pretrained(path, dtype=torch.float32, device="cpu", max_seq_len=None):
    """A Hugging Face directory or hub id -> (ModelConfig, {our name: tensor in dtype
    on device}, directory). max_seq_len, the longest sequence the model will run,
    caps max_position_embeddings."""
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
        raise FileNotFoundError(f"{path} has no model.safetensors "
                                f"(or model.safetensors.index.json)")
    sd = {}
    for name in files:
        try:
            tensors = load_file(os.path.join(path, name), device=str(device))
        except Exception as e:  # a download cut short, a full disk: safetensors' own error types
            raise ValueError(f"{os.path.join(path, name)} is damaged and cannot be read ({e}); "
                             f"download it again") from None
        for k, t in tensors.items():
            if not k.endswith("rotary_emb.inv_freq"):  # old exports carry it
                sd[k.removeprefix("model.")] = t.to(dtype)
    return config, sd, path


def load(path, dtype=torch.float32, device="cpu", verbose=False, max_seq_len=None):
    """A local Hugging Face Qwen2/Qwen3 directory or a hub id such as "Qwen/Qwen2.5-0.5B" -> a
    Transformer in eval mode, in dtype on device. max_seq_len, the longest sequence it will run,
    caps max_position_embeddings (smaller RoPE tables, fewer refusals)."""
    config, sd, path = read_pretrained(path, dtype, device, max_seq_len)
    model = from_state_dict(config, sd, device, where=path)
    if verbose:
        print(f"loaded {path}: {model.num_params():,} parameters, {dtype}")
    return model


def save(model, out_dir, tokenizer_dir=None):
    """config.json and model.safetensors that transformers' AutoModelForCausalLM loads with the same
    logits, plus the tokenizer's files when tokenizer_dir is given."""
    write_pretrained(out_dir, model.config, model.state_dict(), tokenizer_dir)


def from_state_dict(config, sd, device="cpu", where="state dict"):
    """A Transformer of config holding the tensors of sd (our names, as state_dict() gives them), in
    eval mode. Built on the meta device and assigned the tensors, so the weights exist once in
    memory; names or shapes other than the config's are a ValueError that says so in one line,
    where naming the file."""
    with torch.device("meta"):
        model = Transformer(config, verbose=False)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}  # drop a tied export's copy
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"{where}: the weights do not match a model of its config: "
                         f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                         f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if wrong := next((k for k in sd if tuple(sd[k].shape) != shapes[k]), None):
        raise ValueError(f"{where}: {wrong} is {tuple(sd[wrong].shape)}, its config says "
                         f"{shapes[wrong]}: another model's weights?")
    model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.init_rope(torch.device(device))
    return model.eval()


def write_pretrained(out_dir, cfg, state_dict, tokenizer_dir=None):
    """config.json and model.safetensors that transformers loads (plus the tokenizer's files when
    tokenizer_dir is given), each written to a temporary name, then renamed (a failed write:
    common.WriteError)."""
    from safetensors.torch import save

    os.makedirs(out_dir, exist_ok=True)
    hf = config_to_hf(cfg, state_dict["embed_tokens.weight"].dtype)
    if tokenizer_dir is not None:
        hf.update(special_token_ids(tokenizer_dir))
    tensors = {}
    for k, t in state_dict.items():
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # transformers re-ties it; safetensors refuses shared storage anyway
        tensors[k if k.startswith("lm_head") else "model." + k] = t.detach().to("cpu").contiguous()
    weights = save(tensors, metadata={"format": "pt"})  # bytes: written through Python's file
    atomic_write(os.path.join(out_dir, "model.safetensors"), lambda f: f.write(weights),
                 need=len(weights))
    atomic_write(os.path.join(out_dir, "config.json"),
                 lambda f: f.write(json.dumps(hf, indent=2) + "\n"), mode="w")
    for name in TOKENIZER_FILES if tokenizer_dir else ():
        src = os.path.join(tokenizer_dir, name)
        if os.path.exists(src):
            with open(src, "rb") as f:
                content = f.read()
            atomic_write(os.path.join(out_dir, name), lambda f, c=content: f.write(c))
    if tokenizer_dir and (auto := auto_tokenizer_differs(out_dir)):
        print(f"note: AutoTokenizer.from_pretrained({out_dir!r}) builds transformers' {auto}, "
              f"which encodes text into other ids than this tokenizer.json; load it with "
              f"PreTrainedTokenizerFast.from_pretrained({out_dir!r}), as hf.load_tokenizer does",
              file=sys.stderr)


def auto_tokenizer_differs(hf_dir):
    """The class name of AutoTokenizer.from_pretrained(hf_dir) if it encodes PROBE otherwise than
    tokenizer.json, else None. transformers 5 maps any tokenizer beside a qwen2 config.json to
    Qwen2Tokenizer, which keeps the vocabulary and merges but rebuilds Qwen2's normalizer and
    pre-tokenizer: a tokenizer of another pipeline (GPT-2's, say) cannot be exported so that
    AutoTokenizer reads it as written."""
    from transformers import AutoTokenizer

    try:
        exact, _ = load_tokenizer(hf_dir)
        auto = AutoTokenizer.from_pretrained(hf_dir)
    except Exception:  # transformers' many error types: no tokenizer to speak of
        return None
    same = (auto(PROBE, add_special_tokens=False)["input_ids"]
            == exact(PROBE, add_special_tokens=False)["input_ids"])
    return None if same else type(auto).__name__


def special_token_ids(tokenizer_dir):
    # eos/bos/pad ids for config.json, read from the tokenizer's files without
    # importing transformers
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


# ordinary text a tokenizer must encode and decode back (Chinese, English, digits, punctuation,
# whitespace); also the probe by which check_tokenizers compares the teacher's tokenizer with
# the data's
PROBE = ("维基百科是一个自由的百科全书。Wikipedia, the free encyclopedia: "
         "2024年1月15日, 3.14 + 42 = 45.14!\n\t  「引号」（括号）")


def load_tokenizer(name):
    """A fast tokenizer from a hub id or a local directory, and its EOS id: tokenizer.json exactly
    as it is written, whatever class transformers would map it to. (AutoTokenizer beside a qwen2
    config.json, an exported model, rebuilds Qwen2's normalizer and pre-tokenizer around any
    vocabulary: another tokenizer's ids.) ValueError (one line) if it cannot be loaded or cannot
    encode ordinary text: from a directory without tokenizer files transformers builds an empty
    tokenizer, which would turn every document into nothing but its EOS."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        path = resolve_pretrained(name, TOKENIZER_FILES)
    except FileNotFoundError as e:  # its message says what to do
        raise ValueError(f"cannot load tokenizer '{name}': {e}") from None
    try:
        exact = os.path.exists(os.path.join(path, "tokenizer.json"))
        tok = (PreTrainedTokenizerFast if exact else AutoTokenizer).from_pretrained(path)
    except Exception as e:
        raise ValueError(f"cannot load tokenizer '{name}' ({type(e).__name__}: {first_line(e)}); "
                         f"is it a directory with tokenizer.json, "
                         f"from tokenizer.save_pretrained(DIR)?") from None
    if not tok.is_fast:
        raise ValueError(f"tokenizer '{name}' is not a fast tokenizer; "
                         f"use a directory with tokenizer.json")
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.get_vocab().get("<|endoftext|>")
    if eos is None:
        raise ValueError(f"tokenizer '{name}' has no EOS token and no <|endoftext|>")
    ids = tok(PROBE, add_special_tokens=False)["input_ids"]
    if (len(ids) < len(PROBE) // 8 or tok.unk_token_id in ids
            or tok.decode(ids).split() != PROBE.split()):
        raise ValueError(f"tokenizer '{name}' cannot encode ordinary text ({len(ids)} tokens for "
                         f"{len(PROBE)} characters that do not decode back): "
                         f"is it a tokenizer directory (tokenizer.json)?")
    return tok, eos


def check_tokenizers(teacher_dir, data_tokenizer, eos_id):
    """The teacher must read the data's token ids as its own: the same ids for PROBE (no BOS) and
    the data's EOS id as its EOS or as the same token. Otherwise a run would go on, its loss
    falling, and teach the student nonsense. Returns None when they agree, else (message,
    is_warning): a warning is a sentence, a refusal reads "the teacher's tokenizer MESSAGE the
    data's". Only a teacher without tokenizer files, or data that names no tokenizer, is a warning:
    tokenizer files that do not load cannot be compared, and are refused."""
    if not any(os.path.exists(os.path.join(teacher_dir, f))
               for f in ("tokenizer.json", "tokenizer_config.json")):
        return (f"no tokenizer beside the teacher {teacher_dir}: "
                f"cannot check that it reads the data's ids"), True
    if not data_tokenizer:
        return ("the data's meta.json names no tokenizer: "
                "cannot check that the teacher reads the data's ids"), True
    try:
        t_tok, t_eos = load_tokenizer(teacher_dir)
    except ValueError as e:
        return (f"cannot be loaded ({e}; if the teacher reads the data's ids, copy the data's "
                f"tokenizer files over the teacher's), so it cannot be compared with"), False
    try:
        d_tok, _ = load_tokenizer(data_tokenizer)
    except ValueError as e:
        return (f"cannot be compared (the data's tokenizer does not load: {e}; "
                f"restore the tokenizer that meta.json names) with"), False
    if (t_tok(PROBE, add_special_tokens=False)["input_ids"]
            != d_tok(PROBE, add_special_tokens=False)["input_ids"]):
        return "encodes text into other ids than", False
    if (eos_id != t_eos
            and t_tok.convert_ids_to_tokens(eos_id) != d_tok.convert_ids_to_tokens(eos_id)):
        return f"does not read EOS id {eos_id} as", False
    return None


def load_teacher(name, data_tokenizer, eos_id, vocab_size, block_size, dtype, device, verbose=True,
                 log=print):
    """distill.py's teacher, frozen, in eval mode: a hub id or directory whose tokenizer reads the
    data's ids (check_tokenizers; log gets a warning where that cannot be checked), whose vocabulary
    holds the data's vocab_size ids and whose context holds block_size tokens. Else a ValueError:
    the one line distill.py stops with."""

    def one_line(e):  # the loader's own error
        return ValueError(f"cannot load the teacher: {e}".splitlines()[0])

    try:
        path = resolve_pretrained(name)
        found = check_tokenizers(path, data_tokenizer, eos_id)
    except (OSError, ValueError) as e:
        raise one_line(e) from None
    if found and not found[1]:
        raise ValueError(f"the teacher's tokenizer ({name}) {found[0]} the data's "
                         f"({data_tokenizer}): prepare the data with the teacher's tokenizer "
                         f"(python prepare.py --tokenizer={name} ...) or choose a teacher of the "
                         f"data's")
    if found:
        log(f"warning: {found[0]}")
    try:
        model = load(path, dtype=dtype, device=device, verbose=verbose, max_seq_len=block_size)
    except (OSError, ValueError) as e:
        raise one_line(e) from None
    model.requires_grad_(False)  # frozen, and in eval mode from load
    # a damaged download can hold NaN or inf and still load: one pass over the weights
    bad = [k for k, t in model.state_dict().items() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"the teacher's weights hold NaN or inf ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}): the files in {path} are damaged; "
                         f"download them again")
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"the teacher's vocabulary ({model.config.vocab_size} rows) is smaller "
                         f"than the tokenizer's ({vocab_size} ids): prepare the data with the "
                         f"teacher's tokenizer")
    if block_size > model.config.max_seq_len:
        raise ValueError(f"block_size {block_size} exceeds the teacher's max_seq_len "
                         f"{model.config.max_seq_len}")
    return model


# Qwen2's normalization and pre-tokenization, as its tokenizer.json states them. A small BPE trained
# with them encodes alike when transformers loads it as itself and when, beside a qwen2 config.json
# (an exported model), it loads it as Qwen2Tokenizer, which always rebuilds this pipeline.
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
              r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def train_bpe(texts, out_dir, vocab_size, eos="<|endoftext|>", bos=None, log=print):
    """A byte-level BPE of vocab_size ids trained on texts, Qwen2's pipeline, eos as id 0, saved as
    a transformers tokenizer directory: a CPU-sized stand-in for Qwen's (the experiments and the
    tests train theirs). bos: a BOS added after training (the next id) and prepended by default,
    as DeepSeek-R1-Distill-Qwen's does. log: a line before and after (None: silent)."""
    import time

    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    t0, log = time.time(), log or (lambda *a: None)
    log(f"training a BPE tokenizer of {vocab_size:,} ids into {out_dir}")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if bos:
        tok.add_special_tokens([bos])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos,
                            pad_token=eos).save_pretrained(str(out_dir))
    log(f"trained the tokenizer in {time.time() - t0:.0f} s: {tok.get_vocab_size():,} ids")
    return str(out_dir)
