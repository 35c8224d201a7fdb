"""Checks of the ABD chapter module (seglab.methods.abd): the SSL4MIS UNet, displacement invariants and mechanism
checks, the ACDC data path (official patient split from a WSL4MIS-shaped download), checkpoint selection on the
val split, resuming, and the full config for one step on the real ACDC sample."""
import dataclasses
import os
import warnings
import zipfile

import h5py
import numpy as np
import pytest
import torch

from seglab.config import pick
from seglab.data import download as dl
from seglab.data.datasets import ACDCSlices, DatasetNotFoundError
from seglab.methods import abd

from interrupt import assert_resumes_exactly

OFFICIAL_10PCT = ["patient099", "patient038", "patient050", "patient100", "patient058", "patient021", "patient049"]
SLOW = "slow" in os.environ.get("SEGLAB_FLAGS", "").split()


def tiny(**over):
    "A toy config small enough for a few training steps in a test."
    cfg = pick(abd.CONFIG, "toy").replace(n_train=3, n_labeled=1, slices=4, n_volumes=2, size=32,
                                          channels=(4, 8, 8, 8, 8), batch_l=2, batch_u=2, iters=4, log_every=1)
    return cfg.replace(**over)


# ---------------------------------------------------------------- the network

def test_unet_is_the_ssl4mis_bilinear_unet():
    net = abd.UNet()
    assert sum(p.numel() for p in net.parameters()) == 1_813_764      # transposed convs would give 1,944,324
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules())
    assert net(torch.rand(1, 1, 32, 32)).shape == (1, 4, 32, 32)


# ---------------------------------------------------------------- displacements

def test_abd_r_moves_one_reliable_patch():
    torch.manual_seed(0)
    x1, x2 = torch.rand(3, 1, 32, 32), torch.rand(3, 1, 32, 32)
    l1, l2 = torch.randn(3, 4, 32, 32), torch.randn(3, 4, 32, 32)
    r1, r2, idx = abd.abd_r(x1, x2, l1, l2, grid=4, top_k=4)
    changed = (abd.to_patches(r1, 4) != abd.to_patches(x1, 4)).flatten(2).any(-1)
    assert (changed.sum(1) == 1).all()
    top = abd.patch_confidence(l2, 4).topk(4, dim=1).indices
    assert all(idx["j"][n] in top[n] for n in range(3))
    with pytest.raises(ValueError, match="top_k"):
        abd.abd_r(x1, x2, l1, l2, grid=2, top_k=5)


def test_abd_i_keeps_image_and_label_aligned():
    torch.manual_seed(0)
    y1, y2 = torch.randint(4, (8, 32, 32)), torch.randint(4, (8, 32, 32))
    x1, x2 = y1[:, None].float(), y2[:, None].float()
    a, b, c, d, info = abd.abd_i(x1, x2, y1, y2, torch.randn(8, 4, 32, 32), torch.randn(8, 4, 32, 32), p=0.5)
    assert torch.equal(a[:, 0].long(), c) and torch.equal(b[:, 0].long(), d)
    assert torch.equal(a[~info["on"]], x1[~info["on"]])


def test_mechanism_check_fails_when_displacements_are_off_or_labels_stay():
    cfg = pick(abd.CONFIG, "toy")
    report = abd.displacement_check(cfg)
    assert report["abd_r_moved"] > 0 and report["abd_i_moved"] > 0 and report["aligned"]
    with pytest.raises(AssertionError, match="both displacements are off"):
        abd.displacement_check(cfg.replace(abd_r=False, abd_i=False))
    labels_stay = lambda x1, x2, y1, y2, *a, **k: (*abd.abd_i(x1, x2, y1, y2, *a, **k)[:2], y1, y2,
                                                   abd.abd_i(x1, x2, y1, y2, *a, **k)[4])
    with pytest.raises(AssertionError, match="labels"):
        abd.displacement_check(cfg, abd_i_fn=labels_stay)


# ---------------------------------------------------------------- configs and data

def test_bad_config_names_the_fix():
    with pytest.raises(ValueError, match="'abd' or 'supervised'"):
        abd.build_model(pick(abd.CONFIG, "toy").replace(method="fixmatch"))
    with pytest.raises(ValueError, match="'toy' or 'acdc'"):
        abd.make_data(pick(abd.CONFIG, "toy").replace(data="mnist"))


def test_toy_split_labels_whole_hearts():
    cfg = pick(abd.CONFIG, "toy").replace(n_train=3, n_labeled=1, slices=4, n_volumes=1)
    data = abd.make_data(cfg)
    assert data["xl"].shape == (4, 1, cfg.size, cfg.size) and data["xu"].shape == (8, 1, cfg.size, cfg.size)
    assert (data["yl"] == 1).flatten(1).any(1).any() and (data["yl"] == 1).flatten(1).any(1).logical_not().any()
    with pytest.raises(ValueError, match="n_train - 1"):
        abd.make_data(cfg.replace(n_labeled=3))


def _h5(path, image, label):
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = image, label
        f["scribble"] = np.where(label > 0, label, 4).astype(np.uint8)


def wsl4mis_zip(folder):
    """A zip shaped like the WSL4MIS archive `seglab data get acdc` downloads: `WSL4MIS-<sha>/data/ACDC/` with
    slices `patientNNN_frameFF_slice_K.h5` (real frame numbers, 0-based slices) and volumes `patientNNN_frameFF.h5`
    for all 100 patients, no split lists."""
    rng = np.random.default_rng(0)
    src = folder / "src" / "WSL4MIS-fe9537e797c1b333e4e01f4239ffe1e5873abd95"
    (src / "data/ACDC/ACDC_training_slices").mkdir(parents=True)
    (src / "data/ACDC/ACDC_training_volumes").mkdir(parents=True)
    (src / "README.md").write_text("WSL4MIS\n")
    for p in range(1, 101):
        for frame in (1, 7 + p % 9):
            vol = rng.random((3, 16, 16), dtype=np.float32)
            lab = rng.integers(0, 4, (3, 16, 16)).astype(np.uint8)
            _h5(src / f"data/ACDC/ACDC_training_volumes/patient{p:03d}_frame{frame:02d}.h5", vol, lab)
            for k in range(3):
                _h5(src / f"data/ACDC/ACDC_training_slices/patient{p:03d}_frame{frame:02d}_slice_{k}.h5", vol[k], lab[k])
    (folder / "serve").mkdir()
    with zipfile.ZipFile(folder / "serve" / "WSL4MIS-fe9537e.zip", "w") as zf:
        for f in sorted(src.rglob("*")):
            zf.write(f, f.relative_to(src.parent))
    return folder / "serve"


def test_data_get_acdc_then_full_data_step_gives_the_official_split(tmp_path):
    serve = wsl4mis_zip(tmp_path)
    spec = dl.REGISTRY["acdc"]
    with dl.local_server(serve) as (url, _):
        fs = dataclasses.replace(spec.files[0], urls=(f"{url}/{spec.files[0].name}",))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")       # the trust-on-first-use pin warning
            top = dl.get("acdc", tmp_path / "data", registry={"acdc": dataclasses.replace(spec, files=(fs,))},
                         progress=False)
    cfg = pick(abd.CONFIG, "full").replace(root=top, size=16)       # the full profile's data step (10%: 7 patients)
    data = abd.make_data(cfg)
    assert data["labelled"] == OFFICIAL_10PCT
    train_patients = ACDCSlices(top).patients_in(ACDCSlices(top).ids)
    assert train_patients == list(dl.ACDC_SPLIT["train"]) and len(train_patients) == 70
    assert len(data["xl"]) == 7 * 6 and len(data["xu"]) == 63 * 6
    test_patients = {s.split("_")[0] for s in data["volumes"].ids}
    val_patients = {s.split("_")[0] for s in data["val"].ids}
    assert test_patients == set(dl.ACDC_SPLIT["test"]) and len(data["volumes"]) == 40
    assert val_patients == set(dl.ACDC_SPLIT["val"]) and len(data["val"]) == 20
    assert not (set(train_patients) & (test_patients | val_patients))
    assert pick(abd.CONFIG, "full").n_labeled == 7
    lists = sorted(p.relative_to(top).as_posix() for p in top.rglob("*.list"))
    for p in top.rglob("*.list"):  # a folder prepared before the split lists existed: get must prepare it again
        p.unlink()
    with dl.local_server(serve) as (url, _), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = dl.get("acdc", tmp_path / "data", registry={"acdc": dataclasses.replace(spec, files=(fs,))},
                       progress=False)
    assert sorted(p.relative_to(again).as_posix() for p in again.rglob("*.list")) == lists and len(lists) == 3


def test_acdc_without_split_lists_is_refused(tmp_path):
    (tmp_path / "ACDC_training_slices").mkdir()
    _h5(tmp_path / "ACDC_training_slices" / "patient001_frame01_slice_0.h5", np.zeros((8, 8), np.float32),
        np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetNotFoundError, match="acdc_split_lists"):
        ACDCSlices(tmp_path)
    (tmp_path / "ACDC_training_volumes").mkdir()
    with pytest.raises(dl.DownloadError, match="official split"):   # a partial copy cannot make the split
        dl.acdc_split_lists(tmp_path)


def test_real_acdc_sample_split_and_eval():
    root = abd.acdc_sample_root()
    if root is None:
        pytest.skip("real ACDC sample absent: set SEGLAB_SHARED_DATA to the folder holding acdc/")
    cfg = pick(abd.CONFIG, "full").replace(root=root, n_labeled=3, size=32, channels=(4, 8, 8, 8, 8))
    data = abd.make_data(cfg)
    assert len(data["xl"]) == 60 and len(data["xu"]) == 328 and len(data["volumes"]) == 6
    scores = abd.evaluate(abd.build_model(cfg), cfg, [data["volumes"][0]])
    assert {"dice_RV", "dice_Myo", "dice_LV", "hd95_RV", "hd95_Myo", "hd95_LV", "dice", "hd95"} <= set(scores)


# ---------------------------------------------------------------- training: checkpoint selection, resume, hooks

def test_best_val_checkpoint_is_returned():
    cfg = tiny(iters=3, val_every=1, n_volumes=1)
    data = abd.make_data(cfg)
    assert "val" in data and not torch.equal(data["val"][0]["image"], data["volumes"][0]["image"])
    run = abd.train(cfg, data)
    vals = [r["val_dice"] for r in run["history"].records if "val_dice" in r]
    assert len(vals) == 3 and len(set(vals)) > 1
    got = abd.evaluate(run["model"], cfg, data["val"])["dice"]
    assert got == pytest.approx(max(vals), abs=1e-9)
    assert "val" not in abd.make_data(tiny())          # toy profile: last weights, no val volumes built


def test_resume_equals_uninterrupted(tmp_path):
    cfg = tiny(iters=4, ckpt_every=2)
    data = abd.make_data(cfg)
    assert_resumes_exactly(lambda **kw: abd.train(cfg, data, **kw), tmp_path / "abd.pt")   # weights and buffers


def test_abd_r_can_be_replaced_without_monkeypatching():
    calls = []
    def spy(*args, **kw):
        calls.append(1)
        return abd.abd_r(*args, **kw)
    abd.train(tiny(iters=2), abd_r_fn=spy)
    assert len(calls) == 2


# ---------------------------------------------------------------- the full config, one step, real sample

@pytest.mark.skipif(not SLOW, reason="slow (one 224-px iteration of two full UNets plus val scoring: minutes on a CPU): run with SEGLAB_FLAGS=slow")
def test_full_config_one_step_on_real_acdc_sample():
    root = abd.acdc_sample_root()
    if root is None:
        pytest.skip("real ACDC sample absent: set SEGLAB_SHARED_DATA to the folder holding acdc/")
    cfg = pick(abd.CONFIG, "full").replace(root=root, iters=1)       # nothing else changed (no pretrained weights here)
    data = abd.make_data(cfg)
    assert data["xl"].shape[1:] == (1, 224, 224) and len(data["labelled"]) == 7
    run = abd.train(cfg, data)
    assert sum(p.numel() for p in run["model"].nets[0].parameters()) == 1_813_764 and len(run["model"].nets) == 2
    rec = run["history"].records
    assert {"sup", "cps", "cps2", "abd_i"} <= set(rec[0]) and np.isfinite(rec[0]["loss"]) and "val_dice" in rec[-1]
    scores = abd.evaluate(run["model"], cfg, [data["volumes"][0]])
    assert 0 <= scores["dice"] <= 1


def test_tour_forwards_ckpt(tmp_path, monkeypatch):
    small = dict(abd.CONFIG["toy"], n_train=3, slices=4, n_volumes=1, channels=(4, 8, 8, 8, 8), batch_l=2, batch_u=2,
                 iters=2, log_every=1)
    monkeypatch.setitem(abd.CONFIG, "toy", small)
    out = abd.tour("toy", ckpt=tmp_path / "abd-toy.pt")
    assert (tmp_path / "abd-toy.pt").is_file() and (tmp_path / "abd-toy-labelled-only.pt").is_file()
    assert {"metric", "value", "chance", "labelled_only", "baseline_name", "baseline"} <= set(out)
    assert out["baseline"] == out["labelled_only"] and "labelled-only" in out["baseline_name"]


# ---------------------------------------------------------------- benchmark case (issue #17)

@pytest.mark.parametrize("profile,size", [("toy", None), ("full", 64)])
def test_bench_case_runs_one_full_abd_step(profile, size):
    "`bench_case` trains both UNets in one step at the profile's batch sizes (full profile at 64 px to stay fast)."
    cfg = pick(abd.CONFIG, profile).replace(device="cpu")
    cfg = cfg.replace(size=size) if size else cfg
    case = abd.bench_case(cfg)
    assert case["batch"] == cfg.batch_l + cfg.batch_u and not hasattr(abd, "BENCH_HAS_CACHE")
    case["run"]()


def test_bench_case_steps_both_nets_with_displacements(monkeypatch):
    "The timed step updates both UNets and runs ABD-R and ABD-I (each displacement is called once per step)."
    calls = dict(r=0, i=0)
    real_r, real_i = abd.abd_r, abd.abd_i
    monkeypatch.setattr(abd, "abd_r", lambda *a, **k: calls.__setitem__("r", calls["r"] + 1) or real_r(*a, **k))
    monkeypatch.setattr(abd, "abd_i", lambda *a, **k: calls.__setitem__("i", calls["i"] + 1) or real_i(*a, **k))
    built = {}
    real_build = abd.build_model
    monkeypatch.setattr(abd, "build_model", lambda cfg: built.setdefault("m", real_build(cfg)))
    case = abd.bench_case(tiny(device="cpu"))
    before = [[p.detach().clone() for p in net.parameters()] for net in built["m"].nets]
    case["run"]()
    assert len(built["m"].nets) == 2 and calls == dict(r=1, i=1)
    for net, old in zip(built["m"].nets, before):
        assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), old))


def test_toy_profile_trains_in_fp32():
    "bf16 autocast made the toy step ~7x slower on the CI CPU (AVX2, no bf16 units): the toy config must not enable it."
    assert pick(abd.CONFIG, "toy").get("amp") in (None, False)


def test_tour_baseline_is_the_converged_labelled_only_run(tmp_path, monkeypatch):
    "`tour`'s baseline is the notebook's: labelled-only with 3x `batch_l` labelled slices per step, same iterations."
    small = dict(abd.CONFIG["toy"], n_train=3, slices=4, n_volumes=1, channels=(4, 8, 8, 8, 8), batch_l=2, batch_u=2,
                 iters=2, log_every=1)
    monkeypatch.setitem(abd.CONFIG, "toy", small)
    seen, real_train = [], abd.train

    def spy(cfg, *a, **kw):
        seen.append(cfg)
        return real_train(cfg, *a, **kw)
    monkeypatch.setattr(abd, "train", spy)
    out = abd.tour("toy")
    sup = [c for c in seen if c.method == "supervised"]
    assert len(sup) == 1 and sup[0].batch_l == 3 * small["batch_l"] and sup[0].iters == small["iters"]
    assert sup[0] == abd.labelled_only_config(seen[0]) and "3x labelled slices" in out["baseline_name"]
