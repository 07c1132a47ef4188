"""Tests of models/graft.py on tiny random checkpoints saved to temporary directories.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_models_graft.py -q
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from models.graft import REINITIALISED_KEYS, graft, main, mrope_section_for, text_key_to_vl_key
from models.loading import load_policy, special_token_ids
from models.tiny import build_tiny_policy, build_tiny_tokenizer


def plain_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A text-LM tokenizer with Qwen's chat tokens but none of the vision tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
    )
    backend.train_from_iterator(["How many objects are there in the image?"] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def text_lm(vocab_size: int, tie: bool, seed: int = 1) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def image_prompt(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many objects?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[Image.new("RGB", (56, 56), "red")], return_tensors="pt")


def check_copied(grafted, vl_model, lm, vocab_rows: int):
    state = grafted.state_dict()
    for key, tensor in lm.state_dict().items():
        copied = state[text_key_to_vl_key(key)]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            copied = copied[:vocab_rows]  # rows past the LM's vocabulary are new tokens
        assert torch.equal(copied, tensor), key
    for key, tensor in vl_model.model.visual.state_dict().items():
        full = "model.visual." + key
        if full in REINITIALISED_KEYS:
            assert state[full].shape[0] == lm.config.hidden_size  # resized to the LM's hidden size
        else:
            assert torch.equal(state[full], tensor), key


def test_mrope_section():
    assert mrope_section_for(128) == [16, 24, 24]  # Qwen2.5-VL's published split
    assert mrope_section_for(64) == [8, 12, 12]
    assert sum(mrope_section_for(16)) == 8


def test_graft_from_directories_then_load_policy(tmp_path, monkeypatch):
    vl_model, vl_processor = build_tiny_policy(seed=0)
    vl_model.save_pretrained(tmp_path / "vl")
    vl_processor.save_pretrained(tmp_path / "vl")
    tokenizer = build_tiny_tokenizer()  # already holds every vision token: no resize
    lm = text_lm(len(tokenizer), tie=False)
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    main(["--vision", str(tmp_path / "vl"), "--text", str(tmp_path / "lm"), "--out", str(tmp_path / "out")])
    model, processor = load_policy(str(tmp_path / "out"))
    check_copied(model, vl_model, lm, vocab_rows=len(tokenizer))
    assert model.config.vision_config.out_hidden_size == 64 == model.config.text_config.hidden_size
    assert model.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]  # head_dim 16
    assert not model.config.tie_word_embeddings

    ids = special_token_ids(model, processor)
    assert ids.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    batch = image_prompt(processor)
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > batch["input_ids"].shape[1]


def test_graft_adds_missing_vision_tokens_and_resizes(caplog):
    vl_model, vl_processor = build_tiny_policy(seed=0)
    tokenizer = plain_qwen_tokenizer()
    lm = text_lm(len(tokenizer), tie=True)
    with caplog.at_level("WARNING"):
        model, processor = graft((vl_model, vl_processor), (lm, tokenizer))
    assert "NEWLY INITIALISED" in caplog.text and "merger.mlp.2" in caplog.text
    assert "<|image_pad|>" not in tokenizer.get_vocab()  # the caller's tokenizer is not modified
    tok = processor.tokenizer
    # 5 vision tokens appended after the LM's vocabulary; the embedding table grew with them.
    assert len(tok) == len(tokenizer) + 5
    assert model.config.text_config.vocab_size == len(tok)
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") >= len(tokenizer)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    check_copied(model, vl_model, lm, vocab_rows=len(tokenizer))
    batch = image_prompt(processor)
    with torch.no_grad():
        logits = model(**batch).logits  # [1, P, V]
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > batch["input_ids"].shape[1]


def test_graft_refuses_wrong_sources(tmp_path):
    vl_model, vl_processor = build_tiny_policy(seed=0)
    lm = text_lm(64, tie=True)
    lm.save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="--vision"):
        graft(str(tmp_path / "lm"), (lm, plain_qwen_tokenizer()))
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"):
        graft((vl_model, vl_processor), (vl_model, vl_processor.tokenizer))
    assert Qwen2Config().model_type == "qwen2"


@pytest.mark.parametrize("case, message", [
    ("missing-vision", "--vision {tmp}/nope: no such directory, and not a Hub id"),
    ("lm-as-vision", "--vision '{tmp}/lm' has model_type 'qwen2'; expected a Qwen2.5-VL"),
    ("out-is-a-file", "--out {tmp}/a-file is a file, not a folder"),
    ("out-holds-a-model", "--out {tmp}/lm already holds a model (config.json)"),
    ("bad-dtype", "argument --dtype: invalid choice: 'int8'"),
])  # fmt: skip
def test_graft_command_line_mistakes_exit_2_naming_the_flag(tmp_path, capsys, monkeypatch, case, message):
    # Each was a traceback (a ValueError, or HFValidationError for a missing folder); a file as
    # --out failed only after the whole graft, and a model in --out was overwritten.
    lm = text_lm(64, tie=True)
    lm.save_pretrained(tmp_path / "lm")
    (tmp_path / "a-file").write_text("not a folder")
    before = sorted(path.name for path in (tmp_path / "lm").iterdir())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vision, out, extra = str(tmp_path / "lm"), str(tmp_path / "out"), []  # a text LM: no Qwen2.5-VL
    if case == "missing-vision":
        vision = str(tmp_path / "nope")
    elif case == "out-is-a-file":
        out = str(tmp_path / "a-file")
    elif case == "out-holds-a-model":
        out = str(tmp_path / "lm")
    elif case == "bad-dtype":
        extra = ["--dtype", "int8"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--vision", vision, "--text", str(tmp_path / "lm"), "--out", out, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and sorted(path.name for path in (tmp_path / "lm").iterdir()) == before
