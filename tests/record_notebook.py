"""Execute a notebook in place and keep its outputs (nbdev 2's `nbdev_test` cannot save outputs).

    python tests/record_notebook.py nbs/30_semi/31_abd.ipynb [--flags "slow"] [--timeout 3600]

Cells flagged with a settings.ini `tst_flags` entry that is not enabled are NOT run and keep the outputs
they had, so a GPU run recorded on a GPU machine survives a later CPU recording of the toy cells. Run
`nbdev_clean --fname <notebook>` afterwards. Recorded outputs of flagged cells must say what hardware and
data produced them (each chapter ends with `run_stamp()`).
"""
import argparse
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import _tst_flags, cell_skip_reason  # noqa: E402


def record(path: Path, flags: str = "", timeout: int = 3600) -> None:
    "Run the cells of `path` that the flags allow, in one kernel, and write the notebook back atomically."
    skip = _tst_flags(ROOT) - set(flags.split())
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("TQDM_DISABLE", "1")
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            reason = cell_skip_reason(cell.source, skip)
            if reason:
                print(f"  cell {i}: kept ({reason})")
                continue
            client.execute_cell(cell, i)
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--flags", default="", help="tst_flags to run anyway, e.g. 'slow'")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = ap.parse_args()
    for nb in args.notebooks:
        print(f"recording {nb}")
        record(nb, args.flags, args.timeout)
