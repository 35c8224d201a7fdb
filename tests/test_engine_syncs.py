"""Issue #17, engine host syncs: between two logging steps `fit` never reads a tensor back to the host (no `.item()`,
`float()`, `int()`, `bool()` or `.tolist()` of a tensor), so a GPU is never stalled by the loop itself; the
non-finite-loss check still stops the run and never saves the bad state."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seglab.engine import ModelEMA, NonFiniteLoss, fit, load_checkpoint

from _helpers import nan_loss_at

READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist")
X = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
Y = (X.sum(1) > 0).long()
BATCHES = [(X[i:i + 4], Y[i:i + 4]) for i in range(0, 32, 4)]


@pytest.fixture
def reads(monkeypatch):
    "Count host reads of tensors (a patched torch.Tensor)."
    calls = []
    for name in READS:
        real = getattr(torch.Tensor, name)
        def wrapper(self, *args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.mark.parametrize("accum,clip,ema", [(1, None, False), (2, 1.0, True)])
def test_no_host_reads_outside_log_steps(reads, accum, clip, ema, tmp_path):
    LOG = 4
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    marks = []  # (reads so far) at the start of each micro-batch

    def step(net, batch):
        marks.append(len(reads))
        x, y = batch
        logits = net(x)
        return dict(loss=F.cross_entropy(logits, y), acc=(logits.argmax(1) == y).float().mean())

    steps = 12
    history = fit(model, step, BATCHES, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), steps=steps,
                  accum=accum, clip_grad=clip, ema=ModelEMA(model, 0.9) if ema else None, log_every=LOG,
                  ckpt=tmp_path / "run.pt", ckpt_every=2 * LOG, device="cpu", amp=False)
    marks.append(len(reads))
    # reads between the start of micro-batch k and the start of the next one, per optimizer step
    per_step = [marks[(s + 1) * accum] - marks[s * accum] for s in range(steps - 1)]
    print("host reads per step:", per_step)
    assert all(n == 0 for s, n in enumerate(per_step, start=1) if s % LOG), per_step
    assert all(n > 0 for s, n in enumerate(per_step, start=1) if s % LOG == 0)  # the counter does see reads
    assert [r["step"] for r in history.records] == [4, 8, 12] and load_checkpoint(tmp_path / "run.pt")["step"] == 12


def test_lazy_check_still_stops_and_saves_nothing_bad(tmp_path):
    "With log_every=5 a NaN at step 3 is read at the checkpoint of step 4: the run stops, step 2's file stays."
    torch.manual_seed(0)
    model = nn.Linear(6, 2)
    with pytest.raises(NonFiniteLoss, match="step 3") as info:
        fit(model, nan_loss_at(3, F.cross_entropy), BATCHES, torch.optim.SGD(model.parameters(), lr=0.1), steps=20,
            log_every=5, ckpt=tmp_path / "run.pt", ckpt_every=2, device="cpu")
    assert f"{tmp_path / 'run.pt'} (step 2)" in str(info.value)
    state = load_checkpoint(tmp_path / "run.pt")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    with pytest.raises(NonFiniteLoss, match="step 3"):  # and without any checkpoint, at the next log step
        fit(nn.Linear(6, 2), nan_loss_at(3, F.cross_entropy), BATCHES, torch.optim.SGD(model.parameters(), lr=0.1),
            steps=20, log_every=5, device="cpu")
