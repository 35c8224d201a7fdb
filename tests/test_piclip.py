"""PI-CLIP chapter (`seglab.methods.piclip`): resume, the tour contract, the bench case, the leakage guarantee and the
full CONFIG for one step at full size on real samples (real CLIP and ResNet-50 code paths, random weights)."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seglab.config import pick
from seglab.data.datasets import VOC_CLASSES, YOLOSegmentation, resize_image, resize_mask
from seglab.methods import piclip

from interrupt import Stop, StopAt

DATA = Path(os.environ.get("SEGLAB_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
VOC, COCO128 = DATA / "voc_samples", DATA / "coco128_seg"


def small(**changes):
    return pick(piclip.CONFIG, "toy").replace(steps=6, ckpt_every=2, n_train=6, n_test=4, batch=4, **changes)


def test_resume_equals_uninterrupted(tmp_path):
    cfg = small()
    gen = piclip.build_priors(cfg)
    bank = piclip.prior_bank(gen, piclip.make_episodes(cfg, True, cfg.n_train), cache=False)
    ref, _ = piclip.train(cfg, bank, priors=gen)
    ckpt = tmp_path / "piclip.pt"
    with pytest.raises(Stop):
        piclip.train(cfg, bank, callbacks=[StopAt(3)], ckpt=ckpt, priors=gen)
    assert ckpt.exists()                                              # saved at step 2
    resumed, hist = piclip.train(cfg, bank, ckpt=ckpt, priors=gen)
    assert hist.records[-1]["step"] == 6
    ra, rb = ref.meta.state_dict(), resumed.meta.state_dict()
    assert all(torch.equal(ra[k], rb[k]) for k in ra)
    assert not any(k.startswith(("clip", "cnn")) for k in torch.load(ckpt, weights_only=True)["model"])  # frozen part not saved


def test_tour_returns_the_contract_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setitem(piclip.CONFIG, "toy", dict(piclip.CONFIG["toy"], steps=2, n_train=4, n_test=3, batch=4))
    ckpt = tmp_path / "piclip-toy.pt"
    first = piclip.tour("toy", ckpt=ckpt)
    assert {"metric", "value", "chance", "baseline_name", "baseline"} <= set(first)
    assert isinstance(first["baseline_name"], str) and 0 <= first["baseline"] <= 1 and 0 <= first["value"] <= 1
    assert ckpt.exists() and (tmp_path / "piclip-toy-hdmnet.pt").exists() and (tmp_path / "piclip-toy-masked.pt").exists()
    second = piclip.tour("toy", ckpt=ckpt)                           # every run finished: resumed as it is
    assert (second["value"], second["baseline"]) == (first["value"], first["baseline"])


@pytest.mark.parametrize("cached", [True, False])
def test_bench_case_takes_a_step(cached):
    assert piclip.BENCH_HAS_CACHE
    case = piclip.bench_case(pick(piclip.CONFIG, "toy").replace(batch=2), cached=cached)
    case["run"]()
    assert case["batch"] == 2


def test_priors_never_read_the_query_labels():
    cfg = small()
    gen = piclip.build_priors(cfg)
    eps = piclip.make_episodes(cfg, False, 3)
    a = piclip.prior_bank(gen, eps, cache=False)
    b = piclip.prior_bank(gen, [dict(e, query_mask=torch.full_like(e["query_mask"], 255)) for e in eps], cache=False)
    assert all(torch.equal(a[k], b[k]) for k in piclip.PRIOR_KEYS)
    assert not torch.equal(a["query_mask"], b["query_mask"])


def _voc_episode(stem_q: str, stem_s: str, size: int) -> dict | None:
    "A 1-shot episode of the first foreground class the two VOC samples share, resized to `size`."
    load = lambda s: (torch.from_numpy(np.asarray(Image.open(VOC / "JPEGImages" / f"{s}.jpg").convert("RGB"))).permute(2, 0, 1).float() / 255,
                      torch.from_numpy(np.asarray(Image.open(VOC / "SegmentationClass" / f"{s}.png"))).long())
    (qi, qm), (si, sm) = load(stem_q), load(stem_s)
    shared = sorted((set(qm.unique().tolist()) & set(sm.unique().tolist())) - {0, 255})
    if not shared:
        return None
    c = shared[0]
    binary = lambda m: torch.where(m == 255, m, (m == c).long())
    return dict(query_image=resize_image(qi, (size, size)), query_mask=resize_mask(binary(qm), (size, size)),
                support_images=resize_image(si, (size, size))[None], support_masks=resize_mask(binary(sm), (size, size))[None],
                class_id=c)


def _coco_episodes(size: int) -> list[dict]:
    "1-shot episodes from COCO128 images whose classes have a PASCAL name (the prompts are PASCAL's)."
    data = YOLOSegmentation(COCO128)
    voc_id = {n: i for i, n in enumerate(VOC_CLASSES)}
    by_class = {}
    for i in range(min(len(data), 40)):
        x = data[i]
        for c in x["mask"].unique().tolist():
            name = data.class_names[c] if 0 < c < len(data.class_names) else None
            if name in voc_id:
                by_class.setdefault(c, []).append(i)
    out = []
    for c, idx in sorted(by_class.items()):
        if len(idx) >= 2:
            q, s = data[idx[0]], data[idx[1]]
            m = lambda x: torch.where(x["mask"] == 255, x["mask"], (x["mask"] == c).long())
            out.append(dict(query_image=resize_image(q["image"], (size, size)), query_mask=resize_mask(m(q), (size, size)),
                            support_images=resize_image(s["image"], (size, size))[None],
                            support_masks=resize_mask(m(s), (size, size))[None], class_id=voc_id[data.class_names[c]]))
        if len(out) == 2:
            break
    return out


@pytest.mark.skipif("slow" not in os.environ.get("SEGLAB_FLAGS", "").split(),
                    reason="slow (CLIP ViT-B/16 + ResNet-50 at 256 px on CPU: 143 s and 2.4 GB on the shared CPU): SEGLAB_FLAGS=slow")
def test_full_config_one_step_on_real_samples():
    if not (VOC.is_dir() and COCO128.is_dir()):
        pytest.skip(f"real samples not found under {DATA} (set SEGLAB_SHARED_DATA to the folder with voc_samples and coco128_seg)")
    full = pick(piclip.CONFIG, "full")
    cfg = full.replace(data_root=str(DATA), steps=1, pretrained=False)
    assert {k: v for k, v in cfg.items() if k not in ("data_root", "steps", "pretrained")} == \
        {k: v for k, v in full.items() if k not in ("data_root", "steps", "pretrained")}
    stems = sorted(p.stem for p in (VOC / "JPEGImages").glob("*.jpg"))
    eps = [e for a, b in zip(stems, stems[1:]) if (e := _voc_episode(a, b, cfg.size)) is not None][:2] + _coco_episodes(cfg.size)
    assert len(eps) >= 2
    model, hist = piclip.train(cfg, eps)                               # priors by real CLIP ViT-B/16 (random weights)
    assert len(hist.records) == 1 and np.isfinite(hist.records[0]["loss"])
    assert model.priors.input_size == 256 and len(model.meta.stages) == 2 and model.priors.attn_layers == tuple(range(4, 12))
    bank = piclip.prior_bank(model.priors, eps, cache=False)
    assert bank["vtp"].shape[-2:] == (16, 16) and bank["vvp"].shape[2:] == (2, 16, 16) and bank["mid_q"].shape[-2:] == (32, 32)
    assert 0 <= float(bank["vtp"].min()) and float(bank["vtp"].max()) <= 1 and float(bank["vvp"].min()) >= 0
    pred = piclip.predict(model, bank, bank["support_masks"], (cfg.size, cfg.size))
    assert pred.shape == (len(eps), cfg.size, cfg.size)


def test_kshot_rw_trained_at_k_gt_1_absent_at_k1():
    """The K-shot re-weighting (`kshot_rw`) is built for K > 1, is in the optimiser (the official `get_optim` leaves
    it out) and gets a non-zero gradient from a K-shot training step; a 1-shot model has none (uniform weights)."""
    cfg = small(shots=2)
    gen = piclip.build_priors(cfg)
    bank = piclip.prior_bank(gen, piclip.make_episodes(cfg, True, 2), cache=False)
    assert bank["mid_s"].shape[1] == 2
    model = piclip.build_model(cfg, gen)
    assert model.meta.kshot_rw is not None
    opt_params = {id(p) for g in piclip._optimizer(model, cfg).param_groups for p in g["params"]}
    assert all(id(p) in opt_params for p in model.meta.kshot_rw.parameters())
    model.meta.train()
    piclip.train_step(model, bank, cfg.dis_weight)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.meta.kshot_rw.parameters())
    w = model.meta.shot_weights(bank["mid_q"], bank["mid_s"])
    assert torch.allclose(w.sum(1), torch.ones(2)) and not torch.allclose(w, torch.full_like(w, 0.5))
    one = piclip.build_model(small(), gen)
    assert one.meta.kshot_rw is None
    with pytest.raises(ValueError, match="shots=3"):
        model.meta.shot_weights(bank["mid_q"], torch.cat([bank["mid_s"], bank["mid_s"][:, :1]], 1))
