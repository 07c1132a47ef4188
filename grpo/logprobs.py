"""Per-token log-probabilities of the chosen tokens, and per-token entropy.

Every term of the GRPO objective (DeepSeekMath, arXiv 2402.03300, eq. 3) is built from
log pi(o_t | q, o_<t): the log-probability the policy gives to the token o_t that was actually
sampled. From the logits z of one position and the chosen token y:

    log pi(y) = z_y - logsumexp_v(z_v)

The obvious code, `logits.float().log_softmax(-1).gather(-1, ids)`, builds a float32 copy of the
whole [R, T, V] tensor. With Qwen's V = 151,936 that is 0.6 MB per position: 8 completions of
1,024 tokens are already 5 GB, on top of the bf16 logits themselves. `token_logprobs` gets the
same numbers for the price of a [chunk_size, V] float32 buffer:

1. view the logits as [R*T, V] and walk over `chunk_size` positions at a time (a tensor that
   cannot be viewed so, like `output.logits[:, :-1]`, is walked row by row, never copied);
2. upcast that chunk to float32 (bf16 has 8 bits of mantissa; a logsumexp over 150k terms
   must be accumulated in float32), take its logsumexp and gather the chosen logit;
3. keep only the [R*T] results.

Plain autograd through that loop would save every float32 chunk for the backward pass, which is
the full float32 copy again. So the gradient is written by hand in `_ChunkedTokenLogprobs`,
recomputing one chunk at a time:

    d log pi(y) / d z_v = 1[v == y] - softmax(z)_v

`token_logprobs_naive` is the one-line version, kept to test the chunked one against.

Temperature: when completions are sampled at temperature tau, the policy being optimised is
softmax(z / tau). The caller divides the logits by tau before calling these functions.

Run the tests: `python -m pytest tests/test_logprobs.py -q`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_logits(logits: Tensor, chunk_size: int) -> None:
    if logits.ndim != 3:
        raise ValueError(f"logits must be [R, T, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _compute_dtype(logits: Tensor) -> torch.dtype:
    # float32 for bf16/fp16/fp32 logits; float64 stays float64 (lets gradcheck run in float64).
    return torch.promote_types(logits.dtype, torch.float32)


def _position_chunks(logits: Tensor, chunk_size: int):
    """Yield (start, stop, chunk): chunk = the [C, V] logits of flat positions start..stop-1.

    Positions are numbered r * T + t. Never copies the whole tensor: a contiguous [R, T, V] is
    viewed as [R*T, V] and cut every `chunk_size` rows; a tensor that cannot be viewed that way
    (`output.logits[:, :-1]`, a slice of a bigger one) is cut row by row instead, because
    `reshape` would copy all of it.
    """
    num_rows, num_tokens, vocab_size = logits.shape
    try:
        flat_logits = logits.view(num_rows * num_tokens, vocab_size)  # [R*T, V]
    except RuntimeError:
        for row in range(num_rows):
            for t in range(0, num_tokens, chunk_size):
                stop = min(t + chunk_size, num_tokens)
                yield row * num_tokens + t, row * num_tokens + stop, logits[row, t:stop]
        return
    for start in range(0, num_rows * num_tokens, chunk_size):
        stop = min(start + chunk_size, num_rows * num_tokens)
        yield start, stop, flat_logits[start:stop]


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log pi(y) = z_y - logsumexp(z), forward and backward one chunk of positions at a time."""

    @staticmethod
    def forward(ctx, logits: Tensor, flat_ids: Tensor, chunk_size: int) -> Tensor:
        compute_dtype = _compute_dtype(logits)
        num_positions = flat_ids.shape[0]
        logprobs = logits.new_empty(num_positions, dtype=compute_dtype)  # [R*T]
        log_normalisers = logits.new_empty(num_positions, dtype=compute_dtype)  # [R*T]
        for start, stop, chunk in _position_chunks(logits, chunk_size):
            chunk = chunk.to(compute_dtype)  # [C, V]
            ids = flat_ids[start:stop].unsqueeze(-1)  # [C, 1]
            chosen = chunk.gather(-1, ids).squeeze(-1)  # [C]
            log_normaliser = torch.logsumexp(chunk, dim=-1)  # [C]
            logprobs[start:stop] = chosen - log_normaliser
            log_normalisers[start:stop] = log_normaliser
        # Save the logits (they already exist, no copy), not the float32 chunks.
        ctx.save_for_backward(logits, flat_ids, log_normalisers)
        ctx.chunk_size = chunk_size
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor):
        logits, flat_ids, log_normalisers = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        vocab_size = logits.shape[-1]
        grad_logits = logits.new_empty(logits.shape)  # [R, T, V] contiguous, the logits' dtype
        flat_grad_logits = grad_logits.view(-1, vocab_size)  # [R*T, V]
        for start, stop, chunk in _position_chunks(logits, ctx.chunk_size):
            # One working buffer per chunk, updated in place: a second [C, V] temporary per step
            # (exp, then the product) would double the chunk's share of the peak.
            grad_chunk = chunk.to(log_normalisers.dtype, copy=True)  # [C, V]
            grad_out = grad_logprobs[start:stop].unsqueeze(-1)  # [C, 1]
            # softmax from the saved logsumexp (the forward's normaliser), times -grad: the -softmax(z)_v term
            grad_chunk.sub_(log_normalisers[start:stop].unsqueeze(-1)).exp_().mul_(-grad_out)  # [C, V]
            grad_chunk.scatter_add_(-1, flat_ids[start:stop].unsqueeze(-1), grad_out)  # +1[v == y]
            flat_grad_logits[start:stop] = grad_chunk
        return grad_logits, None, None


# The float32 working set of one chunk. At Qwen's V = 151,936 this is 110 positions: small next to
# the logits themselves, and no slower than larger chunks (docs/benchmarks.md, section 1). A
# fixed 4,096 positions was 2.5 GB per chunk at that V, more than the naive version's peak.
CHUNK_BYTES = 64 * 2**20


def default_chunk_size(vocab_size: int) -> int:
    """Positions per chunk so that one float32 [chunk, V] buffer takes CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def token_logprobs(logits: Tensor, token_ids: Tensor, chunk_size: int | None = None) -> Tensor:
    """log pi(token_ids[r, t]) under softmax(logits[r, t]), chunked over positions.

    Args:
        logits: [R, T, V] float32 or bfloat16 logits of the positions that predict `token_ids`.
        token_ids: [R, T] the chosen tokens.
        chunk_size: positions (rows of the flattened [R*T, V]) processed at a time; default
            `default_chunk_size(V)`, a 64 MiB float32 buffer.

    Returns:
        [R, T] float32 log-probabilities (float64 if the logits are float64), differentiable
        with respect to `logits`.
    """
    if chunk_size is None:
        chunk_size = default_chunk_size(logits.shape[-1])
    _check_logits(logits, chunk_size)
    num_rows, num_tokens, _ = logits.shape
    if tuple(token_ids.shape) != (num_rows, num_tokens):
        raise ValueError(
            f"token_ids must be [R, T] = {(num_rows, num_tokens)} to match logits "
            f"{tuple(logits.shape)}, got {tuple(token_ids.shape)}"
        )
    flat_ids = token_ids.reshape(num_rows * num_tokens).long()  # [R*T]
    flat_logprobs = _ChunkedTokenLogprobs.apply(logits, flat_ids, chunk_size)  # [R*T]
    return flat_logprobs.view(num_rows, num_tokens)  # [R, T]


def token_logprobs_naive(logits: Tensor, token_ids: Tensor) -> Tensor:
    """The reference twin of `token_logprobs`: a full float32 log-softmax, then a gather."""
    log_softmax = logits.to(_compute_dtype(logits)).log_softmax(-1)  # [R, T, V]
    return log_softmax.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)  # [R, T]


def token_entropy(logits: Tensor, chunk_size: int | None = None) -> Tensor:
    """Entropy H = -sum_v p_v log p_v of softmax(logits) at every position, chunked.

    A diagnostic (collapsing entropy is what DAPO's clip-higher fights, arXiv 2503.14476 sec. 3.1),
    so it is meant to run under `torch.no_grad()`; with grad enabled it still works, through
    ordinary autograd.

    Args:
        logits: [R, T, V].
        chunk_size: positions processed at a time (default: `default_chunk_size(V)`).

    Returns:
        [R, T] float32 entropies in nats.
    """
    if chunk_size is None:
        chunk_size = default_chunk_size(logits.shape[-1])
    _check_logits(logits, chunk_size)
    num_rows, num_tokens, _ = logits.shape
    entropy = logits.new_empty(num_rows * num_tokens, dtype=_compute_dtype(logits))  # [R*T]
    for start, stop, chunk in _position_chunks(logits, chunk_size):
        probs = chunk.to(entropy.dtype).softmax(-1)  # [C, V]
        # special.entr(p) = -p log p with entr(0) = 0: a token whose logit is -inf (masked by
        # top-k, say) has p = 0 and adds 0, where p * log p would give 0 * -inf = NaN.
        entropy[start:stop] = torch.special.entr(probs).sum(-1)
    return entropy.view(num_rows, num_tokens)  # [R, T]
