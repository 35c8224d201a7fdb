"""The repo-root conftest bridge between nbdev and nbval, tested on a throw-away notebook project:
cleaned notebooks (outputs, no execution counts) pass; settings.ini's tst_flags are honoured; a cell
that hits the timeout fails instead of passing silently."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import cell_skip_reason  # noqa: E402


def make_project(tmp: Path, cells: list) -> Path:
    shutil.copy(ROOT / "conftest.py", tmp / "conftest.py")
    shutil.copy(ROOT / "settings.ini", tmp / "settings.ini")
    (tmp / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider --nbval-lax --nbval-current-env\n")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = cells
    nbformat.write(nb, tmp / "demo.ipynb")
    return tmp


def run_pytest(project: Path, *args) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "SEGLAB_FLAGS"))}
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:randomly", *args, "demo.ipynb"],
                       cwd=project, capture_output=True, text=True, env=env, timeout=300)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", r.stdout.splitlines()[-1])}
    return counts, r.stdout


def cleaned_cell(src, outputs=()):
    c = nbformat.v4.new_code_cell(src)
    c.execution_count = None                      # what nbdev_clean leaves behind
    c.outputs = [nbformat.v4.new_output("stream", name="stdout", text=t) for t in outputs]
    return c


CELLS = lambda: [cleaned_cell("x = 1\nprint(x)", outputs=["1\n"]),
                 cleaned_cell("#| gpu\nraise RuntimeError('gpu cell ran')"),
                 cleaned_cell("#|slow\nraise RuntimeError('slow cell ran')"),
                 cleaned_cell("#| download\nraise RuntimeError('download cell ran')"),
                 cleaned_cell("#| eval: false\nraise RuntimeError('eval false ran')"),
                 cleaned_cell("nbdev_export()"),
                 cleaned_cell("assert x == 1")]


def test_skip_reasons():
    flags = {"slow", "gpu", "download"}
    assert cell_skip_reason("#| gpu\nx", flags) and cell_skip_reason("#|slow\nx", flags)
    assert cell_skip_reason("#| eval: false\nx", set()) and cell_skip_reason("import nbdev; nbdev_export()", set())
    assert cell_skip_reason("#| export\ndef f(): pass", flags) is None
    assert cell_skip_reason("#| gpu\nx", flags - {"gpu"}) is None


def test_cleaned_notebook_passes_and_flags_are_skipped(tmp_path):
    counts, out = run_pytest(make_project(tmp_path, CELLS()))
    assert counts == {"passed": 2, "skipped": 5}, out


def test_enabled_flag_runs_its_cells(tmp_path):
    counts, out = run_pytest(make_project(tmp_path, CELLS()), "--nbdev-flags", "slow")
    assert counts == {"failed": 1, "passed": 2, "skipped": 4} and "slow cell ran" in out, out


def test_timed_out_shell_cell_fails(tmp_path):
    project = make_project(tmp_path, [cleaned_cell("!sleep 6"), cleaned_cell("y = 2")])
    counts, out = run_pytest(project, "--nbval-cell-timeout=2")
    assert counts.get("failed", 0) >= 1, out
    assert "nbval-cell-timeout" in out or "Timeout" in out, out
