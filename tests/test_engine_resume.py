"""Exact resume of `seglab.engine.fit`: a run interrupted at any point and resumed from its checkpoint ends with the
same weights, EMA, optimizer, scheduler and scaler state and history, bit for bit, as an uninterrupted run.

The interruption is an exception raised inside the step function (at chosen micro-batches: before the first
checkpoint, right after one, mid accumulation window, in a later epoch) and, once, a real `SIGKILL` of a training
subprocess. The data are shuffled per epoch and augmented with torch's global generator; the model uses dropout and
BatchNorm, so any RNG or data-order mistake shows up as a weight difference.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seglab.engine import (History, ModelEMA, fit, load_checkpoint, loader_factory, lr_schedule)

from _helpers import sigkill_after_checkpoint

STEPS, ACCUM, CKPT_EVERY = 12, 2, 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Tiny models run fastest on one thread (and the SIGKILL test's subprocesses use one too)."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class NoisyData(torch.utils.data.Dataset):
    "20 fixed points, each returned with fresh Gaussian noise drawn from torch's global generator."
    def __len__(self):
        return 20

    def __getitem__(self, i):
        x = torch.randn(6, generator=torch.Generator().manual_seed(i))
        return x + 0.1 * torch.randn(6), (x.sum() > 0).long()


def build(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt, lr_schedule(opt, STEPS, "cosine", warmup_steps=3), ModelEMA(model, 0.9, warmup=True)


def make_data(kind):
    if kind == "factory":
        return loader_factory(NoisyData(), 4, seed=1), dict(steps=STEPS)
    if kind == "dataloader":  # a plain shuffled DataLoader: its order comes from the global generator
        return torch.utils.data.DataLoader(NoisyData(), 4, shuffle=True), dict(steps=STEPS)
    if kind == "epochs":  # 5 batches per epoch, accumulation windows straddle epoch boundaries
        return torch.utils.data.DataLoader(NoisyData(), 4, shuffle=True), dict(epochs=5)
    raise ValueError(kind)


def run(ckpt, kind="factory", crash_at=None, amp="fp16", callbacks=()):
    "Train; raise KeyboardInterrupt at micro-batch `crash_at` (1-based). Returns everything that must match."
    model, opt, sched, ema = build()
    calls = [0]

    def step(net, batch):
        calls[0] += 1
        if calls[0] == crash_at:
            raise KeyboardInterrupt(f"simulated crash at micro-batch {crash_at}")
        x, y = batch
        logits = net(x)
        return dict(loss=F.cross_entropy(logits, y), acc=(logits.argmax(1) == y).float().mean())

    data, length = make_data(kind)
    history = fit(model, step, data, opt, **length, accum=ACCUM, amp=amp, scheduler=sched, ema=ema, ckpt=ckpt,
                  ckpt_every=CKPT_EVERY, seed=3, eval_fn=lambda m: dict(val=float(m(torch.ones(2, 6)).sum())),
                  eval_every=5, callbacks=callbacks)
    return dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                history=history.records)


def assert_same(a, b, where="state"):
    "Exact (bitwise) equality of nested dicts/lists of tensors and plain values."
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where} keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where} lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    return {kind: run(d / f"{kind}.pt", kind) for kind in ("factory", "dataloader", "epochs")}


@pytest.mark.parametrize("kind,crash_at", [("factory", 3),  # before the first checkpoint: starts afresh
                                           ("factory", 9),  # right after the checkpoint of step 4
                                           ("factory", 20),  # second half of step 10, in epoch 1
                                           ("dataloader", 13),  # first half of step 7
                                           ("epochs", 17)])  # step 9, in epoch 3
def test_resume_is_exact(tmp_path, references, kind, crash_at):
    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, kind, crash_at=crash_at)
    saved = (crash_at - 1) // ACCUM // CKPT_EVERY * CKPT_EVERY
    assert (load_checkpoint(ckpt)["step"] if ckpt.exists() else 0) == saved
    resumed = run(ckpt, kind)
    assert_same(resumed, references[kind])
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temporary files left behind


def test_resume_without_amp_and_finished_run(tmp_path):
    ref = run(tmp_path / "ref.pt", amp=False)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crash.pt", crash_at=11, amp=False)
    assert_same(run(tmp_path / "crash.pt", amp=False), ref)
    again = run(tmp_path / "crash.pt", amp=False)  # the checkpoint says "finished": nothing trains
    assert_same(again, ref)


def test_checkpoint_contents_are_plain(tmp_path):
    run(tmp_path / "run.pt")
    state = load_checkpoint(tmp_path / "run.pt")  # weights_only=True inside
    assert state["step"] == STEPS and state["scaler"]["scale"] > 0 and len(state["rng"]) == 1
    assert {"model", "optimizer", "scheduler", "ema", "history", "stamp", "epoch", "batches"} <= state.keys()
    assert isinstance(state["stamp"]["torch"], str) and len(History(state["history"])) > 0


def test_resume_refuses_another_model(tmp_path):
    run(tmp_path / "run.pt")
    model = nn.Linear(6, 2)
    with pytest.raises(RuntimeError, match="resume=False"):
        fit(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), make_data("factory")[0],
            torch.optim.SGD(model.parameters(), 0.1), steps=STEPS + 1, ckpt=tmp_path / "run.pt")


def test_progress_bar_honours_tqdm_disable(capsys, monkeypatch):
    model = nn.Linear(6, 2)
    args = (model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), make_data("factory")[0],
            torch.optim.SGD(model.parameters(), 0.1))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    fit(*args, steps=2)
    assert "train" not in capsys.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "0")
    fit(*args, steps=2)
    assert "train" in capsys.readouterr().err


KILL_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {test_dir!r})
from test_engine_resume import run

class Nap:  # a callback that slows the run down so that the parent can kill it mid-way
    def update(self, step, **scalars): time.sleep(0.15)
    def close(self): pass

out = run(sys.argv[1], callbacks=[Nap()] if sys.argv[2] == "slow" else [])
torch.save(out["model"], sys.argv[1] + ".final")
"""


def test_sigkill_mid_run_then_resume(tmp_path, references):
    "A training process killed with SIGKILL (no cleanup at all) resumes to the uninterrupted result."
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT.format(test_dir=str(Path(__file__).parent)))
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    ckpt = tmp_path / "killed.pt"
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), "slow"], env=env)
    sigkill_after_checkpoint(proc, ckpt, timeout=120, poll=0.05, wait=30)
    assert load_checkpoint(ckpt)["step"] < STEPS
    subprocess.run([sys.executable, str(script), str(ckpt), "fast"], env=env, check=True, timeout=240)
    assert_same(torch.load(f"{ckpt}.final", weights_only=True), references["factory"]["model"])
