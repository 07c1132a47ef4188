"""torchrun for preemptible jobs: the same launcher, flags and workers, with two changes on a signal.

    python -m grpo.runtime.launch --nproc_per_node 8 train.py --stage grpo ...   # instead of `torchrun ...`

What torchrun (torch/distributed/run.py, the elastic agent) does on SIGTERM, SIGINT, SIGHUP or
SIGQUIT: it forwards the signal to every worker, waits --shutdown_timeout seconds (default 30, or
TORCH_ELASTIC_SHUTDOWN_TIMEOUT), SIGKILLs the workers still running, and exits 1 with a
SignalException traceback, even when every worker saved and exited 0. Each worker of train.py
finishes its generation batch (GRPO) or step (SFT), saves and exits 0 on that signal; but a step
can take longer than 30 s, and then torchrun kills it mid-step and nothing is saved.

The two changes (and one for a refused command line):
1. No deadline of torchrun's own: unless --shutdown_timeout or TORCH_ELASTIC_SHUTDOWN_TIMEOUT is
   given, the workers get as long as they need. The deadline that counts is the scheduler's (its
   SIGKILL after its grace period: SLURM's KillWait or GraceTime, Kubernetes'
   terminationGracePeriodSeconds); size that to one generation batch plus one save.
2. The exit status: 0 when the launcher was signalled and every local worker reported that it saved
   its checkpoint and exited cleanly (grpo/runtime/run.py, `report_clean_stop`); otherwise torchrun's own
   error. A scheduler then sees a preempted job that saved as a success, not as a failure.
3. Workers that exit 2 (train.py refusing its command line, with its error printed; any still running
   are stopped by torchrun) make the launcher exit 2 too, without torchrun's ChildFailedError traceback.
Everything else (rendezvous, restarts, a failing worker) is torchrun's, unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

from grpo.runtime.run import STOP_REPORT_DIR

NO_DEADLINE_SECONDS = (
    10 * 365 * 24 * 3600
)  # "as long as it takes": the scheduler's SIGKILL bounds it


def _shutdown_timeout_given(argv: list[str]) -> bool:
    if "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in os.environ or "PET_SHUTDOWN_TIMEOUT" in os.environ:
        return True
    flags = ("--shutdown_timeout", "--shutdown-timeout")
    return any(arg in flags or arg.startswith(tuple(f + "=" for f in flags)) for arg in argv)


def _nproc_per_node(argv: list[str]) -> str | None:
    """--nproc_per_node's value among the launcher's flags (those before the training script)."""
    flags = ("--nproc_per_node", "--nproc-per-node")
    for i, arg in enumerate(argv):
        if arg.endswith(".py") or arg in ("-m", "--module"):
            return None  # the script's own flags follow
        if arg in flags and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(tuple(f + "=" for f in flags)):
            return arg.partition("=")[2]
    return None


def clean_stop_reports(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(folder.glob("local-rank-*.json"))]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    nproc = _nproc_per_node(argv)
    if nproc is not None and nproc.lstrip("-").isdigit() and int(nproc) < 1:  # torchrun: a bare AssertionError
        print(f"launch: error: --nproc_per_node {nproc}: must be >= 1 (or auto, gpu, cpu)", file=sys.stderr)
        raise SystemExit(2)
    if not _shutdown_timeout_given(argv):
        argv = ["--shutdown_timeout", str(NO_DEADLINE_SECONDS), *argv]
    with tempfile.TemporaryDirectory(prefix="grpo-launch-") as folder:
        os.environ[STOP_REPORT_DIR] = folder  # the workers inherit the launcher's environment
        try:
            torchrun_main(argv)
        except ChildFailedError as failed:
            _, first = failed.get_first_failure()
            # The others exit 2 too, or were stopped by torchrun (SIGTERM) before they got there.
            if first.exitcode != 2 or not {f.exitcode for f in failed.failures.values()} <= {2, -signal.SIGTERM}:
                raise
            # The workers refused their command line and printed why (train.py: error: ...); torchrun
            # would add a ChildFailedError traceback and exit 1.
            print("[launch] the workers refused the command line (exit 2); their error is above", file=sys.stderr)
            return 2
        except SignalException as signalled:
            reports = clean_stop_reports(Path(folder))
            expected = reports[0]["local_world_size"] if reports else None
            if not reports or len(reports) != expected:
                print(
                    f"[launch] {signalled.sigval.name}: {len(reports)} of {expected or 'the'} local workers "
                    "saved and exited cleanly; the job did not stop cleanly",
                    file=sys.stderr,
                    flush=True,
                )
                raise
            print(
                f"[launch] {signalled.sigval.name}: every worker saved and exited cleanly (step "
                f"{reports[0]['step']}); exit 0. Resume with the same command plus --resume.",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
