"""Greedy accuracy of the policy being trained, on held-out examples, inside a training loop.

    python train.py --stage sft ... --eval_steps 100 --eval_accuracy_reward count_accuracy \
        --early_stopping_patience 3

eval.py measures a saved checkpoint; this measures the live model every --eval_steps, so that SFT
can stop when held-out accuracy no longer improves (its plateau) instead of after a step count
guessed in advance. Decoding is greedy (temperature 0) with the same sampler GRPO trains with, and
an example counts as correct when the accuracy reward gives it a positive score, as in eval.py.
Under torchrun each rank scores every world_size-th example and the counts are summed.
"""

from __future__ import annotations

import torch

from grpo.engine.rollout import sample_rollouts
from grpo.rewards import example_columns
from grpo.runtime.distributed import all_reduce_sum


@torch.no_grad()
def greedy_accuracy(model, dataset, collator, reward_function, *, tokens, device, batch_size: int,
                    max_new_tokens: int, max_examples: int, rank: int = 0, world_size: int = 1) -> float:
    """Fraction of the first `max_examples` examples of `dataset` answered correctly, greedily."""
    was_training = model.training
    model.eval()
    rows = list(range(rank, min(len(dataset), max_examples), world_size))  # this rank's share
    correct = 0.0
    for start in range(0, len(rows), batch_size):
        examples = [dataset[i] for i in rows[start : start + batch_size]]
        batch = collator(examples)
        on_device = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        rollout = sample_rollouts(
            model, on_device, group_size=1, max_new_tokens=max_new_tokens, eos_token_ids=tokens.eos_token_ids,
            pad_token_id=tokens.pad_token_id, temperature=0.0,
        )
        completions = collator.processor.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        scores = reward_function(completions, batch["answers"], **example_columns(examples, 1))
        correct += sum(1.0 for score in scores if score is not None and score > 0)
    model.train(was_training)
    total = all_reduce_sum(float(len(rows)))
    return all_reduce_sum(correct) / max(total, 1.0)


class EarlyStopping:
    """Stop when the metric has not risen by more than `min_delta` over its best for `patience`
    evaluations in a row. patience 0 never stops. Its state travels in the checkpoint, so a
    resumed run counts on from where it was."""

    def __init__(self, patience: int, min_delta: float, state: dict | None = None):
        self.patience, self.min_delta = patience, min_delta
        state = state or {}
        self.best: float | None = state.get("best")
        self.best_step: int | None = state.get("best_step")
        self.evaluations_since_best: int = state.get("evaluations_since_best", 0)

    def update(self, step: int, value: float) -> bool:
        """Record one evaluation; True when training should stop now."""
        if self.best is None or value > self.best + self.min_delta:
            self.best, self.best_step, self.evaluations_since_best = value, step, 0
        else:
            self.evaluations_since_best += 1
        return self.patience > 0 and self.evaluations_since_best >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "evaluations_since_best": self.evaluations_since_best}
