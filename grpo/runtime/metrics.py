"""Training logs: one JSON line of metrics per step, and human-readable sample blocks.

- `MetricsLogger` appends `{"step": N, "name": value, ...}` to `output_dir/metrics.jsonl`. Each
  line is flushed as it is written, so a crash (even `kill -9`) loses at most the line being
  written; a half-written last line is dropped when the file is opened again. Values are plain
  floats (tensors through `.item()`); NaN and inf are written as Python's json writes them
  (`NaN`, `Infinity`), which `json.loads` and pandas read back.
- Resuming: the file is appended to, never truncated on open. A run resumed from the checkpoint
  of step S has already logged steps after S before it died; `truncate_after(S)` drops them so
  the file holds each step once. A fresh run calls `truncate_after(0)` (steps count from 1).
- `SampleLogger` writes, every N steps, one sample as a readable block (question, gold answer,
  one completion, the extracted answer, its reward per function), like the blog post's log file.
  Reading completions is the fastest way to see reward hacking. Its `truncate_after(S)` drops the
  blocks of steps after S, as for metrics (a fresh or overwritten run calls it with 0).
- Only rank 0 should write: build both with `enabled=is_main(info)`.
- `rollout_metrics`: what the GRPO loop logs of one generation batch (rewards, advantages,
  lengths), over every rank's completions.
- `StepSums`: one optimizer step's loss and token metrics, summed micro-batch by micro-batch on
  each rank (`add`), then reduced over every rank into the job's means (`means`).
"""

from __future__ import annotations

import json
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from grpo.advantages import advantage_metrics
from grpo.reward_functions import extract_answer
from grpo.rewards import reward_metrics
from grpo.runtime.distributed import all_gather_object, all_reduce_max, all_reduce_sum


def _to_float(key: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r} is a tensor of shape {tuple(value.shape)}; log a scalar (.mean())")
        return float(value.item())
    if isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        return float(value)
    raise TypeError(f"metric {key!r} is a {type(value).__name__}; metrics must be numbers")


def _drop_partial_last_line(path: Path) -> None:
    """Cut a line a crash left without its newline, so the next record starts on a line of its own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as file:
        data = file.read()
        if data.endswith(b"\n"):
            return
        file.truncate(data.rfind(b"\n") + 1)  # rfind -1 -> 0: the whole file was one partial line


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics JSONL file (for plots and tests); skips a partial last line."""
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if line.endswith("\n"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:  # a ValueError still, now naming the line
                    raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
    return records


class MetricsLogger:
    """Appends one JSON object per step to a JSONL file. Disabled loggers do nothing."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_partial_last_line(self.path)
            self._open()

    def _open(self) -> None:
        # buffering=1: line-buffered text mode; log() also flushes explicitly.
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, object]) -> dict:
        """Write `{"step": step, **metrics}` as one line and return it (floats only)."""
        record = {"step": int(step)}
        for key, value in metrics.items():
            if key == "step":
                raise ValueError("'step' is reserved in metrics; pass it as the step argument")
            record[key] = _to_float(key, value)
        if self.enabled:
            if self._file is None:
                raise RuntimeError(f"MetricsLogger({self.path}) was closed; create a new one to log again")
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        return record

    def truncate_after(self, step: int) -> int:
        """Drop records with step > `step` (rewritten atomically); returns how many were dropped."""
        if not self.enabled:
            return 0
        if self._file is not None:
            self._file.close()
        dropped = 0
        if self.path.exists():
            _drop_partial_last_line(self.path)
            with open(self.path, encoding="utf-8") as file:
                lines = file.readlines()
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            dropped = len(lines) - len(kept)
            if dropped:
                _rewrite_atomically(self.path, kept)
        self._open()
        return dropped

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _rewrite_atomically(path: Path, lines: list[str]) -> None:
    """Replace the file with `lines`: written to a temporary file, fsynced, then renamed over it,
    so a crash leaves either the old file or the new one, never half of each."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        file.writelines(lines)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


_BLOCK_RULE = "-" * 20 + " step {step} " + "-" * 20  # the first line of each sample block
_BLOCK_HEADER = re.compile(re.escape("-" * 20) + r" step (\d+) " + re.escape("-" * 20))


class SampleLogger:
    """Every `every` steps, appends one sample as a readable block to a text file.

    `every` <= 0 or `enabled=False` turns it off. Use `should_log(step)` to skip decoding work on
    the other steps.
    """

    def __init__(self, path: str | os.PathLike, every: int, enabled: bool = True):
        self.path = Path(path)
        self.every = every
        self.enabled = enabled and every > 0
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def should_log(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def truncate_after(self, step: int) -> int:
        """Drop the blocks of steps after `step` (rewritten atomically); returns how many were dropped.

        Runs whether or not this logger writes (`every` 0 still cleans up an earlier run's file).
        """
        if not self.path.exists():
            return 0
        kept, dropped, keeping = [], 0, True
        with open(self.path, encoding="utf-8") as file:
            for line in file:
                if header := _BLOCK_HEADER.fullmatch(line.rstrip("\n")):
                    keeping = int(header.group(1)) <= step
                    dropped += not keeping
                if keeping:
                    kept.append(line)
        if dropped:
            _rewrite_atomically(self.path, kept)
        return dropped

    def maybe_log(
        self,
        step: int,
        *,
        question: str,
        answer: str,
        completion: str,
        rewards: Mapping[str, float],
        advantage: float | None = None,
    ) -> str | None:
        """Append the block for `step` if it is a logging step; returns the text written (or None)."""
        if not self.should_log(step):
            return None
        reward_text = "  ".join(f"{name}={_to_float(name, value):.3f}" for name, value in rewards.items())
        lines = [
            _BLOCK_RULE.format(step=step),
            "Question:",
            str(question),
            "Gold answer:",
            str(answer),
            "Completion:",
            str(completion),
            "Extracted:",
            str(extract_answer(str(completion))),
            f"Rewards: {reward_text}",
        ]
        if advantage is not None:
            lines.append(f"Advantage: {_to_float('advantage', advantage):.3f}")
        text = "\n".join(lines) + "\n\n"
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(text)
        return text


def rollout_metrics(
    per_function: torch.Tensor,
    rewards: torch.Tensor,
    reward_names: list[str],
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    is_truncated: torch.Tensor,
    group_size: int,
    world_size: int,
) -> dict[str, float]:
    """Rewards, advantages and completion lengths over the whole job's rollouts (every rank's).

    per_function [B*G, F], rewards [B*G] (their weighted sum, NaN: unscored), advantages [B*G],
    completion_mask [B*G, T], is_truncated [B*G]: this rank's. Under torchrun each rank holds
    different prompts; rank 0 logs the statistics of all of them, gathered once per generation
    batch (a few numbers per completion). The statistics are the math's own: `reward_metrics`
    and `advantage_metrics`, on the gathered rows.
    """
    columns = [
        per_function,  # [B*G, F]
        rewards.detach().float().cpu()[:, None],  # [B*G, 1]
        advantages.detach().float().cpu()[:, None],  # [B*G, 1]
        completion_mask.sum(1).float().cpu()[:, None],  # [B*G, 1]
        is_truncated.float().cpu()[:, None],  # [B*G, 1]
    ]
    local = torch.cat(columns, dim=1)  # [B*G, F+4]
    table = torch.cat(all_gather_object(local)) if world_size > 1 else local  # [world*B*G, F+4]
    F = per_function.shape[1]
    job_rewards, job_advantages, lengths, truncated = (table[:, F + i] for i in range(4))
    advantage = advantage_metrics(job_rewards, job_advantages, group_size)
    return {
        **reward_metrics(table[:, :F], job_rewards, reward_names),
        "advantage/mean": advantage["advantage_mean"],
        "advantage/std": advantage["advantage_std"],
        "advantage/frac_zero_std_groups": advantage["frac_zero_std_groups"],
        "completion_length_mean": lengths.mean().item(),
        "completion_length_max": lengths.max().item(),
        "truncated_frac": truncated.mean().item(),
    }


@dataclass
class StepSums:
    """One optimizer step's loss and token metrics: this rank's sums, then the job's means.

    The GRPO loop builds one per optimizer step, calls `add` after each micro-batch's backward and
    `means` once at the end: one all-reduce of the sums (token-weighted, so the means weigh every
    token of every rank alike) and one of the largest sampler gap.
    """

    sampler_correction: bool = False  # --sampler_correction != none: log the weights it applied
    entropy_bonus: bool = False  # --entropy_coef (or adaptive): log the entropy the bonus saw
    off_policy_mask: bool = False  # --off_policy_mask_threshold: log the tokens it dropped
    loss: float = 0.0  # this rank's share of the step's loss (already divided by the normaliser)
    tokens: float = 0.0  # loss-mask tokens
    clip_low: float = 0.0  # the token-weighted sums of the loss's per-micro-batch means
    clip_high: float = 0.0
    kl: float = 0.0
    ratio: float = 0.0
    entropy: float = 0.0  # sum of the policy's entropy over the loss-mask tokens
    sampler_gap: float = 0.0
    sampler_weight: float = 0.0
    sampler_over_cap: float = 0.0
    off_policy_masked: float = 0.0  # tokens of the completions the off-policy mask dropped
    selected_tokens: float = 0.0  # --top_entropy_quantile: the tokens the step selected
    sampler_gap_max: float = 0.0  # a max, not a sum
    bonus_entropy: float = 0.0  # --entropy_coef: sum of the entropy over the bonus's tokens
    bonus_tokens: float = 0.0
    entropy_threshold: float | None = None  # --top_entropy_quantile: the step's threshold (the same on every rank)

    SUMMED = ("loss", "tokens", "clip_low", "clip_high", "kl", "ratio", "entropy", "sampler_gap", "sampler_weight",
              "sampler_over_cap", "off_policy_masked", "selected_tokens", "bonus_entropy", "bonus_tokens")  # fmt: skip

    def add(self, loss: torch.Tensor, info: Mapping[str, float], entropy: torch.Tensor, mask: torch.Tensor) -> None:
        """One micro-batch: its loss, grpo_loss's info, the policy's entropy [R, T] and loss mask [R, T]."""
        n = info["num_tokens"]
        self.loss += loss.item()
        self.tokens += n
        self.clip_low += info["clip_frac_low"] * n
        self.clip_high += info["clip_frac_high"] * n
        self.kl += info.get("kl_mean", 0.0) * n
        self.ratio += info["ratio_mean"] * n
        self.entropy += float((entropy.detach() * mask.to(entropy.device)).sum())
        self.sampler_gap += info.get("sampler_gap_mean", 0.0) * n
        self.sampler_gap_max = max(self.sampler_gap_max, info.get("sampler_gap_max", 0.0))
        self.sampler_weight += info.get("sampler_weight_mean", 0.0) * n
        self.sampler_over_cap += info.get("sampler_over_cap_frac", 0.0) * n
        self.off_policy_masked += info.get("off_policy_masked_frac", 0.0) * n

    def add_bonus_tokens(self, entropy: torch.Tensor, bonus_mask: torch.Tensor) -> None:
        """One micro-batch's entropy [R, T] over the entropy bonus's tokens [R, T] (what adaptive control measures)."""
        self.bonus_entropy += float((entropy.detach() * bonus_mask).sum())
        self.bonus_tokens += float(bonus_mask.sum())

    def means(self, world_size: int) -> dict[str, float]:
        """The step's metrics over every rank: one all-reduce of the sums (every rank must call it)."""
        summed = torch.tensor([getattr(self, name) for name in self.SUMMED], dtype=torch.float64)
        total = dict(zip(self.SUMMED, all_reduce_sum(summed).tolist(), strict=True))
        tokens = max(total["tokens"], 1.0)
        metrics = {
            # Each rank's loss is its share divided by (global count / world_size); undo that.
            "loss": total["loss"] / world_size,
            "kl": total["kl"] / tokens,
            "clip_frac_low": total["clip_low"] / tokens,
            "clip_frac_high": total["clip_high"] / tokens,
            "ratio_mean": total["ratio"] / tokens,
            "entropy": total["entropy"] / tokens,
            # |log pi_theta - log pi_sampler| over completion tokens (grpo/sampler_correction.py)
            "sampler_gap_mean": total["sampler_gap"] / tokens,
            "sampler_gap_max": all_reduce_max(self.sampler_gap_max),
        }
        if self.sampler_correction:
            metrics["sampler_weight_mean"] = total["sampler_weight"] / tokens
            metrics["sampler_over_cap_frac"] = total["sampler_over_cap"] / tokens
        if self.off_policy_mask:
            metrics["off_policy_masked_frac"] = total["off_policy_masked"] / tokens
        if self.entropy_threshold is not None:  # the step's high-entropy token selection
            metrics["entropy_selected_frac"] = total["selected_tokens"] / tokens
            metrics["entropy_threshold"] = self.entropy_threshold
        if self.entropy_bonus:  # H̄ over the bonus's tokens: what adaptive control measures
            metrics["entropy_bonus_mean_entropy"] = total["bonus_entropy"] / max(total["bonus_tokens"], 1.0)
        return metrics
