"""PPAP (`seglab.methods.ppap`, nbs/10_unsupervised/12_ppap.ipynb): the head starts as the frozen last block, the
ambiguous zone gets no gradient, labels never reach the head, resuming, the tour contract, the feature cache, the
bench case, and the full CONFIG for one step on real samples.

The full-config test is slow (a ViT-S/16 at full size on CPU): it runs only when the nbdev flag `slow` is enabled
(`--nbdev-flags slow` or `SEGLAB_FLAGS=slow`), like the notebooks' `#| slow` cells.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from seglab.backbones import dino_vit, toy_vit
from seglab.config import pick
from seglab.data.datasets import sample_data_dir
from seglab.methods import ppap

from _helpers import (assert_labels_reach_only_the_probe, assert_prepare_cached, assert_tour_contract,
                      count_calls)
from interrupt import assert_resumes_exactly

COCO128 = sample_data_dir() / "coco128_seg"


def synthetic_data(n_train=16, n_val=8, k=5, seed=0):
    "Toy-ViT tokens of random 32x32 images (4x4 patches) with random masks."
    g = torch.Generator().manual_seed(seed)
    vit = toy_vit()
    def split(n):
        images = torch.rand(n, 3, 32, 32, generator=g)
        return dict(**ppap.token_features(vit, images, 8, "cpu"), mask=torch.randint(k, (n, 32, 32), generator=g))
    return vit, dict(train=split(n_train), val=split(n_val))


def small_cfg(**kw):
    return pick(ppap.CONFIG, "toy").replace(**{**dict(steps=6, batch=4, split=32, feat_batch=8, n_init=2,
                                                      ckpt_every=2), **kw})


def test_head_starts_as_the_frozen_last_block_of_a_dino_vit():
    "The real ViT-S/16 architecture (random weights): c == f at initialisation, CLS token fed to the copied block."
    vit = dino_vit("vit_small_patch16_224.dino", pretrained=False)
    tok = ppap.token_features(vit, torch.rand(2, 3, 64, 48), device="cpu")
    assert tok["x"].shape == (2, 1 + 4 * 3, 384) and tok["f"].shape == (2, 384, 4, 3)
    model = ppap.build_model(pick(ppap.CONFIG, "full"), vit).eval()
    with torch.no_grad():
        assert torch.allclose(model.code(tok["x"], (4, 3)), tok["f"], atol=1e-4)
    assert float(model.phi0) == pytest.approx(0.55) and float(model.psi0) == pytest.approx(0.15)


def test_zone_patch_gets_no_gradient_through_the_loss():
    """Through `ppap_loss` itself: a patch in every anchor's ambiguous zone gets zero gradient on its embedding; with
    `zone=False` it does get one (it is a negative)."""
    f = F.normalize(torch.tensor([[1.0, 0, 0], [0.95, 0.31, 0], [0.45, 0.89, 0], [-1.0, 0, 0]]), dim=1)
    for zone, zero in ((True, True), (False, False)):
        z = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=1).requires_grad_(True)
        # one chunk of the first two patches, both anchors: each has the other as its only positive
        loss = ppap.ppap_loss(z, f, 0.9, 0.1, T=0, split=2, trainpatchsplit=1, zone=zone, tau=0.5,
                              generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert (z.grad[2].abs().sum() == 0) == zero, z.grad[2]
        assert z.grad[3].abs().sum() > 0  # the definite negative is always pushed


def test_leftover_patches_are_contrasted_but_never_anchors():
    "N = 70 patches, split 32: two chunks; patches 64..69 are never anchors, yet they are in the positive sets."
    f = F.normalize(torch.ones(70, 4) + 0.01 * torch.randn(70, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    trace = {}
    ppap.ppap_loss(F.normalize(torch.randn(70, 8), dim=1), f, 0.5, 0.1, T=1, split=32, trainpatchsplit=4,
                   generator=torch.Generator().manual_seed(0), trace=trace)
    anchors = torch.cat(trace["anchors"])
    assert len(trace["anchors"]) == 2 and len(anchors) == 16 and anchors.max() < 64
    assert all(m["pos"][:, 64:].all() for m in trace["prop"])


def test_thresholds_are_float32_on_the_features_device():
    "Unlike the official fp16 `cuda:0` tensors: Φ, Ψ and the proxy follow the features' dtype and device."
    f = F.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    m = ppap.propagate(f, torch.arange(5), 0.3, 0.1, 2, 3.0, 4.0)
    assert m["phi"].dtype == m["psi"].dtype == m["proxy"].dtype == torch.float32
    assert m["phi"].device == f.device
    m64 = ppap.propagate(f.double(), torch.arange(5), 0.3, 0.1, 2, 3.0, 4.0)
    assert m64["phi"].dtype == torch.float64 and torch.equal(m64["pos"], m["pos"])


def test_resume_equals_uninterrupted(tmp_path):
    "Interrupted after step 3 (last checkpoint: step 2), then resumed: the same weights and thresholds."
    vit, data = synthetic_data()
    cfg = small_cfg()
    ref, res, hist = assert_resumes_exactly(lambda **kw: ppap.train(cfg, data, backbone=vit, **kw),
                                            tmp_path / "ppap.pt")
    assert int(res.steps_done) == 6 and hist.records[-1]["step"] == 6
    a = ref.state_dict()
    assert "phi0" in a
    assert not torch.equal(a["head.mlp.fc2.weight"], vit.blocks[-1].mlp.fc2.weight)  # the head did train


def test_train_and_tour_take_ckpt():
    import inspect
    assert inspect.signature(ppap.train).parameters["ckpt"].default is None
    assert inspect.signature(ppap.tour).parameters["ckpt"].default is None


def test_tour_reports_the_strongest_baseline(monkeypatch):
    "The tour contract: metric, value, chance, baseline_name and baseline (k-means on the frozen features)."
    monkeypatch.setitem(ppap.CONFIG, "toy", dict(ppap.CONFIG["toy"], n_train=16, n_val=8, steps=2, batch=4,
                                                 feat_batch=8))
    monkeypatch.setitem(ppap.CONFIG, "common", dict(ppap.CONFIG["common"], n_init=2))
    out = ppap.tour("toy")
    assert_tour_contract(out)
    assert "k-means" in out["baseline_name"] and 0 <= out["value"] <= 1
    cfg = pick(ppap.CONFIG, "toy")
    data = ppap.prepare_data(cfg)
    assert out["baseline"] == ppap.kmeans_baseline(data, cfg.n_clusters, cfg.seed, cfg.n_init)["miou"]


def test_labels_never_reach_the_head():
    """The linear probe trains on the detached code: with the labels shuffled between images, head, projection,
    thresholds and cluster probe end bit-identical (only the linear probe differs). Fails when a label reaches the
    unsupervised step (e.g. positives mined from the mask, or the probe's loss not detached)."""
    vit, data = synthetic_data()
    cfg = small_cfg(steps=4)
    assert_labels_reach_only_the_probe(lambda d: ppap.train(cfg, d, backbone=vit), data)


def test_prepare_data_second_call_reads_the_feature_cache(tmp_path, monkeypatch):
    "The frozen tokens come from `seglab.cache.feature_cache`: a second call does not run the backbone."
    cfg = pick(ppap.CONFIG, "toy").replace(n_train=6, n_val=3, feat_batch=4)
    first, *_ = assert_prepare_cached(monkeypatch, tmp_path, ppap, "token_features", lambda: ppap.prepare_data(cfg),
                                      "ppap")
    assert first["train"]["fine"].max() >= 4 and first["train"]["mask"].max() <= 4  # fine labels kept beside coarse


@pytest.mark.parametrize("cached", [True, False])
def test_bench_case_runs_one_step(cached, monkeypatch):
    "`bench_case` (toy sizes): one call is one optimizer step; the frozen backbone runs only without the cache."
    calls, real = count_calls(monkeypatch, ppap, "token_features")
    assert ppap.BENCH_HAS_CACHE is True
    cfg = pick(ppap.CONFIG, "toy").replace(batch=4, device="cpu")
    case = ppap.bench_case(cfg, cached=cached)
    assert case["batch"] == 4
    n0 = len(calls)
    case["run"]()
    assert len(calls) - n0 == (0 if cached else 1)


@pytest.mark.skipif(not COCO128.exists(), reason=f"the COCO128 sample is not at {COCO128} (set SEGLAB_SHARED_DATA)")
def test_full_config_one_step(tmp_path, request):
    """The chapter's full CONFIG, unchanged except the data root, steps=1 and pretrained=False: one training step at
    full size (224 train crops, 320 eval crops, ViT-S/16, batch 32, chunks of 784 patches) on real COCO128 images laid
    out as COCO-Stuff-27."""
    if "slow" not in request.config.getoption("--nbdev-flags").split():
        pytest.skip("slow (a ViT-S/16 over 128 images at full size on CPU): enable with --nbdev-flags slow or "
                    "SEGLAB_FLAGS=slow")
    from test_hp import cocostuff27_root
    full = pick(ppap.CONFIG, "full")
    cfg = full.replace(steps=1, pretrained=False)
    assert {k for k in full if full[k] != cfg[k]} == {"steps", "pretrained"}
    root = cocostuff27_root(tmp_path, n_train=96, n_val=32)
    vit = ppap.frozen_backbone(cfg)
    data = ppap.prepare_data(cfg, root=root, backbone=vit)
    assert data["train"]["x"].shape == (96, 197, 384) and data["train"]["f"].shape == (96, 384, 14, 14)
    assert data["val"]["x"].shape == (32, 401, 384) and data["val"]["mask"].shape == (32, 320, 320)
    model, hist = ppap.train(cfg, data, backbone=vit)
    assert int(model.steps_done) == 1 and math.isfinite(hist.last("loss"))
    r = ppap.evaluate(model, cfg, data)
    assert 0 <= r["miou"] <= 1 and 0 <= r["linear_miou"] <= 1 and 0 <= r["crf_miou"] <= 1   # window DenseCRF at 320 px


def test_evaluate_reports_with_and_without_crf():
    "evaluate() gives the unsupervised mIoU without and with STEGO's DenseCRF; crf=None skips the CRF."
    vit, data = synthetic_data()
    g = torch.Generator().manual_seed(5)
    data["val"]["image"] = torch.rand(len(data["val"]["x"]), 3, 32, 32, generator=g)
    cfg = small_cfg(steps=2)
    model, _ = ppap.train(cfg, data, backbone=vit)
    r = ppap.evaluate(model, cfg, data)
    assert 0 <= r["crf_miou"] <= 1 and 0 <= r["crf_acc"] <= 1
    assert "crf_miou" not in ppap.evaluate(model, cfg.replace(crf=None), data)


def test_matched_recall_is_the_best_fixed_recall_at_ppap_precision():
    "The fixed threshold's recall in matched_recall equals a brute-force sweep over every threshold."
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    labels = torch.randint(4, (2, 6, 6), generator=g)
    f = (centres[labels] + 0.9 * torch.randn(2, 6, 6, 16, generator=g)).permute(0, 3, 1, 2)
    rows = ppap.matched_recall(f, labels, [0.5, 0.7], 0.1, n_anchors=30)
    x, lab = F.normalize(f.permute(0, 2, 3, 1).reshape(-1, 16), dim=1), labels.flatten()
    anchors = torch.randperm(len(lab), generator=torch.Generator().manual_seed(0))[:30]
    sim, same = x[anchors] @ x.T, lab[anchors][:, None] == lab[None]
    own = torch.zeros_like(same); own[torch.arange(30), anchors] = True
    s, y = sim[~own], same[~own]
    for r in rows:
        best = 0.0
        for t in s.unique():
            p = s >= t
            if (y & p).sum() / p.sum() >= r["precision"]:
                best = max(best, float((y & p).sum() / y.sum()))
        assert abs(r["fixed_recall"] - best) < 1e-6 and abs(r["gain"] - (r["recall"] - r["fixed_recall"])) < 1e-9
