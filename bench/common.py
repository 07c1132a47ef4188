"""Helpers shared by the benchmarks: machine description, batches of synthetic prompts, peak memory.

Not a benchmark itself. Every benchmark in bench/ runs as one command from the repository root
(see docs/benchmarks.md); this module only keeps them from repeating each other.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def machine_info() -> str:
    """One line: CPU model, cores, torch / transformers versions, date (UTC)."""
    import torch
    import transformers

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, {date}")


def never_sampled_eos(model) -> int:
    """An EOS id no sampler can ever emit: one past the vocabulary (logits have V columns).

    Passing it as the only EOS id forces every completion to run to max_new_tokens in both our
    sampler (`torch.isin(token, eos)` is never true) and `model.generate` (its EOS stopping
    criterion never fires), while both still sample from the model's full, unmodified
    distribution. Real EOS tokens are then ordinary tokens.
    """
    config = getattr(model, "module", model).config
    return int(config.get_text_config().vocab_size) + 1


def counting_batch(processor, num_prompts: int, seed: int = 0, offset: int = 0, image_size: int = 112) -> dict:
    """A collated GRPO batch of `num_prompts` synthetic counting prompts (examples offset.. offset+B)."""
    from data.collators import GRPOCollator
    from data.synthetic import make_counting_dataset

    dataset = make_counting_dataset(offset + num_prompts, seed=seed, image_size=image_size)
    examples = [dataset[i] for i in range(offset, offset + num_prompts)]
    return GRPOCollator(processor)(examples)


def tensors_only(batch: dict) -> dict:
    import torch

    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def median(values) -> float:
    return float(statistics.median(values))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_preset(preset: str, directory: str | os.PathLike) -> str:
    """Write a tiny preset ("tiny" | "tiny-small") with save_pretrained, so TRL can load it by path."""
    from models.loading import TINY_PRESETS
    from models.tiny import build_tiny_policy

    model, processor = build_tiny_policy(seed=0, size=TINY_PRESETS[preset])
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)
