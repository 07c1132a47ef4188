"""The GRPO loss: PPO's clipped surrogate with group advantages, minus a k3 KL penalty.

DeepSeekMath (arXiv 2402.03300), eq. 3, maximises

    J = 1/G sum_i 1/|o_i| sum_t [ min(ratio_it * A_i, clip(ratio_it, 1 - eps, 1 + eps) * A_i)
                                  - beta * D_KL,it ]
    ratio_it = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)

The min/clip is PPO's (arXiv 1707.06347, eq. 7), A_i comes from `grpo.advantages`, D_KL from
`grpo.kl.kl_k3`. The code minimises the per-token loss -(surrogate - beta * kl).

Choices, and where the code departs from the paper:

1. Two clip ranges, [1 - epsilon_low, 1 + epsilon_high] (DAPO's clip-higher, arXiv 2503.14476
   sec. 3.1). epsilon_low = epsilon_high = 0.2 is GRPO; a larger epsilon_high lets rare tokens
   with A > 0 grow faster and slows the collapse of entropy.
2. One inner epoch (`old_logprobs=None`): the policy that sampled is the policy being
   updated, so old_logprobs = logprobs.detach(). The ratio exp(logp - logp.detach()) is then
   exactly 1 in value, so nothing is clipped, but its gradient is ratio * grad(logp) = grad(logp):
   the loss reduces to the policy-gradient -A * logp, and the same code serves num_iterations > 1.
3. Aggregation (the `aggregation` flag), with l_it the per-token loss and m_it the mask:
   - "sequence" (GRPO paper): sum_i (sum_t m_it l_it / |o_i|) / N_completions;
   - "token" (DAPO, sec. 3.3): sum_it m_it l_it / N_tokens, so long completions count per token;
   - "constant" (Dr. GRPO, arXiv 2503.20783): sum_it m_it l_it / (N_completions * T_max), no
     length bias at all.
   N_completions and N_tokens count the whole optimizer step (every micro-batch, every rank),
   not this call's tensors: `step_normaliser` computes them and the caller passes the total as
   `normaliser`. Then the loss is a plain sum over completions, so summing the losses of
   micro-batches equals the loss of one big batch, value and gradient. (Micro-batches split
   rows, never a completion's tokens, so each 1/|o_i| is computed whole.)
4. Padded positions (after EOS) are made neutral before any exp(): their log-ratio is set to 0
   (ratio 1), and `kl_k3` clamps its log-ratio. The mask then multiplies finite numbers only.
5. The KL metric is reported whenever `ref_logprobs` is given, even with beta = 0 (then it is
   a diagnostic and adds nothing to the loss); without a reference it is 0.0.
6. `policy_token_mask` (high-entropy token selection, arXiv 2506.01939; `--top_entropy_quantile`)
   zeroes the surrogate on the tokens it leaves out, as TRL does: the KL term and the normaliser
   still count every completion token (the paper trains without a KL term, so it does not say).

Run the tests: `python -m pytest tests/test_loss.py -q`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from grpo.kl import kl_k3

AGGREGATIONS = ("sequence", "token", "constant")


def step_normaliser(
    completion_masks: Tensor, aggregation: str, max_completion_length: int | None = None
) -> float:
    """The denominator of the loss, counted over some completions of one optimizer step.

    Args:
        completion_masks: [R, T] masks of completions of the step on this rank (all of them
            concatenated, or one micro-batch at a time: the count is additive).
        aggregation: "sequence" -> number of completions; "token" -> number of completion
            tokens; "constant" -> number of completions * max_completion_length.
        max_completion_length: T_max, required for "constant".

    Returns:
        The count as a float. The caller sums it over micro-batches and ranks; if every
        completion of the step is masked out the "token" total is 0, so clamp the total
        (`max(total, 1.0)`) after summing, not before. Under DDP, which averages gradients
        over ranks, pass `global_total / world_size` as the normaliser: each rank's loss is
        then (its sum) * world_size / global_total, and DDP's average gives sum / global_total.
    """
    if completion_masks.ndim != 2:
        raise ValueError(
            f"completion_masks must be [R, T], got shape {tuple(completion_masks.shape)}"
        )
    _check_aggregation(aggregation)
    num_completions = completion_masks.shape[0]
    if aggregation == "sequence":
        return float(num_completions)
    if aggregation == "token":
        return float(completion_masks.sum().item())
    if max_completion_length is None or max_completion_length < 1:
        raise ValueError(
            f"aggregation='constant' needs max_completion_length >= 1, got {max_completion_length}"
        )
    if completion_masks.shape[1] > max_completion_length:
        raise ValueError(
            f"completion_masks has T = {completion_masks.shape[1]} > max_completion_length "
            f"= {max_completion_length}"
        )
    return float(num_completions * max_completion_length)


def grpo_loss(
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
    policy_token_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The GRPO loss of one micro-batch, ready for `.backward()`.

    Args:
        logprobs: [R, T] log pi_theta of the completion tokens (with grad).
        old_logprobs: [R, T] log pi_old from sampling time, or None for one inner epoch.
        ref_logprobs: [R, T] log pi_ref, or None when beta == 0.
        advantages: [R] one advantage per completion.
        completion_mask: [R, T] 1.0 on completion tokens (through EOS), 0.0 on padding.
        epsilon_low, epsilon_high: the clip range [1 - epsilon_low, 1 + epsilon_high].
        beta: weight of the KL penalty.
        aggregation: "sequence", "token" or "constant" (module docstring).
        normaliser: the step's total from `step_normaliser` (same aggregation).
        policy_token_mask: [R, T] or None: the tokens whose surrogate counts (point 6); None = all.

    Returns:
        loss: scalar tensor.
        metrics over this micro-batch's completion tokens, python floats: "clip_frac_low"
        (ratio < 1 - epsilon_low and A < 0: clipped, no gradient), "clip_frac_high"
        (ratio > 1 + epsilon_high and A > 0), "clip_frac", "ratio_mean", "kl_mean",
        "completion_length_mean", "num_tokens".
    """
    _check_loss_inputs(
        logprobs,
        old_logprobs,
        ref_logprobs,
        advantages,
        completion_mask,
        epsilon_low,
        epsilon_high,
        beta,
        aggregation,
        normaliser,
    )
    if policy_token_mask is not None and tuple(policy_token_mask.shape) != tuple(logprobs.shape):
        raise ValueError(
            f"policy_token_mask has shape {tuple(policy_token_mask.shape)} but logprobs has shape "
            f"{tuple(logprobs.shape)}; they must match exactly"
        )
    mask = completion_mask.to(device=logprobs.device, dtype=logprobs.dtype)  # [R, T]
    is_completion = mask > 0  # [R, T]
    A = advantages.to(device=logprobs.device, dtype=logprobs.dtype).unsqueeze(1)  # [R, 1]
    if old_logprobs is None:
        old_logprobs = logprobs.detach()  # [R, T] ratio 1 in value, grad(logp) in gradient

    # Guard: padded positions hold log-probs of tokens never chosen; a log-ratio of 0 there keeps
    # exp() finite (inf * mask 0 would be NaN) and its gradient exactly 0.
    log_ratio = torch.where(is_completion, logprobs - old_logprobs, 0.0)  # [R, T]
    ratio = torch.exp(log_ratio)  # [R, T]
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)  # [R, T]
    surrogate = torch.min(ratio * A, clipped_ratio * A)  # [R, T]
    if policy_token_mask is not None:  # only the selected (high-entropy) tokens get a policy gradient
        surrogate = surrogate * policy_token_mask.to(device=surrogate.device, dtype=surrogate.dtype)  # [R, T]

    if beta > 0:
        kl = kl_k3(logprobs, ref_logprobs)  # [R, T]
        per_token_loss = -(surrogate - beta * kl)  # [R, T]
    else:
        kl = None
        per_token_loss = -surrogate  # [R, T]
    masked_loss = per_token_loss * mask  # [R, T]

    tokens_per_completion = mask.sum(dim=1)  # [R]
    if aggregation == "sequence":
        # Guard: a completion with no tokens left in the mask (truncated and masked out) adds
        # 0 / 1 = 0 instead of 0 / 0 = NaN.
        completion_means = masked_loss.sum(dim=1) / tokens_per_completion.clamp(min=1)  # [R]
        loss = completion_means.sum() / normaliser  # []
    else:  # "token" and "constant" differ only in the normaliser
        loss = masked_loss.sum() / normaliser  # []

    with torch.no_grad():
        num_tokens = mask.sum()  # []
        # Guard: a micro-batch whose mask is all 0 reports 0 fractions instead of NaN.
        token_count = num_tokens.clamp(min=1)  # []
        is_clipped_low = (ratio < 1 - epsilon_low) & (A < 0) & is_completion  # [R, T]
        is_clipped_high = (ratio > 1 + epsilon_high) & (A > 0) & is_completion  # [R, T]
        if kl is None and ref_logprobs is not None:  # beta == 0: KL as a diagnostic only
            kl = kl_k3(logprobs, ref_logprobs)  # [R, T]
        kl_sum = (kl * mask).sum() if kl is not None else num_tokens.new_zeros(())  # []
        metrics = {
            "clip_frac_low": is_clipped_low.sum() / token_count,
            "clip_frac_high": is_clipped_high.sum() / token_count,
            "clip_frac": (is_clipped_low | is_clipped_high).sum() / token_count,
            "ratio_mean": (ratio * mask).sum() / token_count,
            "kl_mean": kl_sum / token_count,
            "completion_length_mean": tokens_per_completion.mean(),
            "num_tokens": num_tokens,
        }
        values = torch.stack([v.float() for v in metrics.values()]).tolist()  # one device sync
    return loss, dict(zip(metrics.keys(), values, strict=True))


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
    policy_token_mask: Tensor | None = None,
) -> Tensor:
    """The same loss as `grpo_loss`, one completion and one token at a time (for tests).

    Deliberately naive: python loops, the k3 formula written out, padding skipped with `if`
    rather than multiplied by the mask. Differentiable, slow.
    """
    total = logprobs.new_zeros(())  # []
    for i in range(logprobs.shape[0]):
        A_i = float(advantages[i])
        token_losses = []
        for t in range(logprobs.shape[1]):
            if completion_mask[i, t] == 0:
                continue  # padding after EOS
            logp = logprobs[i, t]
            old_logp = logp.detach() if old_logprobs is None else old_logprobs[i, t]
            ratio = torch.exp(logp - old_logp)
            clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
            surrogate = torch.min(ratio * A_i, clipped_ratio * A_i)
            if policy_token_mask is not None and not policy_token_mask[i, t]:
                surrogate = 0.0 * surrogate  # a token left out of the policy gradient
            kl = 0.0
            if beta > 0:
                x = ref_logprobs[i, t] - logp
                kl = torch.exp(x) - x - 1
            token_losses.append(-(surrogate - beta * kl))
        if not token_losses:
            continue  # a fully masked completion adds nothing
        completion_sum = torch.stack(token_losses).sum()
        if aggregation == "sequence":
            total = total + completion_sum / len(token_losses)
        else:
            total = total + completion_sum
    return total / normaliser


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")


def _check_loss_inputs(
    logprobs,
    old_logprobs,
    ref_logprobs,
    advantages,
    completion_mask,
    epsilon_low,
    epsilon_high,
    beta,
    aggregation,
    normaliser,
) -> None:
    if logprobs.ndim != 2:
        raise ValueError(f"logprobs must be [R, T], got shape {tuple(logprobs.shape)}")
    expected = tuple(logprobs.shape)
    named = {
        "old_logprobs": old_logprobs,
        "ref_logprobs": ref_logprobs,
        "completion_mask": completion_mask,
    }
    for name, tensor in named.items():
        if tensor is not None and tuple(tensor.shape) != expected:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but logprobs has shape {expected}; "
                "they must match exactly (no broadcasting)"
            )
    if tuple(advantages.shape) != expected[:1]:
        raise ValueError(
            f"advantages must be [R] = {expected[:1]} (one per completion) for logprobs "
            f"{expected}, got shape {tuple(advantages.shape)}"
        )
    _check_aggregation(aggregation)
    if not 0 <= epsilon_low < 1:
        raise ValueError(
            f"epsilon_low must be in [0, 1) so that 1 - epsilon_low > 0, got {epsilon_low}"
        )
    if epsilon_high < 0:
        raise ValueError(f"epsilon_high must be >= 0, got {epsilon_high}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(
            f"beta = {beta} > 0 needs ref_logprobs (the reference model's log-probs); "
            "pass them, or set beta = 0 to train without the KL penalty"
        )
    if not (normaliser > 0 and math.isfinite(normaliser)):
        raise ValueError(
            f"normaliser must be a finite number > 0, got {normaliser}; compute it with "
            "step_normaliser and clamp the step's total to at least 1"
        )
