"""Checks of the FTMU chapter module (seglab.methods.ftmu): search region, matching, the state (and the official
state bug), A2C invariants, the episode's mechanism counts, that the chapter's mechanism checks fail under the
likely breakages, resuming, the tour and the benchmark case."""
import numpy as np
import pytest
import torch

from seglab.config import pick
from seglab.methods import ftmu

from interrupt import Stop, StopAt


def tiny(**over):
    "A toy config small enough for a few episodes in a test."
    cfg = pick(ftmu.CONFIG, "toy").replace(n_train=2, n_test=2, frames=8, episodes=4, ckpt_every=2, log_every=1)
    return cfg.replace(**over)


@pytest.fixture(scope="module")
def data():
    return ftmu.make_data(tiny())


def spy_states(video, frames, cfg, bug=False, action=ftmu.UPDATE):
    seen = []
    def decide(states, ctx):
        seen.append((states, ctx))
        return [action] * len(ctx)
    out = ftmu.run_video(video, frames, decide, cfg, bug)
    return seen, out


# ---------------------------------------------------------------- components

def test_search_region_follows_the_paper_and_names_the_code_quirk():
    assert ftmu.enlarge((10, 10, 20, 30), 0.4, 64) == (6.0, 2.0, 24.0, 38.0)
    assert ftmu.enlarge((10, 10, 20, 30), 0.4, 64, bottom_w=True) == (6.0, 2.0, 24.0, 34.0)
    assert ftmu.enlarge((0, 0, 64, 64), 0.4, 64) == (0, 0, 64, 64)


def test_returns_closed_form_and_reward():
    r = [3.0, 0.0, 5.0, 1.0]
    g = 0.99
    expect = [sum(g ** (j - i) * r[j] for j in range(i, 4)) for i in range(4)]
    assert torch.allclose(ftmu.discounted_returns(r, g), torch.tensor(expect))
    js = np.linspace(0, 1, 11)
    rs = [ftmu.reward(j) for j in js]
    assert rs[0] == 0 and rs[-1] == 100 and all(b > a for a, b in zip(rs, rs[1:]))


def test_actor_loss_does_not_train_the_critic_and_raises_pi_of_good_actions():
    torch.manual_seed(0)
    ac = ftmu.ActorCritic(5)
    s = torch.rand(5)
    traj = {1: dict(states=[s], actions=[ftmu.KEEP], rewards=[80.0])}
    out = ftmu.a2c_loss(ac, traj)
    out["actor"].backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in ac.critic.parameters())
    before = torch.softmax(ac(s[None])[0], -1)[0, ftmu.KEEP].item()
    opt = torch.optim.SGD(ac.parameters(), lr=0.01)
    opt.zero_grad(); out["loss"].backward(); opt.step()
    assert torch.softmax(ac(s[None])[0], -1)[0, ftmu.KEEP].item() > before


def test_state_carries_the_candidate_and_the_bug_does_not(data):
    cfg = tiny()
    v, fr = data["test"]["videos"][0], data["test"]["frames"][0]
    D = cfg.feat_dim + ftmu.N_QUALITY
    seen, _ = spy_states(v, fr, cfg)
    assert seen and all(s.shape[1] == ftmu.state_dim(cfg) for s, _ in seen)
    for s, ctx in seen:
        assert np.allclose(s[:, D + cfg.feat_dim].numpy(), [c["iou"] for c in ctx], atol=1e-5)
    seen_bug, _ = spy_states(v, fr, cfg, bug=True)
    assert all(torch.equal(s[:, :D], s[:, D:]) for s, _ in seen_bug)
    assert not all(np.allclose(s[:, D + cfg.feat_dim].numpy(), [c["iou"] for c in ctx], atol=1e-5) for s, ctx in seen_bug)


def test_updates_only_on_update_and_mechanism_counts(data):
    cfg = tiny()
    for v, fr in zip(data["test"]["videos"], data["test"]["frames"]):
        _, never = spy_states(v, fr, cfg, action=ftmu.KEEP)
        assert never["stats"]["updates"] == 0 and never["stats"]["drifts"] == 0
        seen, always = spy_states(v, fr, cfg)
        assert always["stats"]["updates"] == always["stats"]["steps"] == sum(len(c) for _, c in seen)
        oracle = ftmu.run_video(v, fr, ftmu.fixed_policy("oracle"), cfg)
        assert oracle["stats"]["drifts"] <= always["stats"]["drifts"]


def test_first_template_comes_from_the_box_not_the_mask(data):
    cfg = tiny()
    differs = 0
    for v, fr in zip(data["test"]["videos"], data["test"]["frames"]):
        first = ftmu.run_video(v, fr, ftmu.fixed_policy("never"), cfg)["pred"][0]
        cands = [torch.from_numpy(m.reshape(v["masks"].shape[1:]) > 0) for m in fr[0]["m"]]
        for k, box in zip(v["object_ids"].tolist(), v["boxes"].tolist()):
            own = first == k
            boxm = torch.from_numpy(ftmu.box_mask(box, cfg.size).reshape(own.shape) > 0)
            assert any(not (own & ~c).any() for c in cands) or not (own & ~boxm).any()   # a candidate, or the box
            differs += not torch.equal(own, v["masks"][0] == k)
    assert differs > 0                                           # never the ground-truth mask itself


# ---------------------------------------------------------------- the chapter's checks fail under the breakages

def test_greedy_evaluation_is_deterministic_but_sampling_is_not(data):
    cfg = tiny()
    torch.manual_seed(0)
    model = ftmu.build_model(cfg)
    model.actor[-1].bias.data = torch.tensor([0.0, 0.0])     # pi = 0.5/0.5 at the last layer's bias
    v, fr = data["test"]["videos"][0], data["test"]["frames"][0]
    g = [ftmu.run_video(v, fr, ftmu.agent_policy(model), cfg) for _ in range(2)]
    assert torch.equal(g[0]["pred"], g[1]["pred"])
    for tr in g[0]["traj"].values():                            # test actions are the actor's argmax
        if tr["states"]:
            with torch.no_grad():
                assert model(torch.stack(tr["states"]))[0].argmax(-1).tolist() == tr["actions"]
    runs = [[a for tr in ftmu.run_video(v, fr, ftmu.agent_policy(model, greedy=False), cfg)["traj"].values()
             for a in tr["actions"]] for _ in range(3)]
    assert len({tuple(r) for r in runs}) > 1                   # random (sampled) actions would break the check above


def test_misaligned_candidates_break_the_alignment_check(data):
    cfg = tiny()
    def mean_true_iou(frames):
        out = []
        for v, fr in zip(data["test"]["videos"], frames):
            seen, _ = spy_states(v, fr, cfg)
            out += [c["true_iou"] for _, ctx in seen for c in ctx]
        return np.mean(out)
    for v, fr in zip(data["test"]["videos"], data["test"]["frames"]):   # the episode reads frame t's candidates at t
        seen, _ = spy_states(v, fr, cfg)
        for _, ctx in seen:
            for c in ctx:
                g = (v["masks"][c["t"]] == c["k"]).numpy().reshape(-1).astype(np.float32)
                m = fr[c["t"]]["m"][c["c"]]
                assert abs(float(ftmu.mask_ious(m[None], m.sum()[None], g, g.sum())[0]) - c["true_iou"]) < 1e-6
    aligned = mean_true_iou(data["test"]["frames"])
    shifted = mean_true_iou([fr[3:] + fr[:3] for fr in data["test"]["frames"]])   # candidates of other frames
    assert aligned > 0.5 > shifted


def test_flipped_reward_breaks_the_return_check(data, monkeypatch):
    cfg = tiny()
    def total(rule):
        return sum(sum(tr["rewards"]) for v, fr in zip(data["test"]["videos"], data["test"]["frames"])
                   for tr in ftmu.run_video(v, fr, ftmu.fixed_policy(rule), cfg)["traj"].values())
    assert total("oracle") >= total("always") > 0
    monkeypatch.setattr(ftmu, "reward", lambda j: -100.0 * j ** 3)
    assert not total("always") > 0


# ---------------------------------------------------------------- training, tour, bench

def test_resume_equals_uninterrupted(tmp_path, data):
    cfg = tiny()
    ref = ftmu.train(cfg, data)["model"].state_dict()
    ckpt = tmp_path / "ftmu.pt"
    with pytest.raises(Stop):
        ftmu.train(cfg, data, callbacks=[StopAt(3)], ckpt=ckpt)
    assert ckpt.is_file()
    resumed = ftmu.train(cfg, data, ckpt=ckpt)["model"].state_dict()
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)


def test_tour_reports_baseline_and_chance(monkeypatch):
    monkeypatch.setitem(ftmu.CONFIG, "toy", {**ftmu.CONFIG["toy"], "n_train": 2, "n_test": 2, "frames": 6, "episodes": 2})
    out = ftmu.tour("toy")
    assert {"metric", "value", "chance", "baseline_name", "baseline"} <= set(out)
    assert 0 <= out["chance"] <= 1 and 0 <= out["value"] <= 1 and 0 <= out["baseline"] <= 1 and "τ" in out["baseline_name"]


def test_bench_case_runs():
    case = ftmu.bench_case(tiny())
    case["run"]()
    assert case["batch"] == 1


def test_full_profile_refuses_clearly():
    cfg = pick(ftmu.CONFIG, "full")
    with pytest.raises(NotImplementedError, match="toy profile"):
        ftmu.make_split(cfg, "train")
