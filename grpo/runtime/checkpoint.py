"""Atomic checkpoints and resume: a `kill -9` during a save never leaves a run without a loadable one.

Layout of one checkpoint (written by rank 0 only):

    output_dir/checkpoint-00000050/
        model/              save_pretrained of the policy (safetensors + config) and the processor
                            files: loadable by plain transformers (`from_pretrained(".../model")`)
        trainer_state.pt    optimizer, scheduler, step, data position, RNG states, user `extra`
        run_config.json     the run's configuration (its stage included)
        COMPLETE            written last; a folder without it is not a checkpoint

How a save stays atomic:
1. clean up what an earlier crash left (`.tmp-checkpoint-*`, `checkpoint-*` without COMPLETE);
2. write everything into `output_dir/.tmp-checkpoint-{step}-{pid}`, fsync every file;
3. write COMPLETE, fsync it and the folder;
4. `os.replace` the folder to `checkpoint-{step:08d}` (a rename: atomic on POSIX filesystems),
   fsync `output_dir`;
5. only then delete checkpoints beyond `keep_last` (COMPLETE first, so a half-deleted folder is
   never taken for a checkpoint).
A crash before 4 leaves a `.tmp-` folder the finder ignores; after 4 the new checkpoint is whole.
Saving a step that already has a checkpoint moves the old one aside (`.replaced-...`) for the
instant between two renames; the finder falls back to it if a crash lands exactly there.

Resume: `check_output_dir` decides (fresh / resume / overwrite) and returns the checkpoint; the
loop loads weights from `checkpoint/model`, then `load_trainer_state` restores the optimizer,
scheduler and RNG and returns the step and data position to continue from.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

COMPLETE_MARKER = "COMPLETE"
MODEL_DIR = "model"
TRAINER_STATE = "trainer_state.pt"
RUN_CONFIG = "run_config.json"
FORMAT_VERSION = 1

_FINAL_PATTERN = re.compile(r"checkpoint-(\d+)")
_REPLACED_PATTERN = re.compile(r"\.replaced-checkpoint-(\d+)-\d+")
_TMP_PREFIX = ".tmp-checkpoint-"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


# --- RNG state ---


def capture_rng_state() -> dict:
    """This process's RNG states: python `random`, numpy's global RNG, torch CPU, the current CUDA device.

    Stored as plain values and tensors so that `torch.load(weights_only=True)` reads them back.
    """
    name, key, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "key": torch.from_numpy(key.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        # Only this rank's current device: asking for every device's state would create a CUDA
        # context (hundreds of MB) on GPUs that belong to other ranks.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def restore_rng_state(state: dict) -> None:
    """Put back what `capture_rng_state` captured; the next random numbers repeat the saved run's."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["key"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda_state = state.get("cuda")
    if cuda_state is not None:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_state)  # the current device (cuda:LOCAL_RANK)
        else:
            warnings.warn("the checkpoint holds a CUDA RNG state but CUDA is not available; skipped", stacklevel=2)


# --- finding checkpoints ---


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first. Temporary and
    incomplete folders are ignored."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found: dict[int, Path] = {}
    replaced: dict[int, Path] = {}
    for path in output_dir.iterdir():
        if not path.is_dir() or not _is_complete(path):
            continue
        if match := _FINAL_PATTERN.fullmatch(path.name):
            found[int(match.group(1))] = path
        elif match := _REPLACED_PATTERN.fullmatch(path.name):
            replaced[int(match.group(1))] = path
    # A crash between "move the old checkpoint-N aside" and "rename the new one in".
    for step, path in replaced.items():
        found.setdefault(step, path)
    return sorted(found.items())


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


# --- writing ---


def _fsync_path(path: Path) -> None:
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY
    try:
        descriptor = os.open(path, flags)
    except OSError:  # some platforms cannot open folders; the data files were synced anyway
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (save_pretrained does not)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def _remove_checkpoint_dir(path: Path) -> None:
    # The marker goes first: a kill during rmtree then leaves a folder nobody takes for a checkpoint.
    (path / COMPLETE_MARKER).unlink(missing_ok=True)
    _fsync_path(path)
    shutil.rmtree(path, ignore_errors=True)


def _clean_up_after_crashes(output_dir: Path) -> None:
    """Remove what an interrupted save or prune left behind (only one process saves to a folder)."""
    for path in output_dir.iterdir():
        if not path.is_dir():
            continue
        if path.name.startswith(_TMP_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
        elif _FINAL_PATTERN.fullmatch(path.name) and not _is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
        elif match := _REPLACED_PATTERN.fullmatch(path.name):
            final = output_dir / checkpoint_name(int(match.group(1)))
            if _is_complete(path) and not final.exists():
                os.replace(path, final)  # the crash came between the two renames: put it back
            else:
                _remove_checkpoint_dir(path)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module to save_pretrained: DDP's `.module`, torch.compile's `._orig_mod`."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _check_loadable(name: str, value) -> None:
    """Fail at save time, not at resume, when a user dict will not load with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as error:
        raise TypeError(
            f"save_checkpoint: {name} must hold only plain Python values (dict, list, str, int, "
            f"float, bool, None) and tensors, so it loads with torch.load(weights_only=True); "
            f"convert numpy values with .item()/.tolist(). Loading it failed with: {error}"
        ) from None


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC / EDQUOT, or how torch.save and safetensors report a short write on a full disk."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return isinstance(error, Exception) and any(
        sign in text for sign in ("No space left on device", "unexpected pos", "file write failed", "os error 28")
    )


def _disk_full_error(output_dir: Path, step: int) -> OSError:
    """A full disk named: where, which step, and what is still there to resume from."""
    latest = latest_checkpoint(output_dir)
    kept = (
        f"{latest.name} (step {json.loads((latest / COMPLETE_MARKER).read_text())['step']}) is kept, complete"
        if latest is not None else "no earlier checkpoint exists"
    )
    return OSError(
        errno.ENOSPC,
        f"no space left on the device of --output_dir {output_dir} while saving step {step}; the partial "
        f"save was removed and {kept}. Free space there (or lower --save_total_limit) and rerun with --resume",
    )


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    processor=None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    data_state: dict | None = None,
    run_config: dict | None = None,
    extra: dict | None = None,
    keep_last: int = 2,
    model_to_save: torch.nn.Module | None = None,
    rng_states: list[dict] | None = None,
) -> Path:
    """Write `output_dir/checkpoint-{step:08d}` atomically and keep only the newest `keep_last`.

    Call on rank 0 only. `model_to_save` replaces `model` for save_pretrained (e.g. a LoRA-merged
    copy); DDP and torch.compile wrappers are unwrapped. `rng_states`: one `capture_rng_state()`
    per rank in rank order (gather them with `distributed.all_gather_object`); default: this
    process's state only. `data_state` and `extra` must be plain values and tensors.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last (--save_total_limit) must be >= 1, got {keep_last}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _clean_up_after_crashes(output_dir)
    _check_loadable("data_state", data_state)
    _check_loadable("extra", extra)

    final = output_dir / checkpoint_name(step)
    temporary = output_dir / f"{_TMP_PREFIX}{step}-{os.getpid()}"
    temporary.mkdir()
    try:
        _unwrap(model_to_save if model_to_save is not None else model).save_pretrained(temporary / MODEL_DIR)
        if processor is not None:
            processor.save_pretrained(temporary / MODEL_DIR)
        trainer_state = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "data_state": data_state,
            "rng_states": rng_states if rng_states is not None else [capture_rng_state()],
            "extra": extra if extra is not None else {},
        }
        torch.save(trainer_state, temporary / TRAINER_STATE)
        (temporary / RUN_CONFIG).write_text(json.dumps(run_config or {}, indent=2, default=str))
        _fsync_tree(temporary)
        # The marker is written last: its presence means every other file is whole on disk.
        (temporary / COMPLETE_MARKER).write_text(json.dumps({"step": int(step)}) + "\n")
        _fsync_path(temporary / COMPLETE_MARKER)
        _fsync_path(temporary)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if _is_disk_full(error):
            raise _disk_full_error(output_dir, step) from error
        raise

    replaced = None
    if final.exists():  # saving the same step twice: move the old one aside for one rename
        replaced = output_dir / f".replaced-{final.name}-{os.getpid()}"
        os.replace(final, replaced)
    os.replace(temporary, final)
    _fsync_path(output_dir)
    if replaced is not None:
        _remove_checkpoint_dir(replaced)

    # --- prune: only now that the new checkpoint is complete ---
    older = [path for _, path in list_checkpoints(output_dir) if path != final]
    for path in older[: max(0, len(older) - (keep_last - 1))]:
        _remove_checkpoint_dir(path)
    return final


# --- loading ---


KERNEL_KEYS = ("fused", "foreach")  # how AdamW runs, not what it computes


def _with_this_runs_kernels(saved: dict | None, optimizer) -> dict | None:
    """The saved optimizer state with this run's AdamW kernel choice in its param_groups.

    torch's load_state_dict takes every group setting from the checkpoint, so without this a
    checkpoint from an FSDP run (default kernel, DTensor shards) would turn a plain run's fused
    kernel off, and a plain run's checkpoint would ask FSDP's shards for the fused kernel."""
    if saved is None:
        return None
    current = getattr(optimizer, "optimizer", optimizer).param_groups  # FullStateOptimizer wraps one
    groups = [
        {**group, **{key: mine[key] for key in KERNEL_KEYS if key in mine}}
        for group, mine in zip(saved["param_groups"], current, strict=False)
    ]
    return {**saved, "param_groups": groups}


def _load_into(name: str, target, state, checkpoint_dir: Path) -> None:
    if state is None:
        raise ValueError(f"checkpoint {checkpoint_dir} holds no {name} state; it was saved without one")
    try:
        target.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(
            f"the {name} state in {checkpoint_dir} does not fit this run's {name} ({error}); resume "
            "with the same trainable parameters (--freeze_policy, LoRA settings) and optimizer settings"
        ) from error


def damaged_checkpoint_error(checkpoint_dir: str | os.PathLike, file: str | os.PathLike, error: BaseException) -> RuntimeError:
    """A checkpoint marked COMPLETE whose file cannot be read (truncated by a copy, a disk fault):
    name the file, and offer the previous complete checkpoint (moving the damaged one aside, so
    that --resume takes the previous one; nothing is deleted)."""
    checkpoint_dir = Path(checkpoint_dir)
    older = [path for _, path in list_checkpoints(checkpoint_dir.parent) if path.name < checkpoint_dir.name]
    fallback = (
        f"The previous complete checkpoint is {older[-1]}: move the damaged one aside "
        f"(mv {checkpoint_dir} {checkpoint_dir.parent / ('damaged-' + checkpoint_dir.name)}) and rerun with --resume "
        "to continue from it"
        if older else "There is no earlier checkpoint to fall back to; restore the file from a copy, or start over"
    )
    return RuntimeError(
        f"checkpoint {checkpoint_dir} is marked complete but {file} cannot be read "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): the file is damaged "
        f"(truncated by a copy or a full disk?). {fallback}."
    )


def load_trainer_state(
    checkpoint_dir: str | os.PathLike,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    restore_rng: bool = True,
    rank: int = 0,
) -> dict:
    """Restore optimizer, scheduler and (this rank's) RNG from a checkpoint; return the rest.

    Returns {"step", "data_state", "extra", "run_config", "model_dir"}. Model weights are not
    touched: load them from `model_dir` (before building the optimizer, or into the live model).
    A rank with no saved RNG state (the job grew) keeps its own seeding, with a warning.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not _is_complete(checkpoint_dir):
        raise FileNotFoundError(
            f"{checkpoint_dir} is not a complete checkpoint (no {COMPLETE_MARKER} file); pass a "
            "checkpoint-N folder, or use latest_checkpoint(output_dir)"
        )
    try:
        state = torch.load(checkpoint_dir / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or corrupted file: say which, and what is left
        raise damaged_checkpoint_error(checkpoint_dir, checkpoint_dir / TRAINER_STATE, error) from error
    if optimizer is not None:
        _load_into("optimizer", optimizer, _with_this_runs_kernels(state["optimizer"], optimizer), checkpoint_dir)
    if scheduler is not None:
        _load_into("scheduler", scheduler, state["scheduler"], checkpoint_dir)
    if restore_rng:
        rng_states = state["rng_states"]
        if rank < len(rng_states):
            restore_rng_state(rng_states[rank])
        else:
            warnings.warn(
                f"{checkpoint_dir} holds RNG states for {len(rng_states)} ranks; rank {rank} keeps "
                "its fresh seeding, so sampling will not repeat the interrupted run exactly",
                stacklevel=2,
            )
    return {
        "step": state["step"],
        "data_state": state["data_state"],
        "extra": state["extra"],
        "run_config": json.loads((checkpoint_dir / RUN_CONFIG).read_text()),
        "model_dir": checkpoint_dir / MODEL_DIR,
    }


def _stage_of(run_config: dict) -> str | None:
    """The stage recorded in run_config.json: top-level "stage", or "train"."stage" (Config.to_dict())."""
    if "stage" in run_config:
        return run_config["stage"]
    train = run_config.get("train")
    return train.get("stage") if isinstance(train, dict) else None


def check_output_dir(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool, stage: str) -> Path | None:
    """Decide how a run starts in `output_dir`; returns the checkpoint to resume from, or None.

    - No checkpoint there: None (a fresh run). With --resume a warning says so (a relaunch after a
      crash before the first save lands here).
    - Checkpoints and neither flag: an error naming both flags.
    - --resume: the latest complete checkpoint, if its stage is `stage`.
    - --overwrite_output_dir: the old checkpoints (and crash leftovers) are deleted; None. Other
      files (metrics.jsonl, samples.log) are left for their loggers to truncate.
    """
    if resume and overwrite:
        raise ValueError("pass only one of --resume and --overwrite_output_dir")
    output_dir = Path(output_dir)
    existing = sorted(path for path in output_dir.glob("checkpoint-*") if path.is_dir()) if output_dir.is_dir() else []
    latest = latest_checkpoint(output_dir)
    if overwrite:
        if output_dir.is_dir():
            for path in output_dir.iterdir():
                if path.is_dir() and (
                    _FINAL_PATTERN.fullmatch(path.name)
                    or _REPLACED_PATTERN.fullmatch(path.name)
                    or path.name.startswith(_TMP_PREFIX)
                ):
                    _remove_checkpoint_dir(path)
        return None
    if latest is None and existing:
        raise FileExistsError(
            f"output_dir {output_dir} holds checkpoint folders that are not complete checkpoints of "
            f"this trainer ({', '.join(path.name for path in existing[:3])}); pass "
            "--overwrite_output_dir to delete them or choose another --output_dir"
        )
    if latest is None:
        if resume:
            warnings.warn(
                f"--resume: {output_dir} holds no complete checkpoint; starting a new run", stacklevel=2
            )
        return None
    if not resume:
        raise FileExistsError(
            f"output_dir {output_dir} already holds a run ({latest.name}); pass --resume to continue "
            "it or --overwrite_output_dir to start over"
        )
    run_config = json.loads((latest / RUN_CONFIG).read_text())
    saved_stage = _stage_of(run_config)
    if saved_stage is not None and saved_stage != stage:
        raise ValueError(
            f"stage/checkpoint mismatch: {latest} was written by --stage {saved_stage} but this run "
            f"is --stage {stage}; to start {stage} from it, pass --init_from {latest} with a new "
            "--output_dir"
        )
    return latest
