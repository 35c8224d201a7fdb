"""Fast checks of the ABD chapter module (seglab.methods.abd): displacement invariants, the real ACDC loader path."""
import pytest
import torch

from seglab.config import pick
from seglab.methods import abd


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


def test_real_acdc_sample_split_and_eval():
    root = abd.acdc_sample_root()
    if root is None:
        pytest.skip("real ACDC sample absent: set SEGLAB_SHARED_DATA to the folder holding acdc/")
    cfg = pick(abd.CONFIG, "full").replace(root=root, n_labeled=3, size=32, channels=(4, 8, 8, 8, 8))
    data = abd.make_data(cfg)
    assert len(data["xl"]) == 60 and len(data["xu"]) == 328 and len(data["volumes"]) == 6
    scores = abd.evaluate(abd.build_model(cfg), cfg, [data["volumes"][0]])
    assert {"dice_RV", "dice_Myo", "dice_LV", "hd95_RV", "hd95_Myo", "hd95_LV", "dice", "hd95"} <= set(scores)
