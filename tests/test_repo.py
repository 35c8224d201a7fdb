"""Repository-level consistency: README <- nbs/index.ipynb, the chapter map <- the CLI, and the
dependency declarations (settings.ini, environment.yml, constraints.txt) agree with each other.

Regenerate the README with `python tests/test_repo.py` after editing nbs/index.ipynb.
"""
import configparser
import re
import sys
from pathlib import Path

import nbformat
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
HEADER = "<!-- generated from nbs/index.ipynb by `python tests/test_repo.py`: edit the notebook, not this file -->\n\n"


def render_readme() -> str:
    "README.md as rendered from the markdown cells of nbs/index.ipynb."
    nb = nbformat.read(ROOT / "nbs" / "index.ipynb", as_version=4)
    return HEADER + "\n\n".join(c.source.strip() for c in nb.cells if c.cell_type == "markdown") + "\n"


def settings() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"]


def env_pip_requirements() -> dict:
    "name -> Requirement for the pip section of environment.yml (the editable install excluded)."
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "- pip:")
    reqs = [l.strip()[2:].strip() for l in lines[start + 1:] if l.strip().startswith("- ")]
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs if not r.startswith("-e")}


def _pinned(req: Requirement):
    pins = [s.version for s in req.specifier if s.operator == "=="]
    return pins[0] if pins else None


def test_readme_is_generated_from_index():
    assert (ROOT / "README.md").read_text() == render_readme(), \
        "README.md is out of date: run `python tests/test_repo.py` after editing nbs/index.ipynb"


def test_readme_has_exactly_two_quickstart_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = [l for l in block.splitlines() if l.strip()]
    assert len(commands) == 2
    assert "seglab tour" in commands[0] and commands[1].split("#")[0].strip() == "python -m pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\s*python -m pytest\s*(\"\$@\")?\s*$", ci, re.M), ".ci/run must call the README's test command"


def test_index_chapter_map_matches_cli():
    from seglab.cli import CHAPTERS
    text = (ROOT / "nbs" / "index.ipynb").read_text()
    rows = re.findall(r"\| (\d) [a-z -]+ \| \[?(\d\d_\w+)\]?(?:\([^)]*\))? \|[^|]*\|[^|]*\| (ready|planned) \|", text)
    got = {nb.split("_", 1)[1]: status for _, nb, status in rows if not nb.startswith("00")}
    want = {c.slug: c.status for c in CHAPTERS if c.slug != "toyworld"}
    assert got == want, "update the chapter map in nbs/index.ipynb (and the README) to the chapters' status"


def test_environment_yml_matches_settings():
    s, env = settings(), env_pip_requirements()
    for line in s["requirements"].split() + s["dev_requirements"].split() + s["efficientnet_requirements"].split():
        req = Requirement(line)
        assert req.name.lower() in env, f"{req.name} is in settings.ini but not in environment.yml"
        pin = _pinned(env[req.name.lower()])
        if pin is not None:
            assert req.specifier.contains(pin, prereleases=True), \
                f"environment.yml pins {req.name}=={pin}, outside settings.ini's {req.specifier}"
    declared = {Requirement(l).name.lower() for l in
                s["requirements"].split() + s["dev_requirements"].split() + s["efficientnet_requirements"].split()}
    extra = set(env) - declared
    assert not extra, f"environment.yml installs {sorted(extra)}, which settings.ini does not declare"


def test_constraints_match_environment_yml():
    env = env_pip_requirements()
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        assert req.name.lower() in env and _pinned(env[req.name.lower()]) == _pinned(req), \
            f"constraints.txt and environment.yml disagree on {req.name}"


def test_runtime_requirements_have_lower_bounds_only():
    for line in settings()["requirements"].split():
        req = Requirement(line)
        assert req.name.lower() not in {"nbdev", "fastcore", "execnb", "ghapi"}, "the nbdev stack is dev-only"
        assert all(sp.operator == ">=" for sp in req.specifier), f"{line}: runtime requirements use lower bounds only"


# Colab's GPU runtime as checked on 2026-08-19 (COURSE_CONVENTIONS.md §16). A lower bound above Colab's version would
# make `pip install seglab` replace a package Colab ships (e.g. ipywidgets 8 over Colab's 7): keep them at or below.
COLAB_2026_08_19 = dict(torch="2.11.0", torchvision="0.26.0", timm="1.0.28", numpy="2.1.3", scipy="1.16.3",
                        matplotlib="3.10.0", ipywidgets="7.7.1", h5py="3.16.0")
COLAB_PYTHON = "3.13"


def test_runtime_requirements_do_not_upgrade_colab():
    from packaging.version import Version
    for line in settings()["requirements"].split():
        req = Requirement(line)
        if (colab := COLAB_2026_08_19.get(req.name.lower())) is not None:
            lower = next(sp.version for sp in req.specifier if sp.operator == ">=")
            assert Version(lower) <= Version(colab), f"{line}: Colab ships {req.name} {colab}; lower the bound"
    assert Version(settings()["min_python"]) <= Version(COLAB_PYTHON)
    names = {Requirement(l).name.lower() for l in settings()["requirements"].split()}
    assert "pysodmetrics" not in names, "pysodmetrics pins opencv<5 and breaks Colab: test against it, never require it"

if __name__ == "__main__":
    (ROOT / "README.md").write_text(render_readme())
    print("wrote README.md", file=sys.stderr)


def test_exported_code_has_no_unused_imports_or_names():
    "pyflakes on the exported package: unused imports, undefined names, placeholder-less f-strings (fix them in the notebook)."
    from pyflakes.api import checkPath
    from pyflakes.reporter import Reporter
    import io
    out = io.StringIO()
    files = [p for p in (ROOT / "seglab").rglob("*.py") if p.name != "_modidx.py"]
    n = sum(checkPath(str(p), Reporter(out, out)) for p in files)
    assert n == 0, "edit the source notebooks, then nbdev_export:\n" + out.getvalue()
