"""Tests for grpo/logprobs.py: chosen-token log-probs (chunked vs naive) and entropy."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import U32, logsumexp_error, sum_error

from grpo.logprobs import token_entropy, token_logprobs, token_logprobs_naive

QWEN_VOCAB = 151_936


def test_hand_worked_1x2x3():
    # One completion (R=1), two positions (T=2), vocabulary of 3.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]])  # [1, 2, 3]
    token_ids = torch.tensor([[1, 2]])  # [1, 2]
    # Position 0: all logits equal, so p = 1/3 for every token: log(1/3) = -1.0986123.
    # Position 1: logsumexp(1, 2, 3) = 3 + log(1 + e^-1 + e^-2) = 3 + log(1.5032147)
    #             = 3 + 0.4076059 = 3.4076059; chosen logit 3, so 3 - 3.4076059 = -0.4076059.
    expected = torch.tensor([[-1.0986123, -0.4076059]])
    # float32 logsumexp of 3 terms ~ 1e-6 (logsumexp_error(3, 3.4) = 1.0e-6) + 5e-8 from the
    # 7-digit hand values.
    atol = logsumexp_error(3, 3.4) + 5e-8
    for chunk_size in (1, 2, 4096):
        got = token_logprobs(logits, token_ids, chunk_size=chunk_size)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    torch.testing.assert_close(token_logprobs_naive(logits, token_ids), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 4096])  # 4 and 5 do not divide R*T = 6
def test_chunked_matches_naive_qwen_vocab(dtype, chunk_size):
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 3, QWEN_VOCAB, generator=generator)).to(dtype)  # [R, T, V]
    token_ids = torch.randint(0, QWEN_VOCAB, (2, 3), generator=generator)  # [R, T]
    chunked = token_logprobs(logits, token_ids, chunk_size=chunk_size)
    naive = token_logprobs_naive(logits, token_ids)
    assert chunked.dtype == torch.float32 and chunked.shape == (2, 3)
    # Both upcast the same bf16 numbers to float32 before the logsumexp, then sum V terms in their
    # own orders: each is within logsumexp_error(V, |logp|) = 1.9e-4 of the exact value (the
    # sqrt(V) * u term dominates); the naive one's blocked vector sum is the looser of the two.
    bound = logsumexp_error(QWEN_VOCAB, naive.abs().max().item())
    torch.testing.assert_close(chunked, naive, atol=2 * bound, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_chunked_matches_naive(dtype):
    generator = torch.Generator().manual_seed(1)
    base = (3 * torch.randn(2, 3, QWEN_VOCAB, generator=generator)).to(dtype)  # [R, T, V]
    token_ids = torch.randint(0, QWEN_VOCAB, (2, 3), generator=generator)  # [R, T]
    upstream = torch.randn(2, 3, generator=generator)  # [R, T] an arbitrary d loss / d logp
    grads = []
    for fn in (
        lambda x: token_logprobs(x, token_ids, chunk_size=4),
        lambda x: token_logprobs_naive(x, token_ids),
    ):
        logits = base.clone().requires_grad_(True)
        (fn(logits) * upstream).sum().backward()
        assert logits.grad.dtype == dtype
        grads.append(logits.grad.float())
    # d logp / d z_v = 1[v == y] - softmax(z)_v: softmax_v = exp(z_v - lse) carries the lse's
    # error as a relative error (logsumexp_error(V) per side), and 1 - p at the chosen token rounds
    # at 1 (a few u absolute). bf16 grads are then rounded to 8 bits: one ulp, 2^-8 relative, each.
    rtol = 2 * logsumexp_error(QWEN_VOCAB) + (2 * 2.0**-8 if dtype == torch.bfloat16 else 0.0)
    torch.testing.assert_close(grads[0], grads[1], atol=4 * U32, rtol=rtol)


def test_gradcheck_float64():
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)  # [R, T, V]
    token_ids = torch.randint(0, 7, (2, 3))  # [R, T]
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, token_ids, chunk_size=4), (logits,))


def test_non_viewable_slice_matches_naive():
    # output.logits[:, :-1] cannot be viewed as [R*T, V]; the chunks then go row by row.
    full = torch.randn(3, 5, 11, requires_grad=True)  # [R, T+1, V]
    logits = full[:, :-1]  # [R, T, V] non-viewable slice
    token_ids = torch.randint(0, 11, (3, 4))  # [R, T]
    chunked = token_logprobs(logits, token_ids, chunk_size=3)
    # Two float32 logsumexps over V = 11 randn logits (|logp| < 10): 2 * 2.6e-6 apart at most.
    torch.testing.assert_close(chunked, token_logprobs_naive(logits, token_ids), atol=2 * logsumexp_error(11, 10.0), rtol=0)
    chunked.sum().backward()
    grad_chunked = full.grad.clone()
    full.grad = None
    token_logprobs_naive(full[:, :-1], token_ids).sum().backward()
    # grad = 1[v == y] - softmax_v, |grad| <= 1: the lse's relative error, plus a few u.
    torch.testing.assert_close(grad_chunked, full.grad, atol=2 * logsumexp_error(11) + 4 * U32, rtol=0)


def test_backward_saves_no_float32_copy_of_the_logits():
    # The point of the chunking: autograd keeps the bf16 logits, not a float32 [R, T, V] copy.
    logits = torch.randn(2, 3, 1000).to(torch.bfloat16).requires_grad_(True)  # [R, T, V]
    token_ids = torch.randint(0, 1000, (2, 3))  # [R, T]
    logits_bytes = logits.numel() * logits.element_size()

    def saved_bytes(fn) -> int:
        sizes = []

        def pack(tensor):
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            fn(logits, token_ids)
        return sum(sizes)

    # chunked: the logits themselves + [R*T] ids and logsumexps.
    assert saved_bytes(lambda x, y: token_logprobs(x, y, chunk_size=2)) < 1.1 * logits_bytes
    # naive: at least the float32 log-softmax, twice the bf16 logits.
    assert saved_bytes(token_logprobs_naive) >= 2 * logits_bytes


def test_entropy_hand_values():
    # Uniform over V = 4: H = log 4 = 1.3862944.
    # One-hot-ish (logits 0 and -inf): p = [1, 0, 0, 0], H = 0 (and no NaN from 0 * log 0).
    # Two equal logits, two at -inf: H = log 2 = 0.6931472.
    neg_inf = float("-inf")
    logits = torch.tensor(
        [
            [
                [0.0, 0.0, 0.0, 0.0],
                [0.0, neg_inf, neg_inf, neg_inf],
                [5.0, 5.0, neg_inf, neg_inf],
            ]
        ]
    )  # [1, 3, 4]
    expected = torch.tensor([[math.log(4), 0.0, math.log(2)]])
    # 4 terms p log p of size <= 0.35, sum H <= log 4; the log-softmax's own error ~ 1e-6 per term.
    atol = sum_error(4, math.log(4)) + logsumexp_error(4, 2.0)
    torch.testing.assert_close(token_entropy(logits, chunk_size=2), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_matches_naive(dtype):
    logits = (2 * torch.randn(2, 3, 500)).to(dtype)  # [R, T, V]
    log_p = logits.float().log_softmax(-1)  # [R, T, V]
    naive = -(log_p.exp() * log_p).sum(-1)  # [R, T]
    chunked = token_entropy(logits, chunk_size=4)
    assert chunked.dtype == torch.float32
    # H = -sum_v p_v log p_v over V = 500: a sum of 500 terms with |terms| adding up to H <= log V,
    # each term's log p off by logsumexp_error(V, |log p| <= 20) (relative to sum p = 1), per side.
    V = logits.shape[-1]
    bound = sum_error(V, math.log(V)) + logsumexp_error(V, 20.0)
    torch.testing.assert_close(chunked, naive, atol=2 * bound, rtol=0)


def test_entropy_works_with_grad_enabled():
    logits = torch.randn(2, 3, 6, requires_grad=True)  # [R, T, V]
    entropy = token_entropy(logits, chunk_size=4)
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_errors():
    with pytest.raises(ValueError, match=r"logits must be \[R, T, V\]"):
        token_logprobs(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="token_ids must be"):
        token_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="floating point"):
        token_entropy(torch.zeros(2, 3, 5, dtype=torch.long))


def test_default_chunk_is_a_64_mib_float32_buffer():
    from grpo.logprobs import default_chunk_size

    # Qwen's vocabulary: 64 * 2^20 bytes / (4 bytes * 151,936) = 67,108,864 / 607,744 = 110.4 -> 110
    assert default_chunk_size(151_936) == 110
    # the tiny preset's 927 tokens: 67,108,864 / 3,708 = 18,098.4 -> 18,098 positions, i.e. all of them
    assert default_chunk_size(927) == 18_098
    assert default_chunk_size(10**9) == 1  # never zero


def test_default_chunking_matches_naive_with_gradients():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 151_936, requires_grad=True)  # 15 positions: 110 per chunk -> one chunk
    ids = torch.randint(0, 151_936, (3, 5))
    chunked = token_logprobs(logits, ids)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), logits)
    naive = token_logprobs_naive(logits, ids)
    (grad_naive,) = torch.autograd.grad(naive.sum(), logits)
    # Each side within logsumexp_error(V, |logp|) of the exact value (1.9e-4: the sqrt(V) u term).
    torch.testing.assert_close(chunked, naive, atol=2 * logsumexp_error(151_936, naive.abs().max().item()), rtol=0)
    # grad = 1[v == y] - softmax_v: relative error of softmax_v is the lse's, so the error is that
    # times the largest softmax entry (randn logits: < 1e-3), plus a few u at the chosen token (1 - p).
    largest_p = grad_naive.clamp(min=0).max().item()
    torch.testing.assert_close(grad_chunked, grad_naive, atol=2 * logsumexp_error(151_936) * largest_p + 4 * U32, rtol=0)
