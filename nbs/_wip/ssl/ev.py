import torch, torch.nn.functional as F, time, sys
torch.set_num_threads(1)
from seglab import backbones as bb
from seglab.toyworld import NUM_CLASSES, NUM_STUFF, THINGS, make_scenes

def obj_labels(caps):
    return torch.tensor([next(i for i, n in enumerate(THINGS) if f" {n} on " in c) for c in caps])

_D = {}
def data():
    if not _D:
        o_tr, o_te = bb.object_scenes(800, seed=2001), bb.object_scenes(400, seed=2002)
        s_tr, s_te = make_scenes(300, seed=1001), make_scenes(100, seed=1002)
        _D.update(o_tr=o_tr["image"], o_te=o_te["image"], y_tr=obj_labels(o_tr["caption"]), y_te=obj_labels(o_te["caption"]),
                  s_tr=s_tr["image"], s_te=s_te["image"], l_tr=bb.patch_labels(s_tr["mask"], 8, NUM_CLASSES),
                  l_te=bb.patch_labels(s_te["mask"], 8, NUM_CLASSES))
    return _D

def img_knn(ftr, ytr, fte, yte):
    p = bb.knn_patch_predict(ftr[:, :, None, None], ytr[:, None, None], fte[:, :, None, None])[:, 0, 0]
    return (p == yte).float().mean().item()

@torch.no_grad()
def evaluate(model, blocks=(1, 2)):
    d = data(); model.eval()
    out = {}
    ftr, fte = bb.vit_features(model, d["o_tr"], blocks=blocks), bb.vit_features(model, d["o_te"], blocks=blocks)
    out["img_cls"] = img_knn(ftr["cls"], d["y_tr"], fte["cls"], d["y_te"])
    out["img_mean"] = img_knn(ftr["patch"].mean((2, 3)), d["y_tr"], fte["patch"].mean((2, 3)), d["y_te"])
    ptr, pte = bb.vit_features(model, d["s_tr"], blocks=blocks), bb.vit_features(model, d["s_te"], blocks=blocks)
    ok, thing = d["l_te"] >= 0, d["l_te"] >= NUM_STUFF
    for name, a, b in [("last", ptr["patch"], pte["patch"])] + [(f"b{i}", ptr["blocks"][i], pte["blocks"][i]) for i in blocks]:
        pred = bb.knn_patch_predict(a, d["l_tr"], b)
        out[f"p_{name}_all"] = (pred == d["l_te"])[ok].float().mean().item()
        out[f"p_{name}_thing"] = (pred == d["l_te"])[thing].float().mean().item()
    return {k: round(v, 3) for k, v in out.items()}

if __name__ == "__main__":
    t = time.time()
    print("random", evaluate(bb._frozen(bb.build_toy_vit(0), bb.TOY_NORM)), time.time() - t)
    print("shipped", evaluate(bb.toy_vit()), time.time() - t)
