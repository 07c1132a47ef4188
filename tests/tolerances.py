"""Rounding-error bounds that the tests' tolerances are derived from (not tuned to one machine).

u is the unit roundoff: 2^-24 for float32, 2^-8 for bfloat16 (half an ulp at 1). Summing n terms
rounds n - 1 times; in the worst case the error is (n - 1) * u * sum|x_i| (Higham, "Accuracy and
Stability of Numerical Algorithms", 2nd ed., sec. 4.2), whatever the order. Treating the rounding
errors as independent and mean-zero, it is at most LAMBDA * sqrt(n) * u * sum|x_i| except with
probability 2n * exp(-LAMBDA^2 / 2) (Higham & Mary, "A new approach to probabilistic rounding
error analysis", SIAM J. Sci. Comput. 2019): with LAMBDA = 8 that is < 1e-8 for n below 10^5.5,
on any summation order a kernel picks (sequential, blocked into vector lanes, or pairwise, which
is tighter still). The tests use that bound: tight enough to catch a wrong term (errors of
O(1e-2) and more), loose enough for every CPU kernel path (AVX-512, AVX2, the portable
ATEN_CPU_CAPABILITY=default one).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

LAMBDA = 8.0
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
U32 = UNIT_ROUNDOFF[torch.float32]
# Two float64 evaluations of a short formula on numbers of size <= ~10 (an interval's sqrt, a few
# products and quotients; an accuracy's sum of 0/1 values and one division): each result is within
# a few dozen roundings of size 2^-53 of values <= ~10 from the exact one, so this far apart at most.
FLOAT64_FORMULA = 64 * 2.0**-53 * 10


def sum_error(n: int, abs_sum: float, dtype: torch.dtype = torch.float32) -> float:
    """Bound on the rounding error of a sum of n terms whose absolute values add up to abs_sum."""
    return LAMBDA * math.sqrt(n) * UNIT_ROUNDOFF[dtype] * abs_sum


def logsumexp_error(n: int, result_magnitude: float = 0.0) -> float:
    """Absolute error of a float32 log-softmax entry z_y - logsumexp(z) over n logits.

    logsumexp = m + log(S), S = sum_v exp(z_v - m) with m = max z: S has n terms in (0, 1], each
    with one rounding from exp(), and S >= 1, so log(S) is off by S's relative error,
    sum_error(n, 1) + u. The final additions round at the result's magnitude: a few ulps of it.
    """
    return sum_error(n, 1.0) + U32 + 4 * U32 * result_magnitude


# Allowance for everything a network's forward adds to one sum's rounding: the condition number
# of each sum (sum|x_i| / |sum x_i|, ~sqrt(K) for random-sign terms) and the growth of earlier
# layers' errors through later ones (normalised residual layers keep it near 1).
NETWORK_GROWTH = 2.0**10

# Terms of the sums on the tiny preset's (models/tiny.py) deepest path, for network_error: per
# vision block norm 64 + qkv 64 + scores 32 + values <= 64 + proj 64 + norm 64 + MLP 64 + 128
# (x 2), the merger 64 + 256 + 256, per text layer norm 128 + qkv 128 + scores 32 + values <= 256
# + o 128 + norm 128 + gate/up 128 + down 344 (x 2), final norm 128 + lm_head 128 + logsumexp
# ~1,000: ~5,500, rounded up.
TINY_PATH_TERMS = 8192


def network_error(path_terms: int, magnitude: float, dtype: torch.dtype = torch.float64) -> float:
    """Bound on the gap between two evaluation orders (batched or not, cached KV or not) of one network.

    path_terms counts the terms of every sum on the deepest input-to-output path (each matmul's
    inner dimension, each attention's keys, each norm's width, the final logsumexp's vocabulary).
    Each sum of n terms rounds with a relative error of at most n * u (Higham sec. 3.1, any order),
    and, with no cancellation between them and NETWORK_GROWTH for conditioning and error growth,
    the output moves by at most path_terms * u * NETWORK_GROWTH * magnitude. Pessimistic by design:
    the tests that compare computation orders of a whole model run it in float64, where this is
    ~1e-9 at magnitude 10 (a wrong position, mask or row moves logprobs by > 1e-3); in float32 the
    same bound is ~1, which is why those tests do not run in float32.
    """
    return path_terms * UNIT_ROUNDOFF[dtype] * NETWORK_GROWTH * magnitude


@contextlib.contextmanager
def float64_throughout():
    """A context in which HF's Qwen2.5-VL keeps float64 activations in float64.

    Its RMSNorm, vision rotary embedding and eager softmax compute in float32 whatever the input
    dtype, which leaves float32 roundings (and float32 sums in their backward) inside a float64
    model. These twins compute in promote_types(input, float32) instead: the same ops,
    bit-identical to HF's for float32 and bfloat16 inputs, and float64 for float64 ones. Used by
    the tests that compare two computation orders of a whole model (tolerances.network_error).
    """
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

    def rms_norm(self, hidden_states):
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        x = hidden_states.to(dtype)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(hidden_states.dtype)

    def rotary_vision(q, k, cos, sin):
        dtype = torch.promote_types(q.dtype, torch.float32)
        cos, sin = cos.unsqueeze(-2).to(dtype), sin.unsqueeze(-2).to(dtype)
        q_embed = (q.to(dtype) * cos) + (hf.rotate_half(q.to(dtype)) * sin)
        k_embed = (k.to(dtype) * cos) + (hf.rotate_half(k.to(dtype)) * sin)
        return q_embed.to(q.dtype), k_embed.to(k.dtype)

    def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key_states = hf.repeat_kv(key, module.num_key_value_groups)
        value_states = hf.repeat_kv(value, module.num_key_value_groups)
        attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        dtype = torch.promote_types(query.dtype, torch.float32)
        attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=dtype).to(query.dtype)
        attn_weights = torch.nn.functional.dropout(attn_weights, p=dropout, training=module.training)
        return torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous(), attn_weights

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf.Qwen2_5_VLRMSNorm, "forward", rms_norm)
        patch.setattr(hf, "apply_rotary_pos_emb_vision", rotary_vision)
        patch.setattr(hf, "eager_attention_forward", eager_attention)
        yield



def after_adamw_steps(error: float, learning_rate: float, adam_epsilon: float, steps: int) -> float:
    """A gap between two runs' quantities after `steps` AdamW updates that started `error` apart.

    AdamW moves each weight by lr * m / (sqrt(v) + eps), m and v running averages of the gradient g
    and g^2; d/dg of g / (|g| + eps) is eps / (|g| + eps)^2 <= 1 / eps. So a gradient gap of `error`
    (gradients clipped to norm <= 1) becomes a weight gap of up to lr * error / eps, which the next
    forward carries like one more relative rounding of that size: each update multiplies the bound
    by (1 + lr / eps). At the default eps = 1e-8 that factor is ~1e5 and the bound says little,
    so the tests that compare whole runs set --adam_epsilon to the learning rate (factor 2).
    """
    return error * (1 + learning_rate / adam_epsilon) ** steps
