"""Notebooks are the source: after `nbdev_clean` nothing under nbs/ changes, and after `nbdev_export`
nothing under seglab/ changes. Judged by `git status --porcelain` on a throw-away copy of the working
tree, so a brand-new module (an untracked file) counts, and the real checkout is never modified."""
import json
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# nbdev 2 turns nbdev_export into a no-op when IN_TEST is set (conftest sets it for the notebook kernels)
_ENV = {k: v for k, v in os.environ.items() if k != "IN_TEST"}


def _run(cmd, cwd, check=True):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=check, timeout=300, env=_ENV)


def snapshot(src: Path, dst: Path) -> Path:
    "Copy the files git would see (tracked + untracked, not ignored) into a fresh repo at `dst`, committed."
    files = _run(["git", "ls-files", "-co", "--exclude-standard", "-z"], src).stdout.split("\0")
    for f in filter(None, files):
        if (src / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / f, dst / f)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "snapshot"]):
        _run(cmd, dst)
    return dst


def sync_problems(repo: Path) -> list[str]:
    "Run nbdev_clean then nbdev_export in `repo` (a git repo); describe what they changed."
    problems = []
    _run(["nbdev_clean"], repo)
    changed = _run(["git", "status", "--porcelain", "--", "nbs"], repo).stdout
    if changed:
        problems.append("notebooks not clean: run nbdev_clean\n" + changed)
        _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "cleaned"], repo)
    _run(["nbdev_export"], repo)
    changed = _run(["git", "status", "--porcelain", "--", "seglab"], repo).stdout
    if changed:
        problems.append("package out of sync: run nbdev_export and commit seglab/\n" + changed)
    return problems


def test_notebooks_clean_and_package_in_sync(tmp_path):
    problems = sync_problems(snapshot(ROOT, tmp_path))
    assert not problems, "\n".join(problems)


def test_unexported_notebook_edit_is_caught(tmp_path):
    repo = snapshot(ROOT, tmp_path)
    nb_path = repo / "nbs" / "00_foundations" / "00_config.ipynb"
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).startswith("#| export"))
    cell["source"] = "".join(cell["source"]) + "\n\ndef an_unexported_edit(): return 1\n"
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "edit without export"], repo)
    problems = sync_problems(repo)
    assert any(p.startswith("package out of sync") and "seglab/config.py" in p for p in problems), problems
    print("\n".join(problems))
