"""The tokenizer the data was made with, reproduced exactly wherever it is loaded from (its own
directory, an exported model beside a qwen2 config.json, a teacher), for a plain ByteLevel BPE
(GPT-2's pipeline) as for Qwen2's; a teacher whose tokenizer files do not load is refused, not
trained on."""

import json
import os

import numpy as np
import pytest

import hf
from conftest import (
    CORPUS,
    TINY,
    assert_one_line_error,
    make_model_dir,
    make_tokenizer,
    run_script,
    write_data,
)

# digits and spaces before words, where GPT-2's pre-tokenizer and Qwen2's split text differently
TEXTS = CORPUS + [hf.PROBE,
                  "In 2024, 3.14 and 42 were 45.14; 1991 1998 2000 2023 2024 12 34 56 don't"] * 5


def make_gpt2_tokenizer(out_dir, vocab_size=300):
    """A plain byte-level BPE as GPT-2's (its regex inside ByteLevel, no normalizer), trained with
    `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(out_dir))
    return str(out_dir)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("toks")
    return {"gpt2": make_gpt2_tokenizer(d / "gpt2"), "qwen2": make_tokenizer(d / "qwen2", TEXTS)}


def encode_as_written(tok_dir, text):  # the oracle: tokenizer.json through `tokenizers` alone
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    return tok.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_an_export_keeps_the_tokenizer(kind, tokenizers, tmp_path, capfd):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src = tokenizers[kind]
    model = make_model_dir(tmp_path / "hf", src)  # config.json says qwen2, as every export does
    note = capfd.readouterr().err
    def ids(tok, text):
        return tok(text, add_special_tokens=False)["input_ids"]

    for text in TEXTS[-2:] + CORPUS:
        want = encode_as_written(src, text)
        for where in (src, model):
            assert ids(hf.load_tokenizer(where)[0], text) == want, (where, text)
        assert ids(PreTrainedTokenizerFast.from_pretrained(model), text) == want
    auto = ids(AutoTokenizer.from_pretrained(model), hf.PROBE)
    if kind == "qwen2":  # Qwen2's pipeline survives AutoTokenizer's Qwen2Tokenizer
        assert auto == encode_as_written(src, hf.PROBE) and "note:" not in note
    else:  # transformers 5 rebuilds Qwen2's pipeline around GPT-2's merges: other ids, and the
        # export says so
        assert (auto != encode_as_written(src, hf.PROBE)) == ("note: AutoTokenizer" in note), note
        assert "note:" not in note or "PreTrainedTokenizerFast.from_pretrained" in note


def test_check_tokenizers(tokenizers, tmp_path):
    src = tokenizers["gpt2"]
    eos = hf.load_tokenizer(src)[1]
    same = make_model_dir(tmp_path / "same", src)
    assert hf.check_tokenizers(same, src, eos) is None  # an export of the data's own: same ids
    other = make_model_dir(tmp_path / "other", tokenizers["qwen2"])
    assert hf.check_tokenizers(other, src, eos) == ("encodes text into other ids than", False)
    bare = make_model_dir(tmp_path / "bare")
    msg, warning = hf.check_tokenizers(bare, src, eos)  # nothing to compare: on, with a warning
    assert warning and "no tokenizer beside the teacher" in msg
    assert hf.check_tokenizers(same, None, eos)[1]  # data that names no tokenizer: a warning too
    broken = make_model_dir(tmp_path / "broken", src)
    with open(os.path.join(broken, "tokenizer.json"), "r+") as f:
        f.truncate(100)  # a copy cut short
    msg, warning = hf.check_tokenizers(broken, src, eos)
    assert not warning and msg.startswith("cannot be loaded")
    assert "copy the data's tokenizer files" in msg
    msg, warning = hf.check_tokenizers(same, str(tmp_path / "gone"), eos)
    assert not warning and "the data's tokenizer does not load" in msg


@pytest.mark.slow
def test_distill_with_an_exported_teacher(tokenizers, tmp_path):
    """The issue's run: data of a GPT-2-style BPE, a teacher exported through model.py with it (as
    out/hf is): distill.py accepts the teacher; a teacher whose tokenizer.json is damaged is
    refused in one line."""
    src = tokenizers["gpt2"]
    data = write_data(tmp_path / "data", src, np.uint16, n_train=4000, n_val=1000)
    teacher = make_model_dir(tmp_path / "teacher", src)
    args = [f"--data_dir={data}", f"--teacher={teacher}", *TINY, "--max_iters=1"]
    r = run_script("distill.py", *args, f"--out_dir={tmp_path / 'out'}", "--eval_interval=1",
                   "--warmup_iters=0")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stdout + r.stderr
    with open(os.path.join(teacher, "tokenizer.json"), "w") as f:
        json.dump({"not": "a tokenizer"}, f)
    r = run_script("distill.py", *args, f"--out_dir={tmp_path / 'out2'}")
    line = assert_one_line_error(r, "distill.py", "cannot be loaded")
    assert line.startswith("distill.py: error: the teacher's tokenizer") and \
        not os.path.exists(tmp_path / "out2")
