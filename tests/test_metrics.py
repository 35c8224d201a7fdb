"""Reference comparisons for `seglab.metrics` that are too heavy (or need optional packages) for the notebook.

- saliency measures against pysodmetrics (`pip install pysodmetrics`; skipped when absent);
- HD95 against medpy (`pip install medpy`; skipped when absent) and a brute-force surface-distance reference;
- QVHighlights metrics against the reference numbers shipped with moment_detr's sample predictions
  (skipped when the shared data are absent);
- confusion matrix, Hungarian matching and the DAVIS boundary F against brute-force / OpenCV references.
"""
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from seglab import metrics as M

SHARED = Path(os.environ.get("SEGLAB_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
QV = SHARED / "qvhighlights"


def _blob_pair(rng, h=48, w=64):
    "A smooth random saliency map (uint8) and a blob mask (uint8 0/255) away from the image border."
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = rng.uniform(14, h - 14), rng.uniform(14, w - 14), rng.uniform(5, 11)
    gt = ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2) * 255
    pred = ndimage.gaussian_filter(gt / 255.0, rng.uniform(1, 4)) + rng.uniform(0.1, 0.6) * rng.random((h, w))
    pred = np.clip(pred / pred.max() * 255, 0, 255).astype(np.uint8)
    return pred, gt.astype(np.uint8)


def test_saliency_matches_pysodmetrics():
    sod = pytest.importorskip("py_sod_metrics", reason="pysodmetrics not installed (pip install pysodmetrics)")
    import warnings
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pysodmetrics warns that Fmeasure is deprecated
        fm, em, sm, ma = sod.Fmeasure(), sod.Emeasure(), sod.Smeasure(), sod.MAE()
    ours = M.SaliencyMeter()
    pairs = [_blob_pair(rng) for _ in range(12)]
    pairs += [(rng.integers(0, 256, (40, 40), dtype=np.uint8), np.zeros((40, 40), np.uint8)),      # empty mask
              (rng.integers(0, 256, (40, 40), dtype=np.uint8), np.full((40, 40), 255, np.uint8))]  # full mask
    for pred, gt in pairs:
        for m in (fm, em, sm, ma):
            m.step(pred=pred, gt=gt)
        ours.update(pred / 255, gt > 128)
        # per image, to localise a mismatch
        p, g = M.prepare_saliency(pred / 255, gt > 128)
        assert math.isclose(M.s_measure(p, g), sm.sms[-1], rel_tol=1e-10, abs_tol=1e-12)
        assert np.allclose(M.e_curve(p, g)[::-1], em.changeable_ems[-1], rtol=1e-10, atol=1e-12)
    r = ours.compute()
    f_ref, e_ref = fm.get_results(), em.get_results()["em"]
    assert math.isclose(r["mae"], ma.get_results()["mae"], rel_tol=1e-10)
    assert math.isclose(r["sm"], sm.get_results()["sm"], rel_tol=1e-10)
    assert math.isclose(r["em_adp"], e_ref["adp"], rel_tol=1e-10)
    assert math.isclose(r["em_max"], e_ref["curve"].max(), rel_tol=1e-10)
    assert math.isclose(r["em_mean"], e_ref["curve"].mean(), rel_tol=1e-10)
    assert math.isclose(r["fm_adp"], f_ref["fm"]["adp"], rel_tol=1e-10)
    assert np.allclose(r["fm_curve"][::-1], f_ref["fm"]["curve"], rtol=1e-10, atol=1e-12)
    assert math.isclose(r["fm_max"], f_ref["fm"]["curve"].max(), rel_tol=1e-10)      # DCFM protocol
    assert math.isclose(r["fm_mean"], f_ref["fm"]["curve"].mean(), rel_tol=1e-10)
    assert np.allclose(r["precision"][::-1], f_ref["pr"]["p"]) and np.allclose(r["recall"][::-1], f_ref["pr"]["r"])
    p, rc = f_ref["pr"]["p"], f_ref["pr"]["r"]                                          # SCWSSOD protocol
    f_pr = np.where(p * rc > 0, 1.3 * p * rc / np.maximum(0.3 * p + rc, 1e-300), 0)
    assert math.isclose(r["fm_max_pr"], f_pr.max(), rel_tol=1e-10)
    assert r["fm_max_pr"] != pytest.approx(r["fm_max"], abs=1e-4)   # the protocols really differ here


def _brute_hd95(a, b, spacing):
    "HD95 from all pairwise distances between surface voxels (medpy's definition, no distance transform)."
    def surf(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(m.ndim, 1)))
    sa, sb = surf(a) * spacing, surf(b) * spacing
    d = np.sqrt(((sa[:, None] - sb[None]) ** 2).sum(-1))
    return np.percentile(np.hstack([d.min(1), d.min(0)]), 95)


def _random_volume(rng, shape=(8, 24, 24)):
    zz, yy, xx = np.indices(shape)
    c, r = rng.uniform([2, 6, 6], [6, 18, 18]), rng.uniform(3, 7)
    blob = ((zz - c[0]) * 2) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < r ** 2
    return blob ^ (rng.random(shape) < 0.03)


def test_hd95_brute_force_and_medpy():
    rng = np.random.default_rng(1)
    spacing = np.array([10.0, 1.5, 1.25])
    medpy = None
    try:
        from medpy.metric import binary as medpy
    except ImportError:
        pass
    for _ in range(5):
        a, b = _random_volume(rng), _random_volume(rng)
        ours = M.hd95(a, b, spacing)
        assert math.isclose(ours, _brute_hd95(a, b, spacing), rel_tol=1e-9)
        d, h = M.dice_hd95(a, b, spacing)
        assert h == ours and math.isclose(d, 2 * (a & b).sum() / (a.sum() + b.sum()))
        if medpy is not None:
            assert math.isclose(ours, medpy.hd95(a, b, voxelspacing=spacing), rel_tol=1e-9)
            assert math.isclose(d, medpy.dc(a, b), rel_tol=1e-12)


def _load_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.skipif(not (QV / "standalone_eval" / "sample_val_preds.jsonl").exists(),
                    reason=f"shared QVHighlights sample not found under {QV} (set SEGLAB_SHARED_DATA)")
def test_qvhighlights_reproduces_reference():
    ours = M.qvhighlights_eval(_load_jsonl(QV / "standalone_eval" / "sample_val_preds.jsonl"),
                               _load_jsonl(QV / "highlight_val_release.jsonl"))
    ref = json.loads((QV / "standalone_eval" / "sample_val_preds_metrics_raw.json").read_text())
    checked = 0
    def close(a, b, key):
        nonlocal checked
        assert abs(a - b) <= 0.005 + 1e-9, f"{key}: ours {a:.4f} vs reference {b}"
        checked += 1
    for k, v in ref["brief"].items():
        close(ours["brief"][k], v, k)
    for group in ("full", "short", "middle", "long"):
        for kind in ("MR-mAP", "MR-R1"):
            for k, v in ref[group][kind].items():
                close(ours[group][kind][k], v, f"{group}/{kind}/{k}")
    for level in ("Fair", "Good", "VeryGood"):
        for k, v in ref[f"HL-min-{level}"].items():
            close(ours[f"HL-min-{level}"][k], v, f"HL-min-{level}/{k}")
    assert checked == 14 + 4 * 21 + 6


def test_confusion_matrix_against_numpy():
    rng = np.random.default_rng(2)
    t = rng.integers(0, 5, (3, 17, 19)); t[rng.random(t.shape) < 0.1] = 255
    p = rng.integers(0, 5, t.shape)
    ref = np.zeros((5, 5), int)
    for ti, pi in zip(t.ravel(), p.ravel()):
        if ti != 255:
            ref[ti, pi] += 1
    cm = M.ConfusionMatrix(5)
    for i in range(3):
        cm.update(torch.from_numpy(p[i]), torch.from_numpy(t[i]))
    assert (cm.mat.numpy() == ref).all()
    s = cm.compute()
    iou = np.diag(ref) / (ref.sum(0) + ref.sum(1) - np.diag(ref))
    assert np.allclose(s["iou"], iou) and math.isclose(s["miou"], iou.mean())


def test_hungarian_equals_best_permutation():
    rng = np.random.default_rng(3)
    for n_classes, n_clusters in ((4, 4), (3, 5), (4, 3)):
        cm = rng.integers(0, 50, (n_classes, n_clusters))
        best = max(sum(cm[c, k] for c, k in enumerate(perm) if k is not None)
                   for perm in itertools.permutations(list(range(n_clusters)) + [None] * max(0, n_classes - n_clusters), n_classes))
        assert math.isclose(M.hungarian_scores(cm)["acc"], best / cm.sum())


def test_boundary_f_matches_opencv_dilation():
    cv2 = pytest.importorskip("cv2", reason="OpenCV not installed (the DAVIS toolkit dilates with cv2)")
    rng = np.random.default_rng(4)
    for _ in range(5):
        g = ndimage.gaussian_filter(rng.random((60, 80)), 4) > 0.5
        p = ndimage.gaussian_filter(rng.random((60, 80)), 4) > 0.5
        r = math.ceil(0.008 * math.hypot(60, 80))
        k = M.disk(r).astype(np.uint8)
        bg, bp = M.seg2bmap(g), M.seg2bmap(p)
        prec = (bp & cv2.dilate(bg.astype(np.uint8), k).astype(bool)).sum() / bp.sum()
        rec = (bg & cv2.dilate(bp.astype(np.uint8), k).astype(bool)).sum() / bg.sum()
        assert math.isclose(M.boundary_f(g, p), 2 * prec * rec / (prec + rec))
