"""grpo/minimal.py: the one-file GRPO computes the production step's loss and gradients, and learns.

1. One generation batch (the same prompts, sampled completions and rewards) through both the
   minimal file and the production update (`production_step`, the one adapter to re-point when
   grpo/grpo_loop.py changes), at the trainer's default flags (GRPOArguments()), in float64: the
   losses and every parameter's gradient agree within tolerances.network_error (two computation
   orders of one network: the minimal file runs each row as [prompt ; completion], production each
   prompt once with its KV cache copied to its rows, per --micro_batch_size rows). Also with
   num_iterations = 2 (a second inner epoch: the policy has moved since the old logprobs, so
   ratios leave 1 and some are clipped) and with beta = 0 (no reference).
2. The minimal loop learns: on the tiny preset, rewarded by `learning_rewards:digit_fraction`
   (tests/learning_rewards.py, as tests/test_learning.py), its mean reward goes from below 0.3 to
   above 0.9 within 20 steps on seeds 0, 1 and 2; with the advantages' sign flipped it does not.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_minimal.py -q
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tolerances import TINY_PATH_TERMS, network_error, sum_error

from data.collators import GRPOCollator
from data.synthetic import make_counting_dataset
from grpo import minimal
from grpo.config import GRPOArguments
from grpo.engine.forward import GenerationBatch
from grpo.engine.hf_compat import image_token_id_of, spatial_merge_size_of
from grpo.engine.inputs import count_images_per_prompt, encode_images
from grpo.grpo_loop import accumulate_step_gradients, frozen_logprobs, generation_advantages
from grpo.masks import completion_mask, mask_truncated
from models.loading import load_policy, make_reference, special_token_ids

B, G, T = 2, 4, 6
# Rewards with a spread in both groups (float32, as grpo/rewards.py returns them).
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.5, 1.0, 1.0])  # [B*G]


def production_step(model, reference, batch, completion_ids, rewards, gargs: GRPOArguments, eos, move_policy):
    """train_grpo's update of one generation batch, called as grpo/grpo_loop.py calls it; returns
    (loss, {name: grad}). The one place this file touches the production path: re-point it here.

    move_policy(model) runs after the old and reference logprobs, before the update (the policy
    of a later step or inner epoch)."""
    model.eval()
    with torch.no_grad():  # what the rollout hands over: each prompt's image features
        image_embeds = encode_images(model, batch["pixel_values"], batch["image_grid_thw"])  # [N, D]
    mask, is_truncated = completion_mask(completion_ids, eos)  # [B*G, T], [B*G]
    loss_mask = mask_truncated(mask, is_truncated) if gargs.mask_truncated_completions else mask
    merge = spatial_merge_size_of(model)
    generation = GenerationBatch(
        prompt_ids=batch["input_ids"], prompt_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        images_per_prompt=count_images_per_prompt(
            batch["input_ids"], batch["image_grid_thw"], image_token_id=image_token_id_of(model), spatial_merge_size=merge
        ),
        completion_ids=completion_ids, completion_mask=mask, rollout_image_embeds=image_embeds, group_size=G,
        temperature=gargs.temperature, spatial_merge_size=merge, shared_prompt=gargs.shared_prompt_forward,
    )  # fmt: skip
    advantages, _ = generation_advantages(rewards, G, gargs.advantage_scale, world_size=1)  # [B*G]
    reuse_images = False  # the default --freeze_policy full trains the vision tower
    micro = gargs.micro_batch_size
    old = frozen_logprobs(model, generation, micro_batch_size=micro, reuse_images=True) if gargs.num_iterations > 1 else None
    ref = frozen_logprobs(reference, generation, micro_batch_size=micro, reuse_images=reuse_images) if gargs.beta > 0 else None
    move_policy(model)
    model.train()
    model.zero_grad()
    sums = accumulate_step_gradients(
        model, generation, torch.arange(B * G), advantages=advantages, loss_mask=loss_mask, old_logprobs=old,
        ref_logprobs=ref, gargs=gargs, reuse_images=reuse_images, world_size=1,
    )  # fmt: skip
    return sums.loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, sums


def minimal_step(model, reference, batch, completion_ids, rewards, hp: minimal.Hyper, eos, move_policy):
    """grpo/minimal.py's steps 2-6 on the same generation batch, in its loop's order; returns
    (loss, {name: grad}, the tensors the bound is derived from)."""
    mask = minimal.completion_mask(completion_ids, eos)  # [B*G, T]
    A = minimal.group_advantages(rewards, hp.G, hp.std_eps)  # [B*G]
    model.eval()
    with torch.no_grad():
        old = minimal.completion_logprobs(model, batch, completion_ids, hp) if hp.num_iterations > 1 else None
        ref = minimal.completion_logprobs(reference, batch, completion_ids, hp) if hp.beta > 0 else None
    move_policy(model)
    model.train()
    model.zero_grad()
    logprobs = minimal.completion_logprobs(model, batch, completion_ids, hp)  # [B*G, T]
    loss = minimal.grpo_loss(logprobs, old, ref, A, mask, hp)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, dict(logprobs=logprobs.detach(), old=old, ref=ref, A=A, mask=mask)


def _moved(seed: int, scale: float):
    """A deterministic move of every weight by scale * N(0, 1), the same for both paths."""

    @torch.no_grad()
    def move(model):
        generator = torch.Generator().manual_seed(seed)
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))

    return move


@pytest.fixture(scope="module")
def generation():
    """The tiny preset in float64, two synthetic prompts, and G = 4 completions of each drawn by the
    minimal sampler; row 1 is cut at an EOS at step 2, so the mask matters."""
    from tolerances import float64_throughout

    with float64_throughout():
        model, processor = load_policy("tiny", dtype=torch.float64, seed=0)
        eos = torch.tensor(special_token_ids(model, processor).eos_token_ids)  # [E]
        scenes = make_counting_dataset(B, seed=0, image_size=56, layout="grid")
        batch = GRPOCollator(processor, system_prompt=None)([scenes[i] for i in range(B)])
        hp = minimal.Hyper(B=B, G=G, max_completion_length=T)
        completion_ids = minimal.sample_completions(
            model, batch, hp, eos, special_token_ids(model, processor).pad_token_id, torch.Generator().manual_seed(0)
        )  # [B*G, <= T]
    completion_ids[1, 2], completion_ids[1, 3:] = eos[0], special_token_ids(model, processor).pad_token_id
    return model, batch, completion_ids, eos


@pytest.mark.parametrize(
    ("flags", "move_before", "move_after"),
    [
        # defaults (mu = 1, beta = 0.04): the policy has moved off the reference in earlier steps
        ({}, 0.02, 0.0),
        # mu = 2: the second inner epoch, the policy moved since its old logprobs (ratio != 1, clipping)
        ({"num_iterations": 2}, 0.02, 0.02),
        # beta = 0: no reference model, no KL term
        ({"beta": 0.0}, 0.02, 0.0),
    ],
    ids=["defaults", "num_iterations_2", "beta_0"],
)
def test_minimal_loss_and_gradients_equal_the_production_step(generation, float64_hf, flags, move_before, move_after):
    base, batch, completion_ids, eos = generation
    gargs = dataclasses.replace(GRPOArguments(), per_device_prompts=B, num_generations=G, **flags)
    hp = minimal.Hyper(
        B=B, G=G, temperature=gargs.temperature, num_iterations=gargs.num_iterations, epsilon=gargs.epsilon,
        beta=gargs.beta,
    )  # fmt: skip
    assert gargs.epsilon_high == gargs.epsilon and gargs.loss_aggregation == "sequence"  # what the minimal file has
    reference = make_reference(base)  # the starting point
    policy = copy.deepcopy(base)
    _moved(1, move_before)(policy)  # the policy of a later step

    got_loss, got_grads, parts = minimal_step(
        copy.deepcopy(policy), reference, batch, completion_ids, REWARDS, hp, eos, _moved(2, move_after)
    )  # fmt: skip
    expected_loss, expected_grads, sums = production_step(
        copy.deepcopy(policy), reference, batch, completion_ids, REWARDS, gargs, eos, _moved(2, move_after)
    )  # fmt: skip

    # The comparison means something: gradients flow everywhere, the KL and the clipping are live.
    assert got_grads.keys() == expected_grads.keys() and any("visual" in name for name in got_grads)
    if gargs.beta > 0:
        assert sums.kl / sums.tokens > 1e-4
    if gargs.num_iterations > 1:
        assert sums.clip_low + sums.clip_high > 0

    # Loss: each logprob is two evaluation orders of the network apart, at most delta; a token's
    # loss moves by its sensitivity to log pi times delta: |A| * ratio (surrogate) + beta * |e^x - 1|
    # (k3, x = log pi_ref - log pi). Plus the two float64 sums (per micro-batch or all at once).
    logprobs, mask = parts["logprobs"], parts["mask"]
    old = logprobs if parts["old"] is None else parts["old"]
    delta = network_error(TINY_PATH_TERMS, logprobs[mask > 0].abs().max().item())
    ratio = torch.exp((logprobs - old)[mask > 0]).max().item()
    kl_slope = 0.0 if parts["ref"] is None else torch.expm1(parts["ref"] - logprobs)[mask > 0].abs().max().item()
    sensitivity = parts["A"].abs().max().item() * ratio + hp.beta * kl_slope
    # The summed per-token losses: each <= sensitivity * |log pi| + beta * k3 in size; <= 100 when |log pi| <= ~10.
    bound = 2 * delta * sensitivity + 2 * sum_error(mask.numel(), mask.sum().item() * 100.0, torch.float64)
    assert got_loss == pytest.approx(expected_loss, rel=0, abs=bound), (got_loss, expected_loss, bound)

    # Gradients: sum over tokens of the (same) per-token weights times grad log pi; the backward
    # doubles the path (2 x TINY_PATH_TERMS), bound at each parameter's gradient size (as test_forward.py).
    for name, grad in expected_grads.items():
        atol = network_error(2 * TINY_PATH_TERMS, grad.abs().max().item())
        torch.testing.assert_close(got_grads[name], grad, atol=atol, rtol=0, msg=name)

    # The bounds catch a wrong term. The loss with a doubled beta lands far outside its bound (with
    # beta = 0 and mu = 1 the loss is 0 in value: the advantages of a group sum to 0)...
    if hp.beta > 0:
        wrong = dataclasses.replace(hp, beta=2 * hp.beta)
        wrong_loss = minimal.grpo_loss(logprobs, parts["old"], parts["ref"], parts["A"], mask, wrong).item()
        assert abs(wrong_loss - expected_loss) > 100 * bound
    # ...and the gradients with the rewards negated (every A flipped) far outside theirs.
    _, flipped_grads, _ = minimal_step(
        copy.deepcopy(policy), reference, batch, completion_ids, -REWARDS, hp, eos, _moved(2, move_after)
    )  # fmt: skip
    assert any(
        (flipped_grads[name] - grad).abs().max() > 100 * network_error(2 * TINY_PATH_TERMS, grad.abs().max().item())
        for name, grad in expected_grads.items()
    )


# --- the minimal loop learns ---

LEARNING = dict(
    init_from="tiny", steps=20, B=2, G=4, max_completion_length=4, learning_rate=2e-2, beta=0.0, image_size=56,
    num_prompts=64, reward_functions="learning_rewards:digit_fraction",
)  # fmt: skip


@pytest.mark.parametrize(
    ("sign", "seed"), [(1, 0), (1, 1), (1, 2), (-1, 0)], ids=["seed0", "seed1", "seed2", "flipped-seed0"]
)
def test_minimal_loop_learns_a_rare_reward_and_not_with_flipped_advantages(monkeypatch, sign, seed):
    group_advantages = minimal.group_advantages
    monkeypatch.setattr(minimal, "group_advantages", lambda rewards, G, eps: sign * group_advantages(rewards, G, eps))
    rewards = minimal.train(minimal.Hyper(**LEARNING, seed=seed), log=lambda line: None)  # one mean per step
    assert len(rewards) == LEARNING["steps"]
    # The untrained policy almost never writes a digit...
    assert rewards[0] < 0.3, rewards
    # ...and within 20 steps it writes (almost) only digits (the last 3 steps' mean above 0.9), unless
    # the advantages push it the wrong way.
    learned = sum(rewards[-3:]) / 3 > 0.9
    assert learned == (sign > 0), rewards


def test_an_init_from_that_is_not_a_qwen2_5_vl_exits_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')  # a text LM: a traceback in the loader
    with pytest.raises(SystemExit) as exit_info:
        minimal.parse_args(["--init_from", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"--init_from {tmp_path}: its config.json has model_type 'qwen2', but this trainer expects a Qwen2.5-VL" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--init_from", "no/such/run"], "--init_from"), (["--G", "1"], "--G"), (["--temperature", "0"], "--temperature"),
        # Each of these was a traceback once the model had loaded (or, --temperature nan, in the sampler).
        (["--temperature", "nan"], "--temperature nan"), (["--learning_rate", "nan"], "--learning_rate nan"),
        (["--beta", "inf"], "--beta inf"), (["--reward_weights", "a,b"], "--reward_weights 'a,b'"),
        (["--reward_weights", "1"], "--reward_weights has 1 values but --reward_functions names 2 functions"),
        (["--reward_functions", "no_such_module:f"], "cannot import module 'no_such_module'"),
        (["--dtype", "int8"], "--dtype 'int8'"), (["--num_prompts", "0"], "--num_prompts 0"),
    ],
)  # fmt: skip
def test_bad_command_line_exits_2_naming_the_flag(capsys, argv, names):
    with pytest.raises(SystemExit) as exit_info:
        minimal.parse_args(["--init_from", "tiny", *argv])  # argparse keeps the last --init_from
    assert exit_info.value.code == 2
    assert names in capsys.readouterr().err
