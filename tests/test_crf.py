"""seglab.crf: mean-field DenseCRF invariants (exact and window paths)."""
import pytest
import torch

from seglab.crf import CRF_PARAMS, dense_crf


def two_regions(H=20, W=20, flip_share=0.3, seed=0):
    "A two-colour image, its truth, and a unary that says the truth at 0.7 except on `flip_share` of the pixels."
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(1, 3, H, W); img[:, :, :, W // 2:] = 1.0; img[:, 0] = 0.3
    truth = torch.zeros(H, W, dtype=torch.long); truth[:, W // 2:] = 1
    prob = torch.full((1, 2, H, W), 0.3); prob[0, 1][truth == 1] = 0.7; prob[0, 0] = 1 - prob[0, 1]
    flip = torch.rand(H, W, generator=g) < flip_share
    prob[0, :, flip] = prob[0].flip(0)[:, flip]
    return img, truth, prob


@pytest.mark.parametrize("params", list(CRF_PARAMS))
@pytest.mark.parametrize("normalize", ["symmetric", "none"])
def test_energy_decreases_and_noise_is_cleaned(params, normalize):
    img, truth, prob = two_regions()
    e = []
    Q = dense_crf(prob, img, params, normalize, energies=e)
    e = torch.stack(e)[:, 0]
    assert len(e) == CRF_PARAMS[params]["iters"] + 1
    assert (e[1:] <= e[:-1] + 1e-3 * e.abs().max()).all() and e[-1] < e[0]
    assert (prob.argmax(1)[0] == truth).float().mean() < 0.8
    assert (Q.argmax(1)[0] == truth).all()


@pytest.mark.parametrize("method", ["exact", "window"])
def test_output_is_a_distribution(method):
    g = torch.Generator().manual_seed(1)
    prob = torch.rand(2, 5, 16, 12, generator=g).softmax(1)
    img = torch.rand(2, 3, 16, 12, generator=g)
    Q = dense_crf(prob, img, "stego", method=method, radius=2, blur=2)
    assert Q.shape == prob.shape and (Q >= 0).all() and torch.allclose(Q.sum(1), torch.ones(2, 16, 12), atol=1e-5)


def test_window_covering_the_image_equals_exact():
    g = torch.Generator().manual_seed(2)
    prob = torch.rand(2, 4, 12, 10, generator=g).softmax(1)
    img = torch.rand(2, 3, 12, 10, generator=g)
    for params in ("a2gnn", "stego"):
        Qe = dense_crf(prob, img, params, method="exact")
        Qw = dense_crf(prob, img, params, method="window", radius=12, blur=1)
        assert (Qe - Qw).abs().max() < 1e-4


def test_small_window_approximates_exact():
    img, truth, prob = two_regions(24, 24)
    Qe = dense_crf(prob, img, "a2gnn", method="exact")
    Qw = dense_crf(prob, img, "a2gnn", method="window", radius=5, blur=2)
    assert (Qe.argmax(1) == Qw.argmax(1)).float().mean() > 0.95


def test_batch_is_per_image():
    "Each image of a batch gets its own kernels: a batch equals the images run one by one."
    g = torch.Generator().manual_seed(3)
    prob = torch.rand(3, 3, 10, 10, generator=g).softmax(1)
    img = torch.rand(3, 3, 10, 10, generator=g)
    for method in ("exact", "window"):
        Q = dense_crf(prob, img, "a2gnn", method=method, blur=1)
        Q1 = torch.cat([dense_crf(prob[i:i + 1], img[i:i + 1], "a2gnn", method=method, blur=1) for i in range(3)])
        assert torch.allclose(Q, Q1, atol=1e-6)


def test_auto_switches_at_max_exact():
    g = torch.Generator().manual_seed(4)
    prob = torch.rand(1, 3, 8, 8, generator=g).softmax(1)
    img = torch.rand(1, 3, 8, 8, generator=g)
    exact = dense_crf(prob, img, method="exact")
    assert torch.equal(dense_crf(prob, img, method="auto", max_exact=64), exact)
    assert not torch.equal(dense_crf(prob, img, method="auto", max_exact=63, radius=1, blur=1), exact)


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="resize prob"):
        dense_crf(torch.rand(1, 2, 8, 8), torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="symmetric"):
        dense_crf(torch.rand(1, 2, 8, 8), torch.rand(1, 3, 8, 8), normalize="l1")
    with pytest.raises(ValueError, match="exact"):
        dense_crf(torch.rand(1, 2, 8, 8), torch.rand(1, 3, 8, 8), method="fast")
