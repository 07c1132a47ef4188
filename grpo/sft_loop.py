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

import time

import torch

from data.collators import IGNORE_INDEX, GRPOCollator, SFTCollator
from data.index_stream import IndexStream
from data.loading import load_sft_datasets
from grpo.config import Config
from grpo.logprobs import token_logprobs
from grpo.rewards import resolve_reward_functions
from grpo.runtime.distributed import all_reduce_sum
from grpo.runtime.preflight import sft_preflight
from grpo.runtime.run import StopRequest, start_run
from grpo.validation import EarlyStopping, greedy_accuracy


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
    targs, sargs = config.train, config.sft

    # --- ranks, run directory, policy, AdamW (grpo/runtime/run.py) ---
    run = start_run(config, "sft", with_reference=False)
    rank, world_size, device, is_main = run.dist.rank, run.dist.world_size, run.dist.device, run.is_main
    policy, scheduler = run.policy, run.scheduler
    model, processor = policy.model, policy.processor

    train_set, val_set, data_report = load_sft_datasets(config, is_main=is_main)
    collator = SFTCollator(processor, system_prompt=config.data.system_prompt_text)
    stream = IndexStream(len(train_set), seed=targs.seed, rank=rank, world_size=world_size)

    state = run.resume(stream)
    step = state["step"]
    early_stopping = EarlyStopping(
        sargs.early_stopping_patience, sargs.early_stopping_min_delta, state["extra"].get("early_stopping")
    )
    accuracy_reward, prompt_collator = None, None
    if sargs.eval_accuracy_reward and val_set is not None:
        [(_, accuracy_reward)] = resolve_reward_functions([sargs.eval_accuracy_reward])
        prompt_collator = GRPOCollator(processor, system_prompt=config.data.system_prompt_text)
    stopped_at_plateau = False

    def save(at_step):  # the early-stopping state travels in the checkpoint, so a resume counts on
        run.save(at_step, stream, extra={"early_stopping": early_stopping.state()})

    if not targs.skip_preflight:  # one micro-batch of the longest example, before step 1 (grpo/runtime/preflight.py)
        sft_preflight(
            model, train_set, collator, batch_size=sargs.per_device_batch_size, device=device,
            loss_fn=sft_token_losses, is_main=is_main,
        )
    run.open_logs(step)  # metrics.jsonl, the metrics line and --report_to, the progress bar
    last_saved = step

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
            loss = all_reduce_sum(nll_total) / (normaliser * world_size)
            grad_norm = run.optimizer_step(step, loss)  # ranks' average, clip, AdamW (grpo/runtime/run.py)
            if grad_norm is None:
                continue  # skipped: not finite
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
                if accuracy_reward is not None:
                    metrics["val_accuracy"] = greedy_accuracy(
                        model, val_set, prompt_collator, accuracy_reward, tokens=policy.tokens, device=device,
                        batch_size=4 * sargs.per_device_batch_size, max_new_tokens=config.grpo.max_completion_length,
                        max_examples=sargs.max_eval_examples, rank=rank, world_size=world_size,
                    )
                    # Every rank got the same summed accuracy, so every rank takes the same decision.
                    stopped_at_plateau = early_stopping.update(step, metrics["val_accuracy"])
                    metrics["val_accuracy_best"] = early_stopping.best
            run.log(step, metrics, loss=f"{loss:.4f}")
            if stopped_at_plateau:
                if is_main:
                    print(
                        f"[sft] early stop at step {step}: val_accuracy has not risen by more than "
                        f"{sargs.early_stopping_min_delta} for {early_stopping.evaluations_since_best} evaluations "
                        f"(best {early_stopping.best:.4f} at step {early_stopping.best_step})",
                        flush=True,
                    )
                break
            if targs.save_steps and step % targs.save_steps == 0 and step < targs.max_steps:
                save(step)
                last_saved = step

        # --- the final save, still under the handlers: a signal now must not kill it (grpo/runtime/run.py) ---
        result = run.finish(step, last_saved=last_saved, stop=stop, save=save)
        return {**result, "stopped_at_plateau": stopped_at_plateau}
