"""TDM-IAM chapter (`seglab.methods.tdm_iam`, a reconstruction): resume, tour, bench case, the full CONFIG for one
step on a CUB layout built from the CUB sample, and the toy pool's truth."""
import os

import pytest
import torch

from seglab.config import pick
from seglab.methods import tdm, tdm_iam

from interrupt import assert_resumes_exactly
from test_tdm import CUB, assert_bench_case_runs_one_step, assert_tour_checkpoints, full_config_one_step

SLOW = "slow" in os.environ.get("SEGLAB_FLAGS", "").split()
needs_cub = pytest.mark.skipif(not CUB.is_dir(), reason=f"CUB samples not found at {CUB} (set SEGLAB_SHARED_DATA)")


def small_toy(**kw):
    return pick(tdm_iam.CONFIG, "toy").replace(pool_train=120, pool_test=200, width=8, **kw)


def test_resume_equals_uninterrupted(tmp_path):
    cfg = small_toy(steps=6, ckpt_every=2)
    data = tdm_iam.make_episodes(cfg, True)
    ref, _, hist = assert_resumes_exactly(lambda **kw: tdm_iam.train(cfg, data, **kw), tmp_path / "tdm_iam.pt")
    assert any("attn" in k for k in ref.state_dict())                  # IAM's weights are in the checkpoint
    assert len(hist) > 0


def test_tour_returns_the_contract_keys(tmp_path, monkeypatch):
    r = assert_tour_checkpoints(tdm_iam, tmp_path, monkeypatch, ["protonet", "tdm"], ckpt_every=3, steps=6, n_test=4,
                                pool_train=120, pool_test=200, width=8)
    assert r["baseline"] == max(r["protonet"], r["tdm"])


@pytest.mark.parametrize("profile", ["toy", "full"])
def test_bench_case_runs_one_step(profile):
    assert_bench_case_runs_one_step(tdm_iam, profile, width=8)


def test_arms_and_bad_inputs():
    cfg = small_toy()
    for arm, (att, iam) in tdm_iam.ARMS.items():
        net = tdm_iam.build_model(tdm_iam.arm_config(cfg, arm))
        assert net.kind == att and net.backbone.kind == iam and (len(net.backbone.attn) == 0) == (iam == "none")
    with pytest.raises(ValueError, match="arm must be one of"):
        tdm_iam.arm_config(cfg, "iam_only")
    with pytest.raises(ValueError, match="stages are Conv-4 block numbers"):
        tdm_iam.Conv4IAM(8, "iam", stages=(5,))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        tdm_iam.instance_statistics(torch.zeros(2, 3))


def test_pool_truth_and_episodes_respect_the_split():
    cfg = small_toy()
    pool = tdm_iam.make_pool(cfg, False)
    assert not (pool.bird & pool.clutter).any() and pool.clutter.flatten(1).any(1).all()
    eps = tdm_iam.make_episodes(cfg, False, n=3, pool=pool)
    from seglab.toyworld import BIRD_SPLITS
    for i in range(3):
        assert set(eps[i]["class_ids"].tolist()) <= set(BIRD_SPLITS["test"])


@needs_cub
@pytest.mark.skipif(not SLOW, reason="slow (one full-size step: a 20-way 1-shot, 15-query episode of 320 images at 84 px "
                                     "through Conv-4 with IAM, minutes on one shared CPU thread): run with SEGLAB_FLAGS=slow")
def test_full_config_one_step_on_a_cub_layout(tmp_path):
    cfg, _, model = full_config_one_step(tdm_iam, tmp_path)
    assert cfg.iam == "iam"
    assert all(m.mlp.linear2.weight.abs().sum() > 0 for m in model.backbone.attn.values())   # IAM took the step


def test_training_runs_through_tdms_loop():
    "TDM-IAM has no training loop of its own: its `train` is TDM's with this chapter's model and episodes."
    cfg = small_toy(steps=2)
    a, _ = tdm_iam.train(cfg)
    b, _ = tdm.train(cfg, build=tdm_iam.build_model, episodes=tdm_iam.make_episodes)
    assert type(a.backbone) is type(b.backbone) is tdm_iam.Conv4IAM
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
