"""The Colab contract (COURSE_CONVENTIONS.md §10, issue #18): `seglab.course.colab_lint` on every course notebook,
each rule failing on its fixture in tests/fixtures/ (regenerate them with tests/fixtures/make_fixtures.py), the fixer,
the GPU metadata surviving nbdev_clean, and student copies."""
import json
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

from seglab.course import SOLUTION_STUB, colab_fix, colab_lint, is_chapter, is_solution, student_copies, student_copy

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
NOTEBOOKS = sorted((ROOT / "nbs" / "00_foundations").glob("[0-9]*.ipynb")) + sorted((ROOT / "nbs").glob("[1-9]*/[1-9]*.ipynb"))


@pytest.mark.parametrize("path", [pytest.param(p, id=p.relative_to(ROOT).as_posix()) for p in NOTEBOOKS])
def test_course_notebook_keeps_the_colab_contract(path):
    assert colab_lint(path, root=ROOT) == []


def test_ok_fixture_passes_every_rule():
    assert colab_lint(FIX / "colab_ok.ipynb", root=ROOT, chapter=True) == []


@pytest.mark.parametrize("name", sorted(p.name for p in FIX.glob("colab_*.ipynb") if p.name != "colab_ok.ipynb"))
def test_each_rule_fails_on_its_fixture(name):
    rule = name.split("_")[1].replace("run", "run_stamp")
    problems = colab_lint(FIX / name, root=ROOT, chapter=True)
    assert [p.split(":")[0] for p in problems] == [rule], problems


def test_size_limit():
    assert [p.split(":")[0] for p in colab_lint(FIX / "colab_ok.ipynb", root=ROOT, chapter=True, max_bytes=1000)] == ["size"]


def _fake_repo(tmp_path):
    (tmp_path / "nbs").mkdir()
    shutil.copy(ROOT / "settings.ini", tmp_path)
    (tmp_path / "tests").mkdir()
    shutil.copytree(FIX, tmp_path / "tests" / "fixtures")
    return tmp_path


FIXABLE = {"badge", "install", "metadata"}


@pytest.mark.parametrize("name", sorted(p.name for p in FIX.glob("colab_*.ipynb")))
def test_colab_fix_repairs_metadata_badge_and_install_cell(tmp_path, name):
    repo = _fake_repo(tmp_path)
    path = repo / "tests" / "fixtures" / name
    before = {p.split(":")[0] for p in colab_lint(path, chapter=True)}
    changed = colab_fix(path)
    after = {p.split(":")[0] for p in colab_lint(path, chapter=True)}
    assert changed == bool(before & FIXABLE) or name in ("colab_pins_torch.ipynb", "colab_pins_upgrade.ipynb")
    assert not after & FIXABLE, after
    assert not colab_fix(path), "colab_fix is idempotent"
    nbformat.validate(nbformat.read(path, as_version=4))


def test_gpu_metadata_survives_nbdev_clean(tmp_path):
    repo = _fake_repo(tmp_path)
    nb = repo / "nbs" / "chapter.ipynb"
    shutil.copy(FIX / "colab_ok.ipynb", nb)
    data = json.loads(nb.read_text())
    data["metadata"]["vscode"] = {"interpreter": {}}   # what nbdev_clean must strip, next to what it must keep
    nb.write_text(json.dumps(data))
    subprocess.run(["nbdev_clean", "--fname", str(nb)], cwd=repo, check=True, capture_output=True)
    meta = json.loads(nb.read_text())["metadata"]
    assert "vscode" not in meta
    assert meta["accelerator"] == "GPU" and meta["colab"]["gpuType"] == "T4"


def _solutions(path):
    return [c for c in nbformat.read(path, as_version=4).cells if is_solution(c)]


def test_student_copy_of_a_chapter(tmp_path):
    src = next(p for p in NOTEBOOKS if is_chapter(p.relative_to(ROOT).as_posix()) and _solutions(p))
    solutions = _solutions(src)
    dst = tmp_path / "student.ipynb"
    assert student_copy(src, dst, root=ROOT) == len(solutions) >= 1
    nb = nbformat.read(dst, as_version=4)
    nbformat.validate(nb)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert not any(is_solution(c) for c in nb.cells)
    assert sum(SOLUTION_STUB in c.source for c in nb.cells) == len(solutions)
    for s in solutions:   # no line of a solution's body survives (short, generic lines aside)
        body = [l.strip() for l in s.source.splitlines()[1:] if len(l.strip()) > 25]
        assert not any(l in code for l in body), body
    assert f"https://github.com/seglab-course/seglab/blob/main/{src.relative_to(ROOT).as_posix()}" in code
    assert len(nb.cells) == len(nbformat.read(src, as_version=4).cells)


def test_student_copies_cli_covers_every_chapter(tmp_path):
    from seglab.cli import main
    assert main(["student-copies", str(tmp_path)]) == 0
    chapters = [p for p in NOTEBOOKS if is_chapter(p.relative_to(ROOT).as_posix())]
    for p in chapters:
        copy = tmp_path / p.relative_to(ROOT / "nbs")
        assert copy.exists(), copy
        assert not [c for c in nbformat.read(copy, as_version=4).cells if is_solution(c)]
    assert student_copies(tmp_path / "again", root=ROOT).keys() == {p.relative_to(ROOT / "nbs").as_posix() for p in chapters}


# ---- Colab resolution (COURSE_CONVENTIONS.md §10.2) ----------------------------------------------------------------
COLAB_CONSTRAINTS = ROOT / "tests" / "colab_constraints.txt"
COLAB_PYTHON = "3.13"


def _colab_pins():
    pins = {}
    for line in COLAB_CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_colab_constraints_agree_with_the_recorded_colab_versions():
    from test_repo import COLAB_2026_08_19
    pins = _colab_pins()
    assert all("+" not in v for v in pins.values()), "strip the +cuXXX local tags"
    assert {k: pins[k] for k in COLAB_2026_08_19} == COLAB_2026_08_19


# Colab's torch and torchvision are the +cu128 builds from PyTorch's own index, preinstalled with their CUDA 12 wheels.
# The package index reachable here serves only the PyPI builds, whose CUDA 13 dependencies it cannot resolve, so two
# metadata-only stub wheels stand in for what Colab has installed: the same names and versions with the +cu128 local
# tag, and PyPI torch 2.11.0 / torchvision 0.26.0's own Requires-Dist minus the CUDA wheels Colab already carries.
COLAB_STUBS = {
    "torch": ["filelock", "typing-extensions>=4.10.0", "setuptools<82", "sympy>=1.13.3", "networkx>=2.5.1", "jinja2",
              "fsspec>=0.8.5"],
    "torchvision": ["numpy", "torch==2.11.0", "pillow!=8.3.*,>=5.3.0"],
}


def colab_stub_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    "A metadata-only wheel `name==version+cu128` for the Colab Python (what pip's resolver reads from a wheel)."
    import base64
    import hashlib
    import zipfile
    full, tag = f"{version}+cu128", f"cp{COLAB_PYTHON.replace('.', '')}"
    info = f"{name}-{full}.dist-info"
    files = {f"{info}/METADATA": "Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {full}\n"
                                 + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: seglab-tests\nRoot-Is-Purelib: false\nTag: {tag}-{tag}-linux_x86_64\n"}
    record = "".join(f"{k},sha256={base64.urlsafe_b64encode(hashlib.sha256(v.encode()).digest()).rstrip(b'=').decode()},"
                     f"{len(v.encode())}\n" for k, v in files.items()) + f"{info}/RECORD,,\n"
    path = folder / f"{name}-{full}-{tag}-{tag}-linux_x86_64.whl"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in {**files, f"{info}/RECORD": record}.items():
            z.writestr(k, v)
    return path


def test_colab_stub_wheels_match_the_pins(tmp_path):
    "The stubs carry exactly the pinned versions, and torchvision's stub requires the pinned torch."
    import zipfile
    pins = _colab_pins()
    for name, requires in COLAB_STUBS.items():
        wheel = colab_stub_wheel(tmp_path, name, pins[name], requires)
        meta = zipfile.ZipFile(wheel).read(f"{name}-{pins[name]}+cu128.dist-info/METADATA").decode()
        assert f"Version: {pins[name]}+cu128" in meta
    assert f"torch=={pins['torch']}" in COLAB_STUBS["torchvision"]


def test_runtime_requirements_resolve_against_colab(tmp_path, request):
    """pip resolves seglab's runtime requirements with Colab's packages as constraints and Colab's preinstalled
    torch/torchvision builds (stubs) on offer, and keeps Colab's torch, torchvision and numpy."""
    import os
    import sys
    from test_repo import settings
    flags = set(request.config.getoption("--nbdev-flags", default="").split())
    if not (os.environ.get("CI") or "slow" in flags):
        pytest.skip("slow (a pip resolution against the index, about a minute): runs in CI or with SEGLAB_FLAGS=slow")
    pins, stubs = _colab_pins(), tmp_path / "colab-preinstalled"
    stubs.mkdir()
    for name, requires in COLAB_STUBS.items():
        colab_stub_wheel(stubs, name, pins[name], requires)
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
           "-c", str(COLAB_CONSTRAINTS), "--find-links", str(stubs), "--python-version", COLAB_PYTHON,
           "--implementation", "cp", "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
           "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64", *settings()["requirements"].split()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    for name in ("torch", "torchvision", "numpy"):
        assert got[name].split("+")[0] == pins[name], (name, got[name])
    assert got["torch"].endswith("+cu128"), "pip must keep Colab's preinstalled torch, not fetch a PyPI build"
