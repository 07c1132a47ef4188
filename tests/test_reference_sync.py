"""Tests for --sync_ref_model (TR-DPO, arXiv 2404.09656): grpo/reference_sync.py, grpo/runtime/reference_sync.py.

The worked example (also in docs/grpo.md): alpha = 0.25, a reference weight [1.0, -2.0] and the
policy's [3.0, 2.0]:

    ref <- 0.25 * [3.0, 2.0] + 0.75 * [1.0, -2.0] = [0.75 + 0.75, 0.5 - 1.5] = [1.5, -1.0]

(every product and sum is exact in binary floating point). With tau = 3 the reference moves after
optimizer steps 3, 6, 9, ...
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import read_metrics, without_timings
from tolerances import UNIT_ROUNDOFF

from grpo.reference_sync import is_sync_step, mix_toward
from grpo.runtime.reference_sync import (
    reference_state,
    restore_reference,
    sync_reference,
    trained_weights,
)

U64 = UNIT_ROUNDOFF[torch.float64]


def test_mix_moves_the_reference_alpha_of_the_way():
    reference = torch.tensor([1.0, -2.0])
    mix_toward(reference, torch.tensor([3.0, 2.0]), 0.25)
    assert reference.tolist() == [1.5, -1.0]  # the docstring's arithmetic, exact
    hard = torch.tensor([1.0, -2.0])
    mix_toward(hard, torch.tensor([3.0, 2.0]), 1.0)  # alpha = 1: the paper's hard update
    assert hard.tolist() == [3.0, 2.0]


def test_bfloat16_reference_is_mixed_in_float32_and_rounded_once():
    # 0.6 * 1.0078125 + 0.4 * 1.0 = 1.0046875: in float32, then rounded once to bfloat16's grid
    # (spacing 2^-7 = 0.0078125 near 1): 1.0046875 is nearer 1.0078125 (gap 0.003125) than 1.0
    # (0.0046875), so 1.0078125.
    reference = torch.tensor([1.0], dtype=torch.bfloat16)
    mix_toward(reference, torch.tensor([1.0078125], dtype=torch.bfloat16), 0.6)
    assert reference.item() == 1.0078125


def test_sync_steps_are_the_multiples_of_tau():
    assert [step for step in range(1, 10) if is_sync_step(step, 3)] == [3, 6, 9]
    assert all(is_sync_step(step, 1) for step in range(1, 5))


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(3, 4)
        self.second = torch.nn.Linear(4, 2)


def _policy_pair(seed: int):
    torch.manual_seed(seed)
    reference = _TwoLayers().double()
    model = copy.deepcopy(reference)
    with torch.no_grad():  # the policy trained away from the reference
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    for param in reference.parameters():
        param.requires_grad_(False)
    return SimpleNamespace(model=model, reference=reference)


def test_sync_equals_trls_callback_in_float64(monkeypatch):
    """TRL's SyncRefModelCallback (its step test and its mix) against ours, over 6 steps, tau = 2."""
    callbacks = pytest.importorskip("trl.trainer.callbacks", reason="TRL is the oracle here (pip install -e '.[dev]')")
    ours, theirs = _policy_pair(0), _policy_pair(0)
    # sync_target_model asks accelerate for DeepSpeed's state (needs an Accelerator); the plain path
    # is _sync_target_model, so route to it and keep TRL's own on_step_end deciding when.
    monkeypatch.setattr(callbacks.SyncRefModelCallback, "sync_target_model", staticmethod(
        callbacks.SyncRefModelCallback._sync_target_model))  # fmt: skip
    callback = callbacks.SyncRefModelCallback(ref_model=theirs.reference, accelerator=None)
    args = SimpleNamespace(ref_model_sync_steps=2, ref_model_mixup_alpha=0.6)
    for step in range(1, 7):
        for policy in (ours, theirs):  # the same "optimizer step" on both policies
            torch.manual_seed(step)
            with torch.no_grad():
                for param in policy.model.parameters():
                    param.add_(0.1 * torch.randn_like(param))
        if is_sync_step(step, 2):
            sync_reference(ours, 0.6)
        callback.on_step_end(args, SimpleNamespace(global_step=step), None, model=theirs.model)
        for (name, got), expected in zip(ours.reference.named_parameters(), theirs.reference.parameters(), strict=True):
            # Each mix is 2 products and a sum of values <= ~5 (TRL in place, ours into a new
            # tensor): <= 3 roundings of 2^-53 relative each per mix, 3 mixes so far at most.
            bound = 3 * 3 * U64 * 5.0
            assert (got - expected).abs().max() <= bound, (step, name)
    assert not torch.equal(ours.reference.first.weight, _policy_pair(0).reference.first.weight)  # it moved


def test_only_trained_weights_move():
    pair = _policy_pair(1)
    pair.model.first.requires_grad_(False)  # a frozen layer: equal in both models in a real run
    frozen_before = pair.reference.first.weight.clone()
    second_before = pair.reference.second.weight.clone()
    assert sorted(trained_weights(pair.model)) == ["second.bias", "second.weight"]
    assert sync_reference(pair, 0.5) == 2
    assert torch.equal(pair.reference.first.weight, frozen_before)
    expected = 0.5 * pair.model.second.weight.detach() + 0.5 * second_before
    assert (pair.reference.second.weight - expected).abs().max() <= 3 * U64 * 5.0


def test_lora_policy_mixes_its_merged_weights_into_the_plain_reference():
    """LoRA: W_policy = W + (alpha / r) B A; the reference's plain W moves toward it."""
    from models.lora import LoRALinear

    torch.manual_seed(2)
    reference = _TwoLayers().double().requires_grad_(False)
    model = copy.deepcopy(reference)
    model.first = LoRALinear(model.first, r=2, alpha=4.0)  # scale 2
    with torch.no_grad():
        model.first.lora_B.fill_(0.5)  # a non-zero update (B starts at 0)
    pair = SimpleNamespace(model=model, reference=reference)
    merged = model.first.merged_weight().detach()  # [4, 3]
    assert not torch.equal(merged, reference.first.weight)
    assert sorted(trained_weights(model)) == ["first.weight"]  # the base bias and `second` are frozen
    start = reference.first.weight.clone()
    sync_reference(pair, 0.25)
    expected = 0.25 * merged + 0.75 * start  # [4, 3]
    assert (reference.first.weight - expected).abs().max() <= 3 * U64 * float(merged.abs().max() + start.abs().max())
    # The checkpoint's state holds that tensor under the reference's name, and puts it back.
    state = reference_state(pair)
    assert list(state) == ["first.weight"] and torch.equal(state["first.weight"], reference.first.weight)
    fresh = SimpleNamespace(model=model, reference=_TwoLayers().double().requires_grad_(False))
    restore_reference(fresh, state)
    assert torch.equal(fresh.reference.first.weight, reference.first.weight)
    with pytest.raises(ValueError, match="synced reference does not fit this model"):
        restore_reference(fresh, {"third.weight": torch.zeros(1)})


# --- end to end (tiny preset) ---


def test_run_moves_its_reference_on_the_sync_steps(train_run, tmp_path):
    """alpha = 1 and tau = 2: after steps 2 and 4 the reference IS the policy, so the KL of the
    next step is the KL between two copies of one model: 0 up to the forward's rounding."""
    flags = ["--max_steps", "4", "--save_steps", "0", "--beta", "0.04", "--learning_rate", "1e-2"]
    plain = read_metrics(train_run(tmp_path / "plain", *flags))
    synced = read_metrics(train_run(
        tmp_path / "synced", *flags, "--sync_ref_model", "true", "--ref_model_mixup_alpha", "1", "--ref_model_sync_steps", "2"
    ))  # fmt: skip
    assert [r["ref_model_synced"] for r in synced] == [0.0, 1.0, 0.0, 1.0]
    assert "ref_model_synced" not in plain[0]
    # Steps 1-2 see the starting point in both runs: the same floats.
    assert [without_timings(r) for r in synced[:2]] == [
        without_timings(r) | {"ref_model_synced": s} for r, s in zip(plain[:2], (0.0, 1.0), strict=True)
    ]
    # Step 3's reference is step 2's policy, which is also step 3's policy before its update: KL ~ 0,
    # where the plain run's reference is two updates behind.
    assert plain[2]["kl"] > 1e3 * synced[2]["kl"]


def test_sync_ref_model_needs_a_reference_and_sane_alpha_and_tau():
    from grpo.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"--sync_ref_model moves the KL reference, but --beta 0"):
        parse_config(["--sync_ref_model", "true", "--beta", "0"])
    with pytest.raises(ConfigError, match=r"--ref_model_mixup_alpha 0.0: must be in \(0, 1\]"):
        parse_config(["--ref_model_mixup_alpha", "0"])
    with pytest.raises(ConfigError, match=r"--ref_model_mixup_alpha 1.5"):
        parse_config(["--ref_model_mixup_alpha", "1.5"])
    with pytest.raises(ConfigError, match=r"--ref_model_sync_steps 0: must be >= 1"):
        parse_config(["--ref_model_sync_steps", "0"])
    defaults = parse_config([]).grpo  # TRL's defaults
    assert (defaults.sync_ref_model, defaults.ref_model_mixup_alpha, defaults.ref_model_sync_steps) == (False, 0.6, 512)


def test_fsdp_sync_in_one_process_repeats_the_replicated_run_and_resumes(train_run, tmp_path):
    """--fsdp: each rank mixes its DTensor slices, and the checkpoint gathers them. In one process
    (a one-rank group) the shard is the whole tensor, so the sharded run must give the replicated
    run's floats (as tests/test_fsdp.py shows for the plain run), through a resume too."""
    flags = ["--save_steps", "2", "--beta", "0.04", "--learning_rate", "1e-2", "--sync_ref_model", "true",
             "--ref_model_sync_steps", "1", "--ref_model_mixup_alpha", "0.5"]  # fmt: skip
    replicated = train_run(tmp_path / "replicated", "--max_steps", "3", *flags)
    sharded = train_run(tmp_path / "fsdp", "--max_steps", "2", "--fsdp", "true", *flags)
    train_run(sharded, "--max_steps", "3", "--fsdp", "true", "--resume", *flags)
    expected = [without_timings(r) for r in read_metrics(replicated)]
    assert [without_timings(r) for r in read_metrics(sharded)] == expected
    assert expected[2]["kl"] > 0 and expected[2]["ref_model_synced"] == 1.0
    states = [torch.load(next(run.glob("checkpoint-*3")) / "trainer_state.pt", weights_only=True) for run in (replicated, sharded)]
    saved = [state["extra"]["synced_reference"] for state in states]
    assert saved[0].keys() == saved[1].keys() and len(saved[0]) > 0
    for name, tensor in saved[0].items():
        assert torch.equal(saved[1][name], tensor), name


@pytest.mark.slow
def test_torchrun_two_ranks_with_sync_and_adaptive_entropy_replicated_and_fsdp(tmp_path):
    """The real command on 2 ranks with both options that carry state across steps, replicated and
    --fsdp, through a resume: the replicated ranks stay in step (identical weights), the reference moves on
    the sync steps, the coefficient climbs, and the sharded run agrees with the replicated one up
    to float64 rounding (tests/test_fsdp.py's bound)."""
    from test_fsdp import _assert_close_runs, _torchrun

    flags = ["--beta", "0.04", "--save_steps", "2", "--sync_ref_model", "true", "--ref_model_sync_steps", "2",
             "--use_adaptive_entropy", "true", "--entropy_coef", "0.01", "--entropy_target", "100"]  # fmt: skip
    replicated = _torchrun(tmp_path / "replicated", "--max_steps", "4", *flags, stage="grpo")
    sharded = _torchrun(tmp_path / "fsdp", "--max_steps", "2", "--fsdp", "true", *flags, stage="grpo")
    _torchrun(sharded, "--max_steps", "4", "--fsdp", "true", "--resume", *flags, stage="grpo")
    records = read_metrics(replicated)
    assert [r["ref_model_synced"] for r in records] == [0.0, 1.0, 0.0, 1.0]
    assert [r["entropy_coef_applied"] for r in records] == pytest.approx([0.0, 0.015, 0.02, 0.025], rel=0, abs=1e-15)
    # The replicated ranks hold identical weights (the --fsdp ranks hold different shards by design).
    fingerprints = [torch.load(replicated / f"fingerprint-rank{r}.pt", weights_only=True) for r in range(2)]
    for name in fingerprints[0]:
        assert torch.equal(fingerprints[0][name], fingerprints[1][name]), name
    _assert_close_runs(sharded, replicated)
