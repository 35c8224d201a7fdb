import torch, torch.nn as nn, torch.nn.functional as F, time, sys, math, json, copy
torch.set_num_threads(2)
from torchvision.ops import roi_align
from seglab import backbones as bb
from ev import evaluate

def colour(x, g, gain=(0.4, 1.2), off=0.1, p_gray=0.2):
    B = len(x)
    perm = torch.stack([torch.randperm(3, generator=g) for _ in range(B)])
    x = x.gather(1, perm[:, :, None, None].expand_as(x))
    x = x * torch.empty(B, 3, 1, 1).uniform_(*gain, generator=g) + torch.empty(B, 3, 1, 1).uniform_(-off, off, generator=g)
    gray = torch.rand(B, 1, 1, 1, generator=g) < p_gray
    return torch.where(gray, x.mean(1, keepdim=True).expand_as(x), x).clamp(0, 1)

COL = ((0.4, 1.2), 0.1, 0.2)
def views(x, g, n=2, px=48, scale=(0.4, 1.0)):
    B, S = len(x), x.shape[-1]
    area = torch.empty(B, n).uniform_(*scale, generator=g)
    r = torch.empty(B, n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g).exp()
    w, h = (area * r).sqrt().clamp(max=1) * S, (area / r).sqrt().clamp(max=1) * S
    x0, y0 = torch.rand(B, n, generator=g) * (S - w), torch.rand(B, n, generator=g) * (S - h)
    box = torch.stack([x0, y0, x0 + w, y0 + h], -1)  # [B,n,4]
    rows = torch.arange(B).repeat_interleave(n).float()[:, None]
    v = roi_align(x, torch.cat([rows, box.reshape(-1, 4)], 1), (px, px), aligned=True)
    flip = torch.rand(len(v), generator=g) < 0.5
    v = torch.where(flip[:, None, None, None], v.flip(-1), v)
    return colour(v, g, *COL), box, flip.view(B, n)

def nce(a, b, tau, group=None):
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / tau; t = torch.arange(len(a))
    if group is not None:  # drop same-image non-positive pairs from the negatives
        same = (group[:, None] == group[None]) & ~torch.eye(len(a), dtype=torch.bool)
        logits = logits.masked_fill(same, -1e4)
    return 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t))

def sample_points(box, K, g):
    "K points per image in the intersection of the two views' boxes, image pixel coords [B,K,2]."
    lo = torch.maximum(box[:, 0, :2], box[:, 1, :2]); hi = torch.minimum(box[:, 0, 2:], box[:, 1, 2:])
    u = torch.rand(len(box), K, 2, generator=g)
    return lo[:, None] + u * (hi - lo).clamp(min=0)[:, None]

def at_points(fmap, box, flip, pts):
    "Bilinear features of one view's map [B,D,h,w] at image points [B,K,2] -> [B,K,D]."
    gxy = (pts - box[:, None, :2]) / (box[:, None, 2:] - box[:, None, :2]) * 2 - 1
    gxy = torch.stack([torch.where(flip[:, None], -gxy[..., 0], gxy[..., 0]), gxy[..., 1]], -1)
    return F.grid_sample(fmap, gxy[:, :, None], align_corners=False).squeeze(-1).transpose(1, 2)

def run(cfg):
    seed = cfg.get("seed", 0)
    bb.seed_everything(seed)
    images = bb.object_scenes(2048, seed=seed + 2)["image"]
    if cfg.get("n_scn"): images = torch.cat([images, bb.toy_scenes(cfg["n_scn"], seed=seed + 1)["image"]])
    model, g = bb.build_toy_vit(seed).train(), torch.Generator().manual_seed(seed)
    head = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 128))
    dhead = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 128))
    opt = bb._adamw(nn.ModuleList([model, head, dhead]), cfg.get("lr", 1e-3))
    B, steps, tau, K, lam = cfg.get("batch", 64), cfg["steps"], cfg.get("tau", 0.2), cfg.get("K", 4), cfg.get("dense", 1.0)
    t0 = time.time()
    for step in range(steps):
        x = images[torch.randint(len(images), (B,), generator=g)]
        bb._cosine_lr(opt, step, steps, cfg.get("lr", 1e-3), warmup=cfg.get("warmup", 50))
        v, box, flip = views(x, g, 2, cfg.get("px", 48), tuple(cfg.get("scale", (0.4, 1.0))))
        f = bb.vit_features(model, v)
        z = head(f["cls"]).view(B, 2, -1)
        loss_c = nce(z[:, 0], z[:, 1], tau)
        loss_d = torch.zeros(())
        if lam:
            fm = f["patch"].view(B, 2, *f["patch"].shape[1:])
            pts = sample_points(box, K, g)
            p0, p1 = at_points(fm[:, 0], box[:, 0], flip[:, 0], pts), at_points(fm[:, 1], box[:, 1], flip[:, 1], pts)
            grp = torch.arange(B).repeat_interleave(K) if cfg.get("mask", True) else None
            loss_d = nce(dhead(p0.reshape(B * K, -1)), dhead(p1.reshape(B * K, -1)), cfg.get("dtau", tau), grp)
        loss = loss_c + lam * loss_d
        opt.zero_grad(); loss.backward(); nn.utils.clip_grad_norm_(model.parameters(), 3.0); opt.step()
        if step + 1 in cfg.get("eval_at", []):
            print("EVAL@", step + 1, evaluate(bb._frozen(copy.deepcopy(model), bb.TOY_NORM)), flush=True); model.train()
        if step % 50 == 0 or step == steps - 1:
            print(step, round(loss_c.item(), 3), round(loss_d.item(), 3), round(time.time() - t0, 1), flush=True)
    return model, time.time() - t0

if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    if 'col' in cfg: COL = (tuple(cfg['col'][0]), cfg['col'][1], cfg['col'][2])
    model, tt = run(cfg)
    if cfg.get("save"): torch.save(model.state_dict(), cfg["save"])
    t = time.time(); e = evaluate(bb._frozen(model, bb.TOY_NORM))
    print("CFG", cfg, "train_s", round(tt, 1), "EVAL", e, "eval_s", round(time.time() - t, 1), flush=True)
