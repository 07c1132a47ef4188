"""A training run's life around its loop: start, resume, save, and the non-finite-step guard.

Both loops (grpo/grpo_loop.py, grpo/sft_loop.py) begin the same way and save the same way; this
file holds that once, so each loop file shows only its own algorithm:

    run = start_run(config, "grpo", with_reference=True)   # ranks, run dir, policy, AdamW, schedule
    state = run.resume(stream)                              # step, data position, RNG, adapters
    ...
    run.save(step, stream, extra={...})                     # every rank calls it; rank 0 writes
    run.open_logs(step)                                     # metrics.jsonl, --report_to, progress bar
    ...
    grad_norm = run.optimizer_step(step, loss)              # all-reduce, clip, AdamW (None: skipped)
    run.log(step, metrics, loss=...)                        # one record, the console line, the bar
    ...
    return run.finish(step, ...)  # inside the loop's `with StopRequest()`: the final save, the end

Rank 0 holds a lock on output_dir for the whole run (grpo/runtime/run_lock.py): a second run into the
folder of a live one exits 2 naming it, before anything there is read or deleted.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data.index_stream import IndexStream
from grpo.config import Config
from grpo.runtime.checkpoint import (
    capture_rng_state,
    check_output_dir,
    load_trainer_state,
    save_checkpoint,
)
from grpo.runtime.device import seed_everything
from grpo.runtime.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    broadcast_object,
    broadcast_parameters,
    cleanup,
    init_distributed,
    quiet_other_ranks,
    sync_gradients,
)
from grpo.runtime.metrics import MetricsLogger, SampleLogger
from grpo.runtime.optimizer import build_optimizer, build_scheduler, extend_schedule_on_resume
from grpo.runtime.policy import (
    Policy,
    adapter_state,
    build_policy,
    model_for_saving,
    optimizer_for_checkpoint,
    restore_adapters,
    shard_policy,
)
from grpo.runtime.reporting import Reporter
from grpo.runtime.run_lock import OutputDirInUse, OutputDirLock, acquire_output_dir_lock


@dataclass
class TrainingRun:
    """What both loops start from: the ranks, the policy, its optimizer and schedule, the resume point."""

    config: Config
    stage: str
    dist: DistInfo
    policy: Policy
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    resume_from: Path | None
    lock: OutputDirLock | None = None  # rank 0's lock on output_dir (grpo/runtime/run_lock.py)
    nonfinite: NonFiniteGuard | None = None  # set by start_run
    metrics_logger: MetricsLogger | None = None  # set by open_logs, with sample_logger, reporter and progress
    sample_logger: SampleLogger | None = None
    reporter: Reporter | None = None
    progress: tqdm | None = None
    schedule_origin: dict | None = None  # set by resume() when --max_steps changed (extend_schedule_on_resume)

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    def resume(self, stream: IndexStream) -> dict:
        """Restore AdamW, the schedule, the data position, every RNG and LoRA adapters.

        Returns the trainer state ({"step": 0, "extra": {}} for a fresh run).
        """
        if self.resume_from is None:
            return {"step": 0, "extra": {}}
        state = load_trainer_state(
            self.resume_from,
            optimizer=optimizer_for_checkpoint(self.policy, self.optimizer),  # --fsdp: each rank its slice
            scheduler=self.scheduler,
            rank=self.dist.rank,
        )
        stream.load_state_dict(state["data_state"])
        restore_adapters(self.policy, state["extra"].get("lora_adapters", {}))
        # a longer --max_steps continues the lr from where the checkpoint left it (grpo/runtime/optimizer.py)
        self.schedule_origin = extend_schedule_on_resume(self.scheduler, self.optimizer, self.config.train, state, self.is_main)
        if self.is_main:
            print(f"[resume] {self.resume_from} at step {state['step']}", flush=True)
            max_steps = self.config.train.max_steps
            if state["step"] >= max_steps:  # a finished run relaunched (a scheduler retry) or a lower --max_steps
                print(
                    f"[resume] nothing to train: the run is at step {state['step']} and --max_steps is {max_steps}"
                    + (" (below it: the steps after it stay as they are)" if state["step"] > max_steps else "")
                    + "; raise --max_steps to train further",
                    flush=True,
                )
        return state

    def save(self, step: int, stream: IndexStream, extra: dict | None = None) -> None:
        """A checkpoint of everything resume() restores. Every rank must call it: each contributes
        its RNG states, and under --fsdp the full weights and Adam moments are gathered to rank 0."""
        rng_states = all_gather_object(capture_rng_state())
        model_to_save = model_for_saving(self.policy) if self.is_main or self.policy.fsdp else None
        optimizer_to_save = optimizer_for_checkpoint(self.policy, self.optimizer, gather=True)
        if self.is_main:
            targs = self.config.train
            save_checkpoint(
                targs.output_dir, step, model=self.policy.model, processor=self.policy.processor,
                optimizer=optimizer_to_save, scheduler=self.scheduler, data_state=stream.state_dict(),
                run_config={"stage": self.stage, **self.config.to_dict(), "starting_point": self.policy.starting_point},
                extra={"lora_adapters": adapter_state(self.policy), **(extra or {}),
                       **({"lr_schedule_origin": self.schedule_origin} if self.schedule_origin else {})},
                keep_last=targs.save_total_limit, model_to_save=model_to_save, rng_states=rng_states,
            )

    def open_logs(self, step: int, sample_log_steps: int | None = None) -> None:
        """metrics.jsonl, the console line and --report_to backends, the progress bar, and with
        `sample_log_steps` (GRPO's --sample_log_steps) samples.log; rank 0 writes."""
        targs = self.config.train
        self.metrics_logger = MetricsLogger(f"{targs.output_dir}/metrics.jsonl", enabled=self.is_main)
        self.metrics_logger.truncate_after(step)  # a resumed run rewrites what came after its checkpoint
        if sample_log_steps is not None:
            path, enabled = f"{targs.output_dir}/samples.log", self.is_main
            self.sample_logger = SampleLogger(path, every=sample_log_steps, enabled=enabled)
            if enabled:
                self.sample_logger.truncate_after(step)  # as metrics.jsonl (every 0 still cleans up)
        self.reporter = Reporter(self.config, self.stage, start_step=step, enabled=self.is_main)
        self.progress = tqdm(
            total=targs.max_steps, initial=step, desc=self.stage, disable=not (self.is_main and targs.progress_bar)
        )

    def log(self, step: int, metrics: dict, **postfix: str) -> None:
        """One optimizer step's record: metrics.jsonl, the console line and backends, the progress bar."""
        self.reporter.log(step, self.metrics_logger.log(step, metrics))
        self.progress.update(1)
        self.progress.set_postfix(**postfix)

    def log_sample(self, step: int, **sample) -> None:
        """On samples.log's steps: one sample block (SampleLogger.maybe_log's fields), also sent to --report_to."""
        self.reporter.log_sample(step, self.sample_logger.maybe_log(step, **sample))

    def optimizer_step(self, step: int, loss: float) -> torch.Tensor | None:
        """Average the gradients over ranks, clip their norm, step AdamW and the schedule.

        step: the optimizer steps taken so far; loss: this step's loss summed over ranks (the
        guard's input). Returns the gradient norm before clipping, or None when the step was skipped
        because the loss or the gradient was not finite (NonFiniteGuard).
        """
        targs = self.config.train
        if not targs.fsdp:  # FSDP2 reduce-scattered (averaged) them in backward already
            sync_gradients(self.trainable, self.dist.world_size)
        max_norm = targs.max_grad_norm if targs.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        if not self.nonfinite.step_is_finite(step + 1, loss, grad_norm, self.optimizer):
            return None  # skipped: a NaN step would poison the weights and Adam's moments
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def finish(self, step: int, *, last_saved: int, stop: StopRequest, save: Callable[[int], None]) -> dict:
        """The end of both loops: the final save, the stop message, the lock, leaving the ranks.

        Call it inside the loop's `with StopRequest()`: a SIGTERM or Ctrl-C that lands during the
        final save then only sets the flag, as during the loop, instead of killing the process
        while it writes the checkpoint that holds the whole run (a second Ctrl-C still stops at once).
        """
        if self.progress is not None:
            self.progress.close()
        if step > last_saved or self.resume_from is None:
            save(step)
        for logger in (self.metrics_logger, self.reporter):
            if logger is not None:
                logger.close()
        output_dir = self.config.train.output_dir
        if stop.requested and self.is_main:
            print(
                f"[{self.stage}] {stop.signal_name} received: saved a checkpoint at step {step} in {output_dir}. "
                "Resume with the same command plus --resume.",
                flush=True,
            )
        if self.lock is not None:
            self.lock.release()
        cleanup()
        if stop.requested:
            report_clean_stop(step)
        return {"step": step, "output_dir": output_dir, "stopped_early": stop.requested}


STOP_REPORT_DIR = "GRPO_STOP_REPORT_DIR"  # set by grpo/runtime/launch.py for its workers


def report_clean_stop(step: int) -> None:
    """Tell grpo/runtime/launch.py that this worker stopped on a signal, saved, and is about to exit 0."""
    folder = os.environ.get(STOP_REPORT_DIR)
    if not folder:
        return
    report = {"step": step, "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", 1))}
    Path(folder, f"local-rank-{os.environ.get('LOCAL_RANK', 0)}.json").write_text(json.dumps(report))


def start_run(config: Config, stage: str, *, with_reference: bool) -> TrainingRun:
    """Join the ranks, lock and check the run directory, load the policy (and reference), build AdamW."""
    dist_info = init_distributed(config.train.device)
    quiet_other_ranks(dist_info.rank)  # before the model and the data load
    seed_everything(config.train.seed)
    targs = config.train
    # Rank 0 locks the folder, then decides (and deletes, with --overwrite_output_dir); the others
    # take its answer, a refusal included, so that every rank exits 2 together.
    resume_from, refusal, lock = None, None, None
    if dist_info.rank == 0:
        try:
            lock = acquire_output_dir_lock(targs.output_dir)
        except OutputDirInUse as error:
            refusal = str(error)
        else:
            try:
                resume_from = check_output_dir(
                    targs.output_dir, resume=targs.resume, overwrite=targs.overwrite_output_dir, stage=stage
                )
            except (FileExistsError, ValueError) as error:  # another run's checkpoints, a stage mismatch
                refusal = str(error)  # the command line's fault: exit 2 like the lock's refusal, not a traceback
                lock.release()
            except BaseException:
                lock.release()
                raise
    resume_from, refusal = broadcast_object((resume_from, refusal))
    if refusal is not None:
        if dist_info.rank == 0:
            print(f"train.py: error: {refusal}", file=sys.stderr, flush=True)
        cleanup()
        raise SystemExit(2)

    policy = build_policy(config, dist_info.device, with_reference=with_reference, resume_dir=resume_from)
    if targs.fsdp:  # shard the policy (and reference) over the ranks instead of replicating it (grpo/runtime/fsdp.py)
        shard_policy(policy, dist_info.device)
    else:
        broadcast_parameters(policy.model, dist_info.world_size)
    trainable = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = build_optimizer(policy.model, targs)  # after sharding: AdamW must see the shards
    scheduler = build_scheduler(optimizer, targs)
    nonfinite = NonFiniteGuard(targs.max_nonfinite_steps, stage)
    return TrainingRun(config, stage, dist_info, policy, trainable, optimizer, scheduler, resume_from, lock, nonfinite)


class NonFiniteGuard:
    """Skip an optimizer step whose loss or gradient is not finite; stop after `limit` in a row.

    A NaN or inf step would poison the weights and Adam's moments for good, so it is dropped
    (gradients zeroed); several in a row mean the run itself is broken, and it stops with advice.
    """

    def __init__(self, limit: int, stage: str):
        self.limit, self.stage, self.in_a_row = limit, stage, 0

    def step_is_finite(self, step: int, loss: float, grad_norm: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        if math.isfinite(loss) and bool(torch.isfinite(grad_norm)):
            self.in_a_row = 0
            return True
        optimizer.zero_grad(set_to_none=True)
        self.in_a_row += 1
        print(f"[{self.stage}] step {step}: non-finite loss/gradient ({loss}, {float(grad_norm)}); step skipped", flush=True)
        if self.in_a_row >= self.limit:
            raise RuntimeError(
                f"{self.in_a_row} consecutive steps had a non-finite loss or gradient; lower --learning_rate, "
                "clip harder with --max_grad_norm, or check the data"
            )
        return False


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at its next safe point and exits 0.

    A second Ctrl-C (SIGINT) restores the default handler, so pressing it twice still stops at once.
    A repeated SIGTERM does not: under a scheduler one often arrives twice (SLURM signals every
    process of the job, and torchrun forwards its own copy to the workers), and the second must not
    kill the save the first one asked for; the scheduler's SIGKILL is the hard stop.
    """

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGTERM:
            return  # the stop is under way already
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def requested_on_any_rank(self) -> bool:
        """Whether any rank got a signal (one scalar all-reduce; the flag itself in one process).

        A scheduler's SIGTERM reaches the ranks at slightly different times. A rank that left the
        loop alone would wait in the save's collectives while the others wait in the next step's,
        until the process-group timeout; so the ranks agree, and all stop at the same step.
        """

        requested_here = self.requested  # read once: a signal may land during the all-reduce
        if all_reduce_sum(float(requested_here)) == 0:
            return False  # every rank read False, so every rank goes on
        if not self.requested:
            self.requested, self.signal_name = True, "a stop signal on another rank"
        return True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
