#| export
def colour_distort(x: torch.Tensor, g: torch.Generator, gain=(0.7, 1.1), offset: float = 0.05) -> torch.Tensor:
    "Per image: a random RGB channel permutation, then a gain and an offset drawn per channel; clipped to [0,1]."
    B = len(x)
    perm = torch.stack([torch.randperm(3, generator=g) for _ in range(B)])
    x = x.gather(1, perm[:, :, None, None].expand_as(x))
    x = x * torch.empty(B, 3, 1, 1).uniform_(*gain, generator=g) + torch.empty(B, 3, 1, 1).uniform_(-offset, offset, generator=g)
    return x.clamp(0, 1)

def random_views(x: torch.Tensor, g: torch.Generator, n: int = 2, px: int = 48, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)):
    """`n` views per image: random resized crop (area fraction `scale`) to `px`, horizontal flip, `colour_distort`.
    Returns views `[B*n,3,px,px]` (grouped by image), their boxes `[B,n,4]` (x0,y0,x1,y1 in pixels) and flips `[B,n]`."""
    from torchvision.ops import roi_align
    B, S = len(x), x.shape[-1]
    area = torch.empty(B, n).uniform_(*scale, generator=g)
    r = torch.empty(B, n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g).exp()
    w, h = (area * r).sqrt().clamp(max=1) * S, (area / r).sqrt().clamp(max=1) * S
    x0, y0 = torch.rand(B, n, generator=g) * (S - w), torch.rand(B, n, generator=g) * (S - h)
    box = torch.stack([x0, y0, x0 + w, y0 + h], -1)
    rows = torch.arange(B).repeat_interleave(n).float()[:, None]
    v = roi_align(x, torch.cat([rows, box.reshape(-1, 4)], 1), (px, px), aligned=True)
    flip = torch.rand(len(v), generator=g) < 0.5
    v = torch.where(flip[:, None, None, None], v.flip(-1), v)
    return colour_distort(v, g), box, flip.view(B, n)

def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float = 0.2, group: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (NT-Xent): row i of `a` and row i of `b` are a positive pair, the other rows negatives;
    rows with the same `group` id (e.g. points of one image) are removed from each other's negatives."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / tau
    if group is not None:
        logits = logits.masked_fill((group[:, None] == group[None]) & ~torch.eye(len(a), dtype=torch.bool), -1e4)
    target = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

def _shared_points(box: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    "`k` uniform points `[B,k,2]` (pixels) in the overlap of each image's two view boxes `box` `[B,2,4]`."
    lo, hi = torch.maximum(box[:, 0, :2], box[:, 1, :2]), torch.minimum(box[:, 0, 2:], box[:, 1, 2:])
    return lo[:, None] + torch.rand(len(box), k, 2, generator=g) * (hi - lo).clamp(min=0)[:, None]

def _features_at(fmap: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    "Bilinear features `[B,k,D]` of one view's map `[B,D,h,w]` (crop `box` `[B,4]`, `flip` `[B]`) at image points `pts`."
    uv = (pts - box[:, None, :2]) / (box[:, None, 2:] - box[:, None, :2]) * 2 - 1
    uv = torch.stack([torch.where(flip[:, None], -uv[..., 0], uv[..., 0]), uv[..., 1]], -1)
    return F.grid_sample(fmap, uv[:, :, None], align_corners=False).squeeze(-1).transpose(1, 2)

def _pretrain_vit(seed: int, steps: int, batch: int = 64, px: int = 48, lr: float = 1e-3, tau: float = 0.2, k: int = 8):
    images = torch.cat([object_scenes(2048, seed=seed + 2)["image"], toy_scenes(2048, seed=seed + 1)["image"]])
    model, g = build_toy_vit(seed).train(), torch.Generator().manual_seed(seed)
    mlp = lambda: nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 128))
    head, dense_head = mlp(), mlp()
    opt = _adamw(nn.ModuleList([model, head, dense_head]), lr)
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=g)]
        _cosine_lr(opt, step, steps, lr, warmup=50)
        views, box, flip = random_views(x, g, 2, px)
        f = vit_features(model, views)
        z = head(f["cls"]).view(batch, 2, -1)
        fmap = f["patch"].view(batch, 2, *f["patch"].shape[1:])
        pts = _shared_points(box, k, g)
        p0, p1 = (_features_at(fmap[:, i], box[:, i], flip[:, i], pts).flatten(0, 1) for i in (0, 1))
        loss = info_nce(z[:, 0], z[:, 1], tau) + info_nce(dense_head(p0), dense_head(p1), tau, torch.arange(batch).repeat_interleave(k))
        opt.zero_grad(); loss.backward(); nn.utils.clip_grad_norm_(model.parameters(), 3.0); opt.step()
    return model, dict(loss=round(loss.item(), 4))
