"""Tests of the freezing policies and gradient checkpointing (models/freeze.py) on the tiny model.

(The same policies on the real Qwen2.5-VL-3B shapes are in tests/test_models_real_configs.py.)

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_models_freeze.py -q
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tolerances import TINY_PATH_TERMS, float64_throughout, network_error

from models.freeze import (
    FREEZE_POLICIES,
    apply_freeze_policy,
    describe_trainable,
    enable_gradient_checkpointing,
)
from models.lora import LoRALinear
from models.tiny import build_tiny_policy


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def model():
    return build_tiny_policy(seed=0)[0]


def test_full_and_language(model):
    total = numel(model)
    assert apply_freeze_policy(model, "full") == {"trainable": total, "total": total}
    counts = apply_freeze_policy(model, "language")
    assert counts == {"trainable": total - numel(model.model.visual), "total": total}
    assert not any(name.startswith("model.visual.") for name in trainable_names(model))


def test_seed_policy(model):
    language = model.model.language_model
    counts = apply_freeze_policy(model, "projector_embeddings_first_layers", num_trainable_layers=1)
    # merger.mlp.2 + embed_tokens (= lm_head, tied, counted once) + layer 0.
    expected = numel(model.model.visual.merger.mlp[2]) + numel(language.embed_tokens) + numel(language.layers[0])
    assert counts["trainable"] == expected
    names = trainable_names(model)
    assert "model.visual.merger.mlp.2.weight" in names and "model.visual.merger.mlp.0.weight" not in names
    assert any(n.startswith("model.language_model.layers.0.") for n in names)
    assert not any(n.startswith("model.language_model.layers.1.") for n in names)
    assert model.lm_head.weight.requires_grad  # tied to embed_tokens
    with pytest.raises(ValueError, match="num_trainable_layers"):
        apply_freeze_policy(model, "projector_embeddings_first_layers", num_trainable_layers=3)


def test_lora_policy_and_describe(model):
    total_before = numel(model)
    counts = apply_freeze_policy(model, "lora", lora_targets=("q_proj", "v_proj"), lora_r=8)
    # Per layer, r * (in + out): q_proj 8 * (128 + 128) = 2048, v_proj 8 * (128 + 64) = 1536;
    # 2 layers -> 2 * 3584 = 7168.
    assert counts == {"trainable": 7168, "total": total_before + 7168}
    assert all(".lora_" in name for name in trainable_names(model))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert all(n.startswith("model.language_model.") for n in wrapped) and len(wrapped) == 4
    assert describe_trainable(model) == (
        f"trainable 7,168 / {total_before + 7168:,} parameters ({100 * 7168 / (total_before + 7168):.1f}%)"
    )


def test_unknown_policy_lists_valid_ones(model):
    with pytest.raises(ValueError, match="full, language, projector_embeddings_first_layers, lora"):
        apply_freeze_policy(model, "vision")
    assert FREEZE_POLICIES == ("full", "language", "projector_embeddings_first_layers", "lora")


@pytest.mark.parametrize("policy", ["full", "lora"])
def test_gradient_checkpointing_same_gradients(policy):
    processor = build_tiny_policy()[1]
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Count.<|im_end|>\n<|im_start|>assistant\n"
    batch = processor(text=[text], images=[Image.new("RGB", (56, 56), "red")], return_tensors="pt")
    batch["pixel_values"] = batch["pixel_values"].double()
    grads = []
    for checkpointing in (False, True):
        # float64 throughout: a checkpointed backward recomputes each layer inside the backward,
        # another order of the same sums, so the two are compared with network_error.
        model = build_tiny_policy(seed=0)[0].double()
        torch.manual_seed(0)  # LoRA's A is drawn from the global RNG
        apply_freeze_policy(model, policy)
        if policy == "lora":  # make B non-zero so A receives a gradient too
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    torch.nn.init.normal_(m.lora_B, std=0.1, generator=torch.Generator().manual_seed(0))
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert model.model.language_model.layers[0].gradient_checkpointing
        model.train()
        with float64_throughout():
            model(**batch).logits.logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name, grad in grads[0].items():
        assert grad.dtype == torch.float64, name
        # The backward doubles the path; bound at this parameter's largest gradient entry.
        atol = network_error(2 * TINY_PATH_TERMS, grad.abs().max().item())
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=atol)
