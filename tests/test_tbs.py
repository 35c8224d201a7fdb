"""TBS chapter (`seglab.methods.tbs`): resume, tour checkpoints, bench case, the breakage variants of the
mechanism check, and the full CONFIG for one step at full size on the real VOC samples laid out as PASCAL-5i."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from seglab.config import pick
from seglab.methods import tbs

from _helpers import pascal5i_layout
from interrupt import Stop, StopAt

DATA = Path(os.environ.get("SEGLAB_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
VOC = DATA / "voc_samples"


# --- resume contract -----------------------------------------------------------------------------------------------

def small(**changes):
    return pick(tbs.CONFIG, "toy").replace(steps=6, ckpt_every=2, n_train=6, n_test=4, batch=4, **changes)


def test_resume_equals_uninterrupted(tmp_path):
    cfg = small()
    ref, _ = tbs.train(cfg)
    ckpt = tmp_path / "tbs.pt"
    with pytest.raises(Stop):
        tbs.train(cfg, callbacks=[StopAt(3)], ckpt=ckpt)
    assert ckpt.exists()                                              # saved at step 2
    resumed, hist = tbs.train(cfg, ckpt=ckpt)
    assert hist.records[-1]["step"] == 6
    ra, rb = ref.state_dict(), resumed.state_dict()
    assert all(torch.equal(ra[k], rb[k]) for k in ra)


def test_tour_returns_the_contract_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setitem(tbs.CONFIG, "toy", dict(tbs.CONFIG["toy"], steps=2, n_train=4, n_test=3, batch=4))
    ckpt = tmp_path / "tbs-toy.pt"
    first = tbs.tour("toy", ckpt=ckpt)
    assert {"metric", "value", "chance", "baseline_name", "baseline"} <= set(first)
    assert isinstance(first["baseline_name"], str) and 0 <= first["baseline"] <= 1 and 0 <= first["value"] <= 1
    assert first["baseline"] == max(first["dcama"], first["matching_probe"])      # the stronger simple baseline
    assert ckpt.exists() and (tmp_path / "tbs-toy-dcama.pt").exists()
    second = tbs.tour("toy", ckpt=ckpt)                              # both runs finished: resumed as they are
    assert (second["value"], second["baseline"]) == (first["value"], first["baseline"])


@pytest.mark.parametrize("cached", [True, False])
def test_bench_case_takes_a_step(cached, monkeypatch):
    assert tbs.BENCH_HAS_CACHE
    built = []
    orig = tbs.build_model
    monkeypatch.setattr(tbs, "build_model", lambda cfg: built.append(orig(cfg)) or built[-1])
    case = tbs.bench_case(pick(tbs.CONFIG, "toy").replace(batch=2), cached=cached)
    model = built[0]
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    before = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    case["run"]()
    assert case["batch"] == 2 and len(calls) == (0 if cached else 2)
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters() if v.requires_grad)


# --- memory of a large training step: layer-wise checkpointing and the positional table ------------------------------
def test_layerwise_checkpointing_changes_nothing():
    """A large step (the full profile) runs each layer under activation checkpointing: the loss and every gradient
    must equal the stored path's exactly, dropout included (its masks are replayed in the recomputation)."""
    cfg = pick(tbs.CONFIG, "toy")
    b = tbs.collate(tbs.make_episodes(cfg, False, 3, 2, "look-alike"))
    out = []
    for layerwise in (False, True):
        torch.manual_seed(0)
        net = tbs.build_model(cfg).train()
        net.layerwise = layerwise
        f = tbs.episode_blocks(net.encoder, b["query_image"], b["support_images"])
        torch.manual_seed(1)
        loss = tbs.seg_ce(net(f["f_q"], f["f_s"], b["support_masks"]), b["query_mask"])
        loss.backward()
        out.append((loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = out
    assert torch.equal(l0, l1) and g0.keys() == g1.keys() and len(g0) > 50
    assert all(torch.equal(g0[k], g1[k]) for k in g0)
    assert tbs.build_model(cfg).layerwise is None                     # default: decided by the step's size


def test_large_steps_are_layerwise(monkeypatch):
    "The full profile's step size switches layer-wise checkpointing on; the toy's does not (its runs are unchanged)."
    seen = []
    orig = tbs.checkpoint
    monkeypatch.setattr(tbs, "checkpoint", lambda fn, *a, **k: seen.append(getattr(fn, "__name__", "")) or orig(fn, *a, **k))
    cfg = pick(tbs.CONFIG, "toy")
    net = tbs.build_model(cfg).train()
    b = tbs.collate(tbs.make_episodes(cfg, False, 2, 1, "plain"))
    f = tbs.episode_blocks(net.encoder, b["query_image"], b["support_images"])
    net(f["f_q"], f["f_s"], b["support_masks"])
    assert seen == []
    monkeypatch.setattr(tbs, "MAX_STORED", 0)                          # as if the step were the full profile's
    net(f["f_q"], f["f_s"], b["support_masks"])
    assert seen.count("layer") == 3 and "<lambda>" in seen          # stages 2-4 (one block each) and the first mixer
    with torch.no_grad():                                              # evaluation never checkpoints
        seen.clear(); net(f["f_q"], f["f_s"], b["support_masks"]); assert seen == []


def test_positional_table_grows_as_needed():
    "The table is built as long as the longest sequence seen, equal to the official all-rows table's first rows."
    import math
    pe = tbs.PositionalEncoding(8, dropout=0.0, max_len=50)
    assert pe.pe.shape[1] == 0 and not pe.state_dict()
    x = torch.zeros(1, 30, 8)
    pos = torch.arange(50)[:, None]
    div = torch.exp(torch.arange(0, 8, 2) * (-math.log(10000.0) / 8))
    full = torch.zeros(50, 8)
    full[:, 0::2], full[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    assert torch.equal(pe(x)[0], full[:30]) and pe.pe.shape[1] == 30
    assert torch.equal(pe(torch.zeros(1, 10, 8))[0], full[:10]) and pe.pe.shape[1] == 30
    with pytest.raises(ValueError, match="max_len"):
        pe(torch.zeros(1, 51, 8))


def test_full_profile_trains_one_shot():
    "The official training is 1-shot (`train.py` squeezes the single support); the toy banks 2 supports per episode."
    assert pick(tbs.CONFIG, "full").train_shots == 1 and pick(tbs.CONFIG, "toy").train_shots == 2


# --- the toy's loss: small objects, foreground weighted --------------------------------------------------------------
def test_toy_loss_weights_the_foreground(monkeypatch):
    """With plain CE the toy's small targets (about 6% of the pixels) taught both matchers to say "background" (held-out
    mIoU below the all-foreground chance mask): the toy profile weights the foreground by about its inverse pixel
    frequency, the full profile keeps the official plain CE, and training passes the weight to the loss."""
    toy, full = pick(tbs.CONFIG, "toy"), pick(tbs.CONFIG, "full")
    assert full.fg_weight == 1.0
    eps = tbs.make_episodes(toy, True, 30, 1)
    fg = float(torch.stack([e["query_mask"] for e in eps]).eq(1).float().mean())
    assert 0.5 * (1 - fg) / fg <= toy.fg_weight <= 2 * (1 - fg) / fg, fg
    g = torch.Generator().manual_seed(0)
    logits, mask = torch.randn(2, 2, 8, 8, generator=g), (torch.rand(2, 8, 8, generator=g) < 0.2).long()
    nll = -logits.log_softmax(1).gather(1, mask[:, None])[:, 0]
    w = 1 + 3.0 * mask
    assert torch.allclose(tbs.seg_ce(logits, mask, 4.0), (w * nll).sum() / w.sum())
    assert torch.allclose(tbs.seg_ce(logits, mask), nll.mean())
    seen = []
    ce = tbs.seg_ce
    monkeypatch.setattr(tbs, "seg_ce", lambda lo, m, fg_weight=1.0, **k: seen.append(fg_weight) or ce(lo, m, fg_weight, **k))
    tbs.train(pick(tbs.CONFIG, "toy").replace(steps=1, n_train=4, batch=2))
    assert seen == [toy.fg_weight]


# --- the mechanism check fails under each breakage (untrained weights: |w|-initialised ScoreMap) -------------------
def test_breakages_change_the_scores():
    torch.manual_seed(0)
    cfg = pick(tbs.CONFIG, "toy")
    model = tbs.build_model(cfg).eval()
    eps = tbs.make_episodes(cfg, False, 6, 1, "look-alike + shared bg")
    batches = tbs.test_batches(model.encoder, eps, cache=False)
    b = next(iter(batches))
    i = model.last[2]
    f_q, f_s, mask = b["f_q"][i].float(), b["f_s"][i][:, 0].float(), b["support_masks"][:, 0]
    r = {v: tbs.layer_scores(model, f_q, f_s, mask, 2, v, torch.Generator().manual_seed(0)) for v in tbs.BREAKAGES}
    assert torch.equal(r["off"], torch.ones_like(r["off"]))
    assert not torch.allclose(r["tbs"], r["flipped"]) and not torch.allclose(r["tbs"], r["random"])
    assert not torch.allclose(r["tbs"], r["misaligned"])
    with pytest.raises(ValueError, match="variant must be one of"):
        tbs.layer_scores(model, f_q, f_s, mask, 2, "sideways")


def test_test_episodes_name_their_condition():
    with pytest.raises(ValueError, match="not a test condition"):
        tbs.make_episodes(pick(tbs.CONFIG, "toy"), False, 2, 1, condition="sideways")


@pytest.mark.skipif(not VOC.is_dir(), reason=f"VOC samples not found at {VOC} (set SEGLAB_SHARED_DATA)")
def test_full_profile_test_episodes_need_no_condition(tmp_path):
    pascal5i_layout(tmp_path, VOC)
    cfg = pick(tbs.CONFIG, "full").replace(data_root=str(tmp_path / "voc2012"), pretrained=False)
    test = tbs.make_episodes(cfg, False, 2, 1)
    assert len(test) == 2 and test[0]["support_images"].shape == (1, 3, 320, 320)


# --- the full CONFIG, one step at full size on real VOC samples ----------------------------------------------------
@pytest.mark.skipif(not VOC.is_dir(), reason=f"VOC samples not found at {VOC} (set SEGLAB_SHARED_DATA)")
@pytest.mark.skipif("slow" not in os.environ.get("SEGLAB_FLAGS", "").split(),
                    reason="slow (ResNet-50 at 320 px on CPU, over a minute on the shared 2-core CPU): SEGLAB_FLAGS=slow")
def test_full_config_one_step_on_real_samples(tmp_path):
    pascal5i_layout(tmp_path, VOC)
    full = pick(tbs.CONFIG, "full")
    cfg = full.replace(data_root=str(tmp_path / "voc2012"), pretrained=False, steps=1)
    changed = ("data_root", "steps", "pretrained")
    assert {k: v for k, v in cfg.items() if k not in changed} == {k: v for k, v in full.items() if k not in changed}
    model, hist = tbs.train(cfg)
    assert len(hist.records) == 1 and np.isfinite(hist.records[0]["loss"])
    assert model.encoder.input_size == 320 and len(model.stage_ids) == 16          # ResNet-50: 3+4+6+3 blocks
    test = tbs.make_episodes(cfg, False, 2, 1)
    assert test[0]["support_images"].shape == (1, 3, 320, 320)
    r = tbs.evaluate(model, cfg, tbs.test_batches(model.encoder, test, batch=2, cache=False))
    assert set(r["iou"]) == {1, 2, 3, 4, 5} and 0 <= r["miou"] <= 1


# --- the toy's learning rate for TBS's own parameters ---------------------------------------------------------------
def test_tbs_parameters_train_at_their_own_rate():
    """The toy trains TBS's own modules (cross-attention, ScoreMap) at lr x `tbs_lr` (0.01, chosen on validation);
    the full profile keeps the official single rate. Every trainable parameter is in exactly one group."""
    toy, full = pick(tbs.CONFIG, "toy"), pick(tbs.CONFIG, "full")
    assert toy.tbs_lr == 0.01 and full.tbs_lr == 1.0
    model = tbs.build_model(toy)
    opt = tbs.make_optimizer(toy, model)
    rest, own = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert own["lr"] == toy.lr * 0.01 and rest["lr"] == toy.lr and own["params"]
    assert all(names[id(p)].split(".")[0] in ("ca", "score") for p in own["params"])
    assert not any(names[id(p)].split(".")[0] in ("ca", "score") for p in rest["params"])
    assert len(own["params"]) + len(rest["params"]) == sum(p.requires_grad for p in model.parameters())
    assert isinstance(tbs.make_optimizer(full.replace(backbone="toy_cnn", input_size=64), model), torch.optim.SGD)
    # one step moves TBS's parameters by about 1/100 of what it moves DCAMA's
    b = tbs.collate(tbs.make_episodes(toy, True, 4, 1))
    f = dict(tbs.episode_blocks(model.encoder, b["query_image"], b["support_images"]), support_masks=b["support_masks"],
             query_mask=b["query_mask"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    tbs.train_step(model, f, toy.fg_weight)["loss"].backward()
    opt.step()
    step = lambda pre: max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()
                           if n in before and n.split(".")[0] == pre)
    assert 0 < step("ca") <= 1.5 * toy.lr * 0.01 and step("mixer3") > 0.5 * toy.lr


# --- skip_grad: the path split of CE's gradient on R~ ----------------------------------------------------------------
def test_skip_grad_stops_only_the_skip_gradient():
    """`skip_grad=False` leaves the forward pass and DCAMA's gradients unchanged and changes only TBS's stage-2
    gradients (stage 2's last block is the one the skip connection reads); `rtilde_gradients` restores the switch."""
    cfg = pick(tbs.CONFIG, "toy")
    assert cfg.skip_grad and pick(tbs.CONFIG, "full").skip_grad          # the code's behaviour in both profiles
    b = tbs.collate(tbs.make_episodes(cfg, False, 3, 1, "look-alike + shared bg"))
    out = []
    for skip_grad in (True, False):
        torch.manual_seed(0)
        net = tbs.build_model(cfg.replace(skip_grad=skip_grad)).eval()
        f = tbs.episode_blocks(net.encoder, b["query_image"], b["support_images"])
        logits = net(f["f_q"], f["f_s"], b["support_masks"])
        tbs.seg_ce(logits, b["query_mask"]).backward()
        out.append((logits.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
    (l1, g1), (l2, g2) = out
    assert torch.equal(l1, l2) and set(g1) == set(g2)
    own = lambda n: n.split(".")[0] in tbs.TBS_PARAMS
    assert all(torch.allclose(g1[n], g2[n]) for n in g1 if not own(n) or not n.split(".")[1] == "s2")
    assert any(not torch.allclose(g1[n], g2[n]) for n in g1 if own(n) and n.split(".")[1] == "s2")
    net.skip_grad = True
    batches = tbs.test_batches(net.encoder, tbs.make_episodes(cfg, False, 4, 1, "look-alike + shared bg"), cache=False)
    g = tbs.rtilde_gradients(net, list(batches), cfg.fg_weight)
    assert set(g) == {(p, k) for p in ("attention", "skip") for k in ("lookalike", "shared")} and net.skip_grad
