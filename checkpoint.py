"""
distill.py's checkpoint and log: ckpt.pt written whole or not at all, read back with one-line
errors, compared with a resume's settings and data; log.jsonl, cut back to a resume's checkpoint;
and any trained model loaded back for sample.py and eval.py.

- save / load: ckpt.pt, through a temporary name (a kill mid-write leaves the old one whole).
- compare_resume / resume_log: what a resume keeps, overrides and warns about.
- RunLog: the run's rows, on the terminal, in log.jsonl and, if asked, in Weights & Biases.
- load_model: a distill.py out_dir (its ckpt.pt), a Hugging Face directory or a hub id -> a model.
"""

import json
import os
import zipfile

import torch

import hf
from common import WriteError, atomic_write, die, first_line
from model import ModelConfig

# what a checkpoint holds, by format: 1 had no version, meta or world_size (tests/data/ckpt_v1.pt)
FORMAT = 2
RESUME = ("model", "optimizer", "scaler", "model_args", "iter_num", "data_pos", "best_val_ce",
          "config", "rng")  # what a resume needs
KNOWN = {*RESUME, "tokenizer", "meta", "world_size", "version"}


def save(path, ckpt):
    """ckpt (a dict, its format version added) to path through a temporary file, then renamed: a
    kill or a full disk during the write leaves the earlier checkpoint whole (WriteError)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    ckpt = dict(ckpt, version=FORMAT)
    # bytes of each storage once: the tied head and embedding are one tensor
    need = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors(ckpt)}.values())
    atomic_write(path, lambda f: torch.save(ckpt, f), need=need)


def tensors(x):  # every tensor in a nest of dicts and lists
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from tensors(v)


def load(path, needs=RESUME):
    """distill.py's ckpt.pt -> its dict; a one-line ValueError if the file is damaged (a copy cut
    short, a full disk), not distill.py's, of a newer format, or without what needs names (an older
    version's, another program's)."""
    try:
        # torch.save writes a zip: a cut or zeroed file is none, and torch's own error for that is a
        # paragraph about .tar files
        if not zipfile.is_zipfile(path):
            raise ValueError("not a whole torch.save archive")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch reports a cut zip archive as RuntimeError, other damage as other types
        raise ValueError(f"{path} is damaged and cannot be read ({first_line(e)}); "
                         f"restore a copy, or start again elsewhere") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= ckpt.keys():
        raise ValueError(f"{path} is not a checkpoint of distill.py (no model / model_args)")
    version = ckpt.get("version", 1)
    if not isinstance(version, int) or version > FORMAT:
        raise ValueError(f"{path} was written by a newer distill.py (checkpoint format {version}; "
                         f"this one reads up to {FORMAT}): update this repository (git pull)")
    missing = [k for k in needs if k not in ckpt]
    extra = sorted(set(ckpt) - KNOWN)
    if missing or extra:
        held = (f"lacks {', '.join(missing)}" if missing else "") + \
            (" and " if missing and extra else "") + \
            (f"holds {', '.join(extra)}, unknown here" if extra else "")
        raise ValueError(f"{path} {held}: not a checkpoint this distill.py can resume (format "
                         f"{version}; written by another version or program); start again with "
                         f"--init_from=scratch in another --out_dir, or sample from it: "
                         f"python sample.py --init_from={os.path.dirname(path) or '.'}")
    return ckpt


def resume_log(path, iter_num):
    """log.jsonl's rows of the iterations before iter_num (and its eval row), which a resume
    keeps: the later ones run again. A last row cut short is dropped; any other damage is a
    one-line ValueError."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            assert isinstance(row, dict) and isinstance(row.get("iter"), int)
        except (ValueError, AssertionError):
            if i == len(lines) - 1 and line.startswith("{") and not line.endswith("\n"):
                break  # the last row's write cut short: its iteration runs again
            raise ValueError(f"{path} is damaged at line {i + 1}: restore it, or delete it "
                             f"(the log then starts at iter {iter_num})") from None
        if row["iter"] < iter_num or (row["iter"] == iter_num and "val_ce" in row):
            rows.append(row)
    return rows


# a resume keeps the checkpoint's
SHAPE = ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size")
# they set the batches
ORDER = ("batch_size", "block_size", "gradient_accumulation_steps", "data_dir", "seed")


def compare_resume(ckpt, config, meta, world_size):
    """A resume's settings and data against its checkpoint's. A ValueError (one line) if the data
    was made with another tokenizer; else the lines that say what the checkpoint overrides, what
    makes the resume inexact and what else changed."""
    old, old_meta, here = ckpt["config"], ckpt.get("meta") or {}, meta.get("tokenizer")
    if old_meta and ((old_meta["vocab_size"], old_meta["eos_id"])
                     != (meta["vocab_size"], meta["eos_id"])):
        raise ValueError(f"the data has another tokenizer ({meta['vocab_size']} ids, "
                         f"EOS {meta['eos_id']}) than the checkpoint's "
                         f"({old_meta['vocab_size']} ids, EOS {old_meta['eos_id']}): "
                         f"resume on the data it trained on, or start again")
    lines = []
    if ckpt.get("tokenizer") != here:  # another name: the same tokenizer elsewhere, or another one
        try:
            same = len({tuple(hf.load_tokenizer(t or "")[0].encode(hf.PROBE))
                        for t in (ckpt.get("tokenizer"), here)})
        except ValueError as e:
            lines.append(f"warning: cannot check that the data has the checkpoint's tokenizer: {e}")
        else:
            if same != 1:
                raise ValueError(f"the data's tokenizer {here} encodes text into other ids than "
                                 f"{ckpt.get('tokenizer')}, the checkpoint's: "
                                 f"resume on the data it trained on")
    ignored = [f"{k} {config[k]} (the checkpoint's {old[k]})" for k in SHAPE
               if old.get(k) != config[k]]
    moved = [f"{k} {old.get(k)!r} -> {config[k]!r}" for k in ORDER if old.get(k) != config[k]]
    if ckpt.get("world_size", world_size) != world_size:
        moved.append(f"processes {ckpt['world_size']} -> {world_size}")
    changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in config.items()
               if k not in SHAPE + ORDER + ("init_from",) and old.get(k) != v]
    for what, items in (("ignored, the student's shape is the checkpoint's", ignored),
                        ("changed, so the resume is not exact (other batches)", moved),
                        ("changed", changed)):
        if items:
            lines.append(f"  {what}: " + ", ".join(items))
    return lines


def load_model(path, device="cpu", dtype=torch.float32):
    """A distill.py out_dir (its ckpt.pt, mid-training or finished), a Hugging Face directory or a
    hub id -> (model in eval mode, its tokenizer's directory or hub id, None if unknown). sample.py
    and eval.py load so. A float16 model keeps its residual stream in float32, as distill.py's
    teacher does: Qwen2 models overflow float16 there, and a non-finite logit would reach the
    sampler."""
    ckpt_path = os.path.join(path, "ckpt.pt")
    if os.path.exists(ckpt_path):
        ckpt = load(ckpt_path, needs=("model", "model_args"))
        model = hf.from_state_dict(ModelConfig(**ckpt["model_args"]), ckpt["model"],
                                where=ckpt_path).to(device=device, dtype=dtype)
        hf_dir = os.path.join(path, "hf")
        has_tokenizer = os.path.exists(os.path.join(hf_dir, "tokenizer_config.json"))
        tokenizer = hf_dir if has_tokenizer else ckpt.get("tokenizer")
    elif os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} holds neither ckpt.pt (a distill.py out_dir) "
                                f"nor config.json (a Hugging Face model directory)")
    else:  # a hub id is downloaded once; its tokenizer comes from the same place
        tokenizer = hf.resolve_pretrained(path)
        model = hf.load(tokenizer, dtype=dtype, device=device)
    model.fp32_residual = dtype == torch.float16
    return model, tokenizer


class RunLog:
    """A training run's rows: on rank 0 each is a line on stdout, a JSON line appended to log.jsonl
    and, with wandb (wandb.init's arguments), a Weights & Biases step. Opening it writes log.jsonl
    anew with `rows` (a resume's rows up to its checkpoint), through a temporary name."""

    def __init__(self, path, rows=(), master=True, wandb=None):
        self.path, self.master, self.wandb, self.dumps = path, master, None, json.dumps
        if not master:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        atomic_write(path, lambda f: f.writelines(self.dumps(r) + "\n" for r in rows), mode="w")
        if wandb is not None:
            try:
                import wandb as wb
            except ImportError:
                die("wandb_log=True needs wandb: pip install wandb")
            wb.init(**wandb)
            self.wandb = wb

    def __call__(self, row):  # eval rows have val_ce, train rows loss; None values are not printed
        if not self.master:
            return
        print(("eval " if "val_ce" in row else "iter ") + f"{row['iter']}: " +
              ", ".join(f"{k} {v:.0f}" if abs(v) >= 1e4 else f"{k} {v:.4g}"
                        for k, v in row.items() if k != "iter" and v is not None), flush=True)
        try:  # a row cut short by a full disk is dropped by the resume (resume_log)
            with open(self.path, "a") as f:
                f.write(self.dumps(row) + "\n")
        except OSError as e:
            raise WriteError(e, self.path) from None
        if self.wandb is not None:
            self.wandb.log(row, step=row["iter"])
