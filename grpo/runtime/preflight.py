"""The pre-flight step: before step 1, one forward and backward at the largest inputs the run will see.

A run usually meets its longest prompt long after it starts (an out-of-memory error at step 120,
when that sample finally arrives). The pre-flight builds that case at once:

    GRPO: the dataset's longest prompt (image tokens included), max_completion_length completion
          tokens on every row, one micro-batch of micro_batch_size completions, the loss of the run
          (with its KL and old-policy terms when they are on), backward.
    SFT:  the longest prompt + target, per_device_batch_size copies, the SFT loss, backward.

so a run that cannot fit fails in its first minute, with the memory figure and the flags to change.
It leaves no trace in training: no optimizer step, gradients reset to None (as before step 1), every
torch RNG restored (dropout draws from it), the model's train/eval mode restored. It does not run
the sampler: the rollout's KV cache for the whole generation batch is not covered (see
docs/troubleshooting.md). `--skip_preflight` turns it off.
"""

from __future__ import annotations

import resource
import time

import torch

from data.collators import longest_example
from grpo.engine.forward import GenerationBatch
from grpo.engine.inputs import count_images_per_prompt
from grpo.masks import completion_mask as build_completion_mask


def _forward_backward(step) -> None:
    step()


def _memory_figure(device: torch.device) -> str:
    if device.type == "cuda":
        peak, total = torch.cuda.max_memory_allocated(device), torch.cuda.get_device_properties(device).total_memory
        return f"peak {peak / 2**30:.2f} GiB allocated of {total / 2**30:.1f} GiB on {device}"
    return f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"  # ru_maxrss: KiB


def _run(model, step, *, device: torch.device, what: str, advice: str, is_main: bool) -> None:
    """Run `step` (a forward + backward) as if it never happened, or stop with the figure and advice."""
    was_training = model.training
    model.train()
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # fork_rng: dropout in the forward draws from the global generators; put them back after.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            _forward_backward(step)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not isinstance(error, torch.OutOfMemoryError) and "can't allocate memory" not in str(error):
                raise
            for parameter in model.parameters():
                parameter.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise RuntimeError(
                f"pre-flight: one micro-batch at {what} does not fit ({first_line}; {_memory_figure(device)}). "
                f"{advice}, or turn on --gradient_checkpointing; --skip_preflight skips this check"
            ) from error
        finally:
            model.train(was_training)
    for parameter in model.parameters():
        parameter.grad = None  # as before step 1: the first step accumulates from nothing
    if is_main:
        print(f"[preflight] {what}: fits ({_memory_figure(device)}, {time.perf_counter() - started:.1f} s)", flush=True)


def grpo_preflight(model, dataset, collator, *, gargs, tokens, device, world_size, merge_size, step_gradients, is_main=True) -> None:
    """One GRPO micro-batch at the longest prompt; step_gradients is grpo_loop.accumulate_step_gradients."""
    index, prompt_tokens = longest_example(dataset, collator.processor, collator.system_prompt)
    G, micro, T = gargs.num_generations, gargs.micro_batch_size, gargs.max_completion_length
    num_prompts = -(-micro // G)  # the micro-batch's rows continue this many prompts at most
    batch = collator([dataset[index]] * num_prompts)
    on_device = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    special = {*tokens.eos_token_ids, tokens.image_token_id, tokens.video_token_id, tokens.vision_start_token_id}
    filler = next(i for i in range(len(special) + 1) if i not in special)  # a plain token: no EOS, no image
    completion_ids = torch.full((num_prompts * G, T), filler, device=device)  # [B'*G, T] every row full length
    completion_mask, _ = build_completion_mask(completion_ids, tokens.eos_token_ids)  # [B'*G, T] all ones
    generation = GenerationBatch(
        prompt_ids=on_device["input_ids"], prompt_mask=on_device["attention_mask"],
        pixel_values=on_device.get("pixel_values"), image_grid_thw=on_device.get("image_grid_thw"),
        images_per_prompt=count_images_per_prompt(
            on_device["input_ids"], on_device.get("image_grid_thw"), image_token_id=tokens.image_token_id,
            spatial_merge_size=merge_size,
        ),
        completion_ids=completion_ids, completion_mask=completion_mask,
        rollout_image_embeds=None, group_size=G, temperature=gargs.temperature,
        spatial_merge_size=merge_size, shared_prompt=gargs.shared_prompt_forward,
    )
    rows = num_prompts * G
    # The values are placeholders (only the shapes and the terms that run matter): zeros for
    # old/ref logprobs where the run has those terms, advantages of 1 so the surrogate has a gradient.
    zeros = torch.zeros(rows, T, device=device)  # [B'*G, T]

    def step():
        step_gradients(
            model, generation, torch.arange(micro), advantages=torch.ones(rows, device=device), loss_mask=completion_mask,
            old_logprobs=zeros if gargs.num_iterations > 1 else None, ref_logprobs=zeros if gargs.beta > 0 else None,
            gargs=gargs, reuse_images=False, world_size=world_size,
            sampler_logprobs=zeros,  # as the loop passes the rollout's (the gap metric, --sampler_correction)
        )

    what = f"the longest prompt (dataset row {dataset[index].get('source_row', index)}, {prompt_tokens} tokens) + {T} completion tokens x {micro} completions"
    advice = f"Lower --micro_batch_size (now {micro}), --max_completion_length (now {T}), or the longest prompt (--max_pixels, --max_prompt_length)"
    _run(model, step, device=device, what=what, advice=advice, is_main=is_main)


def sft_preflight(model, dataset, collator, *, batch_size, device, loss_fn, is_main=True) -> None:
    """One SFT micro-batch of the longest example; loss_fn is sft_loop.sft_token_losses."""
    index, length = longest_example(dataset, collator.processor, collator.system_prompt, target_text=collator.target_text)
    batch = {k: v.to(device) for k, v in collator([dataset[index]] * batch_size).items() if isinstance(v, torch.Tensor)}

    def step():
        nll, count = loss_fn(model, batch)
        (nll / count.clamp(min=1)).backward()

    what = f"the longest example (dataset row {dataset[index].get('source_row', index)}, {length} tokens) x {batch_size}"
    advice = f"Lower --per_device_batch_size (now {batch_size}; raise --gradient_accumulation_steps to keep the batch) or --max_pixels"
    _run(model, step, device=device, what=what, advice=advice, is_main=is_main)
