"""What keeps a run's `output_dir` usable through kills, full disks, preemption and a second run.

- Complete checkpoints: `write_completion_marker` ends every `checkpoint-N` save (the trainer calls it after the
  model, optimizer, scheduler, RNG and trainer state are written, before older checkpoints are rotated away) with
  `tisdpo_complete.json`, the size of every file of the checkpoint, written to a temporary name, fsynced and
  renamed. A checkpoint without it was interrupted; one whose files no longer match it (truncated, missing) or do
  not parse (safetensors header, torch zip archive, JSON) is damaged. `resolve_resume_from_checkpoint("true", ...)`
  takes the newest usable checkpoint and logs, one line each, those it skipped and why.
- A failed save (`disk_full`, `disk_full_message`): a full disk is said in words, naming the checkpoint.
- One writer per `output_dir` (`output_dir_lock`): a lock file naming the process (pid, host, start time); a lock
  whose process is gone is taken over, with a log line.
- Preemption (`PreemptionCallback`): SIGTERM / SIGINT make the trainer save a checkpoint at the next step boundary
  and stop, every process of a distributed run at the same step; the `tisdpo train` command then exits 0 and
  prints how to resume.

Imports only the standard library, torch (the distributed stop flag) and `transformers` (`TrainerCallback`, the
checkpoint rotation).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import threading
import time
import zipfile

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .validation import InputError

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "tisdpo_complete.json"
LOCK_FILE = ".tisdpo-train.lock"
RESUME_HINT = "--resume_from_checkpoint true"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_TORCH_ARCHIVES = (".pt", ".pth", ".bin")


class CheckpointError(InputError):
    """A run that cannot go on (a full disk during a save; a stop by signal where there is no resume): printed as one
    line by `tisdpo`."""


# ----------------------------------------------------------------------------------------------------------------
# complete checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _files(directory: str) -> dict[str, int]:
    """Every file under `directory` but the marker: relative path -> size in bytes."""
    sizes = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != COMPLETE_MARKER and not rel.endswith(".tmp"):
                sizes[rel] = os.path.getsize(path)
    return sizes


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_completion_marker(checkpoint_dir: str) -> None:
    """Mark `checkpoint_dir` complete: fsync its files, then write `tisdpo_complete.json` (file -> size) through a
    temporary name and a rename, so that the marker exists only whole and only after the files are on disk."""
    sizes = _files(checkpoint_dir)
    for rel in sizes:
        _fsync(os.path.join(checkpoint_dir, rel))
    marker = os.path.join(checkpoint_dir, COMPLETE_MARKER)
    with open(marker + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"files": sizes}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker + ".tmp", marker)
    _fsync(checkpoint_dir)


def clear_completion_marker(checkpoint_dir: str) -> None:
    """Remove the marker before `checkpoint_dir` is (re)written, so that a save killed midway leaves it incomplete."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(checkpoint_dir, COMPLETE_MARKER))


def _file_problem(path: str, rel: str) -> str | None:
    """Why the file `path` (named `rel` in messages) does not parse, or None: a safetensors header that does not
    fit the file, a torch archive whose zip directory is unreadable, a JSON file that is not JSON."""
    size = os.path.getsize(path)
    if rel.endswith(".safetensors"):
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{rel} is truncated ({size} bytes, no safetensors header)"
            (length,) = struct.unpack("<Q", head)
            try:
                header = json.loads(f.read(length)) if 8 + length <= size else None
            except ValueError:
                header = None
        if header is None:
            return f"{rel} is truncated or damaged ({size} bytes, unreadable safetensors header)"
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + length + end > size:
            return f"{rel} is truncated ({size} of {8 + length + end} bytes)"
    elif rel.endswith(_TORCH_ARCHIVES):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError, EOFError):
            return f"{rel} is truncated or damaged ({size} bytes, not a readable torch archive)"
    elif rel.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except (ValueError, UnicodeDecodeError):
            return f"{rel} is {'empty' if size == 0 else 'damaged'} ({size} bytes, not JSON)"
    return None


def checkpoint_problem(checkpoint_dir: str) -> str | None:
    """Why `checkpoint_dir` cannot be resumed from (one phrase naming the file), or None when it is complete."""
    marker = os.path.join(checkpoint_dir, COMPLETE_MARKER)
    try:
        with open(marker, encoding="utf-8") as f:
            expected = json.load(f)["files"]
    except FileNotFoundError:
        return f"no {COMPLETE_MARKER} (its save was interrupted)"
    except (ValueError, KeyError, TypeError):
        return f"{COMPLETE_MARKER} is damaged"
    for rel, size in sorted(expected.items()):
        path = os.path.join(checkpoint_dir, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        actual = os.path.getsize(path)
        if actual != size:
            return f"{rel} is truncated or damaged ({actual} bytes, {size} when saved)"
        problem = _file_problem(path, rel)
        if problem is not None:
            return problem
    return None


def checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-N` directories of `output_dir`, newest (largest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def newest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint of `output_dir` (None if there is none); each newer one it skips is logged
    with the reason (`checkpoint_problem`)."""
    for path in checkpoints(output_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("Skipping %s: %s.", path, problem)
    return None


def resolve_resume_from_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint`: `true` means the newest complete `checkpoint-*` directory in `output_dir`
    (newer damaged or interrupted ones are skipped with a log line), `false` means none; a path must be a
    complete checkpoint (a damaged file is an `InputError` naming it)."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("false", "none", "null")):
        return None
    if value is True or (isinstance(value, str) and value.lower() == "true"):
        last = newest_complete_checkpoint(output_dir)
        if last is None:
            found = checkpoints(output_dir)
            what = (f"none of its {len(found)} checkpoint-* directories is complete (see the log above)" if found
                    else "no checkpoint-* directory")
            raise InputError(f"--resume_from_checkpoint true: {what} in output_dir {output_dir!r}")
        return last
    if not os.path.isdir(value):
        raise InputError(f"--resume_from_checkpoint: no such checkpoint directory: {value!r}")
    problem = checkpoint_problem(value)
    if problem is not None:
        raise InputError(f"--resume_from_checkpoint {value}: {problem}")
    return value


def disk_full(err: BaseException, directory: str) -> bool:
    """Whether a failed write into `directory` failed for lack of space: `ENOSPC` / `EDQUOT`, or torch's archive
    writer failing (it raises a RuntimeError without errno) on a disk with under 64 MiB left."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(err, RuntimeError) and ("unexpected pos" in str(err) or "write" in str(err).lower()):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(directory).free < 64 * 2**20
    return False


def disk_full_message(err: BaseException, output_dir: str, what: str) -> str:
    """One line for a save of `what` (`checkpoint-N`, or the final model) into `output_dir` that filled the disk."""
    previous = newest_complete_checkpoint(output_dir)
    kept = (f"{os.path.basename(previous)} is the newest complete checkpoint" if previous
            else "there is no complete checkpoint yet")
    return (f"the disk is full: saving {what} in {output_dir} failed ({err}); {kept}; free space and rerun with "
            f"{RESUME_HINT}")


# ----------------------------------------------------------------------------------------------------------------
# one writer per output_dir
# ----------------------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(path: str) -> dict | None:
    for _ in range(20):  # a lock being written by its owner right now reads empty for a moment
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:
            time.sleep(0.05)
    return {}


@contextlib.contextmanager
def output_dir_lock(output_dir: str):
    """Hold `output_dir/.tisdpo-train.lock` (pid, host, start time) while the block runs. Another live process's
    lock is an `InputError` naming it; a lock whose process no longer runs (same host) is taken over with a log
    line. Only the main process (RANK 0) of a distributed run takes it."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _read_lock(path)
            if other is None:  # released meanwhile
                continue
            pid, host = other.get("pid"), other.get("host")
            if isinstance(pid, int) and (host != mine["host"] or _alive(pid)):
                raise InputError(
                    f"--output_dir {output_dir}: another `tisdpo train` writes there (pid {pid} on {host}, started "
                    f"{other.get('started')}; lock file {path}); wait for it to end or choose another --output_dir"
                ) from None
            logger.warning("Taking over the lock %s of pid %s on %s (started %s): that process no longer runs.",
                           path, pid, host, other.get("started"))
            os.remove(path)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(mine, f)
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


# ----------------------------------------------------------------------------------------------------------------
# preemption
# ----------------------------------------------------------------------------------------------------------------


class PreemptionCallback(TrainerCallback):
    """On SIGTERM or SIGINT during `train()`: save a checkpoint at the next step boundary and stop training.
    `signal_name` is then the signal's name (None otherwise). A second signal before that boundary gets the
    handler that was installed before training (by default: the process ends). Handlers are installed only from
    the main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        logger.warning("Received %s: saving a checkpoint at the end of this step, then stopping.", self.signal_name)

    def uninstall(self) -> None:
        """Put back the handlers `on_train_begin` replaced (also called after a `train()` that raised)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_begin(self, args, state, control, **kwargs):
        self.signal_name = None
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # every process stops at the same step, though the signal reaches them at different moments
            flag = torch.tensor([self.signal_name is not None], dtype=torch.int32, device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and self.signal_name is None:
                self.signal_name = "SIGTERM (on another process)"
        if self.signal_name is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.uninstall()


def save_complete_checkpoint(trainer, save, model, trial) -> None:
    """Run `Trainer._save_checkpoint` (`save(model, trial)`) so that the checkpoint becomes complete only at the end:
    its old marker is removed first, the completion marker is written once every process has saved, and only
    then are older checkpoints rotated away (`save_total_limit`). A save that fails for lack of space removes the
    partial checkpoint and raises `CheckpointError` saying so."""
    args = trainer.args
    run_dir = trainer._get_output_dir(trial=trial)
    checkpoint_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")
    if args.should_save:
        clear_completion_marker(checkpoint_dir)
    limit, args.save_total_limit = args.save_total_limit, None  # rotation waits for the marker
    try:
        save(model, trial)
    except (OSError, RuntimeError) as err:
        if not disk_full(err, run_dir):
            raise
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the partial checkpoint, to free its space
        name = os.path.basename(checkpoint_dir)
        raise CheckpointError(disk_full_message(err, run_dir, f"{name} (the partial {name} was removed)")) from err
    finally:
        args.save_total_limit = limit
    trainer.accelerator.wait_for_everyone()
    if args.should_save:
        write_completion_marker(checkpoint_dir)
        rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                           best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)
