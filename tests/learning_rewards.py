"""A reward a random policy rarely earns, for the test that GRPO learns (tests/test_learning.py).

`digit_fraction` scores the fraction of a completion's characters that are digits. The tiny
model's untrained policy spreads its mass over ~900 tokens, few of them digits, so it scores near
0; a policy that writes only digits scores 1. The signal is dense (any digit helps), so a group
of G samples almost always has a reward spread and GRPO gets a gradient from the first step.
"""

from __future__ import annotations


def digit_fraction(completions, answers, **columns):
    """Fraction of the completion's characters that are 0-9 (0 for an empty completion)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]
