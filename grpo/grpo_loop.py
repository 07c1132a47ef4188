"""The GRPO training loop, flat and top to bottom (DeepSeekMath, arXiv 2402.03300, Algorithm 1).

    torchrun --nproc_per_node 2 train.py --stage grpo --init_from runs/sft --max_steps 100

The production loop: the algorithm of grpo/minimal.py with every rank, option and checkpoint
around it. `train_grpo` comes first and reads as the algorithm, one banner section per step (rollout,
rewards and advantages, old and reference logprobs, policy update, checkpoint); its helpers follow
in the order it calls them. Where to start reading: README.md, "Where to start"; the files one
step crosses: docs/architecture.md, "One GRPO step, file by file".

Where this departs from the paper, and why:
    1. The paper's "iterative GRPO" refreshes the reference model; here the reference stays the
       stage's starting point (as in TRL and the blog post), unless --sync_ref_model moves it
       toward the policy every --ref_model_sync_steps steps (grpo/reference_sync.py).
    2. With num_iterations == 1 no old-policy forward runs: old_logprobs = logprobs.detach(), so
       the ratio is 1 and its gradient is ∇logp (grpo/loss.py explains the trick).
    3. The loss's logprobs come from logits / temperature, the distribution the rollout sampled
       from; top-p / top-k truncation is ignored in the loss (as in TRL).
    4. All G completions of a prompt live on one rank, so group advantages need no communication
       (--advantage_scale batch gathers every rank's rewards for its one std); the loss normaliser
       (token or completion count) and the gradients are all-reduced.
"""

from __future__ import annotations

import time

import torch

from data.collators import GRPOCollator
from data.index_stream import IndexStream
from data.loading import load_prompt_dataset
from grpo.advantages import group_advantages
from grpo.config import Config, GRPOArguments
from grpo.dynamic_sampling import sample_generation_batch
from grpo.engine.forward import GenerationBatch
from grpo.engine.rollout import SampledGroups, in_eval_mode, sample_rollouts
from grpo.entropy_bonus import entropy_bonus
from grpo.loss import grpo_loss, step_normaliser
from grpo.masks import completion_mask as completion_mask_of
from grpo.masks import mask_truncated
from grpo.rewards import compute_rewards, example_columns, resolve_reward_functions
from grpo.runtime.across_steps import AcrossSteps
from grpo.runtime.distributed import all_gather_object, all_reduce_sum
from grpo.runtime.metrics import StepSums, rollout_metrics
from grpo.runtime.preflight import grpo_preflight
from grpo.runtime.run import StopRequest, TrainingRun, start_run
from grpo.token_selection import entropy_threshold, high_entropy_mask


def train_grpo(config: Config) -> dict:
    targs, gargs = config.train, config.grpo
    G, micro = gargs.num_generations, gargs.micro_batch_size

    # --- ranks, run directory, policy (+ frozen reference when beta > 0), AdamW (grpo/runtime/run.py) ---
    run = start_run(config, "grpo", with_reference=gargs.beta > 0)
    world_size, device, policy, model = run.dist.world_size, run.dist.device, run.policy, run.policy.model
    merge_size = model.config.vision_config.spatial_merge_size
    rounds = RolloutRounds(config, run)  # this rank's prompts, the reward functions, the sampler's stream
    # The rollout encoded each prompt's images once; whenever the vision tower cannot change
    # (frozen) every later forward reuses those features instead of re-encoding.
    reuse_images = gargs.reuse_frozen_image_features and not policy.vision_trainable

    # --- resume, preflight, logs ---
    state = run.resume(rounds.stream)
    step = last_saved = state["step"]
    rounds.restore(state, run.dist.rank)
    if not targs.skip_preflight:  # one micro-batch at the longest prompt, before step 1 (grpo/runtime/preflight.py)
        grpo_preflight(
            model, rounds.dataset, rounds.collator, gargs=gargs, tokens=policy.tokens, device=device,
            world_size=world_size, merge_size=merge_size, step_gradients=accumulate_step_gradients, is_main=run.is_main,
        )  # fmt: skip
    run.open_logs(step, sample_log_steps=gargs.sample_log_steps)  # metrics.jsonl, samples.log, --report_to, progress
    # --use_adaptive_entropy's coefficient and --sync_ref_model's reference (off by default: no-ops)
    across_steps = AcrossSteps(gargs, policy, state["extra"])

    def save(at_step):
        run.save(at_step, rounds.stream, extra=rounds.checkpoint_extra() | across_steps.checkpoint_extra())

    # `with`: the signal handlers are put back even when the loop raises (e.g. after too many
    # non-finite steps), so an in-process caller (tests, a notebook) keeps its Ctrl-C.
    with StopRequest() as stop:
        while step < targs.max_steps and not stop.requested_on_any_rank():
            # --- rollout (with --dynamic_sampling: more rounds until B groups with a reward spread) ---
            rounds.seconds.clear()
            if not gargs.dynamic_sampling:
                sampled, sampling_metrics = rounds(), {}  # one round: B prompts, G completions each, scored
            else:  # DAPO (grpo/dynamic_sampling.py)
                sampled, sampling_metrics = sample_generation_batch(
                    rounds, enabled=True, needed=gargs.per_device_prompts, group_size=G,
                    max_rounds=gargs.max_generation_rounds, collate=rounds.collator, device=device,
                    pad_token_id=policy.tokens.pad_token_id,
                    merge_size=merge_size,
                )  # fmt: skip
            rollout, rollout_seconds = sampled.rollout, sum(rounds.seconds)

            # --- rewards (scored by RolloutRounds) and advantages ---
            advantages, _ = generation_advantages(sampled.rewards, G, gargs.advantage_scale, world_size)  # [B*G]
            advantages = advantages.to(device)
            # --- masks: the tokens through each completion's first EOS (never ids != pad: pad may be EOS) ---
            # computed once per generation batch, by RolloutRounds (or merge_groups), with grpo.masks.completion_mask
            completion_mask, is_truncated = sampled.completion_mask, sampled.is_truncated  # [B*G, T], [B*G]
            loss_mask = mask_truncated(completion_mask, is_truncated) if gargs.mask_truncated_completions else completion_mask
            generation = generation_inputs(sampled, completion_mask, gargs, merge_size)  # shared by every forward
            generation_metrics = rollout_metrics(
                sampled.per_function, sampled.rewards, rounds.reward_names, advantages, completion_mask, is_truncated,
                G, world_size,
            ) | sampling_metrics | {  # fmt: skip
                "rollout_seconds": rollout_seconds,
                # this rank's sampler throughput (each rank samples in parallel)
                "rollout_tokens_per_second": float(completion_mask.sum()) / max(rollout_seconds, 1e-9),
                "skipped_images": rounds.data_report.skipped_images,
                "skipped_long_prompts": rounds.data_report.skipped_long_prompts,  # over --max_prompt_length
            }

            # --- old and reference logprobs, no grad (only when they are needed) ---
            t_update = time.perf_counter()
            old_logprobs = ref_logprobs = None
            if gargs.num_iterations > 1 and gargs.old_logprobs_from_sampler:
                # log pi_old of each drawn token, recorded by the sampler (0 after EOS, masked anyway).
                old_logprobs = rollout.sampler_logprobs.to(device)  # [B*G, T]
            elif gargs.num_iterations > 1:  # the policy has not moved since the rollout: its image features are exact
                old_logprobs = frozen_logprobs(model, generation, micro_batch_size=micro, reuse_images=True)
            if gargs.beta > 0:
                ref_logprobs = frozen_logprobs(policy.reference, generation, micro_batch_size=micro, reuse_images=reuse_images)

            # --- policy update: num_iterations epochs x steps_per_generation optimizer steps ---
            model.train()
            num_rows = rollout.completion_ids.shape[0]
            mini_batches = torch.arange(num_rows).split(num_rows // gargs.steps_per_generation)
            for mini_rows in [rows for _epoch in range(gargs.num_iterations) for rows in mini_batches]:
                entropy_coef = across_steps.entropy_coef()  # None without --entropy_coef
                sums = accumulate_step_gradients(
                    model, generation, mini_rows, advantages=advantages, loss_mask=loss_mask,
                    old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, gargs=gargs,
                    reuse_images=reuse_images, world_size=world_size, sampler_logprobs=rollout.sampler_logprobs,
                    entropy_coef=entropy_coef,
                )  # fmt: skip
                metrics = sums.means(world_size)  # one all-reduce (grpo/runtime/metrics.py)
                grad_norm = run.optimizer_step(step, metrics["loss"])  # ranks' average, clip, AdamW
                if grad_norm is None:
                    continue  # skipped: not finite (grpo/runtime/run.py, NonFiniteGuard)
                step += 1
                metrics |= across_steps.after_step(step, metrics, entropy_coef)  # adapt c; move the reference
                metrics |= {"grad_norm": float(grad_norm), "lr": run.scheduler.get_last_lr()[0],
                            "update_seconds": time.perf_counter() - t_update, **generation_metrics}  # fmt: skip
                run.log(step, metrics, reward=f"{metrics['reward/total/mean']:.3f}", kl=f"{metrics['kl']:.4f}")
                run.log_sample(step, **first_sample(sampled, rounds.reward_names))  # every --sample_log_steps
                if step >= targs.max_steps:
                    break

            # --- checkpoint (only between generation batches, so a resume starts a fresh one) ---
            # on the first batch end past each multiple of --save_steps, so a resumed run saves where the straight one does
            if targs.save_steps and step // targs.save_steps > last_saved // targs.save_steps and step < targs.max_steps:
                save(step)
                last_saved = step

        # --- the final save, still under the handlers: a signal now must not kill it (grpo/runtime/run.py) ---
        return run.finish(step, last_saved=last_saved, stop=stop, save=save)


class RolloutRounds:
    """One call, one round of the rollout: B prompts from the stream, G completions each, scored.

    Owns what the rounds draw from: this rank's prompts (dataset, collator, the index stream a
    checkpoint keeps), the reward functions and the sampler's generator (its own stream per rank,
    so ranks explore differently; a checkpoint keeps its state too). The loop calls it once per
    generation batch; with --dynamic_sampling, grpo/dynamic_sampling.py calls it until B groups carry
    a reward spread. `seconds` keeps each round's time (collate + sample) for the step's metrics.
    """

    def __init__(self, config: Config, run: TrainingRun):
        targs, gargs, rank = config.train, config.grpo, run.dist.rank
        self.model, self.processor, self.tokens, self.device = run.policy.model, run.policy.processor, run.policy.tokens, run.dist.device
        self.gargs = gargs
        self.dataset, self.data_report = load_prompt_dataset(config, self.processor, is_main=run.is_main)
        self.collator = GRPOCollator(self.processor, system_prompt=config.data.system_prompt_text)
        self.stream = IndexStream(len(self.dataset), seed=targs.seed, rank=rank, world_size=run.dist.world_size)
        self.reward_functions = resolve_reward_functions(
            gargs.reward_function_names, max_completion_length=gargs.max_completion_length,
            overlong_buffer_length=gargs.overlong_buffer_length,
        )  # fmt: skip
        self.reward_names = [name for name, _ in self.reward_functions]
        # auto: a CUDA graph per rollout on CUDA, except under FSDP, whose forward gathers the sharded
        # weights with collectives on every call (not captured into a graph here: not tested).
        self.decode_mode = ("dynamic" if targs.fsdp else None) if gargs.decode == "auto" else gargs.decode
        self.generator = torch.Generator(device=self.device).manual_seed(targs.seed * 7919 + rank)
        self.seconds: list[float] = []

    def restore(self, state: dict, rank: int) -> None:
        """The sampler's generator from a checkpoint; a rank the checkpoint did not have (the job
        grew) keeps its fresh seed (load_trainer_state warned)."""
        saved = state["extra"].get("sampler_generators", [])
        if rank < len(saved):
            self.generator.set_state(saved[rank])

    def checkpoint_extra(self) -> dict:
        """Every rank's sampler state, for the checkpoint, so a resumed rank samples what it would have."""
        return {"sampler_generators": all_gather_object(self.generator.get_state())}

    def __call__(self) -> SampledGroups:
        gargs, tokens, G = self.gargs, self.tokens, self.gargs.num_generations
        started = time.perf_counter()
        examples = [self.dataset[i] for i in self.stream.take(gargs.per_device_prompts)]
        batch = self.collator(examples)
        batch_on_device = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        rollout = sample_rollouts(  # switches to eval mode (no dropout) and back itself
            self.model, batch_on_device, group_size=G, max_new_tokens=gargs.max_completion_length,
            eos_token_ids=tokens.eos_token_ids, pad_token_id=tokens.pad_token_id,
            temperature=gargs.temperature, top_p=gargs.top_p, top_k=gargs.top_k, generator=self.generator,
            decode=self.decode_mode,
        )  # fmt: skip
        self.seconds.append(time.perf_counter() - started)
        completions = self.processor.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        # The batch's one completion mask: the tokens through each row's first EOS (grpo/masks.py),
        # read by the rewards here and by the loss and the metrics in the loop.
        completion_mask, is_truncated = completion_mask_of(rollout.completion_ids, tokens.eos_token_ids)  # [B*G, T], [B*G]
        rewards, per_function = compute_rewards(
            self.reward_functions, gargs.reward_weight_values, completions,
            [answer for answer in batch["answers"] for _ in range(G)],
            **example_columns(examples, G),  # questions, images, image_paths, every other column
            completion_lengths=completion_mask.sum(1).tolist(),
        )  # [B*G] (NaN: no function scored it), [B*G, F]
        return SampledGroups(
            examples, batch, batch_on_device, rollout, completion_mask, is_truncated, completions, rewards, per_function
        )


def generation_advantages(rewards: torch.Tensor, group_size: int, scale: str, world_size: int):
    """Advantages [B*G] of this rank's rewards [B*G], and group_advantages' metrics.

    A group's completions all live on this rank, so its mean and std are local; only scale="batch"
    divides by the std of every rank's rewards of the generation batch (as TRL gathers them), so
    the advantages do not depend on the number of ranks. Kept out of the loop for a 2-rank test.
    """
    batch_std = None
    if scale == "batch" and world_size > 1:
        every_rank = torch.cat(all_gather_object(rewards.detach().float().cpu()))  # [world*B*G]
        batch_std = every_rank[~torch.isnan(every_rank)].std().item()  # unscored (NaN) left out
    return group_advantages(rewards, group_size, scale=scale, batch_std=batch_std)


def generation_inputs(
    sampled: SampledGroups, completion_mask: torch.Tensor, gargs: GRPOArguments, merge_size: int
) -> GenerationBatch:
    """The inputs every forward of one generation batch shares (prompts, images, completions)."""
    on_device = sampled.batch_on_device
    return GenerationBatch(
        prompt_ids=on_device["input_ids"], prompt_mask=on_device["attention_mask"],
        pixel_values=on_device["pixel_values"], image_grid_thw=on_device["image_grid_thw"],
        images_per_prompt=sampled.rollout.images_per_prompt, completion_ids=sampled.rollout.completion_ids,
        completion_mask=completion_mask, rollout_image_embeds=sampled.rollout.image_embeds,
        group_size=gargs.num_generations, temperature=gargs.temperature, spatial_merge_size=merge_size,
        shared_prompt=gargs.shared_prompt_forward,
    )  # fmt: skip


@torch.no_grad()
@in_eval_mode  # pi_old and pi_ref without dropout, on every generation batch alike
def frozen_logprobs(
    model: torch.nn.Module, generation: GenerationBatch, *, micro_batch_size: int, reuse_images: bool
) -> torch.Tensor:
    """[B*G, T] logprobs of the rollout's completions under a model that does not train now
    (the old policy before the update, or the reference), one micro-batch at a time."""
    num_rows, T = generation.completion_ids.shape
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)  # as completion_logprobs returns
    logprobs = torch.zeros(num_rows, T, dtype=dtype, device=generation.completion_ids.device)  # [B*G, T]
    for rows in torch.arange(num_rows).split(micro_batch_size):
        values = generation.logprobs(model, rows, reuse_rollout_images=reuse_images)  # [R, T_rows]
        logprobs[rows, : values.shape[1]] = values
    return logprobs


def accumulate_step_gradients(
    model: torch.nn.Module,
    generation: GenerationBatch,
    step_rows: torch.Tensor,
    *,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    gargs: GRPOArguments,
    reuse_images: bool,
    world_size: int,
    sampler_logprobs: torch.Tensor | None = None,
    entropy_coef: float | None = None,
) -> StepSums:
    """Backward this rank's share of one optimizer step's loss, one micro-batch at a time.

    step_rows: [R] the rows of the generation batch (B*G rows, this rank's) that the step trains on.
    advantages [B*G], loss_mask [B*G, T], old/ref/sampler logprobs [B*G, T] or None: the whole batch's.
    The loss is divided by the step's count over every micro-batch and every rank (/ world_size),
    so after `sync_gradients` averages over ranks each .grad equals the gradient one process
    holding every rank's rows would compute. Returns this rank's sums for the step's metrics
    (`StepSums.means` reduces them over the ranks).
    Kept out of the loop so a test can run it on two ranks against one process (test_torchrun.py).
    entropy_coef: the entropy bonus's coefficient for this step (adaptive control's c_applied);
    None: the largest the run may apply (--entropy_coef, or --entropy_coef_max under adaptive
    control), so the preflight builds the bonus's graph whenever the run may. The bonus is a mean
    over the step's trained tokens (grpo/entropy_bonus.py), beside the loss, not inside it.
    """
    # The normaliser spans every micro-batch of this optimizer step on every rank;
    # DDP-style averaging divides gradients by world_size, so divide it back out.
    # Clamped to 1: a step whose completions are all masked out contributes zero loss.
    normaliser = max(
        all_reduce_sum(step_normaliser(
            loss_mask[step_rows], gargs.loss_aggregation, gargs.max_completion_length, gargs.micro_batch_size
        )),
        1.0,
    ) / world_size
    sums = StepSums(
        sampler_correction=gargs.sampler_correction != "none", entropy_bonus=gargs.entropy_bonus_enabled,
        off_policy_mask=gargs.off_policy_mask_threshold is not None,
    )
    policy_token_mask = None  # every token, unless --top_entropy_quantile < 1
    if gargs.top_entropy_quantile < 1.0:
        policy_token_mask, sums.entropy_threshold = step_policy_token_mask(
            model, generation, step_rows, loss_mask, quantile=gargs.top_entropy_quantile,
            micro_batch_size=gargs.micro_batch_size, reuse_images=reuse_images,
        )  # fmt: skip
        sums.selected_tokens = float(policy_token_mask[step_rows].sum())
    if entropy_coef is None:
        entropy_coef = gargs.entropy_coef_max if gargs.use_adaptive_entropy else gargs.entropy_coef
    if gargs.entropy_bonus_enabled:  # the bonus's tokens: the policy term's (loss mask, top-entropy selection)
        bonus_mask = loss_mask if policy_token_mask is None else loss_mask * policy_token_mask  # [B*G, T]
        # Its own step count over every rank (clamped to 1: a step with no tokens adds no bonus).
        bonus_normaliser = max(all_reduce_sum(float(bonus_mask[step_rows].sum())), 1.0) / world_size
    for rows in step_rows.split(gargs.micro_batch_size):
        logprobs, entropy = generation.logprobs(
            model, rows, reuse_rollout_images=reuse_images, return_entropy=True,
            entropy_grad=gargs.entropy_bonus_enabled and entropy_coef != 0.0,
        )  # [R, T_rows]
        length = logprobs.shape[1]
        mask_rows = loss_mask[rows, :length].to(logprobs.device)  # [R, T_rows]
        loss, info = grpo_loss(
            logprobs,
            None if old_logprobs is None else old_logprobs[rows, :length],
            None if ref_logprobs is None else ref_logprobs[rows, :length],
            advantages[rows], mask_rows, gargs.loss_options, normaliser=normaliser,
            sampler_logprobs=None if sampler_logprobs is None else sampler_logprobs[rows, :length],
            policy_token_mask=None if policy_token_mask is None else policy_token_mask[rows, :length],
        )
        if gargs.entropy_bonus_enabled:  # loss - c * mean entropy (grpo/entropy_bonus.py)
            bonus_rows = bonus_mask[rows, :length].to(entropy.device)  # [R, T_rows]
            if entropy_coef != 0.0:
                loss = loss - entropy_bonus(entropy, bonus_rows, entropy_coef, bonus_normaliser)
            sums.add_bonus_tokens(entropy, bonus_rows)
        loss.backward()
        sums.add(loss, info, entropy, mask_rows)
    return sums


@in_eval_mode  # no dropout in the entropy that selects the tokens
def step_policy_token_mask(
    model: torch.nn.Module, generation: GenerationBatch, step_rows: torch.Tensor, loss_mask: torch.Tensor, *,
    quantile: float, micro_batch_size: int, reuse_images: bool,
) -> tuple[torch.Tensor, float]:
    """--top_entropy_quantile: [B*G, T] bool, the step's high-entropy tokens, and the threshold.

    The quantile runs over the loss-mask tokens of this optimizer step on every rank (one no-grad
    forward over the step's rows, one all-gather); grpo/token_selection.py says why.
    """
    selected = torch.zeros(loss_mask.shape, dtype=torch.bool, device=loss_mask.device)  # [B*G, T]
    entropies = []
    with torch.no_grad():
        for rows in step_rows.split(micro_batch_size):
            _, entropy = generation.logprobs(model, rows, reuse_rollout_images=reuse_images, return_entropy=True)
            entropies.append((rows, entropy.float().cpu()))  # [R, T_rows]
    masks = [loss_mask[rows, : entropy.shape[1]].cpu() for rows, entropy in entropies]  # [R, T_rows] each
    candidates = torch.cat([entropy[mask > 0] for (_, entropy), mask in zip(entropies, masks, strict=True)])
    threshold = entropy_threshold(torch.cat(all_gather_object(candidates)), quantile)
    for (rows, entropy), mask in zip(entropies, masks, strict=True):
        selected[rows, : entropy.shape[1]] = high_entropy_mask(entropy, mask, threshold).to(selected.device)
    return selected, threshold


def first_sample(sampled: SampledGroups, reward_names: list[str]) -> dict:
    """samples.log's block of a generation batch: its first prompt and completion, each reward."""
    return dict(
        question=sampled.batch["questions"][0], answer=sampled.batch["answers"][0], completion=sampled.completions[0],
        rewards={name: float(sampled.per_function[0, i]) for i, name in enumerate(reward_names)},
    )
