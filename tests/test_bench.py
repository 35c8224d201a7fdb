"""`seglab bench`: the command's user errors, and a benchmark of a stand-in chapter through the same code path."""
import ast
import importlib
import inspect
import json
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from seglab.bench import BENCH_COLUMNS, bench_module, benchable, step_case
from seglab.cli import get_chapter


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


def _manual_steps(model, opt, x, n):
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("returns_dict", [False, True])
def test_step_case_is_one_optimizer_step(returns_dict):
    "`step_case`'s run() is exactly one zero-grad/backward/step: n calls = n hand-written steps (no accumulation)."
    torch.manual_seed(0)
    a = torch.nn.Linear(6, 3)
    b = torch.nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 6)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    loss = lambda: a(x).square().mean()
    case = step_case((lambda: dict(loss=loss(), other=1)) if returns_dict else loss, opt_a, batch=5)
    assert case["batch"] == 5 and set(case) == {"run", "batch"}
    for _ in range(3):
        case["run"]()
    _manual_steps(b, opt_b, x, 3)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), (False, None)])
def test_step_case_amp(amp, dtype):
    "With `amp` the forward runs under autocast; fp16's gradient scaler is unscaled before the update."
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 1, bias=False)
    w0 = a.weight.detach().clone()
    x = torch.full((2, 4), 0.01)   # small: fp16's scaled gradients (scale 2**16) must not overflow, or the step is skipped
    seen = []

    def forward():
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return a(x).float().mean()   # an fp32 loss, as autocast gives a chapter's cross-entropy
    opt = torch.optim.SGD(a.parameters(), lr=0.25)
    step_case(forward, opt, batch=2, amp=amp, device="cpu")["run"]()
    assert seen == [dtype]
    torch.testing.assert_close(a.weight.detach(), w0 - 0.25 * 0.01, rtol=0, atol=1e-5)   # d mean / d w = x, unscaled




def test_chapters_build_their_bench_step_with_step_case():
    "Every benchable chapter times its step through `step_case` (directly or in a case builder it calls)."
    for slug, _ in benchable():
        fn = importlib.import_module(get_chapter(slug).module_name).bench_case
        calls = {c.func.id for c in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn))))
                 if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
        helpers = [f for f in map(fn.__globals__.get, calls)                    # e.g. tdm.bench_episode_step
                   if inspect.isfunction(f) and f.__module__.startswith("seglab.methods.")]
        src = "".join(map(inspect.getsource, [fn, *helpers]))
        assert ".backward(" not in src and "step_case(" in src, \
            f"{slug}: return seglab.bench.step_case(...) from bench_case instead of a hand-written optimizer step"
