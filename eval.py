"""Accuracy of a checkpoint on a dataset: greedy by default, pass@k with sampling as an option.

    python eval.py --model runs/grpo --dataset synthetic --output_dir runs/eval-grpo
    python eval.py --model tiny --dataset synthetic-shifted --num_examples 500
    python eval.py --model runs/grpo --num_samples 8 --temperature 1.0     # pass@8

--model takes what train.py writes (a run's output_dir, a checkpoint-N folder, or its model/
folder), a hub id or local Qwen2.5-VL folder, or 'tiny'. The completions come from the same
sampler GRPO trains with (grpo/engine/rollout.py). Writes, into --output_dir:
    samples.jsonl   one line per example: question, gold, outputs, extracted answers, correct
    summary.json    accuracy with its 95% interval, format rate, pass@k with its own interval, counts

With k samples per prompt, accuracy is the fraction of all n*k samples that are right; its interval
is a Wilson interval over the effective number of independent samples (samples of one prompt are
correlated: between n and n*k, see clustered_wilson_interval). pass@k is the fraction of prompts with
at least one right sample; its interval is a Wilson interval over the n prompts.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from data.collators import GRPOCollator
from data.loading import check_gold_answers, check_part, load_eval_dataset
from data.sources import DataError
from grpo.config import ConfigError, DataArguments, check_pixel_range
from grpo.engine.rollout import sample_rollouts
from grpo.engine.sampling import MIN_TEMPERATURE
from grpo.reward_functions import extract_answer
from grpo.rewards import check_reward_output, example_columns, resolve_reward_functions
from grpo.runtime.device import resolve_device, seed_everything
from grpo.runtime.start_checks import (
    check_attn_implementation,
    check_dataset_source,
    check_device,
    check_model_source,
    check_reward_specs,
    check_writable,
)
from grpo.runtime.starting_point import resolve_model_path
from models.loading import ATTN_IMPLEMENTATIONS, DTYPE_NAMES, load_policy, resolve_dtype, special_token_ids


def _help(text, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class EvalArguments:
    model: str = _help("A run's output_dir, a checkpoint folder, a hub id / local Qwen2.5-VL folder, or 'tiny'.", default="tiny")
    output_dir: str = _help("Where samples.jsonl and summary.json go.", default="runs/eval")
    eval_part: str = _help(
        "Which part of --dataset to score: validation (the held-out split train.py never trains on), "
        "test (synthetic data only: a second held-out stream, never used to choose anything), train, or all.",
        default="validation",
    )
    batch_size: int = _help("Prompts per generation batch.", default=32)
    max_completion_length: int = _help("Most tokens generated per answer.", default=64)
    num_samples: int = _help("k: completions per prompt. 1 = greedy decoding; k > 1 samples and reports pass@k.", default=1)
    temperature: float = _help("Sampling temperature when --num_samples > 1.", default=1.0)
    top_p: float = _help("Nucleus threshold when sampling.", default=1.0)
    top_k: int = _help("Top-k when sampling (0 = off).", default=0)
    accuracy_reward: str = _help("The reward function that decides correctness (built-in name or module:function).", default="count_accuracy")
    format_reward: str = _help("The reward function reported as the format rate ('' to skip).", default="format")
    seed: int = _help("Seed for data generation/splitting and sampling.", default=0)
    device: str = _help("auto | cpu | cuda.", default="auto")
    dtype: str = _help("auto | float32 | bfloat16.", default="auto")
    attn_implementation: str = _help("sdpa | eager | flash_attention_2.", default="sdpa")
    max_pixels: int | None = _help("Largest image area the processor keeps.", default=None)
    min_pixels: int | None = _help("Smallest image area the processor keeps.", default=None)
    progress_bar: bool = _help("Show a progress bar.", default=True)

    def __post_init__(self):
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"--{name} {getattr(self, name)}: must be a finite number")
        if self.num_samples > 1 and self.temperature <= 0:
            raise ValueError(
                f"--num_samples {self.num_samples} with --temperature {self.temperature}: greedy decoding "
                f"gives {self.num_samples} identical copies, so pass@{self.num_samples} would be pass@1; "
                "sample with --temperature > 0 (e.g. 1.0) or use --num_samples 1 for greedy accuracy"
            )
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError("--temperature must be >= 0 and --top_p in (0, 1]")
        if self.num_samples > 1 and self.temperature < MIN_TEMPERATURE:  # logits / temperature overflow to inf
            raise ValueError(f"--temperature {self.temperature}: sample at a temperature >= {MIN_TEMPERATURE}")
        if self.eval_part not in ("validation", "test", "train", "all"):
            raise ValueError(f"--eval_part {self.eval_part!r}: use validation, test, train or all")
        if self.num_samples < 1 or self.batch_size < 1 or self.max_completion_length < 1:
            raise ValueError("--num_samples, --batch_size and --max_completion_length must be >= 1")
        if self.top_k < 0:
            raise ValueError(f"--top_k {self.top_k}: must be >= 0 (0 = off)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: use auto, cpu or cuda")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"--dtype {self.dtype!r}: use {', '.join(DTYPE_NAMES[:-1])} or {DTYPE_NAMES[-1]}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"--attn_implementation {self.attn_implementation!r}: use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
        check_pixel_range(self.min_pixels, self.max_pixels)


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (better than p ± 1.96 sqrt(p(1-p)/n) near 0 or 1)."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    denominator = 1 + z**2 / total
    centre = (p + z**2 / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z**2 / (4 * total**2)) / denominator
    # At p = 1 (or 0) the bound is exactly 1 (0) in exact arithmetic, but rounding can land it a hair
    # inside (0.9999999999999999), leaving the interval without its own estimate: keep p inside.
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def clustered_wilson_interval(correct_per_prompt: list[int], k: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval for accuracy over n prompts x k samples, when samples of one prompt are correlated.

    Accuracy p is the mean of the per-prompt fractions f_i = correct_i / k; its variance is estimated
    over prompts, var = s^2(f) / n (the prompts are the independent draws). That is the variance of
    a binomial proportion over n_eff = p(1-p) / var samples, and the Wilson interval is taken at that
    n_eff, kept in [n, n*k]: k copies of one answer carry one prompt's information (n_eff = n), k
    independent samples carry k (n_eff = n*k). With k = 1 it is the plain Wilson interval over n.
    """
    n = len(correct_per_prompt)
    if n == 0:
        return (0.0, 0.0)
    total = sum(correct_per_prompt)
    p = total / (n * k)
    if k == 1:
        return wilson_interval(total, n, z)
    fractions = [c / k for c in correct_per_prompt]
    variance_of_mean = sum((f - p) ** 2 for f in fractions) / (n - 1) / n if n > 1 else 0.0
    if n == 1 or p in (0.0, 1.0):
        n_eff = float(n)  # no spread to learn the correlation from: count prompts, the cautious choice
    elif variance_of_mean == 0.0:
        n_eff = float(n * k)
    else:
        n_eff = min(float(n * k), max(float(n), p * (1 - p) / variance_of_mean))
    # wilson_interval(p * n_eff, n_eff): the same formula at a non-integer count.
    return wilson_interval(p * n_eff, n_eff, z)


@torch.no_grad()
def evaluate(args: EvalArguments, data_args) -> dict:
    seed_everything(args.seed)
    device = resolve_device(args.device)
    source = resolve_model_path(args.model)
    model, processor = load_policy(
        source, dtype=resolve_dtype(args.dtype, device), device=device, attn_implementation=args.attn_implementation,
        max_pixels=args.max_pixels, min_pixels=args.min_pixels, seed=args.seed,
    )
    model.eval()
    tokens = special_token_ids(model, processor)
    # The same --max_pixels downscaling of the images as train.py applies (data/loading.py).
    dataset, report = load_eval_dataset(data_args, part=args.eval_part, seed=args.seed, max_pixels=args.max_pixels)
    check_gold_answers(dataset, [args.accuracy_reward], data_args.dataset)  # fail now, not at the batch that holds it
    collator = GRPOCollator(processor, system_prompt=data_args.system_prompt_text)
    names = [args.accuracy_reward] + ([args.format_reward] if args.format_reward else [])
    (accuracy_name, accuracy_fn), *format_fn = resolve_reward_functions(names)
    generator = torch.Generator().manual_seed(args.seed)
    greedy = args.num_samples == 1
    k = args.num_samples

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    totals = {"examples": 0, "pass": 0, "correct_samples": 0, "formatted_samples": 0, "samples": 0}
    correct_per_prompt = []
    progress = tqdm(total=len(dataset), desc="eval", disable=not args.progress_bar)
    with open(out_dir / "samples.jsonl", "w") as samples_file:
        for start in range(0, len(dataset), args.batch_size):
            examples = [dataset[i] for i in range(start, min(start + args.batch_size, len(dataset)))]
            batch = collator(examples)
            batch_on_device = {key: v.to(device) for key, v in batch.items() if isinstance(v, torch.Tensor)}
            rollout = sample_rollouts(
                model, batch_on_device, group_size=k, max_new_tokens=args.max_completion_length,
                eos_token_ids=tokens.eos_token_ids, pad_token_id=tokens.pad_token_id,
                temperature=0.0 if greedy else args.temperature, top_p=args.top_p, top_k=args.top_k, generator=generator,
            )
            outputs = processor.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            answers = [a for a in batch["answers"] for _ in range(k)]
            columns = example_columns(examples, k)  # questions, images, image_paths, every other column
            # Checked as training checks them: one finite number (or None) per completion, named if not.
            correct = check_reward_output(accuracy_name, accuracy_fn(outputs, answers, **columns), len(outputs))
            if all(math.isnan(value) for value in correct):  # None for every one: an accuracy of 0 would be made up
                raise ValueError(
                    f"--accuracy_reward {accuracy_name}: returned None for every one of the {len(outputs)} completions of "
                    f"examples {start}-{start + len(examples) - 1}, so it scored none; None is for a completion it cannot "
                    "score: return 0.0 for a wrong one"
                )
            formatted = (
                check_reward_output(format_fn[0][0], format_fn[0][1](outputs, answers, **columns), len(outputs))
                if format_fn else [0.0] * len(outputs)
            )  # fmt: skip
            for i, example in enumerate(examples):
                rows = range(i * k, (i + 1) * k)
                # None (NaN here: a reward that cannot score the answer, e.g. unparsable) counts as not correct
                is_correct = [bool(correct[r] > 0) for r in rows]  # NaN > 0 is False
                totals["examples"] += 1
                totals["pass"] += int(any(is_correct))
                totals["correct_samples"] += sum(is_correct)
                correct_per_prompt.append(sum(is_correct))
                totals["formatted_samples"] += sum(bool(formatted[r] > 0) for r in rows)
                totals["samples"] += k
                record = {
                    "question": example["question"],
                    "gold": example["answer"],
                    "outputs": [outputs[r] for r in rows],
                    "extracted": [extract_answer(outputs[r]) for r in rows],
                    "correct": is_correct,
                }
                samples_file.write(json.dumps(record) + "\n")
            progress.update(len(examples))
    progress.close()

    n = totals["examples"]
    accuracy = totals["correct_samples"] / max(totals["samples"], 1)
    low, high = clustered_wilson_interval(correct_per_prompt, k)  # accuracy's own interval
    pass_low, pass_high = wilson_interval(totals["pass"], n)  # pass@k's: over the n prompts
    summary = {
        "model": source,
        "dataset": data_args.dataset,
        "eval_part": args.eval_part,
        "num_examples": n,
        "skipped_images": report.skipped_images,
        "accuracy": accuracy,
        "accuracy_ci95": [low, high],
        "format_rate": totals["formatted_samples"] / max(totals["samples"], 1),
        "num_samples": k,
        f"pass@{k}": totals["pass"] / max(n, 1),
        f"pass@{k}_ci95": [pass_low, pass_high],
        "decoding": "greedy" if greedy else f"sampling (temperature {args.temperature}, top_p {args.top_p}, top_k {args.top_k})",
        "seconds": time.perf_counter() - started,
        "args": asdict(args),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"[eval] {source} on {data_args.dataset} ({args.eval_part}, n={n}): accuracy {accuracy:.3f} "
        f"(95% CI {low:.3f}-{high:.3f}{f', over {n} prompts x {k} samples' if k > 1 else ''}), "
        f"format {summary['format_rate']:.3f}"
        + (f", pass@{k} {summary[f'pass@{k}']:.3f} (95% CI {pass_low:.3f}-{pass_high:.3f})" if k > 1 else ""),
        flush=True,
    )
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((EvalArguments, DataArguments))
    try:
        args, data_args = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
        check_model_source("--model", args.model)
        check_attn_implementation("--attn_implementation", args.attn_implementation)
        check_device("--device", args.device)
        check_reward_specs("--accuracy_reward", [args.accuracy_reward])
        if args.format_reward:
            check_reward_specs("--format_reward", [args.format_reward])
        check_dataset_source(data_args)
        check_part(data_args, args.eval_part)  # a part this data cannot give, before the model loads
        check_writable("--output_dir", args.output_dir)
    except (ConfigError, ValueError) as error:
        print(f"eval.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return evaluate(args, data_args)
    except DataError as error:  # a bad row, column or file of --dataset
        print(f"eval.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
