"""Freezing policies: which parameters of a Qwen2.5-VL the optimizer may change.

    full      everything trains.
    language  the vision tower (model.model.visual, merger included) is frozen; the language
              model and lm_head train.
    projector_embeddings_first_layers
              the recipe of the blog post "Can an LLM Learn to See?": everything frozen except
              the vision merger's output projection (visual.merger.mlp.2, the projector into the
              language model), the language embedding table and the first `num_trainable_layers`
              decoder layers. With tied embeddings lm_head *is* embed_tokens, so it trains too
              (counted once). The post's prose names the embedding layer; its code left it
              frozen; we follow the prose. Its old name, `seed`, is still accepted (deprecated).
    lora      everything frozen; LoRA adapters (models/lora.py) on the language model's
              `lora_targets` projections train (r=8, alpha=32 on q_proj/v_proj as in the TRL
              recipe: 1,843,200 trainable parameters on Qwen2.5-VL-3B).

`apply_freeze_policy` returns {"trainable": n, "total": n}, counting each distinct parameter
once (tied weights once; LoRA adapters included in the total; frozen base weights too).

Run: `python -m models.freeze` prints each policy's counts on the tiny model.
"""

from __future__ import annotations

import logging
import warnings

from torch import nn

from models.lora import apply_lora
from models.tiny import build_tiny_policy

logger = logging.getLogger(__name__)

FREEZE_POLICIES = ("full", "language", "projector_embeddings_first_layers", "lora")
RENAMED_FREEZE_POLICIES = {"seed": "projector_embeddings_first_layers"}  # old name -> new name; the old one still works


def canonical_freeze_policy(policy: str) -> str:
    """The policy's current name; an old name works, with a deprecation warning that names the new one."""
    if policy in RENAMED_FREEZE_POLICIES:
        new = RENAMED_FREEZE_POLICIES[policy]
        warnings.warn(
            f"--freeze_policy {policy} is deprecated: it is now called {new} (same parameters train); "
            f"pass --freeze_policy {new}",
            FutureWarning,
            stacklevel=2,
        )
        return new
    return policy


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"trainable": n, "total": n}, each distinct parameter counted once."""
    params = list(model.parameters())  # .parameters() already de-duplicates tied weights
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }


def describe_trainable(model: nn.Module) -> str:
    """One line, e.g. "trainable 1,234 / 5,678 parameters (21.7%)"."""
    counts = count_parameters(model)
    share = 100.0 * counts["trainable"] / max(counts["total"], 1)
    return f"trainable {counts['trainable']:,} / {counts['total']:,} parameters ({share:.1f}%)"


def apply_freeze_policy(
    model: nn.Module,
    policy: str,
    num_trainable_layers: int = 5,
    lora_targets: tuple[str, ...] | list[str] = ("q_proj", "v_proj"),
    lora_r: int = 8,
    lora_alpha: float = 32.0,
    lora_dropout: float = 0.0,
) -> dict[str, int]:
    """Set requires_grad on a Qwen2_5_VLForConditionalGeneration according to `policy` (in place;
    "lora" also inserts adapters). Returns {"trainable": n, "total": n}."""
    policy = canonical_freeze_policy(policy)
    if policy not in FREEZE_POLICIES:
        raise ValueError(f"--freeze_policy {policy!r} is unknown; valid policies: {', '.join(FREEZE_POLICIES)}")
    visual = model.model.visual
    language = model.model.language_model

    if policy == "full":
        model.requires_grad_(True)
    elif policy == "language":
        model.requires_grad_(True)
        visual.requires_grad_(False)
    elif policy == "projector_embeddings_first_layers":
        num_layers = len(language.layers)
        if not 0 <= num_trainable_layers <= num_layers:
            raise ValueError(
                f"--num_trainable_layers {num_trainable_layers} is outside [0, {num_layers}] "
                f"(the language model has {num_layers} decoder layers)"
            )
        model.requires_grad_(False)
        visual.merger.mlp[2].requires_grad_(True)  # the projection into the LM's hidden size
        language.embed_tokens.requires_grad_(True)  # with tied embeddings this is lm_head too
        for layer in language.layers[:num_trainable_layers]:
            layer.requires_grad_(True)
    elif policy == "lora":
        model.requires_grad_(False)
        # Only the language model: the vision MLP also has gate/up/down_proj layers.
        apply_lora(model, lora_targets, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, prefix="model.language_model.")

    counts = count_parameters(model)
    logger.info("freeze policy %s: %s", policy, describe_trainable(model))
    return counts


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass instead of storing them (non-reentrant).

    When the input embeddings are frozen (lora), the embeddings' output
    does not require grad; the reentrant checkpoint variant would then drop every gradient
    inside a checkpointed layer. The non-reentrant variant used here does not need it, but we
    still make the embeddings' output require grad so that either variant works.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    embeddings = model.get_input_embeddings()
    if not any(p.requires_grad for p in embeddings.parameters()):
        model.enable_input_require_grads()


if __name__ == "__main__":
    for name in FREEZE_POLICIES:
        tiny_model, _ = build_tiny_policy()
        apply_freeze_policy(tiny_model, name, num_trainable_layers=1)
        print(f"{name:9s} {describe_trainable(tiny_model)}")
