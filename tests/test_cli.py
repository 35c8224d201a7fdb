"""The `seglab` command as a user runs it: a subprocess, exit codes, one clear line for mistakes."""
import importlib.util
import os
import subprocess
import shutil
import sys
from pathlib import Path

import pytest
import torch

import seglab

from _helpers import sigkill_after_checkpoint

# the console script installed next to this interpreter (pip install -e .)
SEGLAB = str(Path(sys.executable).with_name("seglab")) if Path(sys.executable).with_name("seglab").exists() \
    else shutil.which("seglab")


def seglab_cmd(*args, **env):
    e = {**os.environ, **env}
    return subprocess.run([SEGLAB, *args], capture_output=True, text=True, env=e,
                          timeout=600)


def test_version_and_list():
    r = seglab_cmd("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"seglab {seglab.__version__}"
    r = seglab_cmd("list")
    assert r.returncode == 0
    for slug in ("hp", "ppap", "weclip", "dfr", "a2gnn", "sds", "abd", "scl", "tbs", "piclip", "tdm", "tdm_iam",
                 "mbs", "scwssod", "dcfm", "ftmu", "cgdetr"):
        assert f" {slug} " in r.stdout


def test_bad_profile_is_a_clear_error():
    r = seglab_cmd("tour", SEGLAB_PROFILE="gpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'toy'" in r.stderr and "'full'" in r.stderr and "SEGLAB_PROFILE" in r.stderr


def test_unknown_chapter_is_a_clear_error():
    r = seglab_cmd("train", "hpp")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "chapters are:" in r.stderr


def test_tour_runs_foundations_and_reports_learning():
    r = seglab_cmd("tour", "--only", "toyworld", SEGLAB_PROFILE="toy")
    assert r.returncode == 0, r.stdout + r.stderr
    row = next(l for l in r.stdout.splitlines() if l.startswith("toyworld"))
    assert "mIoU" in row and "raw-RGB pixel classifier" in row      # the strongest simple baseline beside the method
    header = next(l for l in r.stdout.splitlines() if l.startswith("chapter"))
    assert header.split()[3:6] == ["value", "baseline", "baseline_name"]


# --- user errors: one line naming what was wrong and the fix, exit 2, no traceback (issue #14) ---

def assert_user_error(r, *words):
    "Exit 2, no traceback, the last stderr line is seglab's error naming `words`."
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("seglab: error: "), r.stderr[-3000:]
    for w in words:
        assert w in last, (w, last)


def test_unknown_toy_backbone_is_a_clear_error():
    assert_user_error(seglab_cmd("pretrain", "nosuchbackbone"), "nosuchbackbone", "vit", "Fix:")


def test_bogus_device_names_the_variable():
    assert_user_error(seglab_cmd("train", "toyworld", SEGLAB_DEVICE="bogus", SEGLAB_PROFILE="toy"),
                      "SEGLAB_DEVICE='bogus'", "Fix:")


def test_cuda_without_a_gpu_is_a_clear_error():
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this also holds on a GPU machine
    assert_user_error(seglab_cmd("train", "toyworld", SEGLAB_DEVICE="cuda", CUDA_VISIBLE_DEVICES="",
                                 SEGLAB_PROFILE="toy"), "SEGLAB_DEVICE='cuda'", "no", "Fix:")


def offline_full(tmp_path):
    "The full profile on a machine without the data or the weights (empty data root, empty HF cache, offline)."
    return dict(SEGLAB_PROFILE="full", SEGLAB_DATA=str(tmp_path / "data"), SEGLAB_CACHE=str(tmp_path / "cache"),
                HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
                CUDA_VISIBLE_DEVICES="")


@pytest.mark.parametrize("chapter,words", [("abd", ["seglab data get acdc"]), ("scl", ["seglab data get voc2012"]),
                                           ("hp", ["pretrained weights", "Fix:"]),
                                           ("weclip", ["pretrained weights", "Fix:"])])
def test_full_profile_without_data_or_weights_is_a_clear_error(tmp_path, chapter, words):
    "A dataset that was not fetched (DatasetNotFoundError) or weights that cannot be downloaded (WeightsUnavailableError)."
    if importlib.util.find_spec(f"seglab.methods.{chapter}") is None:
        pytest.skip(f"chapter {chapter} is not written yet")
    assert_user_error(seglab_cmd("train", chapter, **offline_full(tmp_path)), *words)


def test_resume_from_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    cache = tmp_path / "cache"
    ckpt = cache / "runs" / "toyworld-toy.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    assert_user_error(seglab_cmd("train", "toyworld", "--resume", SEGLAB_PROFILE="toy", SEGLAB_CACHE=str(cache)),
                      str(ckpt), "Fix:")


# --- resume through the command after a real kill -9 (issue #14) ---

def test_train_resumes_after_kill_9_to_the_uninterrupted_weights(tmp_path):
    from seglab.engine import load_checkpoint
    ref_cache, cache = tmp_path / "ref", tmp_path / "run"
    ref_ckpt, ckpt = (c / "runs" / "toyworld-toy.pt" for c in (ref_cache, cache))
    ref_ckpt.parent.mkdir(parents=True)
    ref_ckpt.write_bytes(b"a stale file of an older run")  # a fresh `seglab train` must delete it, not resume from it
    ref = seglab_cmd("train", "toyworld", SEGLAB_PROFILE="toy", SEGLAB_CACHE=str(ref_cache))
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = load_checkpoint(ref_ckpt)
    steps = reference["step"]

    env = {**os.environ, "SEGLAB_PROFILE": "toy", "SEGLAB_CACHE": str(cache)}
    proc = subprocess.Popen([SEGLAB, "train", "toyworld"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sigkill_after_checkpoint(proc, ckpt, timeout=600, poll=0.02, wait=60)
    killed_at = load_checkpoint(ckpt)["step"]
    assert 0 < killed_at < steps

    r = seglab_cmd("train", "toyworld", "--resume", SEGLAB_PROFILE="toy", SEGLAB_CACHE=str(cache))
    assert r.returncode == 0 and f"resuming from {ckpt}" in r.stdout, r.stdout + r.stderr[-3000:]
    resumed = load_checkpoint(ckpt)
    assert resumed["step"] == steps and resumed["model"].keys() == reference["model"].keys()
    for k, v in reference["model"].items():
        assert v.dtype == resumed["model"][k].dtype and torch.equal(v, resumed["model"][k]), f"{k} differs"
    row = lambda out: next(l for l in out.splitlines() if l.startswith("toyworld")).split()
    assert row(r.stdout)[:-1] == row(ref.stdout)[:-1]  # the same mIoU, baseline and chance in the printed table
    print(f"killed at step {killed_at} of {steps}; resumed weights equal the uninterrupted run's")


# --- several seeds and the JSON table (issue #32) ---

def fake_chapter(monkeypatch, slug, tour_fn):
    "Register a stand-in chapter `slug` (module seglab.methods.<slug> with `tour_fn` as its tour) for one test."
    import importlib.machinery
    import types
    from seglab import cli
    m = types.ModuleType(f"seglab.methods.{slug}")
    m.__spec__ = importlib.machinery.ModuleSpec(m.__name__, None)
    m.tour = tour_fn
    monkeypatch.setitem(sys.modules, m.__name__, m)
    monkeypatch.setattr(cli, "CHAPTERS", cli.CHAPTERS + [cli.Chapter(slug, "x", "x", "x", "x", "toy task", m.__name__)])


def test_tour_seeds_and_json_with_a_fake_chapter(monkeypatch, tmp_path, capsys):
    import json
    from seglab import cli
    from seglab.config import pick
    seen = []

    def tour_fn(profile):   # reads its seed from its CONFIG, as every chapter does
        cfg = pick(dict(common=dict(seed=0), toy=dict(), full=dict()), profile)
        seen.append(cfg.seed)
        return dict(metric="mIoU", value=0.5 + 0.1 * cfg.seed, chance=float("nan"), baseline_name="probe", baseline=0.25)
    fake_chapter(monkeypatch, "_fake32", tour_fn)
    out = tmp_path / "site" / "tour.json"
    rec = tmp_path / "recorded"
    assert cli.main(["tour", "--profile", "toy", "--only", "_fake32", "--seeds", "0", "1", "2", "--json", str(out),
                     "--record", str(rec)]) == 0
    assert seen == [0, 1, 2]
    text = capsys.readouterr().out
    row = next(l for l in text.splitlines() if l.startswith("_fake32"))
    assert "0.600 ± 0.100" in row and "0.250 ± 0.000" in row and "probe" in row and row.rstrip().endswith("0 1 2")
    assert "tour wall time" in text and "load average" in text
    doc = json.loads(out.read_text())      # strict JSON: the NaN chance is null
    ch = doc["chapters"][0]
    assert doc["schema"] == "seglab-tour/1" and doc["seeds"] == [0, 1, 2] and doc["profile"] == "toy"
    assert ch["value"]["values"] == [0.5, 0.6, 0.7] and ch["chance"]["values"] == [None] * 3 and ch["chance"]["n"] == 0
    assert [r["seed"] for r in doc["runs"]] == [0, 1, 2] and doc["machine"]["cores"] >= 1
    assert "loadavg_1_5_15" in doc["machine_before"] and doc["wall_s"] >= 0
    from seglab.records import load_records     # --record: one validated row per seed in the chapter's file
    rows = load_records("_fake32", rec)["rows"]
    assert [(r["seed"], r["value"], r["profile"]) for r in rows] == [(0, 0.5, "toy"), (1, 0.6, "toy"), (2, 0.7, "toy")]
    assert all(r["commit"] and r["wall_s"] >= 0 and r["peak_mem_mb"] > 0 and "chance" not in r for r in rows)


def test_tour_seeds_catch_a_chapter_that_ignores_the_seed(monkeypatch, capsys):
    from seglab import cli
    fake_chapter(monkeypatch, "_noseed32",
                 lambda profile: dict(metric="m", value=1.0, chance=0.0, baseline_name="b", baseline=0.0))
    assert cli.main(["tour", "--profile", "toy", "--only", "_noseed32", "--seeds", "0", "1"]) == 1
    assert "ignores the seed" in capsys.readouterr().err
    assert cli.main(["tour", "--profile", "toy", "--only", "_noseed32", "--seeds", "1", "1"]) == 2   # a repeated seed


def test_tour_seeds_give_different_real_runs():
    "The foundations' chapter (ToyWorld learner), shrunk through `overrides`, on two seeds: two different draws."
    from seglab.cli import run_chapter
    from seglab.config import overrides
    with overrides(n_train=96, n_val=32, steps=20, batch=16):
        rows = [run_chapter("toyworld", "toy", seed=s) for s in (0, 1)]
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0]["value"] != rows[1]["value"] and rows[0]["baseline"] != rows[1]["baseline"]
