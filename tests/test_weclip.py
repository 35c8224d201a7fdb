"""Fast checks of WeCLIP's pieces that need no pretrained CLIP: losses, affinity labels, RFM, PAR, CLI wiring."""
import torch

from seglab.cam import par, sinkhorn_transition
from seglab.cli import get_chapter
from seglab.methods.weclip import aff_loss, affinity_label, rfm_select, seg_loss


def test_affinity_label_radius_ignore_symmetry():
    y = torch.zeros(1, 16, 16, dtype=torch.long)
    y[:, :, 8:] = 1
    y[:, :4, :4] = 255
    r = affinity_label(y, (4, 4), radius=1)
    assert torch.equal(r, r.transpose(1, 2))
    assert r[0, 0].eq(255).all()                     # an ignored cell is ignored in every pair
    assert r[0, 5, 15] == 255                        # (1,1) and (3,3) are 2 cells apart > radius 1
    assert r[0, 5, 6] == 0 and r[0, 5, 7] == 255 and r[0, 6, 7] == 1   # cols 0-1 are class 0, cols 2-3 class 1


def test_losses_bounds_and_targets():
    r = torch.randint(0, 2, (2, 9, 9))
    r = torch.maximum(r, r.transpose(1, 2))
    assert 0 <= aff_loss(torch.rand(2, 9, 9), r) <= 1
    assert aff_loss((r == 1).float(), r) < 1e-6
    y = torch.zeros(1, 8, 8, dtype=torch.long)
    s = torch.zeros(1, 3, 8, 8)
    s[:, 0] = 10
    assert seg_loss(s, y) < 1e-3                      # only background pixels: one half of the loss


def test_rfm_keeps_a_layer_and_the_matching_one():
    attn = torch.rand(4, 2, 17, 17).softmax(-1)
    a_bar, kept = rfm_select(attn[2, :, 1:, 1:], attn, (1, 2, 3))
    assert kept.any(0).all() and kept[1].all() and a_bar.shape == (2, 16, 16)


def test_par_constant_and_transition_symmetric():
    img = torch.rand(1, 3, 16, 16)
    out = par(img, torch.ones(1, 2, 4, 4), dilations=(1, 2), iters=3)
    assert torch.allclose(out, torch.full_like(out, 1.01 ** 3), atol=1e-5)
    t = sinkhorn_transition(torch.rand(2, 5, 5))
    assert torch.allclose(t, t.transpose(1, 2), atol=1e-6)


def test_chapter_is_ready_for_the_cli():
    assert get_chapter("weclip").status == "ready"
