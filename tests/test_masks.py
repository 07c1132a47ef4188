"""Tests for the completion mask (grpo/masks.py): it runs through the first EOS, never from != pad."""

from __future__ import annotations

import pytest
import torch

from grpo.masks import completion_mask, mask_truncated

EOS = 2
PAD = 0


def test_eos_mid_sequence_is_inside_the_mask():
    ids = torch.tensor([[5, 6, EOS, PAD, PAD]])  # [1, 5]
    mask, is_truncated = completion_mask(ids, EOS)
    # tokens 5, 6 and the EOS count; the two pads after it do not.
    assert mask.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]
    assert mask.dtype == torch.float32
    assert is_truncated.tolist() == [False]


def test_eos_at_position_zero():
    ids = torch.tensor([[EOS, 7, 8]])  # [1, 3] tokens after the EOS are padding, whatever they are
    mask, is_truncated = completion_mask(ids, EOS)
    assert mask.tolist() == [[1.0, 0.0, 0.0]]
    assert is_truncated.tolist() == [False]


def test_no_eos_is_truncated_and_fully_masked_in():
    ids = torch.tensor([[5, 6, 7, 8], [5, EOS, PAD, PAD]])  # [2, 4]
    mask, is_truncated = completion_mask(ids, EOS)
    assert mask.tolist() == [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
    assert is_truncated.tolist() == [True, False]


def test_two_eos_ids_first_of_either_ends_the_completion():
    im_end, endoftext = 10, 11
    ids = torch.tensor(
        [
            [3, im_end, endoftext, 4],
            [3, 4, endoftext, im_end],
            [3, 4, 5, 6],
        ]
    )  # [3, 4]
    mask, is_truncated = completion_mask(ids, [im_end, endoftext])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert is_truncated.tolist() == [False, False, True]
    # A tensor of ids works too.
    mask_from_tensor, _ = completion_mask(ids, torch.tensor([im_end, endoftext]))
    assert torch.equal(mask, mask_from_tensor)


def test_pad_equal_to_eos():
    # Qwen's pad token can be <|endoftext|>, also an EOS. A mask built from ids != pad would be
    # [1, 1, 0, 0, 0] and lose the EOS; the first-EOS rule keeps it.
    pad_and_eos = 151643
    ids = torch.tensor([[5, 6, pad_and_eos, pad_and_eos, pad_and_eos]])  # [1, 5]
    mask, is_truncated = completion_mask(ids, pad_and_eos)
    assert mask.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]
    assert is_truncated.tolist() == [False]


def test_mask_truncated_zeroes_only_truncated_rows():
    ids = torch.tensor([[5, 6, 7], [5, EOS, PAD]])  # [2, 3]
    mask, is_truncated = completion_mask(ids, EOS)
    assert mask_truncated(mask, is_truncated).tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    assert mask.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]  # input left untouched


def test_errors():
    with pytest.raises(ValueError, match=r"\[R, T\]"):
        completion_mask(torch.tensor([1, 2, EOS]), EOS)
    with pytest.raises(ValueError, match="eos_token_ids is empty"):
        completion_mask(torch.tensor([[1, 2]]), [])
    with pytest.raises(ValueError, match="integer"):
        completion_mask(torch.tensor([[1.0, 2.0]]), EOS)
    with pytest.raises(ValueError, match="is_truncated"):
        mask_truncated(torch.ones(2, 3), torch.tensor([True, False, True]))
