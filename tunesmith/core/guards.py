"""What the loop does when the machine misbehaves: a stop signal, a step that is not finite, memory running out.

- SIGTERM or SIGINT (Slurm and Kubernetes preemption, Ctrl-C): `StopSignals` records the first one; the loop
  finishes the step it is in, writes a checkpoint and raises `RunStopped`, which carries the command that resumes
  the run (the command line exits 0 after SIGTERM, 130 after SIGINT). A second signal stops at once: SIGINT
  raises KeyboardInterrupt, SIGTERM ends the process as its default action does. A checkpoint being written
  then is never committed (the rename is the commit), so the previous one stays whole.
- A loss or gradient norm that is NaN or infinite: `Updater` skips that update; `NonFiniteSteps` counts the
  steps and stops the run after `train.max_nonfinite_steps` of them in a row, or at once at the first step.
- Out of memory on the GPU: `out_of_memory` names the settings that lower memory, with the values in force.
- `CheckpointTimer`: a checkpoint every `train.save_every_minutes` of wall-clock time as well as every
  `train.save_every` steps.
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import threading
import time
from pathlib import Path
from types import FrameType

import torch

from tunesmith.config import TrainConfig
from tunesmith.core.distributed import DistInfo, all_reduce_sum
from tunesmith.errors import RunStopped, TunesmithError

clock = time.monotonic  # the clock of time-based checkpoints, in seconds (a test replaces it with a fake one)

OUT_OF_MEMORY: tuple[type[BaseException], ...] = tuple(
    {t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t}
)
EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}


class StopSignals:
    """Records the first SIGTERM or SIGINT while installed; a second one stops the process at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Catch SIGTERM and SIGINT (only the main thread can; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in EXIT_CODES:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put back the handlers that were there before `install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # No printing here: a handler runs between two bytecodes, possibly inside a write to the same stream.
        if self.signum is None:
            self.signum = signum
            return
        self.restore()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def agree(flags: list[bool], info: DistInfo) -> list[bool]:
    """Each flag that is true on any rank, true on every rank (one all-reduce; nothing to do on one rank)."""
    if not info.enabled:
        return flags
    total = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=info.device)
    all_reduce_sum(total, info)
    return [v > 0 for v in total.tolist()]


def resume_command(run_dir: Path, world_size: int) -> str:
    """The shell command that resumes the run in `run_dir` from where it stands (its saved config, its folder)."""
    config = str(Path(run_dir) / "config.yaml")
    if world_size > 1:
        launch = ["torchrun", f"--nproc_per_node={world_size}", "-m", "tunesmith.cli", "train", config]
    else:
        launch = ["tunesmith", "train", config]
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join(launch)}"


def stopped(signum: int, step: int, total: int, checkpoint: Path | None, run_dir: Path | None,
            info: DistInfo) -> RunStopped:
    """The `RunStopped` a signal ends the loop with: what was saved, and the command that resumes the run."""
    name = signal.Signals(signum).name
    command = resume_command(run_dir, info.world_size) if run_dir is not None else ""
    if checkpoint is None:
        message = f"stopped by {name} after step {step} of {total}; no run folder, so nothing was saved"
    else:
        message = (f"stopped by {name} after step {step} of {total}; checkpoint saved in {checkpoint}. The run is "
                   f"not finished; resume it with:\n  {command}")
    return RunStopped(message if info.is_main else "", exit_code=EXIT_CODES.get(signum, 0), step=step,
                      checkpoint=str(checkpoint) if checkpoint else None, command=command)


class CheckpointTimer:
    """Says when `minutes` of wall-clock time have passed since the last checkpoint (never when `minutes` is 0)."""

    def __init__(self, minutes: float) -> None:
        self.minutes = minutes
        self.last = clock()

    def due(self) -> bool:
        """True when a checkpoint is due by time."""
        return bool(self.minutes) and clock() - self.last >= self.minutes * 60

    def reset(self) -> None:
        """A checkpoint was just written."""
        self.last = clock()


def finite(value: float | None) -> bool:
    """True for a finite number (None, a step without an update, counts as finite)."""
    return value is None or math.isfinite(value)


class NonFiniteSteps:
    """Counts the steps whose loss or gradient norm was NaN or infinite (their updates were skipped)."""

    def __init__(self, limit: int, total: int = 0) -> None:
        self.limit = limit
        self.total = total
        self.in_a_row = 0

    def record(self, bad: bool) -> None:
        """Count one step: `bad` when its loss or gradient norm was not finite."""
        if bad:
            self.total += 1
            self.in_a_row += 1
        else:
            self.in_a_row = 0

    def must_stop(self, step: int) -> bool:
        """True after `limit` bad steps in a row, or a bad first step (nothing good to go on from)."""
        return self.in_a_row > 0 and (self.in_a_row >= self.limit or step == 1)

    def error(self, step: int, loss: float | None, grad_norm: float, cfg: TrainConfig, dtype: torch.dtype,
              checkpoint: Path | None) -> TunesmithError:
        """The message that stops the run: the step, what was not finite, the usual causes, what is kept."""
        what = f"loss {loss}, gradient norm {grad_norm}"
        why = ("at the first step" if step == 1 and self.in_a_row == 1
               else f"for {self.in_a_row} steps in a row (train.max_nonfinite_steps={self.limit})")
        fp16 = " (this model's weights are float16)" if dtype == torch.float16 else ""
        kept = (f"the last good checkpoint, {checkpoint}, is kept" if checkpoint is not None
                else "there is no checkpoint yet")
        return TunesmithError(
            f"step {step}: the loss or gradient norm is NaN or infinite {why} ({what}); the run stopped and wrote no "
            f"outputs, and {kept}. The usual causes:",
            problems=[
                f"a learning rate too high: train.lr={cfg.lr} (try a tenth), or no clipping "
                f"(train.max_grad_norm={cfg.max_grad_norm})",
                f"float16 overflow{fp16}: train in bfloat16 or float32 instead (load.dtype=bfloat16)",
                "bad rows in the data (empty or enormous ones): look at them with `tunesmith data inspect FILE`",
            ],
        )


def out_of_memory(exc: BaseException, where: str, cfg: TrainConfig, forward_tokens: int | None,
                  info: DistInfo) -> TunesmithError:
    """The message for running out of GPU memory: the settings that lower it, with the values in force."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    default = "" if cfg.forward_tokens else " (the default for this device)"
    return TunesmithError(
        f"out of memory on {info.device} during {where} ({first}). These settings lower memory; the values in force:",
        problems=[
            f"train.forward_tokens={forward_tokens}{default}: passes of fewer tokens hold fewer activations "
            "(the same maths)",
            f"train.gradient_checkpointing={str(cfg.gradient_checkpointing).lower()}: true recomputes activations "
            "in the backward pass instead of keeping them",
            f"train.batch_size={cfg.batch_size}: fewer rows per micro-batch (raise train.grad_accum, now "
            f"{cfg.grad_accum}, to keep the same global batch)",
            "re-running with a new forward_tokens or gradient_checkpointing resumes from the last checkpoint; "
            "a new batch_size is a different run (a new output_dir)",
        ],
    )
