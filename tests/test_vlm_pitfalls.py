"""The silent VLM bugs users of the large GRPO trainers keep reporting: one test each.

Each test names the report it guards against. They are silent bugs: the run goes on, only its
numbers are wrong, so nothing but a test notices.

    1. an empty or blank <answer></answer> earns accuracy reward        (Visual-RFT #176)
    2. --max_prompt_length cuts a prompt inside its image tokens          (TRL #3847, #4488)
    3. log-ratios of +-100 overflow the ratio or the k3 KL into inf/NaN   (NeMo-RL #874)
    4. the G copies of a left-padded prompt get other 3-D positions       (verl #856, TRL #5785)
    5. a completion is scored with another prompt's image grid           (ms-swift #9287)
    6. reward functions get columns of other prompts, or none at all     (2 ranks, dynamic sampling)

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_vlm_pitfalls.py -q
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from tolerances import U32

from grpo.kl import KL_ESTIMATORS, LOG_RATIO_MAX
from grpo.loss import IMPORTANCE_SAMPLING_LEVELS, OBJECTIVES, grpo_loss
from grpo.rewards import compute_rewards, resolve_reward_functions

# --- 1. an empty answer never earns accuracy reward ---

BLANK_ANSWERS = [
    "<answer></answer>",
    "<answer> </answer>",
    "<answer>\n\t </answer>",
    "<think>count them</think><answer>  </answer>",
    "<think>3</think>\n<answer>\n</answer>",
    "<answer>3</answer> on second thought <answer> </answer>",  # the LAST answer is the blank one
]


def test_an_empty_or_blank_answer_never_earns_accuracy_reward(monkeypatch):
    """Visual-RFT #176: `<answer></answer>` scored as correct, because "" is a substring of every
    gold answer (and a blank string survives .strip() as ""), so a model learns to answer nothing.

    Every built-in reward that reads the answer gives 0 to an empty or whitespace-only answer,
    whatever the gold; math_accuracy even under a verifier that says yes to any substring of the
    gold (the comparison Visual-RFT's reward made), so it must never ask about an empty answer.
    """
    # A stand-in math-verify as lenient as the reported bug: anything parses, and an answer
    # "verifies" when it is a substring of the gold (so "" verifies against every gold).
    lenient = types.SimpleNamespace(parse=lambda text: [text.strip("$ ")], verify=lambda gold, answer: answer[0] in gold[0])
    monkeypatch.setitem(sys.modules, "math_verify", lenient)
    golds = {
        "count_accuracy": ["0", "3", "zero"],  # "0": a parser that read "" as 0 would pay here
        "choice_accuracy": ["A", "(B)", "E. five"],
        "math_accuracy": ["0", "1/2", "Paris", " "],  # " ": math-verify's string fallback, "" == ""
        "format": ["3"],
    }
    for name, gold_answers in golds.items():
        ((_, function),) = resolve_reward_functions([name])
        for gold in gold_answers:
            rewards = function(BLANK_ANSWERS, [gold] * len(BLANK_ANSWERS))
            assert rewards == [0.0] * len(BLANK_ANSWERS), (name, gold, rewards)
    # The same answers filled in do earn it (the check above is not a reward that is always 0).
    ((_, math_accuracy),) = resolve_reward_functions(["math_accuracy"])
    assert math_accuracy(["<answer>1/2</answer>"], ["1/2"]) == [1.0]
    ((_, count_accuracy),) = resolve_reward_functions(["count_accuracy"])
    assert count_accuracy(["<answer>0</answer>"], ["0"]) == [1.0]
    # And through compute_rewards, as the loop calls them: the total is 0, not NaN (scored, wrong).
    functions = resolve_reward_functions(["format", "count_accuracy"])
    total, per_function = compute_rewards(functions, None, BLANK_ANSWERS, ["0"] * len(BLANK_ANSWERS))
    assert total.tolist() == [0.0] * len(BLANK_ANSWERS)
    assert per_function.tolist() == [[0.0, 0.0]] * len(BLANK_ANSWERS)


# --- 3. log-ratios of +-100 stay finite, and their gradient is the clamped one ---


def test_log_ratios_of_plus_minus_100_give_a_finite_loss_and_the_clamped_gradient():
    """NeMo-RL #874: a token whose log-ratio reaches ~+89 overflows exp() in float32 (and bf16):
    the k3 KL and the ratio pi_theta / pi_old become inf, and the loss or its gradient NaN (with
    A > 0 the clip picks the finite branch, but the backward multiplies its 0 by exp's inf).

    grpo/kl.py, choice 2, says what happens instead: a log-ratio x is clamped above at 20 before
    exp() (the ratio's in grpo/loss.py too), so its value is capped at x = 20 and its gradient is
    0; below, nothing is clamped, and at x = -100 the ratio is ~0 and k3 ~ -x - 1 with gradient
    1 - e^x ~ 1. Real (unmasked) tokens here, not padding: after a few inner epochs or with a stale
    sampler, real tokens get there.
    """
    # One completion per sign of A, two tokens each; r = log pi_theta - log pi_old, x = log pi_ref
    # - log pi_theta, each +-100. eps = 0.2, beta = 0.04, "token" aggregation over N = 4 tokens.
    beta, N = 0.04, 4.0
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)  # [R, T]
    r = torch.tensor([[100.0, -100.0], [100.0, -100.0]])  # [R, T]
    x = torch.tensor([[100.0, -100.0], [-100.0, 100.0]])  # [R, T]
    advantages = torch.tensor([1.0, -1.0])  # [R]
    old_logprobs = logprobs.detach() - r  # [R, T]
    ref_logprobs = logprobs.detach() + x  # [R, T]
    loss, metrics = grpo_loss(
        logprobs, old_logprobs, ref_logprobs, advantages, torch.ones(2, 2),
        beta=beta, aggregation="token", normaliser=N,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logprobs)
    # With e = e^20 (the clamp), k3(20) = e - 21, k3(-100) = e^-100 + 99 ~ 99 (e^-100 ~ 4e-44):
    #   A = +1, r = +100: ratio e, min(e, 1.2) = 1.2 (clipped, no grad); x = +100: k3(20), no grad
    #       loss -1.2 + beta (e - 21);                     gradient 0
    #   A = +1, r = -100: min(e^-100, 0.8) = e^-100 (its grad e^-100 ~ 0); x = -100: k3 = 99,
    #       grad 1 - e^-100 ~ 1:  loss beta 99 = 3.96;     gradient beta = 0.04
    #   A = -1, r = +100: min(-e, -1.2) = -e, its ratio clamped (no grad); x = -100: k3 = 99
    #       loss e + 3.96;                                 gradient beta = 0.04
    #   A = -1, r = -100: min(-e^-100, -0.8) = -0.8 (clipped, no grad); x = +100: k3(20), no grad
    #       loss 0.8 + beta (e - 21);                      gradient 0
    # sum = (1 + 2 beta) e + (-1.2 + 3.96 + 3.96 + 0.8) - 2 beta 21 = 1.08 e + 5.84;  / N = 4:
    e = math.exp(LOG_RATIO_MAX)  # 485165195.40979
    expected_loss = (1.08 * e + 5.84) / N  # 130994604.22
    # float32: e^20 itself is within an ulp (2u relative), then ~10 products and sums of terms
    # <= 1.08 e, each rounding by <= u of its result: 16 u relative covers them all.
    assert loss.item() == pytest.approx(expected_loss, rel=16 * U32, abs=0)
    expected_grad = torch.tensor([[0.0, beta / N], [beta / N, 0.0]])  # [R, T]
    # 0.04 / 4 = 0.01 through a few float32 products: a few u of 0.01; the zeros are exact.
    torch.testing.assert_close(grad, expected_grad, atol=4 * U32 * beta / N, rtol=0)
    assert grad[0, 0].item() == 0.0 and grad[1, 1].item() == 0.0
    assert math.isfinite(metrics["ratio_mean"]) and math.isfinite(metrics["kl_mean"])

    # Every objective, ratio level and KL estimator, in float32 and bfloat16: finite loss,
    # finite gradient, finite metrics, at +-100 on real tokens.
    for dtype in (torch.float32, torch.bfloat16):
        for objective in OBJECTIVES:
            for level in IMPORTANCE_SAMPLING_LEVELS:
                for estimator in KL_ESTIMATORS:
                    logprobs_d = logprobs.detach().to(dtype).requires_grad_(True)  # [R, T]
                    loss, metrics = grpo_loss(
                        logprobs_d, old_logprobs.to(dtype), ref_logprobs.to(dtype), advantages, torch.ones(2, 2),
                        beta=beta, aggregation="sequence", normaliser=2.0, objective=objective,
                        importance_sampling_level=level, kl_estimator=estimator,
                    )  # fmt: skip
                    (grad,) = torch.autograd.grad(loss, logprobs_d)
                    case = (dtype, objective, level, estimator)
                    assert torch.isfinite(loss), case
                    assert torch.isfinite(grad).all(), case
                    assert all(math.isfinite(value) for value in metrics.values()), (case, metrics)
