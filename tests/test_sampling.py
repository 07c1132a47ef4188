"""Tests for the token draw of grpo/engine/rollout.py: inverse CDF by hand, and against torch.multinomial.

`inverse_cdf_draw(probs, uniform)` takes the uniforms as an argument, so its boundary cases are
worked out by hand below. `sample_next_token(method=...)` draws with either inverse CDF or
`torch.multinomial` (the naive twin): both must give the truncated distribution's frequencies,
and the same check must reject a sampler with a known bug.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_sampling.py -q
"""

from __future__ import annotations

import pytest
import torch

from grpo.engine.sampling import default_sampling_method, inverse_cdf_draw, sample_next_token

# --- inverse CDF by hand ---


def test_inverse_cdf_by_hand():
    # probs [0.1, 0.0, 0.6, 0.3] -> cdf [0.1, 0.1, 0.7, 1.0]; token j owns [cdf[j-1], cdf[j]):
    # token 0 [0, 0.1), token 1 [0.1, 0.1) = empty, token 2 [0.1, 0.7), token 3 [0.7, 1.0).
    #   u = 0.05  -> 0.05 in [0, 0.1)                               -> 0
    #   u = 0.1   -> exactly on the boundary; token 1 is empty      -> 2 (float32: 0.1f * 1.0 == cdf[0])
    #   u = 0.65  -> in [0.1, 0.7)                                  -> 2
    #   u = 0.71  -> in [0.7, 1.0)                                  -> 3
    #   u = 0.999 -> in [0.7, 1.0)                                  -> 3
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3]).expand(5, 4)  # [R, V]
    uniform = torch.tensor([[0.05], [0.1], [0.65], [0.71], [0.999]])  # [R, 1]
    assert inverse_cdf_draw(probs, uniform).tolist() == [0, 2, 2, 3, 3]


def test_inverse_cdf_never_picks_a_zero_probability_token_on_a_boundary():
    # Unnormalised weights with zeros first, inside and last (dyadic, so every sum is exact):
    # w = [0, 1, 0, 5, 2, 0] -> cdf [0, 1, 1, 6, 8, 8], total 8, target = 8u.
    # Intervals: token 0 [0, 0) empty, 1 [0, 1), 2 [1, 1) empty, 3 [1, 6), 4 [6, 8), 5 [8, 8) empty.
    #   u = 0          -> target 0, on token 0's empty interval        -> 1
    #   u = 1/8        -> target 1, on token 2's empty interval        -> 3
    #   u = 1/2        -> target 4                                     -> 3
    #   u = 6/8        -> target 6, the 3|4 boundary                   -> 4
    #   u = 1 - 2^-24  -> torch.rand's largest value: target just < 8  -> 4 (a clamp to V-1 would give 5)
    #   u = 1          -> out of rand's range; the guard keeps target < total -> 4
    weights = torch.tensor([0.0, 1.0, 0.0, 5.0, 2.0, 0.0]).expand(6, 6)  # [R, V]
    uniform = torch.tensor([[0.0], [1 / 8], [1 / 2], [6 / 8], [1 - 2**-24], [1.0]])  # [R, 1]
    assert inverse_cdf_draw(weights, uniform).tolist() == [1, 3, 3, 4, 4, 4]
    # Why right=True: searchsorted's default (first cdf >= target) picks token 0, of weight 0, at u = 0.
    cdf = weights[:1].cumsum(-1)  # [1, V]
    assert torch.searchsorted(cdf, torch.tensor([[0.0]])).item() == 0


# --- inverse CDF and multinomial sample the same (truncated) distribution ---

# p = [0.05, 0.30, 0.08, 0.25, 0.20, 0.12]; sorted: 0.30 (1), 0.25 (3), 0.20 (4), 0.12 (5), 0.08 (2), 0.05 (0).
P = torch.tensor([0.05, 0.30, 0.08, 0.25, 0.20, 0.12])
CASES = {
    # top_k, top_p -> the distribution a correct sampler draws from, worked out by hand
    "untruncated": (0, 1.0, P),
    # top_k = 4 keeps tokens 1, 3, 4, 5 (mass 0.87): masked tokens sit between kept ones, so an
    # off-by-one index lands on them.
    "top_k=4": (4, 1.0, torch.tensor([0.0, 0.30, 0.0, 0.25, 0.20, 0.12]) / 0.87),
    # mass before, in sorted order: 0, 0.30, 0.55, 0.75, ...; top_p = 0.7 keeps those < 0.7: 1, 3, 4 (0.75).
    "top_p=0.7": (0, 0.7, torch.tensor([0.0, 0.30, 0.0, 0.25, 0.20, 0.0]) / 0.75),
}
NUM_DRAWS = 50_000
# Chi-square 99.9% quantiles (standard table), by degrees of freedom = kept tokens - 1. A correct
# sampler exceeds them one time in a thousand; the draws are seeded, so the test is deterministic.
CHI_SQUARE_999 = {2: 13.82, 3: 16.27, 5: 20.52}


def _fits(tokens: torch.Tensor, expected: torch.Tensor) -> tuple[bool, float, int]:
    """Do draws [N] fit `expected` [V]? (chi-square over kept tokens below the 99.9% quantile and
    not a single draw of a truncated token), with the statistic and the truncated draws."""
    counts = torch.bincount(tokens, minlength=expected.numel()).double()  # [V]
    kept = expected > 0  # [V]
    expected_counts = expected.double()[kept] * tokens.numel()  # [kept]
    chi_square = float(((counts[kept] - expected_counts) ** 2 / expected_counts).sum())
    truncated_draws = int(counts[~kept].sum())
    return chi_square < CHI_SQUARE_999[int(kept.sum()) - 1] and truncated_draws == 0, chi_square, truncated_draws


def _draw(method: str, top_k: int, top_p: float, seed: int = 0) -> torch.Tensor:
    logits = P.log().expand(NUM_DRAWS, -1)  # [N, V] one row per draw
    generator = torch.Generator().manual_seed(seed)
    token, _ = sample_next_token(logits, temperature=1.0, top_p=top_p, top_k=top_k, generator=generator,
                                 method=method)
    return token  # [N]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["inverse_cdf", "multinomial"])
def test_both_methods_draw_the_truncated_distribution(method, case):
    top_k, top_p, expected = CASES[case]
    fits, chi_square, truncated_draws = _fits(_draw(method, top_k, top_p), expected)
    assert fits, f"{method}, {case}: chi-square {chi_square:.1f}, {truncated_draws} truncated tokens drawn"


def test_the_distribution_check_rejects_wrong_samplers():
    # The check above has teeth: the same statistic on the same draws fails two classic bugs.
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(NUM_DRAWS, 1, generator=generator)  # [N, 1]
    probs = P.expand(NUM_DRAWS, -1)  # [N, V]
    # (a) off by one: the token after the right one. Untruncated: mass moves one place right.
    off_by_one = (inverse_cdf_draw(probs, uniform) + 1).clamp(max=P.numel() - 1)  # [N]
    assert _fits(inverse_cdf_draw(probs, uniform), P)[0]  # same uniforms, right index: fits
    fits, chi_square, _ = _fits(off_by_one, P)
    assert not fits and chi_square > 1000
    # With top-k = 4 every draw of token 1 (0.30 / 0.87 = 34%) becomes the masked token 2.
    top_k_expected = CASES["top_k=4"][2]  # [V]
    top_k_probs = top_k_expected.expand(NUM_DRAWS, -1)  # [N, V]
    off_by_one = (inverse_cdf_draw(top_k_probs, uniform) + 1).clamp(max=P.numel() - 1)  # [N]
    fits, _, truncated_draws = _fits(off_by_one, top_k_expected)
    assert not fits and truncated_draws > 0.3 * NUM_DRAWS
    # (b) the top-k mask ignored: drawing from the untruncated probabilities.
    fits, _, truncated_draws = _fits(inverse_cdf_draw(probs, uniform), top_k_expected)
    assert not fits and truncated_draws > 0.1 * NUM_DRAWS  # tokens 0 and 2 hold 13% of the mass
    # (c) searchsorted with right=False is wrong only on boundaries, which have probability 0:
    # no frequency test can see it; the hand-worked boundary test above does.


def test_method_by_device_and_unknown_method():
    assert default_sampling_method(torch.device("cpu")) == "inverse_cdf"
    assert default_sampling_method(torch.device("cuda")) == "multinomial"
    logits = torch.zeros(2, 5)  # [R, V]
    for temperature in (1.0, 0.0):  # greedy draws nothing, but a misspelt method still fails
        with pytest.raises(ValueError, match="inverse_cdf"):
            sample_next_token(logits, temperature=temperature, top_p=1.0, top_k=0, generator=None, method="gumbel")
