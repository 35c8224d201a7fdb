import torch, torch.nn as nn, torch.nn.functional as F, time, sys, math, json
torch.set_num_threads(1)
from torchvision.ops import roi_align
from seglab import backbones as bb
from ev import evaluate

def views(x, g, n, px, scale, flip=True, rot=False):
    "n random resized crops per image (area fraction `scale`, aspect 3/4-4/3) at px, flip, rot90, colour jitter."
    B, S = len(x), x.shape[-1]
    area = torch.empty(B, n).uniform_(*scale, generator=g)
    logr = torch.empty(B, n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
    w = (area * logr.exp()).sqrt().clamp(max=1) * S; h = (area / logr.exp()).sqrt().clamp(max=1) * S
    x0 = torch.rand(B, n, generator=g) * (S - w); y0 = torch.rand(B, n, generator=g) * (S - h)
    rows = torch.arange(B).repeat_interleave(n).float()[:, None]
    boxes = torch.cat([rows, torch.stack([x0, y0, x0 + w, y0 + h], -1).reshape(-1, 4)], 1)
    v = roi_align(x, boxes, (px, px), aligned=True)
    if flip:
        v = torch.where(torch.rand(len(v), 1, 1, 1, generator=g) < 0.5, v.flip(-1), v)
    if rot:
        k = torch.randint(4, (len(v),), generator=g)
        v = torch.stack([torch.rot90(vi, int(ki), (1, 2)) for vi, ki in zip(v, k)])
    return colour_aug(v, g, *CAUG) if STRONG else bb.colour_jitter(v, g)  # [B*n, ...] grouped by image

STRONG, CAUG = True, ((0.3, 1.3), 0.2, 0.0)
def colour_aug(x, g, gain=(0.3, 1.3), off=0.2, p_gray=0.0):
    "Per image: random channel permutation, independent per-channel gain U(0.3,1.3) and offset U(-0.2,0.2)."
    B = len(x)
    perm = torch.stack([torch.randperm(3, generator=g) for _ in range(B)])
    x = x.gather(1, perm[:, :, None, None].expand_as(x))
    x = x * torch.empty(B, 3, 1, 1).uniform_(*gain, generator=g) + torch.empty(B, 3, 1, 1).uniform_(-off, off, generator=g)
    gray = torch.rand(B, 1, 1, 1, generator=g) < p_gray
    x = torch.where(gray, x.mean(1, keepdim=True).expand_as(x), x)
    return x.clamp(0, 1)

def nce(a, b, tau):
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / tau; t = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t))

def vicreg(a, b, lam=25.0, mu=25.0, nu=1.0):
    "VICReg (Bardes et al. 2022): invariance MSE + variance hinge (std >= 1) + off-diagonal covariance."
    inv = F.mse_loss(a, b)
    def var_cov(z):
        z = z - z.mean(0)
        std = (z.var(0) + 1e-4).sqrt()
        cov = (z.T @ z) / (len(z) - 1)
        off = cov.pow(2).sum() - cov.diagonal().pow(2).sum()
        return F.relu(1 - std).mean(), off / z.shape[1]
    va, ca = var_cov(a); vb, cb = var_cov(b)
    return lam * inv + mu * 0.5 * (va + vb) + nu * (ca + cb)

def local_to_dense(model, head, x, g, n_crops=4, crop_px=32, tau=0.2, area=(0.03, 0.15)):
    "The shipped recipe's term: crop embedding (mean patch tokens) vs roi-aligned full-scene dense map."
    batch, S = len(x), x.shape[-1]
    rows = torch.arange(batch).repeat_interleave(n_crops).float()[:, None]
    side = torch.empty(batch, n_crops).uniform_(*area, generator=g).sqrt() * S
    x0, y0 = torch.rand(batch, n_crops, generator=g) * (S - side), torch.rand(batch, n_crops, generator=g) * (S - side)
    boxes = torch.cat([rows, torch.stack([x0, y0, x0 + side, y0 + side], -1).reshape(-1, 4)], 1)
    crops = colour_aug(roi_align(x, boxes, (crop_px, crop_px), aligned=True), g, *CAUG)
    dense = bb.vit_features(model, colour_aug(x, g, *CAUG))["patch"]
    z_d = roi_align(dense, torch.cat([rows, boxes[:, 1:] / 8], 1), (1, 1), aligned=True).flatten(1)
    z_c = bb.vit_features(model, crops)["patch"].mean((2, 3))
    return nce(head(z_c), head(z_d), tau)

def run(cfg):
    seed = 0
    bb.seed_everything(seed)
    imgs = []
    if cfg.get("n_obj", 2048): imgs.append(bb.object_scenes(cfg.get("n_obj", 2048), seed=seed + 2)["image"])
    if cfg.get("n_scn", 0): imgs.append(bb.toy_scenes(cfg["n_scn"], seed=seed + 1)["image"])
    images = torch.cat(imgs)
    model, g = bb.build_toy_vit(seed).train(), torch.Generator().manual_seed(seed)
    D = 128
    head = nn.Sequential(nn.Linear(D, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 128)) if cfg.get("bn") else nn.Sequential(nn.Linear(D, 512), nn.GELU(), nn.Linear(512, cfg.get("out", 128)))
    opt = bb._adamw(nn.ModuleList([model, head]), cfg["lr"], wd=cfg.get("wd", 0.05))
    B, steps, px, tau = cfg["batch"], cfg["steps"], cfg.get("px", 48), cfg.get("tau", 0.2)
    if cfg.get("dense"):
        scenes = bb.toy_scenes(4096, seed=seed + 1)["image"]
        dhead = nn.Sequential(nn.Linear(D, 256), nn.GELU(), nn.Linear(256, 64))
        opt.add_param_group(dict(params=list(dhead.parameters()), weight_decay=0.0, lr=cfg["lr"]))
    t0 = time.time()
    for step in range(steps):
        x = images[torch.randint(len(images), (B,), generator=g)]
        bb._cosine_lr(opt, step, steps, cfg["lr"], warmup=cfg.get("warmup", 20))
        def emb(v, n):
            f = bb.vit_features(model, v)
            z = {"cls": f["cls"], "mean": f["patch"].mean((2, 3)), "both": f["cls"] + f["patch"].mean((2, 3))}[cfg.get("readout", "mean")]
            return head(z).view(B, n, -1)
        zg = emb(views(x, g, 2, px, cfg.get("scale", (0.35, 1.0))), 2)
        nl = cfg.get("n_local", 0)
        zl = emb(views(x, g, nl, cfg.get("lpx", 24), cfg.get("lscale", (0.05, 0.3))), nl) if nl else zg[:, :0]
        z = torch.cat([zg, zl], 1)
        crit = vicreg if cfg.get("loss") == "vicreg" else (lambda a, b: nce(a, b, tau))
        terms = [crit(z[:, v], zg[:, j]) for j in range(2) for v in range(z.shape[1]) if v != j]
        loss = sum(terms) / len(terms)
        if cfg.get("dense"):
            loss = loss + cfg["dense"] * local_to_dense(model, dhead, scenes[torch.randint(len(scenes), (32,), generator=g)], g)
        opt.zero_grad(); loss.backward(); nn.utils.clip_grad_norm_(model.parameters(), 3.0); opt.step()
        if step + 1 in cfg.get("eval_at", []):
            print("EVAL@", step + 1, evaluate(bb._frozen(__import__("copy").deepcopy(model), bb.TOY_NORM)), flush=True); model.train()
        if step % 50 == 0 or step == steps - 1:
            print(step, round(loss.item(), 3), round(time.time() - t0, 1), flush=True)
    tt = time.time() - t0
    return model, tt

if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    if "caug" in cfg: CAUG = tuple(cfg["caug"])
    model, tt = run(cfg)
    if cfg.get("save"): torch.save(model.state_dict(), cfg["save"])
    print("CFG", cfg, "train_s", round(tt, 1), "EVAL", evaluate(bb._frozen(model, bb.TOY_NORM)), flush=True)
