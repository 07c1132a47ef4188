"""grpo_loss against TRL's own loss, `GRPOTrainer._compute_loss` (TRL 1.16), as an oracle.

TRL's method is called unbound on a stand-in for the trainer: its forward returns our random
log-probs, so the two losses see the same numbers, and everything else it reads is set to one
process, one micro-batch, one accumulation step. Compared in float64, value and gradient:

    ours                                        TRL
    --loss_type grpo | dapo | dr_grpo           loss_type grpo | dapo | dr_grpo
    --importance_sampling_level sequence        importance_sampling_level="sequence"  (GSPO)
    --objective cispo, --epsilon_high e         loss_type="cispo", epsilon_high = 1 + e  (TRL caps
                                                the ratio at epsilon_high itself)
    --kl_estimator k3 | k3_ratio                use_bias_correction_kl False | True
    --sampler_correction MODE (weights)         inputs["importance_sampling_ratio"] (TRL computes
                                                its weights in generation, outside _compute_loss;
                                                ours are passed in, so this checks how they enter
                                                the loss; the weights are checked by hand in
                                                tests/test_sampler_correction.py)
    --delta d, --off_policy_mask_threshold t    delta=d, off_policy_mask_threshold=t
    --loss_type bnpo | luspo | sapo | vespo     loss_type bnpo | luspo | sapo | vespo
    --sapo_temperature_*, --vespo_k_*, ...      the same names

The issue 24 options are also compared over micro-batch splits (TRL called once per
micro-batch, as its Trainer does under gradient accumulation), and their flags' defaults are
checked against TRL's GRPOConfig.

Needs TRL (in the `dev` extra); skipped cleanly without it.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from tolerances import sum_error

from grpo.loss import grpo_loss, step_normaliser
from grpo.objectives import LossOptions
from grpo.sampler_correction import importance_weights

grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL is the oracle here (pip install -e '.[dev]')")

R, T = 8, 7  # completions, max completion length


def trl_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, *, loss_type, level, beta,
             epsilon_low, epsilon_high, bias_correction_kl, is_ratio):  # fmt: skip
    """TRL's _compute_loss on these tensors (a stand-in `self`: one process, no accumulation)."""
    def per_token_logps_and_entropies(model, *args, **kwargs):
        return logprobs, torch.zeros_like(logprobs), None

    accelerator = SimpleNamespace(
        num_processes=1, reduce=lambda x, reduction="sum": x, gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps_and_entropies, aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=bias_correction_kl, delta=None, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=accelerator, _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)), max_completion_length=T,
    )  # fmt: skip
    ids = torch.zeros(R, T, dtype=torch.long)
    inputs = {
        "prompt_ids": torch.zeros(R, 2, dtype=torch.long), "prompt_mask": torch.ones(R, 2, dtype=torch.long),
        "completion_ids": ids, "completion_mask": mask, "advantages": advantages,
        "old_per_token_logps": old_logprobs, "ref_per_token_logps": ref_logprobs,
        "num_items_in_batch": mask.sum(), "importance_sampling_ratio": is_ratio,
    }  # fmt: skip
    return grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)


def random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    logprobs = -3 * torch.rand(R, T, generator=g, dtype=torch.float64)  # [R, T]
    old_logprobs = logprobs + 0.2 * torch.randn(R, T, generator=g, dtype=torch.float64)
    ref_logprobs = logprobs + 0.3 * torch.randn(R, T, generator=g, dtype=torch.float64)
    sampler_logprobs = old_logprobs + 0.4 * torch.randn(R, T, generator=g, dtype=torch.float64)
    advantages = torch.randn(R, generator=g, dtype=torch.float64)  # [R]
    lengths = torch.randint(1, T + 1, (R,), generator=g)  # [R]
    mask = (torch.arange(T) < lengths[:, None]).double()  # [R, T]
    return logprobs, old_logprobs, ref_logprobs, sampler_logprobs, advantages, mask


LOSS_TYPES = {"grpo": ("sequence", "clip"), "dapo": ("token", "clip"), "dr_grpo": ("constant", "clip"),
              "cispo": ("token", "cispo")}  # fmt: skip
CONFIGS = list(
    itertools.product(
        LOSS_TYPES, ("token", "sequence"), (0.0, 0.04), (False, True), (True, False),
        ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
    )
)  # fmt: skip


def test_loss_and_gradient_equal_trls():
    worst = 0.0
    for seed, (loss_type, level, beta, bias_correction_kl, one_epoch, correction) in itertools.product(range(3), CONFIGS):
        logprobs, old_logprobs, ref_logprobs, sampler_logprobs, advantages, mask = random_inputs(seed)
        aggregation, objective = LOSS_TYPES[loss_type]
        epsilon_low, epsilon_high = 0.2, 0.28
        old = None if one_epoch else old_logprobs
        weights = None
        if correction != "none":
            pi_old = logprobs if one_epoch else old_logprobs
            weights, _ = importance_weights(pi_old, sampler_logprobs, mask, correction, cap=2.0)

        ours_logprobs = logprobs.clone().requires_grad_(True)
        ours, _ = grpo_loss(
            ours_logprobs, old, ref_logprobs, advantages, mask,
            LossOptions(
                epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta, aggregation=aggregation,
                importance_sampling_level=level, objective=objective,
                kl_estimator="k3_ratio" if bias_correction_kl else "k3", sampler_correction=correction,
                sampler_correction_cap=2.0,
            ),
            normaliser=step_normaliser(mask, aggregation, T), sampler_logprobs=sampler_logprobs,
        )  # fmt: skip
        (ours_grad,) = torch.autograd.grad(ours, ours_logprobs)

        trl_logprobs = logprobs.clone().requires_grad_(True)
        theirs = trl_loss(
            trl_logprobs, old, ref_logprobs, advantages, mask, loss_type=loss_type, level=level, beta=beta,
            epsilon_low=epsilon_low, epsilon_high=1 + epsilon_high if objective == "cispo" else epsilon_high,
            bias_correction_kl=bias_correction_kl, is_ratio=weights,
        )  # fmt: skip
        (trl_grad,) = torch.autograd.grad(theirs, trl_logprobs)
        worst = max(worst, abs(ours.item() - theirs.item()), (ours_grad - trl_grad).abs().max().item())
    # float64, each side a sum of <= 56 terms of size <= ~10 (weights <= 2 times log-probs <= 3,
    # plus k3): within sum_error(56, 56 * 10) of the exact value, so twice that apart (7e-12).
    # (Measured worst: printed with -s.)
    print(f"\nworst |ours - TRL| over {3 * len(CONFIGS)} configurations (loss and gradient): {worst:.1e}")
    assert worst < 2 * sum_error(56, 56 * 10.0, torch.float64)


# --- the options of issue 24, over micro-batch splits: TRL called once per micro-batch ---


def trl_step_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, splits, *, loss_type, level, beta,
                  epsilon_high, bias_correction_kl, sampling_logprobs, args, trainer):  # fmt: skip
    """The sum of TRL's _compute_loss over the micro-batches `splits` (row counts) of one optimizer step.

    As TRL's Trainer runs them: current_gradient_accumulation_steps = the number of micro-batches,
    steps_per_generation = the same (TRL's default: one generation batch per optimizer step), and
    num_items_in_batch = the step's completion tokens (what dapo, cispo and vespo divide by).
    """
    accelerator = SimpleNamespace(
        num_processes=1, reduce=lambda x, reduction="sum": x, gather=lambda x: x, gather_for_metrics=lambda x: x,
        sync_gradients=True,
    )
    total, start = 0.0, 0
    for size in splits:
        rows = slice(start, start + size)
        start += size

        def per_token_logps_and_entropies(model, *_, rows=rows, **__):
            return logprobs[rows], torch.zeros_like(logprobs[rows]), None

        stand_in = SimpleNamespace(
            _get_per_token_logps_and_entropies=per_token_logps_and_entropies, aux_loss_enabled=False,
            top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
            args=SimpleNamespace(use_bias_correction_kl=bias_correction_kl, delta=None, steps_per_generation=len(splits)),
            loss_type=loss_type, epsilon_low=0.2, epsilon_high=epsilon_high, use_vllm=False,
            vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
            current_gradient_accumulation_steps=len(splits), accelerator=accelerator, _entropy_bonus_enabled=False,
            _metrics=defaultdict(lambda: defaultdict(list)), max_completion_length=T,
            get_off_policy_mask=grpo_trainer.GRPOTrainer.get_off_policy_mask,
            get_gamma_weights=grpo_trainer.GRPOTrainer.get_gamma_weights,
        )  # fmt: skip
        vars(stand_in.args).update(args)
        vars(stand_in).update(trainer)
        n = size
        inputs = {
            "prompt_ids": torch.zeros(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
            "completion_ids": torch.zeros(n, T, dtype=torch.long), "completion_mask": mask[rows],
            "advantages": advantages[rows], "old_per_token_logps": None if old_logprobs is None else old_logprobs[rows],
            "ref_per_token_logps": ref_logprobs[rows], "num_items_in_batch": mask.sum(),
        }  # fmt: skip
        if sampling_logprobs is not None:
            inputs["sampling_per_token_logps"] = sampling_logprobs[rows]
        total = total + grpo_trainer.GRPOTrainer._compute_loss(stand_in, None, inputs)
    return total


def far_inputs(seed):
    """random_inputs with pi_old further from pi_theta (ratios e^{+-1.5} and beyond), so every bound acts."""
    logprobs, old_logprobs, ref_logprobs, sampler_logprobs, advantages, mask = random_inputs(seed)
    g = torch.Generator().manual_seed(100 + seed)
    old_logprobs = logprobs + 0.6 * torch.randn(R, T, generator=g, dtype=torch.float64)  # [R, T]
    sampler_logprobs = old_logprobs + 0.4 * torch.randn(R, T, generator=g, dtype=torch.float64)  # [R, T]
    return logprobs, old_logprobs, ref_logprobs, sampler_logprobs, advantages, mask


# name: (our --loss_type, our LossOptions fields, TRL's loss_type, TRL's args, TRL trainer attributes,
#        whether the sampler's log-probs are passed). TRL's defaults for the option's other knobs.
NEW_OPTIONS = {
    "delta-dapo": ("dapo", dict(delta=1.5), "dapo", dict(delta=1.5), {}, False),
    "delta-grpo": ("grpo", dict(delta=1.5), "grpo", dict(delta=1.5), {}, False),
    "opsm-old": ("dapo", dict(off_policy_mask_threshold=0.05), "dapo", {}, dict(off_policy_mask_threshold=0.05), False),
    "opsm-sampler": ("grpo", dict(off_policy_mask_threshold=0.05), "grpo", {}, dict(off_policy_mask_threshold=0.05), True),
    "bnpo": ("bnpo", {}, "bnpo", {}, {}, False),
    "luspo": ("luspo", {}, "luspo", {}, {}, False),
    "luspo-token": ("luspo", dict(importance_sampling_level="token"), "luspo", {}, {}, False),
    "sapo": ("sapo", {}, "sapo", dict(sapo_temperature_pos=1.0, sapo_temperature_neg=1.05), {}, False),
    "sapo-sequence-hot": (
        "sapo", dict(importance_sampling_level="sequence", sapo_temperature_pos=4.0, sapo_temperature_neg=0.5),
        "sapo", dict(sapo_temperature_pos=4.0, sapo_temperature_neg=0.5), {}, False,
    ),
    "vespo": ("vespo", {}, "vespo", dict(vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0), {}, False),
    "vespo-other": (
        "vespo", dict(vespo_k_pos=0.5, vespo_lambda_pos=1.0, vespo_k_neg=1.0, vespo_lambda_neg=0.25),
        "vespo", dict(vespo_k_pos=0.5, vespo_lambda_pos=1.0, vespo_k_neg=1.0, vespo_lambda_neg=0.25), {}, False,
    ),
    "delta-opsm-bnpo": (
        "bnpo", dict(delta=1.5, off_policy_mask_threshold=0.05), "bnpo", dict(delta=1.5),
        dict(off_policy_mask_threshold=0.05), True,
    ),
}
# TRL normalises these per micro-batch and divides by the number of micro-batches, which weighs
# each micro-batch equally: with unequal micro-batches that is not the step's mean over completions
# (ours: every completion of the step weighs the same, grpo/loss.py point 3). They agree on equal
# splits, so only those are compared for them.
PER_MICRO_BATCH_IN_TRL = ("grpo", "dr_grpo", "sapo", "luspo")
SPLITS = ((8,), (4, 4), (3, 5))


def test_the_issue_24_options_equal_trls_over_micro_batches_and_epochs():
    from grpo.objectives import LOSS_TYPES as OUR_LOSS_TYPES

    worst, compared, effect = 0.0, 0, defaultdict(float)
    grid = itertools.product(range(2), NEW_OPTIONS.items(), SPLITS, (True, False), (0.0, 0.04), (False, True))
    for seed, (name, (loss_type, fields, trl_type, trl_args, trl_trainer, with_sampler)), splits, one_epoch, beta, bias in grid:
        if trl_type in PER_MICRO_BATCH_IN_TRL and len(set(splits)) > 1:
            continue
        logprobs, old_logprobs, ref_logprobs, sampler_logprobs, advantages, mask = far_inputs(seed)
        old = None if one_epoch else old_logprobs
        sampler = sampler_logprobs if with_sampler else None
        preset = OUR_LOSS_TYPES[loss_type]
        options = LossOptions(**{
            **dict(epsilon_low=0.2, epsilon_high=0.28, beta=beta, kl_estimator="k3_ratio" if bias else "k3"),
            **preset, **fields,
        })  # fmt: skip
        ours_logprobs = logprobs.clone().requires_grad_(True)
        normaliser = sum(
            step_normaliser(part, options.aggregation, T) for part in mask.split(list(splits))
        )  # fmt: skip
        ours, start = 0.0, 0
        for size in splits:
            rows = slice(start, start + size)
            start += size
            loss, _ = grpo_loss(
                ours_logprobs[rows], None if old is None else old[rows], ref_logprobs[rows], advantages[rows],
                mask[rows], options, normaliser=max(normaliser, 1.0),
                sampler_logprobs=None if sampler is None else sampler[rows],
            )  # fmt: skip
            ours = ours + loss
        (ours_grad,) = torch.autograd.grad(ours, ours_logprobs)

        trl_logprobs = logprobs.clone().requires_grad_(True)
        theirs = trl_step_loss(
            trl_logprobs, old, ref_logprobs, advantages, mask, splits, loss_type=trl_type, level=options.importance_sampling_level,
            beta=beta, epsilon_high=0.28, bias_correction_kl=bias, sampling_logprobs=sampler, args=trl_args, trainer=trl_trainer,
        )  # fmt: skip
        (trl_grad,) = torch.autograd.grad(theirs, trl_logprobs)
        error = max(abs(ours.item() - theirs.item()), (ours_grad - trl_grad).abs().max().item())
        # The option must act on these inputs, or the comparison would not test it: the loss
        # without it (its fields back to their defaults; a new --loss_type replaced by grpo) differs.
        plain = LossOptions(**{**vars(options), **{key: DEFAULTS[key] for key in (*fields, *preset)}})
        plain_normaliser = max(step_normaliser(mask, plain.aggregation, T), 1.0)
        without = sum(
            grpo_loss(logprobs[rows], None if old is None else old[rows], ref_logprobs[rows], advantages[rows],
                      mask[rows], plain, normaliser=plain_normaliser)[0].item()
            for rows in _rows(splits)
        )  # fmt: skip
        effect[name] = max(effect[name], abs(without - ours.item()))
        assert error < BOUND, f"{name} splits={splits} one_epoch={one_epoch} beta={beta} bias={bias}: {error:.1e}"
        worst, compared = max(worst, error), compared + 1
    print(f"\nworst |ours - TRL| over {compared} configurations of the issue 24 options: {worst:.1e}")
    assert all(effect[name] > 1e-3 for name in NEW_OPTIONS), dict(effect)


DEFAULTS = vars(LossOptions())


def _rows(splits):
    starts = list(itertools.accumulate(splits, initial=0))
    return [slice(a, b) for a, b in itertools.pairwise(starts)]


# float64, each side a sum of <= 56 terms of size <= ~60 (|A| <= 3 times ratios up to e^{2.5} unclipped
# below for A < 0, or log-probs <= 3; k3 of log-ratios <= 1.5 times such a ratio): within
# sum_error(56, 56 * 60) of the exact value, so twice that apart.
BOUND = 2 * sum_error(56, 56 * 60.0, torch.float64)


def test_the_new_flags_defaults_are_trls():
    from dataclasses import fields

    from trl import GRPOConfig

    from grpo.config import GRPOArguments

    trl_defaults = {f.name: f.default for f in fields(GRPOConfig)}
    ours = GRPOArguments()
    same_name = ("delta", "off_policy_mask_threshold", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
                 "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")  # fmt: skip
    renamed = {"sampler_correction_min": "vllm_importance_sampling_clip_min",
               "sampler_correction_cap": "vllm_importance_sampling_clip_max"}  # fmt: skip
    for name, trl_name in {**{n: n for n in same_name}, **renamed}.items():
        assert getattr(ours, name) == trl_defaults[trl_name], name
