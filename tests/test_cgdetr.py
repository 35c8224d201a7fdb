"""Checks of the CG-DETR chapter module (seglab.methods.cgdetr): the card's invariants (engagement, dummies, spans,
matcher, orthogonality, batch size 1), the distillation direction, the data path (ToyWorld and the real QVHighlights
jsonl), resuming, tour/bench entry points and the full config for one step on the real annotations."""
import itertools

import numpy as np
import pytest
import torch

from seglab.config import pick
from seglab.data.datasets import DatasetNotFoundError, sample_data_dir
from seglab.methods import cgdetr as cg
from seglab.toyworld import GROUNDING_VOCAB

from interrupt import assert_resumes_exactly

QV = sample_data_dir() / "qvhighlights"
HAS_QV = (QV / "highlight_train_release.jsonl").exists()
NO_QV = "the real QVHighlights annotations are absent: set SEGLAB_SHARED_DATA to the folder holding qvhighlights/"


def tiny(**over):
    "A toy config small enough for a few training steps in a test."
    cfg = pick(cg.CONFIG, "toy").replace(n_train=32, n_val=16, batch=4, steps=3, log_every=1, ckpt_every=1)
    return cfg.replace(**over)


def random_batch(cfg, B=3, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(2, len(GROUNDING_VOCAB), (B, 6), generator=g)
    sal = torch.zeros(B, T)
    sal[:, 5:9] = torch.tensor([2., 4., 4., 2.])
    return dict(video=torch.randn(B, T, cfg.video_dim, generator=g), vmask=torch.ones(B, T, dtype=torch.bool),
                words=words, tmask=torch.ones(B, 6, dtype=torch.bool), saliency=sal, rank=3 * sal,
                spans=[torch.tensor([[7 / T, 4 / T]])] * B)


# ---------------------------------------------------------------- invariants of the method card (§9)

def test_engagement_is_one_minus_dummy_mass_and_one_without_dummies():
    cfg = tiny()
    b = random_batch(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        o = cg.build_model(cfg).eval()(b["video"], b["vmask"], b["words"], b["tmask"])
        o0 = cg.build_model(cfg.replace(n_dummies=0)).eval()(b["video"], b["vmask"], b["words"], b["tmask"])
    assert o["A"].shape == (3, 32, cfg.n_dummies + 6)            # keys = [dummies; words]
    assert 0 <= o["e"].min() and o["e"].max() <= 1 and o["e"].std() > 0
    assert torch.allclose(1 - o["e"], o["A"][..., :cfg.n_dummies].sum(-1), atol=1e-5)
    assert float((1 - o["e"]).mean()) > 0.05                     # dummies absorb mass: fails when they are switched off
    assert torch.allclose(o0["e"], torch.ones_like(o0["e"]), atol=1e-5)
    assert all(((s > 0) & (s < 1)).all() for s in o["spans"])


def test_dummies_are_query_dependent():
    cfg = tiny()
    b = random_batch(cfg)
    torch.manual_seed(0)
    net = cg.build_model(cfg).eval()
    with torch.no_grad():
        v, w = net.project(b["video"], b["vmask"], b["words"])
        d1 = net.dummy_tokens(w, b["tmask"])
        d2 = net.dummy_tokens(w.roll(1, 0), b["tmask"])
    assert d1.shape == (3, cfg.n_dummies, cfg.d) and not torch.allclose(d1, d2)


def test_matcher_is_optimal_and_random_assignment_is_caught():
    c = tiny()
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        K = int(torch.randint(1, 4, (1,), generator=g))
        cost = cg.match_cost(torch.randn(5, 2, generator=g), torch.rand(5, 2, generator=g) * .5 + .1,
                             torch.rand(K, 2, generator=g) * .5 + .1, c)
        i, j = cg.hungarian_assign(cost)
        assert len(set(i.tolist())) == K and sorted(j.tolist()) == list(range(K))
        best = min(sum(float(cost[q, k]) for k, q in enumerate(p)) for p in itertools.permutations(range(5), K))
        assert float(cost[i, j].sum()) <= best + 1e-5


def test_decoder_is_conditional_detr_with_spread_anchors(monkeypatch):
    """The official DAB/conditional decoder: the cross-attention query and key are the per-head concatenation of a
    content and a position part (width 2d), and the anchors start spread over the video (nn.Embedding's N(0, 1)
    before the sigmoid). Fails on an additive-position decoder and on anchors drawn from U(0, 1) (all centres in
    (0.5, 0.73))."""
    cfg = tiny()
    b = random_batch(cfg)
    torch.manual_seed(0)
    net = cg.build_model(cfg).eval()
    widths = []
    real = cg.attend
    monkeypatch.setattr(cg, "attend", lambda q, k, v, h, pad=None: widths.append((q.shape[-1], k.shape[-1], v.shape[-1])) or real(q, k, v, h, pad))
    with torch.no_grad():
        net(b["video"], b["vmask"], b["words"], b["tmask"])
    assert widths.count((2 * cfg.d, 2 * cfg.d, cfg.d)) == cfg.dec_layers          # one cross-attention per layer
    assert widths.count((cfg.d, cfg.d, cfg.d)) == cfg.dec_layers                  # and one self-attention
    centres = net.anchors.sigmoid()[:, 0]
    assert centres.min() < 0.4 and centres.max() > 0.6


def test_orthogonal_loss():
    assert cg.orthogonal_loss(torch.eye(5)) < 1e-6
    x = torch.randn(4, 8)
    assert cg.orthogonal_loss(x) >= 0 and cg.orthogonal_loss(torch.ones(4, 8)) > 0.7


def test_distill_pulls_attention_towards_the_correlation_target():
    "Steps on L_distill lower the KL to a fixed correlation target; a flipped sign raises it (the check that catches it)."
    cfg = tiny()
    b = random_batch(cfg)
    rel = b["saliency"] > 0
    torch.manual_seed(0)
    net = cg.build_model(cfg).train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    with torch.no_grad():
        target = net(b["video"], b["vmask"], b["words"], b["tmask"], relevant=rel)["corr"]
    kls = []
    for _ in range(6):
        o = dict(net(b["video"], b["vmask"], b["words"], b["tmask"], relevant=rel), corr=target)
        loss = cg.distill_loss(o, rel, b["tmask"], net.nd)
        p = target.softmax(-1)                                       # measured here, independent of the loss's sign
        kls.append(float((p * (p.log() - o["A"].detach().clamp_min(1e-6).log())).sum(-1)[rel].mean()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kls[-1] < 0.5 * kls[0], kls


def test_distill_averages_the_kl_over_the_keys():
    """L_distill = mean over relevant clips of KL(softmax(C_i) ‖ A_i) / (N_d + L_t): the code's
    `KLDivLoss(reduction='none')(...).mean(1)` (model.py:802). Fails on the summed KL (45 + L_t times larger)."""
    g = torch.Generator().manual_seed(0)
    nd, Lt = 5, 6
    corr = torch.randn(2, 8, nd + Lt, generator=g)
    A = torch.randn(2, 8, nd + Lt, generator=g).softmax(-1)
    rel = torch.zeros(2, 8, dtype=torch.bool)
    rel[0, 2:5], rel[1, 6] = True, True
    p = corr.softmax(-1)
    kl = (p * (p.log() - A.log())).sum(-1)                           # the KL, computed here
    got = cg.distill_loss(dict(corr=corr, A=A), rel, torch.ones(2, Lt, dtype=torch.bool), nd)
    assert float(got) == pytest.approx(float(kl[rel].mean()) / (nd + Lt), rel=1e-3)


def test_t2v_keys_carry_the_dummies_learnable_positions():
    """The T2V keys are [dummies + dummy positions; words] (the code's pos_txt_dummy, model.py:182), and the positions
    are drawn N(0, 1) as the code's dummy_rep_pos. Fails when the keys are the encoded dummies alone (then the
    attention ignores the positions) or at the old 0.02 initial scale."""
    cfg = tiny()
    b = random_batch(cfg)
    torch.manual_seed(0)
    net = cg.build_model(cfg).eval()
    assert 0.8 < float(net.dummy_pos.std()) < 1.2 and 0.8 < float(net.dummies.std()) < 1.2
    with torch.no_grad():
        v, w = net.project(b["video"], b["vmask"], b["words"])
        pos = cg.video_pos(v.shape[1], cfg.d).expand(len(v), -1, -1)
        dm = net.dummy_tokens(w, b["tmask"])
        keys = net.t2v_keys(w, dm)
        assert torch.allclose(keys[:, :cfg.n_dummies], dm + net.dummy_pos) and torch.equal(keys[:, cfg.n_dummies:], w)
        _, A1 = net.text_to_video(v, pos, w, b["tmask"], dm)
        net.dummy_pos.add_(torch.randn_like(net.dummy_pos))          # same encoded dummies, other positions
        _, A2 = net.text_to_video(v, pos, w, b["tmask"], dm)
    assert not torch.allclose(A1, A2, atol=1e-4)


def test_t2v_layer_adds_the_ffn_output_before_the_first_norm():
    """The code's T2V layer (transformer.py:520-524): y = x + attention, out = LN2(y + FFN(LN1(y))). Fails on the plain
    post-norm layer LN2(z + FFN(z)), z = LN1(y)."""
    torch.manual_seed(0)
    layer = cg.T2VLayer(16, 4, 32, 0.0).eval()
    for p in layer.parameters():                                     # non-trivial norms, so the two forms differ
        p.data.add_(0.3 * torch.randn_like(p))
    x, pos, keys = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    with torch.no_grad():
        out, A = layer(x, pos, keys, keys[:, 3:], n_dummy=3)
        a, A2 = layer.attn(x + pos, keys, keys[:, 3:], None, n_skip=3)
        y = x + a
        ref = layer.n2(y + layer.ffn(layer.n1(y)))
        post = layer.n2(layer.n1(y) + layer.ffn(layer.n1(y)))
    assert torch.allclose(out, ref, atol=1e-5) and torch.equal(A, A2)
    assert not torch.allclose(out, post, atol=1e-3)


def test_learned_tokens_are_drawn_standard_normal():
    """The saliency prompts and position, the sentence and moment tokens and their positions are torch.randn, N(0, 1),
    as the code's global_rep_token/_pos, sent_rep_token/_pos, moment_rep_token/_pos (model.py:118-127). Fails at the
    old 0.02 scale."""
    torch.manual_seed(0)
    net = cg.build_model(pick(cg.CONFIG, "toy"))
    assert 0.8 < float(net.prompts.std()) < 1.2
    rest = torch.cat([net.sal_pos, net.sent_token, net.sent_pos, net.mom_token, net.mom_pos])
    assert 0.8 < float(rest.std()) < 1.2


def test_neg_pair_e_loss_sums_like_the_code_or_averages_on_the_toy():
    """`neg_pair_e_loss` is the code's −Σ_i log(1 − e'_i) summed over valid clips (`reduce="sum"`) or its per-clip mean
    (`"mean"`); the full profile keeps the code's sum, the toy profile takes the mean, and the toy loss uses it."""
    e = torch.tensor([[0.5, 0.2, 0.9, 0.0], [0.1, 0.3, 0.0, 0.0]])
    vm = torch.tensor([[True, True, False, True], [True, True, True, False]])
    per = -(torch.log(1 - e + 1e-6) * vm).sum(1)
    assert float(cg.neg_pair_e_loss(e, vm, "sum")) == pytest.approx(float(per.mean()), rel=1e-5)
    assert float(cg.neg_pair_e_loss(e, vm, "mean")) == pytest.approx(float((per / 3).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="'sum'"):
        cg.neg_pair_e_loss(e, vm, "max")
    assert pick(cg.CONFIG, "full").e_neg_reduce == "sum" and pick(cg.CONFIG, "toy").e_neg_reduce == "mean"
    cfg = tiny()
    b = random_batch(cfg)
    losses = {}
    for red in ("sum", "mean"):
        torch.manual_seed(0)
        losses[red] = float(cg.train_step(cg.build_model(cfg), b, cfg.replace(e_neg_reduce=red))["saliency_e"])
    assert losses["sum"] > losses["mean"] + 1e-3                    # the toy loss reads the config's reduction


def test_all_losses_present_finite_and_batch_size_one_runs():
    cfg = tiny()
    torch.manual_seed(0)
    net = cg.build_model(cfg)
    L = cg.train_step(net, random_batch(cfg), cfg)
    assert {"loss", "span", "giou", "label", "saliency", "saliency_e", "ms_align", "distill", "orthogonal"} <= set(L)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in L.values())
    L1 = cg.train_step(net, random_batch(cfg, B=1), cfg)              # no mismatched pair: the other branch
    assert torch.isfinite(L1["loss"])
    L1["loss"].backward()


def test_mismatched_queries_drop_identical_pairs():
    w = torch.tensor([[2, 3], [2, 3], [4, 5]])
    nw, nm, keep = cg.mismatched_queries(w, w > 0)
    assert keep.tolist() == [False, True, True] and torch.equal(nw[0], w[1])


def test_saliency_losses_prefer_the_right_order():
    sal = torch.tensor([[0, 2, 4, 2, 0, 0.]])
    vm = torch.ones(1, 6, dtype=torch.bool)
    good, bad = torch.tensor([[0, 1, 2, 1, 0, 0.]]), torch.tensor([[2, 1, 0, 1, 2, 2.]])
    assert cg.margin_loss(good, sal, vm) == 0 < cg.margin_loss(bad, sal, vm)
    assert cg.rank_contrastive(good * 5, None, 3 * sal, vm) < cg.rank_contrastive(bad * 5, None, 3 * sal, vm)


# ---------------------------------------------------------------- data

def test_toy_split_keeps_each_query_with_its_video():
    "The query of every sample names its own target event (catches queries shuffled across videos)."
    cfg = tiny()
    sp = cg.toy_split(cfg, 16, 0)
    vocab = GROUNDING_VOCAB
    for i, g in enumerate(sp["gt"]):
        text = " ".join(vocab[t] for t in sp["words"][i][sp["tmask"][i]].tolist())
        assert text == g["query"]
        w = text.split()
        target = [(s, e) for name, s, e in sp["events"][i] if name == f"{w[2]} {w[4]} {w[5]}"]
        assert sorted(target) == sorted(map(tuple, g["relevant_windows"]))
    batch = next(cg.batch_stream(sp, cfg)())
    idx = torch.randint(16, (cfg.batch,), generator=torch.Generator().manual_seed(cfg.seed))
    assert torch.equal(batch["words"], sp["words"][idx]) and torch.equal(batch["video"], sp["video"][idx])


def test_toy_split_uses_the_configured_nuisance():
    "The toy config's `noise`/`offset` reach GroundingVideos (catches a split that silently keeps ToyWorld's defaults)."
    from seglab.toyworld import GroundingVideos
    cfg = tiny()
    assert (cfg.noise, cfg.offset) == (0.2, 0.0)
    for over, kw in ((dict(), dict(noise=0.2, offset=0.0)), (dict(noise=None, offset=0.5), dict())):
        sp = cg.toy_split(cfg.replace(**over), 3, 7)
        ref = GroundingVideos(3, clips=cfg.clips, dim=cfg.video_dim, seed=7, difficulty=cfg.difficulty, **kw)
        assert all(torch.equal(sp["video"][i], ref[i]["video_feats"]) for i in range(3))


def test_engagement_report_separates_one_word_off_distractors():
    "e on one-word-off and on other distractor clips, read from the events (catches a wrong word comparison)."
    q = "a person kicks the red disk"
    split = dict(saliency=torch.tensor([[0, 4, 4, 0, 0, 0, 0, 0.]]), vmask=torch.ones(1, 8, dtype=torch.bool),
                 gt=[dict(query=q)],
                 events=[[("kicks red disk", 2.0, 6.0), ("kicks red ring", 6.0, 10.0), ("drops blue ring", 10.0, 14.0)]])
    e = torch.tensor([[0.0, 0.6, 0.6, 0.4, 0.4, 0.1, 0.1, 0.0]])
    r = cg.engagement_report(dict(e=e, S=e), split)
    assert r["e_target"] == pytest.approx(0.6) and r["e_one_word_off"] == pytest.approx(0.4)
    assert r["e_other_distractor"] == pytest.approx(0.1) and r["e_distractor"] == pytest.approx(0.25)
    assert r["e_gap"] == pytest.approx(0.35) and r["e_background"] == pytest.approx(0.0)


def test_word_report_reads_the_word_that_differs():
    """one_word_off_masks files each one-word-off event under the word that differs; replace_word changes only that
    word; word_report runs on a small trained-free model and reports every kind (catches a slot or kind mix-up)."""
    q = "a person kicks the red disk"
    split = dict(vmask=torch.ones(1, 10, dtype=torch.bool), gt=[dict(query=q)],
                 events=[[("kicks red disk", 0.0, 4.0), ("drops red disk", 4.0, 8.0), ("kicks blue disk", 8.0, 12.0),
                          ("kicks red ring", 12.0, 16.0), ("drops blue ring", 16.0, 20.0)]])
    m = cg.one_word_off_masks(split)
    assert m["verb"][0].nonzero()[:, 0].tolist() == [2, 3] and m["colour"][0].nonzero()[:, 0].tolist() == [4, 5]
    assert m["shape"][0].nonzero()[:, 0].tolist() == [6, 7]
    words = torch.tensor([[GROUNDING_VOCAB.index(w) for w in q.split()]])
    for kind, slot in cg.WORD_SLOTS.items():
        r = cg.replace_word(words, kind)
        assert (r != words).nonzero()[:, 1].tolist() == [slot]
        assert GROUNDING_VOCAB[int(r[0, slot])] in cg.WORD_KINDS[kind]
    cfg = tiny()
    sp = cg.toy_split(cfg, 8, 0)
    torch.manual_seed(0)
    rep = cg.word_report(cg.build_model(cfg), sp)
    assert {f"e_off_{k}" for k in cg.WORD_SLOTS} <= set(rep) and "logit_lift_shape" in rep
    assert all(np.isfinite(v) for k, v in rep.items() if not k.startswith("e_off_"))


def test_bad_data_name_names_the_fix():
    with pytest.raises(ValueError, match="'toy' or 'qvhighlights'"):
        cg.make_data(tiny(data="tvsum"))


@pytest.mark.skipif(not HAS_QV, reason=NO_QV)
def test_real_jsonl_split_and_missing_features_error():
    cfg = pick(cg.CONFIG, "full").replace(root=QV)
    sp = cg.qvh_split(cfg, "val", random_features=True)
    assert len(sp["gt"]) == 1550 and sp["video"][torch.tensor([0, 1])].shape == (2, 75, 512)
    assert sp["rank"].max() <= 12 and (sp["rank"] > 0).sum() > 0
    assert all(((s[:, 1] > 0) & (s[:, 1] <= 1)).all() for s in sp["spans"][:50])
    with pytest.raises(DatasetNotFoundError, match="seglab data get qvhighlights_features"):
        cg.qvh_split(cfg, "val")


# ---------------------------------------------------------------- training, resume, entry points

def test_resume_equals_uninterrupted(tmp_path):
    cfg = tiny(steps=4, ckpt_every=2)
    data = cg.make_data(cfg)
    assert_resumes_exactly(lambda **kw: cg.train(cfg, data, **kw), tmp_path / "cgdetr.pt")


def test_evaluate_and_baselines_give_qvhighlights_metrics():
    cfg = tiny(steps=2)
    data = cg.make_data(cfg)
    run = cg.train(cfg, data)
    scores = cg.evaluate(run["model"], cfg, data["val"])
    assert {"R1@0.5", "R1@0.7", "mAP", "mAP@0.5", "mAP@0.75", "HD mAP", "HIT@1"} == set(scores)
    assert all(0 <= v <= 100 for v in scores.values())
    prior = cg.headline(cg.prior_predictions(data["train"], data["val"]), data["val"]["gt"])
    assert 0 <= prior["R1@0.5"] <= 100


def test_step_curve_scores_the_model_a_shorter_run_ends_with():
    "The curve's point at step s equals a run of s steps (the lr is constant), so the seeds table can read it."
    cfg = tiny(steps=2)
    data = cg.make_data(cfg)
    short = cg.evaluate(cg.train(cfg, data)["model"], cfg, data["val"])
    curve = cg.step_curve(tiny(), 0, steps=4, every=2)
    assert list(curve) == [2, 4, "baselines"] and {"prior", "per-clip scorer"} == set(curve["baselines"])
    assert {k: curve[2][k] for k in short} == short and "swapped R1@0.5" in curve[4] and "e_gap" in curve[4]
    with pytest.raises(ValueError, match="multiple"):
        cg.step_curve(tiny(), 0, steps=5, every=2)


def test_tour_forwards_ckpt_and_reports_baseline(tmp_path, monkeypatch):
    monkeypatch.setitem(cg.CONFIG, "toy", dict(cg.CONFIG["toy"], n_train=32, n_val=16, batch=4, steps=2, log_every=1))
    out = cg.tour("toy", ckpt=tmp_path / "cgdetr-toy.pt")
    assert (tmp_path / "cgdetr-toy.pt").is_file()
    assert {"metric", "value", "chance", "baseline_name", "baseline"} <= set(out) and "per-clip" in out["baseline_name"]


@pytest.mark.parametrize("profile", ["toy", "full"])
def test_bench_case_runs_one_step(profile):
    cfg = pick(cg.CONFIG, profile).replace(device="cpu")
    if profile == "full":
        cfg = cfg.replace(batch=2)
    case = cg.bench_case(cfg)
    case["run"]()
    assert case["batch"] == cfg.batch and not hasattr(cg, "BENCH_HAS_CACHE")


@pytest.mark.skipif(not HAS_QV, reason=NO_QV)
def test_full_config_one_step_on_real_qvhighlights_annotations():
    "The full CONFIG (only root and steps changed) for one step at full size, real jsonl, random official-shape features."
    cfg = pick(cg.CONFIG, "full").replace(root=QV, steps=1, device="cpu")
    data = cg.make_data(cfg, random_features=True)
    assert len(data["train"]["gt"]) == 7218 and len(data["val"]["gt"]) == 1550
    run = cg.train(cfg, data)
    net = run["model"]
    assert net.nd == 45 and len(net.t2v) == 2 and len(net.encoder) == 3 and len(net.decoder) == 3 and net.d == 256
    rec = run["history"].records
    assert np.isfinite(rec[0]["loss"]) and {"distill", "ms_align", "saliency_e"} <= set(rec[0])
