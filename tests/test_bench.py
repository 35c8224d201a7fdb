"""`seglab bench`: the command's user errors, and a benchmark of a stand-in chapter through the same code path."""
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import torch

from seglab.bench import BENCH_COLUMNS, bench_module


SEGLAB = str(Path(sys.executable).with_name("seglab")) if Path(sys.executable).with_name("seglab").exists() \
    else shutil.which("seglab")


def run_cli(*args):
    return subprocess.run([SEGLAB, *args], capture_output=True, text=True, timeout=600)


def test_bench_user_errors_are_one_line():
    for args, says in ((("bench", "--steps", "0"), "Fix: --steps"), (("bench", "nosuchchapter"), "chapters are:")):
        out = run_cli(*args)
        assert out.returncode == 2 and "Traceback" not in out.stderr and says in out.stderr, out


def test_bench_row_of_a_stand_in_chapter(tmp_path):
    mod = types.ModuleType("seglab.methods.standin")
    mod.CONFIG = dict(toy=dict(n=8), full=dict(n=64))

    def bench_case(cfg, cached=None):
        lin = torch.nn.Linear(cfg.n, cfg.n)
        opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        x = torch.randn(4, cfg.n)

        def run():
            opt.zero_grad()
            lin(x).square().mean().backward()
            opt.step()
        return dict(run=run, batch=4)
    mod.bench_case = bench_case
    row = bench_module(mod, "full", steps=2, warmup=1, device="cpu")
    assert set(BENCH_COLUMNS) <= set(row) and row["chapter"] == "standin" and row["batch"] == 4
    assert row["gflop_per_step"] == round(2 * 2 * 4 * 64 * 64 / 1e9, 3)  # forward + weight gradient
    json.dumps(row)  # rows are plain JSON
