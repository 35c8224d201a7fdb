"""TDM chapter (`seglab.methods.tdm`): resume, tour, bench case, the full CONFIG for one step on a CUB layout built
from the CUB sample, and the episode plumbing on real images."""
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from seglab.config import pick
from seglab.data.datasets import CUB200
from seglab.methods import tdm

from _helpers import assert_tour_contract
from interrupt import assert_resumes_exactly

DATA = Path(os.environ.get("SEGLAB_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
CUB = DATA / "cub_subset"
SLOW = "slow" in os.environ.get("SEGLAB_FLAGS", "").split()
needs_cub = pytest.mark.skipif(not CUB.is_dir(), reason=f"CUB samples not found at {CUB} (set SEGLAB_SHARED_DATA)")


def cub_layout(root: Path, classes: int = 200, per_class: int = 17) -> Path:
    """A CUB-200-2011 layout (official file names, 0-based ids, `, ` separators as the sample) of `classes` classes:
    class k links `per_class` images of sample class k % 20 (a different slice per copy), with bounding boxes 8 px
    inside each image. Returns the folder holding `CUB_200_2011/`."""
    src = CUB200(CUB, "all")
    by_class = {}
    for i, t in zip(src.ids, src.targets):
        by_class.setdefault(t, []).append(i)
    top = root / "CUB_200_2011"
    (top / "images").mkdir(parents=True)
    lines = {k: [] for k in ("images", "image_class_labels", "train_test_split", "bounding_boxes", "classes")}
    n = 0
    for c in range(classes):
        d = top / "images" / f"class_{c:03d}"
        d.mkdir()
        lines["classes"].append(f"{c}, class_{c:03d}")
        pool = by_class[c % len(by_class)]
        for j in range(per_class):
            iid = pool[(j + c // len(by_class)) % len(pool)]
            f = src.root / "images" / src.paths[iid]
            (d / f"{j:04d}.jpg").symlink_to(f)
            w, h = Image.open(f).size
            lines["images"].append(f"{n}, class_{c:03d}/{j:04d}.jpg")
            lines["image_class_labels"].append(f"{n}, {c}")
            lines["train_test_split"].append(f"{n}, {int(j % 2 == 0)}")
            lines["bounding_boxes"].append(f"{n}, 8.0, 8.0, {w - 16.0}, {h - 16.0}")
            n += 1
    for k, v in lines.items():
        (top / f"{k}.txt").write_text("\n".join(v) + "\n")
    return root


def full_config_one_step(module, tmp_path):
    """`module`'s (TDM's or TDM-IAM's) full CONFIG unchanged but for the data root (a `cub_layout`), one step and
    `pretrained=False`: a 20-way 1-shot, 15-query episode of 84-px crops, one training step with a finite loss, two
    test episodes evaluated. Returns `(cfg, the first training episode, the trained model)`."""
    root = cub_layout(tmp_path)
    cfg = pick(module.CONFIG, "full").replace(data_root=str(root), steps=1, pretrained=False)   # nothing else changed
    assert cfg.crop and cfg.size == 84 and cfg.way == 20 and cfg.queries == 15
    train_eps = module.make_episodes(cfg, True)
    e = train_eps[0]
    assert e["support_images"].shape == (20, 3, 84, 84) and e["query_images"].shape == (300, 3, 84, 84)
    model, hist = module.train(cfg, train_eps)
    assert torch.isfinite(torch.tensor(hist.last("loss")))
    r = module.evaluate(model, cfg, module.make_episodes(cfg, False, n=2))
    assert r["n"] == 2 and 0 <= r["acc"] <= 1
    return cfg, e, model


def test_resume_equals_uninterrupted(tmp_path):
    cfg = pick(tdm.CONFIG, "toy").replace(steps=6, ckpt_every=2)
    *_, hist = assert_resumes_exactly(lambda **kw: tdm.train(cfg, **kw), tmp_path / "tdm.pt")   # BN stats included
    assert len(hist) > 0


def assert_tour_checkpoints(module, tmp_path, monkeypatch, companions, ckpt_every: int, **toy) -> dict:
    """`module.tour("toy", ckpt=...)` (TDM's or TDM-IAM's) with `toy` overriding the toy CONFIG and a checkpoint every
    `ckpt_every` steps: the tour contract (5-way chance); the method's checkpoint and each companion's
    (`<stem>-<companion>.pt`) written; a second tour (all finished) resumed as it is (same value and baseline); a
    fresh start (method checkpoint gone, companions' stale) drops the stale files and repeats the first tour.
    Returns the first tour's result."""
    name = module.__name__.rsplit(".", 1)[-1]
    monkeypatch.setitem(module.CONFIG, "toy", dict(module.CONFIG["toy"], **toy))
    monkeypatch.setitem(module.CONFIG, "common", dict(module.CONFIG["common"], ckpt_every=ckpt_every))
    ckpt = tmp_path / f"{name}-toy.pt"
    r = module.tour("toy", ckpt=ckpt)
    assert_tour_contract(r, chance=0.2)
    others = [tmp_path / f"{name}-toy-{c}.pt" for c in companions]
    assert ckpt.exists() and all(p.exists() for p in others)
    again = module.tour("toy", ckpt=ckpt)                              # all finished: resumed as they are
    assert again["value"] == r["value"] and again["baseline"] == r["baseline"]
    ckpt.unlink()
    for p in others:
        p.write_bytes(b"stale")                                         # an older run's: must not be resumed
    fresh = module.tour("toy", ckpt=ckpt)
    assert fresh["value"] == r["value"] and fresh["baseline"] == r["baseline"]
    return r


def assert_bench_case_runs_one_step(module, profile: str, **sizes):
    "`module.bench_case` (TDM's or TDM-IAM's) at `profile` on a 3-way 1-shot, 2-query episode runs one step."
    cfg = pick(module.CONFIG, profile).replace(way=3, queries=2, **sizes)
    case = module.bench_case(cfg)
    case["run"]()
    assert case["batch"] == 3 * 1 + 3 * 2


def test_tour_returns_the_contract_keys(tmp_path, monkeypatch):
    assert_tour_checkpoints(tdm, tmp_path, monkeypatch, ["protonet"], ckpt_every=5, steps=12, n_test=12)


@pytest.mark.parametrize("profile", ["toy", "full"])
def test_bench_case_runs_one_step(profile):
    assert_bench_case_runs_one_step(tdm, profile, size=84)


def test_sandglass_quirk_and_weights_in_training_mode():
    cfg = pick(tdm.CONFIG, "toy")
    e = tdm.make_episodes(cfg, True, n=1)[0]
    net = tdm.build_model(cfg).train()
    out = net(e["support_images"], e["support_labels"], e["query_images"])
    assert out["w"].shape == (cfg.way, cfg.way * cfg.queries, cfg.channels)
    assert out["w"].min() >= 0 and out["w"].max() <= 2


def test_class_split_is_disjoint_and_sized_as_frn():
    s = tdm.class_split(200)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (100, 50, 50)
    assert not set(s["train"]) & set(s["test"]) and not set(s["val"]) & set(s["test"])


def test_full_profile_uses_frn_split():
    cfg = pick(tdm.CONFIG, "full")
    s = tdm.split_classes(200, cfg.split)
    assert cfg.split == "frn" and s == tdm.frn_class_split()
    assert all((k + 1) % 2 == 0 for k in s["train"]) and all((k + 1) % 4 == 3 for k in s["test"])
    with pytest.raises(ValueError, match="200 CUB classes"):
        tdm.frn_class_split(20)


@needs_cub
@pytest.mark.skipif(not SLOW, reason="slow (one full-size step: a 20-way 1-shot, 15-query episode of 320 images at 84 px "
                                     "through Conv-4, 1.5-4 min on one shared CPU thread): run with SEGLAB_FLAGS=slow")
def test_full_config_one_step_on_a_cub_layout(tmp_path):
    _, e, _ = full_config_one_step(tdm, tmp_path)
    assert set(e["class_ids"].tolist()) <= set(tdm.frn_class_split()["train"])          # FRN's split: even official ids


@needs_cub
def test_cub_sample_episodes_respect_the_class_split():
    cfg = pick(tdm.CONFIG, "full").replace(data_root=str(CUB), crop=False, split=(0.6, 0.0, 0.4), way=5, queries=2)
    test = tdm.make_episodes(cfg, False, n=3)
    for i in range(3):
        x = test[i]
        assert set(x["class_ids"].tolist()) <= set(range(12, 20))
        assert x["query_images"].shape == (5 * 16, 3, 84, 84) and 0 <= x["query_images"].min() <= x["query_images"].max() <= 1


def test_logit_scale_starts_at_the_official_one_unless_set():
    cfg = pick(tdm.CONFIG, "toy")
    assert float(tdm.build_model(cfg).scale) == 1.0                       # models/Proto.py: the scale starts at 1
    assert float(tdm.build_model(cfg.replace(scale_init=8.0)).scale) == 8.0


def test_mechanism_gaps_report_the_weights_level():
    cfg = pick(tdm.CONFIG, "toy")
    eps = [tdm.make_episodes(cfg, False, n=2)[i] for i in range(2)]
    net = tdm.build_model(cfg)
    for m in (net.attention.prt_self, net.attention.prt_other, net.attention.qry_self):
        torch.nn.init.zeros_(m.linear2.weight)                            # every weight exactly 1: no gap, no saturation
    g = tdm.mechanism_gaps(net, eps)
    assert all(abs(g[k]) < 1e-6 for k in ("sam_signal", "sam_nuisance", "qam_nuisance", "combined"))
    assert g["w_mean"] == pytest.approx(1.0) and g["w_qam_mean"] == pytest.approx(1.0) and g["saturated"] == 0
    for m in (net.attention.prt_self, net.attention.prt_other, net.attention.qry_self):
        torch.nn.init.constant_(m.linear2.weight, 50.0)                   # tanh at its ceiling: every weight ~2
    g = tdm.mechanism_gaps(net, eps)
    assert g["saturated"] > 0.99 and g["w_mean"] > 1.99


def test_toy_losses_are_the_weakest_channels_and_the_signal_the_strongest():
    """SAM and QAM see a channel only through its energy ||X^c - mu(X)||^2 / HW: the toy's corruption (channels an
    instance lost) must be an instance's weakest channels and the class signal its strongest, so that one monotone
    weight can turn the signal up and the losses down. The clutter version (`nuisance_kind='add'`) breaks that order:
    the clutter outranks the signal (the combined-weight gap is negative there, measured in the chapter)."""
    cfg = pick(tdm.CONFIG, "toy")
    assert cfg.nuisance_kind == "lose" and cfg.amplitude == 3.0 and cfg.nuisance_channels == 16

    def energies(c):
        e = tdm.make_episodes(c, False, n=1)[0]
        d = tdm.qam_statistics(e["query_images"].flatten(2))
        rows = torch.arange(len(d))[:, None]
        lost = torch.zeros_like(d, dtype=torch.bool)
        lost[rows, e["meta"]["query_nuisance"]] = True
        sig = torch.zeros_like(lost)
        sig[rows, e["meta"]["signal_channels"][e["query_labels"]]] = True
        sig &= ~lost
        return d[lost].mean(), d[~lost & ~sig].mean(), d[sig].mean()

    lost, other, signal = energies(cfg)
    assert lost < 0.7 * other and other < 0.7 * signal
    clutter, other, signal = energies(cfg.replace(nuisance_kind="add", amplitude=1.0, nuisance_channels=6))
    assert clutter > signal > other                                   # the card's clutter toy: not monotone


def _plain_block(cin: int, cout: int) -> torch.nn.Sequential:
    "Conv-4's block as FRN writes it: conv -> BN -> ReLU -> nn.MaxPool2d(2)."
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


def _saved_bytes(fn) -> int:
    "Bytes of the tensors autograd saves for backward while `fn()` runs."
    total = []
    def pack(t):
        total.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(total), out


@pytest.mark.parametrize("x", [torch.randn(6, 3, 21, 21, generator=torch.Generator().manual_seed(0)),
                               torch.randint(-2, 3, (4, 3, 10, 12), generator=torch.Generator().manual_seed(1)).float()],
                         ids=["odd-size", "ties"])
def test_conv_block_is_the_plain_block_bitwise_with_less_saved_memory(x):
    """`tdm.conv_block` (max-pool before the ReLU, `MaxPool2` keeping only indices) = FRN's conv -> BN -> ReLU ->
    max-pool: outputs, input and weight gradients and BN running statistics bitwise equal, in training (odd map sizes,
    tied values) and in eval; and autograd saves at least the full-size ReLU map less."""
    torch.manual_seed(0)
    new = tdm.conv_block(3, 8)
    old = _plain_block(3, 8)
    old.load_state_dict(new.state_dict())
    assert new.state_dict().keys() == old.state_dict().keys()   # checkpoints load either way
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    saved_new, ya = _saved_bytes(lambda: new(xa))
    saved_old, yb = _saved_bytes(lambda: old(xb))
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(new.parameters(), old.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))
    relu_map = 8 * x.shape[0] * x.shape[2] * x.shape[3] * 4
    assert saved_new <= saved_old - relu_map, (saved_new, saved_old)
    new.eval(), old.eval()
    with torch.no_grad():
        assert torch.equal(new(x), old(x))
