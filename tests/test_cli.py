"""The `seglab` command as a user runs it: a subprocess, exit codes, one clear line for mistakes."""
import os
import subprocess
import shutil
import sys
from pathlib import Path

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
    assert "mIoU" in row
