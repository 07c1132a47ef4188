"""The SFT warm-up: completion-only cross-entropy on demonstrations (reasoning trace + answer).

    torchrun --nproc_per_node 2 train.py --stage sft --max_steps 1000 --learning_rate 3e-4

The first seed needed it: GRPO's reward is too sparse for a model that has never seen the answer
format, so a short supervised stage teaches the format (and some counting) first.

Loss: the mean over every labelled token of the optimizer step (all micro-batches, all ranks) of
-log p(token | prefix). Labels come from the SFT collator: -100 on the system prompt, the question,
image and padding tokens, so only the answer and the <|im_end|> that ends it are learned.
Gradient accumulation divides by the step's token count, not by the number of micro-batches, so a
micro-batch with more answer tokens weighs more — the same as one big batch.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from grpo.checkpoint import capture_rng_state, check_output_dir, load_trainer_state, save_checkpoint
from grpo.config import Config
from grpo.distributed import (
    all_gather_object,
    all_reduce_sum,
    broadcast_object,
    cleanup,
    init_distributed,
)
from grpo.logprobs import token_logprobs
from grpo.metrics import MetricsLogger
from grpo.setup import (
    IndexStream,
    StopRequest,
    adapter_state,
    broadcast_parameters,
    build_optimizer,
    build_policy,
    build_scheduler,
    model_for_saving,
    optimizer_for_checkpoint,
    restore_adapters,
    seed_everything,
    shard_policy,
    sync_gradients,
)

IGNORE_INDEX = -100


def sft_token_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the labelled tokens, and how many there are."""
    labels = batch["labels"]  # [R, L]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1]  # [R, L-1, V]: position t predicts token t+1
    targets = labels[:, 1:]  # [R, L-1]
    is_label = targets != IGNORE_INDEX  # [R, L-1]
    logprobs = token_logprobs(logits, targets.clamp(min=0))  # [R, L-1]
    return -(logprobs * is_label).sum(), is_label.sum()


@torch.no_grad()
def validation_loss(model, dataset, collator, device, max_examples: int, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(len(dataset), max_examples), batch_size):
        examples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset), max_examples))]
        batch = {k: v.to(device) for k, v in collator(examples).items() if isinstance(v, torch.Tensor)}
        nll, n = sft_token_losses(model, batch)
        total, count = total + float(nll), count + int(n)
    model.train()
    total, count = all_reduce_sum(total), all_reduce_sum(float(count))
    return total / max(count, 1)


def train_sft(config: Config) -> dict:
    dist_info = init_distributed(config.train.device)
    rank, world_size, device = dist_info.rank, dist_info.world_size, dist_info.device
    is_main = rank == 0
    targs, sargs = config.train, config.sft
    seed_everything(targs.seed)

    resume_from = None
    if is_main:  # rank 0 decides (and deletes, with --overwrite_output_dir); the others follow
        resume_from = check_output_dir(targs.output_dir, resume=targs.resume, overwrite=targs.overwrite_output_dir, stage="sft")
    resume_from = broadcast_object(resume_from)
    policy = build_policy(config, device, with_reference=False, resume_dir=resume_from)
    model, processor = policy.model, policy.processor
    if targs.fsdp:  # shard the policy over the ranks instead of replicating it (grpo/fsdp.py)
        shard_policy(policy, device)
    else:
        broadcast_parameters(model, world_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, targs)
    scheduler = build_scheduler(optimizer, targs)

    from data.collators import SFTCollator
    from grpo.data_setup import load_sft_datasets

    train_set, val_set, data_report = load_sft_datasets(config, is_main=is_main)
    collator = SFTCollator(processor, system_prompt=config.data.system_prompt_text)
    stream = IndexStream(len(train_set), seed=targs.seed, rank=rank, world_size=world_size)

    step = 0
    if resume_from is not None:
        state = load_trainer_state(
            resume_from, optimizer=optimizer_for_checkpoint(policy, optimizer), scheduler=scheduler, rank=rank
        )  # --fsdp: each rank keeps its slice of the saved full Adam moments
        step = state["step"]
        stream.load_state_dict(state["data_state"])
        restore_adapters(policy, state["extra"].get("lora_adapters", {}))
        if is_main:
            print(f"[resume] {resume_from} at step {step}", flush=True)

    metrics_logger = MetricsLogger(f"{targs.output_dir}/metrics.jsonl", enabled=is_main)
    metrics_logger.truncate_after(step)  # a resumed run rewrites what came after its checkpoint
    progress = tqdm(total=targs.max_steps, initial=step, desc="sft", disable=not (is_main and targs.progress_bar))
    consecutive_nonfinite, last_saved = 0, step

    def save(at_step):
        rng_states = all_gather_object(capture_rng_state())  # every rank's, so each resumes its own
        # --fsdp: every rank takes part in gathering the full weights and Adam moments for rank 0.
        model_to_save = model_for_saving(policy) if is_main or policy.fsdp else None
        optimizer_to_save = optimizer_for_checkpoint(policy, optimizer, gather=True)
        if is_main:
            save_checkpoint(
                targs.output_dir, at_step, model=model, processor=processor, optimizer=optimizer_to_save,
                scheduler=scheduler, data_state=stream.state_dict(), run_config={"stage": "sft", **config.to_dict()},
                extra={"lora_adapters": adapter_state(policy)}, keep_last=targs.save_total_limit,
                model_to_save=model_to_save, rng_states=rng_states,
            )

    model.train()
    with StopRequest() as stop:
        while step < targs.max_steps and not stop.requested_on_any_rank():
            started = time.perf_counter()
            micro_batches = [
                collator([train_set[i] for i in stream.take(sargs.per_device_batch_size)])
                for _ in range(sargs.gradient_accumulation_steps)
            ]
            # The step's normaliser: labelled tokens over all micro-batches and ranks (/ world_size
            # because gradients are averaged over ranks afterwards).
            local_tokens = sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro_batches)
            normaliser = max(all_reduce_sum(float(local_tokens)) / world_size, 1.0)
            nll_total = 0.0
            for micro_batch in micro_batches:
                batch = {k: v.to(device) for k, v in micro_batch.items() if isinstance(v, torch.Tensor)}
                nll, _ = sft_token_losses(model, batch)
                (nll / normaliser).backward()
                nll_total += float(nll.detach())
            if not targs.fsdp:  # FSDP2 reduce-scattered (averaged) them in backward already
                sync_gradients(trainable, world_size)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, targs.max_grad_norm if targs.max_grad_norm > 0 else float("inf"))
            loss = all_reduce_sum(nll_total) / (normaliser * world_size)
            if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                consecutive_nonfinite += 1
                print(f"[sft] step {step + 1}: non-finite loss/gradient ({loss}, {grad_norm}); step skipped", flush=True)
                if consecutive_nonfinite >= targs.max_nonfinite_steps:
                    raise RuntimeError(
                        f"{consecutive_nonfinite} consecutive steps had a non-finite loss or gradient; "
                        "lower --learning_rate or check the data"
                    )
                continue
            consecutive_nonfinite = 0
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            metrics = {
                "loss": loss,
                "grad_norm": float(grad_norm),
                "lr": scheduler.get_last_lr()[0],
                "tokens": normaliser * world_size,
                "step_seconds": time.perf_counter() - started,
                "skipped_images": data_report.skipped_images,
            }
            if val_set is not None and ((sargs.eval_steps and step % sargs.eval_steps == 0) or step == targs.max_steps):
                metrics["val_loss"] = validation_loss(
                    model, val_set, collator, device, sargs.max_eval_examples, sargs.per_device_batch_size
                )
            metrics_logger.log(step, metrics)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
            if targs.save_steps and step % targs.save_steps == 0 and step < targs.max_steps:
                save(step)
                last_saved = step

    progress.close()
    if step > last_saved or resume_from is None:
        save(step)
    metrics_logger.close()
    if stop.requested and is_main:
        print(
            f"[sft] {stop.signal_name} received: saved a checkpoint at step {step} in {targs.output_dir}. "
            "Resume with the same command plus --resume.",
            flush=True,
        )
    cleanup()
    return {"step": step, "output_dir": targs.output_dir, "stopped_early": stop.requested}
