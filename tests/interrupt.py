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


def _model_history(out):
    "A train function's result as `(model, history)`: a pair as it is, a run dict's `model` and `history`."
    return (out["model"], out["history"]) if isinstance(out, dict) else out


def assert_resumes_exactly(train, ckpt, stop: int = 3, state=lambda model: model.state_dict()):
    """`train(callbacks=..., ckpt=...) -> (model, history)` (or a run dict with `model` and `history`, as the chapters
    whose `train` returns `dict(model=..., history=..., ...)`) run uninterrupted, then interrupted by `StopAt(stop)`
    with checkpoints at `ckpt`, then resumed from it: the resumed model's `state(model)` (default: the state dict,
    buffers included) equals the uninterrupted one's, key for key. Returns `(reference model, resumed model, resumed
    history)`."""
    import pytest
    import torch
    ref, _ = _model_history(train())
    with pytest.raises(Stop):
        train(callbacks=[StopAt(stop)], ckpt=ckpt)
    assert ckpt.exists()                                               # saved before `stop`
    resumed, hist = _model_history(train(ckpt=ckpt))
    a, b = state(ref), state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return ref, resumed, hist
