"""GRPO learns: one whole step worked by hand on a bandit, and the real loop learning a task.

The other tests check each term of the objective; these check the terms add up to learning, so a
flipped advantage sign, zeroed advantages or a loss built from detached log-probs fails here even
though every formula elsewhere is right.

1. A bandit policy: 3 logits z, one token per completion, G = 4 completions with given rewards,
   the project's `group_advantages` and `grpo_loss`, one SGD step (lr 1) with beta = 0 and
   beta > 0. The new logits are worked out in the comments.
2. `train_grpo` end to end on the tiny preset, rewarded by `learning_rewards:digit_fraction`
   (tests/learning_rewards.py), which its untrained policy almost never earns: the mean reward
   must go from below 0.3 to above 0.9 within MAX_STEPS steps, on seeds 0, 1 and 2.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_learning.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_metrics

from grpo.advantages import group_advantages
from grpo.loss import grpo_loss, step_normaliser
from grpo.objectives import LossOptions

# The G = 4 completions: tokens 0, 1, 2, 0 with rewards 1, 0, 0, 1.
TOKENS = torch.tensor([0, 1, 2, 0])  # [G]
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0])  # [G]
# From tests/test_advantages.py::test_group_of_four: A = [+a, -a, -a, +a], a = 0.8658757.
A = 0.8658757
# float32 arithmetic on O(1) numbers, a few dozen operations: ~1e-7 each, well under 1e-6.
ATOL = 1e-6


def _bandit_step(ref_logprobs: torch.Tensor | None, beta: float) -> torch.Tensor:
    """One GRPO step of SGD(lr=1) from z = 0; returns the new logits [3]."""
    logits = torch.zeros(3, requires_grad=True)  # [V=3] pi = softmax(z) = [1/3, 1/3, 1/3]
    optimizer = torch.optim.SGD([logits], lr=1.0)
    advantages, _ = group_advantages(REWARDS, group_size=4)  # [G]
    logprobs = torch.log_softmax(logits, dim=-1)[TOKENS].unsqueeze(1)  # [G, T=1]
    mask = torch.ones(4, 1)  # [G, 1]
    loss, _ = grpo_loss(
        logprobs, None, None if ref_logprobs is None else ref_logprobs[TOKENS].unsqueeze(1),
        advantages, mask, LossOptions(beta=beta, aggregation="sequence"), normaliser=step_normaliser(mask, "sequence"),
    )  # fmt: skip
    loss.backward()
    optimizer.step()
    return logits.detach()


def test_bandit_step_by_hand_without_kl():
    # One inner epoch: ratio = 1, so the loss is -(1/G) sum_i A_i log pi(y_i), and
    #   d log pi(y) / d z = e_y - pi,  pi = [1/3, 1/3, 1/3].
    # d loss / d z = -(1/4) sum_i A_i (e_{y_i} - pi) = -(1/4) sum_i A_i e_{y_i}   (sum_i A_i = 0)
    #   sum_i A_i e_{y_i} = [a + a, -a, -a] = [1.7317514, -0.8658757, -0.8658757]
    #   grad = [-0.4329379, 0.2164689, 0.2164689]
    # SGD, lr 1: z_new = -grad = [0.4329379, -0.2164689, -0.2164689]
    new_logits = _bandit_step(None, beta=0.0)
    expected = torch.tensor([2 * A / 4, -A / 4, -A / 4])
    torch.testing.assert_close(new_logits, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(new_logits, torch.tensor([0.4329379, -0.2164689, -0.2164689]), atol=ATOL, rtol=0)
    # The rewarded token gained probability: softmax(z_new)[0] > 1/3.
    assert torch.softmax(new_logits, -1)[0] > 1 / 3


def test_bandit_step_by_hand_with_kl():
    # Reference pi_ref = [1/4, 1/4, 1/2] (it prefers token 2); beta = 0.4.
    # Per token: loss_i = -(A_i log pi(y_i) - beta * k3_i),  k3 = e^x - x - 1,  x = log pi_ref - log pi
    #   d k3 / d log pi = 1 - e^x = 1 - pi_ref(y) / pi(y); pi(y) = 1/3 for every y:
    #   token 0: 1 - 0.75 = 0.25; token 1: 0.25; token 2: 1 - 1.5 = -0.5
    #   so c_i for the completions (tokens 0, 1, 2, 0) = [0.25, 0.25, -0.5, 0.25], sum c_i = 0.25
    # KL part of the gradient: (beta / 4) sum_i c_i (e_{y_i} - pi)
    #   sum_i c_i e_{y_i} = [0.5, 0.25, -0.5]; minus sum_i c_i * pi = 0.25 / 3 = 0.0833333 each
    #   = [0.4166667, 0.1666667, -0.5833333]; * 0.4 / 4 = [0.0416667, 0.0166667, -0.0583333]
    # Plus the beta = 0 gradient [-0.4329379, 0.2164689, 0.2164689]:
    #   grad = [-0.3912712, 0.2331356, 0.1581356]
    # SGD, lr 1: z_new = [0.3912712, -0.2331356, -0.1581356] (sums to 0, as a softmax gradient does);
    # the KL pulls token 2, the reference's favourite, up from -0.2164689.
    ref_logprobs = torch.tensor([0.25, 0.25, 0.5]).log()  # [V=3]
    new_logits = _bandit_step(ref_logprobs, beta=0.4)
    torch.testing.assert_close(new_logits, torch.tensor([0.3912712, -0.2331356, -0.1581356]), atol=ATOL, rtol=0)


# --- the real loop learns ---

MAX_STEPS = 20
# 2 prompts x G = 4 completions of at most 4 tokens per step; no system prompt and a small image,
# so a step is a fraction of a second on one core; beta = 0 builds no reference model.
LEARNING_FLAGS = [
    "--max_steps", str(MAX_STEPS), "--per_device_prompts", "2", "--num_generations", "4",
    "--micro_batch_size", "8", "--max_completion_length", "4", "--learning_rate", "2e-2", "--beta", "0",
    "--system_prompt", "", "--image_size", "56", "--save_steps", "0",
    "--reward_functions", "learning_rewards:digit_fraction",
]  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_loop_learns_a_rare_reward(tmp_path, train_run, seed):
    out = train_run(tmp_path / "run", *LEARNING_FLAGS, "--seed", str(seed))
    rewards = [record["reward/total/mean"] for record in read_metrics(out)]  # one per step
    assert len(rewards) == MAX_STEPS and all(math.isfinite(r) for r in rewards)
    # The untrained policy almost never writes a digit...
    assert rewards[0] < 0.3, rewards
    # ...and within MAX_STEPS steps it writes (almost) only digits, and stays there: the mean of
    # the last 3 steps (24 completions) is above 0.9.
    assert sum(rewards[-3:]) / 3 > 0.9, rewards
