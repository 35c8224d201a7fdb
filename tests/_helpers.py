"""Small checks the chapter tests share: counting the calls of a patched function (feature-cache tests), the
keys every `tour` returns, and the real VOC samples laid out as PASCAL-5i (few-shot full-config tests)."""
from pathlib import Path


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


PASCAL5I_FOLD0_VAL = ("voc2012val_crop_001", "voc2012val_crop_114")  # classes 1 (aeroplane) and 3 (bird): fold 0's test


def pascal5i_layout(root: Path, samples: Path, copies: int = 4, val_stems=PASCAL5I_FOLD0_VAL, unlisted=None) -> dict:
    """Lay the VOC samples of `samples` (the shared `voc_samples` folder) out under `root` as the registry lays out
    PASCAL-5i: `voc2012/VOCdevkit/VOC2012` (JPEGImages, SegmentationClass, ImageSets/Segmentation/val.txt),
    `voc_aug/SegmentationClassAug` and `pascal5i/voc_sbd_merge_noduplicate.txt` (PFENet's training list). Each sample
    is written `copies` times (odd copies flipped left-right) so that every class has several images; the copies of
    `val_stems` make val.txt; copy `k` of sample `stem` with `unlisted(stem, k)` true is in SegmentationClassAug but
    not in the list. Returns the ids as `{"val": [...], "list": [...], "extra": [...]}` (extra: the unlisted ones)."""
    from PIL import Image
    voc = root / "voc2012" / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    aug = root / "voc_aug" / "SegmentationClassAug"
    aug.mkdir(parents=True)
    (root / "pascal5i").mkdir()
    ids = {"val": [], "list": [], "extra": []}
    for p in sorted((samples / "JPEGImages").glob("*.jpg")):
        im, lab = Image.open(p), Image.open(samples / "SegmentationClass" / f"{p.stem}.png")
        for k in range(copies):
            sid = f"{p.stem}_{k}"
            a, b = (im, lab) if k % 2 == 0 else (im.transpose(Image.FLIP_LEFT_RIGHT), lab.transpose(Image.FLIP_LEFT_RIGHT))
            a.save(voc / "JPEGImages" / f"{sid}.jpg")
            for d in (voc / "SegmentationClass", aug):
                b.save(d / f"{sid}.png")
            ids["val" if p.stem in val_stems else "extra" if unlisted and unlisted(p.stem, k) else "list"].append(sid)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids["val"]) + "\n")
    (root / "pascal5i" / "voc_sbd_merge_noduplicate.txt").write_text(
        "".join(f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n" for i in ids["list"]))
    return ids
