"""One run per output_dir: a lock file that rank 0 holds for the whole run.

Two processes writing one folder ruin each other's work: each deletes the other's half-written
`.tmp-checkpoint-*` as crash leftovers, --overwrite_output_dir deletes the live run's checkpoints,
and metrics.jsonl and samples.log interleave both runs. So rank 0 takes `output_dir/.lock` before
it looks at or deletes anything there, and a second run is refused with the holder's pid and host.

- The lock is an advisory `fcntl.flock` on that file, held while the run lives. The kernel drops it
  when the process ends, however it ends (kill -9 and out-of-memory kills included), so whether
  the holder is alive never rests on a pid, which the system may have given to another process.
- The file names the holder (pid, host, start time) for the refusal message.
- A lock file whose flock is free was left by a run that died without releasing it: it is taken
  over with a warning naming that run.
- Where flock is not supported (some network filesystems), the recorded pid decides on the same
  host; a lock recorded by another host is refused, and the message says how to remove it.

`release()` (at the end of the run, or at interpreter exit after an exception) removes the file.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

LOCK_NAME = ".lock"


class OutputDirInUse(RuntimeError):
    """Another live run holds the output_dir's lock; the message names it and the fix."""


class OutputDirLock:
    """A held lock on one output_dir; `release()` removes the file and drops the flock."""

    def __init__(self, path: Path, descriptor: int):
        self.path, self._descriptor = path, descriptor

    def release(self) -> None:
        if self._descriptor is None:
            return
        try:
            self.path.unlink(
                missing_ok=True
            )  # before the flock is dropped: no one sees it free and still there
        finally:
            os.close(self._descriptor)
            self._descriptor = None
            _HELD.pop(self.path, None)


# Locks this process holds, by path. One process runs one training loop at a time, so finding its
# own lock means an earlier run in this process (a test, a notebook) raised before releasing it.
_HELD: dict[Path, OutputDirLock] = {}


def _read_holder(descriptor: int) -> dict | None:
    try:
        text = os.pread(descriptor, 4096, 0).decode("utf-8", errors="replace")
        holder = json.loads(text) if text.strip() else None
    except ValueError:  # a file cut short by a crash mid-write names nobody
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a process that has not written its name yet"
    since = f", since {holder['started']}" if "started" in holder else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{since}"


def _pid_is_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _in_use(output_dir: Path, holder: dict | None, path: Path) -> OutputDirInUse:
    return OutputDirInUse(
        f"output_dir {output_dir} is in use by another run ({_describe(holder)}); wait for it to finish "
        f"or stop it, or choose another --output_dir (if that run is gone, delete {path})"
    )


def acquire_output_dir_lock(output_dir: str | os.PathLike) -> OutputDirLock:
    """Take `output_dir/.lock` for this process (creating the folder); raise OutputDirInUse if a live
    run holds it. A lock left by a run that died is taken over with a warning."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = (output_dir / LOCK_NAME).resolve()
    if path in _HELD:
        _HELD[path].release()
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise _in_use(output_dir, holder, path) from None
        except OSError:  # no flock on this filesystem: the recorded pid decides
            holder = _read_holder(descriptor)
            if holder and (
                holder.get("host") != socket.gethostname() or _pid_is_alive(holder.get("pid"))
            ):
                os.close(descriptor)
                raise _in_use(output_dir, holder, path) from None
        # The holder before us may have removed the file between our open and our flock: then we
        # hold a lock on a file nobody else will open. Start again on the file the path names now.
        try:
            if os.fstat(descriptor).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(descriptor)
    stale = _read_holder(descriptor)
    if stale:
        warnings.warn(
            f"taking over the lock of output_dir {output_dir} left by {_describe(stale)}, which no longer "
            "holds it: that run ended without finishing (killed or crashed); its last checkpoint is intact",
            stacklevel=2,
        )
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(descriptor)
    lock = OutputDirLock(path, descriptor)
    _HELD[path] = lock
    atexit.register(lock.release)  # a run that raises still leaves the folder free
    return lock
