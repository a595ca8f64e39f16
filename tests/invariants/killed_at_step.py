"""`python killed_at_step.py CONFIG STEP`: a training run that kills its own process with SIGKILL at the end of step
STEP (after that step's checkpoint, if any), so the kill lands at the same point on every machine; under torchrun
the launcher then stops the other ranks."""

import os
import signal
import sys

import tunesmith
from tunesmith.core.loop import LoopCallback


class KillAt(LoopCallback):
    """SIGKILL this process after step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, step, outcome) -> None:
        """Kill at the chosen step."""
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    tunesmith.train(sys.argv[1], callbacks=[KillAt(int(sys.argv[2]))])
