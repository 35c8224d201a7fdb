"""Checks of the DFR chapter module (seglab.methods.dfr, a reconstruction): kernel and loss invariants, the
stop-gradient of the deep kernel, the breakage checks, resuming, the CLI entry points and the full config for one
step on the real VOC samples."""
import math
import os

import pytest
import torch

from seglab.config import pick
from seglab.data.datasets import sample_data_dir
from seglab.methods import dfr

from interrupt import assert_resumes_exactly

VOC = sample_data_dir() / "voc_samples"
needs_voc = pytest.mark.skipif(not (VOC / "JPEGImages").is_dir(),
                               reason=f"VOC samples not found at {VOC} (set SEGLAB_SHARED_DATA)")
SLOW = "slow" in os.environ.get("SEGLAB_FLAGS", "").split()


def tiny(**over):
    "A toy config small enough for a few training steps in a test."
    cfg = pick(dfr.CONFIG, "toy").replace(n_train=16, n_val=8, steps=4, batch=4, log_every=1, ckpt_every=2)
    return cfg.replace(**over)


@pytest.fixture(scope="module")
def data():
    return dfr.make_data(tiny())


# ---------------------------------------------------------------- kernels and losses

def test_kernel_is_symmetric_bounded_and_has_no_centre():
    torch.manual_seed(0)
    g = torch.rand(1, 3, 10, 10)
    r = 2
    K = dfr.local_kernel([(g, 0.4, 1.0)], 3.0, r)
    offs = dfr.window_offsets(r)
    for o, (dy, dx) in enumerate(offs):
        back = offs.index((-dy, -dx))
        for y in range(r, 10 - r):
            for x in range(r, 10 - r):
                assert torch.allclose(K[0, o, y, x], K[0, back, y + dy, x + dx])
    assert (K[:, len(offs) // 2] == 0).all() and 0 <= K.min() and K.max() <= 1


def test_kernel_exp_is_fp32_under_low_precision_inputs():
    g = torch.rand(1, 3, 6, 6).half()
    assert dfr.local_kernel([(g, 0.01, 1.0)], 2.0, 1).dtype == torch.float32


def test_reg_loss_zero_for_constant_one_hot_and_positive_otherwise():
    K = dfr.local_kernel([(torch.rand(2, 3, 8, 8), 0.5, 1.0)], 2.0, 2)
    S1 = torch.nn.functional.one_hot(torch.full((2, 8, 8), 1), 4).permute(0, 3, 1, 2).float()
    assert dfr.reg_loss(S1, K, 2) < 1e-6
    assert dfr.reg_loss(torch.rand(2, 4, 8, 8).softmax(1), K, 2) > 0
    with pytest.raises(ValueError, match="same r"):
        dfr.reg_loss(S1, K, 3)


def test_regularized_loss_gradient_smooths_predictions():
    "A few gradient steps on L_reg alone make neighbours agree more (a flipped sign would make them disagree)."
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 12, 12, requires_grad=True)
    K = dfr.local_kernel([(torch.zeros(1, 3, 12, 12), 0.5, 1.0)], 2.0, 2)
    before = float(dfr.reg_loss(logits.softmax(1), K, 2).detach())
    opt = torch.optim.Adam([logits], lr=0.2)
    for _ in range(30):
        opt.zero_grad(); dfr.reg_loss(logits.softmax(1), K, 2).backward(); opt.step()
    assert float(dfr.reg_loss(logits.softmax(1), K, 2).detach()) < 0.5 * before


def test_no_gradient_reaches_features_through_the_dfr_kernel():
    cfg = tiny(r=2, sigma_xy=2.0)
    f = torch.nn.functional.normalize(torch.randn(2, 8, 16, 16), dim=1).requires_grad_()
    S = torch.randn(2, 5, 16, 16, requires_grad=True)
    dfr.reg_loss(S.softmax(1), dfr.dfr_kernel(torch.rand(2, 3, 64, 64), f, cfg), cfg.r).backward()
    assert f.grad is None and S.grad.abs().sum() > 0


def test_fc_loss_pulls_same_label_features_together():
    "Trained on L_fc alone, affinities of same-label pairs go to ~1 and different-label pairs to ~0."
    cfg = tiny()
    torch.manual_seed(0)
    lab = torch.full((1, 8, 8), 255); lab[0, 1, 1:7] = 0; lab[0, 6, 1:7] = 5; lab[0, 3:5, 3] = 5
    f = torch.randn(1, 4, 8, 8, requires_grad=True)
    opt = torch.optim.Adam([f], lr=0.05)
    first = None
    for _ in range(150):
        loss = dfr.fc_loss(torch.nn.functional.normalize(f, dim=1), lab, cfg)
        first = float(loss) if first is None else first
        opt.zero_grad(); loss.backward(); opt.step()
    fn = torch.nn.functional.normalize(f, dim=1).detach()
    a = dfr.fc_affinity(fn[0, :, lab[0] != 255].T, fn[0, :, lab[0] != 255].T, cfg.sigma_f)
    lb = lab[0][lab[0] != 255]
    same = lb[:, None] == lb[None]
    assert float(loss) < 0.2 * first and a[same].min() > 0.9 and a[~same].max() < 0.1


def test_total_loss_composition_and_deep_start(data):
    cfg = tiny()
    torch.manual_seed(0)
    model = dfr.build_model(cfg)
    b = dict(image=data["train"]["image"][:4], scribble=data["train"]["scribble"][:4], feats=data["train"]["feats"][:4])
    L = dfr.dfr_losses(model, b, cfg.steps, cfg)
    assert torch.allclose(L["loss"], L["pce"] + cfg.lam_reg * L["reg"] + cfg.lam_fc * L["fc"])
    early = dfr.dfr_losses(model, b, 0, cfg)["reg"]
    shallow = dfr.dfr_losses(model, b, 0, cfg.replace(method="shallow"))["reg"]
    assert torch.allclose(early, shallow) and not torch.allclose(L["reg"], shallow)
    with pytest.raises(ValueError, match="one of"):
        dfr.dfr_losses(model, b, 0, cfg.replace(method="crf"))


def test_partial_ce_ignores_unlabelled_and_names_the_fix():
    lg = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="255 = unlabelled"):
        dfr.partial_ce(lg, torch.full((1, 4, 4), 255))


def test_scribble_check_catches_misalignment(data):
    full = dfr.toy_data(16, 100)
    assert min(dfr.scribble_agreement(full, (32, 32)).values()) > 0.95
    shifted = dict(full, scribble=torch.roll(full["scribble"], 6, dims=-1))
    assert min(dfr.scribble_agreement(shifted, (32, 32)).values()) < 0.95
    bilinear = torch.nn.functional.interpolate(full["scribble"][:, None].float(), size=(32, 32), mode="bilinear")[:, 0].round().long()
    assert not set(bilinear.unique().tolist()) <= set(full["scribble"].unique().tolist())   # bilinear invents labels


def test_scribble_from_mask_labels_only_true_pixels():
    m = torch.zeros(40, 40, dtype=torch.long); m[10:30, 10:30] = 7; m[0:3] = 255
    s = dfr.scribble_from_mask(m)
    on = s != 255
    assert on.any() and (s[on] == m[on]).all() and set(s[on].unique().tolist()) == {0, 7}


# ---------------------------------------------------------------- training, resume, CLI


def test_resume_equals_uninterrupted(tmp_path, data):
    cfg = tiny(steps=4, ckpt_every=2, deep_start=0.5)
    assert_resumes_exactly(lambda **kw: dfr.train(cfg, data, **kw), tmp_path / "dfr.pt")   # weights and buffers


def test_tour_and_bench_contract(monkeypatch):
    monkeypatch.setitem(dfr.CONFIG, "toy", {**dfr.CONFIG["toy"], "n_train": 16, "n_val": 8, "steps": 2, "batch": 4})
    out = dfr.tour("toy")
    assert {"metric", "value", "chance", "baseline_name", "baseline"} <= set(out)
    assert all(0 <= out[k] <= 1 for k in ("value", "chance", "baseline"))
    for cached in (True, False):
        case = dfr.bench_case(tiny(), cached=cached)
        case["run"]()
        assert case["batch"] == 4
    assert dfr.BENCH_HAS_CACHE


def test_bad_data_name_the_fix():
    with pytest.raises(ValueError, match="'toy' or 'voc'"):
        dfr.make_data(tiny(data="coco"))


# ---------------------------------------------------------------- the full config, one step, real samples

@needs_voc
def test_full_config_one_step_on_voc_samples():
    "The full CONFIG unchanged except data root, steps and pretrained=False: one step at 320 px on the VOC samples."
    cfg = pick(dfr.CONFIG, "full").replace(root=str(VOC), steps=1, pretrained=False, n_val=2, log_every=1)
    assert cfg.crop == 320 and cfg.batch == 8 and cfg.backbone == "vit_small_patch16_224.augreg_in21k_ft_in1k"
    d = dfr.make_data(cfg)
    assert (d["train"]["scribble"] != 255).any() and d["train"]["image"].shape[-1] == 320
    # the train list of the samples holds 3 images: repeat them to fill one batch of 8
    tr = {k: v.repeat(3, *[1] * (v.dim() - 1))[:8] for k, v in d["train"].items()}
    run = dfr.train(cfg, dict(train=tr, val=d["val"]))
    rec = run["history"].records[-1]
    assert math.isfinite(rec["loss"]) and {"pce", "reg", "fc"} <= set(rec)
    lg, f = run["model"](tr["image"][:1])
    assert lg.shape == (1, 21, 80, 80) and f.shape == (1, 64, 80, 80)        # losses at 1/4 resolution
    r = dfr.evaluate(run["model"], cfg, d["val"])
    assert 0 <= r["miou"] <= 1


def test_region_vote_relabels_each_true_region_by_its_majority():
    mask = torch.tensor([[[0, 0, 5, 5], [0, 0, 5, 5], [255, 255, 0, 0]]])   # two regions of class 0, one of 5
    pred = torch.tensor([[[1, 1, 5, 2], [1, 3, 5, 5], [7, 7, 4, 0]]])
    out = dfr.region_vote(pred, mask)
    assert out.tolist() == [[[1, 1, 5, 5], [1, 1, 5, 5], [7, 7, 0, 0]]]   # a tie goes to the smaller class id; 255 kept
    assert torch.equal(pred, torch.tensor([[[1, 1, 5, 2], [1, 3, 5, 5], [7, 7, 4, 0]]]))     # input untouched
    assert torch.equal(dfr.region_vote(mask.clone(), mask), mask)                          # perfect stays perfect
