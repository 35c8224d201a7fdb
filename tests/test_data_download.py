"""seglab.data.download against a real HTTP server on 127.0.0.1 (no internet): verified fetch, refusals, resume,
mirrors, file:// URLs, safe extraction, trust-on-first-use pinning, atomic preparation and the CLI."""
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglab.data import download as dl
from seglab.data.download import (REGISTRY, ChecksumError, DownloadError, UnsafeArchiveError, check, data_cli,
                                  download, get, local_server, read_lock, safe_extract)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEGLAB_SHARED_DATA", ROOT.parent / "shared" / "data"))
PAYLOAD = os.urandom(250_000)
GOOD = dict(size=len(PAYLOAD), sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False)


def _png(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def voc_tar(path):
    "A VOCtrainval-style tar from ../shared/data/voc_samples when present, else generated."
    samples = SHARED / "voc_samples"
    files = {}
    if (samples / "SegmentationClass").is_dir():
        ids = sorted(p.stem for p in (samples / "SegmentationClass").glob("*.png"))
        for i in ids:
            files[f"JPEGImages/{i}.jpg"] = (samples / "JPEGImages" / f"{i}.jpg").read_bytes()
            files[f"SegmentationClass/{i}.png"] = (samples / "SegmentationClass" / f"{i}.png").read_bytes()
    else:
        rng = np.random.default_rng(0)
        ids = [f"2007_{k:06d}" for k in range(4)]
        for i in ids:
            files[f"JPEGImages/{i}.jpg"] = _png(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
            files[f"SegmentationClass/{i}.png"] = _png(rng.integers(0, 21, (24, 32), dtype=np.uint8))
    files["ImageSets/Segmentation/train.txt"] = ("\n".join(ids[:len(ids) // 2]) + "\n").encode()
    files["ImageSets/Segmentation/val.txt"] = ("\n".join(ids[len(ids) // 2:]) + "\n").encode()
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(f"VOCdevkit/VOC2012/{name}")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return path, ids


def bad_tar(path, kind):
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("VOCdevkit/VOC2012/ok.txt"); ok.size = 1
        tar.addfile(ok, io.BytesIO(b"1"))
        ti = tarfile.TarInfo({"absolute": "/tmp/seglab_evil.txt", "dotdot": "VOCdevkit/../../evil.txt"}.get(kind, "x"))
        if kind in ("absolute", "dotdot"):
            ti.size = 1
            tar.addfile(ti, io.BytesIO(b"x"))
        else:
            ti.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE}[kind]
            ti.linkname = {"symlink": "../../../etc/passwd", "hardlink": "../outside"}.get(kind, "")
            tar.addfile(ti)
    return path


def voc_registry(url, archive, **changes):
    real = REGISTRY["voc2012"]
    spec = dataclasses.replace(real.files[0], urls=tuple(url) if isinstance(url, list) else (url,),
                               size=archive.stat().st_size, sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
                               md5=None)
    return {"voc2012": dataclasses.replace(real, files=(dataclasses.replace(spec, **changes),))}


def no_leftovers(folder):
    "Nothing partial may remain: no .part, no work folders, no half dataset."
    left = [p for p in Path(folder).rglob("*") if p.name.endswith(".part") or ".partial-" in p.name
            or ".extract-" in p.name]
    assert not left, left


@pytest.fixture
def srv(tmp_path):
    d = tmp_path / "srv"
    d.mkdir()
    (d / "good.bin").write_bytes(PAYLOAD)
    return d


def test_end_to_end_voc(tmp_path, srv):
    archive, ids = voc_tar(srv / "VOCtrainval_11-May-2012.tar")
    with local_server(srv, lifetime=60) as (base, log):
        reg = voc_registry(f"{base}/{archive.name}", archive)
        folder = get("voc2012", tmp_path / "data", registry=reg, progress=False)
    voc = folder / "VOCdevkit" / "VOC2012"
    assert sorted(p.stem for p in (voc / "SegmentationClass").glob("*.png")) == ids
    marker = json.loads((folder / ".seglab_ready.json").read_text())
    assert marker["files"][archive.name] == reg["voc2012"].files[0].sha256
    rep = check("voc2012", tmp_path / "data", registry=reg)
    assert rep["ready"] and rep["missing"] == [] and rep["fix"] is None
    no_leftovers(tmp_path / "data")
    # ready: a second get needs no server
    assert get("voc2012", tmp_path / "data", registry=reg) == folder
    mask = np.array(Image.open(voc / "SegmentationClass" / f"{ids[0]}.png"))
    assert mask.ndim == 2 and mask.max() <= 255
    datasets = pytest.importorskip("seglab.data.datasets")
    if not hasattr(datasets, "VOCSegmentation"):
        pytest.skip("seglab.data.datasets has no VOCSegmentation yet")
    ds = datasets.VOCSegmentation(root=folder, split="val")
    assert len(ds) == len(ids) - len(ids) // 2


def test_course_subset_keeps_only_included_members(tmp_path, srv):
    archive, ids = voc_tar(srv / "voc.tar")
    with tarfile.open(archive, "a") as tar:
        ti = tarfile.TarInfo("VOCdevkit/VOC2012/Annotations/x.xml"); ti.size = 1
        tar.addfile(ti, io.BytesIO(b"<"))
    reg = voc_registry(archive.as_uri(), archive)
    folder = get("voc2012", tmp_path / "data", subset="course", registry=reg, progress=False)
    assert not (folder / "VOCdevkit/VOC2012/Annotations").exists()
    assert check("voc2012", tmp_path / "data", registry=reg)["subset"] == "course"
    # asking for the full set afterwards redoes it, never mixes
    folder = get("voc2012", tmp_path / "data", registry=reg, progress=False)
    assert (folder / "VOCdevkit/VOC2012/Annotations/x.xml").exists()


@pytest.mark.parametrize("case", ["corrupt", "truncated", "html_body", "html_type", "wrong_checksum"])
def test_bad_downloads_are_refused_and_leave_nothing(tmp_path, srv, case):
    data = {"corrupt": PAYLOAD[:100] + bytes([PAYLOAD[100] ^ 1]) + PAYLOAD[101:], "truncated": PAYLOAD[:100_000],
            "html_body": b"\n<!DOCTYPE html><html>Google Drive - quota exceeded</html>", "wrong_checksum": PAYLOAD,
            "html_type": PAYLOAD}[case]
    (srv / "f.bin").write_bytes(data)
    kw = dict(GOOD, sha256="0" * 64) if case == "wrong_checksum" else dict(GOOD)
    if case == "html_body":
        kw["size"] = None
    with local_server(srv, faults={"/f.bin": "html"} if case == "html_type" else None, lifetime=60) as (base, _):
        with pytest.raises(DownloadError) as e:
            download(f"{base}/f.bin", tmp_path / "out" / "f.bin", **kw)
    msg = str(e.value)
    expect = {"corrupt": "sha256", "truncated": "truncated", "html_body": "HTML", "html_type": "HTML page",
              "wrong_checksum": "sha256"}[case]
    assert expect in msg and f"{base}/f.bin" in msg, msg
    assert not (tmp_path / "out" / "f.bin").exists()
    no_leftovers(tmp_path / "out")


def test_known_checksum_failure_in_get_leaves_no_dataset(tmp_path, srv):
    archive, _ = voc_tar(srv / "voc.tar")
    reg = voc_registry(archive.as_uri(), archive, sha256="f" * 64)
    with pytest.raises(ChecksumError, match="sha256"):
        get("voc2012", tmp_path / "data", registry=reg, progress=False)
    assert not (tmp_path / "data" / "voc2012").exists()
    no_leftovers(tmp_path / "data")


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "hardlink", "device"])
def test_malicious_tar_refused(tmp_path, srv, kind):
    archive = bad_tar(srv / f"{kind}.tar", kind)
    with local_server(srv, lifetime=60) as (base, _):
        reg = voc_registry(f"{base}/{archive.name}", archive)
        with pytest.raises(UnsafeArchiveError, match="absolute|'..'|outside|device"):
            get("voc2012", tmp_path / "data", registry=reg, progress=False)
    assert not (tmp_path / "data" / "voc2012").exists()
    no_leftovers(tmp_path / "data")
    assert not Path("/tmp/seglab_evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_malicious_zip_refused(tmp_path):
    for name, build in {"dotdot": lambda z: z.writestr("a/../../evil.txt", "x"),
                        "absolute": lambda z: z.writestr("/abs.txt", "x")}.items():
        with zipfile.ZipFile(tmp_path / f"{name}.zip", "w") as z:
            z.writestr("ok.txt", "1")
            build(z)
        with pytest.raises(UnsafeArchiveError):
            safe_extract(tmp_path / f"{name}.zip", tmp_path / "out" / name)
        assert not (tmp_path / "out" / name).exists()
    link = zipfile.ZipInfo("ln")
    link.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as z:
        z.writestr(link, "../../etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="outside"):
        safe_extract(tmp_path / "link.zip", tmp_path / "out" / "link")
    no_leftovers(tmp_path / "out")


def test_resume_from_part_with_range(tmp_path, srv):
    dest = tmp_path / "out" / "g.bin"
    dest.parent.mkdir()
    dest.with_name("g.bin.part").write_bytes(PAYLOAD[:123_456])
    with local_server(srv, lifetime=60) as (base, log):
        download(f"{base}/good.bin", dest, **GOOD)
    assert log == [("/good.bin", "bytes=123456-")]
    assert dest.read_bytes() == PAYLOAD
    no_leftovers(tmp_path / "out")


def test_interrupted_connection_resumes(tmp_path, srv):
    with local_server(srv, faults={"/good.bin": ("drop", 70_000)}, lifetime=60) as (base, log):
        download(f"{base}/good.bin", tmp_path / "g.bin", **GOOD)
    assert log == [("/good.bin", None), ("/good.bin", "bytes=70000-")], log
    assert (tmp_path / "g.bin").read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_cleanly(tmp_path, srv):
    dest = tmp_path / "g.bin"
    dest.with_name("g.bin.part").write_bytes(PAYLOAD[:1000])
    with local_server(srv, faults={"/good.bin": "norange"}, lifetime=60) as (base, log):
        download(f"{base}/good.bin", dest, **GOOD)
    assert dest.read_bytes() == PAYLOAD


def test_stale_part_of_another_file_is_discarded(tmp_path, srv):
    dest = tmp_path / "g.bin"
    dest.with_name("g.bin.part").write_bytes(b"\0" * 1000)      # not a prefix of the file: hash fails, redo
    with local_server(srv, lifetime=60) as (base, log):
        download(f"{base}/good.bin", dest, **GOOD)
    assert dest.read_bytes() == PAYLOAD and log[-1] == ("/good.bin", None)


def test_mirror_fallback_reports_each_reason(tmp_path, srv):
    (srv / "bad.bin").write_bytes(PAYLOAD[:10])
    with local_server(srv, lifetime=60) as (base, log):
        info = download([f"{base}/missing.bin", f"{base}/bad.bin", f"{base}/good.bin"], tmp_path / "g.bin", **GOOD)
        assert info["url"] == f"{base}/good.bin"
        with pytest.raises(DownloadError) as e:
            download([f"{base}/missing.bin", f"{base}/bad.bin"], tmp_path / "h.bin", **GOOD)
    msg = str(e.value)
    assert "missing.bin: HTTPError" in msg and "bad.bin" in msg and "truncated" in msg, msg


def test_file_url(tmp_path, srv):
    info = download((srv / "good.bin").as_uri(), tmp_path / "g.bin", **GOOD)
    assert info["sha256"] == GOOD["sha256"] and (tmp_path / "g.bin").read_bytes() == PAYLOAD


def test_trust_on_first_use_pins_then_enforces(tmp_path, srv):
    archive, _ = voc_tar(srv / "voc.tar")
    reg = voc_registry(archive.as_uri(), archive, sha256=None, size=None)
    root = tmp_path / "data"
    with pytest.warns(UserWarning, match="trust"):
        get("voc2012", root, registry=reg, progress=False)
    pin = read_lock(root)["voc2012/VOCtrainval_11-May-2012.tar"]
    assert pin["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    # the server now serves different bytes: a fresh download must be refused
    (root / "_downloads/voc2012/VOCtrainval_11-May-2012.tar").unlink()
    import shutil
    shutil.rmtree(root / "voc2012")
    with tarfile.open(archive, "a") as tar:
        ti = tarfile.TarInfo("VOCdevkit/VOC2012/extra.txt"); ti.size = 1
        tar.addfile(ti, io.BytesIO(b"1"))
    with pytest.raises(DownloadError, match="sha256|bytes"):
        get("voc2012", root, registry=reg, progress=False)
    no_leftovers(root)


def test_interrupted_preparation_is_redone(tmp_path, srv):
    archive, ids = voc_tar(srv / "voc.tar")
    reg = voc_registry(archive.as_uri(), archive)
    root = tmp_path / "data"
    stale = root / ".voc2012.partial-old"
    (stale / "junk").mkdir(parents=True)
    half = root / "voc2012" / "VOCdevkit"               # a half folder without marker is never used
    half.mkdir(parents=True)
    assert not check("voc2012", root, registry=reg)["ready"]
    folder = get("voc2012", root, registry=reg, progress=False)
    assert (folder / ".seglab_ready.json").exists() and not stale.exists()
    assert sorted(p.stem for p in (folder / "VOCdevkit/VOC2012/SegmentationClass").glob("*.png")) == ids


def test_cli(tmp_path, capsys):
    assert data_cli(["list"]) == 0
    out = capsys.readouterr().out
    assert "voc2012" in out and "cityscapes" in out and "manual" in out
    assert data_cli(["get", "cityscapes", "--root", str(tmp_path)]) == 2
    assert "cityscapes-dataset.com" in capsys.readouterr().out
    assert data_cli(["get", "nope", "--root", str(tmp_path)]) == 1
    assert data_cli(["check", "voc2012", "--root", str(tmp_path)]) == 1
    assert "seglab data get voc2012" in capsys.readouterr().out


def test_family_script_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "data_scripts" / "cityscapes.py"), "--root", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "login" in r.stdout, r.stdout + r.stderr
    scripts = {p.stem for p in (ROOT / "data_scripts").glob("*.py")}
    assert set(dl.FAMILIES) <= scripts
