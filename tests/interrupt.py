"""Interrupting a training run in the resume tests: `StopAt(step)` is an engine callback that raises `Stop` at `step`,
after the checkpoint of the step before was written."""


class Stop(Exception):
    "Raised by `StopAt` to simulate a run killed mid-training."


class StopAt:
    "A callback that interrupts the run at `step` (after the checkpoint of the step before was written)."
    def __init__(self, step):
        self.step = step

    def update(self, step, **_):
        if step == self.step:
            raise Stop

    def close(self):
        pass
