"""The GRPO loss written the slow, obvious way: the twin that tests/test_loss.py,
test_objectives.py and test_token_selection.py check `grpo.loss.grpo_loss` against.

Deliberately naive: python loops over completions and tokens, every formula written out (the
KL estimators too, independently of grpo/kl.py), padding skipped with `if` rather than
multiplied by the mask. Differentiable, slow.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grpo_loss_reference(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.04,
    aggregation: str = "sequence",
    normaliser: float,
    importance_sampling_level: str = "token",
    objective: str = "clip",
    kl_estimator: str = "k3",
    sampler_logprobs: Tensor | None = None,
    sampler_correction: str = "none",
    sampler_correction_cap: float = 3.0,
    policy_token_mask: Tensor | None = None,
) -> Tensor:
    """The same loss as `grpo.loss.grpo_loss`, one completion and one token at a time."""
    total = logprobs.new_zeros(())  # []
    for i in range(logprobs.shape[0]):
        A_i = float(advantages[i])
        tokens = [t for t in range(logprobs.shape[1]) if completion_mask[i, t] != 0]
        if not tokens:
            continue  # a fully masked completion adds nothing (padding after EOS is skipped)
        old = [logprobs[i, t].detach() if old_logprobs is None else old_logprobs[i, t] for t in tokens]
        log_ratios = [logprobs[i, t] - old_t for t, old_t in zip(tokens, old, strict=True)]
        sequence_ratio = torch.exp(torch.stack(log_ratios).mean())  # GSPO's s_i
        if sampler_correction != "none":  # log pi_old - log pi_sampler, token by token
            sampler_log_ratios = [old_t.detach() - sampler_logprobs[i, t] for t, old_t in zip(tokens, old, strict=True)]
            sequence_sampler_ratio = torch.exp(torch.stack(sampler_log_ratios).sum())
        token_losses = []
        for k, t in enumerate(tokens):
            logp = logprobs[i, t]
            ratio = sequence_ratio if importance_sampling_level == "sequence" else torch.exp(log_ratios[k])
            if objective == "clip":
                clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
                surrogate = torch.min(ratio * A_i, clipped_ratio * A_i)
            else:  # cispo: a detached, capped weight on a REINFORCE term
                surrogate = torch.clamp(ratio.detach(), max=1 + epsilon_high) * A_i * logp
            if sampler_correction != "none":
                w = sequence_sampler_ratio if sampler_correction.startswith("sequence") else torch.exp(sampler_log_ratios[k])
                if sampler_correction.endswith("truncate"):
                    w = torch.clamp(w, max=sampler_correction_cap)
                elif w > sampler_correction_cap:
                    w = torch.zeros_like(w)  # masked: dropped
                surrogate = surrogate * w
            if policy_token_mask is not None and not policy_token_mask[i, t]:
                surrogate = 0.0 * surrogate  # a token left out of the policy gradient
            kl = 0.0
            if beta > 0:
                x = ref_logprobs[i, t] - logp
                k3 = torch.exp(x) - x - 1
                kl = {
                    "k3": k3,
                    "k1": -x,
                    "k2": x**2 / 2,
                    "k3_plus": x**2 / 2 - (x**2 / 2).detach() + k3.detach(),
                    "k3_ratio": k3 * ratio,
                }[kl_estimator]
            token_losses.append(-(surrogate - beta * kl))
        completion_sum = torch.stack(token_losses).sum()
        if aggregation == "sequence":
            total = total + completion_sum / len(token_losses)
        else:
            total = total + completion_sum
    return total / normaliser
