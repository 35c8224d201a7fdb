"""Data-parallel training with `seglab.engine.fit` on two CPU processes (gloo backend, 127.0.0.1 only).

`torchrun` (`python -m torch.distributed.run`) launches a tiny training script twice: both processes must end with
identical weights, equal (up to float rounding) to a single process trained with the same global batch; only rank 0
writes the checkpoint, which holds the random state of both ranks; and a two-process run that crashes mid-way resumes
to exactly the weights of the uninterrupted two-process run.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

from seglab.engine import load_checkpoint

SCRIPT = """
import sys
import torch, torch.nn.functional as F
from torch import nn
from seglab.engine import dist_info, fit, loader_factory, lr_schedule

out, batch_size, crash_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
x = torch.randn(64, 8, generator=g)
y = (x[:, :3] @ torch.randn(3, 3, generator=g)).argmax(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
calls = [0]

def step(net, batch):
    calls[0] += 1
    if calls[0] == crash_at:
        raise SystemExit(3)  # every rank "crashes" at the same micro-batch
    xb, yb = batch
    return dict(loss=F.cross_entropy(net(xb), yb))

steps = 12  # 3 epochs of 64 samples in global batches of 16 (accumulation 2 x batch_size x processes)
history = fit(model, step, loader_factory(torch.utils.data.TensorDataset(x, y), batch_size, seed=7), opt,
              steps=steps, accum=2, scheduler=lr_schedule(opt, steps, warmup_steps=2), ckpt=out + "/ckpt.pt",
              ckpt_every=4, seed=1)
rank, world = dist_info()
torch.save(dict(model=model.state_dict(), loss=history.series("loss")[1]), f"{out}/rank{rank}.pt")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "train.py"
    path.write_text(SCRIPT)
    return path


def launch(script, out, nproc, batch_size, crash_at=0):
    "Run the script on `nproc` processes (torchrun, gloo on 127.0.0.1) or as a plain single process."
    out.mkdir(exist_ok=True)
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
               CUDA_VISIBLE_DEVICES="")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(var, None)
    args = [str(script), str(out), str(batch_size), str(crash_at)]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def weights(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def ddp_run(script, tmp_path_factory):
    "The uninterrupted two-process run."
    out = tmp_path_factory.mktemp("ddp_ref")
    result = launch(script, out, nproc=2, batch_size=4)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_gloo_processes_match_one(script, ddp_run, tmp_path):
    single = launch(script, tmp_path / "single", nproc=1, batch_size=8)
    assert single.returncode == 0, single.stderr[-3000:]
    r0, r1 = weights(ddp_run / "rank0.pt"), weights(ddp_run / "rank1.pt")
    one = weights(tmp_path / "single" / "rank0.pt")
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), f"ranks disagree on {k}"
        assert torch.allclose(r0["model"][k], one["model"][k], atol=1e-5), f"DDP != single process on {k}"
    assert r0["loss"] == r1["loss"] and r0["loss"] == pytest.approx(one["loss"], abs=1e-5)  # process-mean losses
    assert r0["loss"][-1] < 0.8 * r0["loss"][0]  # it trained
    assert sorted(p.name for p in ddp_run.iterdir()) == ["ckpt.pt", "rank0.pt", "rank1.pt"]  # one checkpoint, no tmp
    state = load_checkpoint(ddp_run / "ckpt.pt")
    assert state["step"] == 12 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # each rank has its own stream


def test_two_process_crash_resumes_exactly(script, ddp_run, tmp_path):
    crashed = launch(script, tmp_path, nproc=2, batch_size=4, crash_at=19)  # step 10, after the step-8 checkpoint
    assert crashed.returncode != 0 and not (tmp_path / "rank0.pt").exists()
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 8
    resumed = launch(script, tmp_path, nproc=2, batch_size=4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        a, b = weights(tmp_path / f"rank{rank}.pt"), weights(ddp_run / f"rank{rank}.pt")
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        assert a["loss"] == b["loss"]


TENSOR_SCRIPT = """
import sys
import torch, torch.nn.functional as F
from torch import nn
from seglab.engine import dist_info, fit, tensor_batches

out = sys.argv[1]
g = torch.Generator().manual_seed(0)
data = dict(x=torch.randn(48, 8, generator=g), idx=torch.arange(48))
data["y"] = (data["x"][:, :3] @ torch.randn(3, 3, generator=g)).argmax(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
seen = []

def step(net, batch):
    seen.append(batch["idx"].tolist())
    return dict(loss=F.cross_entropy(net(batch["x"]), batch["y"]))

fit(model, step, tensor_batches(data, 8, seed=3), opt, steps=12, seed=1)
rank, world = dist_info()
torch.save(dict(model=model.state_dict(), seen=seen), f"{out}/rank{rank}.pt")
"""


def test_tensor_batches_shard_over_processes(tmp_path):
    "Two processes see disjoint halves of every global batch and end where one process with that batch ends."
    script = tmp_path / "tensor_train.py"
    script.write_text(TENSOR_SCRIPT)
    for name, nproc in (("ddp", 2), ("single", 1)):
        result = launch(script, tmp_path / name, nproc=nproc, batch_size=0)
        assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = weights(tmp_path / "ddp" / "rank0.pt"), weights(tmp_path / "ddp" / "rank1.pt")
    one = weights(tmp_path / "single" / "rank0.pt")
    assert len(r0["seen"]) == len(one["seen"]) == 12
    for a, b, whole in zip(r0["seen"], r1["seen"], one["seen"]):
        assert len(a) == len(b) == 4 and not set(a) & set(b) and a + b == whole
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), f"ranks disagree on {k}"
        assert torch.allclose(r0["model"][k], one["model"][k], atol=1e-5), f"DDP != single process on {k}"
