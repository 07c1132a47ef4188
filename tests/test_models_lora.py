"""Tests of the hand-written LoRA (models/lora.py): identity at init, training, merge, plain save.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_models_lora.py -q
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tolerances import TINY_PATH_TERMS, network_error, sum_error
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration

from models.freeze import apply_freeze_policy
from models.lora import LoRALinear, apply_lora, lora_parameters, merge_lora
from models.tiny import build_tiny_policy


def test_lora_linear_arithmetic():
    torch.manual_seed(0)
    base = nn.Linear(4, 3)
    lora = LoRALinear(base, r=2, alpha=4.0)
    x = torch.randn(5, 4)  # [5, in]
    # B = 0 at init: the output is the base layer's (plus exact zeros: x + 0 * y == x).
    assert torch.equal(lora(x), base(x))
    assert lora.scale == 2.0  # alpha / r = 4 / 2
    with torch.no_grad():
        lora.lora_B.fill_(1.0)  # [3, 2]
    # y = W x + b + 2 * B A x
    expected = base(x) + 2.0 * (x @ lora.lora_A.t() @ lora.lora_B.t())
    # The forward's own ops in its order (dropout is off): equal to the last bit.
    assert torch.equal(lora(x), expected)
    # Merged: (W + 2 B A) x + b sums the same products in another order. Each side is a float32
    # sum of <= 8 roundings (in = 4 and r = 2 products, 2 additions) of terms whose absolute values
    # add up to |W| |x| + 2 |B| |A| |x| + |b|: each within sum_error(8, that), so twice that apart.
    abs_sum = (x.abs() @ (base.weight.abs() + 2.0 * lora.lora_B.abs() @ lora.lora_A.abs()).t() + base.bias.abs()).max()
    atol = 2 * sum_error(8, abs_sum.item())
    torch.testing.assert_close(x @ lora.merged_weight().t() + base.bias, expected, atol=atol, rtol=0)
    assert not base.weight.requires_grad and lora.lora_A.requires_grad


def test_apply_lora_errors_on_no_match():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="lora_targets"):
        apply_lora(model, ("q_proj",))
    with pytest.raises(ValueError, match="lora_r"):
        LoRALinear(nn.Linear(2, 2), r=0)


def test_train_merge_save_roundtrip(tmp_path, float64_hf):
    # float64 throughout: trained (W x + s B A x) and merged ((W + s B A) x) are two computation
    # orders of the whole network, compared with tolerances.network_error.
    model, processor = build_tiny_policy(seed=0)
    model = model.double()
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many objects?<|im_end|>\n<|im_start|>assistant\n"
    batch = processor(text=[text], images=[Image.new("RGB", (56, 56), "red")], return_tensors="pt")
    batch["pixel_values"] = batch["pixel_values"].double()
    with torch.no_grad():
        before = model(**batch).logits  # [1, P, V]

    counts = apply_freeze_policy(model, "lora", lora_r=4, lora_alpha=8)
    adapters = lora_parameters(model)
    assert counts["trainable"] == sum(p.numel() for p in adapters)
    with torch.no_grad():
        # identity at init: B = 0 adds exact zeros to the same base ops, so bit-equal
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)

    # A few SGD steps push B away from zero.
    model.train()
    optimizer = torch.optim.SGD(adapters, lr=1.0)
    for _ in range(3):
        loss = model(**batch).logits.logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert any(m.lora_B.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))
    with torch.no_grad():
        trained = model(**batch).logits  # [1, P, V]
    assert not torch.allclose(trained, before, atol=1e-4)

    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        merged = model(**batch).logits  # [1, P, V]
    assert merged.dtype == torch.float64
    bound = network_error(TINY_PATH_TERMS, trained.abs().max().item())
    torch.testing.assert_close(merged, trained, rtol=0, atol=bound)

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "lora" in k or ".base." in k]
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa", dtype=torch.float64)
    # from_pretrained keeps the rotary embeddings' inv_freq buffers in float32; .double(), as above,
    # turns them to float64 like the model that was saved (the same values, other rotary arithmetic).
    loaded = loaded.double()
    # A safetensors round trip is exact: the saved model is the merged one, weight for weight.
    saved = model.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in loaded.state_dict().items())
    # Its logits are not bit-equal to the merged model's on every CPU: the loaded weights sit in a
    # memory-mapped file at offsets that need not be 64-byte aligned, and a vector kernel splits its
    # sums into another head / body / tail at another alignment (seen on conv3d in float64). So
    # the two are two summation orders of the same network.
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, merged, rtol=0, atol=bound)


def test_merge_lora_draws_nothing_from_the_global_rng():
    """A save merges LoRA into a copy; building the merged layers must not advance torch's global
    generator (LoRA dropout draws from it), or a save would change the training that follows."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    apply_lora(model, targets=("0", "2"), r=2, dropout=0.1)
    state = torch.get_rng_state()
    merge_lora(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert not any(isinstance(module, LoRALinear) for module in model.modules())
