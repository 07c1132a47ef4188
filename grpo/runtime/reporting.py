"""Where a run's metrics go besides metrics.jsonl: a console line, TensorBoard, Weights & Biases.

metrics.jsonl (grpo/runtime/metrics.py) is the source of truth and is always written; everything here is
a view of the same records, under the same names:

- every `--logging_steps` N steps, one compact line on stdout (what a batch job's log file
  shows; printed above the progress bar when there is one), e.g.

      [grpo] step 20/100 | reward 0.912 | format 0.500 | count_accuracy 0.412 | kl 0.0031 |
             clip 0.000/0.012 | entropy 1.874 | length 31.2 (max 64) | 1.42 s/step | sampler 2210 tok/s

  (one line in the log; wrapped here). The accuracy rewards are reward functions, so they are in
  the per-function list. s/step is rank 0's wall time per step since the previous line.
- `--report_to tensorboard`: every scalar with `add_scalar(name, value, step)` into
  OUTPUT_DIR/tensorboard, the samples.log blocks as text, the run's config as hyperparameters
  (and as text). A resumed run writes with `purge_step`, so TensorBoard drops the steps after the
  checkpoint that the dead run had logged, as metrics.jsonl does.
- `--report_to wandb`: `wandb.log(record, step=step)`, samples as preformatted HTML, the config
  as the run's config; its files go to OUTPUT_DIR/wandb. WANDB_PROJECT (default vlm-grpo) and
  WANDB_MODE=offline are read by wandb itself. Each launch (a resume too) is a new W&B run.

Only rank 0 reports: build it with `enabled=is_main`. The packages are optional
(`pip install -e ".[logging]"`); grpo/config.py refuses `--report_to` without them (exit 2).

    reporter = Reporter(config, "grpo", start_step=step, enabled=is_main)
    reporter.log(step, metrics_logger.log(step, metrics))   # the record metrics.jsonl got
    reporter.log_sample(step, sample_text)                  # None: nothing to log
    reporter.close()
"""

from __future__ import annotations

import html
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from tqdm.auto import tqdm


def _number(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def metrics_line(stage: str, step: int, max_steps: int, record: Mapping[str, float], seconds_per_step: float | None) -> str:
    """The console line of one step's record (a pure function of it; keys it lacks are left out)."""
    parts = [f"[{stage}] step {step}/{max_steps}"]

    def add(label: str, key: str, digits: int = 3) -> None:
        if key in record:
            parts.append(f"{label} {_number(record[key], digits)}")

    add("reward", "reward/total/mean")
    for key in record:  # reward/{name}/mean per function, in the order the run lists them
        if key.startswith("reward/") and key.endswith("/mean") and key != "reward/total/mean":
            add(key[len("reward/") : -len("/mean")], key)
    add("loss", "loss", 4)
    add("val_loss", "val_loss", 4)
    add("kl", "kl", 4)
    if "clip_frac_low" in record and "clip_frac_high" in record:
        parts.append(f"clip {_number(record['clip_frac_low'])}/{_number(record['clip_frac_high'])}")
    add("entropy", "entropy")
    if "completion_length_mean" in record:
        parts.append(f"length {_number(record['completion_length_mean'], 1)} (max {record['completion_length_max']:.0f})")
    if "reward/total/mean" not in record:  # SFT: its optimiser figures are the ones to watch
        add("grad_norm", "grad_norm")
        if "lr" in record:
            parts.append(f"lr {record['lr']:.2e}")
    if seconds_per_step is not None:
        parts.append(f"{seconds_per_step:.2f} s/step")
    if "rollout_tokens_per_second" in record:  # GRPO: this rank's sampler
        parts.append(f"sampler {record['rollout_tokens_per_second']:.0f} tok/s")
    elif "tokens" in record and record.get("step_seconds", 0) > 0:  # SFT: trained tokens, all ranks
        parts.append(f"{record['tokens'] / record['step_seconds']:.0f} tok/s")
    return " | ".join(parts)


def flat_config(config_dict: Mapping, prefix: str = "") -> dict[str, object]:
    """{"grpo/beta": 0.04, ...}: one hyperparameter per flag, grouped as Config.to_dict groups them.
    None becomes "None" (TensorBoard's hparams take numbers, strings and bools only)."""
    flat: dict[str, object] = {}
    for key, value in config_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_config(value, prefix=f"{name}/"))
        else:
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


class Reporter:
    """The console line and the `--report_to` backends of one run; disabled on ranks other than 0."""

    def __init__(self, config, stage: str, *, start_step: int = 0, enabled: bool = True):
        targs = config.train
        self.stage, self.max_steps = stage, targs.max_steps
        self.enabled = enabled
        self.logging_steps = targs.logging_steps
        self._last_line = (start_step, time.perf_counter())  # (step, clock) of the previous line
        self._tensorboard = self._wandb = None
        if not enabled:
            return
        backends = targs.report_to_backends
        run_config = {"stage": stage, **config.to_dict()}
        if "tensorboard" in backends:
            self._tensorboard = _open_tensorboard(Path(targs.output_dir) / "tensorboard", run_config, start_step)
        if "wandb" in backends:
            import wandb  # optional: pip install .[logging]

            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "vlm-grpo"), dir=targs.output_dir,
                name=Path(targs.output_dir).name, config=run_config,
            )  # fmt: skip

    def log(self, step: int, record: Mapping[str, float]) -> None:
        """One step's record (as MetricsLogger.log returned it) to the console line and backends."""
        if not self.enabled:
            return
        scalars = {key: value for key, value in record.items() if key != "step"}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self.logging_steps and step % self.logging_steps == 0:
            last_step, last_clock = self._last_line
            now = time.perf_counter()
            seconds = (now - last_clock) / (step - last_step) if step > last_step else None
            # tqdm.write keeps a progress bar (on stderr) intact; without one it is a plain print.
            tqdm.write(metrics_line(self.stage, step, self.max_steps, record, seconds), file=sys.stdout)
            sys.stdout.flush()
            self._last_line = (step, now)

    def log_sample(self, step: int, text: str | None) -> None:
        """A samples.log block (SampleLogger.maybe_log's return value; None on other steps)."""
        if not self.enabled or text is None:
            return
        if self._tensorboard is not None:
            # Indented four spaces: a Markdown code block, so TensorBoard keeps the line breaks.
            self._tensorboard.add_text("samples", "\n".join("    " + line for line in text.splitlines()), step)
        if self._wandb is not None:
            import wandb  # optional: pip install .[logging]

            self._wandb.log({"samples": wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _open_tensorboard(log_dir: Path, run_config: dict, start_step: int):
    from torch.utils.tensorboard import SummaryWriter  # optional: pip install .[logging]
    from torch.utils.tensorboard.summary import hparams  # optional: pip install .[logging]

    # purge_step: on resume from step S, TensorBoard discards this directory's events at steps
    # >= S + 1 written before now (the dead run's steps after its checkpoint).
    # flush_secs 30 (default 120): TensorBoard re-reads every 30 s, so a live run lags by at most that.
    writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step > 0 else None, flush_secs=30)
    if start_step == 0:
        flat = flat_config(run_config)
        # add_hparams would open a second run folder; its three summaries go into this one instead.
        for summary in hparams(flat, metric_dict={}):
            writer.file_writer.add_summary(summary)
        writer.add_text("config", "    " + json.dumps(run_config, indent=2).replace("\n", "\n    "), 0)
    return writer
