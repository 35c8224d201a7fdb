"""seglab.data.download under attack and faults (issue #14): crafted archives served from a local HTTP server through
`get` must be refused with nothing written outside the data root; damaged archives give one seglab error naming the
file and the fix; downloads that did not end cleanly are never pinned; a user's file is moved aside, never deleted;
HTML behind a byte-order mark is refused; plain http needs a sha256; concurrent `get`s of one dataset do not collide."""
import dataclasses
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from seglab.data import download as dl
from seglab.data.download import (REGISTRY, ChecksumError, CorruptArchiveError, DownloadError, UnsafeArchiveError,
                                  data_cli, download, get, local_server, read_lock, safe_extract)

ROOT = Path(__file__).resolve().parents[1]
NAME = "VOCtrainval_11-May-2012.tar"          # the registry entry's file name (the content decides the format)


# ----------------------------------------------------------------------------------------------- helpers
def voc_members():
    "A minimal valid VOC layout: (name, bytes) pairs."
    ids = ["2007_000001", "2007_000002"]
    out = [(f"VOCdevkit/VOC2012/JPEGImages/{i}.jpg", b"jpg" + i.encode()) for i in ids]
    out += [(f"VOCdevkit/VOC2012/SegmentationClass/{i}.png", b"png" + i.encode()) for i in ids]
    out += [("VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt", b"2007_000001\n"),
            ("VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt", b"2007_000002\n")]
    return out


def write_tar(path, members, mode="w"):
    "`members`: (name, bytes) for files, (name, 'sym'|'dir'|'hard', linkname) for links and folders."
    with (tarfile.open(fileobj=path, mode=mode) if isinstance(path, io.BytesIO) else tarfile.open(path, mode)) as tar:
        for m in members:
            ti = tarfile.TarInfo(m[0])
            if len(m) == 2:
                ti.size = len(m[1])
                tar.addfile(ti, io.BytesIO(m[1]))
            else:
                ti.type = {"sym": tarfile.SYMTYPE, "dir": tarfile.DIRTYPE, "hard": tarfile.LNKTYPE}[m[1]]
                ti.linkname = m[2]
                tar.addfile(ti)
    return path


def write_zip(path, members):
    "As Info-ZIP writes them: Unix file types in the external attributes."
    with zipfile.ZipFile(path, "w") as zf:
        for m in members:
            if len(m) == 2:
                info = zipfile.ZipInfo(m[0])
                info.external_attr = 0o100644 << 16
                zf.writestr(info, m[1])
            elif m[1] == "dir":
                info = zipfile.ZipInfo(m[0].rstrip("/") + "/")
                info.external_attr = (0o040755 << 16) | 0x10
                zf.writestr(info, b"")
            else:
                info = zipfile.ZipInfo(m[0])
                info.external_attr = 0o120777 << 16
                zf.writestr(info, m[2])
    return path


def registry(url, archive=None, *, published=True, **changes):
    "The real voc2012 entry with one file served at `url` (published size + sha256 of `archive`, or none: TOFU)."
    real = REGISTRY["voc2012"]
    fs = dataclasses.replace(real.files[0], urls=tuple(url) if isinstance(url, list) else (url,), md5=None,
                             size=archive.stat().st_size if published else None,
                             sha256=hashlib.sha256(archive.read_bytes()).hexdigest() if published else None)
    return {"voc2012": dataclasses.replace(real, files=(dataclasses.replace(fs, **changes),))}


def tree(top, skip=()):
    "Every path under `top` (links not followed) except the `skip` subtrees: the 'outside' of the data root."
    out = set()
    for d, dirs, files in os.walk(top):
        dirs[:] = [x for x in dirs if Path(d, x) not in skip]
        out |= {str(Path(d, x).relative_to(top)) for x in dirs + files}
    return out


def nothing_outside(tmp_path, data, srv):
    "Snapshot the tree around the data root; call the result afterwards to assert nothing appeared outside it."
    skip = {Path(data), Path(srv)}
    before = tree(tmp_path, skip)
    return lambda: (tree(tmp_path, skip) - before) == set() or pytest.fail(f"written outside: {tree(tmp_path, skip) - before}")


# ------------------------------------------------------------------------------------ crafted archives
def chain_members(depth, target, fmt):
    """Issue #14's zip: `d/u0 -> ..`, `d/u1 -> u0/..`, ... (16 links, each harmless as text; `d/u<depth>` is `/` on
    disk when `depth` is the extraction folder's depth), then a link `d/w` through them to `target` and a file `d/w`
    written through it, and a file in a new folder beside `target` reached through the chain."""
    links = [("d/u0", "sym", "..")] + [(f"d/u{k}", "sym", f"u{k - 1}/..") for k in range(1, 16)]
    up = f"d/u{depth}/"
    return [("d", "dir", "")] + links + [("d/w", "sym", f"u{depth}/{str(target).lstrip('/')}"), ("d/w", b"pwned"),
                                         (up + str(target.parent / "pwned_dir" / "x.txt").lstrip("/"), b"pwned")]


def pathmax_members(target_rel):
    """The CVE-2025-4517 construction: 16 nested 247-character folders, a one-letter link to each, a link through
    all of them to `../` x 16 (which `os.path.realpath` cannot resolve past PATH_MAX), and a file written through an
    `escape` link to `target_rel` (relative to the extraction folder)."""
    comp, steps, path, out = "d" * 247, "abcdefghijklmnop", "", []
    for s in steps:
        out += [(os.path.join(path, comp), "dir", ""), (os.path.join(path, s), "sym", comp)]
        path = os.path.join(path, comp)
    linkpath = os.path.join(*steps, "l" * 254)
    out += [(linkpath, "sym", "../" * len(steps)), ("escape", "sym", f"{linkpath}/{target_rel}"),
            ("escape/pwned.txt", b"pwned")]
    return out


def crafted(kind, tmp_path, data):
    "Build crafted archive `kind` aimed at `tmp_path/pwned*`; return its members and format."
    extract_depth = len(data.parts)          # the extraction folder sits one level below the data root
    target = tmp_path / "pwned.txt"
    return {
        "zip_link_chain": (chain_members(extract_depth, target, "zip"), "zip"),
        "tar_link_chain": (chain_members(extract_depth, target, "tar"), "tar"),
        "tar_pathmax": (pathmax_members("../.."), "tar"),
        "zip_abs_symlink": ([("ok.txt", b"1"), ("ln", "sym", str(tmp_path)), ("ln/pwned.txt", b"x")], "zip"),
        "zip_link_then_write": ([("a", "sym", "."), ("a/b", "sym", "../.."), ("a/b/pwned.txt", b"x")], "zip"),
        "tar_long_name": ([("x/" + "y" * 200 + "/" + "z" * 200 + "/" + "w" * 200 + "/" + "v" * 250 + "/" + "u" * 200, b"1")],
                          "tar"),
        "tar_hardlink_out": ([("ok.txt", b"1"), ("h", "hard", "../../pwned.txt")], "tar"),
        "tar_dotdot_link_in_dir": ([("a/b/c", "dir", ""), ("a/b/c/up", "sym", "../../../../pwned.txt")], "tar"),
    }[kind]


CRAFTED = ["zip_link_chain", "tar_link_chain", "tar_pathmax", "zip_abs_symlink", "zip_link_then_write",
           "tar_long_name", "tar_hardlink_out", "tar_dotdot_link_in_dir"]


@pytest.mark.parametrize("kind", CRAFTED)
def test_crafted_archive_refused_by_get_nothing_outside(tmp_path, kind, monkeypatch, capsys):
    srv, data = tmp_path / "srv", tmp_path / "data"
    srv.mkdir()
    members, fmt = crafted(kind, tmp_path, data)
    archive = (write_zip if fmt == "zip" else write_tar)(srv / NAME, voc_members() + members)
    check_outside = nothing_outside(tmp_path, data, srv)
    with local_server(srv, lifetime=60) as (base, _):
        with pytest.raises(UnsafeArchiveError, match="outside|through the symlink|limit|absolute|'..'"):
            get("voc2012", data, registry=registry(f"{base}/{NAME}", archive), progress=False)
        # `seglab data get voc2012` with this entry: exit code 1 and one line, no traceback
        monkeypatch.setitem(dl.REGISTRY, "voc2012", registry(f"{base}/{NAME}", archive)["voc2012"])
        assert data_cli(["get", "voc2012", "--root", str(data)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("error: ") and "Traceback" not in out, out
    check_outside()
    assert not list(tmp_path.glob("pwned*")) and not (data / "voc2012").exists()
    assert not [p for p in data.rglob("*") if ".partial-" in p.name or ".extract-" in p.name]


def test_pathmax_archive_is_refused_by_the_link_rule_alone(tmp_path, monkeypatch):
    "Without the path-length limit the PATH_MAX archive is still refused: no member is written through a link."
    monkeypatch.setattr(dl, "MAX_MEMBER_PATH", 10**6)
    archive = write_tar(tmp_path / "p.tar", pathmax_members("../.."))
    with pytest.raises(UnsafeArchiveError, match="through the symlink"):
        safe_extract(archive, tmp_path / "out" / "x")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("pwned*"))


def test_link_chains_are_resolved_through_links_already_on_disk(tmp_path):
    "A second archive of the same dataset cannot build on a link the first one left (`x -> ..`, then `y -> x/..`)."
    dest = tmp_path / "root" / "ds"
    safe_extract(write_zip(tmp_path / "one.zip", [("a/f.txt", b"1"), ("a/x", "sym", "..")]), dest)
    assert (dest / "a" / "x").is_symlink()
    with pytest.raises(UnsafeArchiveError, match="outside"):
        safe_extract(write_zip(tmp_path / "two.zip", [("a/y", "sym", "x/../..")]), dest)
    with pytest.raises(UnsafeArchiveError, match="through the symlink"):
        safe_extract(write_zip(tmp_path / "three.zip", [("a/z", "sym", "x"), ("a/z/g.txt", b"2")]), dest)
    assert not (dest / "a" / "y").exists() and not (dest / "a" / "z").exists()


def test_zip_without_unix_file_types_is_accepted(tmp_path):
    "`zipfile.writestr(name, data)` stores no Unix file type; such members are plain files, not device files."
    with zipfile.ZipFile(tmp_path / "py.zip", "w") as zf:
        zf.writestr("a/f.txt", "1")
    assert safe_extract(tmp_path / "py.zip", tmp_path / "out") == 1 and (tmp_path / "out/a/f.txt").read_text() == "1"


def test_inner_links_still_work(tmp_path):
    "Links that stay inside (also chains of them, also `..` that comes back) are extracted, after the files."
    archive = write_tar(tmp_path / "ok.tar", [("top/a/f.txt", b"1"), ("top/b/l1", "sym", "../a"),
                                               ("top/b/l2", "sym", "l1/f.txt"), ("top/c", "sym", "b/../a/f.txt"),
                                               ("top/h", "hard", "top/a/f.txt")])
    assert safe_extract(archive, tmp_path / "out", strip="top") == 5
    out = tmp_path / "out"
    assert (out / "b/l2").read_bytes() == b"1" and (out / "c").read_bytes() == b"1" and (out / "h").read_bytes() == b"1"
    assert (out / "b/l1").is_symlink() and not (out / "h").is_symlink()


# --------------------------------------------------------------------------------- damaged archives
def damaged(kind, srv):
    raw = io.BytesIO()
    write_tar(raw, [(f"VOCdevkit/VOC2012/f{k}.bin", os.urandom(20_000)) for k in range(5)])
    data = raw.getvalue()
    if kind == "tar.gz":
        data = gzip.compress(data)
        data = data[:len(data) // 2]
    elif kind == "tar":
        data = data[:30_000]
    elif kind == "zip":
        buf = io.BytesIO()
        write_zip(buf, [("VOCdevkit/VOC2012/a.bin", os.urandom(50_000))])
        data = bytearray(buf.getvalue())
        data[100] ^= 0xFF                       # a flipped byte in the member data: bad CRC
        data = bytes(data)
    (srv / NAME).write_bytes(data)
    return srv / NAME


@pytest.mark.parametrize("kind", ["tar.gz", "tar", "zip"])
def test_damaged_archive_is_one_seglab_error_naming_file_and_fix(tmp_path, kind, monkeypatch, capsys):
    srv = tmp_path / "srv"
    srv.mkdir()
    archive = damaged(kind, srv)
    data = tmp_path / "data"
    with local_server(srv, lifetime=60) as (base, _):
        reg = registry(f"{base}/{NAME}", archive)   # published checksum of the damaged bytes: download passes
        with pytest.raises(CorruptArchiveError) as e:
            get("voc2012", data, registry=reg, progress=False)
        msg = str(e.value)
        assert NAME in msg and "Fix:" in msg and "seglab data get voc2012" in msg, msg
        assert "moved aside" in msg and list((data / "_downloads/voc2012").glob(NAME + ".rejected-*"))
        # the same through the command line: one line, exit code 1, no traceback
        monkeypatch.setitem(dl.REGISTRY, "voc2012", reg["voc2012"])
        assert data_cli(["get", "voc2012", "--root", str(data)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("error: ") and NAME in out and "Traceback" not in out, out
    assert not (data / "voc2012").exists()


def test_safe_extract_truncated_tar_gz_names_the_file(tmp_path):
    archive = damaged("tar.gz", tmp_path)
    with pytest.raises(CorruptArchiveError, match="truncated or damaged") as e:
        safe_extract(archive, tmp_path / "out")
    assert str(archive) in str(e.value) and "Fix" in str(e.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- downloads
def voc_archive(srv):
    return write_tar(srv / NAME, voc_members() + [(f"VOCdevkit/VOC2012/pad{k}.bin", os.urandom(30_000))
                                                   for k in range(4)])


def test_no_length_and_dropped_connection_is_never_pinned(tmp_path):
    "No Content-Length, connection closed after 60 kB: looks like a clean end. The listing catches it; retry."
    srv = tmp_path / "srv"
    srv.mkdir()
    archive = voc_archive(srv)
    good = hashlib.sha256(archive.read_bytes()).hexdigest()
    with local_server(srv, faults={f"/{NAME}": ("cut", 60_000)}, lifetime=60) as (base, log):
        with pytest.warns(UserWarning, match="trust"):
            get("voc2012", tmp_path / "data", registry=registry(f"{base}/{NAME}", archive, published=False),
                progress=False)
    assert len(log) == 2, log                    # the cut transfer, then a full one
    assert read_lock(tmp_path / "data")["voc2012/" + NAME]["sha256"] == good


def test_no_length_non_archive_is_used_but_not_pinned(tmp_path):
    srv = tmp_path / "srv"
    srv.mkdir()
    (srv / "list.txt").write_bytes(b"a\nb\n")
    reg = {"pascal5i": dataclasses.replace(REGISTRY["pascal5i"], requires=(), files=(
        dl.FileSpec("voc_sbd_merge_noduplicate.txt", extract=False), dl.FileSpec("val.txt", extract=False)))}
    with local_server(srv, faults={"/list.txt": "nolength"}, lifetime=60) as (base, _):
        reg = {"pascal5i": dataclasses.replace(reg["pascal5i"], files=tuple(
            dataclasses.replace(f, urls=(f"{base}/list.txt",)) for f in reg["pascal5i"].files))}
        with pytest.warns(UserWarning, match="NOT pinned"):
            get("pascal5i", tmp_path / "data", registry=reg, progress=False)
    assert read_lock(tmp_path / "data") == {}


def test_resumed_garbage_part_is_never_pinned(tmp_path):
    "A leftover .part of unknown origin, for a file nothing can verify, is discarded instead of resumed."
    srv = tmp_path / "srv"
    srv.mkdir()
    archive = voc_archive(srv)
    root = tmp_path / "data"
    part = root / "_downloads/voc2012" / (NAME + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(os.urandom(50_000))
    with local_server(srv, lifetime=60) as (base, log):
        with pytest.warns(UserWarning, match="trust"):
            get("voc2012", root, registry=registry(f"{base}/{NAME}", archive, published=False), progress=False)
    assert log == [(f"/{NAME}", None)], log
    assert read_lock(root)["voc2012/" + NAME]["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert (root / "_downloads/voc2012" / NAME).read_bytes() == archive.read_bytes()


def test_pin_mismatch_names_lock_file_and_unpin_command(tmp_path, monkeypatch, capsys):
    srv = tmp_path / "srv"
    srv.mkdir()
    archive = voc_archive(srv)
    root = tmp_path / "data"
    with local_server(srv, lifetime=60) as (base, _):
        reg = registry(f"{base}/{NAME}", archive, published=False)
        with pytest.warns(UserWarning, match="trust"):
            get("voc2012", root, registry=reg, progress=False)
        (root / "_downloads/voc2012" / NAME).unlink()
        import shutil
        shutil.rmtree(root / "voc2012")
        voc_archive(srv)                               # the source changed
        with pytest.raises(ChecksumError) as e:
            get("voc2012", root, registry=reg, progress=False)
        msg = str(e.value)
        assert str(root / "registry.lock.json") in msg and "seglab data unpin voc2012" in msg, msg
        monkeypatch.setitem(dl.REGISTRY, "voc2012", reg["voc2012"])
        assert data_cli(["unpin", "voc2012", "--root", str(root)]) == 0
        assert "removed 1 pin" in capsys.readouterr().out and read_lock(root) == {}
        with pytest.warns(UserWarning, match="trust"):
            get("voc2012", root, registry=reg, progress=False)


def test_hand_placed_file_failing_its_pin_is_moved_aside(tmp_path):
    "A manual dataset's file that fails its pin is kept (renamed), and the message does not loop over 0 URLs."
    root = tmp_path / "data"
    ds = REGISTRY["pascal_s"]
    reg = {"pascal_s": ds}
    dest = root / "_downloads/pascal_s/salObj.zip"
    dest.parent.mkdir(parents=True)
    write_zip(dest, [("a.txt", b"1")])
    with pytest.warns(UserWarning, match="trust"):
        get("pascal_s", root, registry=reg, progress=False)
    import shutil
    shutil.rmtree(root / "pascal_s")
    write_zip(dest, [("a.txt", b"2")])               # the user puts another file there
    with pytest.raises(ChecksumError) as e:
        get("pascal_s", root, registry=reg, progress=False)
    msg = str(e.value)
    aside = list(dest.parent.glob("salObj.zip.rejected-*"))
    assert len(aside) == 1 and zipfile.ZipFile(aside[0]).read("a.txt") == b"2", aside
    assert "moved aside" in msg and str(aside[0]) in msg and "0 URL" not in msg and "seglab data unpin" in msg, msg


@pytest.mark.parametrize("bom", [b"\xef\xbb\xbf", b"\xff\xfe"])
def test_html_with_byte_order_mark_is_refused(tmp_path, bom):
    srv = tmp_path / "srv"
    srv.mkdir()
    page = "\n<!DOCTYPE html><html>quota exceeded</html>"
    (srv / "f.bin").write_bytes(bom + page.encode("utf-8" if bom == b"\xef\xbb\xbf" else "utf-16-le"))
    with local_server(srv, lifetime=60) as (base, _):
        with pytest.raises(ChecksumError, match="HTML"):
            download(f"{base}/f.bin", tmp_path / "out" / "f.bin", progress=False, sha256="0" * 64)
    assert not list((tmp_path / "out").glob("f.bin*"))


def test_plain_http_needs_a_sha256(tmp_path, monkeypatch):
    "Refused before any connection is made; the loopback (this machine) and an explicit opt-in are the exceptions."
    monkeypatch.delenv("SEGLAB_ALLOW_HTTP", raising=False)
    with pytest.raises(DownloadError, match="SEGLAB_ALLOW_HTTP") as e:
        download(["http://mirror.example.invalid/f.bin"], tmp_path / "a.bin", progress=False)
    assert "refused: plain http" in str(e.value)
    assert not dl._http_refused("http://mirror.example.invalid/f.bin", "0" * 64)
    assert not dl._http_refused("https://mirror.example.invalid/f.bin", None)
    assert not dl._http_refused("http://127.0.0.1:8000/f.bin", None)
    monkeypatch.setenv("SEGLAB_ALLOW_HTTP", "1")
    assert not dl._http_refused("http://mirror.example.invalid/f.bin", None)


def test_https_mirrors_first_and_every_plain_http_file_counted():
    assert dl._ordered(["http://a/x", "file:///x", "https://b/x", "http://c/x"]) == [
        "https://b/x", "file:///x", "http://a/x", "http://c/x"]
    http = [(d.name, f.name, f.sha256 is not None) for d in REGISTRY.values() for f in d.files
            if any(u.startswith("http://") for u in f.urls)]
    # files that can still be fetched over http without opt-in are exactly those with a published sha256
    assert {(d, f) for d, f, ok in http if ok} == {("voc2012", "VOCtrainval_11-May-2012.tar"),
                                                   ("coco2014", "train2014.zip"), ("coco2014", "val2014.zip"),
                                                   ("coco2014", "annotations_trainval2014.zip")}


def test_concurrent_gets_of_one_dataset_in_two_processes(tmp_path):
    srv = tmp_path / "srv"
    srv.mkdir()
    archive = write_tar(srv / NAME, voc_members() + [(f"VOCdevkit/VOC2012/JPEGImages/x{k:04d}.jpg", os.urandom(2000))
                                                       for k in range(400)])
    root = tmp_path / "data"
    script = tmp_path / "getter.py"
    with local_server(srv, faults={f"/{NAME}": ("slow", 1.0)}, lifetime=120) as (base, log):
        spec = dict(url=f"{base}/{NAME}", size=archive.stat().st_size,
                    sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
        script.write_text(textwrap.dedent(f"""
            import dataclasses, sys
            from seglab.data.download import REGISTRY, get
            real = REGISTRY["voc2012"]
            fs = dataclasses.replace(real.files[0], urls=({spec['url']!r},), size={spec['size']}, sha256={spec['sha256']!r}, md5=None)
            print(get("voc2012", {str(root)!r}, registry={{"voc2012": dataclasses.replace(real, files=(fs,))}}, progress=False))
        """))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(log) == 1, log                      # the second process waited, then found the dataset ready
    final = root / "voc2012"
    assert json.loads((final / ".seglab_ready.json").read_text())["name"] == "voc2012"
    assert len(list((final / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))) == 402
    assert not [p.name for p in root.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_older_subset_tree_is_cleaned_and_hand_placed_folder_kept(tmp_path):
    srv = tmp_path / "srv"
    srv.mkdir()
    archive = voc_archive(srv)
    root = tmp_path / "data"
    reg = registry(archive.as_uri(), archive)
    get("voc2012", root, subset="course", registry=reg, progress=False)
    get("voc2012", root, registry=reg, progress=False)           # the full set replaces the course subset
    assert not list(root.glob(".voc2012.old-*"))                   # seglab's own older tree is removed
    stale = root / ".voc2012.old-20200101-000000"                  # left by an older seglab: has our marker
    (stale / "x").mkdir(parents=True)
    (stale / ".seglab_ready.json").write_text("{}")
    import shutil
    shutil.rmtree(root / "voc2012")
    (root / "voc2012" / "notes").mkdir(parents=True)               # a folder the user made by hand: no marker
    (root / "voc2012" / "notes" / "mine.txt").write_text("mine")
    with pytest.warns(UserWarning, match="placed by hand"):
        get("voc2012", root, registry=reg, progress=False)
    assert not stale.exists()
    kept = list(root.glob(".voc2012.old-*"))
    assert len(kept) == 1 and (kept[0] / "notes" / "mine.txt").read_text() == "mine"


def test_file_lock_is_exclusive_and_leaves_no_file(tmp_path):
    """Three workers take turns on one lock (each logs start/end, never interleaved); the lock file is removed. Threads
    suffice: `flock` locks belong to open file descriptions, so two `open()`s of one file conflict like two processes."""
    import threading
    import time
    log = []

    def worker():
        with dl._file_lock(tmp_path / "thing"):
            log.append("start")
            time.sleep(0.3)
            log.append("end")

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t, delay in zip(threads, (0, 0.1, 0.3)):   # the third arrives while the second waits on the first's file
        time.sleep(delay)
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert log == ["start", "end"] * 3, log
    assert not list(tmp_path.glob(".lock-*"))


def test_verified_bytes_starting_with_a_bracket_are_not_html(tmp_path):
    "A binary file may start with `<` (1 in 256 random files): its checksum proves it, no HTML guess refuses it."
    blob = b"<\x97H\\\xe2" + os.urandom(1000)
    (tmp_path / "b.bin").write_bytes(blob)
    info = dl.verify_file(tmp_path / "b.bin", sha256=hashlib.sha256(blob).hexdigest())
    assert info["size"] == len(blob)
    assert dl.verify_file(tmp_path / "b.bin")["size"] == len(blob)         # not an HTML page either
    (tmp_path / "p.bin").write_bytes(b"  <!doctype HTML><title>Quota</title>")
    with pytest.raises(ChecksumError, match="HTML"):
        dl.verify_file(tmp_path / "p.bin", sha256="0" * 64)
