"""Checks of the MBS chapter module (seglab.methods.mbs): the object identifier and pseudo labels against ToyWorld's
truth (and the breakages they catch), resume through seglab.engine.fit within and across an incremental step, the CLI
wiring, and the full config for one step on the real VOC samples."""

import pytest
import torch

from seglab.cli import get_chapter
from seglab.config import pick
from seglab.data.datasets import sample_data_dir
from seglab.methods import mbs

from interrupt import Stop

VOC = sample_data_dir() / "voc_samples"


def tiny(**over):
    "A toy config small enough for a few steps in a test (task 4-2: three steps)."
    base = dict(n_train=16, n_test=8, batch=4, steps0=4, steps=4, ckpt_every=2, log_every=1)
    return pick(mbs.CONFIG, "toy").replace(**{**base, **over})


class StopAfter:
    "Raise `Stop` at the `n`-th logged update of a run, whatever its incremental step (the engine's step restarts)."
    def __init__(self, n):
        self.n, self.seen = n, 0

    def update(self, step, **_):
        self.seen += 1
        if self.seen == self.n:
            raise Stop

    def close(self):
        pass


def test_chapter_is_ready_for_the_cli():
    assert get_chapter("mbs").status == "ready"


@pytest.mark.parametrize("stop_at", [3, 7])     # inside step 0, and inside step 1 (after step 0 finished)
def test_resume_equals_uninterrupted(tmp_path, stop_at):
    cfg = tiny()
    data = mbs.make_data(cfg)
    ref = mbs.train(cfg, data)["model"].state_dict()
    ckpt = tmp_path / "mbs.pt"
    with pytest.raises(Stop):
        mbs.train(cfg, data, ckpt=ckpt, callbacks=[StopAfter(stop_at)])
    assert mbs.step_ckpt(ckpt, 0).is_file()
    resumed = mbs.train(cfg, data, ckpt=ckpt)["model"].state_dict()
    assert ref.keys() == resumed.keys() and all(torch.equal(ref[k], resumed[k]) for k in ref)


def test_variants_and_errors():
    assert mbs.variant("mbs", identify=False)["identify"] is False
    with pytest.raises(ValueError, match="valid"):
        mbs.variant("mib")
    with pytest.raises(KeyError, match="valid"):
        mbs.variant("mbs", identifier=False)
    with pytest.raises(ValueError, match="valid"):
        mbs.task_sizes(tiny(task="3-3"))


class NoisyOracle(torch.nn.Module):
    "A stand-in old decoder whose logits are its input: ToyWorld's truth (old classes, else background) plus noise."
    def forward(self, tokens):
        return dict(logits=tokens)


@pytest.fixture(scope="module")
def old_step():
    """An imperfect old model of step 1 built from ToyWorld's truth (no training): logits 2.5 on the true old class
    (or background) on the 16x16 patch grid, plus N(0, 1) noise, so that some old pixels are uncertain."""
    cfg = tiny(n_train=64)
    step = mbs.toy_split(cfg, 1, True, cfg.n_train)
    old_truth = torch.where(step["truth"] <= 4, step["truth"], torch.zeros_like(step["truth"]))
    onehot = torch.nn.functional.one_hot(old_truth, 5).permute(0, 3, 1, 2).float()
    g = torch.Generator().manual_seed(0)
    logits = 2.5 * torch.nn.functional.adaptive_avg_pool2d(onehot, 16) + torch.randn(64, 5, 16, 16, generator=g)
    return cfg, mbs.Segmenter(None, NoisyOracle(), 64), dict(step, tokens=logits)


def test_identifier_check_and_breakages(old_step):
    """The object identifier ignores pixels enriched in old classes; pseudo labels carry their true class more often
    than chance. Breakages that must fail these checks: random pseudo labels, labels shifted by one, the identifier's
    comparison inverted."""
    cfg, old, step = old_step
    real = mbs.identifier_check(old, step, cfg.thresh)
    assert real["enrichment"] >= 1.5 and real["old_share_kept"] < real["old_share_candidates"]
    assert real["pl_precision"] > 0.5

    def random_labels(y, p, thresh=0.7, identify=True, ignore_index=255):      # old-model outputs replaced by noise
        g = torch.Generator().manual_seed(0)
        return mbs.pseudo_label(y, torch.softmax(torch.randn(p.shape, generator=g) * 4, 1), thresh, identify, ignore_index)

    def shifted(y, p, thresh=0.7, identify=True, ignore_index=255):            # pseudo labels off by one class
        out = mbs.pseudo_label(y, p, thresh, identify, ignore_index)
        return torch.where((out > 0) & (out < 255) & (y == 0), (out % (p.shape[1] - 1)) + 1, out)

    def inverted(y, p, thresh=0.7, identify=True, ignore_index=255):           # the identifier's comparison flipped
        out = mbs.pseudo_label(y, p, thresh, False, ignore_index)
        if identify:
            out = torch.where((out == 0) & (p[:, 0] > p[:, 1:].sum(1)), torch.full_like(out, ignore_index), out)
        return out

    for broken in (random_labels, shifted):
        assert mbs.identifier_check(old, step, cfg.thresh, broken)["pl_precision"] < 0.5 * real["pl_precision"]
    assert mbs.identifier_check(old, step, cfg.thresh, inverted)["enrichment"] < 1.0


def test_old_model_is_frozen_and_separate():
    cfg = tiny()
    model = mbs.build_model(cfg)
    old = mbs.frozen_copy(model)
    assert old.decoder is not model.decoder and old.encoder is model.encoder
    assert not any(p.requires_grad for p in old.decoder.parameters())
    model.decoder.add_step(2)
    assert old.decoder.n_cls == [5] and model.decoder.n_cls == [5, 2]


def test_bench_case_runs_one_step():
    for cached in (True, False):
        case = mbs.bench_case(tiny(), cached)
        case["run"]()
        assert case["batch"] == 4


@pytest.mark.skipif(not (VOC / "JPEGImages").is_dir(), reason=f"VOC samples not found at {VOC} (set SEGLAB_SHARED_DATA)")
def test_full_config_one_step_on_voc_samples(tmp_path):
    """The full CONFIG unchanged except data root (and its split list: the samples have `train`, not `train_aug`),
    step counts and pretrained=False, at full size (ViT-S/16 at 256 px, d_model 384) on the three labelme VOC samples:
    one step of step 0, then one step of step 1 of 15-5 (2011_000006: sofa is new, person and chair become
    background), with the old model's pseudo labels and ignored pixels there."""
    cfg = pick(mbs.CONFIG, "full").replace(data_root=str(VOC), train_split="train", pretrained=False, steps0=1,
                                           steps=1)
    data = mbs.make_data(cfg)
    ids = [data["train"][1].base.ids[i] for i in data["train"][1].index]
    assert "2011_000006" in ids
    run = mbs.train(cfg, data, device="cpu")
    model = run["model"]
    assert model.decoder.n_cls == [16, 5]
    item = data["train"][1][ids.index("2011_000006")]
    assert set(item["mask"].unique().tolist()) <= {0, 18, 255} and 18 in item["mask"]
    assert {9, 15} <= set(item["truth"].unique().tolist())   # chair and person: old classes labelled background
    with torch.no_grad():
        p_old = run["old"](item["image"][None]).softmax(1)
    assert p_old.shape == (1, 16, 256, 256) and torch.isfinite(p_old).all()
    yh = mbs.pseudo_label(item["mask"][None], p_old, cfg.thresh)
    assert torch.equal(yh[0][item["mask"] == 18], item["mask"][item["mask"] == 18])
    with torch.no_grad():
        assert model(item["image"][None]).shape == (1, 21, 256, 256)


def test_tour_contract_and_resume(tmp_path, monkeypatch):
    "`tour` (what `seglab train mbs` and `seglab tour` call) on a shrunken toy config: the contract keys, and a rerun resumes."
    small = dict(mbs.CONFIG["toy"], n_train=16, n_test=8, batch=4, steps0=4, steps=2)
    monkeypatch.setitem(mbs.CONFIG, "toy", small)
    ckpt = tmp_path / "mbs-toy.pt"
    first = mbs.tour("toy", ckpt=ckpt)
    assert {"metric", "value", "chance", "baseline_name", "baseline"} <= set(first)
    assert isinstance(first["baseline_name"], str) and 0 <= first["chance"] <= 1 and 0 <= first["value"] <= 1
    assert first["baseline"] == max(first["plkd"], first["finetune"])
    for tag in ("base-step0", "step1", "step2", "plkd-step2", "finetune-step2"):
        assert (tmp_path / f"mbs-toy-{tag}.pt").is_file(), tag
    assert mbs.tour("toy", ckpt=ckpt)["value"] == first["value"]   # finished runs reload their last weights
