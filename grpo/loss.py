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
   (ratio 1). Every log-ratio is clamped above at 20 before exp() (ratio and k3, grpo/kl.py 2.).
5. The KL metric is reported whenever `ref_logprobs` is given, even with beta = 0 (then it is
   a diagnostic and adds nothing to the loss); without a reference it is 0.0. It is the value of
   the chosen estimator (`kl_estimator`, grpo/kl.py: k3 by default).

Options beyond the paper (all off by default; the defaults are GRPO as above):

6. Sequence-level ratio (`importance_sampling_level="sequence"`, GSPO, arXiv 2507.18071, eq. 7):
   s_i = exp(1/|o_i| sum_t (log pi_theta - log pi_old)), the length-normalised likelihood ratio
   of the whole completion, clipped per completion and broadcast to its tokens (as TRL does).
   Its gradient is s_i times the mean of the tokens' grad log pi.
7. CISPO (`objective="cispo"`, MiniMax-M1, arXiv 2506.13585, eq. 4-5): the per-token term is
   sg(min(ratio, 1 + epsilon_high)) * A * log pi_theta. The importance weight is clipped and
   detached (sg = stop-gradient) instead of the clip removing the token's gradient, so every
   token keeps a REINFORCE gradient. No lower bound (the paper sets epsilon_low^IS large).
8. Sampler correction (`sampler_logprobs` + `sampler_correction`, grpo/sampler_correction.py):
   the policy term of each token is multiplied by a capped pi_old / pi_sampler. With
   `sampler_logprobs` given, the gap |log pi_theta - log pi_sampler| is reported either way.
9. `policy_token_mask` (high-entropy token selection, arXiv 2506.01939; `--top_entropy_quantile`)
   zeroes the policy term on the tokens it leaves out, as TRL does: the KL term and the normaliser
   still count every completion token (the paper trains without a KL term, so it does not say).

Run the tests: `python -m pytest tests/test_loss.py -q`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from grpo.kl import KL_ESTIMATORS, LOG_RATIO_MAX, kl_estimate
from grpo.sampler_correction import SAMPLER_CORRECTIONS, importance_weights, sampler_logprob_gap

AGGREGATIONS = ("sequence", "token", "constant")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
OBJECTIVES = ("clip", "cispo")
# TRL's GRPOConfig.loss_type names (and GSPO's recipe) as this module's options. Only names with
# the same meaning: TRL's "bnpo" divides by each micro-batch's own token count, which no option
# here does ("token" divides by the whole step's); "sapo", "luspo", "vespo" are not implemented.
LOSS_TYPES = {
    "grpo": {"aggregation": "sequence", "importance_sampling_level": "token", "objective": "clip"},
    "dapo": {"aggregation": "token", "importance_sampling_level": "token", "objective": "clip"},
    "dr_grpo": {"aggregation": "constant", "importance_sampling_level": "token", "objective": "clip"},
    # TRL: loss_type="grpo", importance_sampling_level="sequence" (GSPO eq. 5: 1/G sum_i).
    "gspo": {"aggregation": "sequence", "importance_sampling_level": "sequence", "objective": "clip"},
    # TRL: loss_type="cispo" (token aggregation, as the paper's 1 / sum_i |o_i|).
    "cispo": {"aggregation": "token", "importance_sampling_level": "token", "objective": "cispo"},
}


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
    importance_sampling_level: str = "token",
    objective: str = "clip",
    kl_estimator: str = "k3",
    sampler_logprobs: Tensor | None = None,
    sampler_correction: str = "none",
    sampler_correction_cap: float = 3.0,
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
        importance_sampling_level: "token" (PPO/GRPO) or "sequence" (GSPO), module docstring 6.
        objective: "clip" (PPO's clipped surrogate) or "cispo" (module docstring 7).
        kl_estimator: one of grpo.kl.KL_ESTIMATORS ("k3" default).
        sampler_logprobs: [R, T] log pi_sampler from the rollout, or None.
        sampler_correction: "none" or a mode of grpo.sampler_correction (needs sampler_logprobs).
        sampler_correction_cap: C, the cap of the sampler-correction weight.
        policy_token_mask: [R, T] or None: the tokens whose surrogate counts (point 9); None = all.

    Returns:
        loss: scalar tensor.
        metrics over this micro-batch's completion tokens, python floats: "clip_frac_low"
        (ratio < 1 - epsilon_low and A < 0: clipped, no gradient), "clip_frac_high"
        (ratio > 1 + epsilon_high and A > 0), "clip_frac", "ratio_mean", "kl_mean",
        "completion_length_mean", "num_tokens". Under "cispo" the clip fractions count the
        tokens whose weight was capped (ratio > 1 + epsilon_high, either sign of A). Under the
        sequence level a completion's ratio counts once per token. With sampler_logprobs also
        "sampler_gap_mean", "sampler_gap_max" (|log pi_theta - log pi_sampler|) and, with a
        correction, "sampler_weight_mean" and "sampler_over_cap_frac".
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
    _check_options(
        logprobs, importance_sampling_level, objective, kl_estimator,
        sampler_logprobs, sampler_correction, sampler_correction_cap,
    )  # fmt: skip
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
    tokens_per_completion = mask.sum(dim=1)  # [R]

    # Guard: padded positions hold log-probs of tokens never chosen; a log-ratio of 0 there keeps
    # exp() finite (inf * mask 0 would be NaN) and its gradient exactly 0.
    log_ratio = torch.where(is_completion, logprobs - old_logprobs, 0.0)  # [R, T]
    if importance_sampling_level == "sequence":
        # GSPO: the mean log-ratio of each completion (a fully masked one: 0 / 1 = 0, ratio 1).
        sequence_log_ratio = log_ratio.sum(dim=1) / tokens_per_completion.clamp(min=1)  # [R]
        log_ratio = sequence_log_ratio.unsqueeze(1).expand_as(log_ratio)  # [R, T]
    ratio = torch.exp(log_ratio.clamp(max=LOG_RATIO_MAX))  # [R, T] guard: grpo/kl.py, 2.
    if objective == "clip":
        clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)  # [R, T]
        surrogate = torch.min(ratio * A, clipped_ratio * A)  # [R, T]
    else:  # "cispo"
        cispo_weight = torch.clamp(ratio, max=1 + epsilon_high).detach()  # [R, T] sg(clip(ratio))
        # Guard: log pi on padding may be -inf-like; 0 there keeps (weight * A * logp) * 0 finite.
        completion_logprobs = torch.where(is_completion, logprobs, 0.0)  # [R, T]
        surrogate = cispo_weight * A * completion_logprobs  # [R, T]

    sampler_weight = sampler_over_cap = None
    if sampler_correction != "none":
        sampler_weight, sampler_over_cap = importance_weights(
            old_logprobs, sampler_logprobs, mask, sampler_correction, sampler_correction_cap
        )  # [R, T] or [R, 1]
        surrogate = surrogate * sampler_weight  # [R, T] pi_old / pi_sampler, capped
    if policy_token_mask is not None:  # only the selected (high-entropy) tokens get a policy gradient
        surrogate = surrogate * policy_token_mask.to(device=surrogate.device, dtype=surrogate.dtype)  # [R, T]

    if beta > 0:
        kl = kl_estimate(logprobs, ref_logprobs, kl_estimator, ratio=ratio)  # [R, T]
        per_token_loss = -(surrogate - beta * kl)  # [R, T]
    else:
        kl = None
        per_token_loss = -surrogate  # [R, T]
    masked_loss = per_token_loss * mask  # [R, T]

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
        if objective == "clip":
            is_clipped_low = (ratio < 1 - epsilon_low) & (A < 0) & is_completion  # [R, T]
            is_clipped_high = (ratio > 1 + epsilon_high) & (A > 0) & is_completion  # [R, T]
        else:  # CISPO caps the weight from above only, whatever the sign of A
            is_clipped_low = torch.zeros_like(is_completion)  # [R, T]
            is_clipped_high = (ratio > 1 + epsilon_high) & is_completion  # [R, T]
        if kl is None and ref_logprobs is not None:  # beta == 0: KL as a diagnostic only
            kl = kl_estimate(logprobs, ref_logprobs, kl_estimator, ratio=ratio)  # [R, T]
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
        if sampler_logprobs is not None:
            gap_sum, gap_max = sampler_logprob_gap(logprobs, sampler_logprobs, mask)  # [], []
            metrics["sampler_gap_mean"] = gap_sum / token_count
            metrics["sampler_gap_max"] = gap_max
        if sampler_weight is not None:
            metrics["sampler_weight_mean"] = (sampler_weight * mask).sum() / token_count
            metrics["sampler_over_cap_frac"] = (sampler_over_cap & is_completion).sum() / token_count
        values = torch.stack([v.float() for v in metrics.values()]).tolist()  # one device sync
    return loss, dict(zip(metrics.keys(), values, strict=True))


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")


def _check_options(
    logprobs,
    importance_sampling_level,
    objective,
    kl_estimator,
    sampler_logprobs,
    sampler_correction,
    sampler_correction_cap,
) -> None:
    choices = {
        "importance_sampling_level": (importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS),
        "objective": (objective, OBJECTIVES),
        "kl_estimator": (kl_estimator, KL_ESTIMATORS),
        "sampler_correction": (sampler_correction, SAMPLER_CORRECTIONS),
    }
    for name, (value, valid) in choices.items():
        if value not in valid:
            raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    if sampler_logprobs is not None and tuple(sampler_logprobs.shape) != tuple(logprobs.shape):
        raise ValueError(
            f"sampler_logprobs has shape {tuple(sampler_logprobs.shape)} but logprobs has shape "
            f"{tuple(logprobs.shape)}; they must match exactly (no broadcasting)"
        )
    if sampler_correction != "none" and sampler_logprobs is None:
        raise ValueError(
            f"sampler_correction={sampler_correction!r} needs sampler_logprobs (the rollout's "
            "log pi_sampler); pass them, or set sampler_correction='none'"
        )
    if not sampler_correction_cap > 0:
        raise ValueError(f"sampler_correction_cap must be > 0, got {sampler_correction_cap}")


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
