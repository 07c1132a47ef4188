"""The entropy bonus, and its adaptive coefficient (Skywork-OR1, arXiv 2505.22312, sec. 3.2).

The objective with the bonus (TRL's `entropy_coef`):

    L = L_GRPO - c * H̄,        H̄ = sum_{i,t} m_{i,t} H_{i,t} / sum_{i,t} m_{i,t}

H_{i,t} = -sum_v pi(v | q, o_<t) log pi(v | q, o_<t), the entropy (nats) of the tempered policy
at completion token t of row i; m the tokens the policy term trains on (the loss mask, and with
--top_entropy_quantile only the selected high-entropy tokens). H̄ is a plain mean over those
tokens, whatever --loss_aggregation the policy term uses, so c means the same for every loss.
Raising H̄ keeps the policy from collapsing onto one answer too early (the paper's "premature
entropy collapse"); c > 0 pushes the entropy up.

Adaptive control (--use_adaptive_entropy; the paper's eq. 5, as TRL implements it): after each
optimizer step, with H_k the step's measured H̄ (every rank's tokens, one token-weighted mean),

    c_{k+1} = min(c_k + delta, c_max)   if H_k <= H_target
              max(c_k - delta, c_min)   otherwise

and the bonus is applied in step k+1 only while H_k <= H_target (c_applied = 0 otherwise):
the coefficient grows while the entropy sits below the target and the bonus switches off as soon
as the entropy is back above it. Before the first measurement H = inf, so step 1 applies no bonus.

Departures from TRL 1.16, and why:
    1. H̄ is one mean over every micro-batch of the optimizer step on every rank (the step's token
       count, all-reduced, divides it), the same count the adaptive controller measures over. TRL
       takes each micro-batch's own mean and divides by the number of micro-batches (and DDP then
       averages the ranks' means); the two agree when every micro-batch holds the same number of
       tokens (one micro-batch on one rank: always), and ours does not depend on how a step is
       split into micro-batches or ranks (tests/test_trl_agreement.py shows both cases).
    2. The controller updates only on optimizer steps that are taken: a step skipped for a
       non-finite loss (grpo/runtime/run.py) measures nothing. TRL updates at every window end.
    3. The gradient flows through H as logsumexp(z) - sum_v p_v z_v rather than -sum p log p,
       whose derivative is infinite where float32 rounds a probability to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def differentiable_token_entropy(logits: Tensor, chunk_size: int = 1024) -> Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v at every position: [R, T] float32 (or float64), with grad.

    The same number as -sum_v p_v log p_v (grpo/logprobs.py's metric); written this way because its
    gradient, dH/dz_v = -p_v (z_v - sum_u p_u z_u), stays finite where p_v underflows to 0 (the
    derivative of -p log p is -log p - 1, infinite at p = 0, and 0 * inf = NaN in the softmax's
    backward). Chunked over positions, and with grad each chunk is recomputed in the backward
    (activation checkpointing): the bonus then keeps no [R, T, V] float32 softmax alive beyond the
    logits the loss keeps anyway; the price is one more softmax per chunk in the backward.
    """
    num_rows, num_tokens, vocab = logits.shape
    dtype = torch.promote_types(logits.dtype, torch.float32)  # never accumulate the sum in bfloat16
    flat = logits.reshape(num_rows * num_tokens, vocab)  # [R*T, V]
    if num_rows * num_tokens == 0:  # no positions at all
        return flat.new_zeros(num_rows, num_tokens, dtype=dtype)
    recompute = torch.is_grad_enabled() and logits.requires_grad
    pieces = []
    for chunk in flat.split(chunk_size):
        if recompute:  # keep only the logits for the backward; the chunk's softmax is recomputed there
            pieces.append(checkpoint(_chunk_entropy, chunk, dtype, use_reentrant=False))  # [C]
        else:
            pieces.append(_chunk_entropy(chunk, dtype))  # [C]
    return torch.cat(pieces).view(num_rows, num_tokens)  # [R, T]


def _chunk_entropy(chunk: Tensor, dtype: torch.dtype) -> Tensor:
    """H of each row of logits [C, V], computed in `dtype`: [C]."""
    z = chunk.to(dtype)  # [C, V]
    p = z.softmax(-1)  # [C, V]
    return torch.logsumexp(z, -1) - (p * z).sum(-1)  # [C]


def entropy_bonus(entropy: Tensor, mask: Tensor, coefficient: float, normaliser: float) -> Tensor:
    """This micro-batch's share of c * H̄, the amount subtracted from the loss (a scalar).

    entropy [R, T]: per-token H, differentiable; mask [R, T]: the tokens the bonus acts on (1/0);
    normaliser: the step's bonus-token count over every micro-batch and rank, / world_size (the
    caller all-reduces it; see accumulate_step_gradients), so the micro-batches' shares add up to
    c * H̄ of the whole step once gradients are averaged over ranks.
    """
    weighted = entropy * mask.to(entropy.dtype)  # [R, T]
    return coefficient * weighted.sum() / normaliser


@dataclass
class EntropyCoefficient:
    """The coefficient c and the last measured H̄: the state adaptive control carries across steps
    (and a checkpoint keeps, so a resumed run applies the same bonus as an uninterrupted one)."""

    coef: float
    last_entropy: float = math.inf  # no measurement yet: the first step applies no adaptive bonus

    def applied(self, *, adaptive: bool, target: float) -> float:
        """c_applied for the next step: c itself, or (adaptive) c only while H <= H_target."""
        if not adaptive:
            return self.coef
        return self.coef if self.last_entropy <= target else 0.0

    def state_dict(self) -> dict:
        return {"entropy_coef": self.coef, "last_entropy": self.last_entropy}

    @classmethod
    def from_state_dict(cls, state: dict) -> EntropyCoefficient:
        return cls(float(state["entropy_coef"]), float(state["last_entropy"]))


def adapted_coefficient(coef: float, entropy: float, *, target: float, delta: float, low: float, high: float) -> float:
    """c_{k+1} from c_k and the step's measured entropy H_k (module docstring): a step of delta
    toward more bonus while H_k <= target, toward less otherwise, kept inside [low, high]."""
    if entropy <= target:
        return min(coef + delta, high)
    return max(coef - delta, low)
