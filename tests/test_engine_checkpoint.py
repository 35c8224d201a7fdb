"""Checkpoints under faults (issue #14): every checkpoint carries a sha256 that `load_checkpoint` verifies, so random
single-byte flips of a real training checkpoint, truncation and the orphans of a `kill -9` during a save are caught;
a diverged state (non-finite loss, or finite loss with non-finite gradients) is never saved; `fit` refuses to train
for no steps."""
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seglab.engine import CheckpointError, NonFiniteLoss, companion_ckpt, fit, load_checkpoint, save_checkpoint
from seglab.toyworld import TinyFCN, make_scenes

from _helpers import nan_loss_at

FLIPS = 300


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    "A real training checkpoint: TinyFCN on ToyWorld scenes, Adam, 3 steps (weights, optimizer state, RNG, history)."
    torch.manual_seed(0)
    scenes = make_scenes(16, size=32, seed=0)
    model = TinyFCN(width=16)
    batches = [(scenes["image"][i:i + 8], scenes["mask"][i:i + 8]) for i in (0, 8)]
    path = tmp_path_factory.mktemp("ckpt") / "run.pt"
    fit(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches, torch.optim.Adam(model.parameters(), 1e-3),
        steps=3, ckpt=path, device="cpu")
    return path


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def test_single_byte_flips_are_all_detected(trained_ckpt, tmp_path):
    "300 random single-byte flips (seed 0) of a real checkpoint: every one is refused by the checksum."
    good = trained_ckpt.read_bytes()
    reference = load_checkpoint(trained_ckpt)
    rng = random.Random(0)
    path = tmp_path / "flipped.pt"
    detected = unverified_silent = 0
    for _ in range(FLIPS):
        i = rng.randrange(len(good))
        path.write_bytes(good[:i] + bytes([good[i] ^ rng.randrange(1, 256)]) + good[i + 1:])
        try:
            load_checkpoint(path)
        except CheckpointError as e:
            assert str(path) in str(e) and "Fix:" in str(e)
            detected += 1
        try:  # what a loader without the checksum would do with the same file
            unverified_silent += not _same(load_checkpoint(path, verify=False), reference)
        except CheckpointError:
            pass
    print(f"{detected}/{FLIPS} flips detected with the checksum; without it {unverified_silent} loaded silently "
          f"with changed contents ({len(good)} bytes)")
    assert detected == FLIPS


def test_truncated_checkpoint_names_the_file_and_the_fix(trained_ckpt, tmp_path):
    good = trained_ckpt.read_bytes()
    path = tmp_path / "cut.pt"
    for keep in (0, 10, len(good) // 3, len(good) - 1):
        path.write_bytes(good[:keep])
        for verify in (True, False) if keep < len(good) // 2 else (True,):  # unverified, a cut-off digest still loads
            with pytest.raises(CheckpointError) as info:
                load_checkpoint(path, verify=verify)
            assert str(path) in str(info.value) and "Fix:" in str(info.value) and "Errno" not in str(info.value)


def test_resume_from_a_corrupt_checkpoint_is_refused(trained_ckpt, tmp_path):
    "fit(ckpt=...) on a damaged file stops with the CheckpointError instead of resuming from altered tensors."
    path = tmp_path / "run.pt"
    good = bytearray(trained_ckpt.read_bytes())
    good[len(good) // 2] ^= 0xFF
    path.write_bytes(bytes(good))
    model = TinyFCN(width=16)
    with pytest.raises(CheckpointError, match="Fix:"):
        fit(model, lambda m, b: m(b).mean(), [torch.zeros(1, 3, 32, 32)], torch.optim.Adam(model.parameters()),
            steps=5, ckpt=path, device="cpu")


def test_fsync_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b))[1])
    save_checkpoint(tmp_path / "x.pt", dict(w=torch.ones(3)))
    rename = events.index(("replace", "x.pt"))
    assert "fsync" in events[:rename], events


KILLED_SAVE = """
import os, signal, sys, torch
from seglab.engine import save_checkpoint
real_save = torch.save
def save_then_die(obj, f):  # the process dies with the temporary written, before the rename
    real_save(obj, f)
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
save_checkpoint(sys.argv[1], dict(w=torch.zeros(1000, 100), step=2))
"""


def test_orphan_of_a_killed_save_is_removed_by_the_next_save(tmp_path):
    path = tmp_path / "run.pt"
    save_checkpoint(path, dict(w=torch.ones(3), step=1))
    script = tmp_path / "die.py"
    script.write_text(KILLED_SAVE)
    r = subprocess.run([sys.executable, str(script), str(path)], env=dict(os.environ), timeout=120)
    assert r.returncode == -signal.SIGKILL
    orphans = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(orphans) == 1 and orphans[0].stat().st_size > 400_000  # what kill -9 leaves behind
    assert load_checkpoint(path)["step"] == 1  # the old checkpoint is intact
    save_checkpoint(path, dict(w=torch.ones(3), step=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["die.py", "run.pt"]
    assert load_checkpoint(path)["step"] == 3


X = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
Y = X.sum(1, keepdim=True)
BATCHES = [(X[i:i + 4], Y[i:i + 4]) for i in range(0, 16, 4)]


def _run(step_fn, tmp_path, ckpt_every, log_every=1, steps=10):
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    with pytest.raises(NonFiniteLoss) as info:
        fit(model, step_fn, BATCHES, torch.optim.SGD(model.parameters(), lr=0.05), steps=steps,
            ckpt=tmp_path / "run.pt", ckpt_every=ckpt_every, log_every=log_every, device="cpu")
    return str(info.value)


def _nan_gradient_at(call):
    "A finite loss whose gradient is NaN at micro-batch `call`: d/dw sqrt(|w - w|) at 0."
    calls = [0]
    def step(model, batch):
        calls[0] += 1
        loss = F.mse_loss(model(batch[0]), batch[1])
        if calls[0] == call:
            loss = loss + (model.weight - model.weight.detach()).abs().sqrt().sum()
        return loss
    return step


@pytest.mark.parametrize("log_every", [1, 5])
def test_finite_loss_with_nan_gradient_is_never_saved(tmp_path, log_every):
    message = _run(_nan_gradient_at(3), tmp_path, ckpt_every=1, log_every=log_every)
    state = load_checkpoint(tmp_path / "run.pt")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert f"{tmp_path / 'run.pt'} (step 2)" in message


@pytest.mark.parametrize("log_every", [1, 5])
def test_nan_loss_names_a_checkpoint_that_exists(tmp_path, log_every):
    message = _run(nan_loss_at(3), tmp_path, ckpt_every=2, log_every=log_every)
    assert "step 3" in message and f"{tmp_path / 'run.pt'} (step 2)" in message
    state = load_checkpoint(tmp_path / "run.pt")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_before_any_checkpoint_says_there_is_none(tmp_path):
    message = _run(nan_loss_at(2), tmp_path, ckpt_every=5)
    assert "No checkpoint" in message and "last good checkpoint" not in message
    assert not (tmp_path / "run.pt").exists()


@pytest.mark.parametrize("length", [dict(steps=0), dict(steps=-1), dict(epochs=0), dict(epochs=-2), dict(steps=1.5),
                                    dict(steps=True)])
def test_fit_refuses_no_training(length):
    model = nn.Linear(5, 1)
    with pytest.raises(ValueError, match="Fix:"):
        fit(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), BATCHES, torch.optim.SGD(model.parameters(), 0.1),
            device="cpu", **length)


HOLD_SAVE = """
import sys, time, torch
from seglab.engine import save_checkpoint
real_save = torch.save
def slow_save(obj, f):  # a live writer: the temporary exists (and is locked) for a few seconds
    real_save(obj, f)
    print("writing", flush=True)
    time.sleep(4)
torch.save = slow_save
save_checkpoint(sys.argv[1], dict(w=torch.zeros(10), step=7))
"""


def test_a_concurrent_save_keeps_the_other_writers_temporary(tmp_path):
    "Two processes writing the same cache entry: the second save must not delete the first one's temporary."
    path = tmp_path / "entry.pt"
    script = tmp_path / "hold.py"
    script.write_text(HOLD_SAVE)
    writer = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ))
    assert writer.stdout.readline().strip() == "writing"
    live = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(live) == 1
    save_checkpoint(path, dict(w=torch.ones(3), step=1))   # runs _clean_temporaries while the other writer is live
    assert live[0].exists(), "a live writer's temporary was deleted"
    assert writer.wait(timeout=120) == 0, "the other writer crashed"
    assert load_checkpoint(path)["step"] == 7 and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_companion_ckpt_names_the_file_beside_and_drops_a_stale_one(tmp_path):
    "A tour's baseline checkpoint: `<stem>-<tag><suffix>` beside the method's; deleted only when the method starts afresh."
    main = tmp_path / "scl-toy.pt"
    assert companion_ckpt(None, "baseline") is None
    base = companion_ckpt(str(main), "baseline")
    assert isinstance(base, Path) and base == tmp_path / "scl-toy-baseline.pt" and not base.exists()
    save_checkpoint(base, dict(step=5)); save_checkpoint(main, dict(step=5))
    assert companion_ckpt(main, "baseline") == base and load_checkpoint(base)["step"] == 5   # resuming: kept
    assert companion_ckpt(main, "protonet") == tmp_path / "scl-toy-protonet.pt"
    main.unlink()
    assert companion_ckpt(main, "baseline") == base and not base.exists()   # a fresh start: the older run's goes
