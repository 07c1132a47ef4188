"""Train a Qwen2.5-VL policy: `--stage sft` (supervised warm-up) or `--stage grpo`.

    python train.py --stage sft --max_steps 200 --output_dir runs/sft            # one process
    torchrun --nproc_per_node 2 train.py --stage grpo --init_from runs/sft \\
        --output_dir runs/grpo --max_steps 100                                  # two ranks
    python train.py --config run.yaml --beta 0                                   # file + overrides
    python train.py --help                                                       # every flag

Defaults run offline with nothing else: the built-in tiny Qwen2.5-VL and synthetic counting data.
The loops themselves are in grpo/grpo_loop.py and grpo/sft_loop.py.
"""

from __future__ import annotations

import sys

from data.sources import DataError
from grpo.config import ConfigError, parse_config
from grpo.grpo_loop import train_grpo
from grpo.runtime.start_checks import check_before_loading
from grpo.sft_loop import train_sft


def main(argv: list[str] | None = None) -> dict:
    try:
        config = parse_config(argv)
        check_before_loading(config)  # reward functions, model path, output folder: before loading
    except ConfigError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        if config.train.stage == "sft":
            return train_sft(config)
        return train_grpo(config)
    except (ConfigError, DataError) as error:  # a flag only the loaded model shows wrong; a bad row, column or file
        print(f"train.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
