"""The nbval <-> nbdev bridge (COURSE_CONVENTIONS.md §6). Keep it short: it is the only nbval customisation.

1. `nbdev_clean` blanks `execution_count`; nbval refuses cells with outputs and no count, even in lax mode.
2. nbval knows nothing of nbdev's directives: cells flagged with a `tst_flags` entry from settings.ini
   (`slow gpu download`) are skipped unless enabled with `--nbdev-flags` / `SEGLAB_FLAGS`; `#| eval: false`
   cells and `nbdev_export(` cells are always skipped.
3. nbval reports a timed-out cell without a traceback as passed; we turn that into a failure.
4. Test-run defaults for the notebook kernels (they inherit this process's environment), including
   `OMP_WAIT_POLICY=PASSIVE`, which OpenMP reads only at start-up; seglab's thread policy for this process.
5. A per-notebook wall-time table at the end of the run, against the 90 s chapter budget.
"""
import configparser
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent
for _k, _v in {"IN_TEST": "1", "SEGLAB_PROFILE": "toy", "TQDM_DISABLE": "1", "MPLBACKEND": "Agg",
               "IPYTHONDIR": str(ROOT / "tests" / "ipython"), "PYDEVD_DISABLE_FILE_VALIDATION": "1",
               "OMP_WAIT_POLICY": "PASSIVE"}.items():
    os.environ.setdefault(_k, _v)

_DIRECTIVE = re.compile(r"^\s*#\s*\|\s*([\w-]+)(?::\s*(.*))?$", re.M)


def pytest_configure(config):
    "Apply seglab's thread policy to this process too (plain test files run in the pytest workers)."
    try:
        from seglab.config import set_threads
    except ImportError:  # seglab not installed: the notebooks will say so
        return
    set_threads()


def pytest_addoption(parser):
    parser.addoption("--nbdev-flags", default=os.environ.get("SEGLAB_FLAGS", ""),
                     help="space-separated nbdev test flags (from settings.ini tst_flags) whose cells run anyway")


def _tst_flags(rootdir: Path) -> set:
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(rootdir / "settings.ini", encoding="utf-8")
    return set(cfg["DEFAULT"].get("tst_flags", "").split())


def cell_skip_reason(source: str, skip_flags: set):
    "Why a notebook cell must not run under the current flags, or None."
    for name, value in _DIRECTIVE.findall(source):
        if name in skip_flags:
            return f"nbdev flag '{name}' not enabled (--nbdev-flags / SEGLAB_FLAGS)"
        if name == "eval" and value.strip().lower() == "false":
            return "#| eval: false"
    if "nbdev_export(" in source:
        return "nbdev_export() cell"
    return None


def pytest_collection_modifyitems(config, items):
    skip_flags = _tst_flags(Path(config.rootpath)) - set(config.getoption("--nbdev-flags").split())
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is None:
            continue
        if cell.get("outputs") and cell.get("execution_count") is None:
            cell["execution_count"] = 0
        if cell_skip_reason(cell.get("source", ""), skip_flags):
            item.options["skip"] = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    parent = getattr(item, "parent", None)
    before = getattr(parent, "timed_out", False)
    yield
    if getattr(item, "cell", None) is not None and not before and getattr(parent, "timed_out", False):
        item._seglab_timed_out = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if call.when == "call" and rep.passed and getattr(item, "_seglab_timed_out", False):
        rep.outcome = "failed"
        rep.longrepr = "cell hit --nbval-cell-timeout without a traceback"


NOTEBOOK_BUDGET_S = 90
_file_seconds: dict = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    _file_seconds[path] = _file_seconds.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if not _file_seconds:
        return
    tr = terminalreporter
    tr.section("seconds per test file (notebook budget %d s)" % NOTEBOOK_BUDGET_S)
    for path, sec in sorted(_file_seconds.items(), key=lambda kv: -kv[1]):
        flag = "  OVER BUDGET" if path.endswith(".ipynb") and sec > NOTEBOOK_BUDGET_S else ""
        tr.write_line(f"{sec:8.1f}  {path}{flag}")
