"""The `seglab` command as a user runs it: a subprocess, exit codes, one clear line for mistakes."""
import importlib.util
import os
import signal
import subprocess
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

import seglab

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
    try:
        deadline = time.time() + 600
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert ckpt.exists() and proc.poll() is None, "the run ended or never checkpointed before the kill"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
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
