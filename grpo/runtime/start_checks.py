"""What train.py and eval.py check before they load a model: mistakes of the command line that would
otherwise surface minutes later, after the model and the data have loaded, as a traceback.

- the reward functions resolve (built-in names, `module:function` imports);
- `--model` / `--init_from` name a preset, an existing folder holding a Qwen2.5-VL (its config.json), or a Hub id that can be reached
  (offline, a Hub id must already be in the local cache; a relative path whose first folder
  exists here, such as runs/nothere, is a missing folder, not a Hub id);
- a local `--dataset` exists, is a file type the loader reads and holds rows; `--image_root` exists;
- `--decode cuda_graph` and `--device cuda` have CUDA; `--attn_implementation flash_attention_2` has flash-attn;
- `--output_dir` is given (not '', as an unset shell variable makes it) and can be written to (a
  probe file in it, or in the nearest folder above it that exists);
- `--resume` changes no flag that changes what a step computes (RESUMABLE lists those that may change);
- `--overwrite_output_dir` would not delete the model the run starts from (a checkpoint inside
  `--output_dir`, named by `--init_from` / `--model`).

Each raises `ConfigError`, which the scripts turn into `error: ...` and exit code 2.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch
from huggingface_hub import constants, try_to_load_from_cache

from data.loading import SYNTHETIC, check_not_empty
from grpo.config import Config, ConfigError
from grpo.rewards import resolve_reward_functions
from grpo.runtime.checkpoint import RUN_CONFIG, _stage_of, latest_checkpoint
from grpo.runtime.starting_point import resolve_model_path
from models.loading import TINY_PRESETS, check_model_type


def check_reward_specs(flag: str, names: list[str], **settings) -> None:
    """Import every reward function now (fails on unknown names, modules and attributes).
    settings: what some built-ins need bound (grpo.rewards.resolve_reward_functions)."""
    try:
        resolve_reward_functions(names, flag=flag, **settings)
    except (ValueError, ImportError, AttributeError, TypeError) as error:
        message = str(error)
        raise ConfigError(message if message.startswith(flag) else f"{flag}: {message}") from None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cache_dir() -> str:
    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _in_hub_cache(repo_id: str) -> bool:
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=_hub_cache_dir()), str)
    except ValueError:  # not a valid repo id
        return False


def check_decode_device(config: Config) -> None:
    """--decode cuda_graph captures CUDA graphs: refuse it where the run will not be on CUDA."""
    if config.train.stage != "grpo" or config.grpo.decode != "cuda_graph":
        return
    if config.train.device == "cpu" or not torch.cuda.is_available():
        raise ConfigError(
            f"--decode cuda_graph needs CUDA, but this run is on the CPU (--device {config.train.device}"
            + ("" if config.train.device == "cpu" else ", and no CUDA device is visible")
            + "); use --decode auto (dynamic on the CPU), dynamic or static"
        )


def check_device(flag: str, value: str) -> None:
    """--device cuda where no CUDA device is visible: refused here, not as a traceback at the start of the run."""
    if value == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{flag} cuda: no CUDA device is visible here; use {flag} cpu or auto")


def check_attn_implementation(flag: str, value: str) -> None:
    """flash_attention_2 needs the flash_attn package; without it transformers fails at load time,
    after output_dir was made."""
    if value == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            f"{flag} flash_attention_2 needs the flash-attn package, which is not installed: pip install "
            f"flash-attn (CUDA only), or use {flag} sdpa (the default) or eager"
        )


def check_model_source(flag: str, value: str) -> None:
    """A preset name, an existing path, or an owner/name Hub id (in the cache, when offline)."""
    if not value.strip():  # Path("") is ".": it read as the working directory
        raise ConfigError(f"{flag} is empty (an unset shell variable?); give the model folder, a Hub id or a preset")
    if value in TINY_PRESETS:
        return
    if Path(value).expanduser().exists():
        check_local_model(flag, value)
        return
    if value.startswith((".", "/", "~")) or value.count("/") != 1:
        raise ConfigError(
            f"{flag} {value}: no such directory, and not a Hub id (owner/name) or a preset "
            f"({', '.join(sorted(TINY_PRESETS))})"
        )
    owner = Path(value).parent  # runs/nothere: "runs" is a folder here, so a local path was meant
    if owner.is_dir() and not _in_hub_cache(value):
        raise ConfigError(
            f"{flag} {value}: no such directory (./{owner} exists, so it reads as a local path, not the Hub id "
            f"{value}); check the folder name, or run from a folder without ./{owner} to fetch it from the Hub"
        )
    if _hub_offline():
        if not _in_hub_cache(value):
            raise ConfigError(
                f"{flag} {value}: not a local directory, and not in the local cache ({_hub_cache_dir()}) while the "
                "Hub is offline (HF_HUB_OFFLINE=1); download it where the Hub can be reached "
                f"(huggingface-cli download {value}) or pass a local folder written by save_pretrained"
            )


def check_local_model(flag: str, value: str) -> None:
    """A local --model / --init_from holds a Qwen2.5-VL: its config.json read now, not the weights later."""
    try:
        folder = Path(resolve_model_path(str(Path(value).expanduser())))
    except FileNotFoundError as error:
        raise ConfigError(f"{flag} {error}") from None
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(f"{flag} {value}: cannot read {folder / 'config.json'} ({error})") from None
    try:
        check_model_type(flag, f"{value}: {folder / 'config.json'}", model_type)
    except ValueError as error:
        raise ConfigError(str(error)) from None


DATA_FILE_TYPES = (".parquet", ".jsonl", ".json")  # what data/sources.py reads from a local file


def check_dataset_source(data_args) -> None:
    """A local --dataset that is not there, or an --image_root that is not a folder: named now, not by
    the loader once the model has loaded (data/sources.py reads a name with one '/' as a Hub dataset)."""
    source = data_args.dataset
    if source not in SYNTHETIC and not Path(source).exists():
        looks_local = Path(source).suffix.lower() in (".parquet", ".jsonl", ".json", ".arrow")
        if looks_local or source.startswith((".", "/", "~")) or source.count("/") != 1:
            raise ConfigError(
                f"--dataset {source}: no such file or folder, and not a Hub dataset (owner/name); check the path, "
                f"or use --dataset {SYNTHETIC[0]} for the built-in scenes"
            )
    path = Path(source)
    if path.is_file() and path.suffix.lower() not in DATA_FILE_TYPES:
        raise ConfigError(f"--dataset {source}: a {path.suffix or 'suffix-less'} file; give a {', '.join(DATA_FILE_TYPES)} file")
    saved = ("dataset_info.json", "state.json", "dataset_dict.json")  # save_to_disk's folders
    if path.is_dir() and not any((path / name).exists() for name in saved):
        if not any(file.suffix.lower() in DATA_FILE_TYPES for file in path.rglob("*")):
            raise ConfigError(
                f"--dataset {source}: a folder with no save_to_disk dataset and no {', '.join(DATA_FILE_TYPES)} files in it"
            )
    try:
        check_not_empty(source)  # an empty jsonl or parquet file, or a folder of them
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if data_args.image_root is not None and not Path(data_args.image_root).is_dir():
        raise ConfigError(f"--image_root {data_args.image_root}: no such folder (the one the jsonl's image paths are under)")


def check_writable(flag: str, output_dir: str) -> None:
    """Write (and remove) a probe file where the run will write, without creating output_dir."""
    if not output_dir.strip():  # Path("") is ".": the run would write into the working directory
        raise ConfigError(
            f"{flag} is empty (an unset shell variable, e.g. {flag} $OUT?); give the folder to write to, "
            f"e.g. {flag} runs/grpo"
        )
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


def check_overwrite_spares_the_start(config: Config) -> None:
    """--overwrite_output_dir deletes output_dir's checkpoints before the model loads: refuse when
    the model the run starts from (--init_from, else --model) is one of them."""
    if not config.train.overwrite_output_dir:
        return
    flag, argument = ("--init_from", config.model.init_from) if config.model.init_from else ("--model", config.model.model)
    try:
        source = Path(resolve_model_path(argument)).expanduser()
    except FileNotFoundError:
        return  # a folder without a model: resolve_model_path says what it expected, when the model loads
    if not source.exists():
        return  # a preset or a Hub id
    output_dir = Path(config.train.output_dir).expanduser().resolve()
    source = source.resolve()
    if source != output_dir and output_dir in source.parents:
        raise ConfigError(
            f"{flag} {argument} is {source}, inside --output_dir {config.train.output_dir}, and "
            "--overwrite_output_dir would delete it before it loads; write the new run to another --output_dir "
            f"(or copy {source} out of it first)"
        )


# Flags a resumed run may change: where and how often it saves and logs, how far it goes, how fast
# it computes the same numbers. Every other flag must be the checkpoint's, or the resumed run is
# not the run it continues (a changed --num_generations, --learning_rate, --seed ... would silently
# start another one halfway). --model / --init_from: grpo/runtime/starting_point.py checks them.
RESUMABLE = {
    "model": {"model", "init_from", "attn_implementation", "gradient_checkpointing"},
    "train": {
        "output_dir", "max_steps", "save_steps", "save_total_limit", "resume", "overwrite_output_dir", "logging_steps",
        "report_to", "progress_bar", "skip_preflight", "max_nonfinite_steps", "device", "fsdp",
    },
    "grpo": {"sample_log_steps", "decode", "shared_prompt_forward", "reuse_frozen_image_features"},
    "sft": {"eval_steps", "max_eval_examples", "eval_accuracy_reward", "early_stopping_patience", "early_stopping_min_delta"},
    "data": set(),
}  # fmt: skip


def check_resume_settings(config: Config) -> None:
    """--resume: refuse a flag that differs from the latest checkpoint's run_config.json (outside
    RESUMABLE), naming it, both values and the two ways on."""
    if not config.train.resume:
        return
    checkpoint = latest_checkpoint(config.train.output_dir)
    if checkpoint is None:
        return  # a fresh start (check_output_dir warns)
    try:
        saved = json.loads((checkpoint / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return  # unreadable: the resume itself reports it
    stage = config.train.stage
    if _stage_of(saved) not in (None, stage):
        return  # check_output_dir names the stage mismatch
    current = json.loads(json.dumps(config.to_dict(), default=str))  # as run_config.json holds it
    groups = ("model", "data", "train", stage)
    changed = [
        (name, saved[group][name], value)
        for group in groups
        if isinstance(saved.get(group), dict)
        for name, value in current[group].items()
        if name not in RESUMABLE[group] and name in saved[group] and saved[group][name] != value
    ]
    # --max_steps may change under any schedule: a longer run continues the lr from where the
    # checkpoint's run left it and decays it over the added steps, never above it
    # (grpo/runtime/optimizer.py, extend_schedule_on_resume); a shorter one stops sooner.
    if changed:
        listed = ", ".join(f"--{name} {new} (the run has {old})" for name, old, new in changed)
        may_change = sorted(
            name for group in groups for name in RESUMABLE[group] if name not in ("resume", "overwrite_output_dir")
        )
        raise ConfigError(
            f"--resume: {listed}; a resumed run must compute the steps the run would have, so resume with "
            f"the run's values (its {checkpoint / RUN_CONFIG}), or start a new run from the checkpoint "
            f"(--init_from {checkpoint} --output_dir NEW). Flags that may change on resume: "
            + ", ".join(f"--{name}" for name in may_change)
        )


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
    check_decode_device(config)
    check_device("--device", config.train.device)
    check_attn_implementation("--attn_implementation", config.model.attn_implementation)
    check_model_source("--model", config.model.model)
    if config.model.init_from:
        check_model_source("--init_from", config.model.init_from)
    check_dataset_source(config.data)
    check_writable("--output_dir", config.train.output_dir)
    check_overwrite_spares_the_start(config)
    check_resume_settings(config)
