"""The GRPO loss: PPO's clipped surrogate with group advantages, minus a k3 KL penalty.

DeepSeekMath (arXiv 2402.03300), eq. 3, maximises

    J = 1/G sum_i 1/|o_i| sum_t [ min(ratio_it * A_i, clip(ratio_it, 1 - eps, 1 + eps) * A_i)
                                  - beta * D_KL,it ]
    ratio_it = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)

The min/clip is PPO's (arXiv 1707.06347, eq. 7), A_i comes from `grpo.advantages`, D_KL from
`grpo.kl.kl_k3`. The code minimises the per-token loss -(surrogate - beta * kl). Each line of
`grpo_loss` is one term; the options beyond the paper (GSPO, CISPO, sampler correction, token
selection, the KL estimators, the aggregations) are named transformations of those terms in
grpo/objectives.py, chosen by one `LossOptions` (defaults: GRPO as written here).

Choices, and where the code departs from the paper:

1. Two clip ranges, [1 - epsilon_low, 1 + epsilon_high] (DAPO's clip-higher, arXiv 2503.14476
   sec. 3.1). epsilon_low = epsilon_high = 0.2 is GRPO; a larger epsilon_high lets rare tokens
   with A > 0 grow faster and slows the collapse of entropy.
2. One inner epoch (`old_logprobs=None`): the policy that sampled is the policy being
   updated, so old_logprobs = logprobs.detach(). The ratio exp(logp - logp.detach()) is then
   exactly 1 in value, so nothing is clipped, but its gradient is ratio * grad(logp) = grad(logp):
   the loss reduces to the policy-gradient -A * logp, and the same code serves num_iterations > 1.
3. Aggregation (`LossOptions.aggregation`): "sequence" is the paper's 1/G sum_i 1/|o_i| sum_t;
   "token" (DAPO) and "constant" (Dr. GRPO) are in grpo/objectives.py, point 6. The denominators
   N_completions and N_tokens count the whole optimizer step (every micro-batch, every rank),
   not this call's tensors: `step_normaliser` computes them and the caller passes the total as
   `normaliser`. Then the loss is a plain sum over completions, so summing the losses of
   micro-batches equals the loss of one big batch, value and gradient. (Micro-batches split
   rows, never a completion's tokens, so each 1/|o_i| is computed whole.)
4. Padded positions (after EOS) are made neutral before any exp(): their log-ratio is set to 0
   (ratio 1). Every log-ratio is clamped above at 20 before exp() (ratio and k3, grpo/kl.py 2.).
5. The KL metric is reported whenever `ref_logprobs` is given, even with beta = 0 (then it is
   a diagnostic and adds nothing to the loss); without a reference it is 0.0. It is the value of
   the chosen estimator (`kl_estimator`, grpo/kl.py: k3 by default). Every metric is computed in
   one place, `loss_metrics`, with one device sync.
6. The options are checked once, when `LossOptions` is built (from the config, when it is read);
   each call checks only its tensors' shapes, on the host (a broadcast would train silently on
   the wrong numbers).

Run the tests: `python -m pytest tests/test_loss.py tests/test_objectives.py -q`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from grpo.kl import LOG_RATIO_MAX, kl_estimate
from grpo.objectives import AGGREGATIONS, LossOptions, off_policy_sequence_mask
from grpo.sampler_correction import importance_weights, sampler_logprob_gap


def step_normaliser(
    completion_masks: Tensor, aggregation: str, max_completion_length: int | None = None,
    micro_batch_size: int | None = None,
) -> float:
    """The denominator of the loss, counted over some completions of one optimizer step.

    Args:
        completion_masks: [R, T] masks of completions of the step on this rank (all of them
            concatenated, or one micro-batch at a time: the count is additive).
        aggregation: "sequence" and "sequence_sum" -> number of completions; "token" -> number
            of completion tokens; "constant" -> number of completions * max_completion_length;
            "micro_batch_token" -> number of micro-batches (each adds its own token mean).
        max_completion_length: T_max, required for "constant".
        micro_batch_size: the rows of one micro-batch, for "micro_batch_token"; None: the rows
            given are one micro-batch.

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
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    num_completions = completion_masks.shape[0]
    if aggregation in ("sequence", "sequence_sum"):
        return float(num_completions)
    if aggregation == "micro_batch_token":
        return float(math.ceil(num_completions / (micro_batch_size or max(num_completions, 1))))
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
    options: LossOptions,
    *,
    normaliser: float,
    sampler_logprobs: Tensor | None = None,
    policy_token_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The GRPO loss of one micro-batch, ready for `.backward()`, and its metrics (`loss_metrics`).

    Args:
        logprobs: [R, T] log pi_theta of the completion tokens (with grad).
        old_logprobs: [R, T] log pi_old from sampling time, or None for one inner epoch.
        ref_logprobs: [R, T] log pi_ref, or None when beta == 0.
        advantages: [R] one advantage per completion.
        completion_mask: [R, T] 1.0 on completion tokens (through EOS), 0.0 on padding.
        options: the variant of each term and its hyper-parameters (grpo/objectives.py).
        normaliser: the step's total from `step_normaliser` (same aggregation).
        sampler_logprobs: [R, T] log pi_sampler from the rollout, or None (a sampler correction needs it).
        policy_token_mask: [R, T] or None: the tokens whose surrogate counts (None = all).
    """
    _check_shapes(logprobs, advantages, options, normaliser, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                  completion_mask=completion_mask, sampler_logprobs=sampler_logprobs,
                  policy_token_mask=policy_token_mask)  # fmt: skip
    mask = completion_mask.to(device=logprobs.device, dtype=logprobs.dtype)  # [R, T]
    A = advantages.to(device=logprobs.device, dtype=logprobs.dtype).unsqueeze(1)  # [R, 1]
    if old_logprobs is None:
        old_logprobs = logprobs.detach()  # [R, T] ratio 1 in value, grad(logp) in gradient (point 2)

    # Guard: padded positions hold log-probs of tokens never chosen; a log-ratio of 0 there keeps
    # exp() finite (inf * mask 0 would be NaN) and its gradient exactly 0.
    log_ratio = torch.where(mask > 0, logprobs - old_logprobs, 0.0)  # [R, T]
    log_ratio = options.log_ratio(log_ratio, mask)  # [R, T] per token; GSPO: per completion
    ratio = torch.exp(log_ratio.clamp(max=LOG_RATIO_MAX))  # [R, T] guard: grpo/kl.py, 2.
    surrogate = options.surrogate(ratio, A, logprobs, mask)  # [R, T] min(ratio A, clip(ratio) A)
    surrogate = surrogate * options.token_weights(logprobs, old_logprobs, A, mask, sampler_logprobs, policy_token_mask)  # [R, T]
    kl = options.kl(logprobs, ref_logprobs, ratio)  # [R, T] k3; 0.0 when beta == 0
    per_token_loss = -(surrogate - options.beta * kl)  # [R, T]
    loss = options.aggregate(per_token_loss * mask, mask) / normaliser  # []
    return loss, loss_metrics(logprobs, old_logprobs, ref_logprobs, sampler_logprobs, ratio, A, mask, kl, options)


def loss_metrics(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    sampler_logprobs: Tensor | None,
    ratio: Tensor,
    A: Tensor,
    mask: Tensor,
    kl: Tensor | float,
    options: LossOptions,
) -> dict[str, float]:
    """The loss's metrics over this micro-batch's completion tokens, as python floats (one device sync).

    "clip_frac_low" (ratio < 1 - epsilon_low and A < 0: clipped, no gradient), "clip_frac_high"
    (ratio > 1 + epsilon_high and A > 0), "clip_frac", "ratio_mean", "kl_mean",
    "completion_length_mean", "num_tokens". Under "cispo" the clip fractions count the tokens
    whose weight was capped (ratio > 1 + epsilon_high, either sign of A). Under the sequence level
    a completion's ratio counts once per token. With sampler_logprobs also "sampler_gap_mean",
    "sampler_gap_max" (|log pi_theta - log pi_sampler|) and, with a correction,
    "sampler_weight_mean" and "sampler_over_cap_frac"; with an off-policy mask
    "off_policy_masked_frac" (the tokens of the completions it dropped).
    """
    with torch.no_grad():
        is_completion = mask > 0  # [R, T]
        num_tokens = mask.sum()  # []
        # Guard: a micro-batch whose mask is all 0 reports 0 fractions instead of NaN.
        token_count = num_tokens.clamp(min=1)  # []
        is_clipped_low, is_clipped_high = options.clipped_tokens(ratio, A)  # [R, T] each
        is_clipped_low, is_clipped_high = is_clipped_low & is_completion, is_clipped_high & is_completion
        # The KL as a diagnostic whenever a reference is given, even with beta == 0 (point 5); kl is
        # the loss's own [R, T] estimate, or 0.0 when beta == 0.
        if ref_logprobs is not None and not isinstance(kl, Tensor):
            kl = kl_estimate(logprobs, ref_logprobs, options.kl_estimator, ratio=ratio)  # [R, T]
        kl_sum = (kl * mask).sum() if ref_logprobs is not None else num_tokens.new_zeros(())  # []
        metrics = {
            "clip_frac_low": is_clipped_low.sum() / token_count,
            "clip_frac_high": is_clipped_high.sum() / token_count,
            "clip_frac": (is_clipped_low | is_clipped_high).sum() / token_count,
            "ratio_mean": (ratio * mask).sum() / token_count,
            "kl_mean": kl_sum / token_count,
            "completion_length_mean": mask.sum(dim=1).mean(),
            "num_tokens": num_tokens,
        }
        if sampler_logprobs is not None:
            gap_sum, gap_max = sampler_logprob_gap(logprobs, sampler_logprobs, mask)  # [], []
            metrics["sampler_gap_mean"] = gap_sum / token_count
            metrics["sampler_gap_max"] = gap_max
        if options.sampler_correction != "none":
            sampler_weight, sampler_over_cap = importance_weights(
                old_logprobs, sampler_logprobs, mask, options.sampler_correction, options.sampler_correction_cap,
                options.sampler_correction_min,
            )  # [R, T] or [R, 1]
            metrics["sampler_weight_mean"] = (sampler_weight * mask).sum() / token_count
            metrics["sampler_over_cap_frac"] = (sampler_over_cap & is_completion).sum() / token_count
        if options.off_policy_mask_threshold is not None:
            keep = off_policy_sequence_mask(logprobs, old_logprobs, A, mask, sampler_logprobs, options)  # [R, 1]
            metrics["off_policy_masked_frac"] = ((1 - keep) * mask).sum() / token_count
        values = torch.stack([v.float() for v in metrics.values()]).tolist()  # one device sync
    return dict(zip(metrics.keys(), values, strict=True))


def _check_shapes(logprobs: Tensor, advantages: Tensor, options: LossOptions, normaliser: float, **tensors) -> None:
    """This call's tensors against each other and the options, on the host (no device sync)."""
    if logprobs.ndim != 2:
        raise ValueError(f"logprobs must be [R, T], got shape {tuple(logprobs.shape)}")
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but logprobs has shape {tuple(logprobs.shape)}; "
                "they must match exactly (no broadcasting)"
            )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"advantages must be [R] = {tuple(logprobs.shape[:1])} (one per completion) for logprobs "
            f"{tuple(logprobs.shape)}, got shape {tuple(advantages.shape)}"
        )
    if options.beta > 0 and tensors["ref_logprobs"] is None:
        raise ValueError(
            f"beta = {options.beta} > 0 needs ref_logprobs (the reference model's log-probs); "
            "pass them, or set beta = 0 to train without the KL penalty"
        )
    if options.sampler_correction != "none" and tensors["sampler_logprobs"] is None:
        raise ValueError(
            f"sampler_correction={options.sampler_correction!r} needs sampler_logprobs (the rollout's "
            "log pi_sampler); pass them, or set sampler_correction='none'"
        )
    if not (normaliser > 0 and math.isfinite(normaliser)):
        raise ValueError(
            f"normaliser must be a finite number > 0, got {normaliser}; compute it with "
            "step_normaliser and clamp the step's total to at least 1"
        )
