import sys, time, torch
torch.set_num_threads(1)
from seglab import backbones as bb
from seglab.config import pick
from seglab.methods import hp
path = sys.argv[1]
if path == "shipped":
    vit = bb.toy_vit()
elif path == "random":
    vit = bb._frozen(bb.build_toy_vit(0), bb.TOY_NORM)
else:
    vit = bb.build_toy_vit(0); vit.load_state_dict(torch.load(path, weights_only=True)); vit = bb._frozen(vit, bb.TOY_NORM)
cfg = pick(hp.CONFIG, "toy")
t = time.time()
data = hp.prepare_data(cfg, backbone=vit)
for s in map(int, sys.argv[2].split(",")):
    c = cfg.replace(seed=s)
    m, _ = hp.train(c, data)
    r = hp.evaluate(m, c, data)
    km = hp.kmeans_baseline(data, c.n_clusters, s)
    print(path, "seed", s, "HP", round(r["miou"], 3), "kmeans", round(km["miou"], 3), "chance", round(hp.chance_miou(data, c.n_clusters), 3),
          "linear", round(r["linear_miou"], 3), round(time.time() - t), flush=True)
