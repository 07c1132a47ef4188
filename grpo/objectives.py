"""The options of the GRPO loss: named transformations of its terms, chosen by one `LossOptions`.

`grpo.loss.grpo_loss` computes DeepSeekMath's eq. 3 (arXiv 2402.03300) one term per line,

    log_ratio = log pi_theta - log pi_old, at the ratio's level          options.log_ratio
    ratio     = exp(log_ratio)
    surrogate = min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A)    options.surrogate
                times each token's policy-term weight w_it (1 by default) options.token_weights
    kl        = exp(x) - x - 1, x = log pi_ref - log pi_theta              options.kl
    loss      = aggregate(-(surrogate - beta kl) * mask) / normaliser      options.aggregate

and each `options.*` is one of the named functions below, picked by name from a table. The
defaults are GRPO. `LossOptions` is built once per run from the config
(`GRPOArguments.loss_options`) and checks itself once, when built: its checks are the only ones
(the config shows their `LossOptionError` with the flags' names), and the loss never re-checks it.
A new option is one more small function and one more table entry here (a transformation of the
log-ratio, of the surrogate, of the token weights, the KL term, or the aggregation), never a
branch in `grpo_loss`: SAPO's gate, VESPO's weighting and the two-sided clip `delta` are
surrogates, LUSPO and BNPO aggregations, the off-policy mask a token weight, an entropy bonus a
term added to the surrogate.

    LOG_RATIO_OF       the ratio's level        token (GRPO) | sequence (GSPO)
    SURROGATE_OF       the per-token objective  clip (PPO; with delta: two-sided) | cispo | sapo | vespo
                                                (CLIPPED_TOKENS_OF: its metric)
    token_weights      the policy-term weights  sampler correction, off-policy sequence mask,
                                                high-entropy token selection
    KL_ESTIMATORS      the penalty (grpo/kl.py) k3 | k1 | k2 | k3_plus | k3_ratio
    AGGREGATE_OF       the sum over tokens      sequence | token | constant | sequence_sum | micro_batch_token

The options, and where each departs from GRPO (all off by default):

1. Sequence-level ratio (`importance_sampling_level="sequence"`, GSPO, arXiv 2507.18071, eq. 7):
   s_i = exp(1/|o_i| sum_t (log pi_theta - log pi_old)), the length-normalised likelihood ratio
   of the whole completion, clipped per completion and broadcast to its tokens (as TRL does).
   Its gradient is s_i times the mean of the tokens' grad log pi.
2. CISPO (`objective="cispo"`, MiniMax-M1, arXiv 2506.13585, eq. 4-5): the per-token term is
   sg(min(ratio, 1 + epsilon_high)) * A * log pi_theta. The importance weight is clipped and
   detached (sg = stop-gradient) instead of the clip removing the token's gradient, so every
   token keeps a REINFORCE gradient. No lower bound (the paper sets epsilon_low^IS large).
3. Sampler correction (`sampler_correction`, grpo/sampler_correction.py): the policy term of
   each token is multiplied by a capped pi_old / pi_sampler. The KL term is not weighted.
4. `policy_token_mask` (high-entropy token selection, arXiv 2506.01939; `--top_entropy_quantile`)
   zeroes the policy term on the tokens it leaves out, as TRL does: the KL term and the normaliser
   still count every completion token (the paper trains without a KL term, so it does not say).
5. The KL estimator (`kl_estimator`, grpo/kl.py: k3 by default); "k3_ratio" multiplies k3 by the
   surrogate's ratio (sequence-level under GSPO, as in TRL).
6. The aggregation, with l_it the per-token loss and m_it the mask (grpo/loss.py point 3 says
   how the normaliser makes micro-batches add up):
   - "sequence" (GRPO paper): sum_i (sum_t m_it l_it / |o_i|) / N_completions;
   - "token" (DAPO, arXiv 2503.14476 sec. 3.3): sum_it m_it l_it / N_tokens, so long completions
     count per token;
   - "constant" (Dr. GRPO, arXiv 2503.20783): sum_it m_it l_it / (N_completions * T_max), no
     length bias at all.
   - "sequence_sum" (LUSPO, arXiv 2602.05261): sum_it m_it l_it / N_completions, each
     completion's loss scaled by its length (with GSPO's ratio: `--loss_type luspo`);
   - "micro_batch_token" (TRL's bnpo): each micro-batch's own sum_it m_it l_it / sum_it m_it,
     averaged over the step's micro-batches on every rank (TRL's "local batch" is one micro-batch
     of one process; the result depends on --micro_batch_size, unlike every other aggregation).
   The functions here return the numerator; `step_normaliser` counts the denominator.
7. `delta` (INTELLECT-2, arXiv 2505.07291): the unclipped ratio bounded above by delta in the clip
   surrogate, min(min(ratio, delta) A, clip(ratio) A), as TRL. For A < 0 it is dual-clip PPO
   (arXiv 1912.09729; verl's clip_ratio_c) with c = delta whenever delta >= 1 + epsilon_high.
8. `off_policy_mask_threshold` (DeepSeek-V3.2, arXiv 2512.02556, eq. 9): a token weight that
   drops the policy term of a completion with A < 0 whose mean log(pi_sampling / pi_theta) exceeds
   the threshold (pi_sampling: the sampler's log-probs when given, else pi_old, as TRL).
9. SAPO (`objective="sapo"`, arXiv 2511.20347): the soft gate (4 / tau) sigmoid(tau (ratio - 1))
   times A instead of the clip; tau = sapo_temperature_pos for A > 0, sapo_temperature_neg else.
10. VESPO (`objective="vespo"`, arXiv 2602.10693): sg(phi(w_i)) A log pi_theta with the Gamma
    weight phi(w) = e^lambda w^k e^(-lambda w) of the completion's ratio w_i = prod_t ratio_it.
    Departures from TRL: no sampler correction with it (TRL folds the sampler's ratio into w),
    and the token level only (TRL warns at the sequence level).
Every default is TRL 1.16's.

Run the tests: `python -m pytest tests/test_objectives.py tests/test_loss.py -q`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from grpo.kl import KL_ESTIMATORS, kl_estimate
from grpo.sampler_correction import SAMPLER_CORRECTIONS, importance_weights

# TRL's GRPOConfig.loss_type names (and GSPO's recipe) as this module's options, with TRL's meaning.
LOSS_TYPES = {
    "grpo": {"aggregation": "sequence", "importance_sampling_level": "token", "objective": "clip"},
    "dapo": {"aggregation": "token", "importance_sampling_level": "token", "objective": "clip"},
    "dr_grpo": {"aggregation": "constant", "importance_sampling_level": "token", "objective": "clip"},
    # TRL: loss_type="grpo", importance_sampling_level="sequence" (GSPO eq. 5: 1/G sum_i).
    "gspo": {"aggregation": "sequence", "importance_sampling_level": "sequence", "objective": "clip"},
    # TRL: loss_type="cispo" (token aggregation, as the paper's 1 / sum_i |o_i|).
    "cispo": {"aggregation": "token", "importance_sampling_level": "token", "objective": "cispo"},
    # TRL: loss_type="bnpo" (each micro-batch's own token mean, averaged over the step's micro-batches).
    "bnpo": {"aggregation": "micro_batch_token", "importance_sampling_level": "token", "objective": "clip"},
    # TRL: loss_type="sapo" (aggregated as its grpo).
    "sapo": {"aggregation": "sequence", "importance_sampling_level": "token", "objective": "sapo"},
    # TRL: loss_type="luspo", importance_sampling_level="sequence" (the paper's setup; TRL warns otherwise).
    "luspo": {"aggregation": "sequence_sum", "importance_sampling_level": "sequence", "objective": "clip"},
    # TRL: loss_type="vespo" (token aggregation, as its dapo; the ratio level stays token: VESPO
    # makes its own sequence weight from the token ratios).
    "vespo": {"aggregation": "token", "importance_sampling_level": "token", "objective": "vespo"},
}


class LossOptionError(ValueError):
    """A `LossOptions` value that cannot work, with the fix. The message writes each option as
    `<name>`: `str(error)` shows the field names, `error.naming(flag_of)` another name for each (the
    config shows the command-line flags), so the checks live here once and still name the flag."""

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.naming(lambda name: name))

    def naming(self, name_of: Callable[[str], str]) -> str:
        return re.sub(r"<(\w+)>", lambda match: name_of(match.group(1)), self.template)


@dataclass(frozen=True)
class LossOptions:
    """Which variant of each term `grpo_loss` computes, and its hyper-parameters (defaults: GRPO).

    epsilon_low, epsilon_high: the clip range [1 - epsilon_low, 1 + epsilon_high].
    beta: weight of the KL penalty (0: none). The names are the tables' keys (module docstring).
    """

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.04
    aggregation: str = "sequence"
    importance_sampling_level: str = "token"
    objective: str = "clip"
    kl_estimator: str = "k3"
    sampler_correction: str = "none"
    sampler_correction_cap: float = 3.0
    sampler_correction_min: float | None = None
    delta: float | None = None
    off_policy_mask_threshold: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def __post_init__(self):
        """Every check of the options, the only one: the config builds this object once when it
        reads the flags and turns a `LossOptionError` into a message naming the flags."""
        choices = {
            "aggregation": AGGREGATIONS,
            "importance_sampling_level": IMPORTANCE_SAMPLING_LEVELS,
            "objective": OBJECTIVES,
            "kl_estimator": KL_ESTIMATORS,
            "sampler_correction": SAMPLER_CORRECTIONS,
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise LossOptionError(f"<{name}> {getattr(self, name)!r} is not one of: {', '.join(valid)}")
        # `not x >= 0` rather than `x < 0`: NaN fails every comparison, so it is refused too.
        if not 0 <= self.epsilon_low < 1:
            raise LossOptionError(f"<epsilon_low> {self.epsilon_low}: must be in [0, 1) so that 1 - <epsilon_low> > 0")
        if not self.epsilon_high >= 0:
            raise LossOptionError(f"<epsilon_high> {self.epsilon_high}: must be >= 0")
        if not self.beta >= 0:
            raise LossOptionError(f"<beta> {self.beta}: the KL weight must be >= 0 (0 turns the KL term off)")
        if not self.sampler_correction_cap > 0:
            raise LossOptionError(f"<sampler_correction_cap> {self.sampler_correction_cap}: the cap C must be > 0")
        if self.sampler_correction_min is not None and self.sampler_correction == "none":
            raise LossOptionError(
                f"<sampler_correction_min> {self.sampler_correction_min} bounds <sampler_correction>'s weight, but "
                "<sampler_correction> is none; pick a mode (token_truncate, token_mask, sequence_truncate, "
                "sequence_mask) or drop <sampler_correction_min>"
            )
        if self.sampler_correction_min is not None and not 0 <= self.sampler_correction_min < self.sampler_correction_cap:
            raise LossOptionError(
                f"<sampler_correction_min> {self.sampler_correction_min}: must be in [0, <sampler_correction_cap> "
                f"{self.sampler_correction_cap})"
            )
        if self.delta is not None and not self.delta > 1:
            raise LossOptionError(
                f"<delta> {self.delta}: the two-sided clip's bound on the ratio must be > 1 (the on-policy ratio "
                "is 1); INTELLECT-2 uses 4, and it acts only on A < 0 when >= 1 + <epsilon_high>"
            )
        if self.off_policy_mask_threshold is not None and not self.off_policy_mask_threshold >= 0:
            raise LossOptionError(
                f"<off_policy_mask_threshold> {self.off_policy_mask_threshold}: a KL threshold must be >= 0 "
                "(DeepSeek-V3.2 and TRL suggest values like 0.5)"
            )
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos", "vespo_lambda_neg"):
            if not getattr(self, name) > 0:
                raise LossOptionError(f"<{name}> {getattr(self, name)}: must be > 0")
        for name in ("vespo_k_pos", "vespo_k_neg"):
            if not getattr(self, name) >= 0:
                raise LossOptionError(f"<{name}> {getattr(self, name)}: must be >= 0 (0: no down-weighting of w < 1)")
        if self.objective == "vespo" and self.importance_sampling_level != "token":
            raise LossOptionError(
                "<objective> vespo builds its own sequence weight from the token ratios; drop "
                f"<importance_sampling_level> {self.importance_sampling_level} (token is its level)"
            )
        if self.objective == "vespo" and self.sampler_correction != "none":
            raise LossOptionError(
                f"<objective> vespo with <sampler_correction> {self.sampler_correction} is not implemented (TRL "
                "folds the sampler's ratio into VESPO's weight instead of multiplying the loss by it); drop one of them"
            )

    def log_ratio(self, log_ratio: Tensor, mask: Tensor) -> Tensor:
        """[R, T] the log-ratio at the chosen level (LOG_RATIO_OF)."""
        return LOG_RATIO_OF[self.importance_sampling_level](log_ratio, mask)

    def surrogate(self, ratio: Tensor, A: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
        """[R, T] the per-token objective (SURROGATE_OF), to be maximised."""
        return SURROGATE_OF[self.objective](ratio, A, logprobs, mask, self)

    def clipped_tokens(self, ratio: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
        """[R, T] bool each: the tokens clipped from below and from above (a metric; CLIPPED_TOKENS_OF)."""
        return CLIPPED_TOKENS_OF[self.objective](ratio, A, self)

    def token_weights(
        self, logprobs: Tensor, old_logprobs: Tensor, A: Tensor, mask: Tensor, sampler_logprobs: Tensor | None,
        policy_token_mask: Tensor | None,
    ) -> Tensor | float:
        """[R, T] (or [R, 1], or 1.0 when no weight is on) the product of the policy-term weights."""
        sampler_weight = sampler_correction_weights(old_logprobs, mask, sampler_logprobs, self)  # [R, T], [R, 1] or 1.0
        keep = off_policy_sequence_mask(logprobs, old_logprobs, A, mask, sampler_logprobs, self)  # [R, 1] or 1.0
        return sampler_weight * keep * token_selection_weights(policy_token_mask, mask)  # [R, T], [R, 1] or 1.0

    def kl(self, logprobs: Tensor, ref_logprobs: Tensor | None, ratio: Tensor) -> Tensor | float:
        """[R, T] the per-token KL estimate (KL_ESTIMATORS), or 0.0 when beta = 0 (no penalty)."""
        if self.beta == 0:
            return 0.0  # no reference needed, nothing computed
        return kl_estimate(logprobs, ref_logprobs, self.kl_estimator, ratio=ratio)  # [R, T]

    def aggregate(self, masked_loss: Tensor, mask: Tensor) -> Tensor:
        """[] the numerator of the loss (AGGREGATE_OF); the caller divides by the step's normaliser."""
        return AGGREGATE_OF[self.aggregation](masked_loss, mask)


# --- transformations of the log-ratio (option 1) ---


def token_log_ratio(log_ratio: Tensor, mask: Tensor) -> Tensor:
    """PPO / GRPO: one ratio per token, as it is. [R, T]"""
    return log_ratio


def sequence_log_ratio(log_ratio: Tensor, mask: Tensor) -> Tensor:
    """GSPO: each completion's mean log-ratio, on every one of its tokens. [R, T]"""
    # Guard: a fully masked completion gives 0 / 1 = 0 (ratio 1) instead of 0 / 0 = NaN.
    mean_log_ratio = log_ratio.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [R]
    return mean_log_ratio.unsqueeze(1).expand_as(log_ratio)  # [R, T]


LOG_RATIO_OF = {"token": token_log_ratio, "sequence": sequence_log_ratio}
IMPORTANCE_SAMPLING_LEVELS = tuple(LOG_RATIO_OF)


# --- the surrogate, and the tokens it clips (option 2) ---


def clipped_surrogate(ratio: Tensor, A: Tensor, logprobs: Tensor, mask: Tensor, options: LossOptions) -> Tensor:
    """PPO's clipped surrogate min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A). [R, T]

    With `delta` (INTELLECT-2's two-sided clip, option 7) the unclipped ratio is first bounded
    above by delta, min(min(ratio, delta) A, clip(ratio) A): for A < 0 the term can no longer grow
    without bound as the ratio does (PPO's min keeps the unclipped ratio there).
    """
    clipped_ratio = torch.clamp(ratio, 1 - options.epsilon_low, 1 + options.epsilon_high)  # [R, T]
    ratio = two_sided_bound(ratio, options)  # [R, T] min(ratio, delta); the ratio itself without delta
    return torch.min(ratio * A, clipped_ratio * A)  # [R, T]


def two_sided_bound(ratio: Tensor, options: LossOptions) -> Tensor:
    """INTELLECT-2 (arXiv 2505.07291, sec. 3.3): min(ratio, delta); the ratio as it is without delta. [R, T]"""
    if options.delta is None:
        return ratio
    return torch.clamp(ratio, max=options.delta)  # [R, T] constant above delta: no gradient there


def cispo_surrogate(ratio: Tensor, A: Tensor, logprobs: Tensor, mask: Tensor, options: LossOptions) -> Tensor:
    """CISPO: sg(min(ratio, 1 + eps_high)) * A * log pi_theta. [R, T]"""
    cispo_weight = torch.clamp(ratio, max=1 + options.epsilon_high).detach()  # [R, T] sg(clip(ratio))
    # Guard: log pi on padding may be -inf-like; 0 there keeps (weight * A * logp) * 0 finite.
    completion_logprobs = torch.where(mask > 0, logprobs, 0.0)  # [R, T]
    return cispo_weight * A * completion_logprobs  # [R, T]


def sapo_surrogate(ratio: Tensor, A: Tensor, logprobs: Tensor, mask: Tensor, options: LossOptions) -> Tensor:
    """SAPO (arXiv 2511.20347, eq. 5-6): the soft gate (4 / tau) sigmoid(tau (ratio - 1)) times A. [R, T]

    tau = sapo_temperature_pos where A > 0, else sapo_temperature_neg. At ratio 1 the gate's slope
    is (4 / tau) * tau * sigmoid'(0) = 4 * 1/4 = 1, so near the old policy the gradient is PPO's
    (A * ratio * grad log pi); away from it the gradient fades smoothly instead of being cut off.
    """
    tau = torch.where(A > 0, options.sapo_temperature_pos, options.sapo_temperature_neg)  # [R, 1]
    gate = torch.sigmoid(tau * (ratio - 1)) * 4 / tau  # [R, T]
    return gate * A  # [R, T]


def vespo_surrogate(ratio: Tensor, A: Tensor, logprobs: Tensor, mask: Tensor, options: LossOptions) -> Tensor:
    """VESPO (arXiv 2602.10693): sg(phi(w_i)) * A * log pi_theta, phi(w) = e^lambda w^k e^(-lambda w). [R, T]

    w_i = prod_t ratio_it, the completion's likelihood ratio (a product, not GSPO's mean), and
    phi(1) = 1: a Gamma-shaped weight that fades both for w << 1 (power k) and w >> 1 (decay
    lambda), in place of a clip. k, lambda are vespo_k_pos, vespo_lambda_pos where A >= 0, else
    the _neg pair. Like CISPO's weight it is detached: every token keeps a REINFORCE gradient.
    """
    with torch.no_grad():
        # Guards, as TRL (matching the paper's code): each token's log-ratio within [-20, 20] and
        # the sum within [log 1e-8, 20], so w^k and e^(-lambda w) stay finite. ratio is
        # exp(log-ratio) already capped above at 20 (grpo/loss.py); the floor keeps log() finite.
        token_log_ratio = torch.log(ratio.clamp(min=VESPO_TOKEN_RATIO_MIN)).clamp(max=VESPO_LOG_W_MAX)  # [R, T]
        log_w = (token_log_ratio * mask).sum(dim=1, keepdim=True)  # [R, 1]
        log_w = log_w.clamp(VESPO_LOG_W_MIN, VESPO_LOG_W_MAX)  # [R, 1]
        is_nonnegative = A >= 0  # [R, 1]
        k = torch.where(is_nonnegative, options.vespo_k_pos, options.vespo_k_neg)  # [R, 1]
        lam = torch.where(is_nonnegative, options.vespo_lambda_pos, options.vespo_lambda_neg)  # [R, 1]
        log_phi = lam + k * log_w - lam * torch.exp(log_w)  # [R, 1] log of e^lambda w^k e^(-lambda w)
        phi = torch.exp(log_phi)  # [R, 1] in [0, e^lambda (k / lambda)^k e^-k]: finite for finite k, lambda
    # Guard: log pi on padding may be -inf-like; 0 there keeps (phi * A * logp) * 0 finite.
    completion_logprobs = torch.where(mask > 0, logprobs, 0.0)  # [R, T]
    return phi * A * completion_logprobs  # [R, T]


VESPO_TOKEN_RATIO_MIN = math.exp(-20.0)
VESPO_LOG_W_MIN, VESPO_LOG_W_MAX = math.log(1e-8), 20.0

SURROGATE_OF = {"clip": clipped_surrogate, "cispo": cispo_surrogate, "sapo": sapo_surrogate, "vespo": vespo_surrogate}
OBJECTIVES = tuple(SURROGATE_OF)


def clip_range_tokens(ratio: Tensor, A: Tensor, options: LossOptions) -> tuple[Tensor, Tensor]:
    """PPO: clipped low (ratio < 1 - eps_low, A < 0) and high (ratio > 1 + eps_high, A > 0): no gradient."""
    return (ratio < 1 - options.epsilon_low) & (A < 0), (ratio > 1 + options.epsilon_high) & (A > 0)  # [R, T]


def capped_tokens(ratio: Tensor, A: Tensor, options: LossOptions) -> tuple[Tensor, Tensor]:
    """CISPO caps the weight from above only, whatever the sign of A."""
    is_capped = ratio > 1 + options.epsilon_high  # [R, T]
    return torch.zeros_like(is_capped), is_capped  # [R, T] each


def no_clipped_tokens(ratio: Tensor, A: Tensor, options: LossOptions) -> tuple[Tensor, Tensor]:
    """SAPO and VESPO weigh every token smoothly; nothing is clipped."""
    none = torch.zeros(torch.broadcast_shapes(ratio.shape, A.shape), dtype=torch.bool, device=ratio.device)  # [R, T]
    return none, none


CLIPPED_TOKENS_OF = {"clip": clip_range_tokens, "cispo": capped_tokens, "sapo": no_clipped_tokens,
                     "vespo": no_clipped_tokens}  # fmt: skip  # one entry per SURROGATE_OF key


# --- the weights of each token's policy term (options 3 and 4); the product of them all ---


def sampler_correction_weights(
    old_logprobs: Tensor, mask: Tensor, sampler_logprobs: Tensor | None, options: LossOptions
) -> Tensor | float:
    """The capped, detached pi_old / pi_sampler ([R, T] or [R, 1]); 1.0 with sampler_correction "none"."""
    if options.sampler_correction == "none":
        return 1.0
    weights, _ = importance_weights(
        old_logprobs, sampler_logprobs, mask, options.sampler_correction, options.sampler_correction_cap,
        options.sampler_correction_min,
    )  # [R, T] or [R, 1]
    return weights


def off_policy_sequence_mask(
    logprobs: Tensor, old_logprobs: Tensor, A: Tensor, mask: Tensor, sampler_logprobs: Tensor | None,
    options: LossOptions,
) -> Tensor | float:
    """DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556, eq. 9): [R, 1], or 1.0 without a threshold.

    M_i = 0 when A_i < 0 and (1/|o_i|) sum_t log(pi_sampling(o_it) / pi_theta(o_it)) > threshold,
    else 1. pi_sampling is the policy that drew the tokens: the sampler's recorded log-probs when
    given (they see both the drift of the updates and the sampler/trainer mismatch), else pi_old.
    Detached: the mask selects completions, it carries no gradient.
    """
    if options.off_policy_mask_threshold is None:
        return 1.0
    sampling_logprobs = old_logprobs if sampler_logprobs is None else sampler_logprobs  # [R, T]
    # Guard: padding holds log-probs of tokens never drawn; 0 there keeps them out of the mean.
    log_ratio = torch.where(mask > 0, sampling_logprobs - logprobs.detach(), 0.0)  # [R, T]
    # Guard: a completion with no tokens gives 0 / 1 = 0 (kept) instead of 0 / 0 = NaN.
    mean_kl = log_ratio.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)  # [R, 1]
    keep = (A >= 0) | (mean_kl <= options.off_policy_mask_threshold)  # [R, 1]
    return keep.to(mask.dtype)  # [R, 1]


def token_selection_weights(policy_token_mask: Tensor | None, mask: Tensor) -> Tensor | float:
    """1.0 on the tokens whose policy term counts, 0.0 elsewhere ([R, T]); 1.0 without a selection."""
    if policy_token_mask is None:
        return 1.0
    return policy_token_mask.to(device=mask.device, dtype=mask.dtype)  # [R, T]


# --- the aggregation (option 6): the loss's numerator ---


def sequence_aggregate(masked_loss: Tensor, mask: Tensor) -> Tensor:
    """sum_i (sum_t m_it l_it / |o_i|). []"""
    # Guard: a completion with no tokens left in the mask (truncated and masked out) adds
    # 0 / 1 = 0 instead of 0 / 0 = NaN.
    completion_means = masked_loss.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [R]
    return completion_means.sum()  # []


def token_aggregate(masked_loss: Tensor, mask: Tensor) -> Tensor:
    """sum_it m_it l_it ("token" and "constant" differ only in the normaliser). []"""
    return masked_loss.sum()  # []


def micro_batch_token_aggregate(masked_loss: Tensor, mask: Tensor) -> Tensor:
    """TRL's bnpo: this micro-batch's mean over its tokens, sum_it m_it l_it / sum_it m_it. []"""
    # Guard: a micro-batch whose completions are all masked out adds 0 / 1 = 0, as in TRL.
    return masked_loss.sum() / mask.sum().clamp(min=1)  # []


AGGREGATE_OF = {
    "sequence": sequence_aggregate, "token": token_aggregate, "constant": token_aggregate,
    "sequence_sum": token_aggregate, "micro_batch_token": micro_batch_token_aggregate,
}  # fmt: skip
AGGREGATIONS = tuple(AGGREGATE_OF)
