"""The `cocostuff27` registry entry (issue #15, HP): pinned only after a complete download, and a `course` subset
that prepares only the images the HP recipe uses, tested on a small zip shaped like STEGO's cocostuff.zip."""
import dataclasses
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from seglab.data import download as dl
from seglab.data.download import COCOSTUFF27_COURSE, REGISTRY, get, local_server, read_lock


def _img(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def stego_zip(path, n_train=7, n_val=5, extra_files=3):
    """`cocostuff/{images,annotations}/{train2017,val2017}/<id>.{jpg,png}` and the IIC curated lists
    `cocostuff/curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse{,_7}.txt`; some images are in no list."""
    import zipfile
    rng = np.random.default_rng(0)
    ids = {}
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in (("train", n_train), ("val", n_val)):
            all_ids = [f"{split}{k:012d}" for k in range(n + extra_files)]
            ids[split] = all_ids[:n]
            for i in all_ids:
                zf.writestr(f"cocostuff/images/{split}2017/{i}.jpg", _img(rng.integers(0, 255, (20, 24, 3), np.uint8), "JPEG"))
                zf.writestr(f"cocostuff/annotations/{split}2017/{i}.png", _img(rng.integers(0, 182, (20, 24), np.uint8), "PNG"))
            zf.writestr(f"cocostuff/curated/{split}2017/{dl.COCOSTUFF27_LISTS[split]}", "\n".join(ids[split]) + "\n")
    return path, ids


def test_registry_entry_states_how_it_is_pinned_and_the_subset():
    ds = REGISTRY["cocostuff27"]
    fs = ds.files[0]
    assert fs.sha256 is None and fs.md5 is None                       # nothing published to pin against ...
    assert "registry.lock.json" in ds.notes and "complete" in ds.notes and "seglab data unpin cocostuff27" in ds.notes
    assert "pinned" in fs.checksum_source                             # ... so the entry says how the pin is made
    assert "cocostuff27_subset" in ds.prepare and "course" in ds.subsets
    assert sum(COCOSTUFF27_COURSE.values()) == 2500 and "2,500" in ds.subsets["course"].note


def test_course_subset_prepares_only_the_recipe_images(tmp_path, monkeypatch):
    srv = tmp_path / "srv"
    srv.mkdir()
    archive, ids = stego_zip(srv / "cocostuff.zip")
    monkeypatch.setattr(dl, "COCOSTUFF27_COURSE", {"train": 4, "val": 2})
    real = REGISTRY["cocostuff27"]
    root = tmp_path / "data"
    with local_server(srv, lifetime=60) as (base, log):
        reg = {"cocostuff27": dataclasses.replace(real, files=(dataclasses.replace(real.files[0],
                                                                                   urls=(f"{base}/cocostuff.zip",)),))}
        with pytest.warns(UserWarning, match="trust"):
            folder = get("cocostuff27", root, subset="course", registry=reg, progress=False)
    # pinned on first use, after a complete download
    assert read_lock(root)["cocostuff27/cocostuff.zip"]["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    base_dir = folder / "cocostuff"
    for split, n in (("train", 4), ("val", 2)):
        assert sorted(p.stem for p in (base_dir / "images" / f"{split}2017").glob("*.jpg")) == ids[split][:n]
        assert sorted(p.stem for p in (base_dir / "annotations" / f"{split}2017").glob("*.png")) == ids[split][:n]
    datasets = pytest.importorskip("seglab.data.datasets")
    train, val = datasets.CocoStuff27(folder, "train"), datasets.CocoStuff27(folder, "val")
    assert (len(train), len(val)) == (4, 2)
    s = train[3]
    assert s["image"].shape == (3, 20, 24) and s["mask"].shape == (20, 24) and int(s["mask"].max()) <= 255
    # the full set afterwards replaces the subset with everything
    with local_server(srv, lifetime=60) as (base, _):
        reg = {"cocostuff27": dataclasses.replace(real, files=(dataclasses.replace(real.files[0],
                                                                                   urls=(f"{base}/cocostuff.zip",)),))}
        folder = get("cocostuff27", root, registry=reg, progress=False)
    assert len(list((folder / "cocostuff/images/train2017").glob("*.jpg"))) == 10
