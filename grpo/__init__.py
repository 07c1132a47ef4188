"""GRPO for Qwen2.5-VL, in plain PyTorch: the algorithm package.

Notation used in every shape comment of the project:

    B  prompts in a generation batch (per rank)
    G  completions per prompt (`num_generations`, the group size)
    R  rows in a tensor of completions; R = B*G for a whole batch, fewer in a micro-batch
    P  prompt tokens (left padded to the longest prompt in the batch)
    T  completion tokens (right padded after EOS, at most `max_completion_length`)
    V  vocabulary size (151,936 for Qwen2.5)
    D  hidden size of the language model
    N  image tokens after the vision merger, summed over the images of a batch

The objective (DeepSeekMath, arXiv 2402.03300, eq. 3), maximised; the code minimises its negative:

    J(theta) = E_{q, {o_i} ~ pi_old} [ 1/G sum_{i=1..G} 1/|o_i| sum_{t=1..|o_i|} (
                   min( ratio_it * A_i, clip(ratio_it, 1 - eps_low, 1 + eps_high) * A_i )
                   - beta * KL_it ) ]

    ratio_it = exp( log pi_theta(o_it) - log pi_old(o_it) )     grpo.loss.grpo_loss
    A_i      = (r_i - mean(r)) / (std(r) + eps)  over the group  grpo.advantages.group_advantages
    KL_it    = exp(x) - x - 1, x = log pi_ref(o_it) - log pi_theta(o_it)   grpo.kl.kl_k3
    log pi(o_it)  from the logits, chunked                        grpo.logprobs.token_logprobs
    the tokens t = 1..|o_i|: through the first EOS                grpo.masks.completion_mask

The 1/|o_i| then 1/G averaging is one of three aggregations ("sequence", "token", "constant");
see grpo/loss.py, grpo/objectives.py (the options, one `LossOptions`) and docs/grpo.md.

Only the pure math (tensors in, tensors and metrics out) is imported here; the model-facing
modules (forward, rollout, loops) are imported from their own files.
"""

from __future__ import annotations

from grpo.advantages import ADVANTAGE_SCALES, group_advantages
from grpo.kl import kl_k3
from grpo.logprobs import token_entropy, token_logprobs, token_logprobs_naive
from grpo.loss import grpo_loss, step_normaliser
from grpo.objectives import AGGREGATIONS, LossOptions

__all__ = [
    "ADVANTAGE_SCALES",
    "AGGREGATIONS",
    "LossOptions",
    "group_advantages",
    "grpo_loss",
    "kl_k3",
    "step_normaliser",
    "token_entropy",
    "token_logprobs",
    "token_logprobs_naive",
]
