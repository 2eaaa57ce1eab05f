"""
Cut a student out of its teacher, then distill as usual (Minitron: Muralidharan et al., "Compact
Language Models via Pruning and Knowledge Distillation", 2024; Sreenivas et al., "LLM Pruning and
Distillation in Practice: The Minitron Approach", 2024):

    python distill.py config/t4.py --init_from=prune

The teacher runs forward, without gradients, over calibration windows of train.bin. Hooks measure
how much it uses each piece of itself, and the student keeps the most important pieces, each with
the teacher's own weights:

- MLP neurons: the input of down_proj, silu(gate) * up;
- attention heads: the input of o_proj, per head (L2 over head_dim). Query heads stay in their GQA
  group: the student keeps the most important groups (K/V heads) whole, and the best query heads of
  each;
- hidden channels: the outputs of every RMSNorm, summed over the norms;
- layers: 1 - cos(block input, block output), averaged over tokens (ShortGPT's block importance).

The first three are |activation| averaged over a window's tokens, then the L2 norm over the windows.
student-123m is a pruned Qwen2.5-0.5B: 512 of 896 channels, 12 of 24 layers, 4 of the 7 query heads
of each of the 2 groups, 2048 of 4864 neurons; same head_dim, vocabulary and RoPE.
"""

import time

import torch
import torch.nn.functional as F

from common import progress
from hf import from_state_dict


def check(tcfg, scfg):
    """The one line: why the student's shape cannot be cut out of the teacher's, or None."""
    if (tcfg.model_type, tcfg.qkv_bias, tcfg.o_bias, tcfg.qk_norm) != ("qwen2", True, False, False):
        return (f"the teacher is {tcfg.model_type} (q/k norms, no q/k/v biases) and the student "
                f"Qwen2: pruning needs a Qwen2 teacher (Qwen2.5, DeepSeek-R1-Distill-Qwen); "
                f"distill this one into a student from scratch")
    if scfg.head_dim != tcfg.head_dim:
        return (f"the student's head_dim {scfg.head_dim} (n_embd / n_head) differs from the "
                f"teacher's {tcfg.head_dim}: pruning keeps whole heads; choose n_embd = "
                f"{tcfg.head_dim} * n_head")
    for name in ("n_layer", "n_embd", "n_kv_head", "intermediate_size", "vocab_size"):
        if getattr(scfg, name) > getattr(tcfg, name):
            return (f"the student's {name} {getattr(scfg, name)} exceeds the teacher's "
                    f"{getattr(tcfg, name)}: pruning can only remove")
    s_rep, t_rep = scfg.n_head // scfg.n_kv_head, tcfg.n_head // tcfg.n_kv_head
    if s_rep > t_rep:
        return (f"the student has {s_rep} query heads per K/V head, the teacher {t_rep}: pruning "
                f"keeps query heads in their teacher's group")
    return None


@torch.no_grad()
def importance(model, batches):
    """Runs model over batches of token ids (B, T) and returns the sums that rank its pieces,
    float32: of squares for the L2 statistics (so processes add theirs up), of 1 - cos for the
    layers; finished by select()."""
    cfg, dev = model.config, model.embed_tokens.weight.device
    L, H = cfg.n_layer, cfg.n_head
    norms = [n for b in model.layers for n in (b.input_layernorm, b.post_attention_layernorm)]
    norms.append(model.norm)
    zeros = lambda *shape: torch.zeros(shape, device=dev)  # noqa: E731
    sums = {"neurons": zeros(L, cfg.intermediate_size), "heads": zeros(L, H),
            "channels": zeros(len(norms), cfg.n_embd), "layers": zeros(L),
            "norm_inputs": zeros(len(norms), cfg.n_embd), "tokens": zeros()}

    def add_l2(key, i, x):  # x (B, T, n): |x| averaged over a window's tokens, squared, summed
        sums[key][i] += x.float().abs().mean(1).pow(2).sum(0)

    def block_hook(i):  # (hooks must return None: a returned value would replace the output)
        def hook(module, args, out):
            cos = F.cosine_similarity(args[0].float(), out.float(), dim=-1)
            sums["layers"][i] += (1 - cos).sum()
        return hook

    def norm_hook(i):
        def hook(module, args, out):
            add_l2("channels", i, out)
            sums["norm_inputs"][i] += args[0].float().pow(2).sum((0, 1))  # prune() rescales by it
        return hook

    hooks = []
    for i, block in enumerate(model.layers):
        hooks.append(block.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: add_l2("neurons", i, a[0])))
        hooks.append(block.self_attn.o_proj.register_forward_pre_hook(  # (B, T, H * hd): per head
            lambda m, a, i=i: add_l2("heads", i, a[0].float().unflatten(-1, (H, -1)).norm(dim=-1))))
        hooks.append(block.register_forward_hook(block_hook(i)))
    for i, norm in enumerate(norms):
        hooks.append(norm.register_forward_hook(norm_hook(i)))
    try:
        for x in batches:
            model(x)
            sums["tokens"] += x.numel()
    finally:
        for h in hooks:
            h.remove()
    return sums


def _top(scores, k):  # the indices of the k largest, in their original order
    return scores.topk(k).indices.sort().values


def _even(scores, k):  # k evenly spaced indices, the first and the last included (scores unused)
    return torch.linspace(0, len(scores) - 1, k, device=scores.device).round().long()


def select(sums, tcfg, scfg, layers="importance", width="importance"):
    """What the student keeps of the teacher, as sorted index tensors: layers, channels, and per
    kept layer its K/V groups, query heads and MLP neurons. Each dimension by importance (the most
    important), or even (evenly spaced: Xu et al. 2024's "weight selection", no calibration)."""
    for name, value in (("layers", layers), ("width", width)):
        if value not in ("importance", "even"):
            raise ValueError(f"{name}={value!r}: importance or even")
    neurons, heads = sums["neurons"].sqrt(), sums["heads"].sqrt()
    channels = sums["channels"].sqrt().sum(0)
    pick = _top if width == "importance" else _even
    by_layer = sums["layers"] / sums["tokens"]
    kept = (_top if layers == "importance" else _even)(by_layer, scfg.n_layer)
    t_rep, s_rep = tcfg.n_head // tcfg.n_kv_head, scfg.n_head // scfg.n_kv_head
    keep = {"layers": kept, "channels": pick(channels, scfg.n_embd), "groups": [], "heads": [],
            "neurons": []}
    for layer in kept.tolist():
        by_group = heads[layer].view(tcfg.n_kv_head, t_rep)  # K/V head g's queries: g * t_rep + j
        groups = pick(by_group.sum(1), scfg.n_kv_head)
        keep["groups"].append(groups)
        heads_kept = [g * t_rep + pick(by_group[g], s_rep) for g in groups.tolist()]
        keep["heads"].append(torch.cat(heads_kept))
        keep["neurons"].append(pick(neurons[layer], scfg.intermediate_size))
    return keep


@torch.no_grad()
def prune(teacher, scfg, keep, sums=None):
    """The student of shape scfg made of the kept slices of the teacher's weights, float32, tied
    embeddings (an untied teacher gives it its input embedding).

    RMSNorm divides by the root mean square over the channels it sees. The kept channels are the
    busiest ones, so their mean square is larger than all channels' (in Qwen2.5 a few huge channels
    dominate it, which the student keeps): without a correction each norm's output would shrink by
    about sqrt(kept / all). With the calibration sums, each norm's weight is scaled by its measured
    sqrt(mean square over kept / over all)."""
    t, dev = teacher.state_dict(), teacher.embed_tokens.weight.device
    ch, hd = keep["channels"], teacher.config.head_dim
    scale = torch.ones(2 * teacher.config.n_layer + 1, device=dev)  # per norm, the teacher's order
    if sums is not None:
        ms = sums["norm_inputs"]  # per norm: sum of x^2 per channel
        scale = (ms[:, ch].mean(1) / ms.mean(1)).sqrt()

    def rows(heads):  # the weight rows of these heads
        return (heads[:, None] * hd + torch.arange(hd, device=heads.device)).flatten()

    sd = {"embed_tokens.weight": t["embed_tokens.weight"][:, ch],
          "norm.weight": t["norm.weight"][ch] * scale[-1]}
    for j, layer in enumerate(keep["layers"].tolist()):
        a, b = f"layers.{layer}.", f"layers.{j}."
        q, kv, n = rows(keep["heads"][j]), rows(keep["groups"][j]), keep["neurons"][j]
        for k, norm in enumerate(("input_layernorm", "post_attention_layernorm")):
            sd[b + f"{norm}.weight"] = t[a + f"{norm}.weight"][ch] * scale[2 * layer + k]
        for name, r in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            sd[b + f"self_attn.{name}.weight"] = t[a + f"self_attn.{name}.weight"][r][:, ch]
            sd[b + f"self_attn.{name}.bias"] = t[a + f"self_attn.{name}.bias"][r]
        sd[b + "self_attn.o_proj.weight"] = t[a + "self_attn.o_proj.weight"][ch][:, q]
        sd[b + "mlp.gate_proj.weight"] = t[a + "mlp.gate_proj.weight"][n][:, ch]
        sd[b + "mlp.up_proj.weight"] = t[a + "mlp.up_proj.weight"][n][:, ch]
        sd[b + "mlp.down_proj.weight"] = t[a + "mlp.down_proj.weight"][ch][:, n]
    sd = {k: v.float().contiguous() for k, v in sd.items()}
    return from_state_dict(scfg, sd, device=dev)


def cut(teacher, scfg, batches, layers="importance", width="importance", all_reduce=None):
    """init_from=prune in one call: calibrate on batches (token ids (B, T)), select, slice.
    all_reduce sums a tensor over processes (DDP), so each can calibrate on its share. -> (the
    student in train mode, what it kept)."""
    sums = importance(teacher, batches)
    for v in sums.values() if all_reduce else ():
        all_reduce(v)
    keep = select(sums, teacher.config, scfg, layers, width)
    return prune(teacher, scfg, keep, sums).train(), keep


def calibrate_and_cut(teacher, scfg, batches, count, layers="importance", width="importance",
                      log=print):
    """distill.py's init_from=prune: cut() calibrated on batches, this process's share of count
    train windows (token ids (B, T) on the teacher's device); under torchrun the processes' sums are
    added up. Logs the cut; returns the student."""
    import torch.distributed as dist

    world_size = dist.get_world_size() if dist.is_initialized() else 1

    def counted():
        bar = progress(count, "calibration", unit="windows",
                       enabled=not dist.is_initialized() or dist.get_rank() == 0)
        for x in batches:
            yield x
            bar.update(len(x) * world_size)
        bar.close()

    t0 = time.time()
    log(f"pruning the student out of the teacher: the teacher runs over {count} windows of "
        f"train.bin; its most important pieces stay")
    student, keep = cut(teacher, scfg, counted(), layers, width,
                        dist.all_reduce if dist.is_initialized() else None)
    log(f"pruned the student out of the teacher in {time.time() - t0:.1f} s: layers "
        f"{keep['layers'].tolist()} of {teacher.config.n_layer}; Transformer: "
        f"{student.num_params():,} parameters")
    return student
