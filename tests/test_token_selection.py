"""High-entropy token selection (grpo/token_selection.py) and its effect on the loss, by hand.
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_token_selection.py -q
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from loss_reference import grpo_loss_reference
from tolerances import U32

from grpo.loss import grpo_loss
from grpo.objectives import LossOptions
from grpo.token_selection import entropy_threshold, high_entropy_mask


def test_threshold_and_mask_by_hand():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 7.0], [0.3, 0.7, 0.2, 9.0]])  # [R=2, T=4]
    loss_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # 7 tokens; 7.0 is padding
    candidates = entropy[loss_mask > 0]  # 0.1 0.9 0.5 0.3 0.7 0.2 9.0
    # q = 0.5: the 0.5 quantile of the sorted 0.1 0.2 0.3 0.5 0.7 0.9 9.0 is the middle one, 0.5
    threshold = entropy_threshold(candidates, 0.5)
    assert threshold == pytest.approx(0.5, abs=1e-7)  # float32 entropies in double: 0.5 exactly
    selected = high_entropy_mask(entropy, loss_mask, threshold)
    assert selected.tolist() == [[False, True, True, False], [False, True, False, True]]  # 0.9 0.5 | 0.7 9.0
    # q = 0.3: position (1 - 0.3) * 6 = 4.2 between 0.7 and 0.9: 0.7 + 0.2 * 0.2 = 0.74 -> 0.9, 9.0 kept
    threshold = entropy_threshold(candidates, 0.3)
    assert threshold == pytest.approx(0.74, abs=1e-7)  # float32 inputs: ~1e-8 relative
    assert high_entropy_mask(entropy, loss_mask, threshold).sum() == 2
    # q = 1 keeps every loss token (padding never), q = 0 only the highest (9.0)
    assert high_entropy_mask(entropy, loss_mask, entropy_threshold(candidates, 1.0)).tolist() == (loss_mask > 0).tolist()
    assert high_entropy_mask(entropy, loss_mask, entropy_threshold(candidates, 0.0)).sum() == 1
    assert entropy_threshold(torch.tensor([]), 0.5) == math.inf


def test_the_mask_removes_only_the_policy_term():
    # one completion, 2 tokens, A = 1, one inner epoch (ratio 1), beta 0.1, "token" aggregation
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0 + math.log(2.0), -2.0]])  # k3 at t0: 2 - ln 2 - 1 = 0.3068528; t1: 0
    mask = torch.ones(1, 2)
    keep = torch.tensor([[False, True]])  # only t1 gets the policy gradient
    kwargs = dict(beta=0.1, aggregation="token", normaliser=2.0)
    options = LossOptions(beta=0.1, aggregation="token")
    loss, _ = grpo_loss(logprobs, None, ref, torch.tensor([1.0]), mask, options, normaliser=2.0, policy_token_mask=keep)
    # per token: t0 -(0 - 0.1 * 0.3068528) = 0.03068528 (surrogate masked); t1 -(1 - 0) = -1
    # loss = (0.03068528 - 1) / 2 tokens (the normaliser still counts both) = -0.48465736
    # float32 values <= 1 from <= 16 roundings (exp, log, products, a 2-term sum), each <= u:
    tol = 16 * U32 * 1.0
    assert loss.item() == pytest.approx(-0.48465736, abs=tol)
    loss.backward()
    # d/dlogp: t0 only the KL: 0.1 * d k3/d logp = 0.1 * (1 - e^{ref - logp}) = 0.1 * (1 - 2) = -0.1, / 2
    # t1: -A * ratio' = -1, / 2
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.05, -0.5]]), rtol=0, atol=tol)
    reference = grpo_loss_reference(logprobs.detach(), None, ref, torch.tensor([1.0]), mask, policy_token_mask=keep, **kwargs)
    assert reference.item() == pytest.approx(loss.item(), abs=2 * tol)  # each side within tol


def test_a_threshold_on_a_token_keeps_it_where_trls_float32_quantile_drops_it():
    # Candidates 0.1 0.2 0.3 0.4 0.5 5.0 (N = 6), q = 0.2: position (1 - 0.2) * (6 - 1) = 4 exactly
    # (0.8 * 5 rounds to 4.0 in float64), so the threshold is the 5th smallest, 0.5: 0.5 and 5.0 kept.
    entropy = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 5.0]])  # [R=2, T=3]
    loss_mask = torch.ones(2, 3)
    threshold = entropy_threshold(entropy[loss_mask > 0], 0.2)
    assert threshold == 0.5  # 0.5 is exact in float32 and the interpolation weight is 0
    selected = high_entropy_mask(entropy, loss_mask, threshold)
    assert selected.tolist() == [[False, False, False], [False, True, True]]
    # TRL 1.16 takes the quantile in float32: 0.8 becomes 0.800000012, the position 4.0000000596,
    # the threshold 0.5 + 0.0000000596 * (5.0 - 0.5) = 0.50000027, rounded to 0.50000024 > 0.5:
    # it keeps 5.0 only (grpo/token_selection.py point 2).
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL shows the other result (pip install -e '.[dev]')")
    one_process = SimpleNamespace(
        accelerator=SimpleNamespace(pad_across_processes=lambda x, dim, pad_index: x, gather=lambda x: x)
    )  # fmt: skip
    trl_selected = grpo_trainer.GRPOTrainer.get_high_entropy_mask(one_process, entropy, loss_mask, 1 - 0.2)
    assert trl_selected.tolist() == [[False, False, False], [False, False, True]]
