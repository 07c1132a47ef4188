"""A small hand-written LoRA (Hu et al., arXiv 2106.09685), merged back into plain Linear layers at save time.

A frozen linear layer y = W x + b gets a trainable low-rank update:

    y = W x + b + (alpha / r) * B A dropout(x)        A: [r, in] (Kaiming uniform), B: [out, r] (zeros)

B starts at zero, so a freshly wrapped model computes exactly what it did before. `merge_lora`
folds the update into the weight, W' = W + (alpha / r) * B A, and puts plain `nn.Linear` layers
back, so the saved checkpoint is an ordinary Qwen2.5-VL that `from_pretrained` loads with no
adapter code. Choices (as peft's defaults): A is initialised like `nn.Linear` (Kaiming uniform,
a = sqrt(5)); dropout acts on the adapter's input only; adapters take the base layer's dtype.

Run: `python -m models.lora` wraps the tiny model's q_proj/v_proj and prints the adapter count.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.tiny import build_tiny_policy


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (alpha / r) * B @ A."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 32.0, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"--lora_r must be a positive rank, got {r}")
        self.base = base
        self.base.requires_grad_(False)
        self.r = r
        self.alpha = alpha
        self.scale = alpha / r
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **factory))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        # Some callers (dtype / device probes in transformers) read `.weight` of a projection.
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in]
        update = self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()  # [..., out]
        return self.base(x) + self.scale * update  # [..., out]

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) * B A, computed in at least float32 (float64 stays float64), cast back to W's dtype."""
        dtype = torch.promote_types(self.base.weight.dtype, torch.float32)
        delta = self.lora_B.to(dtype) @ self.lora_A.to(dtype)  # [out, in]
        return (self.base.weight.to(dtype) + self.scale * delta).to(self.base.weight.dtype)  # [out, in]

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, in={self.base.in_features}, out={self.base.out_features}"


# The nn.Linear names of Qwen2.5-VL's language layers, the ones --lora_targets may name.
LANGUAGE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_lora(
    model: nn.Module,
    targets: tuple[str, ...] | list[str] = ("q_proj", "v_proj"),
    r: int = 8,
    alpha: float = 32.0,
    dropout: float = 0.0,
    prefix: str = "",
) -> list[str]:
    """Wrap every `nn.Linear` whose last name component is in `targets` (and whose full name
    starts with `prefix`) in a `LoRALinear`. Returns the wrapped modules' names, sorted.

    Only the adapters are created here; freezing the rest of the model is the caller's choice
    (`models.freeze.apply_freeze_policy(model, "lora")` does both).
    """
    targets = tuple(targets)
    chosen = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(prefix) and name.rsplit(".", 1)[-1] in targets
    ]
    if not chosen:
        raise ValueError(
            f"--lora_targets {list(targets)} matched no nn.Linear under {prefix or 'the model'!r}; "
            "Qwen2.5-VL's language projections are q_proj k_proj v_proj o_proj gate_proj up_proj down_proj"
        )
    for name in chosen:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, LoRALinear(getattr(parent, child_name), r=r, alpha=alpha, dropout=dropout))
    return sorted(chosen)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` by a plain `nn.Linear` holding W + (alpha / r) B A (in place).

    The merged layers keep the base layer's requires_grad flag (frozen), and building them draws
    no random numbers. Returns `model`.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora: LoRALinear = getattr(parent, child_name)
        base = lora.base
        # skip_init: nn.Linear's default init would draw from torch's global generator, which
        # LoRA dropout also draws from, so a save would change the training after it (and a
        # resumed run would differ from the straight one). Every value is overwritten below.
        merged = torch.nn.utils.skip_init(
            nn.Linear, base.in_features, base.out_features, bias=base.bias is not None,
            device=base.weight.device, dtype=base.weight.dtype,
        )
        merged.weight.copy_(lora.merged_weight())
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        merged.requires_grad_(base.weight.requires_grad)
        setattr(parent, child_name, merged)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' A and B matrices (what the optimizer trains under the lora policy)."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


if __name__ == "__main__":
    tiny_model, _ = build_tiny_policy()
    wrapped = apply_lora(tiny_model, prefix="model.language_model.")
    n_adapter = sum(p.numel() for p in lora_parameters(tiny_model))
    print(f"wrapped {len(wrapped)} layers ({wrapped[0]}, ...): {n_adapter:,} adapter parameters")
