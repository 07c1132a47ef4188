"""What train.py and eval.py check before they load a model: mistakes of the command line that would
otherwise surface minutes later, after the model and the data have loaded, as a traceback.

- the reward functions resolve (built-in names, `module:function` imports);
- `--model` / `--init_from` name a preset, an existing folder, or a Hub id that can be reached
  (offline, a Hub id must already be in the local cache);
- `--output_dir` can be written to (a probe file in it, or in the nearest folder above it that exists).

Each raises `ConfigError`, which the scripts turn into `error: ...` and exit code 2.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from huggingface_hub import constants, try_to_load_from_cache

from grpo.config import Config, ConfigError
from grpo.rewards import resolve_reward_functions
from models.loading import TINY_PRESETS


def check_reward_specs(flag: str, names: list[str], **settings) -> None:
    """Import every reward function now (fails on unknown names, modules and attributes).
    settings: what some built-ins need bound (grpo.rewards.resolve_reward_functions)."""
    try:
        resolve_reward_functions(names, **settings)
    except (ValueError, ImportError, AttributeError, TypeError) as error:
        message = str(error)
        raise ConfigError(message if message.startswith(flag) else f"{flag}: {message}") from None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_model_source(flag: str, value: str) -> None:
    """A preset name, an existing path, or an owner/name Hub id (in the cache, when offline)."""
    if value in TINY_PRESETS or Path(value).expanduser().exists():
        return  # a folder that holds no model is reported by resolve_model_path with what it expected
    if value.startswith((".", "/", "~")) or value.count("/") != 1:
        raise ConfigError(
            f"{flag} {value}: no such directory, and not a Hub id (owner/name) or a preset "
            f"({', '.join(sorted(TINY_PRESETS))})"
        )
    if _hub_offline():
        cache_dir = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
        if not isinstance(try_to_load_from_cache(value, "config.json", cache_dir=cache_dir), str):
            raise ConfigError(
                f"{flag} {value}: not a local directory, and not in the local cache ({cache_dir}) while the "
                "Hub is offline (HF_HUB_OFFLINE=1); download it where the Hub can be reached "
                f"(huggingface-cli download {value}) or pass a local folder written by save_pretrained"
            )


def check_writable(flag: str, output_dir: str) -> None:
    """Write (and remove) a probe file where the run will write, without creating output_dir."""
    target = Path(output_dir).expanduser()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {output_dir}: {existing} is a file, not a folder; choose another {flag}")
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".write-probe-", dir=existing)
    except OSError as error:
        raise ConfigError(
            f"{flag} {output_dir}: cannot write in {existing} ({error.strerror}); choose a writable {flag}"
        ) from None
    os.close(descriptor)
    os.unlink(probe)


def check_before_loading(config: Config) -> None:
    """Everything about train.py's command line that can be checked without the model or the data."""
    if config.train.stage == "grpo":
        grpo = config.grpo
        check_reward_specs(
            "--reward_functions", grpo.reward_function_names, max_completion_length=grpo.max_completion_length,
            overlong_buffer_length=grpo.overlong_buffer_length,
        )
    if config.train.stage == "sft" and config.sft.eval_accuracy_reward:
        check_reward_specs("--eval_accuracy_reward", [config.sft.eval_accuracy_reward])
    check_model_source("--model", config.model.model)
    if config.model.init_from:
        check_model_source("--init_from", config.model.init_from)
    check_writable("--output_dir", config.train.output_dir)
