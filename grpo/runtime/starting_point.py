"""Which model a run started from (GRPO's KL reference, LoRA's base), recorded in every checkpoint.

The KL term compares the policy with the stage's starting point: --init_from, else --model. A
resumed run must compare with that same model, not with whatever the command line names now: a
run resumed without --init_from would take --model's weights as its reference (the KL jumps), and
`--init_from runs/sft` means that folder's *latest* checkpoint, which moves when the SFT run goes
on. So the first launch records the starting point in each checkpoint's run_config.json,

    "starting_point": {"flag": "--init_from", "argument": "runs/sft",
                       "path": "/abs/runs/sft/checkpoint-00000400/model", "fingerprint": "sha256:..."}

and `--resume` loads `path` (whatever --init_from says, or without it), checks the fingerprint,
and refuses when that model is gone, has changed, or --init_from now names another one. The
fingerprint is a SHA-256 of the loaded weights (names, dtypes, shapes, bytes), so it works alike for
a model folder, a checkpoint and a built-in preset, and costs one pass over the weights.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from grpo.runtime.checkpoint import latest_checkpoint


def resolve_model_path(path: str) -> str:
    """A model folder, a checkpoint folder (holding model/), or a run's output_dir (latest checkpoint)."""
    root = Path(path)
    if not root.exists():
        return path  # a hub id or a reserved preset name: let the loader decide
    if (root / "config.json").exists():
        return str(root)
    if (root / "model" / "config.json").exists():
        return str(root / "model")
    latest = latest_checkpoint(root)
    if latest is not None:
        return str(latest / "model")
    raise FileNotFoundError(
        f"{path} holds no model: expected config.json, model/config.json, or checkpoint-N folders "
        "(pass --init_from a model folder or a previous stage's --output_dir)"
    )


def describe_starting_point(init_from: str | None, model: str) -> dict:
    """The record of a fresh run's starting point (without its fingerprint: the model is not loaded yet)."""
    flag, argument = ("--init_from", init_from) if init_from else ("--model", model)
    resolved = resolve_model_path(argument)
    is_local = Path(resolved).exists()
    return {
        "flag": flag,
        "argument": argument,
        "path": str(Path(resolved).resolve()) if is_local else resolved,
        "local": is_local,
    }


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the state dict: name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        values = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{values.dtype}:{tuple(values.shape)};".encode())
        digest.update(
            values.reshape(-1).view(torch.uint8).numpy().tobytes()
        )  # bytes, whatever the dtype
    return "sha256:" + digest.hexdigest()


def recorded_starting_point(checkpoint_dir: str | Path) -> dict | None:
    """The starting point a checkpoint recorded, or None for a checkpoint from before it did."""
    run_config = json.loads((Path(checkpoint_dir) / "run_config.json").read_text())
    return run_config.get("starting_point")


def starting_point_for_resume(recorded: dict | None, init_from: str | None, model: str) -> dict:
    """The starting point a resumed run loads: the recorded one. Refused when --init_from (or
    --model, for a run that started from it) now names another model, or the recorded one is gone."""
    if recorded is None:
        warnings.warn(
            "the checkpoint does not record which model the run started from (it predates that record); "
            "the KL reference is rebuilt from --init_from / --model as given now",
            stacklevel=2,
        )
        return describe_starting_point(init_from, model)
    flag, argument = ("--init_from", init_from) if init_from else ("--model", model)
    # Omitting --init_from on resume means "the one the run started with"; so does the same argument.
    same_argument = argument == recorded["argument"] or (
        init_from is None and recorded["flag"] == "--init_from"
    )
    if not same_argument:
        current = describe_starting_point(init_from, model)
        if current["path"] != recorded["path"]:
            raise ValueError(
                f"{flag} {argument} names {current['path']}, but the run started from {recorded['path']} "
                f"({recorded['flag']} {recorded['argument']}), its KL reference; resume without {flag} to keep "
                "that reference, or start a new run (another --output_dir) from the new model"
            )
    if recorded.get("local") and not Path(recorded["path"]).exists():
        raise ValueError(
            f"the starting point {recorded['path']} of this run ({recorded['flag']} {recorded['argument']}, its "
            "KL reference) is gone; put it back to resume exactly, or start a new run with --init_from"
        )
    return recorded


def check_fingerprint(starting_point: dict, model: torch.nn.Module) -> dict:
    """The record with the loaded model's fingerprint; refused if it differs from the recorded one."""
    fingerprint = weights_fingerprint(model)
    recorded = starting_point.get("fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise ValueError(
            f"the starting point {starting_point['path']} ({starting_point['flag']} {starting_point['argument']}) "
            "has changed since the run started: its weights differ from the ones the run's KL reference was "
            "built from (was it overwritten?); restore them to resume, or start a new run from it"
        )
    return {**starting_point, "fingerprint": fingerprint}
