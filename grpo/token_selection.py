"""High-entropy token selection: the policy gradient on the tokens where the policy is unsure.

"Beyond the 80/20 Rule" (arXiv 2506.01939) finds that the ~20% of completion tokens with the
highest entropy H_t = -sum_v pi(v | q, o_<t) log pi(v | q, o_<t) ("forking tokens") carry the
reasoning gains of RLVR, and trains the policy-gradient term on those tokens only. With
q = `--top_entropy_quantile`:

    threshold = quantile_(1 - q)( H_t over the completion tokens )
    selected  = loss_mask & (H_t >= threshold)

Choices, and where implementations differ:

1. Over which tokens the quantile runs. The paper: the tokens of the training batch. TRL 1.16
   (`GRPOTrainer.get_high_entropy_mask`): each micro-batch's masked tokens, gathered over the
   processes, so its selection changes with the micro-batch size. Here: every loss-mask token of
   one optimizer step on every rank (the caller gathers them), so the selection does not depend on
   micro_batch_size or on the number of ranks. The loss mask is the one the loss uses (with
   --mask_truncated_completions, truncated completions are not candidates, as in TRL).
2. The quantile is torch.quantile's (linear interpolation), and ties at the threshold are kept
   (`>=`), as in TRL: q = 0 keeps only the highest-entropy token(s), q = 1 keeps every token.
   It is taken in float64; TRL takes it in float32, where 1 - q rounds (0.8 -> 0.800000012), so
   when (1 - q)(N - 1) is a whole number (q = 0.2 and N - 1 a multiple of 5) its threshold can
   land just above the token at that position and drop it, with every token tied to it. Here
   that token is kept, as the definition says (tests/test_token_selection.py shows both).
3. The entropy is the policy's at the start of the optimizer step (a no-grad forward over the
   step's rows, at the loss's temperature), the same for every inner epoch's micro-batch.
4. Only the surrogate is masked (grpo/objectives.py point 4); the KL and the normaliser keep every token.

Run the tests: `python -m pytest tests/test_token_selection.py -q`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def entropy_threshold(entropies: Tensor, quantile: float) -> float:
    """The (1 - quantile) quantile of `entropies` [N] (the candidate tokens); +inf when N = 0."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if entropies.numel() == 0:
        return math.inf  # no candidate token: nothing is selected
    return torch.quantile(entropies.detach().double().reshape(-1), 1.0 - quantile).item()


def high_entropy_mask(entropy: Tensor, loss_mask: Tensor, threshold: float) -> Tensor:
    """[R, T] bool: loss-mask tokens whose entropy is at least `threshold`.

    entropy, loss_mask: [R, T]. Padding is never selected, whatever its entropy.
    """
    if entropy.shape != loss_mask.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} and loss_mask {tuple(loss_mask.shape)} must have one shape")
    return (entropy.double() >= threshold) & (loss_mask > 0)  # [R, T]
