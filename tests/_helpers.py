"""Small checks the chapter tests share: counting the calls of a patched function (feature-cache tests) and the
keys every `tour` returns."""


def count_calls(monkeypatch, owner, name: str):
    """Patch `owner.name` (a module attribute) with a wrapper that records each call: returns `(calls, real)`, the
    list that grows by one per call and the unpatched function."""
    calls, real = [], getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls, real


def assert_tour_contract(r: dict, chance: float | None = None):
    """`r` (a `tour` result) has `metric`, `value`, `chance`, `baseline_name` (a str) and `baseline` (in [0, 1]);
    `chance`, when given, is its chance level."""
    for k in ("metric", "value", "chance", "baseline_name", "baseline"):
        assert k in r, k
    assert isinstance(r["baseline_name"], str) and 0 <= r["baseline"] <= 1
    assert chance is None or r["chance"] == chance


def sigkill_after_checkpoint(proc, ckpt, timeout: float = 120, poll: float = 0.05, wait: float = 60):
    """Wait (at most `timeout` s, polling every `poll` s) until the training process `proc` (a `subprocess.Popen`) has
    written its checkpoint `ckpt`, then kill it with SIGKILL (no cleanup at all). Asserts that it was still running at
    the kill and that the signal is what ended it."""
    import signal
    import time
    try:
        deadline = time.time() + timeout
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(poll)
        assert ckpt.exists() and proc.poll() is None, "the run ended or never checkpointed before the kill"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=wait)
    assert proc.returncode == -signal.SIGKILL


def nan_loss_at(call: int, loss=None):
    """A step function for `seglab.engine.fit` whose loss, `loss(model(x), y)` (default MSE), is NaN at micro-batch
    `call` (1-based) and finite at every other."""
    import torch.nn.functional as F
    loss, calls = loss or F.mse_loss, [0]
    def step(model, batch):
        calls[0] += 1
        value = loss(model(batch[0]), batch[1])
        return value * float("nan") if calls[0] == call else value
    return step


def assert_labels_reach_only_the_probe(train, data: dict, probe: str = "linear_probe."):
    """`train(data) -> (model, history)` run on `data` and on a copy whose training masks are shuffled between images
    (flipped and rolled): every weight and buffer outside `probe` ends bit-identical, the probe's weight differs."""
    import torch
    shuffled = {**data, "train": {**data["train"], "mask": data["train"]["mask"].flip(0).roll(3, dims=-1)}}
    sa, sb = train(data)[0].state_dict(), train(shuffled)[0].state_dict()
    for k in sa:
        if not k.startswith(probe):
            assert torch.equal(sa[k], sb[k]), k
    assert not torch.equal(sa[probe + "weight"], sb[probe + "weight"])


def assert_prepare_cached(monkeypatch, tmp_path, owner, name: str, prepare, prefix: str, entries: int = 2):
    """With the feature cache in `tmp_path`, `prepare()` (a chapter's `prepare_data`) computes `owner.name` `entries`
    times (one `features/{prefix}-*.pt` entry each) on the first call and never on the second, which returns equal
    `train` and `val` tensors. Returns `(first result, calls, unpatched owner.name)` for further checks."""
    import torch
    monkeypatch.setenv("SEGLAB_CACHE", str(tmp_path))
    calls, real = count_calls(monkeypatch, owner, name)
    first = prepare()
    assert len(calls) == entries and len(list((tmp_path / "features").glob(f"{prefix}-*.pt"))) == entries
    second = prepare()
    assert len(calls) == entries                                      # the backbone did not run again
    for split in ("train", "val"):
        assert first[split].keys() == second[split].keys()
        for k in first[split]:
            assert torch.equal(first[split][k], second[split][k]), (split, k)
    return first, calls, real
