"""Prototype (not part of seglab): toy-CLIP pretraining variants tried for issue 8 and the localisation measure.

Run from the repository root with PYTHONPATH set, one thread:
    python nbs/_wip/weclip/toy_clip_recipes.py recipe=phrases steps=600
It trains the toy CLIP with an average-pooled image embedding (open_clip `CLIPVisionCfg(pool_type="avg")`) and
prints zero-shot accuracy and the localisation margins reported in nbs/_wip/README.md.
"""
import math
import re
import sys

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab import backbones as bb
from seglab import cam as C  # needs 03a_clip_cam exported (move it to nbs/00_foundations first)
from seglab import toyworld as tw
from seglab.metrics import ConfusionMatrix


def build_avg_clip(seed: int = 0) -> open_clip.CLIP:
    "`bb.build_toy_clip` with the image embedding = mean of the patch tokens (`pool_type='avg'`)."
    torch.manual_seed(seed)
    vision = open_clip.CLIPVisionCfg(layers=4, width=128, head_width=32, patch_size=8, image_size=64, pool_type="avg")
    text = open_clip.CLIPTextCfg(context_length=24, vocab_size=49408, width=128, heads=4, layers=2)
    model = open_clip.CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text)
    nn.init.normal_(model.token_embedding.weight, std=0.02, generator=torch.Generator().manual_seed(seed))
    model.seglab_norm = bb.TOY_NORM
    return model


def phrases_of(caption: str) -> list[str]:
    "'a red striped disk and a blue dotted ring on grass' -> ['a red striped disk', 'a blue dotted ring', 'a picture of grass']."
    things, sep, stuff = caption.rpartition(" on ")
    return re.split(r", | and ", things) + [f"a picture of {stuff}"] if sep else [caption]


def phrase_vocabulary() -> list[str]:
    "Every object phrase (with and without colour) and every stuff phrase ToyWorld captions can contain."
    return ([f"a {c} {t}" for c in tw.COLOURS for t in tw.THINGS] + [f"a {t}" for t in tw.THINGS]
            + [f"a picture of {s}" for s in tw.STUFF])


def phrase_loss(patch: torch.Tensor, phrases, txt: torch.Tensor, vocab, scale, tau: float = 0.1) -> torch.Tensor:
    """Multiple-instance phrase grounding: score(image, phrase) = soft max over patches (log-sum-exp, `tau`) of the
    patch-phrase cosine; symmetric cross-entropy of every image against the whole vocabulary (its own phrases,
    with and without colour, are the positives; other class names in the same colour are hard negatives)."""
    sim = torch.einsum("ben,ue->bun", F.normalize(patch.flatten(2), dim=1), F.normalize(txt, dim=-1))
    pooled = tau * torch.logsumexp(sim / tau, dim=-1) - tau * math.log(sim.shape[-1])
    index, strip = {p: j for j, p in enumerate(vocab)}, lambda p: re.sub(r"\b(" + "|".join(tw.COLOURS) + r") ", "", p)
    pos = torch.zeros(len(phrases), len(vocab))
    for b, ps in enumerate(phrases):
        for p in ps:
            pos[b, index[p]] = pos[b, index[strip(p)]] = 1
    logits, has = scale * pooled, pos.sum(0) > 0
    i2t = F.cross_entropy(logits, pos / pos.sum(1, keepdim=True))
    t2i = F.cross_entropy(logits.T[has], (pos / pos.sum(0, keepdim=True).clamp_min(1)).T[has])
    return 0.5 * (i2t + t2i)


def pretrain(seed: int, steps: int, recipe: str, batch: int = 64, lr: float = 1e-3):
    "recipe 'avg': bb's caption contrast on the average-pooled CLIP; 'phrases': plus `phrase_loss`."
    scenes, objects = bb.toy_scenes(4096, seed=seed + 1, captions=True), bb.object_scenes(2048, seed=seed + 2)
    images, captions = torch.cat([scenes["image"], objects["image"]]), scenes["caption"] + objects["caption"]
    model, g, tok = build_avg_clip(seed).train(), torch.Generator().manual_seed(seed), bb.toy_tokenizer()
    opt, vocab = bb._adamw(model, lr), phrase_vocabulary()
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=g)
        caps = [bb.drop_words(captions[i], g) for i in idx]
        x = images[idx]
        x = torch.where(torch.rand(batch, 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
        bb._cosine_lr(opt, step, steps, lr, warmup=30)
        patch = bb.clip_features(model, x)["patch"]
        txt = model.encode_text(tok(caps + (vocab if recipe == "phrases" else [])))
        scale = model.logit_scale.exp()
        loss = bb.clip_loss(patch.mean((2, 3)), txt[:batch], scale, caps)
        if recipe == "phrases":
            loss = loss + phrase_loss(patch, [phrases_of(captions[i]) for i in idx], txt[batch:], vocab, scale)
        opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    return bb._frozen(model.eval(), bb.TOY_NORM)


def inside_minus_outside(maps: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
    "Mean over (image, present thing k) of mean(map_k on k's patches) - mean(map_k elsewhere); maps [B,8,h,w] in [0,1]."
    pl, S, diffs = bb.patch_labels(mask, 8, tw.NUM_CLASSES), tw.NUM_STUFF, []
    for b in range(len(pl)):
        for k in range(len(tw.THINGS)):
            m = pl[b] == S + k
            if labels[b, k] and m.any():
                diffs.append(maps[b, k][m].mean() - maps[b, k][~m].mean())
    return torch.stack(diffs).mean().item()


def measure(model) -> dict:
    "Zero-shot hit rate, dense-similarity and Grad-CAM margins, CLIP-ES pseudo-label mIoU on 128 held-out scenes."
    tok, S, K = bb.toy_tokenizer(), tw.NUM_STUFF, len(tw.THINGS)
    val = tw.make_scenes(128, seed=1003)
    lab, gt = val["labels"][:, S:], C.to_fg_bg(val["mask"], S)
    with torch.no_grad():
        T = bb.clip_text_classifier(model, tok, tw.THINGS, templates=("a {}.", "on {}."))
        top = (F.normalize(model.encode_image(bb.normalize(model, val["image"])), dim=-1) @ T.T).argmax(1) + S
        dense = C.minmax(bb.clip_dense_similarity(model, val["image"], T))
    T_es = C.prompt_classifier(model, tok, tw.THINGS, tw.STUFF, templates=("a {}.", "on {}."), bg_templates=("a picture of {}",))
    res = C.clip_es_pseudo_labels(model, val["image"], lab, T_es, layers=range(1, 4), par_kw=dict(dilations=(1, 2, 4, 8), iters=10))
    return dict(zero_shot=val["labels"][torch.arange(len(top)), top].mean().item(),
                chance=val["labels"][:, S:].sum(1).div(K).mean().item(),
                dense_margin=inside_minus_outside(dense, val["mask"], lab),
                gradcam_margin=inside_minus_outside(res["cam"], val["mask"], lab),
                pseudo_miou=ConfusionMatrix(K + 1).update(res["label"], gt).compute()["miou"],
                all_background=ConfusionMatrix(K + 1).update(torch.zeros_like(gt), gt).compute()["miou"])


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = dict(a.split("=") for a in sys.argv[1:])
    model = pretrain(int(args.get("seed", 0)), int(args.get("steps", 500)), args.get("recipe", "phrases"))
    print({k: round(v, 3) for k, v in measure(model).items()})
