"""The documentation site is built from the notebooks by nbdev's processors (`nbdev_docs` = these processors,
then Quarto). nbdev executes every exported cell and every cell that contains an import while processing, so a
cell that mixes an import with other code runs out of context and breaks the site build. Quarto cannot be
installed here (no internet), so this runs the processing step, the part that fails on notebook content, on a
throw-away copy of the working tree."""
import os
import subprocess
import sys

from test_sync import ROOT, snapshot

_PROC = """
import warnings, sys
from nbdev.serve import proc_nbs
warnings.simplefilter("always")
proc_nbs("nbs", n_workers=0)
"""


def test_docs_processing_runs_every_notebook(tmp_path):
    repo = snapshot(ROOT, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("IN_TEST", "PYTHONPATH")}
    env.update(SEGLAB_PROFILE="toy", TQDM_DISABLE="1", MPLBACKEND="agg", PYTHONPATH=str(repo))
    r = subprocess.run([sys.executable, "-c", _PROC], cwd=repo, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    # the Colab install cell is the one allowed mix: executing it off Colab is a no-op
    mixed = [w for w in r.stderr.split("UserWarning: ")[1:]
             if w.startswith("Found cells containing imports") and "# Colab: install seglab" not in w]
    assert not mixed, "split these cells: imports in a cell of their own\n" + "\n".join(mixed)[:4000]
    nbs = {p.relative_to(repo / "nbs") for p in (repo / "nbs").rglob("*.ipynb") if "/_" not in str(p) and ".ipynb_checkpoints" not in str(p)}
    done = {p.relative_to(repo / "_proc") for p in (repo / "_proc").rglob("*.ipynb")}
    assert nbs <= done, f"not processed: {sorted(map(str, nbs - done))}"
