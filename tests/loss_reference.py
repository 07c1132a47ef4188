"""The GRPO loss written the slow, obvious way: the twin that tests/test_loss.py,
test_objectives.py and test_token_selection.py check `grpo.loss.grpo_loss` against.

Deliberately naive: python loops over completions and tokens, every formula written out (the
KL estimators, SAPO's gate, VESPO's weight, the sampler weights and the off-policy mask too,
independently of grpo/kl.py, grpo/objectives.py and grpo/sampler_correction.py), padding
skipped with `if` rather than multiplied by the mask, each bound an `if`. Differentiable, slow.

The formulas, from the papers (grpo/objectives.py's docstring lists them):
- clip (PPO): min(r A, clip(r, 1 - eps_low, 1 + eps_high) A); with delta (INTELLECT-2) the
  first r is min(r, delta).
- cispo (MiniMax-M1): sg(min(r, 1 + eps_high)) A log pi.
- sapo (arXiv 2511.20347): (4 / tau) sigmoid(tau (r - 1)) A, tau = tau_pos if A > 0 else tau_neg.
- vespo (arXiv 2602.10693): sg(phi(w)) A log pi, phi(w) = e^lambda w^k e^(-lambda w), w the
  product of the completion's token ratios; (k, lambda) = the _pos pair if A >= 0 else _neg.
- the off-policy mask (DeepSeek-V3.2, eq. 9): a completion with A < 0 and
  mean_t (log pi_sampling - log pi_theta) > threshold loses its policy term.
- the sampler weight pi_old / pi_sampler (per token, or the product over the completion): above
  the cap C truncated to C or dropped (0); below the floor C_min raised to C_min or dropped.
The guards, restated: the log-ratio is clamped above at 20 before exp (grpo/loss.py), and so is
k3's x = log pi_ref - log pi (grpo/kl.py; k1 and k2 take x unclamped, k3_plus k3's value); VESPO
bounds each token's log-ratio to [-20, 20] and log w to [log 1e-8, 20] (as TRL).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_RATIO_MAX = 20.0  # the cap on a log-ratio before exp()
VESPO_TOKEN_LOG_RATIO_BOUND = 20.0  # VESPO: each token's log-ratio within [-20, 20]
VESPO_LOG_W_MIN, VESPO_LOG_W_MAX = math.log(1e-8), 20.0  # VESPO: log w within [log 1e-8, 20]


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
    sampler_correction_min: float | None = None,
    delta: float | None = None,
    off_policy_mask_threshold: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    policy_token_mask: Tensor | None = None,
) -> Tensor:
    """The same loss as `grpo.loss.grpo_loss`, one completion and one token at a time."""
    total = logprobs.new_zeros(())  # []
    num_tokens = 0  # this call's completion tokens (micro_batch_token's denominator)
    for i in range(logprobs.shape[0]):
        A_i = float(advantages[i])
        tokens = [t for t in range(logprobs.shape[1]) if completion_mask[i, t] != 0]
        if not tokens:
            continue  # a fully masked completion adds nothing (padding after EOS is skipped)
        num_tokens += len(tokens)
        old = [logprobs[i, t].detach() if old_logprobs is None else old_logprobs[i, t] for t in tokens]
        log_ratios = [logprobs[i, t] - old_t for t, old_t in zip(tokens, old, strict=True)]
        mean_log_ratio = torch.stack(log_ratios).mean()
        if mean_log_ratio > LOG_RATIO_MAX:
            mean_log_ratio = torch.clamp(mean_log_ratio, max=LOG_RATIO_MAX)  # guard: no overflow in exp
        sequence_ratio = torch.exp(mean_log_ratio)  # GSPO's s_i
        if sampler_correction != "none":  # log pi_old - log pi_sampler, token by token
            sampler_log_ratios = [float(old_t.detach()) - float(sampler_logprobs[i, t]) for t, old_t in zip(tokens, old, strict=True)]
            sequence_sampler_ratio = math.exp(sum(sampler_log_ratios))
        if objective == "vespo":  # phi(w_i), a python float: no gradient
            log_w = 0.0
            for log_ratio in log_ratios:
                log_ratio = float(log_ratio.detach())
                if log_ratio > VESPO_TOKEN_LOG_RATIO_BOUND:
                    log_ratio = VESPO_TOKEN_LOG_RATIO_BOUND
                if log_ratio < -VESPO_TOKEN_LOG_RATIO_BOUND:
                    log_ratio = -VESPO_TOKEN_LOG_RATIO_BOUND
                log_w += log_ratio
            if log_w > VESPO_LOG_W_MAX:
                log_w = VESPO_LOG_W_MAX
            if log_w < VESPO_LOG_W_MIN:
                log_w = VESPO_LOG_W_MIN
            w = math.exp(log_w)
            if A_i >= 0:
                k, lam = vespo_k_pos, vespo_lambda_pos
            else:
                k, lam = vespo_k_neg, vespo_lambda_neg
            phi = math.exp(lam) * w**k * math.exp(-lam * w)
        keep_policy_term = True  # DeepSeek-V3.2's off-policy sequence mask
        if off_policy_mask_threshold is not None and A_i < 0:
            gaps = []  # log pi_sampling - log pi_theta, no gradient
            for t, old_t in zip(tokens, old, strict=True):
                sampling_logprob = float(old_t.detach()) if sampler_logprobs is None else float(sampler_logprobs[i, t])
                gaps.append(sampling_logprob - float(logprobs[i, t].detach()))
            if sum(gaps) / len(gaps) > off_policy_mask_threshold:
                keep_policy_term = False
        token_losses = []
        for k_t, t in enumerate(tokens):
            logp = logprobs[i, t]
            if importance_sampling_level == "sequence":
                ratio = sequence_ratio
            else:
                log_ratio = log_ratios[k_t]
                if log_ratio > LOG_RATIO_MAX:
                    log_ratio = torch.clamp(log_ratio, max=LOG_RATIO_MAX)  # guard: no overflow in exp
                ratio = torch.exp(log_ratio)
            if objective == "clip":
                clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
                bounded_ratio = ratio
                if delta is not None and ratio > delta:
                    bounded_ratio = ratio.new_tensor(delta)  # INTELLECT-2: a constant above delta
                surrogate = torch.min(bounded_ratio * A_i, clipped_ratio * A_i)
            elif objective == "cispo":  # a detached, capped weight on a REINFORCE term
                surrogate = torch.clamp(ratio.detach(), max=1 + epsilon_high) * A_i * logp
            elif objective == "sapo":
                tau = sapo_temperature_pos if A_i > 0 else sapo_temperature_neg
                gate = (4 / tau) / (1 + torch.exp(-tau * (ratio - 1)))  # (4 / tau) sigmoid(tau (r - 1))
                surrogate = gate * A_i
            else:  # vespo
                surrogate = phi * A_i * logp
            if sampler_correction != "none":
                if sampler_correction.startswith("sequence"):
                    w_it = sequence_sampler_ratio
                else:
                    w_it = math.exp(sampler_log_ratios[k_t])
                if w_it > sampler_correction_cap:
                    w_it = sampler_correction_cap if sampler_correction.endswith("truncate") else 0.0
                elif sampler_correction_min is not None and w_it < sampler_correction_min:
                    w_it = sampler_correction_min if sampler_correction.endswith("truncate") else 0.0
                surrogate = surrogate * w_it
            if not keep_policy_term:
                surrogate = 0.0 * surrogate  # the completion's policy term is dropped
            if policy_token_mask is not None and not policy_token_mask[i, t]:
                surrogate = 0.0 * surrogate  # a token left out of the policy gradient
            kl = 0.0
            if beta > 0:
                x = ref_logprobs[i, t] - logp
                x_k3 = x  # k3's x, clamped like the ratio's log (grpo/kl.py 2.); k1 and k2 use x as it is
                if x_k3 > LOG_RATIO_MAX:
                    x_k3 = torch.clamp(x_k3, max=LOG_RATIO_MAX)  # guard: no overflow in exp
                k3 = torch.exp(x_k3) - x_k3 - 1
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
        else:  # token, constant, sequence_sum, micro_batch_token: a plain sum here
            total = total + completion_sum
    if aggregation == "micro_batch_token":
        total = total / max(num_tokens, 1)  # this call's own token mean (TRL's bnpo)
    return total / normaliser
