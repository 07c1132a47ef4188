"""train.py's main under torchrun, then each rank saves its final weights (test_torchrun.py).

    torchrun --nproc_per_node 2 tests/torchrun_fingerprint.py --stage grpo --output_dir OUT ...

Writes OUT/fingerprint-rank{RANK}.pt: {parameter name: tensor}. Ranks that stayed in step hold
identical weights; the checkpoint only shows rank 0's. With FLOAT64_HF=1 in the environment the
run is inside tolerances.float64_throughout (for --dtype float64 runs that tests compare with
tolerances.network_error).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpo.runtime.run as grpo_run  # noqa: E402
import train  # noqa: E402

captured = {}
_build_policy = grpo_run.build_policy


def _capturing_build_policy(*args, **kwargs):
    captured["policy"] = _build_policy(*args, **kwargs)
    return captured["policy"]


if __name__ == "__main__":
    grpo_run.build_policy = _capturing_build_policy  # start_run looks it up in grpo.runtime.run
    argv = sys.argv[1:]
    if os.environ.get("FLOAT64_HF") == "1":  # HF's Qwen2.5-VL keeps float64 activations float64
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from tolerances import float64_throughout

        with float64_throughout():
            train.main(argv)
    else:
        train.main(argv)
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    weights = {name: p.detach().clone() for name, p in captured["policy"].model.named_parameters()}
    torch.save(weights, output_dir / f"fingerprint-rank{os.environ.get('RANK', '0')}.pt")
